"""Key rotation that keeps the past, over real HTTP: a real ``idgate serve`` with a key file,
``idgate keys generate`` adding a version, the gateway restarted on the same data. The same
person's consent, links, audit trail, unified ID and erasure must work after the rotation
as before it; ``idgate keys rotate`` moves stored state to the new version (resumable after
a kill) and ``idgate keys retire`` refuses while anything still refers to the old one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.cli.conftest import Served, ServeFactory, clean_env, idgate

APP = ("acme-app-demo-key", "")
COMPLIANCE = {"Authorization": "Bearer compliance-demo-token"}
OPERATOR = {"Authorization": "Bearer operator-demo-token"}


def keyed_env(keys: Path, data_dir: Path) -> dict[str, str]:
    return clean_env(IDGATE_ENV="dev", IDGATE_KEY_FILE=str(keys), IDGATE_DATA_DIR=str(data_dir))


def generate(keys: Path) -> None:
    done = idgate("keys", "generate", "--tenant", "acme", "--out", str(keys))
    assert done.returncode == 0, done.stderr


def grant(gw: Served, anon: str, *purposes: str) -> None:
    r = httpx.post(
        gw.url + "/v1/consent",
        auth=APP,
        json={"anonymousId": anon, "grant": list(purposes), "noticeId": "privacy-2026-11"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def withdraw(gw: Served, anon: str, *purposes: str) -> None:
    r = httpx.post(
        gw.url + "/v1/consent",
        auth=APP,
        json={"anonymousId": anon, "withdraw": list(purposes), "noticeId": "privacy-2026-11"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def track(gw: Served, message_id: str, **ids: Any) -> dict[str, Any]:
    body = {"event": "Product Viewed", "messageId": message_id, **ids}
    r = httpx.post(gw.url + "/v1/track", auth=APP, json=body, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def sink_events(data_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((data_dir / "sinks" / "warehouse").glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


def delivered(data_dir: Path, message_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in sink_events(data_dir) if e.get("messageId") == message_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{message_id} never reached the warehouse"
        time.sleep(0.1)


def audit_records(gw: Served, anon: str) -> list[dict[str, Any]]:
    r = httpx.get(
        gw.url + "/admin/consent/records",
        params={"tenant": "acme", "type": "anonymous_id", "identifier": anon},
        headers=COMPLIANCE,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()["records"]
    return records


def explain(gw: Served, anon: str, user: str) -> dict[str, Any]:
    r = httpx.get(
        gw.url + "/admin/identity/explain",
        params={"tenant": "acme", "a": anon, "a_type": "anonymous_id", "b": user},
        headers=OPERATOR,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def seen_before_rotation(gw: Served) -> str:
    """Consent, events and a login for person A; returns A's unified ID downstream."""
    grant(gw, "anon-A", "analytics", "identity_linking")
    assert track(gw, "a-1", anonymousId="anon-A", context={"device": {"id": "dev-A"}})["accepted"] == 1
    login = {"type": "identify", "userId": "u-A", "anonymousId": "anon-A", "messageId": "a-2"}
    r = httpx.post(gw.url + "/v1/batch", auth=APP, json={"batch": [login]}, timeout=10)
    assert r.json()["accepted"] == 1, r.text
    uid: str = delivered(gw.data_dir, "a-1")["context"]["unified_id"]
    assert delivered(gw.data_dir, "a-2")["context"]["unified_id"] == uid
    return uid


def test_consent_links_audit_and_ids_survive_a_key_rotation(tmp_path: Path, serve: ServeFactory) -> None:
    keys, data = tmp_path / "keys.json", tmp_path / "var"
    generate(keys)
    gw = serve(data, env=keyed_env(keys, data)).wait_ready()
    uid = seen_before_rotation(gw)
    records_before = audit_records(gw, "anon-A")
    assert records_before and explain(gw, "anon-A", "u-A")["linked"] is True
    gw.stop()

    generate(keys)  # rotation: v2 becomes active, v1 stays live
    gw = serve(data, env=keyed_env(keys, data)).wait_ready()

    # consent recorded under v1 still counts: the event is accepted, not dropped as no_consent
    answer = track(gw, "a-3", anonymousId="anon-A", context={"device": {"id": "dev-A"}})
    assert answer["accepted"] == 1 and answer["dropped"] == {}, answer
    after = delivered(data, "a-3")
    assert after["anonymousId"].startswith("k2.")  # new writes use the active version
    assert after["context"]["unified_id"] == uid  # downstream keeps the person's ID
    # destinations learn the identifier's new pseudonym, for the same person
    rekeyed = [e for e in sink_events(data) if e.get("type") == "identity.rekeyed"]
    assert rekeyed and {e["unifiedId"] for e in rekeyed} == {uid}
    assert any(e["newIdentifier"]["id"] == after["anonymousId"] for e in rekeyed)

    # the audit trail finds the records made under v1
    assert [r["seq"] for r in audit_records(gw, "anon-A")] == [r["seq"] for r in records_before]
    # the login link made under v1 holds (u-A not seen since: still its v1 node)
    assert explain(gw, "anon-A", "u-A")["linked"] is True
    # a withdrawal under v2 beats the v1 grant; a later grant under v2 beats the withdrawal
    withdraw(gw, "anon-A", "analytics")
    assert track(gw, "a-4", anonymousId="anon-A")["dropped"] == {"withdrawn": 1}
    grant(gw, "anon-A", "analytics")
    assert track(gw, "a-5", anonymousId="anon-A")["accepted"] == 1
    assert len(audit_records(gw, "anon-A")) == len(records_before) + 2

    # erasure removes the person's identifiers whatever version the graph holds them under
    r = httpx.post(
        gw.url + "/admin/identity/erase",
        json={
            "tenant": "acme",
            "identifiers": [{"type": "anonymous_id", "id": "anon-A"}, {"type": "user_id", "id": "u-A"}],
        },
        headers=COMPLIANCE,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["erased"] == 2 and r.json()["notInGraph"] == 0, r.json()
    assert explain(gw, "anon-A", "u-A")["linked"] is False


def test_a_never_linked_visitor_keeps_their_unified_id_across_a_rotation(
    tmp_path: Path, serve: ServeFactory
) -> None:
    keys, data = tmp_path / "keys.json", tmp_path / "var"
    generate(keys)
    gw = serve(data, env=keyed_env(keys, data)).wait_ready()
    grant(gw, "anon-B", "analytics")  # no identity_linking: never linked, never stored in the graph
    track(gw, "b-1", anonymousId="anon-B")
    uid = delivered(data, "b-1")["context"]["unified_id"]
    gw.stop()
    generate(keys)
    gw = serve(data, env=keyed_env(keys, data)).wait_ready()
    assert track(gw, "b-2", anonymousId="anon-B")["accepted"] == 1
    assert delivered(data, "b-2")["context"]["unified_id"] == uid
