"""Redis dedupe across replicas: claim, confirm, in-flight, expiry of abandoned claims."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from export.dedupe import RedisDedupe, redis_dedupe_key
from export.outbox import ClaimStatus, scoped_message_id
from identity.pseudonym import KeyRing, pseudonymise_identifier
from tests.conftest import SHARED_KEYS, Gateway, RedisNamespace, make_gateway, mid
from tests.waiting import async_wait_until


def test_claim_confirm_release(redis_ns: RedisNamespace) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_ns.url)
        d = RedisDedupe(client, window_seconds=60, claim_seconds=1, prefix=f"{redis_ns.prefix}:dedupe")
        k1, k2, k3 = d.key("src", "m1"), d.key("src", "m2"), d.key("other", "m1")
        assert len({k1, k2, k3}) == 3 and "m1" not in k1
        assert await d.claim([k1, k2]) == [ClaimStatus.NEW, ClaimStatus.NEW]
        assert await d.claim([k1, k3]) == [ClaimStatus.IN_FLIGHT, ClaimStatus.NEW]
        await d.confirm([k1])
        await d.release([k2])
        assert await d.claim([k1, k2]) == [ClaimStatus.DUPLICATE, ClaimStatus.NEW]
        assert 55 <= await client.ttl(k1) <= 60
        # one id twice in one call: the later copy is the first's duplicate (as embedded), or
        # in flight / a duplicate like the first when another request holds it / stored it
        k4 = d.key("src", "m4")
        assert await d.claim([k4, k3, k4]) == [ClaimStatus.NEW, ClaimStatus.IN_FLIGHT, ClaimStatus.DUPLICATE]
        assert await d.claim([k3, k3]) == [ClaimStatus.IN_FLIGHT, ClaimStatus.IN_FLIGHT]
        assert await d.claim([k1, k1]) == [ClaimStatus.DUPLICATE, ClaimStatus.DUPLICATE]
        await d.release([k4])

        # A claim whose owner died expires, and the retry is then accepted. The claim's TTL
        # must really run out (1 s, the shortest claim_seconds takes): poll Redis for it.
        async def claim_expired() -> bool:
            return await client.exists(k2) == 0

        await async_wait_until(claim_expired, timeout=5, what="the abandoned claim to expire")
        assert await d.claim([k2]) == [ClaimStatus.NEW]
        await client.aclose()

    asyncio.run(main())


@pytest.mark.slow
def test_two_replicas_share_dedupe_and_in_flight_is_retryable(tmp_path, redis_ns: RedisNamespace) -> None:
    a: Gateway = make_gateway(tmp_path / "a", extra_env=redis_ns.env()).start()
    b: Gateway = make_gateway(tmp_path / "b", extra_env=redis_ns.env()).start()
    try:
        m = mid()
        event = {"userId": "u-1", "event": "Paid", "messageId": m}
        with a.client() as ca, b.client() as cb:
            assert ca.post("/v1/track", json=event).json()["accepted"] == 1
            again = cb.post("/v1/track", json=event)
            assert again.status_code == 200 and again.json()["duplicates"] == 1
            # Another replica is storing this id right now (its claim is pending):
            sync = redis.Redis.from_url(redis_ns.url)
            pending = mid()
            # claims are scoped by the sender's pseudonyms (export.outbox.scoped_message_id)
            user = pseudonymise_identifier(
                KeyRing.from_json(SHARED_KEYS["IDGATE_KEYS"]).pseudonymiser("shop"), "user_id", "u-1"
            ).value
            scoped = scoped_message_id(pending, None, user)
            sync.set(redis_dedupe_key("shop-web", scoped, f"{redis_ns.prefix}:dedupe"), "p", ex=30)
            r = cb.post(
                "/v1/batch",
                json={
                    "batch": [
                        {**event, "type": "track", "messageId": pending},
                        {**event, "type": "track", "messageId": mid()},
                    ]
                },
            )
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["inFlight"] == 1 and r.json()["accepted"] == 1
            # One id twice in one batch: stored once, the copy answered as its duplicate
            # (it was "in flight" behind its own first copy: a 503 the client could only
            # resolve by retrying)
            twice = mid()
            r = ca.post("/v1/batch", json={"batch": [{**event, "type": "track", "messageId": twice}] * 2})
            assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (1, 1), r.text
        # Had either replica stored m twice, the copy would be delivered before a later
        # event of its own: wait for one through each replica, then count.
        a.wait_past()
        b.wait_past()
        delivered = [e["messageId"] for e in a.sink_lines() + b.sink_lines()]
        assert delivered.count(m) == 1 and delivered.count(twice) == 1
    finally:
        a.stop()
        b.stop()
