"""The delivery worker over both outbox backends (embedded SQLite, Redis Streams):
retries, dead letters, isolation of refused events, notices only where a person's data
went, pseudonym domains, takeover of a dead replica's entries, backlog."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from export.deadletter import DeadLetterStore, RedisDeadLetters, SqliteDeadLetters
from export.dedupe import RedisDedupe
from export.delivery import DeliveryService, DeliveryWorker, Retry
from export.domains import DomainRekeyer
from export.outbox import OutboxRecord, StoredRecord, notice_record
from export.redis_outbox import RedisStreamOutbox
from export.sink import PermanentSinkError, RetryableSinkError
from export.sqlite_outbox import SqliteOutbox
from identity.notices import IdentityMerged, NoticeContext, NoticeMeta
from identity.pseudonym import Pseudonymiser
from tests.conftest import RedisNamespace
from tests.waiting import async_wait_until

FAST = Retry(max_attempts=4, max_age_seconds=3600, initial_backoff=0.001, max_backoff=0.005)
PRF = Pseudonymiser(b"k" * 32, 1)


class MemorySink:
    """A sink that keeps what it is given; ``fail`` decides per write whether it raises."""

    def __init__(
        self, destination: str, fail: Callable[[list[StoredRecord]], Exception | None] = lambda _: None
    ):
        self.destination = destination
        self.fail = fail
        self.received: list[dict[str, Any]] = []
        self.writes = 0

    async def recover(self, committed: Mapping[str, int]) -> int:
        return 0

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        self.writes += 1
        error = self.fail(list(records))
        if error is not None:
            raise error
        self.received.extend(json.loads(r.payload) for r in records)
        return {}

    async def close(self) -> None:
        pass

    def ids(self) -> list[str]:
        return [r["messageId"] for r in self.received]


def event(i: int, person: str = "", destinations: tuple[str, ...] = ("a",), user: str = "") -> OutboxRecord:
    body: dict[str, Any] = {"type": "track", "messageId": f"m{i}", "event": "Viewed", "context": {}}
    if person:
        body["context"]["unified_id"] = person
    if user:
        body["userId"] = user
    return OutboxRecord(
        tenant="t",
        source="web",
        message_id=f"m{i}",
        received_at_ms=int(time.time() * 1000) + i,
        destinations=destinations,
        payload=json.dumps(body, separators=(",", ":")).encode(),
        person=person,
        pseudonyms=tuple(v for v in (person, user) if v),
    )


def merged_notice(survivor: str, merged: str, destinations: tuple[str, ...]) -> OutboxRecord:
    notice = IdentityMerged(
        message_id=f"identity.merged:{merged}",
        received_at=datetime.now(UTC),
        context=NoticeContext(NoticeMeta("t")),
        survivor=survivor,
        merged=merged,
    )
    return notice_record(notice, destinations)


def person(n: int) -> str:
    return "p_" + f"{n:022d}"


class Backend:
    """An outbox backend with its dead-letter store, as the app would open it."""

    def __init__(self, outbox: Any, dead_letters: DeadLetterStore, make_outbox: Callable[[str], Any]) -> None:
        self.outbox = outbox
        self.dead_letters = dead_letters
        self.make_outbox = make_outbox  # another replica's outbox (Redis), or the same one

    async def append(self, records: list[OutboxRecord]) -> None:
        await self.outbox.append(records, dedupe=False)


REDIS = pytest.param("redis", marks=pytest.mark.redis)


@pytest.fixture(params=["sqlite", REDIS])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        box = SqliteOutbox(tmp_path / "outbox.sqlite3")
        box.open()
        dlq = SqliteDeadLetters(tmp_path / "outbox.sqlite3")
        yield Backend(box, dlq, lambda _replica: box)
        dlq.close()
        box.close()
        return
    import redis
    import redis.asyncio as aioredis

    ns: RedisNamespace = request.getfixturevalue("redis_ns")  # removes its keys afterwards

    def make(replica: str) -> RedisStreamOutbox:
        client = aioredis.from_url(ns.url)
        dedupe = RedisDedupe(client, window_seconds=3600, prefix=f"{ns.prefix}:dedupe")
        return RedisStreamOutbox(client, prefix=ns.prefix, replica=replica, dedupe=dedupe, claim_idle_ms=200)

    yield Backend(make("r1"), RedisDeadLetters(redis.Redis.from_url(ns.url), ns.prefix), make)


@asynccontextmanager
async def running(backend: Backend, workers: list[DeliveryWorker]) -> AsyncIterator[DeliveryService]:
    service = DeliveryService(backend.outbox, workers, backlog_seconds=0.05)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def until(predicate: Callable[[], bool], seconds: float = 10) -> None:
    await async_wait_until(predicate, seconds, what="what the sinks received to match")


async def drained(outbox: Any) -> bool:
    """Every destination has been given (or has skipped) every record: nothing in flight."""
    return await outbox.pending() == 0


def worker(backend: Backend, sink: MemorySink, **kw: Any) -> DeliveryWorker:
    kw.setdefault("retry", FAST)
    kw.setdefault("dead_letters", backend.dead_letters)
    return DeliveryWorker(
        backend.outbox.queue(sink.destination), sink, poll_seconds=0.02, linger_seconds=0.0, **kw
    )


def test_retries_until_the_sink_recovers_keeping_order(backend: Backend) -> None:
    failures = iter([RetryableSinkError("503"), RetryableSinkError("timeout"), RetryableSinkError("503")])
    sink = MemorySink("a", lambda _: next(failures, None))

    async def go() -> None:
        await backend.append([event(i) for i in range(30)])
        async with running(backend, [worker(backend, sink, batch_size=10)]):
            await until(lambda: len(sink.received) == 30)

    asyncio.run(go())
    assert sink.ids() == [f"m{i}" for i in range(30)]
    assert sink.writes == 3 + 3  # three failed attempts of the first batch, then three batches
    assert backend.dead_letters.list() == []


def test_gives_up_into_dead_letters_and_replay_delivers(backend: Backend) -> None:
    down = {"on": True}
    sink = MemorySink("a", lambda _: RetryableSinkError("connection refused") if down["on"] else None)

    async def go() -> None:
        await backend.append([event(i) for i in range(5)])
        async with running(backend, [worker(backend, sink, batch_size=10)]):
            await until(lambda: len(backend.dead_letters.list()) == 5)
            down["on"] = False
            await backend.append([event(5)])  # later events are not held back
            await until(lambda: sink.ids() == ["m5"])
            dead = backend.dead_letters.list()
            assert {d.message_id for d in dead} == {f"m{i}" for i in range(5)}
            assert all(d.attempts == FAST.max_attempts and d.reason.startswith("max_attempts") for d in dead)
            # replay: back into the outbox for its destination only, then off the store
            await backend.outbox.append([d.to_outbox() for d in dead], dedupe=False)
            assert backend.dead_letters.delete([d.id for d in dead]) == 5
            await until(lambda: len(sink.received) == 6)

    asyncio.run(go())
    assert sorted(sink.ids()) == sorted(f"m{i}" for i in range(6))
    assert backend.dead_letters.list() == []


def test_a_refused_event_is_isolated_and_the_rest_delivered(backend: Backend) -> None:
    def refuse(records: list[StoredRecord]) -> Exception | None:
        if any(r.message_id == "m6" for r in records):
            return PermanentSinkError("400 bad event")
        return None

    sink = MemorySink("a", refuse)

    async def go() -> None:
        await backend.append([event(i) for i in range(16)])
        async with running(backend, [worker(backend, sink, batch_size=16)]):
            await until(lambda: len(sink.received) == 15)

    asyncio.run(go())
    assert sink.ids() == [f"m{i}" for i in range(16) if i != 6]
    [dead] = backend.dead_letters.list()
    assert dead.message_id == "m6" and dead.reason.startswith("refused")
    assert sink.writes <= 1 + 2 * 4  # bisection: log2(16) levels of two halves


def test_notices_go_only_to_destinations_that_received_the_person(backend: Backend) -> None:
    a, b = MemorySink("a"), MemorySink("b")

    async def go() -> None:
        async with running(backend, [worker(backend, a), worker(backend, b)]):
            await backend.append(
                [
                    event(1, person(1), ("a",)),
                    event(2, person(2), ("a", "b")),
                    # in the same batch as the events that introduce the persons
                    merged_notice(person(1), person(3), ("a", "b")),
                ]
            )
            await until(lambda: len(a.received) == 3 and len(b.received) == 1)
            await backend.append(
                [
                    merged_notice(person(2), person(4), ("a", "b")),
                    merged_notice(person(8), person(9), ("a", "b")),
                ]
            )
            await until(lambda: len(a.received) == 4 and len(b.received) == 2)
            # nothing more may arrive: wait until both workers are past the last notice
            await async_wait_until(lambda: drained(backend.outbox), what="the outbox to drain")

    asyncio.run(go())
    assert [r["type"] for r in a.received] == ["track", "track", "identity.merged", "identity.merged"]
    assert [r["type"] for r in b.received] == ["track", "identity.merged"]
    assert b.received[1]["merged"] == person(4)
    # nobody received person 8 or 9: that notice went nowhere


def test_pseudonym_domains_keep_recipients_unjoinable_unless_shared() -> None:
    values = {"userId": PRF("user-1"), "anonymousId": PRF("anon-1"), "context": {"unified_id": person(7)}}
    stored = json.dumps(values).encode()
    record = StoredRecord(
        1, 0, ("a",), stored, pseudonyms=(PRF("user-1"), PRF("anon-1"), person(7)), person=person(7)
    )
    a, b, a2 = (DomainRekeyer(PRF, d) for d in ("warehouse", "ads", "warehouse"))
    out = {name: json.loads(r.payload(record)) for name, r in (("a", a), ("b", b), ("a2", a2))}
    assert out["a"] == out["a2"]  # one domain: the same values, joinable
    for key in ("userId", "anonymousId"):
        assert out["a"][key] != out["b"][key] != json.loads(stored)[key]
        assert out["a"][key].startswith("k1.") and len(out["a"][key]) == len(PRF("x"))
    assert out["a"]["context"]["unified_id"] != out["b"]["context"]["unified_id"]
    assert out["a"]["context"]["unified_id"].startswith("p_")
    assert a.value(person(7)) == out["a"]["context"]["unified_id"]


def test_rekeyed_values_reach_the_sink(backend: Backend) -> None:
    sink = MemorySink("a")
    rekey = DomainRekeyer(PRF, "warehouse")

    async def go() -> None:
        await backend.append([event(1, person(1), user=PRF("u1"))])
        async with running(backend, [worker(backend, sink, rekey=rekey)]):
            await until(lambda: len(sink.received) == 1)

    asyncio.run(go())
    [got] = sink.received
    assert got["userId"] == rekey.value(PRF("u1")) != PRF("u1")
    assert got["context"]["unified_id"] == rekey.value(person(1))


@pytest.mark.parametrize("backend", [REDIS], indirect=True)  # one process owns the embedded outbox
def test_another_replica_takes_over_a_dead_replicas_entries(backend: Backend) -> None:
    sink = MemorySink("a")

    async def go() -> None:
        await backend.append([event(i) for i in range(20)])
        await backend.outbox.register_destinations(["a"])
        dead_queue = backend.outbox.queue("a")
        await dead_queue.open()
        taken = await dead_queue.fetch(8)  # read, then the replica dies before acknowledging
        assert len(taken.records) == 8
        other = backend.make_outbox("r2")
        service = DeliveryService(
            other, [DeliveryWorker(other.queue("a"), sink, poll_seconds=0.02, linger_seconds=0.0, retry=FAST)]
        )
        await service.start()
        try:
            await until(lambda: len(set(sink.ids())) == 20)
        finally:
            await service.stop()

    asyncio.run(go())
    assert sorted(set(sink.ids())) == sorted(f"m{i}" for i in range(20))
    assert len(sink.ids()) == 20


def test_backlog_turns_overloaded_on_and_off(backend: Backend) -> None:
    async def go() -> None:
        await backend.outbox.register_destinations(["a"])
        await backend.append([event(i) for i in range(50)])
        service = DeliveryService(backend.outbox, [], max_backlog=40)
        service.workers = []
        assert await service.measure_backlog() == 50
        assert service.overloaded
        queue = backend.outbox.queue("a")
        await queue.open()
        batch = await queue.fetch(20)
        await queue.commit(batch, len(batch.records), {}, ())
        await service.measure_backlog()
        assert service.backlog == 30 and not service.overloaded

    asyncio.run(go())


def test_a_down_destination_does_not_hold_back_the_others(backend: Backend) -> None:
    down = MemorySink("a", lambda _: RetryableSinkError("connection refused"))
    up = MemorySink("b")
    patient = Retry(max_attempts=10_000, initial_backoff=0.01, max_backoff=0.02)

    async def go() -> None:
        async with running(backend, [worker(backend, down, retry=patient), worker(backend, up)]):
            for n in range(5):
                await backend.append([event(10 * n + i, destinations=("a", "b")) for i in range(10)])
                await until(lambda n=n: len(up.received) == 10 * (n + 1))
            assert down.received == [] and down.writes > 5

    asyncio.run(go())
    assert backend.dead_letters.list() == []  # still retrying, nothing given up


@pytest.mark.parametrize("backend", [REDIS], indirect=True)
def test_redis_outbox_trims_what_every_destination_acknowledged(backend: Backend) -> None:
    async def go() -> None:
        box = backend.outbox
        await box.register_destinations(["a", "b"])
        await backend.append([event(i, destinations=("a", "b")) for i in range(30)])
        qa, qb = box.queue("a"), box.queue("b")
        await qa.open()
        await qb.open()
        batch = await qa.fetch(30)
        await qa.commit(batch, len(batch.records), {}, ())
        assert await box.prune() == (0, 0)  # "b" has read nothing yet
        batch = await qb.fetch(20)
        await qb.commit(batch, len(batch.records), {}, ())
        trimmed, _ = await box.prune()
        assert 19 <= trimmed <= 20 and await box.backlog() == 10
        rest = await qb.fetch(100)
        assert [r.message_id for r in rest.records] == [f"m{i}" for i in range(20, 30)]

    asyncio.run(go())


def test_a_failing_audit_trail_holds_the_batch_back_instead_of_dead_lettering_it(backend: Backend) -> None:
    sink = MemorySink("a")
    failures = {"left": 6}

    async def trail(destination: str, records: Sequence[StoredRecord]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("consent store down")

    async def go() -> None:
        await backend.append([event(i) for i in range(10)])
        async with running(backend, [worker(backend, sink, on_delivered=trail)]):
            await until(lambda: len(sink.received) == 10)

    asyncio.run(go())
    assert sink.ids() == [f"m{i}" for i in range(10)]  # more failures than max_attempts, none lost
    assert backend.dead_letters.list() == []


@pytest.mark.parametrize("recovers", [True, False], ids=["sent", "dead-lettered"])
def test_a_retry_sends_the_records_as_the_recheck_hands_them_back(backend: Backend, recovers: bool) -> None:
    """Consent asked again before a retry may hand a record back rewritten (at the gateway:
    flagged non-personalised): that copy is what is re-keyed and sent on every later
    attempt, or what the dead-letter store keeps when the retries run out."""
    rekey = DomainRekeyer(PRF, "warehouse")
    asked_again = {"changed": False}

    def fail(_: list[StoredRecord]) -> Exception | None:
        asked_again["changed"] = True  # lands while the first attempt fails
        return RetryableSinkError("503") if not recovers or sink.writes <= 3 else None

    sink = MemorySink("a", fail)

    def flagged(r: StoredRecord) -> StoredRecord:
        body = json.loads(r.payload)
        body["context"]["flag"] = True
        return msgspec.structs.replace(r, payload=json.dumps(body).encode(), consent=b"flagged")

    async def recheck(destination: str, records: Sequence[StoredRecord]) -> list[StoredRecord | None]:
        if not asked_again["changed"]:
            return list(records)
        answers: list[StoredRecord | None] = []
        for r in records:  # m0 changes (once: its ticket then says so), m1 is withheld
            if r.message_id == "m0" and r.consent != b"flagged":
                answers.append(flagged(r))
            else:
                answers.append(None if r.message_id == "m1" else r)
        return answers

    async def go() -> None:
        await backend.append([event(i, person(i), user=PRF(f"u{i}")) for i in range(3)])
        async with running(backend, [worker(backend, sink, rekey=rekey, recheck=recheck)]):
            if recovers:
                await until(lambda: len(sink.received) == 2)
            else:
                await until(lambda: len(backend.dead_letters.list()) == 2)

    asyncio.run(go())
    if recovers:
        assert sink.writes == 4  # three failed attempts, the last two after the rewrite
        sent = {e["messageId"]: e for e in sink.received}
        assert sent["m0"]["userId"] == rekey.value(PRF("u0"))  # re-keyed after the rewrite
    else:
        sent = {d.message_id: json.loads(d.payload) for d in backend.dead_letters.list()}
        assert {d.consent for d in backend.dead_letters.list()} == {b"flagged", b""}
    assert sorted(sent) == ["m0", "m2"]
    assert sent["m0"]["context"]["flag"] is True and "flag" not in sent["m2"]["context"]
