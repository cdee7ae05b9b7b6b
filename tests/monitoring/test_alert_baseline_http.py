"""A rule against a baseline over real HTTP: the current (one-second) bucket compared with
the five before it pages a drop that a comparison with the bucket before cannot see (that
bucket is empty), and /admin/kpis shows the baseline the rule compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MALL_SERVER_KEY, TEST_CONFIG, Gateway, make_gateway
from tests.monitoring.conftest import (
    DINGTALK_SECRET,
    RobotReceiver,
    fast_alert_env,
    kpi_answer,
    payment_batch,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

CONFIG = (
    TEST_CONFIG
    + """
[[tenants.alerts]]
id = "against-baseline"
kpi = "payment_success_rate"
window = 1
baseline = 5
condition = "drop"
threshold = 0.2
min_volume = 10
severity = "critical"
channels = ["oncall-dingtalk"]

[[tenants.alerts]]
id = "against-the-bucket-before"
kpi = "payment_success_rate"
window = 1
condition = "drop"
threshold = 0.2
min_volume = 10
channels = ["oncall-dingtalk"]

[[alert_channels]]
id = "oncall-dingtalk"
kind = "dingtalk"
url_env = "TEST_DINGTALK_URL"
secret_env = "TEST_DINGTALK_SECRET"
"""
)


def send(gw: Gateway, requested: int, succeeded: int) -> None:
    with gw.client(MALL_SERVER_KEY) as c:
        r = c.post("/v1/batch", json={"batch": payment_batch(requested, succeeded, "pay", [])})
    assert r.status_code == 200 and not r.json()["rejected"], r.text


def kpis(gw: Gateway) -> dict[str, Any]:
    window, body = kpi_answer(gw, "payment_success_rate", 1)
    return {"window": window, "alerts": {a["rule"]: a for a in body["alerts"]}}


def test_a_drop_against_the_baseline_pages_where_the_bucket_before_is_empty(
    tmp_path: Path, robots: tuple[RobotReceiver, RobotReceiver]
) -> None:
    ding, _ = robots
    env = fast_alert_env(TEST_DINGTALK_URL=ding.url, TEST_DINGTALK_SECRET=DINGTALK_SECRET)
    gw = make_gateway(tmp_path, config=CONFIG, extra_env=env).start()
    try:
        send(gw, 20, 19)  # a steady 95 %
        # two buckets on: the one before is empty, the steady one is in the baseline
        wait_until(
            lambda: (
                (w := kpis(gw)["window"])["counted"] == 0
                and w["previous"] is None
                and w["baselines"] == {"5": 0.95}
            ),
            timeout=15,
            what="an empty bucket before the current one, the steady one in the baseline",
        )
        send(gw, 20, 14)  # 70 %
        wait_until(lambda: ding.posts, what="the firing notification")
        state = kpis(gw)["alerts"]
        assert state["against-baseline"]["state"] == "firing"
        assert (state["against-baseline"]["value"], state["against-baseline"]["previous"]) == (0.7, 0.95)
        # the bucket before held nothing: the same drop against it is no change at all
        assert state["against-the-bucket-before"]["state"] == "ok"
        _, body = ding.posts[0]
        assert "[FIRING] mall/against-baseline" in body["markdown"]["title"]
        assert "the 0.0833333 min before: 0.95" in body["markdown"]["text"]
        assert len(ding.posts) == 1
    finally:
        gw.stop()
