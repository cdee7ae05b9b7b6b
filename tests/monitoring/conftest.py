"""Receivers for the alert tests: DingTalk/Feishu-like robots, a real SMTP server
(aiosmtpd), and a config with the seed's alert rule notifying them."""

from __future__ import annotations

import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from tests.conftest import OPERATOR_TOKEN, TEST_CONFIG, Gateway, free_port, mid

DINGTALK_SECRET = "SEC-dingtalk-test-secret"
FEISHU_SECRET = "feishu-test-secret"


class RobotReceiver:
    """A DingTalk / Feishu robot (or webhook, or SMS provider) endpoint: records each POST
    with its query and JSON body, and every request (method, path, headers, raw body)."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, list[str]], dict[str, Any]]] = []
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.do_POST()

            def do_PUT(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.command, self.path, dict(self.headers), raw))
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.headers.get("Content-Type") == "application/json":
                    receiver.posts.append((query, json.loads(raw)))
                reply = b'{"errcode":0,"code":0}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/robot/send?access_token=t0k3n"

    def texts(self) -> list[str]:
        out = []
        for _, body in self.posts:
            out.append(body.get("markdown", {}).get("text") or body.get("content", {}).get("text", ""))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def robots() -> Iterator[tuple[RobotReceiver, RobotReceiver]]:
    ding, feishu = RobotReceiver(), RobotReceiver()
    yield ding, feishu
    ding.close()
    feishu.close()


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


def fast_alert_env(clock: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for alert tests on compressed time: one-second KPI buckets, rules
    evaluated every 200 ms and, with ``clock``, the dev clock file the test moves."""
    env = {"IDGATE_KPI_BUCKET_MS": "1000", "IDGATE_ALERT_INTERVAL_MS": "200", **extra}
    if clock is not None:
        env["IDGATE_DEV_CLOCK_FILE"] = str(clock)
    return env


def alert_config(smtp_port: int) -> str:
    return (
        TEST_CONFIG
        + f"""
[[tenants.alerts]]
id = "payment-success-drop"
kpi = "payment_success_rate"
window = 5
condition = "drop"
threshold = 0.2
min_volume = 10
severity = "critical"
channels = ["oncall-dingtalk", "oncall-feishu", "oncall-mail"]
description = "payment success rate fell by 20 % within the window"

[[alert_channels]]
id = "oncall-dingtalk"
kind = "dingtalk"
url_env = "TEST_DINGTALK_URL"
secret_env = "TEST_DINGTALK_SECRET"

[[alert_channels]]
id = "oncall-feishu"
kind = "feishu"
url_env = "TEST_FEISHU_URL"
secret_env = "TEST_FEISHU_SECRET"

[[alert_channels]]
id = "oncall-mail"
kind = "email"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
sender = "idgate@shop.example"
recipients = ["oncall@shop.example"]
"""
    )


def payment_batch(requested: int, succeeded: int, prefix: str, sent: list[str]) -> list[dict[str, Any]]:
    """A Segment batch: ``requested`` people request a payment, the first ``succeeded`` of them
    succeed; each person's anonymousId (``prefix``-...) is appended to ``sent`` (canaries)."""
    batch = []
    for i in range(requested):
        anon = f"{prefix}-{uuid.uuid4().hex[:10]}"
        sent.append(anon)
        batch.append({"type": "track", "anonymousId": anon, "event": "Payment Requested", "messageId": mid()})
        if i < succeeded:
            batch.append(
                {"type": "track", "anonymousId": anon, "event": "Payment Succeeded", "messageId": mid()}
            )
    return batch


def kpi_answer(gw: Gateway, kpi: str, buckets: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``GET /admin/kpis`` for one KPI of the mall (operator token): its total over the
    window of ``buckets`` one-second buckets, and the whole answer (alerts, replicas)."""
    r = httpx.get(
        f"{gw.url}/admin/kpis",
        params={"tenant": "mall", "kpi": kpi},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    (answer,) = body["kpis"]
    window = next(w for w in answer["windows"] if round(w["minutes"] * 60) == buckets)
    return window["total"], body
