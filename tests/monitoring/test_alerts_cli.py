"""``idgate alerts test RULE``: one test notification per channel of the rule (robots, e-mail,
an SMS provider's HTTP template)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import clean_env, idgate
from tests.conftest import TEST_CONFIG
from tests.monitoring.conftest import DINGTALK_SECRET, FEISHU_SECRET, Mailbox, RobotReceiver, alert_config
from tests.waiting import wait_until


def test_a_test_notification_reaches_every_channel(
    tmp_path: Path, robots: tuple[RobotReceiver, RobotReceiver], smtp: tuple[Mailbox, int]
) -> None:
    ding, feishu = robots
    mailbox, port = smtp
    config = tmp_path / "idgate.toml"
    config.write_text(alert_config(port))
    secrets = {
        "TEST_DINGTALK_URL": ding.url,
        "TEST_DINGTALK_SECRET": DINGTALK_SECRET,
        "TEST_FEISHU_URL": feishu.url,
        "TEST_FEISHU_SECRET": FEISHU_SECRET,
    }
    args = ("alerts", "test", "payment-success-drop", "--tenant", "mall", "--config", str(config))
    done = idgate(*args, env=clean_env(IDGATE_ENV="dev", **secrets))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "oncall-dingtalk (dingtalk): sent",
        "oncall-feishu (feishu): sent",
        "oncall-mail (email): sent",
    ]
    assert ding.posts[0][1]["markdown"]["title"].startswith("[TEST] mall/payment-success-drop")
    assert feishu.posts[0][1]["content"]["text"].startswith("[TEST] mall/payment-success-drop")
    wait_until(lambda: mailbox.messages, what="the test e-mail")
    missing = idgate(*args, env=clean_env(IDGATE_ENV="dev", TEST_DINGTALK_URL=ding.url))
    assert missing.returncode == 2 and "secret_env TEST_DINGTALK_SECRET is not set" in missing.stderr
    unknown = idgate(
        "alerts", "test", "nope", "--tenant", "mall", "--config", str(config), env=clean_env(IDGATE_ENV="dev")
    )
    assert unknown.returncode == 2 and "no alert rule 'nope'" in unknown.stderr


def test_a_test_sms_through_the_provider_template(tmp_path: Path) -> None:
    provider = RobotReceiver()
    secret = tmp_path / "sms-secret"
    secret.write_text("provider-secret-789")
    secret.chmod(0o600)
    config = tmp_path / "idgate.toml"
    config.write_text(
        TEST_CONFIG
        + f"""
[[tenants.alerts]]
id = "payment-success-drop"
kpi = "payment_success_rate"
condition = "drop"
threshold = 0.2
channels = ["oncall-sms"]

[[alert_channels]]
id = "oncall-sms"
kind = "sms"
url_env = "TEST_SMS_URL"
secret_file = "{secret}"
headers = {{ "X-Api-Key" = "$secret" }}
body = {{ mobiles = "$recipient_list", content = "$message" }}
recipients = ["+8613800000009"]
"""
    )
    try:
        args = ("alerts", "test", "payment-success-drop", "--tenant", "mall", "--config", str(config))
        done = idgate(*args, env=clean_env(IDGATE_ENV="dev", TEST_SMS_URL=provider.url))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["oncall-sms (sms): sent"]
        ((method, _, headers, raw),) = provider.requests
        assert method == "POST" and headers["X-Api-Key"] == "provider-secret-789"
        body = json.loads(raw)
        assert body["mobiles"] == ["+8613800000009"]
        assert body["content"].startswith("[TEST] mall/payment-success-drop (warning): payment_success_rate")
        assert "provider-secret-789" not in done.stdout + done.stderr
    finally:
        provider.close()
