"""The Redis outbox's claim: the message ids' dedupe statuses and the backpressure bound.

On one server the claim and the backlog it is checked against are one script call; on a
Redis Cluster (the claims in their source's slot, the counters in the stream's) they are two.
Both must answer the same: new, in flight or duplicate per id (an id twice in one request as
the embedded outbox answers it), and past ``max_pending`` an ``OutboxFull`` that leaves no
claim behind, so the client's retry is new once delivery has caught up."""

from __future__ import annotations

import asyncio

import pytest

from export.dedupe import RedisDedupe
from export.outbox import ClaimStatus, OutboxFull, OutboxRecord
from export.redis_outbox import RedisStreamOutbox
from identity.redis_client import open_async_redis
from tests.conftest import RedisNamespace

NEW, IN_FLIGHT, DUPLICATE = ClaimStatus.NEW, ClaimStatus.IN_FLIGHT, ClaimStatus.DUPLICATE


def records(source: str, ids: list[str]) -> list[OutboxRecord]:
    return [OutboxRecord("t", source, m, 0, ("warehouse",), b'{"m":"%s"}' % m.encode()) for m in ids]


def test_claim_answers_and_bound_on_one_server_and_on_a_cluster(any_redis_ns: RedisNamespace) -> None:
    ns = any_redis_ns

    async def main() -> None:
        client = open_async_redis(ns.url)
        dedupe = RedisDedupe(client, window_seconds=60, claim_seconds=30, prefix=f"{ns.prefix}:dedupe")
        outbox = RedisStreamOutbox(client, prefix=ns.prefix, replica="r1", dedupe=dedupe, max_pending=5)
        assert outbox.cluster is ns.url.startswith("redis+cluster")
        await outbox.register_destinations(["warehouse"])
        try:
            first = await outbox.claim("web", ["m1", "m2", "m1"])
            assert first.statuses == [NEW, NEW, DUPLICATE]
            assert await outbox.append(records("web", ["m1", "m2"]), claim=first) == [True, True]
            # m1 is stored, m3 is held by a request still running, m4 is new; another
            # source's m1 is its own
            held = await outbox.claim("web", ["m3"])
            again = await outbox.claim("web", ["m1", "m3", "m4", "m4"])
            assert again.statuses == [DUPLICATE, IN_FLIGHT, NEW, DUPLICATE]
            assert (await outbox.claim("app", ["m1"])).statuses == [NEW]
            # two events undelivered; m3 and m4 would make four, five and six: past the bound
            assert await outbox.exact_backlog() == 2
            await outbox.append(records("web", ["m3"]), claim=held)
            assert await outbox.append(records("web", ["m4"]), claim=again) == [True]
            assert await outbox.exact_backlog() == 4
            with pytest.raises(OutboxFull):
                await outbox.claim("web", ["m5", "m6"])
            # the refusal kept no claim: once delivery catches up, the retry is new
            queue = outbox.queue("warehouse")
            batch = await queue.fetch(100)
            assert len(batch.records) == 4
            await queue.commit(batch, 4, {}, ())
            assert await outbox.exact_backlog() == 0
            assert (await outbox.claim("web", ["m5", "m6"])).statuses == [NEW, NEW]
        finally:
            await client.aclose()

    asyncio.run(main())
