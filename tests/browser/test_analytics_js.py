"""Segment's analytics.js (analytics-next, from npm) in a real headless Chromium, on a shop
page served from another origin than idgate: the page records consent with ``fetch`` to
``/v1/consent`` and sends events with ``analytics.track``, through CORS (the source's
``allowed_origins``), and the events reach the sink pseudonymised, with the unified ID."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Site
from tests.conftest import MALL_WEB_KEY, TEST_CONFIG, Gateway, make_gateway

pytestmark = [pytest.mark.browser, pytest.mark.node, pytest.mark.slow]

SHOP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title>
<script src="/analytics/index.js"></script>
</head><body><h1>Shop</h1></body></html>
"""

# Runs in the page: load analytics.js against idgate (no Segment CDN: the settings are given),
# record consent for the visitor's anonymousId with fetch, then track an event.
SHOP_SCRIPT = """
async ({gateway, writeKey, grant}) => {
  const host = gateway.replace("http://", "") + "/v1";
  const segment = {apiKey: writeKey, apiHost: host, protocol: "http"};
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
    {writeKey, cdnSettings: {integrations: {"Segment.io": segment}}},
    {integrations: {"Segment.io": {apiHost: host, protocol: "http"}}},
  );
  const anonymousId = analytics.user().anonymousId();
  const out = {anonymousId};
  try {
    const r = await fetch(gateway + "/v1/consent", {
      method: "POST",
      headers: {"Authorization": "Basic " + btoa(writeKey + ":"), "Content-Type": "application/json"},
      body: JSON.stringify({anonymousId, grant, noticeId: "notice-v1", sdk: "analytics.js"}),
    });
    out.consent = {status: r.status, body: await r.json()};
  } catch (e) {
    out.consent = {error: String(e)};
  }
  const page = await analytics.page("Shop", "Home");
  const ctx = await analytics.track("Product Viewed", {sku: "SKU-1", price: 99});
  out.pageId = page.event.messageId;
  out.messageId = ctx.event.messageId;
  out.failed = [page, ctx].filter((c) => c.failedDelivery()).map((c) => String(c.failedDelivery().reason));
  return out;
}
"""


def gateway_for(tmp: Path, origin: str) -> Gateway:
    """The tests' gateway with the mall's web source allowing ``origin`` (the mall enforces consent)."""
    key_line = f'dev_write_key = "{MALL_WEB_KEY}"'
    assert TEST_CONFIG.count(key_line) == 1
    config = TEST_CONFIG.replace(key_line, f"{key_line}\nallowed_origins = [{json.dumps(origin)}]")
    return make_gateway(tmp, config=config)


# A shopper's desktop Chrome: headless Chromium's own user agent ("HeadlessChrome") is a
# bot's, whose events idgate drops (gateway.cleaning; the last test below).
SHOPPER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)


@pytest.fixture
def page(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context and page; requests to anywhere but 127.0.0.1 are aborted and
    listed in ``page.outside`` (analytics.js must not need Segment's CDN). The user agent is
    a shopper's, unless the test is parametrised indirectly with ``None`` (headless Chromium's)."""
    agent = getattr(request, "param", SHOPPER_AGENT)
    context = chromium.new_context(**({"user_agent": agent} if agent else {}))
    p = context.new_page()
    p.set_default_timeout(30_000)
    p.outside = []

    def guard(route: Any) -> None:
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            p.outside.append(route.request.url)
            route.abort()

    p.route("**/*", guard)
    p.console = []
    p.on("console", lambda m: p.console.append(f"{m.type}: {m.text}"))
    yield p
    context.close()


def test_analytics_js_from_another_origin_records_consent_and_tracks_through_idgate(
    tmp_path: Path, shop_site: Callable[[str], Site], page: Any
) -> None:
    shop = shop_site(SHOP_PAGE)
    gw = gateway_for(tmp_path / "gw", shop.origin).start()
    try:
        assert shop.origin != gw.url  # another port: another origin
        page.goto(shop.origin + "/index.html")
        out = page.evaluate(
            SHOP_SCRIPT, {"gateway": gw.url, "writeKey": MALL_WEB_KEY, "grant": ["analytics"]}
        )
        assert out["consent"].get("status") == 200, (out, page.console)
        assert out["consent"]["body"]["success"] is True
        assert out["failed"] == [], (out, page.console)
        assert page.outside == []

        # The mall enforces consent: the events pass because the page recorded it first.
        sent = {out["pageId"], out["messageId"]}
        events = gw.wait_for_sink(sent, "mall-warehouse")
        by_id = {e["messageId"]: e for e in events}
        event, page_view = by_id[out["messageId"]], by_id[out["pageId"]]
        assert page_view["type"] == "page" and page_view["name"] == "Home"
        assert event["type"] == "track" and event["event"] == "Product Viewed"
        assert event["properties"] == {"sku": "SKU-1", "price": 99}
        assert event["context"]["library"]["name"] == "analytics.js"
        assert event["context"]["idgate"]["source"] == "mall-web"
        # Pseudonymised on the way in, and resolved to a person: the unified ID is there.
        anonymous_id = out["anonymousId"]
        assert anonymous_id not in json.dumps(event)
        assert event["anonymousId"].startswith("k1.")
        assert event["anonymousId"] == page_view["anonymousId"]
        unified_id = event["context"]["unified_id"]
        assert unified_id.startswith("p_") and page_view["context"]["unified_id"] == unified_id
    finally:
        gw.stop()


def test_a_page_of_an_origin_no_source_allows_can_send_nothing(
    tmp_path: Path, shop_site: Callable[[str], Site], page: Any
) -> None:
    shop = shop_site(SHOP_PAGE)
    stranger = shop_site(SHOP_PAGE)
    gw = gateway_for(tmp_path / "gw", shop.origin).start()
    try:
        page.goto(stranger.origin + "/index.html")
        out = page.evaluate(
            SHOP_SCRIPT, {"gateway": gw.url, "writeKey": MALL_WEB_KEY, "grant": ["analytics"]}
        )
        # The browser refused to send (the preflight got no grant): fetch fails, the SDK too.
        assert "Failed to fetch" in out["consent"].get("error", ""), out
        assert page.outside == []
        # Nothing of the page's reached the sink: wait past a sentinel sent after it.
        sentinel = gw.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])
        assert sentinel["event"] == "Sentinel"
        ids = {e["messageId"] for e in gw.sink_lines("mall-warehouse")}
        assert out["messageId"] not in ids
    finally:
        gw.stop()


@pytest.mark.parametrize("page", [None], indirect=True)
def test_headless_chromium_is_a_bot_whose_events_are_dropped_and_counted(
    tmp_path: Path, shop_site: Callable[[str], Site], page: Any
) -> None:
    shop = shop_site(SHOP_PAGE)
    gw = gateway_for(tmp_path / "gw", shop.origin).start()
    try:
        page.goto(shop.origin + "/index.html")
        out = page.evaluate(
            SHOP_SCRIPT, {"gateway": gw.url, "writeKey": MALL_WEB_KEY, "grant": ["analytics"]}
        )
        assert out["failed"] == [], (out, page.console)  # answered 200, with the drop counted
        gw.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])
        ids = {e["messageId"] for e in gw.sink_lines("mall-warehouse")}
        assert not {out["messageId"], out["pageId"]} & ids
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        assert 'idgate_events_dropped_total{reason="bot",tenant="mall"} 2.0' in metrics, metrics
    finally:
        gw.stop()
