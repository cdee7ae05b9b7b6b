"""Attack: flooding idgate from one client (the public write key is enough).

Before, nothing bounded what one client could send or make idgate store: 1,500 fake
persons grew a gateway by 106 MB and the identity log by 215k rows in 26 s. Now requests
and events per second per source and per client network, consent calls per identifier per
day and new identifiers per person per day are limited; over a limit the answer is 429
with Retry-After and the limit named, counted in /metrics; the counters are shared by the
replicas through Redis.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from tests.conftest import MALL_APP_KEY, MALL_WEB_KEY, TEST_CONFIG, RedisNamespace, make_gateway
from tests.gateway.conftest import in_process_app
from tests.waiting import wait_until


def limited_config(**limits: int) -> str:
    """The tests' config with its [rate_limits] replaced by ``limits``."""
    table = "\n".join(f"{k} = {v}" for k, v in limits.items())
    config, n = re.subn(r"\[rate_limits\]\n(?:[a-z_]+ = \d+\n)+", f"[rate_limits]\n{table}\n", TEST_CONFIG)
    assert n == 1
    return config


def consent_call(anonymous_id: str) -> dict[str, object]:
    return {"anonymousId": anonymous_id, "grant": ["analytics"], "noticeId": "notice-v1"}


def test_flood_from_one_network_is_answered_429_with_retry_after(tmp_path: Path) -> None:
    app = in_process_app(tmp_path, limited_config(ip_requests_per_second=3, ip_events_per_second=1000))
    with TestClient(app) as client:
        statuses = []
        for _ in range(40):  # 3 a second are allowed: a burst of 40 cannot all pass
            r = client.post(
                "/v1/track",
                json={"anonymousId": "flooder", "event": "Viewed", "messageId": uuid.uuid4().hex},
                auth=(MALL_WEB_KEY, ""),
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        body = r.json()
        assert body["error"] == "rate_limited" and body["field"] == "rate_limits.ip_requests_per_second"
        assert 1 <= int(r.headers["Retry-After"]) <= 1
        metrics = client.get("/metrics").text
        assert (
            'idgate_rate_limited_total{limit="ip_requests_per_second",source="mall-web",tenant="mall"}'
            in (metrics)
        )


def test_consent_calls_per_subject_are_limited_per_day(tmp_path: Path) -> None:
    app = in_process_app(tmp_path, limited_config(consent_records_per_subject_per_day=2))
    with TestClient(app) as client:
        device = f"dev-{uuid.uuid4().hex[:8]}"
        for _ in range(2):
            r = client.post("/v1/consent", json=consent_call(device), auth=(MALL_WEB_KEY, ""))
            assert r.status_code == 200, r.text
        r = client.post("/v1/consent", json=consent_call(device), auth=(MALL_WEB_KEY, ""))
        assert r.status_code == 429, r.text
        assert r.json()["field"] == "rate_limits.consent_records_per_subject_per_day"
        assert 1 <= int(r.headers["Retry-After"]) <= 86_400
        # another subject is not affected
        r = client.post("/v1/consent", json=consent_call(device + "-other"), auth=(MALL_WEB_KEY, ""))
        assert r.status_code == 200, r.text


def test_one_person_cannot_link_unbounded_identifiers(tmp_path: Path) -> None:
    """An identify with 45 external ids (the growth attack) is stored but not linked."""
    app = in_process_app(tmp_path, limited_config(new_identifiers_per_person_per_day=10))
    with TestClient(app) as client:
        device = f"dev-{uuid.uuid4().hex[:8]}"
        r = client.post(
            "/v1/consent",
            json={**consent_call(device), "grant": ["analytics", "identity_linking"]},
            auth=(MALL_APP_KEY, ""),
        )
        assert r.status_code == 200, r.text
        external = [
            {"type": "wx_openid", "id": f"o-{i:03d}-{uuid.uuid4().hex}", "appid": "wx1"} for i in range(45)
        ]
        r = client.post(
            "/v1/identify",
            json={"anonymousId": device, "messageId": uuid.uuid4().hex, "context": {"externalIds": external}},
            auth=(MALL_APP_KEY, ""),
        )
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        metrics = client.get("/metrics").text
        assert re.search(
            r'idgate_rate_limited_total\{limit="new_identifiers_per_person_per_day",source="mall-app",'
            r'tenant="mall"\} 1\.0',
            metrics,
        ), metrics


def test_consent_calls_per_client_network_are_limited_per_hour(tmp_path: Path) -> None:
    """What bounds how many subjects one network can make the ledger hold (the growth
    attack: fresh fake subjects, each one consent call), for API calls and consent events."""
    app = in_process_app(tmp_path, limited_config(ip_consent_calls_per_hour=3))
    with TestClient(app) as client:
        for i in range(3):
            r = client.post(
                "/v1/consent", json=consent_call(f"fake-{i}-{uuid.uuid4().hex[:6]}"), auth=(MALL_WEB_KEY, "")
            )
            assert r.status_code == 200, r.text
        r = client.post(
            "/v1/consent", json=consent_call(f"fake-{uuid.uuid4().hex[:6]}"), auth=(MALL_WEB_KEY, "")
        )
        assert r.status_code == 429 and r.json()["field"] == "rate_limits.ip_consent_calls_per_hour", r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 3600
        # the same call as a Segment consent event: rejected, the rest of the batch goes on
        r = client.post(
            "/v1/track",
            json={
                "anonymousId": f"fake-{uuid.uuid4().hex[:6]}",
                "event": "Segment Consent Preference Updated",
                "messageId": uuid.uuid4().hex,
                "context": {"consent": {"categoryPreferences": {"Analytics": True}}},
            },
            auth=(MALL_WEB_KEY, ""),
        )
        assert r.status_code == 400, r.text
        (rejected,) = r.json()["rejected"]
        assert (
            rejected["error"] == "rate_limited"
            and rejected["field"] == "rate_limits.ip_consent_calls_per_hour"
        )


def test_client_network_behind_a_proxy_comes_from_x_forwarded_for(tmp_path: Path) -> None:
    """With forwarded_hops = 1 every client network has its own budget (not the proxy's)."""
    app = in_process_app(tmp_path, limited_config(ip_consent_calls_per_hour=1, forwarded_hops=1))
    with TestClient(app) as client:
        for network in ("203.0.113.7", "198.51.100.9"):
            headers = {"X-Forwarded-For": f"10.9.9.9, {network}"}  # a spoofed entry, then the proxy's
            r = client.post(
                "/v1/consent", json=consent_call(uuid.uuid4().hex), auth=(MALL_WEB_KEY, ""), headers=headers
            )
            assert r.status_code == 200, r.text
        headers = {"X-Forwarded-For": "203.0.113.200"}  # the same /24 as the first
        r = client.post(
            "/v1/consent", json=consent_call(uuid.uuid4().hex), auth=(MALL_WEB_KEY, ""), headers=headers
        )
        assert r.status_code == 429, r.text


@pytest.mark.slow
def test_limits_hold_across_two_replicas(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """Two `idgate serve` processes sharing Redis share one budget."""
    config = limited_config(consent_records_per_subject_per_day=3)
    a = make_gateway(tmp_path / "a", config=config, extra_env=redis_ns.env()).start()
    b = make_gateway(tmp_path / "b", config=config, extra_env=redis_ns.env()).start()
    try:
        device = f"dev-{uuid.uuid4().hex[:8]}"
        for gw in (a, b, a):
            r = httpx.post(gw.url + "/v1/consent", json=consent_call(device), auth=(MALL_WEB_KEY, ""))
            assert r.status_code == 200, r.text
        r = httpx.post(b.url + "/v1/consent", json=consent_call(device), auth=(MALL_WEB_KEY, ""))
        assert r.status_code == 429, r.text
        assert r.json()["field"] == "rate_limits.consent_records_per_subject_per_day"
        assert int(r.headers["Retry-After"]) >= 1
        assert 'limit="consent_records_per_subject_per_day"' in httpx.get(b.url + "/metrics").text
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_per_second_pacing_holds_across_two_replicas(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """The paced per-second budget of one client network is one budget in Redis: what replica
    A admitted, replica B does not admit again (2 a second with 1 s of burst: 2 at once)."""
    config = limited_config(ip_requests_per_second=2, ip_events_per_second=1000)
    a = make_gateway(tmp_path / "a", config=config, extra_env=redis_ns.env()).start()
    b = make_gateway(tmp_path / "b", config=config, extra_env=redis_ns.env()).start()
    try:
        with a.client(MALL_WEB_KEY) as ca, b.client(MALL_WEB_KEY) as cb:

            def track(client: httpx.Client) -> httpx.Response:
                event = {"anonymousId": "pacer", "event": "Viewed", "messageId": uuid.uuid4().hex}
                return client.post("/v1/track", json=event)

            assert [track(ca).status_code, track(ca).status_code] == [200, 200]
            refused = track(cb)
            assert refused.status_code == 429, refused.text
            assert refused.json()["field"] == "rate_limits.ip_requests_per_second"
            assert refused.headers["Retry-After"] == "1"
            # the budget refills at the rate, on one clock for both: B's turn comes within
            # about half a second, not at the end of a window
            r = wait_until(
                lambda: (answer := track(cb)).status_code != 429 and answer,
                timeout=5,
                what="replica B's next turn",
                interval=0.05,
            )
            assert r.status_code == 200
            assert track(ca).status_code == 429  # and it was taken from A's budget too
    finally:
        a.stop()
        b.stop()
