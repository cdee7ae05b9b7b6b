"""Export stores on a Redis Cluster (tests.conftest.redis_cluster): the Redis Streams sink,
dead letters of destinations on every master, erasure from the dedupe window and the rate
counters (SCANs over every master, deletes across slots)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from export.deadletter import RedisDeadLetters
from export.dedupe import RedisDedupe
from export.outbox import ClaimStatus
from export.sinks import build_sink
from export.stream_sinks import RedisStreamSink
from gateway.rate_limits import Hit, RedisCounters
from identity.redis_client import key_slot, open_async_redis, open_redis
from tests.conftest import RedisNamespace
from tests.receivers import sample_records


def test_redis_stream_sink_adds_each_message_once_on_a_cluster(cluster_ns: RedisNamespace) -> None:
    sink = build_sink(
        "redis_stream",
        root=Path("/nonexistent"),
        destination="stream-dest",
        options={
            "url": cluster_ns.url,
            "stream": f"{cluster_ns.prefix}:events",
            "key_prefix": f"{cluster_ns.prefix}:sink",
        },
    )
    assert isinstance(sink, RedisStreamSink)
    records = sample_records(300)

    async def main() -> None:
        await sink.write(records[:200])
        await sink.write(records[150:])
        assert (sink.added, sink.duplicates) == (300, 50)
        await sink.close()

    asyncio.run(main())
    client = open_redis(cluster_ns.url)
    try:
        assert client.xlen(f"{cluster_ns.prefix}:events") == 300
    finally:
        client.close()


def test_dead_letters_of_destinations_on_every_master(cluster_ns: RedisNamespace) -> None:
    client = open_redis(cluster_ns.url)
    store = RedisDeadLetters(client, cluster_ns.prefix)
    destinations = [f"d{i}" for i in range(12)]
    masters = {client.get_node_from_key(store._key(d)).name for d in destinations}
    assert len(masters) >= 2  # the test means something: the streams are spread
    try:
        for i, d in enumerate(destinations):
            store.add(d, sample_records(i + 1), "refused", attempts=3)
        assert store.counts() == {d: i + 1 for i, d in enumerate(destinations)}
        assert len(store.list(limit=1000)) == sum(range(1, 13))
    finally:
        client.close()


def test_erasure_from_dedupe_and_rate_counters_on_a_cluster(cluster_ns: RedisNamespace) -> None:
    async def main() -> None:
        client = open_async_redis(cluster_ns.url)
        try:
            dedupe = RedisDedupe(client, window_seconds=60, prefix=f"{cluster_ns.prefix}:dedupe")
            keys = [dedupe.key(source, f"m-{i}") for source in ("web", "app", "mp") for i in range(5)]
            assert len({key_slot(k) for k in keys}) == 3
            for source in ("web", "app", "mp"):
                mine = [k for k in keys if f"{{{source}}}" in k]
                assert await dedupe.claim(mine) == [ClaimStatus.NEW] * 5
                await dedupe.confirm(mine)
            assert await dedupe.forget(keys) == 15  # one DEL over three slots

            counters = RedisCounters(client, cluster_ns.prefix)
            for tenant in ("shop", "mall", "t3", "t4"):
                hits = [Hit("x", f"{{{tenant}}}:consent:k1.victim", 1, 10, 86_400)]
                hits.append(Hit("x", f"{{{tenant}}}:consent:k1.other", 1, 10, 86_400))
                assert await counters.hit(hits) is None
                links = [(f"{{{tenant}}}:k1.victim", ["k1.a"]), (f"{{{tenant}}}:k1.other", ["k1.b"])]
                assert await counters.add_members(links, 5) == [True, True]
            # the victim's counters and sets, found by a SCAN over every master
            assert await counters.forget(["k1.victim", "k1.a"]) == 8
        finally:
            await client.aclose()

    asyncio.run(main())
