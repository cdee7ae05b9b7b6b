"""The trust boundary, attacked over real HTTP with nothing but a public (client) write key.

Each test plays one attack from issue 11 against a real `idgate serve` and shows that it no
longer works, and that the legitimate flow beside it still does: the shop's backend signs
an identity assertion after login (tests.conftest.assertion), the client passes it along,
and only then do person-level identifiers (user id, phone) carry consent or links.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_SENSORS_TOKEN,
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    Gateway,
    assertion,
    make_gateway,
    mid,
)
from tests.sensors.conftest import encode
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
LINKING = ["analytics", "identity_linking"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("trust")).start()
    yield g
    g.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def consent(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    if "grant" in body:
        body.setdefault("noticeId", "notice-v1")
    return httpx.post(f"{gw.url}/v1/consent", auth=(key, ""), json=body, timeout=10)


def send(gw: Gateway, key: str, kind: str, **body: Any) -> dict[str, Any]:
    body.setdefault("messageId", mid())
    r = httpx.post(f"{gw.url}/v1/{kind}", auth=(key, ""), json=body, timeout=10)
    assert r.status_code == 200, r.text
    return {"messageId": body["messageId"], **r.json()}


def delivered(gw: Gateway, sent: dict[str, Any]) -> dict[str, Any]:
    assert sent["accepted"] == 1, sent
    (event,) = wait_until(
        lambda: [e for e in gw.sink_lines("mall-warehouse") if e["messageId"] == sent["messageId"]],
        20,
        what="the event at mall-warehouse",
    )
    return event


def login(gw: Gateway, user: str, device: str, *, phone: str | None = None) -> str:
    """The legitimate flow: after login the shop's backend signs an assertion binding the
    user (and phone) to the device; the web SDK records consent and identifies with it.
    Returns the person's unified ID."""
    token = assertion(user, device, ids=[("phone", phone)] if phone else ())
    r = consent(gw, MALL_WEB_KEY, anonymousId=device, userId=user, grant=LINKING, identityAssertion=token)
    assert r.status_code == 200 and "refused" not in r.json(), r.text
    traits = {"phone": phone} if phone else {}
    ident = send(
        gw,
        MALL_WEB_KEY,
        "identify",
        anonymousId=device,
        userId=user,
        traits=traits,
        context={"identityAssertion": token},
    )
    assert "refusedAssertions" not in ident, ident
    return str(delivered(gw, ident)["context"]["unified_id"])


def explain(gw: Gateway, a: tuple[str, str], b: tuple[str, str]) -> dict[str, Any]:
    r = httpx.get(
        f"{gw.url}/admin/identity/explain",
        params={"tenant": "mall", "a_type": a[0], "a": a[1], "b_type": b[0], "b": b[1]},
        # raw identifiers: a compliance look-up (operators work on node ids)
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def refused_count(gw: Gateway, reason: str) -> float:
    """idgate_events_refused_assertion_total for the mall and one reason (0 before the first)."""
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    series = f'idgate_events_refused_assertion_total{{reason="{reason}",tenant="mall"}} '
    line = next((x for x in metrics.splitlines() if x.startswith(series)), None)
    return float(line.removeprefix(series)) if line else 0.0


def test_forged_grant_cannot_override_a_withdrawal(gw: Gateway) -> None:
    t = tag()
    user, device, attacker = f"user-{t}", f"dev-{t}", f"evil-{t}"
    login(gw, user, device)
    # the person withdraws on their own device, logged in: it speaks for the whole person
    token = assertion(user, device)
    r = consent(
        gw, MALL_WEB_KEY, anonymousId=device, userId=user, withdraw=["analytics"], identityAssertion=token
    )
    assert r.status_code == 200, r.text

    # a stranger with the public key names only the user id: nothing is recorded
    before = refused_count(gw, "unproven_identifier")
    forged = consent(gw, MALL_WEB_KEY, userId=user, grant=["analytics"])
    assert forged.status_code == 403, forged.text
    assert forged.json()["error"] == "assertion_required" and forged.json()["field"] == "userId"
    # refused whole, and counted like a partial refusal
    assert refused_count(gw, "unproven_identifier") == before + 1
    # ... or names it beside a device of their own: only their own device gets the grant
    mixed = consent(gw, MALL_WEB_KEY, anonymousId=attacker, userId=user, grant=["analytics"])
    assert mixed.status_code == 200, mixed.text
    assert [(p["field"], p["reason"]) for p in mixed.json()["refused"]] == [("userId", "unproven_identifier")]

    # the backend's own events for the person stay withheld
    server = send(gw, MALL_SERVER_KEY, "track", userId=user, event="Product Viewed")
    assert server["accepted"] == 0 and server["dropped"] == {"withdrawn": 1}, server
    # and the person's own device too
    own = send(gw, MALL_WEB_KEY, "track", anonymousId=device, userId=user, event="Product Viewed")
    assert own["accepted"] == 0 and own["dropped"] == {"withdrawn": 1}, own


def test_forged_minor_flag_clearing_is_refused(gw: Gateway) -> None:
    t = tag()
    child, attacker, child_device = f"child-{t}", f"evil-{t}", f"kid-{t}"
    # the shop's backend knows the subject is 13 and has a general analytics grant
    for body in ({"subjectIsMinor": True}, {"grant": ["analytics"]}):
        r = consent(gw, MALL_SERVER_KEY, userId=child, **body)
        assert r.status_code == 200, r.text
    held = send(gw, MALL_SERVER_KEY, "track", userId=child, event="Product Viewed")
    assert held["dropped"] == {"minor_without_guardian": 1}, held

    before = refused_count(gw, "guardian_assertion_required")
    for body in ({"userId": child}, {"userId": child, "anonymousId": attacker}, {"anonymousId": attacker}):
        r = consent(gw, MALL_WEB_KEY, subjectIsMinor=False, **body)
        assert r.status_code == 403, r.text
        assert r.json()["error"] in {"assertion_required", "guardian_assertion_required"}
    assert refused_count(gw, "guardian_assertion_required") == before + 2
    still = send(gw, MALL_SERVER_KEY, "track", userId=child, event="Product Viewed")
    assert still["dropped"] == {"minor_without_guardian": 1}, still

    # the guardian flow: the backend verified the guardian and says so in the assertion
    token = assertion(child, child_device, guardian=True)
    r = consent(
        gw,
        MALL_WEB_KEY,
        anonymousId=child_device,
        userId=child,
        grant=["analytics"],
        consentKind="guardian",
        identityAssertion=token,
    )
    assert r.status_code == 200 and "refused" not in r.json(), r.text
    allowed = send(gw, MALL_SERVER_KEY, "track", userId=child, event="Product Viewed")
    assert allowed["accepted"] == 1, allowed


def test_foreign_withdrawal_and_age_trait_do_not_silence_a_person(gw: Gateway) -> None:
    t = tag()
    user, device, attacker = f"user-{t}", f"dev-{t}", f"evil-{t}"
    login(gw, user, device)

    r = consent(gw, MALL_WEB_KEY, userId=user, withdraw=["analytics"])
    assert r.status_code == 403, r.text
    r = consent(
        gw, MALL_WEB_KEY, identifiers=[{"type": "phone", "id": "13912340077"}], withdraw=["analytics"]
    )
    assert r.status_code == 403, r.text
    # an identify naming the victim with an age under 14, from the attacker's own device
    ident = send(gw, MALL_WEB_KEY, "identify", anonymousId=attacker, userId=user, traits={"age": 10})
    assert [x["error"] for x in ident["refusedAssertions"]] == ["unproven_identifier"], ident

    event = delivered(
        gw, send(gw, MALL_WEB_KEY, "track", anonymousId=device, userId=user, event="Product Viewed")
    )
    assert event["context"]["unified_id"]


def test_phone_number_takeover(gw: Gateway) -> None:
    t = tag()
    user, device, attacker = f"user-{t}", f"dev-{t}", f"evil-{t}"
    phone = "139" + str(uuid.uuid4().int)[:8]
    victim_uid = login(gw, user, device, phone=phone)
    assert explain(gw, ("user_id", user), ("phone", phone))["linked"]

    # the attacker consents on their own device and claims the victim's phone
    r = consent(gw, MALL_WEB_KEY, anonymousId=attacker, grant=LINKING)
    assert r.status_code == 200, r.text
    claim = send(gw, MALL_WEB_KEY, "identify", anonymousId=attacker, traits={"phone": phone})
    assert [x["error"] for x in claim["refusedAssertions"]] == ["unproven_identifier"], claim
    theirs = delivered(gw, claim)
    assert theirs["context"]["unified_id"] != victim_uid
    assert not explain(gw, ("anonymous_id", attacker), ("phone", phone))["linked"]
    later = delivered(gw, send(gw, MALL_WEB_KEY, "track", anonymousId=attacker, event="Product Viewed"))
    assert later["context"]["unified_id"] != victim_uid

    # a withdrawal on the attacker's device is the attacker's alone
    r = consent(gw, MALL_WEB_KEY, anonymousId=attacker, withdraw=["analytics"])
    assert r.status_code == 200, r.text
    event = delivered(
        gw, send(gw, MALL_WEB_KEY, "track", anonymousId=device, userId=user, event="Product Viewed")
    )
    assert event["context"]["unified_id"] == victim_uid


def test_foreign_unbind_leaves_the_victims_identifiers(gw: Gateway) -> None:
    t = tag()
    user, device, attacker = f"user-{t}", f"dev-{t}", f"evil-{t}"
    phone = "139" + str(uuid.uuid4().int)[:8]
    login(gw, user, device, phone=phone)
    unbind = {
        "type": "track_id_unbind",
        "event": "$UnbindID",
        "distinct_id": attacker,
        "identities": {"$identity_mobile": phone},
        "time": 1_700_000_000_000,
        "lib": {"$lib": "MiniProgram", "$lib_version": "1.0"},
        "properties": {},
    }
    r = httpx.post(
        f"{gw.url}/sa?project=mall&token={MALL_SENSORS_TOKEN}",
        content=f"data_list={quote(encode([unbind]))}&gzip=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    # the attacker's own device is what it may detach; the phone stays with its person
    gw.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])
    assert explain(gw, ("user_id", user), ("phone", phone))["linked"]


def test_breaker_storm_cannot_lock_a_person_out(gw: Gateway) -> None:
    t = tag()
    user = f"user-{t}"
    victim_uid = login(gw, user, f"dev1-{t}")
    # twelve fresh devices claim the victim's user id without proof
    for i in range(12):
        fake = f"evil-{t}-{i}"
        assert consent(gw, MALL_WEB_KEY, anonymousId=fake, grant=LINKING).status_code == 200
        send(gw, MALL_WEB_KEY, "identify", anonymousId=fake, userId=user)
    # the victim's real new device still joins their person at login
    new_device = f"dev2-{t}"
    assert login(gw, user, new_device) == victim_uid
    assert explain(gw, ("user_id", user), ("anonymous_id", new_device))["linked"]
    for i in range(12):
        assert not explain(gw, ("user_id", user), ("anonymous_id", f"evil-{t}-{i}"))["linked"]


def test_assertion_for_another_device_or_expired_is_refused(gw: Gateway) -> None:
    t = tag()
    user, device, attacker = f"user-{t}", f"dev-{t}", f"evil-{t}"
    login(gw, user, device)
    # a token lifted from the victim's device does not work from another one
    stolen = assertion(user, device)
    r = consent(
        gw, MALL_WEB_KEY, anonymousId=attacker, userId=user, grant=["analytics"], identityAssertion=stolen
    )
    assert r.status_code == 200, r.text
    reasons = {p["reason"] for p in r.json()["refused"]}
    assert reasons == {"assertion_device_mismatch", "unproven_identifier"}, r.text
    expired = assertion(user, attacker, now=0)
    r = consent(
        gw, MALL_WEB_KEY, anonymousId=attacker, userId=user, grant=["analytics"], identityAssertion=expired
    )
    assert {p["reason"] for p in r.json()["refused"]} == {"assertion_expired", "unproven_identifier"}, r.text
    forged = assertion(user, attacker, secret="not-the-shops-secret-000000000000000000")
    r = consent(
        gw, MALL_WEB_KEY, anonymousId=attacker, userId=user, grant=["analytics"], identityAssertion=forged
    )
    assert {p["reason"] for p in r.json()["refused"]} == {"assertion_signature", "unproven_identifier"}, (
        r.text
    )
    assert not explain(gw, ("user_id", user), ("anonymous_id", attacker))["linked"]
    # refusals are counted by reason
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for reason in (
        "assertion_device_mismatch",
        "assertion_expired",
        "assertion_signature",
        "unproven_identifier",
    ):
        assert f'idgate_events_refused_assertion_total{{reason="{reason}",tenant="mall"}}' in metrics


def test_segment_client_links_after_a_signed_login_and_not_without(gw: Gateway) -> None:
    """The real segment-analytics-python client: consent for its own device, then identify
    with the backend's assertion in the context links the login; the same call without it
    (or from another device) leaves the person alone."""
    from segment.analytics import Client

    t = tag()
    user, device, other = f"user-{t}", f"dev-{t}", f"other-{t}"
    for anon in (device, other):
        assert consent(gw, MALL_WEB_KEY, anonymousId=anon, grant=LINKING).status_code == 200
    errors: list[Exception] = []
    client = Client(MALL_WEB_KEY, host=gw.url, on_error=lambda e, _b: errors.append(e), max_retries=1)
    client.identify(user, {}, anonymous_id=other)  # no assertion: not linked
    client.identify(user, {}, anonymous_id=device, context={"identityAssertion": assertion(user, device)})
    client.track(user, "Product Viewed", {"sku": "SKU-1"}, anonymous_id=device)
    client.flush()
    client.shutdown()
    assert errors == []
    wait_until(
        lambda: explain(gw, ("user_id", user), ("anonymous_id", device))["linked"],
        20,
        what="the signed login to link",
    )
    assert not explain(gw, ("user_id", user), ("anonymous_id", other))["linked"]
