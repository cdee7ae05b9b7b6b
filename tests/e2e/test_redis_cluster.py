"""The distributed mode on a Redis Cluster (three masters, tests.conftest.redis_cluster) and
PostgreSQL, over real HTTP: dedupe, consent, KPI sketches, the Redis outbox to a sink, rate
limits, console sessions, the tracking plan's violation records. The cluster client refuses
any script or MULTI whose keys are not in one slot, so each of these paths passing is the
layout checked end to end."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from identity.redis_client import open_redis
from tests.conftest import (
    APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    WEB_KEY,
    PostgresSchema,
    RedisNamespace,
    make_gateway,
    mid,
)
from tests.consent.test_rights import open_request
from tests.console.conftest import assert_replicas_share_sessions
from tests.gateway.test_tracking_plan import plan_config, product_added, seed_plan
from tests.monitoring.test_kpis_http import kpis, seed_events, send
from tests.security.test_rate_limits import limited_config
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def test_distributed_gateway_on_a_redis_cluster(
    tmp_path: Path, pg_schema: PostgresSchema, cluster_ns: RedisNamespace
) -> None:
    env = {**cluster_ns.env(), "DATABASE_URL": pg_schema.url, "IDGATE_ALERT_INTERVAL_MS": "100"}
    gw = make_gateway(tmp_path, extra_env=env).start()
    try:
        ready = httpx.get(gw.url + "/readyz").json()
        assert ready["checks"]["redis"] is True, ready

        # ingest with dedupe: a retried message id is a duplicate; the Redis outbox delivers
        ids = [mid() for _ in range(20)]
        assert gw.send_tracks(ids)["accepted"] == 20
        again = gw.send_tracks(ids[:5])
        assert again["accepted"] == 0 and again["duplicates"] == 5, again
        lines = gw.wait_for_sink(set(ids))
        assert sorted(e["messageId"] for e in lines) == sorted(ids)

        # KPI sketches (PFADD/PFCOUNT, the returning-visitor filter) summed in the cluster
        a, b, c = (f"kpi-{n}-{uuid.uuid4().hex[:8]}" for n in "abc")
        web, app = seed_events(a, b, c)
        assert send(gw, WEB_KEY, web)["accepted"] == len(web)
        assert send(gw, APP_KEY, app)["accepted"] == len(app)
        assert send(gw, WEB_KEY, web)["duplicates"] == len(web)

        # (the replicas' increments reach Redis write-behind, within a flush period)
        def totals() -> dict[str, float] | None:
            t = {k: w["total"]["value"] for k, w in kpis(gw, "shop").items()}
            return t if t["uv_home"] == 3 and t["pv_home"] == 3 else None

        total = wait_until(totals, what="the KPIs in Redis")
        # (u-1 paid above: 20 orders)
        assert total["uv_product"] == 2 and total["paying_persons"] == 2 and total["orders"] == 21

        # consent: a grant and a withdrawal take effect on the very next event
        anon = f"anon-{uuid.uuid4().hex[:10]}"
        event = {"anonymousId": anon, "event": "Product Viewed"}
        granted = httpx.post(
            gw.url + "/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={"anonymousId": anon, "grant": ["analytics"], "noticeId": "notice-v1"},
        )
        assert granted.status_code == 200, granted.text
        r = httpx.post(gw.url + "/v1/track", auth=(MALL_WEB_KEY, ""), json={**event, "messageId": mid()})
        assert r.json()["accepted"] == 1, r.text
        withdrawn = httpx.post(
            gw.url + "/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={"anonymousId": anon, "withdraw": ["analytics"]},
        )
        assert withdrawn.status_code == 200, withdrawn.text
        r = httpx.post(gw.url + "/v1/track", auth=(MALL_WEB_KEY, ""), json={**event, "messageId": mid()})
        assert r.json()["dropped"] == {"withdrawn": 1}, r.text

        # the state is spread over the masters, not held by one
        client = open_redis(cluster_ns.url)
        try:
            holding = [
                node.name
                for node in client.get_primaries()
                if any(True for _ in client.scan_iter(match=f"*{cluster_ns.prefix}*", target_nodes=node))
            ]
        finally:
            client.close()
        assert len(holding) >= 2, holding
    finally:
        gw.stop()
    assert "CROSSSLOT" not in gw.log_text() and "same slot" not in gw.log_text()


def test_rate_limits_on_a_redis_cluster(
    tmp_path: Path, pg_schema: PostgresSchema, cluster_ns: RedisNamespace
) -> None:
    config = limited_config(ip_requests_per_second=3, ip_events_per_second=1000)
    env = {**cluster_ns.env(), "DATABASE_URL": pg_schema.url}
    gw = make_gateway(tmp_path, config=config, extra_env=env).start()
    try:
        statuses = []
        with gw.client(MALL_WEB_KEY) as c:
            for _ in range(40):  # 3 a second are allowed: a burst of 40 cannot all pass
                r = c.post(
                    "/v1/track", json={"anonymousId": "flooder", "event": "Viewed", "messageId": mid()}
                )
                statuses.append(r.status_code)
                if r.status_code == 429:
                    break
        assert statuses[-1] == 429, statuses
        assert r.json()["field"] == "rate_limits.ip_requests_per_second"
    finally:
        gw.stop()


def test_console_sessions_on_a_redis_cluster(
    tmp_path: Path, pg_schema: PostgresSchema, cluster_ns: RedisNamespace
) -> None:
    """Two replicas share an officer's console session through the cluster."""
    assert_replicas_share_sessions(tmp_path, {**cluster_ns.env(), "DATABASE_URL": pg_schema.url})


def test_tracking_plan_violation_records_on_a_redis_cluster(
    tmp_path: Path, pg_schema: PostgresSchema, cluster_ns: RedisNamespace
) -> None:
    """The shared violation store's scripts (keep, replace, delete) each in one slot: a
    blocked event is kept, listed, shown, replayed while still violating (its record
    replaced), and removed by a deletion request."""
    env = {**cluster_ns.env(), "DATABASE_URL": pg_schema.url}
    gw = make_gateway(tmp_path, config=plan_config(seed_plan(tmp_path), "enforce"), extra_env=env).start()
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    try:
        user = f"canary-cluster-{uuid.uuid4().hex[:8]}"
        blocked = {**product_added("12"), "userId": user}
        sent = httpx.post(gw.url + "/v1/batch", json={"batch": [blocked]}, auth=(WEB_KEY, ""), timeout=10)
        assert sent.json()["planViolations"][0]["action"] == "kept", sent.text
        listed = httpx.get(gw.url + "/admin/plan/violations/", params={"tenant": "shop"}, headers=operator)
        assert listed.json()["counts"] == {"product_added": 1}, listed.text
        [record] = listed.json()["violations"]
        shown = httpx.get(f"{gw.url}/admin/plan/violations/{record['id']}", headers=operator)
        assert shown.status_code == 200 and shown.json()["messageId"] == blocked["messageId"], shown.text
        replayed = httpx.post(
            gw.url + "/admin/plan/violations/replay",
            json={"tenant": "shop", "ids": [record["id"]]},
            headers=operator,
            timeout=30,
        )
        assert replayed.json()["stillViolating"] == 1, replayed.text
        again = httpx.get(gw.url + "/admin/plan/violations/", params={"tenant": "shop"}, headers=operator)
        assert [v["id"] for v in again.json()["violations"]] == [record["id"]]  # replaced, same id
        deleted = open_request(gw, tenant="shop", kind="delete", subject={"type": "user_id", "id": user})
        assert deleted.status_code == 201, deleted.text
        assert {s["step"]: s for s in deleted.json()["steps"]}["plan_violations"]["records_removed"] == 1
        left = httpx.get(gw.url + "/admin/plan/violations/", params={"tenant": "shop"}, headers=operator)
        assert left.json()["counts"] == {}, left.text
    finally:
        gw.stop()
    assert "CROSSSLOT" not in gw.log_text() and "same slot" not in gw.log_text()
