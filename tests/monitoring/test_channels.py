"""The notification channels' message formats, against local receivers and a real SMTP
server; a channel that keeps failing is reported, not raised."""

from __future__ import annotations

import asyncio

from export.alert_history import ChannelDelivery
from export.alerts import AlertChannel, AlertRule, Notice, Notifier
from tests.conftest import free_port
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
