"""One person across App, Web and mini-program, over real HTTP; over-merge protection."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import (
    MALL_APP_KEY,
    MALL_MP_KEY,
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    Gateway,
    assertion,
    make_gateway,
    mid,
)
from tests.waiting import wait_until

OPS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

pytestmark = pytest.mark.slow


@pytest.fixture
def gw(tmp_path):
    g = make_gateway(tmp_path).start()
    yield g
    g.stop()


def send(gw: Gateway, key: str, kind: str, **body: object) -> str:
    m = mid()
    r = httpx.post(f"{gw.url}/v1/{kind}", auth=(key, ""), json={"messageId": m, **body}, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    return m


def grant(gw: Gateway, key: str, purposes: list[str], **subject: object) -> None:
    r = httpx.post(
        f"{gw.url}/v1/consent",
        auth=(key, ""),
        json={"grant": purposes, "noticeId": "notice-v1", **subject},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def shopper_journey(gw: Gateway, with_linking: bool) -> tuple[list[str], str]:
    tag = uuid.uuid4().hex[:8]
    user, cookie, device, openid = f"user-{tag}", f"cookie-{tag}", f"idfv-{tag}-0000", f"oOpenId{tag}"
    wx = {"externalIds": [{"id": openid, "type": "wx_openid", "appid": "wxA", "collection": "users"}]}
    purposes = ["analytics"] + (["identity_linking"] if with_linking else [])
    # consent on each device, as each SDK asks for it
    grant(
        gw,
        MALL_MP_KEY,
        purposes,
        anonymousId=f"mp-{tag}",
        identifiers=[{"type": "wechat_openid", "id": openid, "appid": "wxA"}],
    )
    grant(gw, MALL_WEB_KEY, purposes, anonymousId=cookie)
    grant(
        gw,
        MALL_APP_KEY,
        purposes,
        userId=user,
        identifiers=[{"type": "device_id", "id": device}],
        identityAssertion=assertion(user, device),
    )
    # at each login the shop's backend signs an assertion for that device (tests.conftest.assertion)
    sent = [
        # browses the mini-program
        send(gw, MALL_MP_KEY, "page", anonymousId=f"mp-{tag}", name="Home", context=wx),
        # the website: anonymous, then logs in
        send(gw, MALL_WEB_KEY, "track", anonymousId=cookie, event="Product Viewed"),
        send(
            gw,
            MALL_WEB_KEY,
            "identify",
            anonymousId=cookie,
            userId=user,
            context={"identityAssertion": assertion(user, cookie)},
        ),
        # pays in the App
        send(
            gw,
            MALL_APP_KEY,
            "track",
            userId=user,
            event="Order Completed",
            context={"device": {"id": device}, "identityAssertion": assertion(user, device)},
        ),
        # logs in in the mini-program too
        send(
            gw,
            MALL_MP_KEY,
            "identify",
            anonymousId=f"mp-{tag}",
            userId=user,
            context={**wx, "identityAssertion": assertion(user, f"mp-{tag}")},
        ),
    ]
    return sent, user


def unified_ids(gw: Gateway, message_ids: list[str]) -> list[str]:
    events = {e["messageId"]: e for e in gw.wait_for_sink(set(message_ids), "mall-warehouse")}
    assert set(events) == set(message_ids)
    return [events[m]["context"]["unified_id"] for m in message_ids]


def current(unified: list[str], notices: list[dict]) -> set[str]:
    """What downstream knows after applying the merge notices it received."""
    alias = {n["merged"]: n["survivor"] for n in notices if n["type"] == "identity.merged"}

    def follow(u: str) -> str:
        while u in alias:
            u = alias[u]
        return u

    return {follow(u) for u in unified}


def test_one_person_across_app_web_and_miniprogram_with_linking_consent(gw: Gateway) -> None:
    sent, user = shopper_journey(gw, with_linking=True)
    ids = unified_ids(gw, sent)
    notices = [e for e in gw.sink_lines("mall-warehouse") if e["type"].startswith("identity.")]
    assert len(current(ids, notices)) == 1
    # the events after the last merge already carry the survivor
    assert ids[-1] in current(ids, notices)
    # never derived from an identifier
    assert all(u.startswith("p_") and user not in u for u in ids)
    # the operator can explain the link between the web cookie and the mini-program openid
    r = httpx.get(
        f"{gw.url}/admin/identity/explain",
        headers=OPS,
        params={"tenant": "mall", "a": user, "a_type": "user_id", "b": sent and user, "b_type": "user_id"},
    )
    assert r.status_code == 200 and r.json()["linked"] is True


def test_without_identity_linking_consent_three_people(gw: Gateway) -> None:
    sent, _ = shopper_journey(gw, with_linking=False)
    ids = unified_ids(gw, sent)
    notices = [e for e in gw.sink_lines("mall-warehouse") if e["type"].startswith("identity.")]
    assert notices == []
    # mini-program browser, web cookie, and the logged-in user (web identify, App, mini-program login)
    assert len(set(ids)) == 3
    assert ids[2] == ids[3] == ids[4]


def test_shared_shop_tablet_is_quarantined_not_merged(gw: Gateway) -> None:
    tablet = f"tablet-{uuid.uuid4().hex[:8]}"
    grant(
        gw, MALL_APP_KEY, ["analytics", "identity_linking"], identifiers=[{"type": "device_id", "id": tablet}]
    )
    people = []
    for i in range(60):
        user = f"customer-{uuid.uuid4().hex[:6]}-{i}"
        # each customer logs in on the tablet: the backend vouches for each login
        token = assertion(user, tablet)
        grant(
            gw,
            MALL_APP_KEY,
            ["analytics", "identity_linking"],
            userId=user,
            identifiers=[{"type": "device_id", "id": tablet}],
            identityAssertion=token,
        )
        people.append(
            send(
                gw,
                MALL_APP_KEY,
                "track",
                userId=user,
                event="Product Viewed",
                context={"device": {"id": tablet}, "identityAssertion": token},
            )
        )
    ids = unified_ids(gw, people)
    notices = [e for e in gw.sink_lines("mall-warehouse") if e["type"] == "identity.merged"]
    # no mega-person: at most the breaker's allowance of merges went through
    biggest = max(
        sum(1 for n in notices if n["survivor"] == s) for s in {n["survivor"] for n in notices} or {""}
    )
    assert biggest <= 6
    assert len(current(ids, notices)) >= 54
    held = httpx.get(f"{gw.url}/admin/identity/quarantine", headers=OPS, params={"tenant": "mall"}).json()
    assert len(held["quarantined"]) >= 50
    assert all(q["reason"].startswith(("breaker:", "component_too_large")) for q in held["quarantined"])


def test_operator_unlinks_a_wrong_bind_and_the_person_splits(gw: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    user, device = f"user-{tag}", f"device-{tag}-00"
    token = assertion(user, device)
    grant(
        gw,
        MALL_APP_KEY,
        ["analytics", "identity_linking"],
        userId=user,
        identifiers=[{"type": "device_id", "id": device}],
        identityAssertion=token,
    )
    first = send(
        gw,
        MALL_APP_KEY,
        "track",
        userId=user,
        event="Product Viewed",
        context={"device": {"id": device}, "identityAssertion": token},
    )
    r = httpx.post(
        f"{gw.url}/admin/identity/unlink",
        headers=OPS,
        json={
            "tenant": "mall",
            "a": {"type": "user_id", "id": user},
            "b": {"type": "device_id", "id": device},
        },
    )
    assert r.status_code == 200 and r.json()["split"] is True, r.text
    assert r.json()["unifiedIds"]["a"] != r.json()["unifiedIds"]["b"]
    (event,) = gw.wait_for_sink({first}, "mall-warehouse")
    splits = wait_until(  # the split notice goes downstream through the outbox
        lambda: [e for e in gw.sink_lines("mall-warehouse") if e["type"] == "identity.split"],
        what="the split notice at mall-warehouse",
    )
    assert [s["previous"] for s in splits] == [event["context"]["unified_id"]]
    parts = r.json()["unifiedIdsByDestination"]["mall-warehouse"]  # the warehouse's pseudonym domain
    assert set(splits[0]["parts"]) == set(parts.values())
    assert not set(parts.values()) & set(r.json()["unifiedIds"].values())
    again = httpx.post(
        f"{gw.url}/admin/identity/unlink",
        headers=OPS,
        json={
            "tenant": "mall",
            "a": {"type": "user_id", "id": user},
            "b": {"type": "device_id", "id": device},
        },
    )
    assert again.status_code == 400 and again.json()["error"] == "not_linked"
    assert httpx.post(f"{gw.url}/admin/identity/unlink", json={}).status_code in (400, 401)


def test_configured_trait_types_link(gw: Gateway) -> None:
    """mall maps the trait "unionid" to wechat_unionid: an identify with it links (sent by
    the shop's backend, which knows the unionid, naming each device)."""
    tag = uuid.uuid4().hex[:8]
    cookie, unionid = f"cookie-{tag}", f"oUnion{tag}00"
    grant(gw, MALL_WEB_KEY, ["analytics", "identity_linking"], anonymousId=cookie)
    m1 = send(gw, MALL_SERVER_KEY, "identify", anonymousId=cookie, traits={"unionid": unionid})
    grant(gw, MALL_MP_KEY, ["analytics", "identity_linking"], anonymousId=f"mp-{tag}")
    m2 = send(gw, MALL_SERVER_KEY, "identify", anonymousId=f"mp-{tag}", traits={"unionid": unionid})
    ids = unified_ids(gw, [m1, m2])
    notices = [e for e in gw.sink_lines("mall-warehouse") if e["type"].startswith("identity.")]
    assert len(current(ids, notices)) == 1
    events = gw.wait_for_sink({m1}, "mall-warehouse")
    assert events[0]["traits"]["unionid"].startswith("k1.")
