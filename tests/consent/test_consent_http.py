"""Consent over real HTTP on the embedded gateway: recording, every decision rule, proof."""

from __future__ import annotations

import hashlib
import uuid
from contextlib import ExitStack

import httpx
import pytest

from tests.conftest import (
    MALL_APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    Gateway,
    assertion,
    backend_env,
    make_gateway,
    mid,
)

NOTICE = "notice-v1"


def ids() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"user-{tag}", f"anon-a-{tag}", f"anon-b-{tag}"


def consent(gw: Gateway, key: str = MALL_WEB_KEY, **body: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/consent", json={"noticeId": NOTICE, **body}, auth=(key, ""), timeout=10)


def track(
    gw: Gateway, event: str = "Product Viewed", key: str = MALL_WEB_KEY, **msg: object
) -> tuple[str, dict]:
    m = mid()
    body = {"type": "track", "event": event, "messageId": m, **msg}
    r = httpx.post(gw.url + "/v1/batch", json={"batch": [body]}, auth=(key, ""), timeout=10)
    assert r.status_code == 200, r.text
    return m, r.json()


def delivered(gw: Gateway, m: str, destination: str, timeout: float = 20) -> dict | None:
    """The event as ``destination`` received it, waiting up to ``timeout`` (failing past it).
    ``timeout=0``: what the sink holds now, None if not there: to show an event is NOT
    delivered, look with timeout=0 after ``gw.wait_past``."""
    if timeout == 0:
        return next((e for e in gw.sink_lines(destination) if e["messageId"] == m), None)
    return gw.wait_for_sink({m}, destination, timeout=timeout)[0]


pytestmark = pytest.mark.slow
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def mall(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The embedded gateway (SQLite) and one on PostgreSQL: every rule on both stores."""
    with ExitStack() as stack:
        env = backend_env(request.param, stack)
        gw = make_gateway(tmp_path_factory.mktemp(f"mall-{request.param}"), extra_env=env).start()
        gw.backend_env = env  # type: ignore[attr-defined]
        yield gw
        gw.stop()


def test_default_deny_before_any_consent(mall: Gateway) -> None:
    user, anon, _ = ids()
    m, out = track(mall, userId=user, anonymousId=anon)
    assert out["accepted"] == 0 and out["dropped"] == {"no_consent": 1}
    # necessary_service (contract basis) passes, to the destination that does only that
    paid, out = track(mall, "Payment Requested", userId=user, anonymousId=anon)
    assert out["accepted"] == 1
    assert delivered(mall, paid, "mall-orders") is not None
    mall.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])  # then look
    assert delivered(mall, paid, "mall-warehouse", timeout=0) is None
    assert delivered(mall, m, "mall-warehouse", timeout=0) is None  # never stored


def test_grant_then_forward_with_proof_then_withdraw_at_once(mall: Gateway) -> None:
    user, anon, _ = ids()
    r = consent(
        mall,
        userId=user,
        anonymousId=anon,
        grant=["analytics"],
        sdk="web-sdk/1.0",
        evidenceHash="sha256:" + "ab" * 32,
        identityAssertion=assertion(user, anon),
    )
    assert r.status_code == 200, r.text
    (receipt,) = r.json()["recorded"]
    assert receipt["state"] == "given" and receipt["purposes"] == ["analytics"]
    m, out = track(mall, userId=user, anonymousId=anon)
    assert out["accepted"] == 1
    event = delivered(mall, m, "mall-warehouse")
    assert event is not None and event["context"]["idgate"]["consentProof"] == [receipt["seq"]]
    # overseas needs cross_border, third-party ads need their own purposes: not granted
    mall.wait_past("mall-overseas", write_key=MALL_WEB_KEY, grant=["analytics", "cross_border"])
    assert delivered(mall, m, "mall-overseas", timeout=0) is None

    # logged in (the backend's assertion), the withdrawal speaks for the person
    r = consent(
        mall, userId=user, anonymousId=anon, withdraw=["analytics"], identityAssertion=assertion(user, anon)
    )
    assert r.status_code == 200, r.text
    m2, out = track(mall, userId=user, anonymousId=anon)
    assert out["accepted"] == 0 and out["dropped"] == {"withdrawn": 1}


def test_cross_border_and_third_party_need_separate_consent(mall: Gateway) -> None:
    _, anon, _ = ids()
    consent(mall, anonymousId=anon, grant=["analytics", "ad_measurement"])
    m, _ = track(mall, anonymousId=anon)
    ad, out = track(mall, "Ad Clicked", anonymousId=anon)
    assert out["dropped"] == {"third_party_without_consent": 1}
    consent(mall, anonymousId=anon, grant=["cross_border", "third_party_sharing"])
    m2, _ = track(mall, anonymousId=anon)
    ad2, _ = track(mall, "Ad Clicked", anonymousId=anon)
    assert delivered(mall, m2, "mall-overseas") is not None
    assert delivered(mall, ad2, "mall-ads") is not None
    # m2 went to mall-overseas after m, so the destination is past m: look now
    assert delivered(mall, m, "mall-overseas", timeout=0) is None
    # the separate consents stand as records of kind "separate"
    records = admin_records(mall, anon, "anonymous_id")
    kinds = {tuple(r["purposes"]): r["consentKind"] for r in records}
    assert kinds[("cross_border", "third_party_sharing")] == "separate"


def test_user_withdrawal_covers_other_devices_but_grants_do_not_spread(mall: Gateway) -> None:
    user, anon_a, anon_b = ids()
    consent(
        mall, userId=user, anonymousId=anon_a, grant=["analytics"], identityAssertion=assertion(user, anon_a)
    )
    # device B, same logged-in user: the grant was given on device A
    _, out = track(mall, userId=user, anonymousId=anon_b)
    assert out["dropped"] == {"no_consent": 1}
    consent(mall, anonymousId=anon_b, grant=["analytics"])
    _, out = track(mall, userId=user, anonymousId=anon_b)
    assert out["accepted"] == 1
    # the person withdraws while logged in on device A: device B stops too
    consent(
        mall,
        userId=user,
        anonymousId=anon_a,
        withdraw=["analytics"],
        identityAssertion=assertion(user, anon_a),
    )
    _, out = track(mall, userId=user, anonymousId=anon_b)
    assert out["dropped"] == {"withdrawn": 1}


def test_minor_needs_guardian_consent(mall: Gateway) -> None:
    child, anon, _ = ids()
    assert consent(mall, anonymousId=anon, grant=["analytics"], subjectIsMinor=True).status_code == 200
    _, out = track(mall, anonymousId=anon)
    assert out["dropped"] == {"minor_without_guardian": 1}
    # a guardian's consent is only taken with the backend's word that a guardian gave it
    r = consent(mall, anonymousId=anon, grant=["analytics"], consentKind="guardian")
    assert r.status_code == 403 and r.json()["field"] == "consentKind", r.text
    verified = assertion(child, anon, guardian=True)
    r = consent(
        mall, anonymousId=anon, grant=["analytics"], consentKind="guardian", identityAssertion=verified
    )
    assert r.status_code == 200, r.text
    _, out = track(mall, anonymousId=anon)
    assert out["accepted"] == 1


def test_age_trait_under_14_flags_a_minor(mall: Gateway) -> None:
    _, anon, _ = ids()
    consent(mall, anonymousId=anon, grant=["analytics"])
    _, out = track(mall, anonymousId=anon)
    assert out["accepted"] == 1
    r = httpx.post(
        mall.url + "/v1/identify",
        auth=(MALL_WEB_KEY, ""),
        json={"anonymousId": anon, "traits": {"age": 12}, "messageId": mid()},
    )
    assert r.status_code == 200
    _, out = track(mall, anonymousId=anon)
    assert out["dropped"] == {"minor_without_guardian": 1}
    records = admin_records(mall, anon, "anonymous_id")
    assert [r["type"] for r in records].count("subject_flag") == 1
    httpx.post(
        mall.url + "/v1/identify",
        auth=(MALL_WEB_KEY, ""),
        json={"anonymousId": anon, "traits": {"age": 12}, "messageId": mid()},
    )
    assert [r["type"] for r in admin_records(mall, anon, "anonymous_id")].count("subject_flag") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_material_notice_requires_reconsent(tmp_path, backend: str) -> None:
    stack = ExitStack()
    # its own ledger: a material notice affects everyone
    gw = make_gateway(tmp_path, extra_env=backend_env(backend, stack)).start()
    try:
        _, anon, _ = ids()
        consent(gw, anonymousId=anon, grant=["analytics", "ad_measurement"])
        _, out = track(gw, anonymousId=anon)
        assert out["accepted"] == 1
        new = {
            "tenant": "mall",
            "id": "notice-v2",
            "contentSha256": hashlib.sha256(b"v2").hexdigest(),
            "material": True,
            "purposesChanged": ["analytics"],
        }
        r = httpx.post(
            gw.url + "/admin/notices", json=new, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        )
        assert r.status_code == 201, r.text
        _, out = track(gw, anonymousId=anon)
        assert out["dropped"] == {"needs_reconsent": 1}
        _, out = track(gw, "Ad Clicked", anonymousId=anon)  # not a changed purpose
        assert out["dropped"] == {"third_party_without_consent": 1}
        assert consent(gw, anonymousId=anon, grant=["analytics"], noticeId="notice-v2").status_code == 200
        _, out = track(gw, anonymousId=anon)
        assert out["accepted"] == 1
    finally:
        gw.stop()
        stack.close()


def test_segment_consent_signals_are_records_of_what_changed(mall: Gateway) -> None:
    _, anon, _ = ids()
    prefs = {"consent": {"categoryPreferences": {"Analytics": True, "Advertising": False}}}
    _, out = track(mall, "Segment Consent Preference Updated", anonymousId=anon, context=prefs)
    assert out["accepted"] == 1  # recorded, then routed like any analytics event
    records = admin_records(mall, anon, "anonymous_id")
    assert {(tuple(r["purposes"]), r["state"]) for r in records} == {
        (("analytics",), "given"),
        (("ad_measurement", "marketing"), "withdrawn"),
    }
    # the consent tool repeats the choice on every event: nothing new is recorded
    _, out = track(mall, anonymousId=anon, context=prefs)
    assert out["accepted"] == 1 and len(admin_records(mall, anon, "anonymous_id")) == 2
    # the person turns analytics off: a withdrawal is recorded, this event is not sent
    off = {"consent": {"categoryPreferences": {"Analytics": False}}}
    _, out = track(mall, anonymousId=anon, context=off)
    assert out["dropped"] == {"refused_in_event": 1}
    _, out = track(mall, anonymousId=anon)
    assert out["dropped"] == {"withdrawn": 1}
    states = [(r["purposes"], r["state"]) for r in admin_records(mall, anon, "anonymous_id")]
    assert states.count((["analytics"], "withdrawn")) == 1
    # and on again
    _, out = track(mall, anonymousId=anon, context={"consent": {"categoryPreferences": {"Analytics": True}}})
    assert out["accepted"] == 1


def test_rudderstack_consent_management_ids_map_to_purposes(mall: Gateway) -> None:
    """RudderStack's context.consentManagement (OneTrust category ids, mapped in
    consent_categories: C0002 = analytics) is a record of what changed, for the device."""
    user, anon, _ = ids()
    cm = {
        "consentManagement": {"provider": "oneTrust", "allowedConsentIds": ["C0002"], "deniedConsentIds": []}
    }
    _, out = track(mall, anonymousId=anon, context=cm)
    assert out["accepted"] == 1
    denied = {
        "consentManagement": {"provider": "oneTrust", "allowedConsentIds": [], "deniedConsentIds": ["C0002"]}
    }
    _, out = track(mall, anonymousId=anon, userId=user, context=denied)
    assert out["dropped"] == {"refused_in_event": 1}
    assert (
        out["refusedAssertions"][0]["error"] == "unproven_identifier"
    )  # the user id: not theirs to withdraw
    records = admin_records(mall, anon, "anonymous_id")
    assert [(r["purposes"], r["state"]) for r in records] == [
        (["analytics"], "given"),
        (["analytics"], "withdrawn"),
    ]
    assert admin_records(mall, user, "user_id") == []


def test_sensitive_properties_pass_only_with_sensitive_pi(mall: Gateway) -> None:
    _, anon, _ = ids()
    consent(mall, anonymousId=anon, grant=["analytics"])
    m, _ = track(mall, anonymousId=anon, properties={"health_condition": "asthma", "sku": "A1"})
    assert delivered(mall, m, "mall-warehouse")["properties"] == {"sku": "A1"}
    consent(mall, anonymousId=anon, grant=["sensitive_pi"])
    m, _ = track(mall, anonymousId=anon, properties={"health_condition": "asthma", "sku": "A1"})
    assert delivered(mall, m, "mall-warehouse")["properties"] == {"health_condition": "asthma", "sku": "A1"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"anonymousId": "anon-x-1", "grant": ["analytics"], "noticeId": "nope"}, "noticeId"),
        ({"anonymousId": "anon-x-1", "grant": ["telepathy"]}, "grant"),
        ({"anonymousId": "anon-x-1", "withdraw": ["telepathy"]}, "withdraw"),
        ({"anonymousId": "null", "grant": ["analytics"]}, "anonymousId"),
        ({"grant": ["analytics"]}, "userId"),
        ({"anonymousId": "anon-x-1"}, "grant"),
        ({"anonymousId": "anon-x-1", "grant": ["analytics"], "withdraw": ["analytics"]}, "grant"),
        ({"anonymousId": "anon-x-1", "grant": "analytics"}, "grant"),
        (
            {"identifiers": [{"type": "wechat_openid", "id": "oAbc123456789"}], "grant": ["analytics"]},
            "identifiers[0].appid",
        ),
        ({"identifiers": [{"type": "shoe_size", "id": "42"}], "grant": ["analytics"]}, "identifiers[0].type"),
        ({"anonymousId": "anon-x-1", "grant": ["analytics"], "consentKind": "maybe"}, "consentKind"),
    ],
)
def test_bad_consent_calls_name_the_field(mall: Gateway, body: dict, field: str) -> None:
    r = httpx.post(
        mall.url + "/v1/consent",
        json={"noticeId": NOTICE, **body} if "noticeId" not in body else body,
        auth=(MALL_WEB_KEY, ""),
    )
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field


def test_consent_needs_a_write_key(mall: Gateway) -> None:
    r = httpx.post(mall.url + "/v1/consent", json={"anonymousId": "anon-x-1", "grant": ["analytics"]})
    assert r.status_code == 401


def test_app_source_records_platform(mall: Gateway) -> None:
    _, anon, _ = ids()
    assert consent(mall, MALL_APP_KEY, anonymousId=anon, grant=["analytics"]).status_code == 200
    (record,) = admin_records(mall, anon, "anonymous_id")
    assert record["platform"] == "app" and record["source"] == "mall-app"


def admin_records(gw: Gateway, identifier: str, id_type: str) -> list[dict]:
    from tests.conftest import COMPLIANCE_TOKEN

    r = httpx.get(
        gw.url + "/admin/consent/records",
        params={"tenant": "mall", "identifier": identifier, "type": id_type},
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
    )
    assert r.status_code == 200, r.text
    return r.json()["records"]
