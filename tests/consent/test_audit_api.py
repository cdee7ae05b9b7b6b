"""The compliance officers' API: records, point in time with deliveries, exports, stats,
roles, and the access log of their own queries."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from click.testing import CliRunner

from gateway.privacy import message_id_digest
from identity.pseudonym import MESSAGE_ID
from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    Gateway,
    assertion,
    make_gateway,
    mid,
)

pytestmark = pytest.mark.slow


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    g = make_gateway(tmp_path_factory.mktemp("audit"), extra_env={"IDGATE_CHECKPOINT_SECONDS": "1"}).start()
    yield g
    g.stop()


def grant_and_send(gw: Gateway, user: str, anon: str) -> tuple[int, str]:
    r = httpx.post(
        gw.url + "/v1/consent",
        auth=(MALL_WEB_KEY, ""),
        json={
            "userId": user,
            "anonymousId": anon,
            "grant": ["analytics"],
            "noticeId": "notice-v1",
            "identityAssertion": assertion(user, anon),
        },
    )
    seq = r.json()["recorded"][0]["seq"]
    m = mid()
    httpx.post(
        gw.url + "/v1/track",
        auth=(MALL_WEB_KEY, ""),
        json={"userId": user, "anonymousId": anon, "event": "Product Viewed", "messageId": m},
    )
    assert gw.wait_for_sink({m}, "mall-warehouse")
    return seq, m


def test_point_in_time_view_names_the_deliveries_that_relied_on_consent(gw: Gateway) -> None:
    user, anon = f"officer-case-{uuid.uuid4().hex[:6]}", f"anon-{uuid.uuid4().hex[:8]}"
    seq, m = grant_and_send(gw, user, anon)
    before_withdrawal = datetime.now(UTC).isoformat()
    # withdrawn in the account settings: the shop's backend records it (server source)
    r = httpx.post(
        gw.url + "/v1/consent", auth=(MALL_SERVER_KEY, ""), json={"userId": user, "withdraw": ["analytics"]}
    )
    assert r.status_code == 200, r.text
    headers = bearer(COMPLIANCE_TOKEN)
    deadline_ok = False
    for _ in range(50):  # the delivery proof is written with the delivery cursor
        r = httpx.get(
            gw.url + "/admin/consent/subject",
            headers=headers,
            params={"tenant": "mall", "identifier": user, "at": before_withdrawal},
        )
        assert r.status_code == 200, r.text
        view = r.json()
        if view["deliveries"]:
            deadline_ok = True
            break
    assert deadline_ok
    assert view["purposes"]["analytics"]["state"] == "given" and view["purposes"]["analytics"]["seq"] == seq
    # message ids are kept in the proofs as keyed hashes, never as the client sent them
    digest = message_id_digest(m, gw.keyring().anchor("mall").internal(MESSAGE_ID))
    assert {(d["destination"], d["messageId"], d["ledgerSeq"]) for d in view["deliveries"]} == {
        ("mall-warehouse", digest, seq)
    }
    now = httpx.get(
        gw.url + "/admin/consent/subject", headers=headers, params={"tenant": "mall", "identifier": user}
    ).json()
    assert now["purposes"]["analytics"]["state"] == "withdrawn"
    assert user not in json.dumps(view) and user not in json.dumps(now)  # pseudonyms only


def test_records_query_filters(gw: Gateway) -> None:
    user, anon = f"filter-{uuid.uuid4().hex[:6]}", f"anon-{uuid.uuid4().hex[:8]}"
    grant_and_send(gw, user, anon)
    headers = bearer(COMPLIANCE_TOKEN)
    base = {"tenant": "mall", "identifier": user}
    assert (
        len(httpx.get(gw.url + "/admin/consent/records", headers=headers, params=base).json()["records"]) == 1
    )
    assert (
        httpx.get(
            gw.url + "/admin/consent/records", headers=headers, params={**base, "purpose": "marketing"}
        ).json()["records"]
        == []
    )
    assert (
        httpx.get(
            gw.url + "/admin/consent/records",
            headers=headers,
            params={**base, "since": "2999-01-01T00:00:00Z"},
        ).json()["records"]
        == []
    )
    by_notice = httpx.get(
        gw.url + "/admin/consent/records", headers=headers, params={"tenant": "mall", "notice": "notice-v1"}
    ).json()["records"]
    assert by_notice and all(r["noticeId"] == "notice-v1" for r in by_notice)
    r = httpx.get(gw.url + "/admin/consent/records", headers=headers, params={**base, "since": "yesterday"})
    assert r.status_code == 400 and r.json()["field"] == "since"


def test_exports_verify_offline_and_csv(gw: Gateway, tmp_path) -> None:
    from consent.cli import ledger

    grant_and_send(gw, f"export-{uuid.uuid4().hex[:6]}", f"anon-{uuid.uuid4().hex[:8]}")
    r = httpx.get(gw.url + "/admin/consent/export", headers=bearer(COMPLIANCE_TOKEN))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(r.content)
    ok = CliRunner().invoke(ledger, ["verify", str(path)])
    assert ok.exit_code == 0, ok.output
    lines = path.read_text().splitlines()
    record_lines = [i for i, line in enumerate(lines) if json.loads(line).get("kind") == "record"]
    doctored = json.loads(lines[record_lines[1]])
    doctored["purposes"] = ["marketing"]
    lines[record_lines[1]] = json.dumps(doctored)
    path.write_text("\n".join(lines) + "\n")
    bad = CliRunner().invoke(ledger, ["verify", str(path)])
    assert bad.exit_code == 1 and "edited" in bad.output
    csv_r = httpx.get(
        gw.url + "/admin/consent/export",
        headers=bearer(COMPLIANCE_TOKEN),
        params={"tenant": "mall", "format": "csv"},
    )
    assert csv_r.status_code == 200 and csv_r.text.splitlines()[0].startswith(("seq", "kind", "#"))
    cps = httpx.get(
        gw.url + "/admin/consent/export",
        headers=bearer(COMPLIANCE_TOKEN),
        params={"format": "csv", "part": "checkpoints"},
    )
    assert cps.status_code == 200 and "root" in cps.text.splitlines()[0]


def test_stats_by_purpose_notice_platform(gw: Gateway) -> None:
    grant_and_send(gw, f"stats-{uuid.uuid4().hex[:6]}", f"anon-{uuid.uuid4().hex[:8]}")
    for by in ("purpose", "notice", "platform"):
        r = httpx.get(
            gw.url + "/admin/consent/stats",
            headers=bearer(COMPLIANCE_TOKEN),
            params={"tenant": "mall", "by": by},
        )
        assert r.status_code == 200, r.text
        groups = r.json()["groups"]
        assert groups
        assert all(0 <= g["rate"] <= 1 for g in groups.values() if g["rate"] is not None)
    by_platform = httpx.get(
        gw.url + "/admin/consent/stats",
        headers=bearer(COMPLIANCE_TOKEN),
        params={"tenant": "mall", "by": "platform"},
    ).json()["groups"]
    assert by_platform["web"]["given"] >= 1


def test_stats_as_they_stood_at_a_past_time(gw: Gateway) -> None:
    """``at``: only records written by then count, so a rate can be followed over time; a bad
    time is a 400 naming the field."""

    def stats(**params: str) -> httpx.Response:
        return httpx.get(
            gw.url + "/admin/consent/stats",
            headers=bearer(COMPLIANCE_TOKEN),
            params={"tenant": "mall", "by": "platform", **params},
        )

    before = datetime.now(UTC)
    given_before = stats(at=before.isoformat()).json()["groups"].get("web", {}).get("given", 0)
    grant_and_send(gw, f"stats-{uuid.uuid4().hex[:6]}", f"anon-{uuid.uuid4().hex[:8]}")
    then = stats(at=before.isoformat())
    assert then.status_code == 200, then.text
    assert then.json()["at"] is not None
    assert then.json()["groups"].get("web", {}).get("given", 0) == given_before  # the grant came later
    now = stats().json()
    assert now["at"] is None and now["groups"]["web"]["given"] > given_before
    bad = stats(at="yesterday")
    assert bad.status_code == 400 and bad.json()["field"] == "at"


def test_roles_and_tenant_scope(gw: Gateway) -> None:
    params = {"tenant": "mall", "identifier": "someone"}
    assert httpx.get(gw.url + "/admin/consent/records", params=params).status_code == 401
    assert (
        httpx.get(
            gw.url + "/admin/consent/records", params=params, headers=bearer("not-a-token-at-all")
        ).status_code
        == 401
    )
    r = httpx.get(gw.url + "/admin/consent/records", params=params, headers=bearer(OPERATOR_TOKEN))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = httpx.get(gw.url + "/admin/consent/records", params=params, headers=bearer("other-compliance-token"))
    assert r.status_code == 403
    r = httpx.post(
        gw.url + "/admin/notices",
        headers=bearer(COMPLIANCE_TOKEN),
        json={"tenant": "mall", "id": "x", "contentSha256": "0" * 64},
    )
    assert r.status_code == 403
    assert httpx.get(gw.url + "/admin/consent/verify", headers=bearer(OPERATOR_TOKEN)).json()["ok"] is True


def test_every_officer_query_is_in_the_access_log_without_raw_identifiers(gw: Gateway) -> None:
    raw = f"logged-{uuid.uuid4().hex[:6]}"
    httpx.get(
        gw.url + "/admin/consent/records",
        headers=bearer(COMPLIANCE_TOKEN),
        params={"tenant": "mall", "identifier": raw},
    )
    entries = httpx.get(gw.url + "/admin/access-log", headers=bearer(COMPLIANCE_TOKEN)).json()["entries"]
    mine = [e for e in entries if e["action"] == "consent.records" and e["officer"] == "dpo"]
    assert mine and mine[0]["params"]["subject"].startswith("k1.")
    assert raw not in json.dumps(entries)
    # reading the access log is itself logged
    again = httpx.get(gw.url + "/admin/access-log", headers=bearer(COMPLIANCE_TOKEN)).json()["entries"]
    assert again[0]["action"] == "admin.access_log"
