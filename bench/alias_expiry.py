"""Retention of identity-graph aliases (``aliases_days``) on the embedded identity change log:
how long a run takes, and how long identity writes wait meanwhile (the plan is made without
the log's write lock, only its check and the rewrite hold it), when the log holds
``--persons`` persons of 3 linked identifiers each (about 7 records and 2 aliases a person;
30k persons: about 210k records).

    .venv/bin/python bench/alias_expiry.py [--persons 30000] [--old 1.0]

``--old``: the share of persons whose merges are past the cutoff. Prints the time of a run
with nothing to expire (the lock-free look at the merges), of the dry run (a replay outside
the lock), of the applied run (the plan's two replays, the rewrite and the graph's replay),
and of a second run (nothing left); and, while each runs, the links a client makes every
50 ms (each one takes the log's lock): how many, and their median and longest time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

# bench/identity.py would shadow the identity package with bench/ first on sys.path
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from identity.db import make_engine  # noqa: E402
from identity.graph import IdentityGraph, IdentityRules, Provenance  # noqa: E402
from identity.identifiers import Identifier  # noqa: E402
from identity.resolver import GraphResolver  # noqa: E402
from identity.store import IdentityLogStore, migrate_identity  # noqa: E402

LOG_TYPES = ("user_id", "device_id", "anonymous_id")
OLD = datetime(2026, 1, 1, tzinfo=UTC)
NEW = datetime(2026, 11, 1, tzinfo=UTC)
CUTOFF = datetime(2026, 6, 1, tzinfo=UTC)


async def main(persons: int, old_share: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'identity.sqlite3'}")
        migrate_identity(engine)
        store = IdentityLogStore(engine)
        graph = IdentityGraph()
        rows = []
        old_persons = int(persons * old_share)
        for p in range(persons):
            prov = Provenance("bench", "e", OLD if p < old_persons else NEW, "event")
            nodes = [f"{k}:k1.{k}{p:012d}" for k in LOG_TYPES]
            _, changes = graph.resolve(nodes, link=True, provenance=prov)
            rows += [("acme", type(c).__name__, msgspec.json.encode(c), 0) for c in changes]
        conn, tx = store.begin_locked()
        store.insert_and_commit(conn, tx, rows)
        resolver = GraphResolver(store, {"acme": IdentityRules()})
        await resolver.start()
        print(f"log: {len(rows)} records, {graph.stats()['aliases']} aliases, {persons} persons")

        def timed(label: str, seconds: float, result: int, waits: list[float]) -> None:
            waits = sorted(waits) or [0.0]
            print(
                f"{label:<40} {seconds:7.2f} s  ({result} aliases)  links meanwhile: {len(waits)},"
                f" median {waits[len(waits) // 2] * 1000:.0f} ms, longest {waits[-1] * 1000:.0f} ms"
            )

        probes = 0

        async def links(waits: list[float], done: asyncio.Event) -> None:
            nonlocal probes
            while not done.is_set():
                probes += 1
                pair = [
                    Identifier("user_id", f"k1.probe{probes}"),
                    Identifier("anonymous_id", f"k1.pa{probes}"),
                ]
                t = time.perf_counter()
                await resolver.resolve_batch("acme", [pair], [True], [("bench", f"probe{probes}")])
                waits.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)  # the client's pace

        for label, before, apply in (
            ("nothing old (lock-free look)", OLD - timedelta(days=1), True),
            ("dry run (replay, no lock)", CUTOFF, False),
            ("applied", CUTOFF, True),
            ("second run (nothing left)", CUTOFF, True),
        ):
            waits: list[float] = []
            done = asyncio.Event()
            client = asyncio.create_task(links(waits, done))
            t = time.perf_counter()
            n = await resolver.expire_aliases("acme", before, apply=apply)
            seconds = time.perf_counter() - t
            done.set()
            await client
            timed(label, seconds, n, waits)
        await resolver.stop()
        engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=30_000)
    parser.add_argument("--old", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(main(args.persons, args.old))
