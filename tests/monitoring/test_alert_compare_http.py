"""Alert rules against the same window a week earlier, over real HTTP with the gateway's
clock under the test's control (IDGATE_DEV_CLOCK_FILE): the week-old window is kept (in
memory, or in Redis summed over sources), a drop must hold ``for_seconds`` before anyone
is paged (pending until then), and it resolves when the rate recovers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    TEST_CONFIG,
    Gateway,
    RedisNamespace,
    make_gateway,
)
from tests.monitoring.conftest import RobotReceiver, fast_alert_env, payment_batch
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
WEEK = 7 * 86_400
SENT: list[str] = []  # every anonymousId sent: canaries

CONFIG = (
    TEST_CONFIG
    + """
[[tenants.alerts]]
id = "payment-success-vs-last-week"
kpi = "payment_success_rate"
window = 5
condition = "drop"
compare = "week_ago"
threshold = 0.2
min_volume = 10
for_seconds = 2
severity = "critical"
channels = ["oncall-hook"]

[[alert_channels]]
id = "oncall-hook"
kind = "webhook"
url_env = "TEST_HOOK_URL"
"""
)


def payments(requested: int, succeeded: int) -> list[dict[str, Any]]:
    return payment_batch(requested, succeeded, "wk", SENT)


def send(gw: Gateway, batch: list[dict[str, Any]]) -> None:
    with gw.client(MALL_SERVER_KEY) as c:
        r = c.post("/v1/batch", json={"batch": batch})
    assert r.status_code == 200 and r.json()["received"] == len(batch), r.text


def five_seconds(gw: Gateway, kpi_id: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``/admin/kpis`` for one KPI: its 5-bucket (5 s) window, the whole answer, its text."""
    r = httpx.get(f"{gw.url}/admin/kpis", params={"tenant": "mall", "kpi": kpi_id}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    (kpi,) = body["kpis"]
    return next(w for w in kpi["windows"] if round(w["minutes"] * 60) == 5), body, r.text


def state(gw: Gateway) -> dict[str, Any]:
    window, body, text = five_seconds(gw, "payment_success_rate")
    (alert,) = body["alerts"]
    return {"window": window["total"], "alert": alert, "text": text}


@pytest.mark.parametrize("mode", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_drop_against_last_week_fires_after_holding_and_resolves(
    tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    hook = RobotReceiver()
    clock = tmp_path / "clock"
    env = fast_alert_env(clock, TEST_HOOK_URL=hook.url)
    ns: RedisNamespace | None = None
    if mode == "redis":
        ns = request.getfixturevalue("redis_ns")
        env.update(ns.env())
    gw = make_gateway(tmp_path / "gw", config=CONFIG, extra_env=env).start()
    try:
        now = int(time.time()) + 0.5  # the middle of a one-second bucket
        clock.write_text(str(now - WEEK))
        send(gw, payments(20, 19))  # a week ago: 95 %
        clock.write_text(str(now))
        wait_until(
            lambda: state(gw)["window"]["weekAgo"] == 0.95, what="last week's rate in the current window"
        )
        assert state(gw)["window"]["dayAgo"] is None  # nothing a day ago
        send(gw, payments(20, 14))  # now: 70 %, -26 % against last week
        pending = wait_until(
            lambda: s if (s := state(gw)["alert"])["state"] == "pending" else None, what="the pending rule"
        )
        assert pending["value"] == 0.7 and pending["previous"] == 0.95
        # the clock stands still: however often it is evaluated, it has not held for 2 s
        wait_until(
            lambda: state(gw)["alert"]["evaluations"] >= pending["evaluations"] + 5, what="more evaluations"
        )
        assert state(gw)["alert"]["state"] == "pending" and not hook.posts

        clock.write_text(str(now + 3))  # still in the 5-second window, held for 3 s
        wait_until(lambda: hook.posts, what="the firing notification")
        firing = hook.posts[0][1]
        assert firing["status"] == "firing" and firing["value"] == 0.7 and firing["previous"] == 0.95
        assert "payment_success_rate: 0.7 (a week earlier: 0.95), 20 events" in firing["text"]
        assert state(gw)["alert"]["state"] == "firing" and state(gw)["alert"]["since"] == now

        send(gw, payments(20, 20))  # recovering: 54 / 60 = 90 %, -5 % against last week
        wait_until(lambda: len(hook.posts) == 2, what="the resolved notification")
        assert hook.posts[1][1]["status"] == "resolved" and len(hook.posts) == 2

        # no identifier in the notifications, the KPI answer or (distributed) any KPI key
        seen = str(hook.posts) + state(gw)["text"] + httpx.get(f"{gw.url}/metrics").text
        if ns is not None:
            import redis

            client = redis.Redis.from_url(ns.url)
            try:
                keys = list(client.scan_iter(match=f"{ns.prefix}:kpi*"))
                assert any(b":history:" in k for k in keys)
                seen += str(keys) + str([client.hgetall(k) for k in keys if client.type(k) == b"hash"])
            finally:
                client.close()
        assert not [a for a in SENT if a in seen]
    finally:
        gw.stop()
        hook.close()


SOURCE_CONFIG = (
    TEST_CONFIG
    + """
[[tenants.alerts]]
id = "web-payments-vs-last-week"
kpi = "payments_requested"
source = "mall-web"
window = 5
condition = "drop"
compare = "week_ago"
threshold = 0.5
severity = "warning"
channels = ["oncall-hook"]

[[alert_channels]]
id = "oncall-hook"
kind = "webhook"
url_env = "TEST_HOOK_URL"
"""
)


def payment_requests(gw: Gateway, key: str, n: int) -> None:
    """``n`` payment requests from the source of ``key`` (necessary_service: no consent needed)."""
    with gw.client(key) as c:
        r = c.post("/v1/batch", json={"batch": payment_batch(n, 0, "src", SENT)})
    assert r.status_code == 200 and r.json()["accepted"] == n, r.text


def web_payments(gw: Gateway) -> dict[str, Any]:
    window, _, text = five_seconds(gw, "payments_requested")
    return {"web": window["bySource"]["mall-web"], "total": window["total"], "text": text}


@pytest.mark.parametrize("mode", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_rule_on_one_source_compares_it_with_its_own_last_week(
    tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    """The website's payment requests fall silent while the server's double: the total is
    what it was a week ago, the website's own history is not, and only it is kept."""
    hook = RobotReceiver()
    clock = tmp_path / "clock"
    env = fast_alert_env(clock, TEST_HOOK_URL=hook.url)
    if mode == "redis":
        env.update(request.getfixturevalue("redis_ns").env())
    gw = make_gateway(tmp_path / "gw", config=SOURCE_CONFIG, extra_env=env).start()
    try:
        now = int(time.time()) + 0.5
        clock.write_text(str(now - WEEK))
        payment_requests(gw, MALL_WEB_KEY, 10)
        payment_requests(gw, MALL_SERVER_KEY, 10)
        clock.write_text(str(now))
        payment_requests(gw, MALL_SERVER_KEY, 20)  # the total is what it was a week ago
        got = wait_until(
            lambda: g if (g := web_payments(gw))["total"]["value"] == 20 else None,
            what="the server's payments in the current window",
        )
        # only the watched source is kept: the total (no rule on it) has no week-old value
        assert got["total"]["weekAgo"] is None
        assert got["web"]["value"] == 0 and got["web"]["weekAgo"] == 10, got["web"]
        assert got["web"]["dayAgo"] == 0  # kept a day back too: nothing then
        wait_until(lambda: hook.posts, what="the firing notification")
        firing = hook.posts[0][1]
        assert firing["status"] == "firing" and firing["value"] == 0 and firing["previous"] == 10, firing
        assert "mall-web" in firing["text"], firing["text"]
        payment_requests(gw, MALL_WEB_KEY, 9)  # -10 %: resolved
        wait_until(lambda: len(hook.posts) == 2, what="the resolved notification")
        assert hook.posts[1][1]["status"] == "resolved"
        seen = str(hook.posts) + web_payments(gw)["text"]
        assert not [a for a in SENT if a in seen]
    finally:
        gw.stop()
        hook.close()
