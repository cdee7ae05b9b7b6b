"""Alert history over real HTTP (embedded: SQLite): a firing and its resolution are recorded
with the values and, per channel, whether the notification arrived; a dead channel is
retried with backoff and recorded as failed. Listed by GET /admin/alerts/history (operator
and compliance) and ``idgate alerts history``; no identifier in any record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli.conftest import clean_env, idgate
from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_SERVER_KEY,
    OPERATOR_TOKEN,
    TEST_CONFIG,
    Gateway,
    free_port,
    make_gateway,
)
from tests.monitoring.conftest import RobotReceiver, fast_alert_env, payment_batch
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SENT: list[str] = []
CONFIG = (
    TEST_CONFIG
    + """
[[tenants.alerts]]
id = "payment-success-low"
kpi = "payment_success_rate"
window = 1
condition = "below"
threshold = 0.9
min_volume = 10
severity = "critical"
channels = ["oncall-hook", "dead-hook"]

[[alert_channels]]
id = "oncall-hook"
kind = "webhook"
url_env = "TEST_HOOK_URL"

[[alert_channels]]
id = "dead-hook"
kind = "webhook"
url_env = "TEST_DEAD_URL"
"""
)


def payments(requested: int, succeeded: int) -> list[dict[str, Any]]:
    return payment_batch(requested, succeeded, "hist", SENT)


def send(gw: Gateway, batch: list[dict[str, Any]]) -> None:
    with gw.client(MALL_SERVER_KEY) as c:
        r = c.post("/v1/batch", json={"batch": batch})
    assert r.status_code == 200, r.text


def history(gw: Gateway, token: str = COMPLIANCE_TOKEN, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{gw.url}/admin/alerts/history",
        params={"tenant": "mall", **params},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_firings_resolutions_and_failed_channels_are_recorded(tmp_path: Path) -> None:
    hook = RobotReceiver()
    clock = tmp_path / "clock"
    env = fast_alert_env(
        clock,
        TEST_HOOK_URL=hook.url,
        TEST_DEAD_URL=f"http://127.0.0.1:{free_port()}/hook",  # nothing listens
    )
    gw = make_gateway(tmp_path / "gw", config=CONFIG, extra_env=env).start()
    try:
        clock.write_text(str(int(time.time()) + 0.5))  # one bucket, standing still
        assert history(gw).json() == {"tenant": "mall", "records": []}
        send(gw, payments(20, 14))  # 70 % < 90 %
        (fired,) = wait_until(lambda: history(gw).json()["records"], what="the firing record")
        assert fired["status"] == "firing" and fired["notified"] and fired["severity"] == "critical"
        assert fired["value"] == 0.7 and fired["volume"] == 20 and fired["compare"] == "previous"
        # the live channel on the first attempt; the dead one retried (0.5 s, 1 s), then failed
        assert fired["deliveries"] == [
            {"channel": "oncall-hook", "kind": "webhook", "delivered": True, "attempts": 1, "error": None},
            {
                "channel": "dead-hook",
                "kind": "webhook",
                "delivered": False,
                "attempts": 3,
                "error": "ConnectError",
            },
        ]
        assert len(hook.posts) == 1

        send(gw, payments(40, 40))  # 54 / 60 = 90 %: no longer below
        records = wait_until(
            lambda: r if len(r := history(gw).json()["records"]) == 2 else None, what="the resolved record"
        )
        assert [r["status"] for r in records] == ["resolved", "firing"]  # newest first
        assert records[0]["value"] == 0.9 and records[0]["deliveries"][0]["delivered"]
        # the operator reads it too; one rule, a limit
        by_operator = history(gw, OPERATOR_TOKEN, rule="payment-success-low", limit=1)
        assert by_operator.status_code == 200 and [r["status"] for r in by_operator.json()["records"]] == [
            "resolved"
        ]
        bad = history(gw, rule="nope")
        assert bad.status_code == 400 and bad.json()["field"] == "rule"
        assert history(gw, limit=0).status_code == 400
        assert history(gw, "not-a-token").status_code == 401
        stranger = httpx.get(
            f"{gw.url}/admin/alerts/history",
            params={"tenant": "nobody"},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        assert stranger.status_code == 400 and stranger.json()["field"] == "tenant"

        # the CLI reads the same store (the data directory's alerts.sqlite3)
        cli_env = clean_env(IDGATE_ENV="dev", IDGATE_DATA_DIR=str(gw.data_dir))
        args = ("alerts", "history", "--tenant", "mall", "--config", str(gw.config_path))
        listed = idgate(*args, env=cli_env)
        assert listed.returncode == 0, listed.stderr
        resolved_line, firing_line = listed.stdout.splitlines()
        assert "payment-success-low  RESOLVED  payment_success_rate=0.9 " in resolved_line
        assert (
            "FIRING" in firing_line
            and "oncall-hook:ok dead-hook:FAILED(ConnectError, 3 attempts)" in firing_line
        )
        as_json = idgate(*args, "--json", "--limit", "1", env=cli_env)
        assert [json.loads(x)["status"] for x in as_json.stdout.splitlines()] == ["resolved"]
        unknown = idgate(*args, "--rule", "nope", env=cli_env)
        assert unknown.returncode == 2 and "no alert rule 'nope'" in unknown.stderr

        seen = history(gw).text + listed.stdout + str(hook.posts) + gw.log_text()
        assert not [a for a in SENT if a in seen]
    finally:
        gw.stop()
        hook.close()
