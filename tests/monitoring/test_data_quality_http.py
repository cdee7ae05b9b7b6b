"""Data-quality rules over real HTTP (embedded), as idgate.example.toml ships them: a source
falling silent (a KPI of every event, one source's window) and the share of events with an
analytics basis collapsing (the coverage of a KPI of every event for analytics)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import COMPLIANCE_TOKEN, MALL_WEB_KEY, TEST_CONFIG, Gateway, make_gateway, mid
from tests.monitoring.conftest import fast_alert_env
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

CONFIG = (
    TEST_CONFIG
    + """
[[tenants.kpis]]
id = "events"
events = ["*"]
purpose = "necessary_service"

[[tenants.kpis]]
id = "events_with_analytics_basis"
events = ["*"]
purpose = "analytics"

[[tenants.alerts]]
id = "mall-web-silent"
kpi = "events"
source = "mall-web"
window = 5
condition = "below"
threshold = 1

[[tenants.alerts]]
id = "analytics-basis-collapses"
kpi = "events_with_analytics_basis"
measure = "coverage"
window = 5
condition = "below"
threshold = 0.5
min_volume = 10
"""
)


def history(gw: Gateway) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{gw.url}/admin/alerts/history",
        params={"tenant": "mall"},
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()["records"]
    return records


def statuses(gw: Gateway, rule: str) -> list[str]:
    return [r["status"] for r in history(gw) if r["rule"] == rule]


def test_a_silent_source_and_a_collapse_of_the_analytics_basis(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    env = fast_alert_env(clock)
    gw = make_gateway(tmp_path / "gw", config=CONFIG, extra_env=env).start()
    try:
        clock.write_text(str(int(time.time()) + 0.5))
        # nothing from the mall's web source in the window: silent
        wait_until(lambda: statuses(gw, "mall-web-silent") == ["firing"], what="the silent source")
        # the mall enforces consent: 20 events from visitors who gave none, 5 with analytics
        consented = f"dq-{uuid.uuid4().hex[:8]}"
        with gw.client(MALL_WEB_KEY) as c:
            r = c.post(
                "/v1/consent",
                json={"anonymousId": consented, "grant": ["analytics"], "noticeId": "notice-v1"},
            )
            assert r.status_code == 200, r.text
            batch = [
                {
                    "type": "page",
                    "anonymousId": f"dq-{uuid.uuid4().hex[:8]}",
                    "name": "Home",
                    "messageId": mid(),
                }
                for _ in range(20)
            ] + [
                {"type": "page", "anonymousId": consented, "name": "Home", "messageId": mid()}
                for _ in range(5)
            ]
            r = c.post("/v1/batch", json={"batch": batch})
            assert r.status_code == 200 and r.json()["dropped"] == {"no_consent": 20}, r.text
        wait_until(lambda: statuses(gw, "mall-web-silent") == ["resolved", "firing"], what="the source back")
        wait_until(
            lambda: statuses(gw, "analytics-basis-collapses") == ["firing"], what="the basis collapsing"
        )
        (fired,) = [r for r in history(gw) if r["rule"] == "analytics-basis-collapses"]
        assert fired["value"] == 0.2 and fired["volume"] == 25  # 5 of 25 events had a basis
    finally:
        gw.stop()
