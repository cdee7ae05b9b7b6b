"""Data-subject rights requests over real HTTP against a real `idgate serve` (issue 13):
intake with identity verification (refusals recorded), the ledger trail, the clock in the
listing and in /metrics, and what ``withdraw_all`` does to the person's next events."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import (
    COMPLIANCE_TOKEN,
    IDGATE,
    MALL_APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    TEST_CONFIG,
    Gateway,
    assertion,
    backend_env,
    free_port,
    make_gateway,
    mid,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
LINKING = ["analytics", "identity_linking"]
VERIFIED = {"method": "account_login", "outcome": "verified", "reference": "CASE-2026-001"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("rights")).start()
    yield g
    g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def bearer(token: str = COMPLIANCE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def open_request(gw: Gateway, token: str = COMPLIANCE_TOKEN, **body: Any) -> httpx.Response:
    body.setdefault("tenant", "mall")
    body.setdefault("requestedBy", "subject")
    body.setdefault("channel", "app")
    body.setdefault("verification", VERIFIED)
    return httpx.post(f"{gw.url}/admin/rights", json=body, headers=bearer(token), timeout=30)


def ledger_records(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{gw.url}/admin/consent/records", params={"tenant": "mall", **params}, headers=bearer(), timeout=10
    )
    assert r.status_code == 200, r.text
    return list(r.json()["records"])


def send(gw: Gateway, key: str, kind: str, **body: Any) -> dict[str, Any]:
    body.setdefault("messageId", mid())
    r = httpx.post(f"{gw.url}/v1/{kind}", auth=(key, ""), json=body, timeout=10)
    assert r.status_code == 200, r.text
    return {"messageId": body["messageId"], **r.json()}


def login(gw: Gateway, key: str, user: str, device: str) -> None:
    """After login the shop's backend signs an assertion binding the user to the device; the
    SDK records consent (analytics, linking) and identifies with it."""
    token = assertion(user, device)
    r = httpx.post(
        f"{gw.url}/v1/consent",
        auth=(key, ""),
        json={
            "anonymousId": device,
            "userId": user,
            "grant": LINKING,
            "noticeId": "notice-v1",
            "identityAssertion": token,
        },
        timeout=10,
    )
    assert r.status_code == 200 and "refused" not in r.json(), r.text
    ident = send(gw, key, "identify", anonymousId=device, userId=user, context={"identityAssertion": token})
    assert ident["accepted"] == 1 and "refusedAssertions" not in ident, ident
    wait_until(
        lambda: [e for e in gw.sink_lines("mall-warehouse") if e["messageId"] == ident["messageId"]],
        20,
        what="the identify at mall-warehouse",
    )


def test_an_operator_cannot_open_or_list_rights_requests(gw: Gateway) -> None:
    r = open_request(gw, OPERATOR_TOKEN, kind="access", subject={"type": "user_id", "id": "u-op"})
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "forbidden"
    r = httpx.get(f"{gw.url}/admin/rights", params={"tenant": "mall"}, headers=bearer(OPERATOR_TOKEN))
    assert r.status_code == 403, r.text
    r = httpx.get(f"{gw.url}/admin/rights", params={"tenant": "mall"})
    assert r.status_code == 401, r.text


def test_an_access_request_is_opened_with_its_due_date_in_the_ledger(gw: Gateway) -> None:
    user = f"rights-user-{tag()}"
    r = open_request(gw, kind="access", subject={"type": "user_id", "id": user}, channel="email")
    assert r.status_code == 201, r.text
    request = r.json()
    assert request["status"] == "open" and request["kind"] == "access" and request["clock"] == "on_time"
    assert request["subject"].startswith("user_id:") and user not in r.text
    received = datetime.fromisoformat(request["receivedAt"])
    due = datetime.fromisoformat(request["dueAt"])
    assert timedelta(days=15) < due - received < timedelta(days=40)  # 15 working days
    # the request is a ledger record, found by the subject's raw identifier like any other
    (record,) = [x for x in ledger_records(gw, identifier=user) if x["type"] == "rights_request"]
    assert record["seq"] == request["records"][0] and record["state"] == "requested"
    assert record["detail"]["request_id"] == request["requestId"]
    # answered by the officer: completion time and duration recorded
    done = httpx.post(
        f"{gw.url}/admin/rights/{request['requestId']}/complete",
        json={"tenant": "mall", "outcome": "done"},
        headers=bearer(),
    )
    assert done.status_code == 200, done.text
    answered = done.json()
    assert answered["status"] == "completed" and answered["clock"] == "closed"
    assert answered["secondsToComplete"] >= 0 and answered["workingDaysToComplete"] == 0
    again = httpx.post(
        f"{gw.url}/admin/rights/{request['requestId']}/complete",
        json={"tenant": "mall", "outcome": "done"},
        headers=bearer(),
    )
    assert again.status_code == 409 and again.json()["field"] == "requestId", again.text
    states = [x["state"] for x in ledger_records(gw, identifier=user) if x["type"] == "rights_request"]
    assert states == ["requested", "completed"]


def test_an_unverifiable_request_is_refused_and_recorded_with_its_reason(gw: Gateway) -> None:
    user = f"rights-unverified-{tag()}"
    r = open_request(
        gw,
        kind="delete",
        subject={"type": "user_id", "id": user},
        channel="phone",
        verification={"method": "sms_code", "outcome": "failed"},
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "unverified_request" and body["field"] == "verification"
    assert "sms_code check failed" in body["detail"]
    (record,) = [x for x in ledger_records(gw, identifier=user) if x["type"] == "rights_request"]
    assert record["state"] == "refused"
    assert record["detail"]["reason"] == "identity_not_verified: sms_code check failed"
    listed = httpx.get(
        f"{gw.url}/admin/rights", params={"tenant": "mall", "status": "refused"}, headers=bearer()
    )
    assert any(x["records"] == [record["seq"]] for x in listed.json()["requests"]), listed.text
    # nothing was done for it: no withdrawal recorded
    assert not [x for x in ledger_records(gw, identifier=user) if x["type"] == "consent"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "erase_everything", "subject": {"type": "user_id", "id": "x"}}, "kind"),
        ({"kind": "access", "subject": {"type": "shoe_size", "id": "x"}}, "subject.type"),
        ({"kind": "access", "subject": {"type": "user_id", "id": "null"}}, "subject.id"),
        ({"kind": "access", "subject": {"type": "user_id", "id": "x"}, "channel": "pigeon"}, "channel"),
        (
            {
                "kind": "access",
                "subject": {"type": "user_id", "id": "x"},
                "verification": {
                    "method": "sms_code",
                    "outcome": "verified",
                    "reference": "13912345678 Zhang",
                },
            },
            "verification.reference",
        ),
        (
            {
                "kind": "access",
                "subject": {"type": "user_id", "id": "x"},
                "receivedAt": "2999-01-01T00:00:00Z",
            },
            "receivedAt",
        ),
        ({"kind": "correct", "subject": {"type": "phone", "id": "13912345678"}}, "correction"),
        (
            {
                "kind": "access",
                "subject": {"type": "user_id", "id": "x"},
                "correction": {"type": "user_id", "id": "y"},
            },
            "correction",
        ),
        (
            {
                "kind": "correct",
                "subject": {"type": "phone", "id": "13912345678"},
                "correction": {"type": "phone", "id": "12"},
            },
            "correction.id",
        ),
        (
            {
                "kind": "correct",
                "subject": {"type": "phone", "id": "13912345678"},
                "correction": {"type": "phone", "id": "+8613912345678"},
            },
            "correction",
        ),
        (
            {
                "kind": "access",
                "subject": {"type": "user_id", "id": "x"},
                "verification": {"method": "sms_code", "outcome": "verified", "reference": "13912345678"},
            },
            "verification.reference",
        ),
    ],
)
def test_malformed_requests_are_400_naming_the_field(gw: Gateway, body: dict[str, Any], field: str) -> None:
    r = open_request(gw, **body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.text


def test_overdue_requests_show_in_the_listing_and_in_metrics(gw: Gateway) -> None:
    user = f"rights-late-{tag()}"
    # a letter received 40 days ago, logged only now: past 15 working days whatever the holidays
    received = (datetime.now(UTC) - timedelta(days=40)).isoformat()
    r = open_request(
        gw, kind="access", subject={"type": "user_id", "id": user}, channel="letter", receivedAt=received
    )
    assert r.status_code == 201, r.text
    assert r.json()["clock"] == "overdue" and r.json()["workingDaysLeft"] < 0
    # an officer may move the due date, with a reason; the old one stays in the ledger
    late = httpx.post(
        f"{gw.url}/admin/rights/{r.json()['requestId']}/extend",
        json={"tenant": "mall", "workingDays": 15, "reason": "free text with 13912345678"},
        headers=bearer(),
    )
    assert late.status_code == 400 and late.json()["field"] == "reason", late.text
    listed = httpx.get(
        f"{gw.url}/admin/rights", params={"tenant": "mall", "clock": "overdue"}, headers=bearer()
    )
    assert listed.status_code == 200, listed.text
    assert listed.json()["overdue"] >= 1
    assert r.json()["requestId"] in {x["requestId"] for x in listed.json()["requests"]}
    metrics = httpx.get(f"{gw.url}/metrics").text
    (line,) = [
        m
        for m in metrics.splitlines()
        if m.startswith('idgate_rights_requests_open{clock="overdue",kind="access",tenant="mall"}')
    ]
    assert float(line.split()[-1]) >= 1
    # and in the CLI listing, which exits 1 while any request is overdue (extended below)
    env = {**gw.env, "IDGATE_DATA_DIR": str(gw.data_dir)}
    args = [str(IDGATE), "rights", "list", "--tenant", "mall", "--config", str(gw.config_path)]
    table = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 1, table.stderr
    (row,) = [x for x in table.stdout.splitlines() if x.startswith(r.json()["requestId"])]
    assert " access " in row and " overdue (-" in row, row
    assert "overdue" in table.stderr and user not in table.stdout
    as_json = subprocess.run([*args, "--json", "--clock", "overdue"], env=env, capture_output=True, text=True)
    listed_ids = {json.loads(x)["requestId"] for x in as_json.stdout.splitlines()}
    assert r.json()["requestId"] in listed_ids
    moved = httpx.post(
        f"{gw.url}/admin/rights/{r.json()['requestId']}/extend",
        json={"tenant": "mall", "workingDays": 30, "reason": "awaiting_subject"},
        headers=bearer(),
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["dueAt"] > r.json()["dueAt"] and moved.json()["clock"] != "overdue"
    assert moved.json()["steps"][-1]["previous_due_at"].startswith(r.json()["dueAt"][:10])


def pause_and_resume_on_the_real_clock(g: Gateway, replica: Gateway | None = None) -> None:
    """A request already past its due date (a letter received 40 days ago), paused: it is not
    overdue in the API, the listing, ``/metrics`` or the CLI, and its working days left stand
    still; resumed, it is late by as many working days as when it was paused (the days paused
    moved its due date). With ``replica``, both replicas pause it at the same moment: one
    pause is recorded, the other officer is told 409. (The fake clock's arithmetic:
    tests/consent/test_rights_pause.py.)"""
    user = f"rights-pause-{tag()}"
    received = (datetime.now(UTC) - timedelta(days=40)).isoformat()
    r = open_request(
        g, kind="access", subject={"type": "user_id", "id": user}, channel="letter", receivedAt=received
    )
    assert r.status_code == 201 and r.json()["clock"] == "overdue", r.text
    rid = r.json()["requestId"]

    def act(on: Gateway, action: str, **body: Any) -> httpx.Response:
        return httpx.post(
            f"{on.url}/admin/rights/{rid}/{action}",
            json={"tenant": "mall", **body},
            headers=bearer(),
            timeout=30,
        )

    if replica is None:
        paused = act(g, "pause", reason="awaiting_identity_proof")
        assert paused.status_code == 200, paused.text
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            both = list(pool.map(lambda on: act(on, "pause", reason="awaiting_identity_proof"), [g, replica]))
        assert sorted(x.status_code for x in both) == [200, 409], [x.text for x in both]
        (paused,) = [x for x in both if x.status_code == 200]
        (refused,) = [x for x in both if x.status_code == 409]
        assert refused.json()["error"] in ("already_paused", "clock_changed"), refused.text
    assert paused.json()["clock"] == "paused" and paused.json()["status"] == "open", paused.text
    left = paused.json()["workingDaysLeft"]
    assert left < 0 and paused.json()["pauseReason"] == "awaiting_identity_proof"
    twice = act(g, "pause", reason="awaiting_clarification")
    assert twice.status_code == 409 and twice.json()["error"] == "already_paused", twice.text

    overdue = httpx.get(
        f"{g.url}/admin/rights", params={"tenant": "mall", "clock": "overdue"}, headers=bearer()
    )
    assert rid not in {x["requestId"] for x in overdue.json()["requests"]}
    listed = httpx.get(
        f"{g.url}/admin/rights", params={"tenant": "mall", "clock": "paused"}, headers=bearer()
    )
    assert [x["requestId"] for x in listed.json()["requests"]] == [rid] and listed.json()["paused"] == 1
    metrics = httpx.get(f"{g.url}/metrics").text
    (line,) = [
        m
        for m in metrics.splitlines()
        if m.startswith('idgate_rights_requests_open{clock="paused",kind="access",tenant="mall"}')
    ]
    assert float(line.split()[-1]) == 1
    env = {**g.env, "IDGATE_DATA_DIR": str(g.data_dir)}
    args = [str(IDGATE), "rights", "list", "--tenant", "mall", "--config", str(g.config_path)]
    table = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    (row,) = [x for x in table.stdout.splitlines() if x.startswith(rid)]
    assert f" paused ({left} working days left) since " in row and "awaiting_identity_proof" in row, row
    assert " paused" in table.stderr and user not in table.stdout, table.stderr
    as_json = subprocess.run([*args, "--json", "--clock", "paused"], env=env, capture_output=True, text=True)
    assert [json.loads(x)["requestId"] for x in as_json.stdout.splitlines()] == [rid], as_json.stderr

    resumed = act(replica or g, "resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["clock"] == "overdue" and resumed.json()["workingDaysLeft"] == left, resumed.text
    assert act(g, "resume").json()["error"] == "not_paused"
    steps = [
        (x["detail"]["step"], x["source"])
        for x in ledger_records(g, identifier=user)
        if x["type"] == "rights_request" and x["detail"]["event"] == "step"
    ]
    assert steps == [("paused", "admin:dpo"), ("resumed", "admin:dpo")], steps
    assert act(g, "complete", outcome="done").status_code == 200
    closed = act(g, "pause", reason="awaiting_clarification")
    assert closed.status_code == 409 and closed.json()["error"] == "not_open", closed.text


def test_a_paused_clock_is_not_overdue_anywhere_until_resumed(gw: Gateway) -> None:
    pause_and_resume_on_the_real_clock(gw)


@pytest.mark.postgres
@pytest.mark.redis
def test_pausing_the_clock_on_two_postgresql_replicas_at_once_records_one_pause(
    tmp_path: Any, redis_ns: Any
) -> None:
    with ExitStack() as stack:
        env = {**backend_env("postgres", stack), **redis_ns.env()}
        a = make_gateway(tmp_path / "a", extra_env=env).start()
        stack.callback(a.stop)
        b = make_gateway(tmp_path / "b", extra_env=env).start()
        stack.callback(b.stop)
        pause_and_resume_on_the_real_clock(a, replica=b)


def test_due_dates_skip_cn_public_holidays_and_count_make_up_days(gw: Gateway) -> None:
    # received on 30 September 2026 (Shanghai): 1-7 October are the National Day holidays,
    # Saturday 10 October is a make-up working day -> due at the end of Tuesday 27 October
    r = open_request(
        gw,
        kind="access",
        subject={"type": "user_id", "id": f"rights-nd-{tag()}"},
        channel="letter",
        receivedAt="2026-09-30T10:00:00+08:00",
    )
    assert r.status_code == 201, r.text
    assert r.json()["dueAt"] == "2026-10-27T15:59:59.999999Z"


def test_a_tenant_scoped_officer_sees_only_their_tenant(gw: Gateway) -> None:
    other = {"Authorization": "Bearer other-compliance-token"}  # compliance, tenants = ["shop"]
    r = httpx.get(f"{gw.url}/admin/rights", params={"tenant": "mall"}, headers=other)
    assert r.status_code == 403, r.text
    r = httpx.get(f"{gw.url}/admin/rights", headers=other)
    assert r.status_code == 403, r.text  # must name the tenant
    r = httpx.post(
        f"{gw.url}/admin/rights",
        headers=other,
        json={
            "tenant": "mall",
            "kind": "access",
            "subject": {"type": "user_id", "id": "x"},
            "requestedBy": "subject",
            "channel": "app",
            "verification": VERIFIED,
        },
    )
    assert r.status_code == 403, r.text
    r = httpx.get(f"{gw.url}/admin/rights", params={"tenant": "shop"}, headers=other)
    assert r.status_code == 200 and all(x["tenant"] == "shop" for x in r.json()["requests"]), r.text


def test_withdraw_all_stops_the_next_event_from_every_device_of_the_person(gw: Gateway) -> None:
    t = tag()
    user, web_device, app_device = f"rights-wd-{t}", f"web-{t}", f"app-{t}"
    login(gw, MALL_WEB_KEY, user, web_device)
    login(gw, MALL_APP_KEY, user, app_device)
    before = send(gw, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
    assert before["accepted"] == 1, before
    wait_until(  # delivered before the withdrawal (after it, delivery would withhold it)
        lambda: [e for e in gw.sink_lines("mall-warehouse") if e["messageId"] == before["messageId"]],
        20,
        what="the event before the withdrawal at mall-warehouse",
    )

    r = open_request(
        gw, kind="withdraw_all", subject={"type": "user_id", "id": user}, channel="customer_service"
    )
    assert r.status_code == 201, r.text
    request = r.json()
    assert request["status"] == "completed" and request["outcome"] == "done", request
    (step,) = request["steps"]
    assert step["step"] == "withdraw_all" and step["identifiers"] == 3  # the user id and both devices
    assert "analytics" in step["purposes"] and "necessary_service" not in step["purposes"]

    after = [
        send(gw, MALL_WEB_KEY, "track", anonymousId=web_device, event="Product Viewed"),
        send(gw, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed"),
        send(gw, MALL_APP_KEY, "track", anonymousId=app_device, userId=user, event="Product Viewed"),
    ]
    for sent in after:
        assert sent["accepted"] == 0 and sum(sent["dropped"].values()) == 1, sent
    gw.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])
    at_sink = {e["messageId"] for e in gw.sink_lines("mall-warehouse")}
    assert not at_sink & {s["messageId"] for s in after}
    # the withdrawals are ledger records of every identifier of the person, tied to the request
    withdrawals = [
        x for x in ledger_records(gw, identifier=app_device, type="anonymous_id") if x["state"] == "withdrawn"
    ]
    assert withdrawals and all(x["source"] == f"rights:{request['requestId']}" for x in withdrawals)


def test_restrict_locks_processing_for_the_whole_person(gw: Gateway) -> None:
    t = tag()
    user, device = f"rights-rs-{t}", f"web-{t}"
    login(gw, MALL_WEB_KEY, user, device)
    r = open_request(gw, kind="restrict", subject={"type": "anonymous_id", "id": device}, channel="web")
    assert r.status_code == 201, r.text
    request = r.json()
    assert request["status"] == "completed" and request["steps"][0]["step"] == "restrict", request
    assert request["steps"][0]["identifiers"] == 2
    viewed = send(gw, MALL_WEB_KEY, "track", anonymousId=device, event="Product Viewed")
    assert viewed["accepted"] == 0, viewed
    # contract-necessary processing goes on (a payment)
    paid = send(gw, MALL_WEB_KEY, "track", anonymousId=device, event="Payment Requested")
    assert paid["accepted"] == 1, paid


def test_correct_takes_the_wrong_identifier_off_the_person_and_the_right_one_links_next(gw: Gateway) -> None:
    t = tag()
    user, device = f"rights-cor-{t}", f"web-{t}"
    n = int(t[:6], 16) % 10_000_000
    wrong, right = f"139{n:08d}", f"138{n:08d}"

    def identify(phone: str) -> None:
        token = assertion(user, device, ids=[("phone", phone)])
        r = httpx.post(
            f"{gw.url}/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={
                "anonymousId": device,
                "userId": user,
                "grant": LINKING,
                "noticeId": "notice-v1",
                "identityAssertion": token,
            },
        )
        assert r.status_code == 200, r.text
        sent = send(
            gw,
            MALL_WEB_KEY,
            "identify",
            anonymousId=device,
            userId=user,
            traits={"phone": phone},
            context={"identityAssertion": token},
        )
        wait_until(
            lambda: [e for e in gw.sink_lines("mall-warehouse") if e["messageId"] == sent["messageId"]],
            20,
            what="the identify at mall-warehouse",
        )

    def linked(phone: str) -> bool:
        r = httpx.get(
            f"{gw.url}/admin/identity/explain",
            params={"tenant": "mall", "a": user, "a_type": "user_id", "b_type": "phone", "b": phone},
            headers=bearer(COMPLIANCE_TOKEN),  # raw identifiers: the compliance role's look-up
        )
        assert r.status_code == 200, r.text
        return bool(r.json()["linked"])

    identify(wrong)  # the shop's backend had the mistyped phone
    assert linked(wrong)
    r = open_request(
        gw,
        kind="correct",
        subject={"type": "phone", "id": wrong},
        correction={"type": "phone", "id": right},
        channel="customer_service",
    )
    assert r.status_code == 201, r.text
    request = r.json()
    assert request["status"] == "completed" and request["outcome"] == "done", request
    (step,) = request["steps"]
    assert step["step"] == "correct" and step["links_removed"] >= 1
    assert step["wrong"] == request["subject"] and step["corrected"] == request["correction"]
    assert wrong not in r.text and right not in r.text
    assert not linked(wrong)
    identify(right)  # the next login carries the right phone: the normal rules link it
    assert linked(right) and not linked(wrong)


def test_requests_survive_a_restart(tmp_path: Any) -> None:
    g = make_gateway(tmp_path).start()
    try:
        r = open_request(g, kind="access", subject={"type": "phone", "id": "13912345678"})
        assert r.status_code == 201, r.text
        request_id = r.json()["requestId"]
        g.stop()
        g.start()
        got = httpx.get(f"{g.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer())
        assert got.status_code == 200, got.text
        assert got.json()["status"] == "open" and got.json()["kind"] == "access"
        assert "13912345678" not in json.dumps(got.json())
        missing = httpx.get(f"{g.url}/admin/rights/dsr-nope", params={"tenant": "mall"}, headers=bearer())
        assert missing.status_code == 404, missing.text
    finally:
        g.stop()


def held_events(gw: Gateway) -> list[tuple[str, str, str, str]]:
    """(table, message id, person, pseudonyms) of every event the embedded outbox database
    still holds: the outbox and the dead letters."""
    conn = sqlite3.connect(gw.data_dir / "outbox.sqlite3")
    try:
        rows = [
            ("outbox", *r)
            for r in conn.execute("SELECT message_id, person, pseudonyms FROM outbox WHERE kind = 'event'")
        ]
        rows += [
            ("dead_letter", *r)
            for r in conn.execute(
                "SELECT message_id, person, pseudonyms FROM dead_letter WHERE kind = 'event'"
            )
        ]
        return rows
    finally:
        conn.close()


def test_delete_purges_held_events_erases_the_graph_and_keeps_the_person_out(tmp_path: Any) -> None:
    closed = free_port()  # nothing listens: one destination dead-letters, one keeps retrying
    extra = f"""
[[tenants.destinations]]
id = "mall-dead"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "http://127.0.0.1:{closed}/hook", timeout_seconds = 1 }}
retry = {{ max_attempts = 1, initial_backoff_ms = 20, max_backoff_ms = 50 }}

[[tenants.destinations]]
id = "mall-stuck"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "http://127.0.0.1:{closed}/hook", timeout_seconds = 1 }}
retry = {{ max_attempts = 1000, initial_backoff_ms = 30000, max_backoff_ms = 60000 }}
"""
    g = make_gateway(tmp_path, config=TEST_CONFIG + extra).start()
    try:
        t = tag()
        user, web_device, app_device = f"rights-del-{t}", f"web-{t}", f"app-{t}"
        other, other_device = f"rights-keep-{t}", f"keep-{t}"
        login(g, MALL_WEB_KEY, user, web_device)
        login(g, MALL_APP_KEY, user, app_device)
        login(g, MALL_WEB_KEY, other, other_device)
        mine = [
            send(g, MALL_WEB_KEY, "track", anonymousId=web_device, userId=user, event="Product Viewed"),
            send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed"),
        ]
        theirs = send(
            g, MALL_WEB_KEY, "track", anonymousId=other_device, userId=other, event="Product Viewed"
        )
        sent = {s["messageId"] for s in [*mine, theirs]}
        wait_until(
            lambda: sent <= {m for table, m, *_ in held_events(g) if table == "dead_letter"},
            30,
            what="the events dead-lettered at mall-dead",
        )
        assert sent <= {m for table, m, *_ in held_events(g) if table == "outbox"}  # mall-stuck

        r = open_request(g, kind="delete", subject={"type": "user_id", "id": user}, channel="web")
        assert r.status_code == 201, r.text
        request_id = r.json()["requestId"]
        # answered once the one destination that received the person's data (the others
        # never took it) has the deletion notice; every store, the identity log included
        request = wait_until(
            lambda: (lambda x: x if x["status"] == "completed" else None)(
                httpx.get(
                    f"{g.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer()
                ).json()
            ),
            20,
            what="the deletion completed",
        )
        assert request["outcome"] == "done" and not request.get("remaining"), request
        assert request["receipts"] == {"mall-warehouse": "delivered"}, request
        steps = {s["step"]: s for s in request["steps"]}
        assert steps["withdraw_all"]["identifiers"] == 3 and steps["suppressed"]["identifiers"] == 3
        assert steps["recipients"]["destinations"] == ["mall-warehouse"], steps
        assert steps["events"]["dead_letters"] >= 2 and steps["events"]["outbox_events"] >= 2, steps
        assert (
            steps["events"]["dedupe_keys"] >= 2 and steps["file_sinks"]["lines_removed"]["mall-warehouse"] > 0
        )
        assert steps["identity_graph"]["erased"] == 3 and steps["identity_graph"]["notices"] == 1, steps

        held = held_events(g)
        held_ids = {m for _, m, *_ in held}
        assert not held_ids & {s["messageId"] for s in mine}, held
        assert theirs["messageId"] in {m for table, m, *_ in held if table == "outbox"}
        assert theirs["messageId"] in {m for table, m, *_ in held if table == "dead_letter"}
        person_nodes = {x for rec in ledger_records(g, identifier=user) for x in rec["identifiers"]}
        pseudonyms = {n.split(":", 1)[1] for n in person_nodes}
        assert len(pseudonyms) == 3
        assert not any(pseudonyms & set(names.split(",")) for *_, names in held)

        # downstream is told, and the graph no longer links the person's identifiers
        wait_until(
            lambda: [e for e in g.sink_lines("mall-warehouse") if e.get("type") == "identity.deleted"],
            20,
            what="the deletion notice at mall-warehouse",
        )
        explained = httpx.get(
            f"{g.url}/admin/identity/explain",
            params={
                "tenant": "mall",
                "a": user,
                "a_type": "user_id",
                "b_type": "anonymous_id",
                "b": app_device,
            },
            headers=bearer(COMPLIANCE_TOKEN),
        )
        assert explained.status_code == 200 and explained.json()["linked"] is False, explained.text

        # a re-sent old event of the person is dropped, before anything is stored or linked
        again = send(g, MALL_APP_KEY, "track", anonymousId=app_device, userId=user, event="Product Viewed")
        assert again["accepted"] == 0 and again["dropped"] == {"erased": 1}, again
        assert again["messageId"] not in {m for _, m, *_ in held_events(g)}
        explained = httpx.get(
            f"{g.url}/admin/identity/explain",
            params={
                "tenant": "mall",
                "a": user,
                "a_type": "user_id",
                "b_type": "anonymous_id",
                "b": app_device,
            },
            headers=bearer(COMPLIANCE_TOKEN),
        )
        assert explained.json()["linked"] is False, explained.text
        # the whole story is in the ledger, which still verifies
        verify = httpx.get(f"{g.url}/admin/consent/verify", headers=bearer(OPERATOR_TOKEN))
        assert verify.status_code == 200 and verify.json()["ok"] is True, verify.text
        assert user not in g.log_text()
        # a second deletion of the same person: an idempotent answer, nothing left to do
        second = open_request(g, kind="delete", subject={"type": "user_id", "id": user}, channel="web")
        assert second.status_code == 201 and second.json()["status"] == "completed", second.text
        steps = {s["step"]: s for s in second.json()["steps"]}
        assert steps["recipients"]["destinations"] == [], steps
        assert steps["events"] == {
            "step": "events",
            "outbox_events": 0,
            "outbox_notices": 0,
            "dedupe_keys": 0,
            "dead_letters": 0,
        }, steps
        assert steps["identity_graph"]["erased"] == 0, steps
    finally:
        g.stop()


def test_an_access_bundle_is_signed_verifies_offline_and_holds_no_raw_identifier(
    gw: Gateway, tmp_path: Any
) -> None:
    t = tag()
    user, web_device, app_device = f"rights-acc-{t}", f"web-{t}", f"app-{t}"
    login(gw, MALL_WEB_KEY, user, web_device)
    login(gw, MALL_APP_KEY, user, app_device)
    viewed = send(gw, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
    wait_until(
        lambda: [e for e in gw.sink_lines("mall-warehouse") if e["messageId"] == viewed["messageId"]],
        20,
        what="the event at mall-warehouse",
    )
    r = open_request(gw, kind="copy", subject={"type": "anonymous_id", "id": web_device}, channel="app")
    assert r.status_code == 201, r.text
    request_id = r.json()["requestId"]
    url = f"{gw.url}/admin/rights/{request_id}/bundle"
    refused = httpx.post(url, json={"tenant": "mall"}, headers=bearer(OPERATOR_TOKEN))
    assert refused.status_code == 403, refused.text

    def fetched() -> dict[str, Any]:
        got = httpx.post(url, json={"tenant": "mall"}, headers=bearer(), timeout=30)
        assert got.status_code == 200, got.text
        assert user not in got.text and web_device not in got.text and app_device not in got.text
        return dict(got.json())

    # the delivery proofs are written with the delivery cursor: wait until the bundle has them
    document = wait_until(
        lambda: (lambda d: d if d["bundle"]["deliveries"] else None)(fetched()), 20, what="deliveries in it"
    )
    bundle = document["bundle"]
    assert bundle["requestId"] == request_id and bundle["kind"] == "copy"
    assert {i["type"] for i in bundle["identifiers"]} == {"user_id", "anonymous_id"}
    assert len(bundle["identifiers"]) == 3 and len(bundle["unifiedIds"]) == 1
    grants = [x for x in bundle["consentHistory"] if x["record_type"] == "consent" and x["state"] == "given"]
    assert len(grants) == 2 and all(x["notice_id"] == "notice-v1" and x["notice_hash"] for x in grants)
    # delivery proofs keep message ids as keyed digests (gateway.privacy.message_id_digest)
    assert any(d["destination"] == "mall-warehouse" and d["messageId"] for d in bundle["deliveries"])
    assert "mall-warehouse" in bundle["destinations"]

    # offline: the signature is the ledger key's (the key of the ledger export's checkpoints)
    from consent.rights_bundle import verify_bundle

    export = httpx.get(f"{gw.url}/admin/consent/export", params={"tenant": "mall"}, headers=bearer())
    keys = {json.loads(x).get("public_key") for x in export.text.splitlines()} - {None}
    assert keys and verify_bundle(document, keys)
    tampered = json.loads(json.dumps(document))
    tampered["bundle"]["destinations"] = []
    assert not verify_bundle(tampered, keys)
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(document))
    cli = subprocess.run(
        [str(IDGATE), "rights", "verify-bundle", str(path), "--public-key", next(iter(keys))],
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and cli.stdout.startswith("OK:"), cli.stdout + cli.stderr
    path.write_text(json.dumps(tampered))
    cli = subprocess.run(
        [str(IDGATE), "rights", "verify-bundle", str(path)], env=gw.env, capture_output=True, text=True
    )
    assert cli.returncode == 1 and cli.stdout.startswith("FAILED"), cli.stdout

    # the tabular parts as CSV, naming the digest of the signed JSON they come from
    as_csv = httpx.post(url, json={"tenant": "mall", "format": "csv", "part": "deliveries"}, headers=bearer())
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv"), as_csv.text
    lines = as_csv.text.splitlines()
    assert lines[0] == "destination,messageId,deliveredAt,ledgerSeq"
    assert any(x.startswith("mall-warehouse,") for x in lines[1:])
    assert len(as_csv.headers["x-bundle-sha256"]) == 64
    history = httpx.post(url, json={"tenant": "mall", "format": "csv"}, headers=bearer()).text
    assert history.splitlines()[0].startswith("seq,record_id,record_type,state,purposes,notice_id")
    assert user not in history and app_device not in history

    # the answer is on the request: a step with the bundle's digest, then completed
    got = httpx.get(f"{gw.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer()).json()
    assert got["status"] == "completed" and got["steps"][0]["step"] == "bundle"
    assert len(got["steps"][0]["sha256"]) == 64
    # a bundle only answers access and copy requests
    other = open_request(gw, kind="restrict", subject={"type": "user_id", "id": user}).json()["requestId"]
    wrong = httpx.post(f"{gw.url}/admin/rights/{other}/bundle", json={"tenant": "mall"}, headers=bearer())
    assert wrong.status_code == 409 and wrong.json()["error"] == "wrong_kind", wrong.text


def write_deletion_records(g: Gateway, subject: str, *steps: dict[str, Any]) -> str:
    """What a deletion left in the ledger when the process died (the gateway is stopped):
    its ``opened`` record, then ``steps`` (each naming every identifier in ``nodes``)."""
    from consent.ledger import Ledger, RecordDraft
    from consent.signing import LedgerSigner
    from identity.db import make_engine

    signer = LedgerSigner.from_b64((g.data_dir / "dev-ledger-key").read_text())
    ledger = Ledger(make_engine(f"sqlite:///{g.data_dir / 'consent.sqlite3'}"), signer)
    now = datetime.now(UTC)
    request_id = f"dsr-{uuid.uuid4()}"
    detail = {
        "request_id": request_id,
        "event": "opened",
        "kind": "delete",
        "requested_by": "subject",
        "channel": "app",
        "verification": VERIFIED,
        "received_at": now.isoformat(),
        "due_at": (now + timedelta(days=21)).isoformat(),
        "officer": "dpo",
    }
    records = [(detail, [subject])]
    records += [({"request_id": request_id, "event": "step", **step}, step["nodes"]) for step in steps]
    for d, identifiers in records:
        draft = RecordDraft(
            tenant="mall",
            record_type="rights_request",
            subject=subject.split(":", 1)[1],
            identifiers=identifiers,
            state="requested",
            source="admin:dpo",
            platform="admin",
            at=now,
            detail={k: v for k, v in d.items() if k != "nodes"},
        )
        ledger.append([draft])
    ledger.engine.dispose()
    return request_id


def completed_request(g: Gateway, request_id: str) -> dict[str, Any]:
    def completed() -> dict[str, Any] | None:
        got = httpx.get(f"{g.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer())
        assert got.status_code == 200, got.text
        return dict(got.json()) if got.json()["status"] == "completed" else None

    return wait_until(completed, 20, what="the deletion completed after the restart")


def test_a_deletion_cut_short_by_a_crash_is_finished_at_the_next_start(tmp_path: Any) -> None:
    """The process died right after the request's first record (``opened``): the next start
    carries out every step and completes it."""
    g = make_gateway(tmp_path).start()
    try:
        t = tag()
        user, web_device, app_device = f"rights-crash-{t}", f"web-{t}", f"app-{t}"
        login(g, MALL_WEB_KEY, user, web_device)
        login(g, MALL_APP_KEY, user, app_device)
        viewed = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        wait_until(
            lambda: [e for e in g.sink_lines("mall-warehouse") if e["messageId"] == viewed["messageId"]],
            20,
            what="the event at mall-warehouse",
        )
        # the pseudonym of the user id, as the API names it
        probe = open_request(g, kind="access", subject={"type": "user_id", "id": user}).json()
        subject = probe["subject"]
        g.kill9()

        request_id = write_deletion_records(g, subject)
        g.start()
        request = completed_request(g, request_id)
        steps = {s["step"]: s for s in request["steps"]}
        assert steps["withdraw_all"]["identifiers"] == 3 and steps["identity_graph"]["erased"] == 3, steps
        # every store of the new ones too: the sink lines, the dedupe entries, the receipt
        assert steps["suppressed"]["identifiers"] == 3 and steps["events"]["dedupe_keys"] >= 1, steps
        assert steps["file_sinks"]["lines_removed"]["mall-warehouse"] >= 3, steps
        assert request["receipts"] == {"mall-warehouse": "delivered"}, request
        assert request["outcome"] == "done" and not request.get("remaining"), request
        assert viewed["messageId"] not in {e.get("messageId") for e in g.sink_lines("mall-warehouse")}
        again = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        assert again["accepted"] == 0 and again["dropped"] == {"erased": 1}, again
    finally:
        g.stop()


def test_a_deletion_cut_short_after_the_graph_step_reaches_every_identifier_it_had(tmp_path: Any) -> None:
    """The process died after the graph was erased, before the request was completed: the
    graph no longer knows the person's devices, so the resumed deletion takes them from the
    request's own records: every identifier is suppressed and purged again."""
    g = make_gateway(tmp_path).start()
    try:
        t = tag()
        user, web_device, app_device = f"rights-late-{t}", f"web-{t}", f"app-{t}"
        login(g, MALL_WEB_KEY, user, web_device)
        login(g, MALL_APP_KEY, user, app_device)
        nodes = sorted({x for rec in ledger_records(g, identifier=user) for x in rec["identifiers"]})
        subject = next(n for n in nodes if n.startswith("user_id:"))
        erased = httpx.post(
            f"{g.url}/admin/identity/erase",
            json={
                "tenant": "mall",
                "identifiers": [
                    {"type": "user_id", "id": user},
                    {"type": "anonymous_id", "id": web_device},
                    {"type": "anonymous_id", "id": app_device},
                ],
            },
            headers=bearer(),
        )
        assert erased.status_code == 200 and erased.json()["erased"] == 3, erased.text
        g.kill9()
        step = {
            "step": "withdraw_all",
            "identifiers": 3,
            "purposes": [],
            "consent_records": [],
            "nodes": nodes,
        }
        request_id = write_deletion_records(g, subject, step)
        g.start()
        request = completed_request(g, request_id)
        steps = {s["step"]: s for s in request["steps"]}
        assert steps["suppressed"]["identifiers"] == 3, steps
        again = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        assert again["dropped"] == {"erased": 1}, again
    finally:
        g.stop()


@pytest.mark.postgres
@pytest.mark.redis
def test_access_and_delete_on_postgresql_and_redis(tmp_path: Any, redis_ns: Any) -> None:
    """The distributed mode: the ledger on PostgreSQL, the outbox a Redis stream."""
    from consent.rights_bundle import verify_bundle

    with ExitStack() as stack:
        env = {**backend_env("postgres", stack), **redis_ns.env()}
        g = make_gateway(tmp_path, extra_env=env).start()
        stack.callback(g.stop)
        t = tag()
        user, web_device, app_device = f"rights-pg-{t}", f"web-{t}", f"app-{t}"
        login(g, MALL_WEB_KEY, user, web_device)
        login(g, MALL_APP_KEY, user, app_device)

        r = open_request(g, kind="access", subject={"type": "anonymous_id", "id": app_device})
        assert r.status_code == 201, r.text
        got = httpx.post(
            f"{g.url}/admin/rights/{r.json()['requestId']}/bundle", json={"tenant": "mall"}, headers=bearer()
        )
        assert got.status_code == 200, got.text
        document = got.json()
        assert verify_bundle(document) and len(document["bundle"]["identifiers"]) == 3
        assert len([x for x in document["bundle"]["consentHistory"] if x["state"] == "given"]) == 2

        r = open_request(g, kind="delete", subject={"type": "user_id", "id": user})
        assert r.status_code == 201, r.text
        steps = {s["step"]: s for s in r.json()["steps"]}
        assert steps["identity_graph"]["erased"] == 3 and "outbox_events" in steps["events"], steps
        again = send(g, MALL_APP_KEY, "track", anonymousId=app_device, userId=user, event="Product Viewed")
        assert again["accepted"] == 0 and again["dropped"] == {"erased": 1}, again
        request_id = r.json()["requestId"]
        wait_until(
            lambda: (
                httpx.get(
                    f"{g.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer()
                ).json()["status"]
                == "completed"
            ),
            20,
            what="the deletion completed (the warehouse's receipt)",
        )
        listed = httpx.get(f"{g.url}/admin/rights", params={"tenant": "mall"}, headers=bearer()).json()
        assert {x["kind"]: x["status"] for x in listed["requests"]} == {
            "access": "completed",
            "delete": "completed",
        }
        assert "idgate_rights_requests_open" in httpx.get(f"{g.url}/metrics").text


@pytest.mark.postgres
@pytest.mark.redis
def test_two_replicas_answering_one_request_at_once_record_one_completion(
    tmp_path: Any, redis_ns: Any
) -> None:
    """Officers (or a replica's delivery worker) answering the same request on two replicas
    at the same moment: one completion is recorded and answered 200, the other 409
    ``not_open``; an extension racing the completion lands before it or not at all."""
    from concurrent.futures import ThreadPoolExecutor

    with ExitStack() as stack:
        env = {**backend_env("postgres", stack), **redis_ns.env()}
        a = make_gateway(tmp_path / "a", extra_env=env).start()
        stack.callback(a.stop)
        b = make_gateway(tmp_path / "b", extra_env=env).start()
        stack.callback(b.stop)
        users = [f"rights-race-{tag()}" for _ in range(6)]
        requests = []
        for user in users:
            r = open_request(a, kind="access", subject={"type": "user_id", "id": user})
            assert r.status_code == 201, r.text
            requests.append(r.json()["requestId"])

        def act(gw: Gateway, request_id: str, action: str) -> int:
            body: dict[str, Any] = {"tenant": "mall", "outcome": "done"}
            if action == "extend":
                body = {"tenant": "mall", "workingDays": 5, "reason": "complex_request"}
            r = httpx.post(
                f"{gw.url}/admin/rights/{request_id}/{action}", json=body, headers=bearer(), timeout=30
            )
            assert r.status_code in (200, 409), r.text
            assert r.status_code == 200 or r.json()["error"] == "not_open", r.text
            return r.status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            plans = [(a, "complete"), (b, "complete"), (b, "extend")]
            futures = {rid: [pool.submit(act, gw, rid, action) for gw, action in plans] for rid in requests}
            answers = {rid: [f.result() for f in fs] for rid, fs in futures.items()}
        for user, request_id in zip(users, requests, strict=True):
            assert sorted(answers[request_id][:2]) == [200, 409], answers[request_id]
            records = [x for x in ledger_records(a, identifier=user) if x["type"] == "rights_request"]
            assert [x["state"] for x in records].count("completed") == 1, records
            assert records[-1]["state"] == "completed", records  # nothing after the completion
