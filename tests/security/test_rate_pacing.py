"""The per-second limits are paced (GCRA), in memory and in Redis alike: a client may send
``burst_seconds`` of its budget at once, then no faster than its rate. Before, they were
fixed one-second windows: a flood held to its limit was admitted as one burst at the start
of every second, and the other sources' requests queued behind that burst (quiet p99 40-50
ms in bench/rate_limits.py; paced, 14-18 ms)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import pytest
from litestar.testing import TestClient

from gateway.rate_limits import SECOND, CounterStore, Hit, MemoryCounters, RateLimited, RedisCounters
from tests.conftest import SHOP_SENSORS_TOKEN, RedisNamespace
from tests.gateway.conftest import in_process_app
from tests.security.test_rate_limits import limited_config
from tests.sensors.conftest import encode, sensors_event
from tests.waiting import ManualClock, async_wait_until


def per_second(key: str, amount: int = 1, allowed: int = 2) -> Hit:
    return Hit("ip_requests_per_second", key, amount, allowed, SECOND)


def test_memory_pacing_admits_the_burst_then_the_rate() -> None:
    clock = ManualClock()
    store = MemoryCounters(clock=clock)

    async def main() -> None:
        hit = per_second("{t}:ip:a:req")  # 2 a second, 0.5 s each; 1.5 s of burst: 3 at once
        assert [await store.pace([hit], 1.5) for _ in range(3)] == [None, None, None]
        assert await store.pace([hit], 1.5) == (0, 0.5)
        assert await store.pace([hit], 1.5) == (0, 0.5)  # a refusal costs the key nothing
        clock.now += 0.25
        assert await store.pace([hit], 1.5) == (0, 0.25)
        clock.now += 0.25
        assert await store.pace([hit], 1.5) is None  # one more, at the rate
        assert await store.pace([hit], 1.5) == (0, 0.5)
        clock.now += 10  # at rest: the whole burst again
        assert [await store.pace([hit], 1.5) for _ in range(4)] == [None, None, None, (0, 0.5)]

    asyncio.run(main())


def test_memory_pacing_is_all_or_nothing_and_lets_a_large_request_through_at_rest() -> None:
    clock = ManualClock()
    store = MemoryCounters(clock=clock)

    async def main() -> None:
        src, net = "{t}:src:web:ev", "{t}:ip:a:ev"
        assert await store.pace([per_second(net, amount=2, allowed=2)], 1.0) is None  # net: full
        # the source has room, the network has not: neither moves
        assert await store.pace([per_second(src, 1, 2), per_second(net, 1, 2)], 1.0) == (1, 0.5)
        assert [await store.pace([per_second(src, 1, 2)], 1.0) for _ in range(3)] == [None, None, (0, 0.5)]
        # 10 events against 2 a second: more than the burst; admitted at rest, then paid for
        big = per_second("{t}:src:app:ev", amount=10, allowed=2)
        assert await store.pace([big], 1.0) is None
        assert await store.pace([per_second("{t}:src:app:ev", 1, 2)], 1.0) == (
            0,
            4.5,
        )  # 5 s owed, less the burst
        clock.now += 4.5
        assert await store.pace([per_second("{t}:src:app:ev", 1, 2)], 1.0) is None

    asyncio.run(main())


def test_memory_pacing_forgets_keys_at_rest() -> None:
    clock = ManualClock()
    store = MemoryCounters(clock=clock)

    async def main() -> None:
        for i in range(1000):  # a flood from many networks
            assert await store.pace([per_second(f"{{t}}:ip:{i}:req")], 1.0) is None
        clock.now += 2
        await store.pace([per_second("{t}:ip:last:req")], 1.0)
        assert len(store._arrivals) == 1

    asyncio.run(main())


@pytest.mark.redis
def test_redis_pacing_keeps_the_same_rule_on_the_shared_clock(redis_ns: RedisNamespace) -> None:
    """The Lua script against the real Redis: the replicas' one budget, on Redis's clock."""
    import redis.asyncio as aioredis

    async def until_admitted(pace: Callable[[], Awaitable[tuple[int, float] | None]]) -> float:
        async def admitted() -> bool:
            return await pace() is None

        started = time.monotonic()
        await async_wait_until(admitted, timeout=5, what="the paced key's next turn", interval=0.01)
        return time.monotonic() - started

    async def main() -> None:
        client = aioredis.from_url(redis_ns.url)
        store: CounterStore = RedisCounters(client, redis_ns.prefix)
        try:
            hit = per_second(f"{{t}}:ip:{uuid.uuid4().hex}:req")
            assert [await store.pace([hit], 1.5) for _ in range(3)] == [None, None, None]
            refused = await store.pace([hit], 1.5)
            assert refused is not None and refused[0] == 0 and 0.3 < refused[1] <= 0.5, refused
            again = await store.pace([hit], 1.5)  # nothing was charged for the refusal
            assert again is not None and again[1] <= refused[1]
            waited = await until_admitted(lambda: store.pace([hit], 1.5))
            assert waited < 1.0  # the next request's turn comes at the rate, not at a window's end
            after = await store.pace([hit], 1.5)
            assert after is not None and 0.3 < after[1] <= 0.5, after
            # all or nothing across keys (one slot: the same tenant tag)
            fresh = per_second(f"{{t}}:src:{uuid.uuid4().hex}:req")
            assert await store.pace([fresh, hit], 1.5) == (1, pytest.approx(after[1], abs=0.1))
            assert [await store.pace([fresh], 1.5) for _ in range(4)][-1] is not None
            keys = [k async for k in client.scan_iter(match=f"{redis_ns.prefix}:rl:pace:*")]
            ttls = [await client.pttl(k) for k in keys]
            assert keys and all(0 < ttl <= 3_000 for ttl in ttls), ttls  # they expire
        finally:
            await client.aclose()

    asyncio.run(main())


def test_sensors_flood_is_refused_with_an_answer_the_browser_can_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The ingest handlers answer their 429s themselves (a flood is refused without Litestar's
    exception layers): the same JSON error, Retry-After, the count in /metrics, and on /sa the
    CORS header the Sensors web SDK needs to read it."""
    app = in_process_app(tmp_path, limited_config(ip_requests_per_second=2, ip_events_per_second=1000))
    body = f"data={quote(encode(sensors_event('flooder'), compress=False))}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with TestClient(app) as client:
        for _ in range(40):
            r = client.post(f"/sa?project=shop&token={SHOP_SENSORS_TOKEN}", content=body, headers=headers)
            if r.status_code == 429:
                break
        assert r.status_code == 429, r.text
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {
            "error": "rate_limited",
            "detail": r.json()["detail"],
            "field": "rate_limits.ip_requests_per_second",
        }
        assert "ip_requests_per_second = 2" in r.json()["detail"]
        metrics = client.get("/metrics").text
        assert 'idgate_requests_refused_total{error="rate_limited"}' in metrics


@pytest.mark.redis
def test_limits_fail_open_while_redis_is_unreachable_with_one_log_line(redis_ns: RedisNamespace) -> None:
    """The README's promise: the limits protect capacity, so while their store is down every
    request passes (a withdrawal never waits on them), logged once per outage."""
    import redis.asyncio as aioredis
    from structlog.testing import capture_logs

    from gateway.config import RateLimits
    from gateway.rate_limits import RateLimiter

    limits = RateLimits(ip_requests_per_second=1, source_requests_per_second=1)

    async def main() -> None:
        down = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        up = aioredis.from_url(redis_ns.url)
        limiter = RateLimiter(limits, RedisCounters(down, redis_ns.prefix))
        try:
            with capture_logs() as logs:
                for _ in range(5):  # over 1 a second: all pass while the store is down
                    await limiter.check_request("shop", "web", "203.0.113.0", 1)
                limiter.store = RedisCounters(up, redis_ns.prefix)
                await limiter.check_request("shop", "web", "203.0.113.0", 1)
                with pytest.raises(RateLimited):  # back: the limit holds again
                    for _ in range(3):
                        await limiter.check_request("shop", "web", "203.0.113.0", 1)
            events = [e["event"] for e in logs if e["event"].startswith("rate_limits.")]
            assert events == ["rate_limits.store_unavailable", "rate_limits.store_back"]
        finally:
            await down.aclose()
            await up.aclose()

    asyncio.run(main())


def test_a_key_that_allows_nothing_admits_nothing() -> None:
    store = MemoryCounters(clock=ManualClock())

    async def main() -> None:
        closed = per_second("{t}:src:off:req", allowed=0)
        for _ in range(3):
            assert await store.pace([per_second("{t}:ip:a:req"), closed], 1.0) == (1, 1.0)
        assert store._arrivals == {}  # and charged nothing to the other key

    asyncio.run(main())
