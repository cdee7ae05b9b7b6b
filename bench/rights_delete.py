"""Deleting one person (a rights request of kind ``delete``) from the embedded stores: how long
each store's part takes when the outbox holds 1M events of 100k persons and the dead letters
100k more.

    .venv/bin/python bench/rights_delete.py [--events 1000000] [--persons 100000] [--dead 100000]

Prints the time to fill (not measured work), then per store: the time to find the person's
events (an access bundle) and to purge them (the deletion), and the rows removed. The issue's
bound: under 10 s on the embedded default for the whole deletion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

# bench/identity.py would shadow the identity package with bench/ first on sys.path
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from export.deadletter import SqliteDeadLetters  # noqa: E402
from export.outbox import OutboxRecord, stored  # noqa: E402
from export.sqlite_outbox import SqliteOutbox  # noqa: E402


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


async def main(events: int, persons: int, dead: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.sqlite3"
        box = SqliteOutbox(path)
        box.open()
        letters = SqliteDeadLetters(path)
        started = time.perf_counter()
        chunk = 20_000
        for lo in range(0, events, chunk):
            box.append_sync([record(i, persons) for i in range(lo, min(events, lo + chunk))], dedupe=False)
        for lo in range(0, dead, chunk):
            rows = [stored(i + 1, record(i, persons)) for i in range(lo, min(dead, lo + chunk))]
            letters.add("warehouse", rows, "HTTP 500", 8)
        print(
            f"filled: {events} outbox events and {dead} dead letters of {persons} persons "
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
        t = time.perf_counter()
        purged = await box.purge_person("acme", keys)
        t_purge_outbox = time.perf_counter() - t
        t = time.perf_counter()
        purged_dead = letters.purge_person("acme", keys)
        t_purge_dead = time.perf_counter() - t
        print(
            f"outbox:       find {t_find_outbox:6.2f} s ({len(found)} events), "
            f"purge {t_purge_outbox:6.2f} s ({purged} removed)"
        )
        print(
            f"dead letters: find {t_find_dead:6.2f} s ({len(found_dead)} events), "
            f"purge {t_purge_dead:6.2f} s ({purged_dead} removed)"
        )
        print(f"deletion, the two stores: {t_purge_outbox + t_purge_dead:.2f} s")
        letters.close()
        box.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.persons, args.dead))
