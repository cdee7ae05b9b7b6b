"""Attack: the operator role as an oracle over raw identifiers.

``/admin/identity/explain`` turned any raw phone number or user id into its pseudonym for
an operator, and said whether two raw identifiers were one person; refused attempts left no
trace. Now operators work on node ids (``<type>:<pseudonym>``, as the quarantine list and
explain's path give them); raw identifiers are looked up by the compliance role only, and
every admin read and write, refusals (401/403) included, is in the access log. Played over
real HTTP against an `idgate serve` process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import COMPLIANCE_TOKEN, MALL_SERVER_KEY, OPERATOR_TOKEN, make_gateway

pytestmark = pytest.mark.slow

OPS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}


@contextmanager
def served(tmp_path: Path) -> Iterator[httpx.Client]:
    """A real gateway and an HTTP client for it (no write key: each call says its own)."""
    gw = make_gateway(tmp_path).start()
    try:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            yield client
    finally:
        gw.stop()


def linked_person(client: httpx.Client) -> tuple[str, str]:
    """A user and a device of one person (consent to link, then an event with both), from
    the shop's server source (a client source needs the backend's assertion for a user id)."""
    tag = uuid.uuid4().hex[:8]
    user, device = f"user-{tag}", f"device-{tag}"
    r = client.post(
        "/v1/consent",
        json={
            "userId": user,
            "identifiers": [{"type": "device_id", "id": device}],
            "grant": ["analytics", "identity_linking"],
            "noticeId": "notice-v1",
        },
        auth=(MALL_SERVER_KEY, ""),
    )
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/track",
        json={
            "userId": user,
            "event": "Viewed",
            "messageId": uuid.uuid4().hex,
            "context": {"device": {"id": device}},
        },
        auth=(MALL_SERVER_KEY, ""),
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    return user, device


def access_log(client: httpx.Client) -> list[dict[str, Any]]:
    r = client.get("/admin/access-log", headers=DPO, params={"limit": 100})
    assert r.status_code == 200, r.text
    return list(r.json()["entries"])


def test_operator_cannot_turn_raw_identifiers_into_pseudonyms(tmp_path: Path) -> None:
    with served(tmp_path) as client:
        user, device = linked_person(client)
        raw = {"tenant": "mall", "a": user, "a_type": "user_id", "b": device, "b_type": "device_id"}

        # the oracle: refused to the operator, and the refusal is logged
        r = client.get("/admin/identity/explain", headers=OPS, params=raw)
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "forbidden" and "compliance" in r.json()["detail"]
        # a value without its type is taken as a node id, and a raw one is not one
        r = client.get(
            "/admin/identity/explain", headers=OPS, params={"tenant": "mall", "a": user, "b": device}
        )
        assert r.status_code == 400 and r.json()["field"] == "a", r.text
        r = client.post(
            "/admin/identity/unlink",
            headers=OPS,
            json={
                "tenant": "mall",
                "a": {"type": "user_id", "id": user},
                "b": {"type": "device_id", "id": device},
            },
        )
        assert r.status_code == 403, r.text

        # compliance may look raw identifiers up (logged as such) ...
        r = client.get("/admin/identity/explain", headers=DPO, params=raw)
        assert r.status_code == 200 and r.json()["linked"] is True, r.text
        nodes = {"a": r.json()["a"], "b": r.json()["b"]}
        assert user not in str(nodes) and device not in str(nodes)

        # ... and the operator works on the node ids
        r = client.get("/admin/identity/explain", headers=OPS, params={"tenant": "mall", **nodes})
        assert r.status_code == 200 and r.json()["linked"] is True, r.text
        r = client.post(
            "/admin/identity/unlink",
            headers=OPS,
            json={"tenant": "mall", "a": {"node": nodes["a"]}, "b": {"node": nodes["b"]}},
        )
        assert r.status_code == 200 and r.json()["split"] is True, r.text

        entries = access_log(client)
        refused = [e for e in entries if e["action"] == "admin.refused"]
        assert {(e["officer"], e["params"]["status"], e["params"]["path"]) for e in refused} >= {
            ("ops", 403, "/admin/identity/explain"),
            ("ops", 403, "/admin/identity/unlink"),
        }
        assert any(
            e["action"] == "identity.explain" and e["params"].get("raw_lookup") == ["a", "b"] for e in entries
        )
        # nothing raw in the log, refusals included
        assert user not in str(entries) and device not in str(entries)


def test_every_admin_call_and_refusal_is_in_the_access_log(tmp_path: Path) -> None:
    with served(tmp_path) as client:
        # refused: no token, an unknown token, the wrong role
        assert client.get("/admin/consent/stats", params={"tenant": "mall"}).status_code == 401
        bad = {"Authorization": "Bearer guessed-token-123456"}
        assert client.get("/admin/consent/stats", params={"tenant": "mall"}, headers=bad).status_code == 401
        r = client.get("/admin/consent/records", params={"tenant": "mall"}, headers=OPS)
        assert r.status_code == 403
        # operator actions: quarantine, verify, notice publishing
        assert (
            client.get("/admin/identity/quarantine", params={"tenant": "mall"}, headers=OPS).status_code
            == 200
        )
        assert client.get("/admin/consent/verify", headers=OPS).status_code == 200
        r = client.post(
            "/admin/notices",
            headers=OPS,
            json={"tenant": "mall", "id": f"notice-{uuid.uuid4().hex[:6]}", "contentSha256": "2" * 64},
        )
        assert r.status_code == 201, r.text
        # monitoring reads: the KPIs and the alert history
        assert client.get("/admin/kpis", params={"tenant": "mall"}, headers=OPS).status_code == 200
        r = client.get("/admin/alerts/history", params={"tenant": "mall", "limit": 5}, headers=DPO)
        assert r.status_code == 200, r.text
        # a limit over its bound is a 400 naming the parameter
        r = client.get("/admin/identity/quarantine", params={"tenant": "mall", "limit": 100_000}, headers=OPS)
        assert r.status_code == 400 and r.json()["field"] == "limit", r.text
        r = client.get("/admin/access-log", params={"limit": 100_000}, headers=DPO)
        assert r.status_code == 400 and r.json()["field"] == "limit", r.text

        entries = access_log(client)
        actions = {(e["officer"], e["action"]) for e in entries}
        assert {
            ("ops", "identity.quarantine"),
            ("ops", "consent.verify"),
            ("ops", "notice.publish"),
            ("ops", "monitoring.kpis"),
            ("dpo", "monitoring.alert_history"),
            ("(unauthenticated)", "admin.refused"),
            ("ops", "admin.refused"),
        } <= actions, actions
        unauthenticated = [e for e in entries if e["officer"] == "(unauthenticated)"]
        assert len(unauthenticated) == 2 and all(e["params"]["status"] == 401 for e in unauthenticated)
        assert all(e["tenant"] == "mall" for e in unauthenticated)
        assert "guessed-token" not in str(entries)
