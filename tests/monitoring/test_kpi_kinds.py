"""The top-K and new / returning person KPIs on the engine and the in-memory store: the
ranking's bound, what a ranked value may be, and the seen filter's error rate."""

from __future__ import annotations

import asyncio
import os
import uuid

from export.kpis import (
    TOP_KEPT_PER_BUCKET,
    KpiDefinition,
    KpiEngine,
    KpiEvent,
    MemoryKpiStore,
    MemorySeenFilter,
)

TOP = KpiDefinition(
    id="top_skus", kind="top", events=["Order Completed"], group_by=["sku"], fields=["price"], top=3
)


def order(sku: object, price: float = 1.0) -> KpiEvent:
    return KpiEvent("Order Completed", None, {"sku": sku, "price": price}, frozenset({"analytics"}), None)


def test_a_ranked_value_is_short_and_never_an_identifier() -> None:
    now = [1_000_000.0]
    engine = KpiEngine(MemoryKpiStore(122), {"t": [TOP]}, {"t": {"web": "web"}}, clock=lambda: now[0])

    async def run() -> list[dict[str, object]]:
        await engine.observe(
            "t",
            "web",
            [
                order("SKU-1", 5),
                order(str(uuid.uuid4()), 100),  # a device id
                order("oAbCdEfGhIjKlMnOpQrStUv12345", 100),  # an openid
                order("alice@example.com", 100),
                order("x" * 65, 100),
                order(True, 100),
                order(42, 3),
            ],
        )
        (report,) = await engine.report("t", windows=(1,))
        top = report.windows[0].total.top
        assert top is not None and report.windows[0].total.value == 508
        return [{"name": t.name, "amount": t.amount} for t in top]

    assert asyncio.run(run()) == [{"name": "SKU-1", "amount": 5.0}, {"name": "42", "amount": 3.0}]


def test_the_ranking_per_bucket_is_bounded() -> None:
    store = MemoryKpiStore(122)
    engine = KpiEngine(store, {"t": [TOP]}, {"t": {"web": "web"}}, clock=lambda: 1_000_000.0)

    async def run() -> None:
        # one SKU far ahead, then many small ones: the kept set stays bounded, the leader stays
        await engine.observe("t", "web", [order("LEADER", 1e6)])
        for start in range(0, 5 * TOP_KEPT_PER_BUCKET, 500):
            await engine.observe("t", "web", [order(f"S{i}", 1 + i % 7) for i in range(start, start + 500)])
        kept = store._tops[("t", engine.bucket())][("top_skus", "web")]
        assert len(kept) <= 2 * TOP_KEPT_PER_BUCKET
        (report,) = await engine.report("t", windows=(1,))
        top = report.windows[0].total.top
        assert top is not None and top[0].name == "LEADER" and len(top) == 3

    asyncio.run(run())


def test_the_seen_filter_error_rate() -> None:
    """500,000 persons yesterday: today's 20,000 strangers are rarely taken for returning."""
    seen = MemorySeenFilter()
    yesterday = {os.urandom(8) for _ in range(500_000)}
    assert not any(seen.classify("t", 100, yesterday).values())
    back = seen.classify("t", 101, set(list(yesterday)[:1000]))
    assert all(back.values())  # never a returning person taken for new
    strangers = seen.classify("t", 101, {os.urandom(8) for _ in range(20_000)})
    false_returning = sum(strangers.values()) / len(strangers)
    assert false_returning < 0.002, false_returning
    # past the lookback a person is new again; the filters of older days are dropped
    again = seen.classify("t", 101 + 31, set(list(yesterday)[:1000]))
    assert not any(again.values()) and ("t", 100) not in seen._days
