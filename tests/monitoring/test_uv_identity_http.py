"""UV by person, and the page says when it is by device instead (issue 15): one shopper
views a product in the WeChat mini-program (the real sa-sdk-miniprogram under Node), then
logs in on the website and views it there (the real analytics-python SDK). With
identity_linking consent the two are one person: UV 1, counted by person. Without it the
graph may not link them: UV 2, and the page says the count is by device."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client

from tests.conftest import MALL_WEB_KEY, TEST_CONFIG, assertion, make_gateway
from tests.console.conftest import TOKENS, sign_in
from tests.sensors.conftest import miniprogram  # noqa: F401 - the fixture, used by name
from tests.sensors.test_miniprogram import APPID_A, Runner, accepted, shopper, visit

pytestmark = pytest.mark.slow
LINKING = ["analytics", "identity_linking"]
# Sensors event names take no spaces: a product view is "ViewProduct" there. (Appended to
# the config, the table belongs to its last tenant, the mall.)
CONFIG = (
    TEST_CONFIG
    + """
[[tenants.kpis]]
id = "uv_viewed"
kind = "distinct"
events = ["Product Viewed", "ViewProduct"]
description = "Persons who viewed a product (Segment or Sensors naming)"
"""
)


@pytest.mark.parametrize(
    ("grant", "persons", "by_device"),
    [
        pytest.param(LINKING, 1, 0.0, id="identity-linking-granted"),
        pytest.param(["analytics"], 2, 1.0, id="no-identity-linking"),
    ],
)
def test_uv_counts_a_person_once_when_linked_and_the_page_says_which(
    tmp_path: Path,
    miniprogram: Runner,  # noqa: F811 - the fixture imported above
    grant: list[str],
    persons: int,
    by_device: float,
) -> None:
    gw = make_gateway(tmp_path, config=CONFIG).start()
    try:
        s = shopper()
        scenario = visit(
            gw, APPID_A, openid=s["openid_a"], unionid=s["unionid"], login=s["user"], grant=grant
        )
        scenario["events"] = [{"name": "ViewProduct", "properties": {"sku": "SKU-1"}}]
        run = miniprogram(scenario)
        assert run["consent"] == 200 and accepted(run) == 10, run["responses"]
        # the same shopper on the website: consent for the browser, then the login (the
        # website's backend vouches for it) and a product view
        cookie = f"web-cookie-{uuid.uuid4().hex[:10]}"
        r = httpx.post(
            f"{gw.url}/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={"anonymousId": cookie, "grant": grant, "noticeId": "notice-v1"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        errors: list[Exception] = []
        web = Client(MALL_WEB_KEY, host=gw.url, sync_mode=True, on_error=lambda e, _b: errors.append(e))
        login = {"identityAssertion": assertion(s["user"], cookie)}
        ok, _ = web.identify(s["user"], {"plan": "gold"}, context=login, anonymous_id=cookie)
        assert ok
        ok, _ = web.track(s["user"], "Product Viewed", {"sku": "SKU-1"}, anonymous_id=cookie)
        assert ok and errors == []

        # embedded: the KPIs counted both views in their requests
        r = httpx.get(
            f"{gw.url}/admin/kpis",
            params={"tenant": "mall"},
            headers={"Authorization": f"Bearer {TOKENS['operator']}"},
            timeout=10,
        )
        viewed = next(k for k in r.json()["kpis"] if k["id"] == "uv_viewed")["windows"][-1]["total"]
        assert viewed["counted"] == 2 and viewed["byDevice"] == 2 * by_device, viewed
        client = httpx.Client(base_url=gw.url, timeout=10)
        sign_in(client, TOKENS["operator"])
        r = client.get("/console/monitoring", params={"tenant": "mall"})
        assert r.status_code == 200, r.text
        html = r.text
        uv = html.split('id="kpi-uv_viewed"', 1)[1].split("</tr>", 1)[0]
        assert re.search(r'data-window="60">(\d+)</td>', uv).group(1) == str(persons), uv  # type: ignore[union-attr]
        # this KPI's counted events, and the page's summary over its distinct-person KPIs
        assert f'data-by-device="{by_device:.4f}"' in uv, uv
        basis = html.split('id="uv-basis"', 1)[1].split("</p>", 1)[0]
        assert f'data-by-device="{by_device:.4f}"' in basis, basis
        if by_device:
            assert "按设备" in uv and "100 %" in basis, basis
        else:
            assert "按设备" not in uv and "按人" in uv and "100 %" in basis, basis
        # and the shopper's identifiers are nowhere on the page
        for secret in (*s.values(), cookie, run["anonymous_id"]):
            assert secret not in html, secret
    finally:
        gw.stop()
