"""How each distinct-person KPI was counted: per window, the counted events keyed by a
device or account alone (no identity_linking consent) against those of a linked person,
as aggregates only, the same on the in-memory store and on Redis (as the gateway runs it:
write-behind, flushed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from export.kpis import (
    BufferedKpiStore,
    KpiDefinition,
    KpiEngine,
    KpiEvent,
    KpiStore,
    MemoryKpiStore,
    RedisKpiStore,
)
from tests.conftest import RedisNamespace

KPIS = [
    KpiDefinition(id="views", kind="count", events=["$page"]),
    KpiDefinition(id="uv", kind="distinct", events=["$page"]),
    KpiDefinition(id="new", kind="new_persons", events=["$page"]),
    KpiDefinition(id="orders", kind="sum", events=["Order Completed"], fields=["revenue"]),
]
ANALYTICS = frozenset({"analytics"})


def view(person: str, *, linked: bool, purposes: frozenset[str] | None = ANALYTICS) -> KpiEvent:
    return KpiEvent("$page", "Home", {}, purposes, person, linked)


async def counted(store: KpiStore, flush: Any = None) -> dict[str, Any]:
    engine = KpiEngine(store, {"t": KPIS}, {"t": {"web": "web", "mp": "miniprogram"}}, clock=lambda: 1e9)
    await engine.observe(
        "t",
        "web",
        [
            view("p_linked", linked=True),
            view("p_linked", linked=True),
            view("p_device-1", linked=False),
            view("p_device-2", linked=False),
            view("p_dropped", linked=False, purposes=None),  # dropped: matched, never counted
        ],
    )
    await engine.observe("t", "mp", [view("p_device-3", linked=False)])
    await engine.observe(
        "t", "web", [KpiEvent("Order Completed", None, {"revenue": 12.5}, ANALYTICS, "p_x", False)]
    )
    if flush is not None:
        await flush()
    reports = {r.id: r.windows[-1] for r in await engine.report("t", windows=(1, 60))}
    return {
        kpi: (w.total.value, w.total.counted, w.total.by_device, w.by_platform["web"].by_device)
        for kpi, w in reports.items()
    }


EXPECTED = {
    "views": (5, 5, None, None),
    "uv": (4, 5, 3, 2),  # 2 of the 5 counted views by a linked person, 3 by a device alone
    "new": (4, 5, 3, 2),
    "orders": (12.5, 1, None, None),  # an amount is no person: not split
}


def test_the_memory_store_counts_device_keyed_events_per_kpi_and_window() -> None:
    assert asyncio.run(counted(MemoryKpiStore(122))) == EXPECTED


@pytest.mark.redis
def test_redis_counts_them_the_same_through_the_write_behind_buffer(redis_ns: RedisNamespace) -> None:
    import redis.asyncio as aioredis

    async def run() -> dict[str, Any]:
        client = aioredis.from_url(redis_ns.url)
        try:
            buffered = BufferedKpiStore(RedisKpiStore(client, redis_ns.prefix, 122, 60))
            return await counted(buffered, buffered.flush)
        finally:
            await client.aclose()

    assert asyncio.run(run()) == EXPECTED
