"""Attack: naming another app's WeChat users with a public write key.

An openid is a device identifier, but only of the mini-program (or official account) whose
appid scopes it. Openids leak (shared with partners, in URLs and logs); with only the web
source's public key a stranger granted or withdrew consent for a mini-program user's
openid, or claimed it for their own device. A client source that lists its appids
(``wechat_appids``) now speaks only for openids of those: another appid's openid is refused
as ``foreign_appid``, records nothing and links nothing, while each source still records
consent for its own users' openids. Over real HTTP against `idgate serve`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_MP_KEY,
    MALL_WEB_KEY,
    TEST_CONFIG,
    Gateway,
    make_gateway,
    mid,
)

pytestmark = pytest.mark.slow
MP_APPID, H5_APPID = "wxmallminiprogram01", "wxmallofficialacct1"


def appids_config() -> str:
    """The tests' config; the mall's web pages hold their official account's openids, its
    mini-program its own."""
    config = TEST_CONFIG
    for source, appid in (("mall-web", H5_APPID), ("mall-mp", MP_APPID)):
        anchor = f'id = "{source}"\n'
        assert config.count(anchor) == 1
        config = config.replace(anchor, f'{anchor}wechat_appids = ["{appid}"]\n')
    return config


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("appids"), config=appids_config()).start()
    yield g
    g.stop()


def consent(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    if "grant" in body:
        body.setdefault("noticeId", "notice-v1")
    return httpx.post(f"{gw.url}/v1/consent", auth=(key, ""), json=body, timeout=10)


def openid(value: str, appid: str = MP_APPID) -> dict[str, str]:
    return {"type": "wechat_openid", "id": value, "appid": appid}


def send(gw: Gateway, key: str, kind: str, **body: Any) -> dict[str, Any]:
    body.setdefault("messageId", mid())
    r = httpx.post(f"{gw.url}/v1/{kind}", auth=(key, ""), json=body, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def mp_event(gw: Gateway, device: str, user_openid: str) -> dict[str, Any]:
    """The victim's mini-program: its anonymous id and its openid, as the SDK sends them."""
    external = [{"type": "wx_openid", "id": user_openid, "appid": MP_APPID}]
    return send(
        gw,
        MALL_MP_KEY,
        "track",
        anonymousId=device,
        event="Product Viewed",
        context={"externalIds": external},
    )


def linked(gw: Gateway, a: dict[str, str], b: dict[str, str]) -> bool:
    params = {"tenant": "mall", "a_type": a["type"], "a": a["id"], "b_type": b["type"], "b": b["id"]}
    for side, ident in (("a", a), ("b", b)):
        if "appid" in ident:
            params[f"{side}_appid"] = ident["appid"]
    r = httpx.get(
        f"{gw.url}/admin/identity/explain",
        params=params,
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return bool(r.json()["linked"])


def test_web_key_cannot_grant_for_a_mini_program_users_openid(gw: Gateway) -> None:
    t = uuid.uuid4().hex[:10]
    device, victim, attacker = f"mp-{t}", f"o-victim-{t}", f"evil-{t}"
    # the victim never consented: the mini-program's events are held back
    assert mp_event(gw, device, victim)["dropped"] == {"no_consent": 1}

    forged = consent(gw, MALL_WEB_KEY, identifiers=[openid(victim)], grant=["analytics"])
    assert forged.status_code == 403, forged.text
    assert forged.json()["error"] == "foreign_appid" and forged.json()["field"] == "identifiers[0].appid"
    mixed = consent(gw, MALL_WEB_KEY, anonymousId=attacker, identifiers=[openid(victim)], grant=["analytics"])
    assert mixed.status_code == 200, mixed.text
    assert [(p["field"], p["reason"]) for p in mixed.json()["refused"]] == [
        ("identifiers[0].appid", "foreign_appid")
    ]
    assert mp_event(gw, device, victim)["dropped"] == {"no_consent": 1}


def test_web_key_cannot_withdraw_or_claim_a_mini_program_users_openid(gw: Gateway) -> None:
    t = uuid.uuid4().hex[:10]
    device, victim, attacker = f"mp-{t}", f"o-victim-{t}", f"evil-{t}"
    # the legitimate flow: the mini-program records consent for its own user's openid
    r = consent(
        gw,
        MALL_MP_KEY,
        anonymousId=device,
        identifiers=[openid(victim)],
        grant=["analytics", "identity_linking"],
    )
    assert r.status_code == 200 and "refused" not in r.json(), r.text
    assert mp_event(gw, device, victim)["accepted"] == 1

    r = consent(gw, MALL_WEB_KEY, identifiers=[openid(victim)], withdraw=["analytics"])
    assert r.status_code == 403 and r.json()["error"] == "foreign_appid", r.text
    # the attacker's own device claims the victim's openid: refused, not linked
    assert consent(gw, MALL_WEB_KEY, anonymousId=attacker, grant=["analytics", "identity_linking"]).is_success
    claim = send(
        gw,
        MALL_WEB_KEY,
        "identify",
        anonymousId=attacker,
        context={"externalIds": [{"type": "wx_openid", "id": victim, "appid": MP_APPID}]},
    )
    assert [x["error"] for x in claim["refusedAssertions"]] == ["foreign_appid"], claim
    # withdrawing on the attacker's device (which named the openid) leaves the victim alone
    r = consent(gw, MALL_WEB_KEY, anonymousId=attacker, withdraw=["analytics"])
    assert r.status_code == 200, r.text
    assert mp_event(gw, device, victim)["accepted"] == 1
    assert not linked(gw, {"type": "anonymous_id", "id": attacker}, openid(victim))
    assert linked(gw, {"type": "anonymous_id", "id": device}, openid(victim))

    # the web source's own users' openids (its official account) are its own
    own = consent(
        gw,
        MALL_WEB_KEY,
        anonymousId=attacker,
        identifiers=[openid(f"o-h5-{t}", H5_APPID)],
        grant=["marketing"],
    )
    assert own.status_code == 200 and "refused" not in own.json(), own.text
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'idgate_events_refused_assertion_total{reason="foreign_appid",tenant="mall"}' in metrics
