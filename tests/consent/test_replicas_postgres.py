"""Two gateway processes sharing PostgreSQL and Redis: a withdrawal acknowledged by one
stops the other's forwarding of the very next event."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import MALL_WEB_KEY, PostgresSchema, RedisNamespace, make_gateway, mid

pytestmark = pytest.mark.slow


def test_withdrawal_through_one_replica_stops_the_other_at_once(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
):
    env = {**redis_ns.env(), "DATABASE_URL": pg_schema.url}
    a = make_gateway(tmp_path / "a", extra_env=env).start()
    b = make_gateway(tmp_path / "b", extra_env=env).start()
    try:
        for round_ in range(5):
            anon = f"anon-{uuid.uuid4().hex[:10]}"
            granted = httpx.post(
                a.url + "/v1/consent",
                auth=(MALL_WEB_KEY, ""),
                json={"anonymousId": anon, "grant": ["analytics"], "noticeId": "notice-v1"},
            )
            assert granted.status_code == 200, granted.text
            event = {"anonymousId": anon, "event": "Product Viewed"}
            r = httpx.post(b.url + "/v1/track", auth=(MALL_WEB_KEY, ""), json={**event, "messageId": mid()})
            assert r.json()["accepted"] == 1, f"round {round_}: the grant did not reach replica b"
            withdrawn = httpx.post(
                a.url + "/v1/consent",
                auth=(MALL_WEB_KEY, ""),
                json={"anonymousId": anon, "withdraw": ["analytics"]},
            )
            assert withdrawn.status_code == 200
            r = httpx.post(b.url + "/v1/track", auth=(MALL_WEB_KEY, ""), json={**event, "messageId": mid()})
            assert r.json()["dropped"] == {"withdrawn": 1}, f"round {round_}: replica b still forwarded"
        # both replicas appended to one consistent chain in PostgreSQL
        ok = httpx.get(
            a.url + "/admin/consent/verify", headers={"Authorization": "Bearer operator-test-token"}
        )
        assert ok.json()["ok"] is True and ok.json()["records"] >= 10
    finally:
        a.stop()
        b.stop()


def test_a_new_replica_catches_up_from_the_ledger(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
):
    """Redis lost its state (or is new): the projection is rebuilt from the ledger."""
    import redis

    env = {**redis_ns.env(), "DATABASE_URL": pg_schema.url}
    a = make_gateway(tmp_path / "a", extra_env=env).start()
    anon = f"anon-{uuid.uuid4().hex[:10]}"
    httpx.post(
        a.url + "/v1/consent",
        auth=(MALL_WEB_KEY, ""),
        json={"anonymousId": anon, "grant": ["analytics"], "noticeId": "notice-v1"},
    )
    a.stop()
    client = redis.Redis.from_url(redis_ns.url)
    client.delete(*client.keys(f"{redis_ns.prefix}:*"))
    b = make_gateway(tmp_path / "b", extra_env=env).start()
    try:
        r = httpx.post(
            b.url + "/v1/track",
            auth=(MALL_WEB_KEY, ""),
            json={"anonymousId": anon, "event": "Product Viewed", "messageId": mid()},
        )
        assert r.json()["accepted"] == 1
    finally:
        b.stop()
