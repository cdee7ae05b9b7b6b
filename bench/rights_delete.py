"""Deleting one person (a rights request of kind ``delete``) from the embedded stores: how long
each store's part takes when the outbox holds 1M events of 100k persons (with their dedupe
entries and person index), the dead letters 100k more, and a JSONL and a Parquet sink the
same 1M events, and the identity change log of 100k persons (about 700k records).

    .venv/bin/python bench/rights_delete.py [--events 1000000] [--persons 100000] [--dead 100000]
        [--log-persons 100000]

Prints the time to fill (not measured work), then per store: the time to find the person's
events (an access bundle) and to purge them (the deletion), and what was removed. The
issue's bound: under 10 s on the embedded default for the whole deletion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

# bench/identity.py would shadow the identity package with bench/ first on sys.path
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from consent.db import migrate_consent  # noqa: E402
from consent.state import RecordView, SqlConsentState  # noqa: E402
from consent.suppression import ERASED_FLAG  # noqa: E402
from export.deadletter import SqliteDeadLetters  # noqa: E402
from export.file_sinks import JsonlFileSink, ParquetFileSink  # noqa: E402
from export.outbox import OutboxRecord, claimed_as, dedupe_key, stored  # noqa: E402
from export.sqlite_outbox import SqliteOutbox  # noqa: E402
from gateway.rate_limits import MemoryCounters  # noqa: E402
from identity.db import make_engine  # noqa: E402
from identity.graph import IdentityGraph, IdentityRules, Provenance  # noqa: E402
from identity.resolver import GraphResolver  # noqa: E402
from identity.store import IdentityLogStore, migrate_identity  # noqa: E402

LOG_TYPES = ("user_id", "device_id", "anonymous_id")


async def identity_log(tmp: Path, log_persons: int, target: int) -> tuple[float, str]:
    """The identity change log of ``log_persons`` persons (3 linked identifiers each: about
    7 records a person), the target erased from the graph; the time to redact it (the
    replica's background rebuild of its graph after it is timed apart: not the deletion's)."""
    engine = make_engine(f"sqlite:///{tmp / 'identity.sqlite3'}")
    migrate_identity(engine)
    store = IdentityLogStore(engine)
    graph = IdentityGraph()
    prov = Provenance("bench", "e", datetime(2026, 1, 1, tzinfo=UTC), "event")
    rows = []
    for p in range(log_persons):
        _, changes = graph.resolve([f"{k}:k1.{k}{p:012d}" for k in LOG_TYPES], link=True, provenance=prov)
        rows += [("acme", type(c).__name__, msgspec.json.encode(c), 0) for c in changes]
    conn, tx = store.begin_locked()
    store.insert_and_commit(conn, tx, rows)
    resolver = GraphResolver(store, {"acme": IdentityRules()})
    await resolver.start()
    nodes = [f"{k}:k1.{k}{target:012d}" for k in LOG_TYPES]
    for node in nodes:
        await resolver.remove("acme", node)
    t = time.perf_counter()
    plan = await resolver.redact("acme", nodes)
    seconds = time.perf_counter() - t
    await resolver.rebuilt()
    rebuilt = time.perf_counter() - t - seconds
    total = resolver.applied_seq
    await resolver.stop()
    engine.dispose()
    return seconds, f"{len(plan.updates)} of {total} records rewritten; graph rebuilt {rebuilt:.1f} s later"


def record(i: int, persons: int) -> OutboxRecord:
    p = i % persons
    person, user = f"p_{p:022d}", f"k1.user{p:017d}"
    body = {"type": "track", "event": "Product Viewed", "messageId": f"m{i}", "userId": user}
    body["context"] = {"unified_id": person}
    return OutboxRecord(
        tenant="acme",
        source="web",
        message_id=f"m{i}",
        received_at_ms=1_700_000_000_000 + i,
        destinations=("warehouse", "stream"),
        payload=json.dumps(body, separators=(",", ":")).encode(),
        person=person,
        pseudonyms=(person, user),
    )


def suppression_record(keys: set[str]) -> RecordView:
    """The deletion's ``suppressed`` step as the consent state projection applies it."""
    nodes = tuple(f"user_id:{k}" if k.startswith("k1.") else f"anonymous_id:{k}" for k in sorted(keys))
    return RecordView(
        seq=1,
        tenant="acme",
        record_type="rights_request",
        identifiers=nodes,
        purposes=(),
        state="requested",
        detail={"step": "suppressed", "flag": ERASED_FLAG},
    )


async def main(events: int, persons: int, dead: int, log_persons: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.sqlite3"
        box = SqliteOutbox(path)
        box.open()
        letters = SqliteDeadLetters(path)
        jsonl = JsonlFileSink(Path(tmp) / "sinks", "warehouse")
        parquet = ParquetFileSink(Path(tmp) / "sinks", "lake")
        await jsonl.recover({})
        await parquet.recover({})
        fill = sqlite3.connect(path, timeout=60)  # what the bench plants beside the outbox's writer
        started = time.perf_counter()
        chunk = 20_000
        committed: dict[str, int] = {}
        for lo in range(0, events, chunk):
            records = [record(i, persons) for i in range(lo, min(events, lo + chunk))]
            box.append_sync(records, dedupe=False)
            # what ingest's claims leave: one dedupe entry per event, scoped by its sender
            keys = [(dedupe_key(r.source, claimed_as(r)), r.received_at_ms) for r in records]
            fill.executemany("INSERT OR IGNORE INTO dedupe(key, seen_at_ms) VALUES (?, ?)", keys)
            fill.commit()
            written = [stored(lo + n + 1, r) for n, r in enumerate(records)]
            committed.update(await jsonl.write(written))
            if lo % (chunk * 5) == 0:  # Parquet: one file per 100k events
                parquet_rows = [
                    stored(i + 1, record(i, persons)) for i in range(lo, min(events, lo + chunk * 5))
                ]
                await parquet.write(parquet_rows)
        fill.commit()
        index = [(d, f"p_{p:022d}") for d in ("warehouse", "stream") for p in range(persons)]
        fill.executemany(
            "INSERT OR IGNORE INTO delivered_person(destination, unified_id) VALUES (?, ?)", index
        )
        fill.commit()
        for lo in range(0, dead, chunk):
            rows = [stored(i + 1, record(i, persons)) for i in range(lo, min(dead, lo + chunk))]
            letters.add("warehouse", rows, "HTTP 500", 8)
        print(
            f"filled: {events} outbox events (with dedupe entries, JSONL and Parquet sinks), "
            f"{dead} dead letters and the person index of {persons} persons "
            f"in {time.perf_counter() - started:.1f} s"
        )

        target = 4242
        keys = {f"p_{target:022d}", f"k1.user{target:017d}"}
        t = time.perf_counter()
        found = await box.find_person("acme", keys)
        t_find_outbox = time.perf_counter() - t
        t = time.perf_counter()
        found_dead = letters.find_person("acme", keys)
        t_find_dead = time.perf_counter() - t
        times: dict[str, float] = {}

        t = time.perf_counter()
        engine = make_engine(f"sqlite:///{Path(tmp) / 'consent.sqlite3'}")
        migrate_consent(engine)
        state = SqlConsentState(engine)
        await state.apply([suppression_record(keys)])
        times["suppression list"] = time.perf_counter() - t
        t = time.perf_counter()
        purged = await box.purge_person("acme", keys)
        times["outbox + dedupe entries"] = time.perf_counter() - t
        t = time.perf_counter()
        purged_dead = letters.purge_person("acme", keys)
        times["dead letters"] = time.perf_counter() - t
        t = time.perf_counter()
        jsonl_lines, _ = await jsonl.purge(committed, keys)
        times["JSONL sink"] = time.perf_counter() - t
        t = time.perf_counter()
        parquet_rows_removed, _ = await parquet.purge({}, keys)
        times["Parquet sink"] = time.perf_counter() - t
        t = time.perf_counter()
        counters = await MemoryCounters().forget(keys)
        times["rate-limit counters"] = time.perf_counter() - t
        t = time.perf_counter()
        for destination in ("warehouse", "stream"):  # at each destination's deletion receipt
            await box.commit_delivery(destination, 0, 0, {}, (), [f"p_{target:022d}"])
        times["person index"] = time.perf_counter() - t
        times["identity change log"], redacted = await identity_log(Path(tmp), log_persons, target)
        left = fill.execute(
            "SELECT count(*) FROM delivered_person WHERE unified_id = ?", (f"p_{target:022d}",)
        ).fetchone()[0]
        print(f"outbox:       find {t_find_outbox:6.2f} s ({len(found)} events)")
        print(f"dead letters: find {t_find_dead:6.2f} s ({len(found_dead)} events)")
        print("deletion, per store:")
        removed = {
            "suppression list": "2 identifiers flagged",
            "outbox + dedupe entries": f"{purged.events} events, {purged.dedupe_keys} dedupe entries",
            "dead letters": f"{purged_dead} dead letters",
            "JSONL sink": f"{jsonl_lines} lines",
            "Parquet sink": f"{parquet_rows_removed} rows",
            "rate-limit counters": f"{counters} counters",
            "person index": f"2 destinations, {left} entries left",
            "identity change log": redacted,
        }
        for name, seconds in times.items():
            print(f"  {name:24s} {seconds:6.2f} s  ({removed[name]})")
        print(f"deletion, every store: {sum(times.values()):.2f} s")
        fill.close()
        letters.close()
        box.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=100_000)
    parser.add_argument("--log-persons", type=int, default=100_000, help="identity log: ~7 records each")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.persons, args.dead, args.log_persons))
