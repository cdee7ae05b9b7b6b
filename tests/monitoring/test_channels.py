"""The notification channels' message formats, against local receivers and a real SMTP
server; a channel that keeps failing is reported, not raised."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from export.alert_history import ChannelDelivery
from export.alerts import AlertChannel, AlertRule, Notice, Notifier, missing_secrets
from gateway.config import ConfigProblems, parse_config
from tests.conftest import TEST_CONFIG, free_port
from tests.monitoring.conftest import Mailbox, RobotReceiver

RULE = AlertRule(id="gmv-low", kpi="gmv", window=5, condition="below", threshold=1000, severity="critical")
NOTICE = Notice("mall", RULE, "firing", 420.0, 1800.0, 37, 5)


def test_wecom_and_webhook_messages() -> None:
    wecom, hook = RobotReceiver(), RobotReceiver()
    try:
        notifier = Notifier(
            [
                AlertChannel(id="wc", kind="wecom", url_env="WC"),
                AlertChannel(id="wh", kind="webhook", url_env="WH"),
            ],
            env={"WC": wecom.url, "WH": hook.url},
        )

        async def run() -> list[bool]:
            return [(await notifier.send(c, NOTICE)).delivered for c in ("wc", "wh")]

        assert asyncio.run(run()) == [True, True]
        (_, body), (_, payload) = wecom.posts[0], hook.posts[0]
        assert body["msgtype"] == "markdown"
        assert body["markdown"]["content"].startswith("[FIRING] mall/gmv-low (critical)")
        assert "gmv: 420 (window before: 1800), 37 events" in body["markdown"]["content"]
        assert {
            k: payload[k] for k in ("tenant", "rule", "kpi", "status", "value", "previous", "volume")
        } == {
            "tenant": "mall",
            "rule": "gmv-low",
            "kpi": "gmv",
            "status": "firing",
            "value": 420.0,
            "previous": 1800.0,
            "volume": 37,
        }
    finally:
        wecom.close()
        hook.close()


def test_email_and_a_failing_channel() -> None:
    from aiosmtpd.controller import Controller

    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        dead = free_port()  # nothing listens there
        notifier = Notifier(
            [
                AlertChannel(
                    id="mail",
                    kind="email",
                    smtp_host="127.0.0.1",
                    smtp_port=port,
                    sender="idgate@mall.example",
                    recipients=["a@mall.example", "b@mall.example"],
                ),
                AlertChannel(id="gone", kind="webhook", url_env="GONE"),
            ],
            env={"GONE": f"http://127.0.0.1:{dead}/hook"},
            attempts=2,
        )

        async def run() -> list[ChannelDelivery]:
            return [await notifier.send("mail", NOTICE), await notifier.send("gone", NOTICE)]

        mailed, gone = asyncio.run(run())
        assert mailed == ChannelDelivery("mail", "email", True, 1)
        # retried, then reported with the failure's class (never its message)
        assert gone == ChannelDelivery("gone", "webhook", False, 2, "ConnectError")
        (mail,) = box.messages
        assert mail["To"] == "a@mall.example, b@mall.example"
        assert mail["Subject"] == "[FIRING] mall/gmv-low (critical)"
        assert "dashboard: /admin/kpis?tenant=mall&kpi=gmv" in mail.get_payload()
    finally:
        controller.stop()


SMS_TEMPLATE: dict[str, Any] = {
    "PhoneNumbers": "$recipients",
    "PhoneNumberSet": "$recipient_list",
    "TemplateParam": {"text": "$message"},
    "price": "$$0.05",
}


def test_sms_through_a_provider_template(tmp_path: Path) -> None:
    provider = RobotReceiver()
    secret_file = tmp_path / "sms-secret"
    secret_file.write_text("file-secret-123\n")
    secret_file.chmod(0o600)
    try:
        notifier = Notifier(
            [
                AlertChannel(
                    id="sms-json",
                    kind="sms",
                    url_env="SMS_URL",
                    secret_env="SMS_KEY",
                    headers={"Authorization": "Bearer $secret", "X-Provider": "test"},
                    body=SMS_TEMPLATE,
                    recipients=["+8613800000001", "+8613800000002"],
                ),
                AlertChannel(
                    id="sms-form",
                    kind="sms",
                    url_env="SMS_URL",
                    secret_file=str(secret_file),
                    method="PUT",
                    body={"to": "$recipients", "msg": "$message", "key": "$secret"},
                    body_format="form",
                    recipients=["+8613800000003"],
                ),
                AlertChannel(
                    id="sms-get",
                    kind="sms",
                    url_env="SMS_URL",
                    method="GET",
                    body={"to": "$recipient_list", "msg": "$message"},
                    recipients=["+8613800000004"],
                ),
            ],
            env={"SMS_URL": provider.url, "SMS_KEY": "env-secret-456"},
        )

        async def run() -> list[ChannelDelivery]:
            return [await notifier.send(c, NOTICE) for c in ("sms-json", "sms-form", "sms-get")]

        assert all(d.delivered for d in asyncio.run(run()))
        (m1, path1, h1, raw1), (m2, _, h2, raw2), (m3, path3, _, _) = provider.requests
        text = "[FIRING] mall/gmv-low (critical): gmv 420 (window before: 1800) over 5 min"
        assert m1 == "POST" and h1["Authorization"] == "Bearer env-secret-456" and h1["X-Provider"] == "test"
        assert path1 == "/robot/send?access_token=t0k3n"
        assert json.loads(raw1) == {
            "PhoneNumbers": "+8613800000001,+8613800000002",
            "PhoneNumberSet": ["+8613800000001", "+8613800000002"],
            "TemplateParam": {"text": text},
            "price": "$0.05",
        }
        assert m2 == "PUT" and h2["Content-Type"] == "application/x-www-form-urlencoded"
        assert urllib.parse.parse_qs(raw2.decode()) == {
            "to": ["+8613800000003"],
            "msg": [text],
            "key": ["file-secret-123"],
        }
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path3).query)
        assert m3 == "GET" and query["to"] == ['["+8613800000004"]'] and query["msg"] == [text]
    finally:
        provider.close()


def test_bad_sms_channels_are_named(tmp_path: Path) -> None:
    bad = (
        TEST_CONFIG
        + """
[[alert_channels]]
id = "sms"
kind = "sms"
url_env = "SMS_URL"
headers = { Authorization = "Bearer $secret" }
body = { to = "$phone", text = "$message", cost = "5$" }

[[alert_channels]]
id = "both"
kind = "sms"
url_env = "SMS_URL"
secret_env = "K"
secret_file = "/k"
recipients = ["+8613800000001"]
body = { text = "$message" }

[[alert_channels]]
id = "hook"
kind = "webhook"
url_env = "HOOK"
body = { text = "$message" }
"""
    )
    with pytest.raises(ConfigProblems) as err:
        parse_config(bad, dev=True)
    assert err.value.problems == [
        "alert_channels[0].recipients: an sms channel needs the numbers to text",
        "alert_channels[0]: unknown placeholder(s) phone in '$phone' "
        "(known: message, recipient_list, recipients, secret)",
        "alert_channels[0]: bad placeholder in '5$' (write $$ for a dollar sign)",
        "alert_channels[0]: $secret needs secret_env or secret_file",
        "alert_channels[1]: secret_env or secret_file, not both",
        "alert_channels[2]: secret_file, headers and body are for an sms channel",
    ]
    # the secret file: readable by its owner only, present and not empty, or no start
    secret = tmp_path / "secret"
    channel = AlertChannel(
        id="sms", kind="sms", url_env="U", secret_file=str(secret), body={"t": "$message"}, recipients=["1"]
    )
    assert missing_secrets([channel], {"U": "http://x"}) == [
        f"alert_channels 'sms': secret_file {secret} cannot be read: No such file or directory"
    ]
    secret.write_text("s3cr3t")
    secret.chmod(0o644)
    (problem,) = missing_secrets([channel], {"U": "http://x"})
    assert "other users can read or change it" in problem and "s3cr3t" not in problem
    secret.chmod(0o600)
    assert missing_secrets([channel], {"U": "http://x"}) == []
