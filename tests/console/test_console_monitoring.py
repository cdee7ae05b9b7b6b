"""The console's monitoring page over plain HTTP: KPI values, the funnel, top SKUs (client
strings escaped) and the consent-coverage warning after events sent through the ingest API;
the alert history; every role may open it, it is access-logged; no identifier on the page."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from export.alert_history import AlertRecord, ChannelDelivery
from identity.pseudonym import pseudonymise_identifier
from tests.conftest import COMPLIANCE_TOKEN, MALL_WEB_KEY
from tests.console.conftest import CONSOLE_CONFIG, HOSTILE_SKU, TOKENS, page_call, send, shop_funnel, sign_in
from tests.gateway.conftest import in_process_app
from tests.waiting import wait_until

PAGE = "/console/monitoring"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Litestar:
    return in_process_app(tmp_path_factory.mktemp("monitoring"), CONSOLE_CONFIG)


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=app, raise_server_exceptions=True) as test_client:
        yield test_client


def monitoring(client: TestClient[Litestar], **params: Any) -> str:
    r = client.get(PAGE, params=params)
    assert r.status_code == 200, r.text
    return r.text


def test_the_page_shows_kpis_funnel_and_top_skus_without_identifiers(
    app: Litestar, client: TestClient[Litestar]
) -> None:
    persons = shop_funnel(client)
    sign_in(client, TOKENS["operator"])
    html = wait_until(
        lambda: t if 'data-window="60">1</td>' in (t := monitoring(client, tenant="shop")) else "",
        what="the order in the monitoring page",
    )
    orders = html.split('id="kpi-orders"', 1)[1].split("</tr>", 1)[0]
    assert 'data-window="60">1</td>' in orders
    gmv = html.split('id="kpi-gmv"', 1)[1].split("</tr>", 1)[0]
    assert "65.00" in gmv
    # a ratio of an amount reads as an amount, a ratio of counts as a share
    average = html.split('id="kpi-average_order_value"', 1)[1].split("</tr>", 1)[0]
    assert 'data-window="60">65.00</td>' in average
    rate = html.split('id="kpi-payment_success_rate"', 1)[1].split("</tr>", 1)[0]
    assert "100.0%" in rate and "<svg" in rate  # a server-side sparkline
    funnel = html.split('id="funnel"', 1)[1].split("</table>", 1)[0]
    steps = [row.split("data-persons>", 1)[1].split("<", 1)[0] for row in funnel.split("<tr data-kpi=")[1:]]
    assert steps == ["3", "2", "1", "1"]
    assert "66.7%" in funnel and "50.0%" in funnel
    top = html.split('id="top-skus"', 1)[1].split("</table>", 1)[0]
    assert "sku-tea" in top and "60.00" in top
    assert HOSTILE_SKU not in html and "&lt;img src=x onerror=" in html
    # consent is not enforced for the shop: nothing undercounted
    assert 'id="undercount"' not in html
    # canary: no identifier, pseudonym or unified ID on the page
    pseudonymiser = app.state.gateway.keyring.pseudonymiser("shop")
    nodes = [pseudonymise_identifier(pseudonymiser, "anonymous_id", x).node for x in persons]
    services = app.state.services
    unified = {services.identity.unified_id("shop", n) for n in nodes}
    canaries = {*persons, *nodes, *(n.split(":", 1)[-1] for n in nodes), *unified}
    assert len(unified) == 3 and all(u.startswith("p_") for u in unified), unified
    for canary in canaries:
        assert canary not in html, canary


def test_coverage_below_one_is_said_plainly(client: TestClient[Litestar]) -> None:
    refused = f"mon-refused-{uuid.uuid4().hex[:8]}"
    result = send(client, MALL_WEB_KEY, [page_call(refused, "Home")])
    assert result["dropped"] == {"no_consent": 1}, result
    sign_in(client, TOKENS["auditor"])
    html = wait_until(
        lambda: t if 'id="undercount"' in (t := monitoring(client, tenant="mall", window=5)) else "",
        what="the undercount warning",
    )
    warning = html.split('id="undercount"', 1)[1].split("</p>", 1)[0]
    assert "<code>pv_home</code>" in warning and "<code>orders</code>" not in warning
    assert "同意覆盖率低于 100%" in warning  # Chinese by default
    assert refused not in html


def test_the_alert_history_shows_firings_and_failed_channels(
    app: Litestar, client: TestClient[Litestar]
) -> None:
    app.state.monitoring.history.record(
        AlertRecord(
            tenant="shop",
            rule="payment_success_drop",
            kpi="payment_success_rate",
            status="firing",
            severity="critical",
            at=1_780_000_000.0,
            value=0.7,
            compared=0.95,
            compare="previous",
            volume=200,
            window_minutes=10,
            notified=True,
            deliveries=[
                ChannelDelivery(channel="oncall-dingtalk", kind="dingtalk", delivered=True, attempts=1),
                ChannelDelivery(
                    channel="oncall-mail", kind="email", delivered=False, attempts=3, error="SMTPAuthError"
                ),
            ],
        )
    )
    sign_in(client, TOKENS["compliance"])
    client.cookies.set("idgate_console_lang", "en", path="/console")
    html = monitoring(client, tenant="shop")
    history = html.split('id="alert-history"', 1)[1].split("</table>", 1)[0]
    assert "payment_success_drop" in history and "firing" in history and "critical" in history
    assert "70.0%" in history and "95.0%" in history
    assert "oncall-dingtalk: delivered" in history and "oncall-mail: failed (SMTPAuthError), 3×" in history


@pytest.mark.parametrize("role", ["compliance", "operator", "auditor"])
def test_every_role_opens_it_and_it_is_access_logged(client: TestClient[Litestar], role: str) -> None:
    sign_in(client, TOKENS[role])
    assert 'href="/console/monitoring"' in monitoring(client, tenant="shop", window=10)
    r = client.get("/admin/access-log", headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"})
    assert r.status_code == 200, r.text
    seen = [e for e in r.json()["entries"] if e["action"] == "console.monitoring"]
    assert seen and seen[0]["params"] == {"window": 10} and seen[0]["tenant"] == "shop"


def test_anonymous_is_sent_to_sign_in_and_a_bad_window_is_a_400(client: TestClient[Litestar]) -> None:
    client.cookies.clear()
    r = client.get(PAGE, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    sign_in(client, TOKENS["operator"])
    r = client.get(PAGE, params={"window": 7})
    assert r.status_code == 400 and 'data-problem="bad_request"' in r.text


def test_a_tenant_scoped_officer_sees_only_its_tenant(client: TestClient[Litestar]) -> None:
    sign_in(client, "other-compliance-token")  # compliance, shop only
    html = monitoring(client)
    assert 'name="tenant" value="shop"' in html  # no picker: one tenant
    r = client.get(PAGE, params={"tenant": "mall"})
    assert r.status_code == 403 and "pv_home" not in r.text
    r = client.get(PAGE, params={"tenant": "no-such-tenant"})
    assert r.status_code == 400 and "tenant" in r.text and "pv_home" not in r.text
