"""The tracking plan's live tail and coverage counts shared through Redis (gateway.plan_monitor):
two monitors stand for two replicas; and an unreachable Redis never fails the ingest that
notes them."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.plan import UNPLANNED, Violation
from gateway.plan_monitor import PlanMonitor, TailEntry
from tests.conftest import RedisNamespace, free_port

BAD_PRICE = [Violation("type", "properties.price", "must be number")]


def entry(source: str, at_ms: int, message_id: str) -> TailEntry:
    return TailEntry(at_ms, source, "product_added", "delivered", BAD_PRICE, message_id=message_id)


@pytest.mark.redis
def test_two_replicas_read_each_others_tail_and_counts(redis_ns: RedisNamespace) -> None:
    async def go() -> None:
        client = aioredis.from_url(redis_ns.url)
        a = PlanMonitor(None, redis=client, prefix=redis_ns.prefix, tail_size=3)
        b = PlanMonitor(None, redis=client, prefix=redis_ns.prefix, tail_size=3)
        a.note("shop", entry("shop-web", 1_000, "m-a1"))
        b.note("shop", entry("shop-app", 2_000, "m-b1"))
        for n in range(2, 6):  # b's ring keeps the last 3 of its source
            b.note("shop", entry("shop-app", 2_000 + n, f"m-b{n}"))
        a.count("shop", "shop-web", "product_added", "", seen=5, valid=4, at_ms=1_000)
        b.count("shop", "shop-app", "product_added", "", seen=2, valid=2, at_ms=3_000)
        b.count("shop", "shop-app", UNPLANNED, "Wishlist Shared", seen=1, valid=0, at_ms=3_000)
        await a.flush_if_due()  # a new (source, event, name): written at once
        await b.flush_if_due()

        tail = await a.read_tail("shop")
        assert [e.message_id for e in tail] == ["m-b5", "m-b4", "m-b3", "m-a1"]
        assert [e.message_id for e in await b.read_tail("shop", "shop-web")] == ["m-a1"]
        seen = {
            (c.source, c.event, c.name): (c.seen, c.valid, c.last_seen_ms) for c in await b.read_seen("shop")
        }
        assert seen == {
            ("shop-web", "product_added", ""): (5, 4, 1_000),
            ("shop-app", "product_added", ""): (2, 2, 3_000),
            ("shop-app", UNPLANNED, "Wishlist Shared"): (1, 0, 3_000),
        }
        a.count("shop", "shop-web", "product_added", "", seen=1, valid=1, at_ms=500)
        await a.flush()  # added, and the latest time kept
        after = {(c.source, c.event): (c.seen, c.last_seen_ms) for c in await b.read_seen("shop")}
        assert after[("shop-web", "product_added")] == (6, 1_000)
        assert await a.read_seen("other") == ()
        await client.aclose()

    asyncio.run(go())


def test_an_unreachable_redis_keeps_the_counts_for_the_next_write() -> None:
    async def go() -> None:
        client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
        monitor = PlanMonitor(None, redis=client, prefix="x")
        monitor.note("shop", entry("shop-web", 1_000, "m-1"))
        monitor.count("shop", "shop-web", "product_added", "", seen=3, valid=3, at_ms=1_000)
        await monitor.flush_if_due()  # no exception: the ingest that noted them goes on
        monitor.count("shop", "shop-web", "product_added", "", seen=1, valid=0, at_ms=2_000)
        await monitor.flush()
        pending = monitor._take()
        assert [(c.seen, c.valid, c.last_seen_ms) for c in pending] == [(4, 3, 2_000)]
        assert [e.message_id for e in monitor.tail("shop")] == ["m-1"]  # this process's view
        await client.aclose()

    asyncio.run(go())
