"""The compliance console's tests: the tests' config with an auditor token, and signing in
over plain HTTP (a ``TestClient`` or ``httpx.Client``: both keep cookies)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx

from gateway.console.sessions import SESSION_COOKIE
from tests.conftest import MALL_SERVER_KEY, TEST_CONFIG, WEB_KEY, make_gateway, mid

AUDITOR_TOKEN = "auditor-test-token"
TOKENS = {
    "compliance": "compliance-test-token",
    "operator": "operator-test-token",
    "auditor": AUDITOR_TOKEN,
}
_AUDITOR = f"""
[[admin_tokens]]
name = "audit"
role = "auditor"
dev_token = "{AUDITOR_TOKEN}"
"""
_FIRST_TENANT = "\n[[tenants]]\n"
assert TEST_CONFIG.count(_FIRST_TENANT) >= 1
# The mall holds a person back past three identifiers (quarantine to review).
_MALL_IDENTITY = "[tenants.identity.trait_types]\nunionid"
assert TEST_CONFIG.count(_MALL_IDENTITY) == 1
CONSOLE_CONFIG = TEST_CONFIG.replace(_FIRST_TENANT, _AUDITOR + _FIRST_TENANT, 1).replace(
    _MALL_IDENTITY, "[tenants.identity]\nmax_component = 3\n\n" + _MALL_IDENTITY
)

_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def sign_in(client: Any, token: str) -> str:
    """Sign ``client`` in with an admin token (through the sign-in form); returns the
    session's CSRF token. The client's earlier cookies are dropped first."""
    client.cookies.clear()
    form = client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    r = client.post(
        "/console/sign-in",
        data={"token": token, "csrf_token": csrf_of(form.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/console", r.text
    home = client.get("/console/")
    assert home.status_code == 200, home.text
    return csrf_of(home.text)


def person_with_phone(client: Any, *, withdraw: bool = True) -> tuple[str, str]:
    """A mall customer from the shop's backend (``client`` posts to the gateway): consent
    for user id, phone and device (analytics, identity linking), an identify linking them,
    then (``withdraw``) a withdrawal of analytics; returns the phone number and user id."""
    tag = uuid.uuid4().int % 10**8
    phone, user, device = f"139{tag:08d}", f"user-{tag}", f"device-{tag}"
    ids = [{"type": "phone", "id": phone}, {"type": "device_id", "id": device}]
    body = {"userId": user, "identifiers": ids, "noticeId": "notice-v1", "sdk": "analytics-python"}
    auth = (MALL_SERVER_KEY, "")
    r = client.post("/v1/consent", json={**body, "grant": ["analytics", "identity_linking"]}, auth=auth)
    assert r.status_code == 200, r.text
    identify(client, user, phone, device)
    if withdraw:
        r = client.post("/v1/consent", json={**body, "withdraw": ["analytics"]}, auth=auth)
        assert r.status_code == 200, r.text
    return phone, user


def identify(client: Any, user: str, phone: str | None, device: str) -> None:
    body = {"userId": user, "context": {"device": {"id": device}}, "messageId": uuid.uuid4().hex}
    if phone is not None:
        body["traits"] = {"phone": phone}
    r = client.post("/v1/identify", json=body, auth=(MALL_SERVER_KEY, ""))
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text


def held_merge(client: Any) -> tuple[str, str]:
    """A person of three identifiers (the mall's bound) seen with a fourth, a second
    device: the link is quarantined. Returns the phone number and the new device id."""
    phone, user = person_with_phone(client, withdraw=False)
    device = f"device-{uuid.uuid4().hex[:10]}"
    body = {
        "userId": user,
        "identifiers": [{"type": "device_id", "id": device}],
        "grant": ["analytics", "identity_linking"],
        "noticeId": "notice-v1",
    }
    r = client.post("/v1/consent", json=body, auth=(MALL_SERVER_KEY, ""))
    assert r.status_code == 200, r.text
    identify(client, user, None, device)
    return phone, device


# -- KPIs for the monitoring page --------------------------------------------------------------
# a SKU name a client chose: it must come back as text, never as markup
HOSTILE_SKU = '<img src=x onerror="alert(1)">'


def page_call(anon: str, name: str) -> dict[str, Any]:
    return {"type": "page", "anonymousId": anon, "name": name, "messageId": mid()}


def track(anon: str, event: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "anonymousId": anon, "event": event, "properties": props, "messageId": mid()}


def send(client: Any, key: str, batch: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/v1/batch", json={"batch": batch}, auth=(key, ""))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def shop_funnel(client: Any) -> list[str]:
    """Three persons see the home page, two a product, one adds it and pays (two SKUs, one
    named by a hostile client). Returns their anonymous ids."""
    a, b, c = (f"mon-{n}-{uuid.uuid4().hex[:10]}" for n in "abc")
    products = [
        {"sku": "sku-tea", "price": 30, "quantity": 2},
        {"sku": HOSTILE_SKU, "price": 5, "quantity": 1},
    ]
    batch = [
        *(page_call(x, "Home") for x in (a, b, c)),
        track(a, "Product Viewed", product_id="sku-tea"),
        track(b, "Product Viewed", product_id="sku-tea"),
        track(a, "Product Added", product_id="sku-tea"),
        track(a, "Payment Requested", amount=65),
        track(a, "Payment Succeeded", amount=65),
        track(a, "Order Completed", revenue=65, order_id="o-1", products=products),
    ]
    assert send(client, WEB_KEY, batch)["accepted"] == len(batch)
    return [a, b, c]


def assert_replicas_share_sessions(tmp: Path, env: dict[str, str]) -> None:
    """Two replicas on ``env``'s shared stores: an officer signed in on A searches on B (the
    load balancer sent the request there), sees pseudonyms only, and signing out on B signs
    them out of A too."""
    a = make_gateway(tmp / "a", config=CONSOLE_CONFIG, extra_env=env).start()
    b = make_gateway(tmp / "b", config=CONSOLE_CONFIG, extra_env=env).start()
    try:
        with httpx.Client(base_url=a.url) as on_a, httpx.Client(base_url=b.url) as on_b:
            phone, _ = person_with_phone(on_a)
            csrf = sign_in(on_a, TOKENS["compliance"])
            on_b.cookies.set(SESSION_COOKIE, on_a.cookies[SESSION_COOKIE], path="/console")
            r = on_b.post(
                "/console/subject",
                data={"csrf_token": csrf, "tenant": "mall", "type": "phone", "identifier": phone},
            )
            assert r.status_code == 200 and 'id="subject-node">phone:k' in r.text, r.text
            assert phone not in r.text
            r = on_b.post("/console/sign-out", data={"csrf_token": csrf_of(r.text)})
            assert r.status_code == 303
            assert on_a.get("/console/").status_code == 303
    finally:
        a.stop()
        b.stop()
