"""What keeping a KPI for day / week comparisons costs: bytes per KPI per day of history.

Fills ``--hours`` of one-minute history buckets (source "*") of three KPIs, as the engine
does for a tenant whose rules compare with a day or a week earlier: a count, a sum and a
distinct-persons KPI with ``--persons`` persons a minute; measures the in-memory store
(tracemalloc) and, with ``--redis URL``, the Redis keys (``MEMORY USAGE``), and scales the
figures to a day and to the default history (8 days).

    .venv/bin/python bench/kpi_history.py [--hours 2] [--persons 50,5000] [--redis redis://127.0.0.1:6379/9]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from export.kpis import ALL_SOURCES, MemoryKpiStore, RedisKpiStore  # noqa: E402

KPIS = ("orders", "gmv", "paying_persons")


def bucket_of(
    persons: int, with_members: bool = True
) -> tuple[dict[tuple[str, str], list[float]], dict[Any, set[bytes]]]:
    cells = {
        ("orders", ALL_SOURCES): [0.0, float(persons), 0.0],
        ("gmv", ALL_SOURCES): [0.0, float(persons), 123.45 * persons],
        ("paying_persons", ALL_SOURCES): [0.0, float(persons), 0.0],
    }
    if not with_members:
        return cells, {}
    return cells, {("paying_persons", ALL_SOURCES): {os.urandom(8) for _ in range(persons)}}


async def memory(hours: int, persons: int) -> dict[str, float]:
    minutes = hours * 60
    tracemalloc.start()
    store = MemoryKpiStore(122, {"t": 8 * 1440})
    base = tracemalloc.get_traced_memory()[0]
    for m in range(minutes):
        cells, _ = bucket_of(persons, with_members=False)
        await store.add("t", m, {k: v for k, v in cells.items() if k[0] != "paying_persons"}, {})
    counts = tracemalloc.get_traced_memory()[0] - base
    for m in range(minutes):
        cells, members = bucket_of(persons)
        await store.add("t", m, {k: v for k, v in cells.items() if k[0] == "paying_persons"}, members)
        del members
    distinct = tracemalloc.get_traced_memory()[0] - base - counts
    tracemalloc.stop()
    return {"count+sum": counts / 2 / minutes, "distinct": distinct / minutes}


async def redis_usage(url: str, hours: int, persons: int) -> dict[str, float]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisKpiStore(client, prefix, 122, 60, {"t": 8 * 1440})
    minutes = hours * 60
    try:
        for m in range(minutes):
            cells, members = bucket_of(persons)
            await store.add("t", 28_000_000 + m, cells, members)
        hashes = hlls = 0
        async for key in client.scan_iter(match=f"{prefix}:*"):
            used = await client.memory_usage(key, samples=0) or 0
            if b":hll:" in key:
                hlls += used
            else:
                hashes += used
        return {"count+sum": hashes / 2 / minutes, "distinct": hlls / minutes}
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def show(where: str, persons: int, per_minute: dict[str, float]) -> None:
    for kind, b in per_minute.items():
        day = b * 1440
        print(
            f"{where:7} {persons:>6} persons/min  {kind:10} {b:8.0f} B/bucket  "
            f"{day / 1e6:7.2f} MB/day  {day * 8 / 1e6:8.2f} MB per 8 days"
        )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--persons", default="50,5000")
    parser.add_argument("--redis", default="")
    args = parser.parse_args()
    for persons in (int(p) for p in args.persons.split(",")):
        show("memory", persons, await memory(args.hours, persons))
        if args.redis:
            show("redis", persons, await redis_usage(args.redis, args.hours, persons))


if __name__ == "__main__":
    asyncio.run(main())
