"""Alert rules over real HTTP: a payment success rate drop notifies DingTalk, Feishu and an
SMTP server exactly once from two replicas sharing Redis; the other replica takes over the
evaluation when the lease holder dies, and sends the resolved notification; the alert
history (in Redis) lists both, with their channels."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from identity.pseudonym import pseudonymise_identifier
from tests.conftest import (
    MALL_SERVER_KEY,
    OPERATOR_TOKEN,
    Gateway,
    RedisNamespace,
    make_gateway,
)
from tests.monitoring.conftest import (
    DINGTALK_SECRET,
    FEISHU_SECRET,
    Mailbox,
    RobotReceiver,
    alert_config,
    fast_alert_env,
    kpi_answer,
    payment_batch,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
SENT_IDS: list[str] = []  # every anonymousId sent: canaries for the notifications


def payments(requested: int, succeeded: int) -> list[dict[str, Any]]:
    return payment_batch(requested, succeeded, "pay", SENT_IDS)


def send(gw: Gateway, batch: list[dict[str, Any]]) -> None:
    with gw.client(MALL_SERVER_KEY) as c:
        r = c.post("/v1/batch", json={"batch": batch})
    # "Payment Succeeded" is analytics in the mall's plan: without consent it is not stored,
    # yet the payment KPIs count it on the contract basis (necessary_service)
    assert r.status_code == 200 and r.json()["received"] == len(batch) and not r.json()["rejected"], r.text


def state(gw: Gateway) -> dict[str, Any]:
    window, body = kpi_answer(gw, "payment_success_rate", 5)
    (alert,) = body["alerts"]
    return {
        "window": window,
        "alert": alert,
        "replica": body["replica"],
        "evaluator": body["evaluator"],
    }


def history(gw: Gateway) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.url}/admin/alerts/history", params={"tenant": "mall"}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()["records"]
    return records


def test_a_payment_success_drop_notifies_once_and_survives_the_evaluator(
    tmp_path: Path,
    redis_ns: RedisNamespace,
    robots: tuple[RobotReceiver, RobotReceiver],
    smtp: tuple[Mailbox, int],
) -> None:
    ding, feishu = robots
    mailbox, smtp_port = smtp
    env = fast_alert_env(
        **redis_ns.env(),
        TEST_DINGTALK_URL=ding.url,
        TEST_DINGTALK_SECRET=DINGTALK_SECRET,
        TEST_FEISHU_URL=feishu.url,
        TEST_FEISHU_SECRET=FEISHU_SECRET,
    )
    config = alert_config(smtp_port)
    gateways = [make_gateway(tmp_path / n, config=config, extra_env=env).start() for n in ("one", "two")]
    one, two = gateways
    try:
        send(one, payments(20, 19))  # a steady 95 %
        # once the steady minute has slid into the window before, the drop comes: 70 %
        wait_until(
            lambda: (s := state(two)["window"])["counted"] == 0 and s["previous"] == 0.95,
            timeout=15,
            what="the steady window before the current one",
        )
        send(two, payments(20, 14))
        wait_until(
            lambda: len(ding.posts) and len(feishu.posts) and mailbox.messages,
            what="the firing notifications",
        )
        firing = state(one)["alert"]
        assert firing["state"] == "firing" and firing["value"] == 0.7 and firing["previous"] == 0.95
        # many evaluations later, by whichever replica: still one notification per channel
        wait_until(
            lambda: state(one)["alert"]["evaluations"] >= firing["evaluations"] + 10,
            what="ten more evaluations",
        )
        assert len(ding.posts) == 1 and len(feishu.posts) == 1 and len(mailbox.messages) == 1
        assert state(two)["alert"]["notifications"] == 3

        # DingTalk: the signature over timestamp + secret checks out; so does Feishu's
        query, body = ding.posts[0]
        ts = query["timestamp"][0]
        expected = base64.b64encode(
            hmac.new(DINGTALK_SECRET.encode(), f"{ts}\n{DINGTALK_SECRET}".encode(), hashlib.sha256).digest()
        ).decode()
        assert query["sign"] == [expected] and query["access_token"] == ["t0k3n"]
        assert (
            body["msgtype"] == "markdown"
            and "[FIRING] mall/payment-success-drop" in body["markdown"]["title"]
        )
        _, fbody = feishu.posts[0]
        fts = fbody["timestamp"]
        key = f"{fts}\n{FEISHU_SECRET}".encode()
        assert fbody["sign"] == base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
        assert "payment_success_rate: 0.7 (window before: 0.95), 20 events" in fbody["content"]["text"]
        mail = mailbox.messages[0]
        assert (
            mail["Subject"].startswith("[FIRING] mall/payment-success-drop")
            and mail["To"] == "oncall@shop.example"
        )

        # the lease holder dies: the other replica takes over, and resolves when it recovers
        holder = state(one)["evaluator"]
        dead, survivor = (one, two) if state(one)["replica"] == holder else (two, one)
        assert state(survivor)["replica"] != holder
        dead.kill9()
        wait_until(
            lambda: state(survivor)["evaluator"] == state(survivor)["replica"],
            timeout=10,
            what="the surviving replica holding the lease",
        )
        send(survivor, payments(20, 19))
        wait_until(
            lambda: len(ding.posts) == 2 and len(mailbox.messages) == 2, what="the resolved notifications"
        )
        assert "[RESOLVED] mall/payment-success-drop" in ding.posts[1][1]["markdown"]["title"]
        assert sum("[FIRING]" in t for t in ding.texts() + feishu.texts()) == 2  # one per robot
        assert state(survivor)["alert"]["state"] == "ok"
        # the history is shared: the firing (recorded by whichever replica evaluated then)
        # and the resolution, each notified on the three channels
        records = wait_until(
            lambda: r if len(r := history(survivor)) == 2 else None, what="two alert history records"
        )
        assert [r["status"] for r in records] == ["resolved", "firing"]
        for r in records:
            assert r["notified"] and [(d["channel"], d["delivered"]) for d in r["deliveries"]] == [
                ("oncall-dingtalk", True),
                ("oncall-feishu", True),
                ("oncall-mail", True),
            ]
        assert records[1]["value"] == 0.7 and records[1]["compared"] == 0.95

        # no identifier, raw or pseudonymous, in any notification or alert state
        pseudonymiser = survivor.keyring().pseudonymiser("mall")
        canaries = set(SENT_IDS) | {
            pseudonymise_identifier(pseudonymiser, "anonymous_id", x).value for x in SENT_IDS
        }
        sent = json.dumps([ding.posts, feishu.posts]) + "".join(m.as_string() for m in mailbox.messages)
        sent += json.dumps(state(survivor)) + httpx.get(f"{survivor.url}/metrics").text
        sent += json.dumps(history(survivor))
        assert not [c for c in canaries if c in sent]
    finally:
        for gw in gateways:
            gw.stop()
