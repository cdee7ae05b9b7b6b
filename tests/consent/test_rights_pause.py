"""Stopping a rights request's clock (issue 13: "pauses while waiting on the subject"), over
real HTTP with a fake clock.

The gateway is the real app (embedded SQLite stores) served by uvicorn on a port of its own,
in this process, so that its rights service's clock can be set: every time the service reads
(what it records, the due status it answers, the ``/metrics`` gauge) is the test's. The same
flow on a real ``idgate serve`` with the real clock, on SQLite and PostgreSQL, is in
tests/consent/test_rights.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar

from tests.conftest import COMPLIANCE_TOKEN, OPERATOR_TOKEN, free_port
from tests.gateway.conftest import in_process_app
from tests.waiting import wait_until

DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
VERIFIED = {"method": "account_login", "outcome": "verified", "reference": "CASE-2026-PAUSE"}


def shanghai(text: str) -> datetime:
    """A local time in Shanghai (``2026-11-04 10:00``) as UTC."""
    return datetime.fromisoformat(f"{text}+08:00").astimezone(UTC)


@dataclass
class FakeClock:
    at: datetime

    def __call__(self) -> datetime:
        return self.at


@dataclass
class Served:
    url: str
    app: Litestar
    clock: FakeClock

    def post(self, path: str, body: dict[str, Any], token: str = COMPLIANCE_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, headers=DPO, timeout=30)

    def open_access(self, received: str, user: str) -> dict[str, Any]:
        r = self.post(
            "/admin/rights",
            {
                "tenant": "mall",
                "kind": "access",
                "subject": {"type": "user_id", "id": user},
                "requestedBy": "subject",
                "channel": "email",
                "verification": VERIFIED,
                "receivedAt": shanghai(received).isoformat(),
            },
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def act(self, request_id: str, action: str, **body: Any) -> httpx.Response:
        return self.post(f"/admin/rights/{request_id}/{action}", {"tenant": "mall", **body})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    app = in_process_app(tmp_path)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="idgate-under-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 60, what="the in-process gateway to be ready")
        clock = FakeClock(shanghai("2026-11-04T10:00:00"))
        app.state.rights.now = clock  # the rights service reads the time from here only
        yield Served(url, app, clock)
    finally:
        server.should_exit = True
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(timeout=0.5)


def gauge(served: Served) -> dict[str, float]:
    """``idgate_rights_requests_open`` of mall's access requests, by clock."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{served.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("idgate_rights_requests_open{") and 'kind="access",tenant="mall"' in line:
            clock = line.split('clock="', 1)[1].split('"', 1)[0]
            out[clock] = float(line.split()[-1])
    return out


def test_a_paused_clock_stops_counting_and_resuming_moves_the_due_date(served: Served) -> None:
    # received Monday 2 November 2026: 15 working days -> due at the end of Monday 23 November
    paused = served.open_access("2026-11-02T10:00:00", "pause-user")
    control = served.open_access("2026-11-02T10:00:00", "control-user")  # never paused
    rid = paused["requestId"]
    assert paused["dueAt"] == "2026-11-23T15:59:59.999999Z"
    assert paused["clock"] == "on_time" and paused["workingDaysLeft"] == 13  # on Wednesday 4 November

    r = served.act(rid, "pause", reason="awaiting_identity_proof")
    assert r.status_code == 200, r.text
    assert r.json()["clock"] == "paused" and r.json()["status"] == "open"
    assert r.json()["pausedAt"] == "2026-11-04T02:00:00Z"
    assert r.json()["pauseReason"] == "awaiting_identity_proof" and r.json()["workingDaysLeft"] == 13

    again = served.act(rid, "pause", reason="awaiting_clarification")
    assert again.status_code == 409, again.text
    assert again.json()["error"] == "already_paused" and again.json()["field"] == "requestId"
    assert "already paused" in again.json()["detail"]

    # Tuesday 24 November, 14:00: past the first due date. Paused, the request is not late
    # and its working days left have not moved; the control request is overdue.
    served.clock.at = shanghai("2026-11-24T14:00:00")
    got = served.get(f"/admin/rights/{rid}", tenant="mall").json()
    assert got["clock"] == "paused" and got["workingDaysLeft"] == 13, got
    listed = served.get("/admin/rights", tenant="mall").json()
    assert listed["paused"] == 1 and listed["overdue"] == 1 and listed["nearlyDue"] == 0, listed
    overdue = served.get("/admin/rights", tenant="mall", clock="overdue").json()["requests"]
    assert [x["requestId"] for x in overdue] == [control["requestId"]]
    assert [
        x["requestId"] for x in served.get("/admin/rights", tenant="mall", clock="paused").json()["requests"]
    ] == [rid]
    assert gauge(served) == {"overdue": 1.0, "paused": 1.0}

    # resumed: the pause took the working days after Wednesday 4 November up to and including
    # Tuesday 24 November (14), so the due date moves from 23 November to Friday 11 December
    r = served.act(rid, "resume")
    assert r.status_code == 200, r.text
    resumed = r.json()
    assert resumed["clock"] == "on_time" and resumed["pausedAt"] is None and resumed["pauseReason"] is None
    assert resumed["dueAt"] == "2026-12-11T15:59:59.999999Z" and resumed["pausedWorkingDays"] == 14
    assert resumed["workingDaysLeft"] == 13  # as many as when it was paused
    step = resumed["steps"][-1]
    assert step["step"] == "resumed" and step["working_days"] == 14
    assert step["previous_due_at"] == "2026-11-23T15:59:59.999999+00:00"
    assert gauge(served) == {"overdue": 1.0, "on_time": 1.0}

    not_paused = served.act(rid, "resume")
    assert not_paused.status_code == 409 and not_paused.json()["error"] == "not_paused", not_paused.text

    # partial days: paused and resumed the same day gives nothing back...
    served.clock.at = shanghai("2026-11-25T09:00:00")
    assert served.act(rid, "pause", reason="awaiting_clarification").status_code == 200
    served.clock.at = shanghai("2026-11-25T23:30:00")
    same_day = served.act(rid, "resume").json()
    assert same_day["dueAt"] == resumed["dueAt"] and same_day["steps"][-1]["working_days"] == 0
    # ...paused on Friday 27 November at 17:00, resumed Monday 30 November at 09:00: one day
    served.clock.at = shanghai("2026-11-27T17:00:00")
    assert served.act(rid, "pause", reason="awaiting_clarification").status_code == 200
    served.clock.at = shanghai("2026-11-30T09:00:00")
    weekend = served.act(rid, "resume").json()
    assert weekend["dueAt"] == "2026-12-14T15:59:59.999999Z" and weekend["pausedWorkingDays"] == 15

    # every pause and resume is a rights_request record: who, when, why
    records = served.get("/admin/consent/records", tenant="mall", limit=500)
    assert records.status_code == 200, records.text
    mine = [x for x in records.json()["records"] if x["detail"].get("request_id") == rid]
    changes = [
        (x["detail"].get("step"), x["detail"].get("reason")) for x in mine if x["detail"]["event"] == "step"
    ]
    assert changes == [
        ("paused", "awaiting_identity_proof"),
        ("resumed", None),
        ("paused", "awaiting_clarification"),
        ("resumed", None),
        ("paused", "awaiting_clarification"),
        ("resumed", None),
    ], changes
    first = next(x for x in mine if x["detail"].get("step") == "paused")
    assert first["source"] == "admin:dpo" and first["at"].startswith("2026-11-04T02:00:00")
    assert first["detail"]["working_days_left"] == 13 and first["detail"]["due_at"].startswith("2026-11-23")

    # a completed request's clock cannot be paused any more
    done = served.act(rid, "complete", outcome="done")
    assert done.status_code == 200 and done.json()["clock"] == "closed", done.text
    late = served.act(rid, "pause", reason="awaiting_clarification")
    assert late.status_code == 409 and late.json()["error"] == "not_open", late.text
    assert served.act(rid, "resume").json()["error"] == "not_open"


def test_answering_a_paused_request_counts_the_pause_up_to_the_answer(served: Served) -> None:
    opened = served.open_access("2026-11-02T10:00:00", "pause-answered")
    rid = opened["requestId"]
    assert served.act(rid, "pause", reason="awaiting_clarification").status_code == 200
    served.clock.at = shanghai("2026-11-30T10:00:00")  # a week past the first due date
    done = served.act(rid, "complete", outcome="declined")
    assert done.status_code == 200, done.text
    completion = next(
        x["detail"]
        for x in served.get("/admin/consent/records", tenant="mall", limit=500).json()["records"]
        if x["detail"].get("request_id") == rid and x["detail"]["event"] == "completed"
    )
    assert completion["on_time"] is True  # the clock stood still from 4 November


@pytest.mark.parametrize(
    ("action", "body", "status", "field"),
    [
        ("pause", {"reason": "the subject said 13912345678"}, 400, "reason"),
        ("pause", {}, 400, "reason"),
        ("pause", {"reason": "awaiting_clarification", "note": "x"}, 400, "note"),
        ("resume", {"tenant": "nosuch"}, 400, "tenant"),
    ],
)
def test_bad_pause_and_resume_bodies_are_4xx_naming_the_field(
    served: Served, action: str, body: dict[str, Any], status: int, field: str | None
) -> None:
    rid = served.open_access("2026-11-02T10:00:00", "pause-bad")["requestId"]
    r = served.post(f"/admin/rights/{rid}/{action}", {"tenant": "mall", **body})
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["field"] == field, r.text
    unknown = served.act("dsr-nosuch", action, reason="awaiting_clarification") if action == "pause" else None
    if unknown is not None:
        assert unknown.status_code == 404 and unknown.json()["field"] == "requestId", unknown.text
    operator = served.post(f"/admin/rights/{rid}/{action}", {"tenant": "mall"}, token=OPERATOR_TOKEN)
    assert operator.status_code == 403, operator.text
