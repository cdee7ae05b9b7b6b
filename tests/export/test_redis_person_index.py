"""The person index on Redis (which persons' data a destination holds: where deletion notices
go, and its retention clock), shared by the replicas.

A returning person is written at most every ten minutes per destination, as in the embedded
outbox, but never skipped once anyone took persons out of the index: a deletion's receipt or
a retention run, on this replica or another. A person whose data just went out is in the
index after the commit, whatever another replica released before."""

from __future__ import annotations

import asyncio
from typing import Any

from export.dedupe import RedisDedupe
from export.outbox import DeliveryBatch
from export.redis_outbox import RedisDestinationQueue, RedisStreamOutbox
from identity.redis_client import open_async_redis
from tests.conftest import RedisNamespace
from tests.waiting import ManualClock

DEST = "warehouse"
START = 1_800_000_000.0


def replica(client: Any, ns: RedisNamespace, name: str, clock: ManualClock) -> RedisDestinationQueue:
    dedupe = RedisDedupe(client, window_seconds=60, prefix=f"{ns.prefix}:dedupe")
    outbox = RedisStreamOutbox(client, prefix=ns.prefix, replica=name, dedupe=dedupe, clock=clock)
    return outbox.queue(DEST)


def test_person_index_writes_a_returning_person_at_most_every_ten_minutes_unless_someone_left(
    any_redis_ns: RedisNamespace,
) -> None:
    ns = any_redis_ns
    clock = ManualClock(START)

    async def main() -> None:
        client = open_async_redis(ns.url)
        a, b = replica(client, ns, "r1", clock), replica(client, ns, "r2", clock)
        await a.open()
        await b.open()
        at_key = a.outbox.received_at_key(DEST)

        async def at(person: str) -> float | None:
            score = await client.zscore(at_key, person)
            return None if score is None else score / 1000

        async def deliver(
            queue: RedisDestinationQueue, *persons: str, released: tuple[str, ...] = ()
        ) -> None:
            await queue.commit(DeliveryBatch([], 0, []), len(persons), {}, persons, released)

        try:
            await deliver(a, "p_a")
            assert await at("p_a") == START and await a.received(["p_a"]) == {"p_a"}
            clock.now += 599
            await deliver(a, "p_a")
            assert await at("p_a") == START  # within ten minutes: not written again
            clock.now += 1
            await deliver(a, "p_a")
            assert await at("p_a") == START + 600

            # another replica takes a deletion's receipt for p_a: p_a leaves the index
            await deliver(b, "p_b", released=("p_a",))
            assert await a.received(["p_a", "p_b"]) == {"p_b"} and await at("p_a") is None
            # a's next delivery of p_a, within its ten minutes, writes p_a again at once
            clock.now += 1
            await deliver(a, "p_a")
            assert await a.received(["p_a"]) == {"p_a"} and await at("p_a") == START + 601

            # a retention run (any replica) drops both; each is written at its next delivery
            assert await a.outbox.expire_person_index(DEST, int((START + 602) * 1000), apply=True) == 2
            await deliver(a, "p_a")
            await deliver(b, "p_b")
            assert await a.received(["p_a", "p_b"]) == {"p_a", "p_b"}
            assert await at("p_a") == START + 601 and await at("p_b") == START + 601

            # noted and released in one commit (a deletion notice after the person's last
            # event in the batch): the person is out, as if written and then removed
            await deliver(a, "p_c", "p_a", released=("p_a",))
            assert await a.received(["p_a", "p_c"]) == {"p_c"}
            await deliver(a, "p_a")
            assert await a.received(["p_a"]) == {"p_a"}

            # Redis lost its data (a restart without persistence), the index and the epoch
            # with it, for a destination nothing was ever released from: a person noted a
            # minute ago is written again at their next delivery
            c = a.outbox.queue("archive")
            await c.open()
            await deliver(c, "p_a")
            await client.delete(c._persons_key, c.outbox.received_at_key("archive"), c._epoch_key)
            clock.now += 60
            await deliver(c, "p_a")
            assert await c.received(["p_a"]) == {"p_a"}
        finally:
            await client.aclose()

    asyncio.run(main())
