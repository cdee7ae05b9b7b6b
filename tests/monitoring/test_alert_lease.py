"""The evaluation lease on a real Redis while a round outlives its TTL: a notification that
takes long (a channel timing out, retried) keeps the lease renewed, so no other replica
evaluates meanwhile; a round whose lease was taken anyway stops before its next rule, so
no rule is paged twice. With a short IDGATE_ALERT_INTERVAL_MS the TTL (three intervals)
is seconds, shorter than one channel's retries."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis

from export.alert_history import ChannelDelivery
from export.alerts import AlertEvaluator, AlertRule, Notice, Notifier, RedisLease, RedisStateStore
from export.kpis import KpiReport, KpiWindow, WindowValue
from tests.conftest import RedisNamespace
from tests.waiting import async_wait_until

TTL_MS = 300


def rule(rule_id: str) -> AlertRule:
    return AlertRule(
        id=rule_id,
        kpi="payment_success_rate",
        window=10,
        condition="drop",
        threshold=0.2,
        min_volume=10,
        channels=["oncall"],
    )


def dropped() -> dict[str, list[KpiReport]]:
    v = WindowValue(0.7, 20, 20, 1.0, previous=0.95)
    window = KpiWindow(minutes=10, total=v, by_platform={}, by_source={})
    return {"mall": [KpiReport("payment_success_rate", "ratio", "", "", [window])]}


class SlowChannel(Notifier):
    """A channel that answers only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__([], env={})
        self.sent: list[tuple[str, str]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def send(self, channel_id: str, notice: Notice) -> ChannelDelivery:
        self.sent.append((notice.rule.id, notice.status))
        self.entered.set()
        await self.gate.wait()
        return ChannelDelivery(channel_id, "webhook", True, 1)


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__([], env={})
        self.sent: list[tuple[str, str]] = []

    async def send(self, channel_id: str, notice: Notice) -> ChannelDelivery:
        self.sent.append((notice.rule.id, notice.status))
        return ChannelDelivery(channel_id, "webhook", True, 1)


class WatchedLease(RedisLease):
    """The real lease, noting what each hold() answered."""

    def __init__(self, redis: aioredis.Redis, prefix: str, owner: str) -> None:
        super().__init__(redis, prefix, owner, TTL_MS)
        self.answers: list[bool] = []

    async def hold(self) -> bool:
        held = await super().hold()
        self.answers.append(held)
        return held


def evaluator(
    client: aioredis.Redis, ns: RedisNamespace, owner: str, notifier: Notifier, rules: Sequence[AlertRule]
) -> tuple[AlertEvaluator, WatchedLease]:
    lease = WatchedLease(client, ns.prefix, owner)
    return AlertEvaluator(
        {"mall": list(rules)}, RedisStateStore(client, ns.prefix), lease, notifier, 60
    ), lease


async def within(
    seconds: float, check: asyncio.Event | None = None, answers: list[bool] | None = None
) -> None:
    """Until ``check`` is set, or a lease renewal in ``answers`` found the lease taken."""
    await async_wait_until(
        lambda: (check is not None and check.is_set()) or (answers is not None and False in answers),
        seconds,
        "the notification to begin" if check is not None else "a renewal to find the lease taken",
    )


def test_a_round_longer_than_the_lease_keeps_it(redis_ns: RedisNamespace) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_ns.url)
        slow, other = SlowChannel(), Recorder()
        a, _ = evaluator(client, redis_ns, "replica-a", slow, [rule("drop")])
        b, _ = evaluator(client, redis_ns, "replica-b", other, [rule("drop")])
        round_a = asyncio.create_task(a.run(dropped(), now=1000))
        await within(5, check=slow.entered)
        # three TTLs while A's notification hangs: B never gets the lease
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * TTL_MS / 1000
        while loop.time() < until:
            assert not await b.run(dropped(), now=1001)
            await asyncio.sleep(0.02)
        slow.gate.set()
        assert await round_a
        assert slow.sent == [("drop", "firing")] and other.sent == []
        assert await client.get(f"{redis_ns.prefix}:alerts:lease") == b"replica-a"
        await client.aclose()

    asyncio.run(scenario())


def test_a_round_whose_lease_was_taken_stops_before_its_next_rule(redis_ns: RedisNamespace) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_ns.url)
        slow, other = SlowChannel(), Recorder()
        rules = [rule("drop"), rule("drop-too")]
        a, lease_a = evaluator(client, redis_ns, "replica-a", slow, rules)
        b, _ = evaluator(client, redis_ns, "replica-b", other, rules)
        round_a = asyncio.create_task(a.run(dropped(), now=1000))
        await within(5, check=slow.entered)
        # A stalls past its TTL (a paused process) and B took the lease over
        await client.set(f"{redis_ns.prefix}:alerts:lease", "replica-b", px=10_000)
        assert await b.run(dropped(), now=1001)
        # the first rule's state was saved before A's notification: B does not repeat it
        assert other.sent == [("drop-too", "firing")]
        await within(5, answers=lease_a.answers)  # A's renewal found the lease taken
        slow.gate.set()
        assert await round_a is False
        # A stopped before its second rule: each rule paged exactly once
        assert slow.sent == [("drop", "firing")]
        await client.aclose()

    asyncio.run(scenario())
