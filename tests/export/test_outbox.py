"""The SQLite outbox: group commit, dedupe window, delivery cursor + sink recovery."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from export.delivery import DeliveryService, DeliveryWorker
from export.file_sinks import JsonlFileSink
from export.outbox import ClaimStatus, OutboxRecord
from export.sqlite_outbox import SqliteOutbox
from tests.waiting import async_wait_until


def record(
    i: int, source: str = "s", destinations: tuple[str, ...] = ("d",), at_ms: int = 1_763_700_000_000
) -> OutboxRecord:
    payload = json.dumps({"messageId": f"m{i}", "i": i}).encode()
    return OutboxRecord("t", source, f"m{i}", at_ms, destinations, payload)


@pytest.fixture
def outbox(tmp_path: Path):
    clock = {"now": 1_763_700_000.0}
    box = SqliteOutbox(tmp_path / "outbox.sqlite3", dedupe_window_seconds=3600, clock=lambda: clock["now"])
    box.open()
    box.clock = clock  # type: ignore[attr-defined]
    yield box
    box.close()


def test_concurrent_appends_are_group_committed(outbox: SqliteOutbox) -> None:
    async def main() -> list[list[bool]]:
        return await asyncio.gather(*(outbox.append([record(i)], dedupe=True) for i in range(300)))

    results = asyncio.run(main())
    assert all(r == [True] for r in results)
    assert outbox.appends_committed == 300
    assert outbox.commits < 300  # several requests shared one fsync
    rows = asyncio.run(outbox.read_after(0, 1000))
    assert sorted(json.loads(r.payload)["i"] for r in rows) == list(range(300))


def test_dedupe_window_per_source(outbox: SqliteOutbox) -> None:
    assert outbox.append_sync([record(1), record(1), record(2)], dedupe=True) == [True, False, True]
    assert outbox.append_sync([record(1, source="other")], dedupe=True) == [True]
    outbox.clock["now"] += 3599  # type: ignore[attr-defined]
    assert outbox.append_sync([record(1)], dedupe=True) == [False]
    outbox.clock["now"] += 3601  # type: ignore[attr-defined]
    assert outbox.append_sync([record(1)], dedupe=True) == [True]  # the window has passed


def test_failed_write_rolls_back_and_the_writer_goes_on(outbox: SqliteOutbox) -> None:
    def broken(conn):  # type: ignore[no-untyped-def]
        conn.execute(
            "INSERT INTO outbox(tenant, source, message_id, received_at_ms, destinations, payload) "
            "VALUES ('t', 's', 'half', 0, 'd', x'00')"
        )
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        outbox._transaction(broken)
    assert outbox.append_sync([record(5)], dedupe=True) == [True]
    ids = [r.payload for r in asyncio.run(outbox.read_after(0, 10))]
    assert len(ids) == 1 and b"half" not in ids[0]


def test_records_without_destination_are_not_stored(outbox: SqliteOutbox) -> None:
    assert outbox.append_sync([record(1, destinations=())], dedupe=True) == [True]
    assert asyncio.run(outbox.read_after(0, 10)) == []


def test_delivery_is_exactly_once_across_crash_between_write_and_commit(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.sqlite3")
    box.open()
    box.append_sync([record(i, destinations=("a", "b") if i % 2 else ("a",)) for i in range(50)], dedupe=True)

    async def deliver_all(sink_root: Path) -> None:
        workers = [
            DeliveryWorker(box.queue(d), JsonlFileSink(sink_root, d), batch_size=7, poll_seconds=0.01)
            for d in ("a", "b")
        ]
        service = DeliveryService(box, workers)
        await service.start()

        async def drained() -> bool:
            return await box.pending() == 0

        await async_wait_until(drained, what="the outbox to drain")
        await service.stop()

    asyncio.run(deliver_all(tmp_path / "sinks"))
    a_file = next((tmp_path / "sinks" / "a").glob("*.jsonl"))
    # A crash after writing but before the cursor commit leaves stray bytes behind.
    with open(a_file, "ab") as fh:
        fh.write(b'{"messageId": "m0", "i": 0}\n{"partial')
    box.append_sync([record(i, destinations=("a",)) for i in range(50, 60)], dedupe=True)
    asyncio.run(deliver_all(tmp_path / "sinks"))
    box.close()

    def lines(dest: str) -> list[int]:
        path = next((tmp_path / "sinks" / dest).glob("*.jsonl"))
        return [json.loads(x)["i"] for x in path.read_text().splitlines()]

    assert lines("a") == list(range(60))
    assert lines("b") == list(range(1, 50, 2))


def test_prune_keeps_undelivered_rows(outbox: SqliteOutbox) -> None:
    asyncio.run(outbox.register_destinations(["d", "e"]))
    outbox.append_sync([record(i) for i in range(10)], dedupe=True)
    stored = asyncio.run(outbox.read_after(0, 100))
    asyncio.run(outbox.commit_delivery("d", 10, len(stored), {}))
    assert asyncio.run(outbox.prune()) == (0, 0)  # "e" has delivered nothing yet
    asyncio.run(outbox.commit_delivery("e", 4, 4, {}))
    assert asyncio.run(outbox.prune())[0] == 4
    assert len(asyncio.run(outbox.read_after(0, 100))) == 6


def test_claims_dedupe_within_a_request_and_across_requests_in_flight(outbox: SqliteOutbox) -> None:
    async def go() -> None:
        first = await outbox.claim("web", ["a", "a", "b"])
        assert first.statuses == [ClaimStatus.NEW, ClaimStatus.DUPLICATE, ClaimStatus.NEW]
        assert len(first.digests) == 2 and first.keys == []  # the embedded store's own keys
        second = await outbox.claim("web", ["a", "c"])  # "a" is still being stored by the first
        assert second.statuses == [ClaimStatus.IN_FLIGHT, ClaimStatus.NEW]
        await outbox.append([record(1)], claim=first)
        await outbox.release(second)
        third = await outbox.claim("web", ["a", "c"])  # "a" confirmed; "c" was given back
        assert third.statuses == [ClaimStatus.DUPLICATE, ClaimStatus.NEW]

    asyncio.run(go())


def test_dedupe_marks_of_a_version_4_database_still_count_after_the_upgrade(tmp_path: Path) -> None:
    """Version 5 keys the marks by the digest's bytes: the hex marks an older idgate wrote
    are converted at open, so a retry of an event acknowledged before the upgrade is still a
    duplicate, and a new id is still new."""
    import sqlite3

    from export.outbox import dedupe_key
    from export.outbox_schema import SCHEMA_VERSION

    path = tmp_path / "outbox.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE dedupe (key TEXT PRIMARY KEY, seen_at_ms INTEGER NOT NULL) WITHOUT ROWID")
    old.execute(
        "INSERT INTO dedupe(key, seen_at_ms) VALUES (?, ?)", (dedupe_key("s", "m1").hex(), 1_763_700_000_000)
    )
    old.execute("PRAGMA user_version=4")
    old.commit()
    old.close()
    box = SqliteOutbox(path, dedupe_window_seconds=3600, clock=lambda: 1_763_700_060.0)
    box.open()
    try:
        claim = asyncio.run(box.claim("s", ["m1", "m2"]))
        assert claim.statuses == [ClaimStatus.DUPLICATE, ClaimStatus.NEW]
        assert box.append_sync([record(1), record(3)], dedupe=True) == [False, True]
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        kinds = {type(k) for (k,) in db.execute("SELECT key FROM dedupe")}
        assert kinds == {bytes}
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'dedupe_v4'").fetchall()
        db.close()
    finally:
        box.close()


def test_a_group_with_many_ids_dedupes_them_all(outbox: SqliteOutbox) -> None:
    """More ids than one lookup statement takes (they are looked up in chunks)."""
    first = outbox.append_sync([record(i) for i in range(1_200)], dedupe=True)
    assert first == [True] * 1_200
    again = outbox.append_sync([record(i) for i in range(1_100, 1_300)], dedupe=True)
    assert again == [False] * 100 + [True] * 100
    claim = asyncio.run(outbox.claim("s", [f"m{i}" for i in range(1_250, 1_350)]))
    assert claim.statuses == [ClaimStatus.DUPLICATE] * 50 + [ClaimStatus.NEW] * 50


def _lookups(box: SqliteOutbox) -> list[str]:
    """The dedupe lookups the claims connection runs from now on."""
    statements: list[str] = []
    box._claims.set_trace_callback(  # type: ignore[union-attr]
        lambda sql: statements.append(sql) if sql.startswith("SELECT key FROM dedupe") else None
    )
    return statements


def test_recent_marks_answer_new_ids_without_a_lookup_and_retries_with_one(tmp_path: Path) -> None:
    """The filter of recent marks: before it has read the table every id is looked up (a
    mark from before the restart is a duplicate all the same); once ready, new ids cost no
    lookup, and a retry of a marked id, made before or after the restart, is looked up and
    is a duplicate."""
    from tests.waiting import wait_until

    clock = {"now": 1_763_700_000.0}
    path = tmp_path / "outbox.sqlite3"
    first = SqliteOutbox(path, dedupe_window_seconds=3600, clock=lambda: clock["now"])
    first.open()
    assert first.append_sync([record(i) for i in range(50)], dedupe=True) == [True] * 50
    first.close()

    box = SqliteOutbox(path, dedupe_window_seconds=3600, clock=lambda: clock["now"])
    box.open()
    try:
        assert box.marks is not None
        lookups = _lookups(box)
        claim = asyncio.run(box.claim("s", ["m1", "m1000"]))
        assert claim.statuses == [ClaimStatus.DUPLICATE, ClaimStatus.NEW]
        asyncio.run(box.release(claim))
        marks = box.marks
        wait_until(lambda: marks.maybe(b"x" * 16, int(clock["now"] * 1000)) is not None and marks.ready)
        lookups.clear()
        fresh = asyncio.run(box.claim("s", [f"new-{i}" for i in range(200)]))
        assert fresh.statuses == [ClaimStatus.NEW] * 200
        # a false positive now and then is looked up; 200 new ids at 1 % make a few at most
        assert sum(sql.count("?") - 1 for sql in lookups) <= 10
        asyncio.run(box.append([record(2000 + i) for i in range(3)], claim=fresh))  # confirms the 200
        lookups.clear()
        again = asyncio.run(box.claim("s", ["m3", "new-7", "new-199"]))
        assert again.statuses == [ClaimStatus.DUPLICATE] * 3
        assert lookups  # the ids the filter may have seen were asked
    finally:
        box.close()


def test_recent_marks_forget_a_mark_only_after_a_whole_window() -> None:
    from export.sqlite_outbox import RecentMarks

    marks = RecentMarks(window_ms=1_000, now_ms=0, capacity=1_000)
    marks.ready = True  # nothing to read from a table here
    marks.add([b"a" * 16], now_ms=900)
    assert marks.maybe(b"a" * 16, now_ms=1_899)  # rotated at 1,000: in the previous filter
    assert not marks.maybe(b"b" * 16, now_ms=1_899)
    assert not marks.maybe(b"a" * 16, now_ms=2_000)  # two rotations later: forgotten


def test_person_index_notes_a_delivery_at_most_every_ten_minutes(outbox: SqliteOutbox) -> None:
    """A returning person's row is not rewritten for every event; a released person (a
    deletion's receipt) or an expired row is written again at their next delivery."""
    import sqlite3

    def at(person: str) -> int | None:
        db = sqlite3.connect(outbox.path)
        row = db.execute(
            "SELECT delivered_at_ms FROM delivered_person WHERE destination = 'd' AND unified_id = ?",
            (person,),
        ).fetchone()
        db.close()
        return None if row is None else int(row[0])

    async def deliver(person: str, released: tuple[str, ...] = ()) -> None:
        await outbox.commit_delivery("d", 0, 1, {}, persons=[person], released=released)

    start = int(outbox.clock["now"] * 1000)  # type: ignore[attr-defined]
    asyncio.run(deliver("p_a"))
    assert at("p_a") == start
    outbox.clock["now"] += 599  # type: ignore[attr-defined]
    asyncio.run(deliver("p_a"))
    assert at("p_a") == start  # within ten minutes: not written again
    outbox.clock["now"] += 1  # type: ignore[attr-defined]
    asyncio.run(deliver("p_a"))
    assert at("p_a") == start + 600_000
    asyncio.run(deliver("p_b", released=("p_a",)))
    assert at("p_a") is None
    asyncio.run(deliver("p_a"))  # sent again after its release: known again at once
    assert at("p_a") == start + 600_000
    assert asyncio.run(outbox.expire_person_index("d", start + 600_001, apply=True)) == 2
    asyncio.run(deliver("p_a"))
    assert at("p_a") == start + 600_000
