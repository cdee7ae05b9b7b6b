"""The console's monitoring page in a real headless Chromium against a real ``idgate serve``:
after events sent over HTTP, the funnel and a KPI value are on the page, the charts are
server-side SVG (the page runs no script), it fits 1366x768, the window switch works from
the keyboard, and no request leaves 127.0.0.1 (``browser_page`` aborts and reports any)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Recorder, assert_fits, sign_in
from tests.conftest import Gateway, make_gateway
from tests.console.conftest import CONSOLE_CONFIG, HOSTILE_SKU, shop_funnel
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path_factory.mktemp("monitoring-gw"), config=CONSOLE_CONFIG).start()
    yield gw
    gw.stop()


def test_the_monitoring_page_in_chromium(
    gateway: Gateway, browser_page: tuple[Any, Recorder], tmp_path: Path
) -> None:
    page, recorder = browser_page
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        persons = shop_funnel(client)
    sign_in(page, gateway, "operator")
    page.click("a[href='/console/monitoring']")
    page.wait_for_selector("#kpis")

    def orders_counted() -> bool:
        page.goto(gateway.url + "/console/monitoring?tenant=shop")
        return bool(page.inner_text("#kpi-orders td[data-window='60']") == "1")

    wait_until(orders_counted, what="the order on the monitoring page")
    steps = page.locator("#funnel td[data-persons]").all_inner_texts()
    assert steps == ["3", "2", "1", "1"]
    assert page.locator("#funnel svg.bar").count() == 4
    assert page.locator("#kpis svg.spark").count() > 10
    assert page.inner_text("#kpi-payment_success_rate td[data-window='60']") == "100.0%"
    # the hostile SKU name is text in the table, not an element
    assert HOSTILE_SKU in page.inner_text("#top-skus")
    assert page.locator("#top-skus img").count() == 0
    assert page.evaluate("document.scripts.length") == 0
    # the shop links its visitors' identifiers: every UV is by person
    assert page.get_attribute("#uv-basis", "data-by-device") == "0.0000"
    # identity and pipeline health, with a row per destination of the shop
    assert page.locator("#identity-health tr[data-figure]").count() == 6
    assert page.locator("#delivery-lag tr[data-destination]").count() == 2
    assert_fits(page)
    page.screenshot(path=str(tmp_path / "monitoring.png"), full_page=True)  # to look at
    page.screenshot(path="/tmp/monitor-page.png", full_page=True)
    # the window switch, from the keyboard: the funnel is now over the last minute
    page.focus("select[name='window']")
    page.keyboard.press("Home")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_url("**window=1**")
    assert page.locator("#funnel td[data-persons]").count() == 4
    html = page.content()
    for anon in persons:
        assert anon not in html
    assert all(e.url.startswith(gateway.url) for e in recorder.exchanges)
