"""A retention run over the embedded outbox: how long counting (a dry run) and removing the
records past their period take when the outbox holds 1M events, half of them old, and how
long an append waits meanwhile (the removal runs in short transactions on the loop).

    .venv/bin/python bench/retention.py [--events 1000000]

Prints the time to fill (not measured work), then the dry run, the applied run (rows
removed) and the longest append wait during it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

# bench/identity.py would shadow the identity package with bench/ first on sys.path
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from export.outbox import OutboxRecord  # noqa: E402
from export.sqlite_outbox import SqliteOutbox  # noqa: E402

DAY_MS = 86_400_000


def record(i: int, now_ms: int, events: int) -> OutboxRecord:
    age = 60 * DAY_MS if i < events // 2 else 0  # the first half is 60 days old
    return OutboxRecord(
        tenant="acme",
        source="web",
        message_id=f"m{i}",
        received_at_ms=now_ms - age + i,
        destinations=("warehouse", "stream"),
        payload=b'{"type":"track","event":"Product Viewed","userId":"k1.user0000000000000000"}',
        person=f"p_{i % 100_000:022d}",
        pseudonyms=("k1.user0000000000000000",),
    )


async def main(events: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        box = SqliteOutbox(Path(tmp) / "outbox.sqlite3")
        box.open()
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        for lo in range(0, events, 20_000):
            box.append_sync(
                [record(i, now_ms, events) for i in range(lo, min(events, lo + 20_000))], dedupe=False
            )
        print(f"filled {events:,} events in {time.perf_counter() - started:.1f} s (not measured work)")
        cutoffs = {"warehouse": now_ms - 30 * DAY_MS, "stream": now_ms - 30 * DAY_MS}

        started = time.perf_counter()
        found = await box.expire("acme", cutoffs, apply=False)
        print(f"dry run: {found:,} past retention, counted in {time.perf_counter() - started:.2f} s")

        waits: list[float] = []
        done = asyncio.Event()

        async def appender() -> None:
            i = events
            while not done.is_set():
                t0 = time.perf_counter()
                await box.append([record(i, now_ms + DAY_MS, 1)])
                waits.append(time.perf_counter() - t0)
                i += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(appender())
        started = time.perf_counter()
        removed = await box.expire("acme", cutoffs, apply=True)
        elapsed = time.perf_counter() - started
        done.set()
        await task
        print(f"apply: {removed:,} removed in {elapsed:.2f} s ({removed / elapsed:,.0f} rows/s)")
        waits.sort()
        print(
            f"appends during the run: {len(waits)}, median wait {waits[len(waits) // 2] * 1000:.1f} ms, "
            f"longest {waits[-1] * 1000:.1f} ms"
        )
        box.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().events))
