"""Key rotation that keeps the past, over real HTTP: a real ``idgate serve`` with a key file,
``idgate keys generate`` adding a version, the gateway restarted on the same data. The same
person's consent, links, audit trail, unified ID and erasure must work after the rotation
as before it; ``idgate keys rotate`` moves stored state to the new version (resumable after
a kill) and ``idgate keys retire`` refuses while anything still refers to the old one."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from consent.signing import new_ledger_key_b64
from tests.cli.conftest import Served, ServeFactory, clean_env, idgate
from tests.conftest import IDGATE, PostgresSchema, RedisNamespace, jsonl_records
from tests.waiting import wait_until

APP = ("acme-app-demo-key", "")
# person-level identifiers (a login) are asserted by the shop's backend (trust model)
SERVER = ("acme-server-demo-key-0000000000000001", "")
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
    return jsonl_records(sorted((data_dir / "sinks" / "warehouse").glob("*.jsonl")))


def delivered(data_dir: Path, message_id: str, timeout: float = 20) -> dict[str, Any]:
    found = wait_until(
        lambda: [e for e in sink_events(data_dir) if e.get("messageId") == message_id],
        timeout,
        what=f"{message_id} at the warehouse",
    )
    return found[0]


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
        # raw identifiers: a look-up for the compliance role
        params={"tenant": "acme", "a": anon, "a_type": "anonymous_id", "b": user, "b_type": "user_id"},
        headers=COMPLIANCE,
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
    r = httpx.post(gw.url + "/v1/batch", auth=SERVER, json={"batch": [login]}, timeout=10)
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


def consent_db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(data / "consent.sqlite3", timeout=30)


def rotation_cursor(data: Path) -> int:
    with closing(consent_db(data)) as db:
        row = db.execute(
            "SELECT applied_seq FROM consent_projection WHERE name = 'key_rotation:acme'"
        ).fetchone()
    return int(row[0]) if row else 0


def subjects_under(data: Path, version: int) -> int:
    with closing(consent_db(data)) as db:
        row = db.execute(
            "SELECT count(DISTINCT identifier) FROM consent_state WHERE identifier LIKE ?", (f"k{version}.%",)
        ).fetchone()
    return int(row[0])


def test_keys_rotate_resumes_after_a_kill_and_retire_waits_for_nothing_to_refer_to_the_version(
    tmp_path: Path, serve: ServeFactory
) -> None:
    keys, data = tmp_path / "keys.json", tmp_path / "var"
    env = keyed_env(keys, data)
    generate(keys)
    gw = serve(data, env=env).wait_ready()
    visitors = [f"anon-{i}" for i in range(120)]
    with httpx.Client(base_url=gw.url, auth=APP, timeout=10) as client:
        for anon in visitors:
            r = client.post(
                "/v1/consent",
                json={"anonymousId": anon, "grant": ["analytics"], "noticeId": "privacy-2026-11"},
            )
            assert r.status_code == 200, r.text
    uid = seen_before_rotation(gw)  # anon-A and u-A, linked: identity nodes under v1
    assert track(gw, "v-anon-5", anonymousId="anon-5")["accepted"] == 1  # never linked
    uid5 = delivered(data, "v-anon-5")["context"]["unified_id"]
    gw.stop()
    assert subjects_under(data, 1) == len(visitors) + 1

    generate(keys)
    gw = serve(data, env=env).wait_ready()
    # the visitors come back: their subjects' new pseudonyms are learned from their events
    with httpx.Client(base_url=gw.url, auth=APP, timeout=10) as client:
        for start in range(0, len(visitors), 40):
            batch = [
                {"type": "track", "event": "Product Viewed", "anonymousId": anon, "messageId": f"r-{anon}"}
                for anon in visitors[start : start + 40]
            ]
            r = client.post("/v1/batch", json={"batch": batch})
            assert r.json()["accepted"] == len(batch), r.text
    assert subjects_under(data, 1) == len(visitors) + 1  # nothing moved yet: read through aliases

    # a run killed mid-way leaves its cursor where it stopped
    argv = [str(IDGATE), "keys", "rotate", "--batch-size", "1", "--throttle-ms", "25"]
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def moved_twenty() -> bool:
        assert run.poll() is None, run.communicate()
        return rotation_cursor(data) >= 20

    wait_until(moved_twenty, 60, what="keys rotate to move 20 subjects")
    run.kill()
    run.wait()
    stopped_at = rotation_cursor(data)
    assert 20 <= stopped_at < len(visitors)
    assert 0 < subjects_under(data, 1) < len(visitors) + 1

    # retire refuses while anything refers to v1
    refused = idgate("keys", "retire", "--tenant", "acme", "--version", "1", env=env)
    assert refused.returncode == 1 and "refusing to retire acme v1" in refused.stderr, refused.stderr
    assert "1" in json.loads(keys.read_text())["tenants"]["acme"]["keys"]

    # resumed: the rest is moved, nothing twice; A (anon-A, dev-A, u-A) not seen since the rotation
    resumed = idgate("keys", "rotate", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(visitors) - stopped_at} subject(s) re-keyed" in resumed.stdout, resumed.stdout
    assert "v1 still referred to by 1 consent subject(s), 3 identity node(s)" in resumed.stdout
    assert "re-keying consent subjects" in resumed.stderr  # the progress bar
    assert subjects_under(data, 1) == 1 and subjects_under(data, 2) == len(visitors)
    # the moved subjects' consent still holds
    assert track(gw, "r2-anon-7", anonymousId="anon-7")["accepted"] == 1

    # A comes back on the same device: their nodes and consent move too, then v1 can go
    login = {
        "type": "identify",
        "userId": "u-A",
        "anonymousId": "anon-A",
        "messageId": "a-9",
        "context": {"device": {"id": "dev-A"}},
    }
    assert (
        httpx.post(gw.url + "/v1/batch", auth=SERVER, json={"batch": [login]}, timeout=10).json()["accepted"]
        == 1
    )
    done = idgate("keys", "rotate", env=env)
    assert "v1 no longer referred to" in done.stdout, done.stdout
    retired = idgate("keys", "retire", "--tenant", "acme", "--version", "1", env=env)
    assert retired.returncode == 0, retired.stderr
    doc = json.loads(keys.read_text())["tenants"]["acme"]
    assert set(doc["keys"]) == {"2"} and set(doc["anchor_keys"]) == {"domain", "message-id"}
    assert os.stat(keys).st_mode & 0o077 == 0
    gw.stop()

    # with v2 alone the person keeps consent, links and their unified ID downstream
    gw = serve(data, env=env).wait_ready()
    assert track(gw, "a-10", anonymousId="anon-A")["accepted"] == 1
    assert delivered(data, "a-10")["context"]["unified_id"] == uid
    assert explain(gw, "anon-A", "u-A")["linked"] is True
    assert len(audit_records(gw, "anon-A")) >= 1
    # a never-linked visitor seen during the overlap keeps their ID too
    assert track(gw, "v2-anon-5", anonymousId="anon-5")["accepted"] == 1
    assert delivered(data, "v2-anon-5")["context"]["unified_id"] == uid5


def test_rotation_in_distributed_mode_rekeys_the_redis_projection(
    tmp_path: Path, serve: ServeFactory, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    import redis

    keys, data = tmp_path / "keys.json", tmp_path / "var"
    env = {
        **keyed_env(keys, data),
        "DATABASE_URL": pg_schema.url,
        "REDIS_URL": redis_ns.url,
        "IDGATE_REDIS_PREFIX": redis_ns.prefix,
        "IDGATE_LEDGER_KEY": new_ledger_key_b64(),
    }
    client = redis.Redis.from_url(redis_ns.url)

    def under(version: int) -> int:
        return sum(1 for _ in client.scan_iter(match=f"{redis_ns.prefix}:consent:acme:k{version}.*"))

    generate(keys)
    gw = serve(data, env=env).wait_ready()
    visitors = [f"anon-{i}" for i in range(30)]
    for anon in visitors:
        grant(gw, anon, "analytics")
    gw.stop()
    generate(keys)
    gw = serve(data, env=env).wait_ready()
    batch = [
        {"type": "track", "event": "Product Viewed", "anonymousId": anon, "messageId": f"r-{anon}"}
        for anon in visitors
    ]
    r = httpx.post(gw.url + "/v1/batch", auth=APP, json={"batch": batch}, timeout=10)
    assert r.json()["accepted"] == len(visitors), r.text
    assert under(1) == len(visitors) and under(2) == 0

    done = idgate("keys", "rotate", env=env)
    assert done.returncode == 0, done.stderr
    assert f"{len(visitors)} subject(s) re-keyed" in done.stdout and "v1 no longer referred to" in done.stdout
    assert under(1) == 0 and under(2) == len(visitors)
    # the gateway reads the moved state: consent holds, and a withdrawal under v2 stops events
    assert track(gw, "r2-anon-3", anonymousId="anon-3")["accepted"] == 1
    withdraw(gw, "anon-3", "analytics")
    assert track(gw, "r3-anon-3", anonymousId="anon-3")["dropped"] == {"withdrawn": 1}
    assert idgate("keys", "retire", "--tenant", "acme", "--version", "1", env=env).returncode == 0
    gw.stop()
    gw = serve(data, env=env).wait_ready()
    assert track(gw, "r4-anon-4", anonymousId="anon-4")["accepted"] == 1
    assert track(gw, "r4-anon-3", anonymousId="anon-3")["dropped"] == {"withdrawn": 1}
    client.close()
