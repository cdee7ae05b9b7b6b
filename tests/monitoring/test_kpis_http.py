"""Business KPIs over real HTTP: values after a known set of seed events, per platform,
consent coverage on a tenant that enforces consent, and no pseudonym in the KPI store."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from identity.pseudonym import pseudonymise_identifier
from tests.conftest import (
    APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    SHOP_SERVER_KEY,
    WEB_KEY,
    Gateway,
    RedisNamespace,
    make_gateway,
    mid,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def kpis(gw: Gateway, tenant: str) -> dict[str, dict[str, Any]]:
    """KPI id -> its longest window (60 buckets: every event of the test is in it)."""
    r = httpx.get(f"{gw.url}/admin/kpis", params={"tenant": tenant}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return {k["id"]: k["windows"][-1] for k in r.json()["kpis"]}


def page(anon: str, name: str) -> dict[str, Any]:
    return {"type": "page", "anonymousId": anon, "name": name, "messageId": mid()}


def track(anon: str, event: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "anonymousId": anon, "event": event, "properties": props, "messageId": mid()}


def send(gw: Gateway, key: str, batch: list[dict[str, Any]]) -> dict[str, Any]:
    with gw.client(key) as c:
        r = c.post("/v1/batch", json={"batch": batch})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def seed_events(a: str, b: str, c: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Person a buys on the web; b browses on the app, payment fails; c only sees home (web)."""
    web = [
        page(a, "Home"),
        track(a, "Product Viewed", product_id="sku-1"),
        track(a, "Product Added", product_id="sku-1"),
        track(a, "Payment Requested", amount=100),
        track(a, "Payment Succeeded", amount=100),
        track(a, "Order Completed", revenue=99.5, order_id="o-1"),
        page(c, "Home"),
        page(c, "About"),
    ]
    app = [
        page(b, "Home"),
        track(b, "Product Viewed", product_id="sku-1"),
        track(b, "Product Viewed", product_id="sku-2"),
        track(b, "Payment Requested", amount=20),
    ]
    return web, app


def test_seed_kpis_after_known_events_per_platform(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, extra_env={"IDGATE_ALERT_INTERVAL_MS": "100"}).start()
    try:
        a, b, c = (f"kpi-{n}-{uuid.uuid4().hex[:8]}" for n in "abc")
        web, app = seed_events(a, b, c)
        assert send(gw, WEB_KEY, web)["accepted"] == len(web)
        assert send(gw, APP_KEY, app)["accepted"] == len(app)
        # a retried batch is a duplicate and counts nothing twice
        assert send(gw, WEB_KEY, web)["duplicates"] == len(web)
        got = kpis(gw, "shop")
        total = {k: w["total"]["value"] for k, w in got.items()}
        assert total["pv_home"] == 3 and total["uv_home"] == 3
        assert total["pv_product"] == 3 and total["uv_product"] == 2
        assert total["add_to_cart"] == 1 and total["cart_persons"] == 1
        assert total["payments_requested"] == 2 and total["payments_succeeded"] == 1
        assert total["payment_success_rate"] == 0.5
        assert total["orders"] == 1 and total["gmv"] == 99.5 and total["average_order_value"] == 99.5
        assert total["paying_persons"] == 1
        assert abs(total["conversion_home_product"] - 2 / 3) < 1e-9
        assert total["conversion_product_cart"] == 0.5
        assert total["conversion_cart_paid"] == 1.0
        assert total["add_to_cart_rate"] == 1 / 3
        home = got["pv_home"]
        assert home["byPlatform"]["web"]["value"] == 2 and home["byPlatform"]["app"]["value"] == 1
        assert home["bySource"]["shop-web"]["value"] == 2 and home["bySource"]["shop-server"]["value"] == 0
        assert got["payment_success_rate"]["byPlatform"]["app"]["value"] == 0.0
        # consent is off for "shop": everything that matched was counted
        assert home["total"]["coverage"] == 1.0 and home["total"]["matched"] == 3
        # the same figures in /metrics, once the refresh loop has run
        orders = 'idgate_kpi_value{kpi="orders",platform="all",tenant="shop",window="60m"} 1.0'
        text = wait_until(
            lambda: t if orders in (t := httpx.get(f"{gw.url}/metrics").text) else None,
            what="the orders KPI in /metrics",
        )
        assert 'idgate_kpi_coverage{kpi="pv_home",platform="all",tenant="shop",window="60m"} 1.0' in text
        assert a not in text and b not in text
    finally:
        gw.stop()


def test_consent_coverage_on_a_tenant_that_enforces_consent(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path).start()
    try:
        consented, refused = (f"cov-{n}-{uuid.uuid4().hex[:8]}" for n in ("yes", "no"))
        with gw.client(MALL_WEB_KEY) as cl:
            r = cl.post(
                "/v1/consent",
                json={"anonymousId": consented, "grant": ["analytics"], "noticeId": "notice-v1"},
            )
            assert r.status_code == 200, r.text
        result = send(
            gw,
            MALL_WEB_KEY,
            [
                page(consented, "Home"),
                page(refused, "Home"),
                track(consented, "Order Completed", revenue=10),
                track(refused, "Order Completed", revenue=5),
            ],
        )
        assert result["accepted"] == 2 and result["dropped"] == {"no_consent": 2}, result
        got = kpis(gw, "mall")
        # behavioural: only the consented person's page view counts; half could be counted
        assert got["pv_home"]["total"] == {
            "value": 1,
            "matched": 2,
            "counted": 1,
            "coverage": 0.5,
            "previous": 0,
            # kept only for KPIs a rule compares with a day or a week earlier
            "dayAgo": None,
            "weekAgo": None,
            "top": None,  # a top KPI's largest values
            # distinct-person KPIs: counted events keyed by a device alone
            "byDevice": None,
            "baselines": None,  # no rule compares pv_home with a baseline
        }
        assert got["uv_home"]["total"]["value"] == 1
        # transactions run on the contract basis (necessary_service): both orders count
        assert got["orders"]["total"]["value"] == 2 and got["orders"]["total"]["coverage"] == 1.0
        assert got["gmv"]["total"]["value"] == 15
        # persons are behavioural: the dropped buyer is not among the paying persons
        assert got["paying_persons"]["total"]["value"] == 1
        assert got["paying_persons"]["total"]["coverage"] == 0.5
    finally:
        gw.stop()


def test_kpis_are_summed_over_replicas_and_hold_no_pseudonym(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    import redis

    one = make_gateway(tmp_path / "one", extra_env=redis_ns.env()).start()
    two = make_gateway(tmp_path / "two", extra_env=redis_ns.env()).start()
    try:
        a, b, c = (f"kpi-{n}-{uuid.uuid4().hex[:8]}" for n in "abc")
        web, app = seed_events(a, b, c)
        send(one, WEB_KEY, web)
        send(two, APP_KEY, app)
        for gw in (one, two):  # either replica reads the sum of both (flushed within 0.5 s)
            got = wait_until(
                lambda gw=gw: k if (k := kpis(gw, "shop"))["pv_home"]["total"]["value"] == 3 else None,
                what="both replicas' page views",
            )
            assert got["uv_home"]["total"]["value"] == 3
            assert got["payment_success_rate"]["total"]["value"] == 0.5
        keyring = one.keyring()
        pseudonymiser = keyring.pseudonymiser("shop")
        secrets = {a, b, c} | {
            pseudonymise_identifier(pseudonymiser, "anonymous_id", x).value for x in (a, b, c)
        }
        unified = {
            line["context"].get("unified_id") for line in one.wait_for_sink({e["messageId"] for e in web})
        }
        secrets |= {u for u in unified if u}
        assert len(secrets) > 6  # the unified IDs were found too
        client = redis.Redis.from_url(redis_ns.url)
        try:
            keys = list(client.scan_iter(match=f"{redis_ns.prefix}:kpi*"))
            assert any(b":hll:" in k for k in keys) and len(keys) > 2
            dumped = b"".join(
                k
                + (
                    b"".join(x for kv in client.hgetall(k).items() for x in kv)
                    if client.type(k) == b"hash"
                    else client.get(k) or b""
                )
                for k in keys
            )
        finally:
            client.close()
        for s in secrets:
            assert s.encode() not in dumped, s
            assert s[:12].encode() not in dumped, s
    finally:
        one.stop()
        two.stop()


def test_a_person_on_two_platforms_counts_once_in_uv_once_linked(tmp_path: Path) -> None:
    """UV by person, not by device: the app's anonymous visitor logs in (the shop's backend
    identifies both devices with the user id), then views the home page on the web."""
    gw = make_gateway(tmp_path).start()
    try:
        app_device, web_device, stranger = (f"uv-{n}-{uuid.uuid4().hex[:8]}" for n in ("app", "web", "other"))
        user = f"user-{uuid.uuid4().hex[:8]}"
        send(gw, APP_KEY, [page(app_device, "Home")])
        login = [
            {"type": "identify", "anonymousId": device, "userId": user, "messageId": mid()}
            for device in (app_device, web_device)
        ]
        send(gw, SHOP_SERVER_KEY, login)
        send(gw, WEB_KEY, [page(web_device, "Home")])
        got = kpis(gw, "shop")["uv_home"]
        assert got["total"]["value"] == 1, got
        assert got["byPlatform"]["app"]["value"] == 1 and got["byPlatform"]["web"]["value"] == 1
        send(gw, WEB_KEY, [page(stranger, "Home")])  # somebody else: a second person
        got = kpis(gw, "shop")
        assert got["uv_home"]["total"]["value"] == 2 and got["pv_home"]["total"]["value"] == 3
    finally:
        gw.stop()


def test_sensors_view_events_count_as_page_views(tmp_path: Path) -> None:
    """The mini-program's Sensors SDK: $MPViewScreen with $title "Home" is a home page view."""
    from urllib.parse import quote

    from tests.sensors.conftest import encode, sensors_event, sensors_url

    gw = make_gateway(tmp_path).start()
    try:
        visitor = f"mp-{uuid.uuid4().hex[:10]}"
        views = [
            sensors_event(
                visitor, "$MPViewScreen", properties={"$title": "Home", "$url_path": "pages/index"}
            ),
            sensors_event(visitor, "$MPViewScreen", properties={"$title": "Product", "$url_path": "pages/p"}),
        ]
        r = httpx.post(
            sensors_url(gw),
            content=f"data_list={quote(encode(views))}&gzip=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        got = kpis(gw, "shop")
        assert got["pv_home"]["total"]["value"] == 1 and got["uv_home"]["total"]["value"] == 1
        assert got["pv_home"]["byPlatform"]["app"]["value"] == 1
    finally:
        gw.stop()
