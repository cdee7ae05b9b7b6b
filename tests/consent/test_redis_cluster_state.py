"""The consent state's cross-slot writes on a Redis Cluster: an apply over many pseudonyms
(one script per slot), and a key rotation's move from old to new pseudonyms (their hashes
lie in different slots)."""

from __future__ import annotations

import asyncio

from consent.rotation import Alias, rekey_redis_state
from consent.state import RecordView, RedisConsentState
from identity.redis_client import open_async_redis, open_redis
from tests.conftest import RedisNamespace


def test_apply_and_rekey_across_slots(cluster_ns: RedisNamespace) -> None:
    pseudonyms = [f"k1.p{i}" for i in range(20)]
    nodes = tuple(f"anonymous_id:{p}" for p in pseudonyms)

    async def main() -> dict[str, dict[str, str]]:
        client = open_async_redis(cluster_ns.url)
        try:
            state = RedisConsentState(client, prefix=cluster_ns.prefix)
            grant = RecordView(1, "shop", "consent", nodes, ("analytics",), "granted")
            withdraw = RecordView(2, "shop", "consent", nodes[:5], ("analytics",), "withdrawn")
            await state.apply([withdraw, grant])
            found = await state.lookup("shop", pseudonyms)
        finally:
            await client.aclose()
        return {i: {p: e.state for p, e in v.items()} for i, v in found.items()}

    found = asyncio.run(main())
    assert [found[p]["analytics"] for p in pseudonyms] == ["withdrawn"] * 5 + ["granted"] * 15

    sync = open_redis(cluster_ns.url)
    try:
        aliases = [Alias(n, old, f"k2.p{n}") for n, old in enumerate(pseudonyms)]
        assert rekey_redis_state(sync, cluster_ns.prefix, "shop", aliases) == 20
        assert rekey_redis_state(sync, cluster_ns.prefix, "shop", aliases) == 0  # a repeat moves nothing
        assert not sync.exists(f"{cluster_ns.prefix}:consent:shop:k1.p0")
        moved = sync.hgetall(f"{cluster_ns.prefix}:consent:shop:k2.p0")
        assert b"withdrawn" in moved[b"analytics"]
    finally:
        sync.close()
