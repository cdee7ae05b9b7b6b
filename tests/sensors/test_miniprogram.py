"""End to end with the real sa-sdk-miniprogram from npm, run under Node with a wx shim
(tests/sensors/miniprogram): two mini-programs of one WeChat Open Platform account, consent
through POST /v1/consent, and the website on the Segment API."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    MALL_ASSERTION_SECRET,
    MALL_MP_KEY,
    MALL_WEB_KEY,
    Gateway,
    assertion,
    make_gateway,
    mid,
)
from tests.sensors.conftest import current_persons, explain, sensors_url, wait_for

pytestmark = pytest.mark.slow

APPID_A = "wx1a2b3c4d5e6f7a8b"
APPID_B = "wx9f8e7d6c5b4a3f2e"
Runner = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def gw(tmp_path) -> Iterator[Gateway]:
    g = make_gateway(tmp_path).start()
    yield g
    g.stop()


def visit(
    gw: Gateway,
    appid: str,
    *,
    openid: str,
    unionid: str,
    login: str | None = None,
    grant: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "server_url": sensors_url(gw, "mall"),
        "appid": appid,
        "tag": uuid.uuid4().hex[:8],
        "openid": openid,
        "unionid": unionid,
        "login": login,
        # the shop's backend signs identity assertions with this (run.js plays the backend)
        "assertion_secret": MALL_ASSERTION_SECRET,
        "pages": ["pages/index/index", "pages/product/product"],
        "events": [{"name": "AddToCart", "properties": {"sku": "SKU-1", "price": 99}}],
        "consent": {
            "url": gw.url + "/v1/consent",
            "write_key": MALL_MP_KEY,
            "grant": grant,
            "notice_id": "notice-v1",
        }
        if grant is not None
        else None,
    }


def accepted(run: dict[str, Any]) -> int:
    """Events the gateway stored, from the answers the SDK got (it ignores them itself)."""
    bodies = [json.loads(r["body"]) for r in run["responses"] if r.get("body", "").startswith("{")]
    return sum(b.get("accepted", 0) for b in bodies)


def mp_events(gw: Gateway, count: int) -> list[dict[str, Any]]:
    return wait_for(
        gw,
        lambda e: e.get("context", {}).get("library", {}).get("name") == "MiniProgram",
        count,
        "mall-warehouse",
    )


def shopper() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {
        "openid_a": f"oAppA{tag}openid0000",
        "openid_b": f"oAppB{tag}openid0000",
        "unionid": f"oUnion{tag}union000",
        "user": f"member-{tag}",
    }


def two_miniprograms(gw: Gateway, miniprogram: Runner) -> tuple[dict[str, str], list[dict[str, Any]]]:
    s = shopper()
    linking = ["analytics", "identity_linking"]
    a = miniprogram(
        visit(gw, APPID_A, openid=s["openid_a"], unionid=s["unionid"], login=s["user"], grant=linking)
    )
    b = miniprogram(visit(gw, APPID_B, openid=s["openid_b"], unionid=s["unionid"], grant=linking))
    assert a["consent"] == b["consent"] == 200
    assert a["left_in_queue"] == b["left_in_queue"] == 0
    assert all(r["statusCode"] == 200 for r in a["responses"] + b["responses"]), a["responses"]
    # A: first visit profile, launch, show, 2 page views, AddToCart, 2 binds, sign-up, hide
    assert accepted(a) == 10 and accepted(b) == 9
    s["mp_a"], s["mp_b"] = a["anonymous_id"], b["anonymous_id"]
    events = mp_events(gw, 19)
    assert len(events) == 19
    return s, events


def test_two_miniprograms_of_one_open_platform_account_are_one_person(
    gw: Gateway, miniprogram: Runner
) -> None:
    s, events = two_miniprograms(gw, miniprogram)
    names = sorted(e.get("event") or e["context"]["sensors"]["type"] for e in events)
    assert names.count("$MPViewScreen") == 4 and names.count("$BindID") == 4
    assert {"$MPLaunch", "$MPShow", "$MPHide", "AddToCart", "$SignUp", "profile_set_once"} <= set(names)

    # The graph: both installs, both openids, the unionid and the login are one person.
    openid_a = ("wechat_openid", s["openid_a"], APPID_A)
    person = explain(gw, "mall", openid_a, ("wechat_openid", s["openid_b"], APPID_B))
    assert person["linked"] is True
    for other in [
        ("anonymous_id", s["mp_a"], None),
        ("anonymous_id", s["mp_b"], None),
        ("user_id", s["user"], None),
    ]:
        assert explain(gw, "mall", openid_a, other)["unifiedId"] == person["unifiedId"]
    # the same openid string under another appid would be somebody else
    assert explain(gw, "mall", openid_a, ("wechat_openid", s["openid_a"], APPID_B))["linked"] is False
    # downstream (IDs re-keyed for the destination's pseudonym domain): the two visits'
    # last events (app hide, after the binds) are one person
    lines = gw.sink_lines("mall-warehouse")
    hides = [e["context"]["unified_id"] for e in events if e.get("event") == "$MPHide"]
    assert len(hides) == 2 and len(current_persons(hides, lines)) == 1

    dump = json.dumps(gw.sink_lines("mall-warehouse"))
    raw = [s["openid_a"], s["openid_b"], s["unionid"], s["user"], s["mp_a"], s["mp_b"]]
    assert not [r for r in raw if r in dump]
    # the openids are scoped by their mini-program's appid; every id left is a pseudonym
    binds = [e for e in events if e.get("event") == "$BindID"]
    openids = {
        x["appid"]: x["id"]
        for e in binds
        for x in e["context"]["externalIds"]
        if x["type"] == "wechat_openid"
    }
    assert set(openids) == {APPID_A, APPID_B} and all(v.startswith("k1.") for v in openids.values())
    unionids = {x["id"] for e in binds for x in e["context"]["externalIds"] if x["type"] == "wechat_unionid"}
    assert len(unionids) == 1
    assert all(e["context"]["idgate"]["source"] == "mall-mp" for e in events)


def test_downstream_can_reconcile_every_event_of_the_two_miniprograms(
    gw: Gateway, miniprogram: Runner
) -> None:
    """With the merge notices it received, downstream sees one person for all 19 events."""
    _, events = two_miniprograms(gw, miniprogram)
    lines = gw.sink_lines("mall-warehouse")
    assert len(current_persons([e["context"]["unified_id"] for e in events], lines)) == 1


def test_without_identity_linking_the_miniprograms_stay_apart(gw: Gateway, miniprogram: Runner) -> None:
    s = shopper()
    miniprogram(visit(gw, APPID_A, openid=s["openid_a"], unionid=s["unionid"], grant=["analytics"]))
    miniprogram(visit(gw, APPID_B, openid=s["openid_b"], unionid=s["unionid"], grant=["analytics"]))
    events = mp_events(gw, 18)
    assert len(events) == 18
    lines = gw.sink_lines("mall-warehouse")
    assert not [n for n in lines if n["type"].startswith("identity.")]
    carts = [e for e in events if e.get("event") == "AddToCart"]
    assert len(current_persons([e["context"]["unified_id"] for e in carts], lines)) == 2


def test_events_before_consent_are_dropped(gw: Gateway, miniprogram: Runner) -> None:
    s = shopper()
    run = miniprogram(visit(gw, APPID_A, openid=s["openid_a"], unionid=s["unionid"], grant=None))
    bodies = [json.loads(r["body"]) for r in run["responses"]]
    assert [r["statusCode"] for r in run["responses"]] == [200]
    assert bodies[0]["accepted"] == 0 and bodies[0]["dropped"] == {"no_consent": 9}
    assert [e for e in gw.sink_lines("mall-warehouse") if "sensors" in e.get("context", {})] == []


def test_miniprogram_browsing_then_website_login_is_one_person_across_protocols(
    gw: Gateway, miniprogram: Runner
) -> None:
    s = shopper()
    cookie = f"web-cookie-{uuid.uuid4().hex[:10]}"
    linking = ["analytics", "identity_linking"]
    run = miniprogram(
        visit(gw, APPID_A, openid=s["openid_a"], unionid=s["unionid"], login=s["user"], grant=linking)
    )
    assert accepted(run) == 10
    # The same person on the website, through the Segment API: anonymous, then logged in.
    web = httpx.Client(base_url=gw.url, auth=(MALL_WEB_KEY, ""), timeout=10)
    assert web.post(
        "/v1/consent", json={"anonymousId": cookie, "grant": linking, "noticeId": "notice-v1"}
    ).is_success
    sent = [mid(), mid(), mid()]
    batch = [
        {"type": "page", "anonymousId": cookie, "name": "Home", "messageId": sent[0]},
        {
            "type": "identify",
            "anonymousId": cookie,
            "userId": s["user"],
            "messageId": sent[1],
            # the website's backend vouches for the login on this browser
            "context": {"identityAssertion": assertion(s["user"], cookie)},
        },
        {
            "type": "track",
            "userId": s["user"],
            "anonymousId": cookie,
            "event": "Order Completed",
            "messageId": sent[2],
        },
    ]
    for message in batch:  # one request each, as a browser SDK sends them
        r = web.post("/v1/batch", json={"batch": [message]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    web_events = sorted(
        gw.wait_for_sink(set(sent), "mall-warehouse"), key=lambda e: sent.index(e["messageId"])
    )
    assert len(web_events) == 3
    # the graph: the mini-program install, its openid and the website cookie are one person
    person = explain(gw, "mall", ("anonymous_id", cookie, None), ("wechat_openid", s["openid_a"], APPID_A))
    assert person["linked"] is True
    assert explain(gw, "mall", ("anonymous_id", cookie, None), ("anonymous_id", run["anonymous_id"], None))[
        "linked"
    ]
    # downstream (IDs re-keyed for the destination's domain): the website's events from the
    # login on and the mini-program's last event are one person
    hide = next(e for e in mp_events(gw, 10) if e.get("event") == "$MPHide")
    ids = [hide["context"]["unified_id"]] + [e["context"]["unified_id"] for e in web_events[1:]]
    assert len(current_persons(ids, gw.sink_lines("mall-warehouse"))) == 1
    # and the login id is the same pseudonym in both protocols
    signup = next(e for e in mp_events(gw, 10) if e.get("event") == "$SignUp")
    identify = next(e for e in web_events if e["type"] == "identify")
    assert signup["userId"] == identify["userId"]


def test_the_visitors_unified_id_survives_binds_and_login(gw: Gateway, miniprogram: Runner) -> None:
    """Launch and page views (anonymous), the openid and unionid binds, the sign-up, app
    hide: one unified ID downstream, the one the first event carried (issue 12, item 7)."""
    tag = uuid.uuid4().hex[:10]
    scenario = visit(
        gw,
        APPID_A,
        openid=f"oStable{tag}openid00",
        unionid=f"oStable{tag}union000",
        login=f"mp-user-{tag}",
        grant=["analytics", "identity_linking"],
    )
    run = miniprogram(scenario)
    assert run["consent"] == 200 and accepted(run) == 10
    # the run tag is a super property: on every track-like event of this visit
    events = [e for e in mp_events(gw, 10) if (e.get("properties") or {}).get("run_tag") == scenario["tag"]]
    names = {e.get("event") for e in events}
    assert {"$MPLaunch", "$MPViewScreen", "$BindID", "$SignUp", "$MPHide"} <= names, names
    ids = {e["context"]["unified_id"] for e in events}
    # launch and page views (anonymous), the openid and unionid binds, the sign-up, app hide
    assert len(ids) == 1, sorted((e.get("event") or "", e["context"]["unified_id"]) for e in events)
    retired = {n["merged"] for n in gw.sink_lines("mall-warehouse") if n.get("type") == "identity.merged"}
    assert not ids & retired  # the ID downstream received first was never made an alias
