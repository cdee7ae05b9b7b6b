"""The monitoring page's identity and pipeline health over real HTTP (a served gateway): a
login merge, a quarantined link, an unlink, a consent drop and a plan violation each move
their figure on the page, the delivery lag shows per destination, distributed mode says
the counts are the replica's own, and no identifier appears on the page."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.console.sessions import LANGUAGE_COOKIE
from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_WEB_KEY,
    Gateway,
    RedisNamespace,
    assertion,
    make_gateway,
    mid,
)
from tests.console.conftest import CONSOLE_CONFIG, TOKENS, held_merge, sign_in
from tests.gateway.test_tracking_plan import MALL_PLAN
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

LINKING = ["analytics", "identity_linking"]
DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
_ROW = re.compile(r'<tr data-figure="([^"]+)">(.*?)</tr>', re.S)
Figures = dict[str, tuple[int, int | None]]


def health_config(tmp: Path) -> str:
    plan = tmp / "mall-plan.yaml"
    plan.write_text(MALL_PLAN)
    return CONSOLE_CONFIG.replace('id = "mall"\n', f'id = "mall"\ntracking_plan_file = "{plan}"\n', 1)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = make_gateway(tmp_path, config=health_config(tmp_path)).start()
    yield g
    g.stop()


def table(html: str, table_id: str) -> str:
    assert f'id="{table_id}"' in html, f"no {table_id} table on the page"
    return html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]


def figures(html: str, table_id: str) -> Figures:
    """Figure name -> (since start, last hour) as the page's table shows them."""
    out: Figures = {}
    for name, cells in _ROW.findall(table(html, table_id)):
        total = re.search(r'data-total="(\d*)"', cells)
        hour = re.search(r'data-hour="(\d*)"', cells)
        assert total is not None and total.group(1), (name, cells)
        out[name] = (int(total.group(1)), int(hour.group(1)) if hour and hour.group(1) else None)
    return out


def all_figures(html: str) -> Figures:
    out = figures(html, "identity-health")
    for table_id, prefix in (("drops", "dropped:"), ("violations", "violation:")):
        if f'id="{table_id}"' in html:
            out.update({prefix + k: v for k, v in figures(html, table_id).items()})
    return out


def moved(read: Callable[[], str], before: Figures, expected: dict[str, int]) -> tuple[str, dict[str, int]]:
    """Poll the page until the expected figures moved; returns the page and what moved
    (since start; the last hour moves with it while the gateway is younger than an hour)."""

    def deltas(html: str) -> dict[str, int]:
        now = all_figures(html)
        for name, (total, hour) in now.items():
            assert hour is None or hour == total, (name, total, hour)  # a young gateway
        return {k: now[k][0] - before.get(k, (0, 0))[0] for k in now if now[k][0] != before.get(k, (0, 0))[0]}

    html = wait_until(
        lambda: h if all(deltas(h := read()).get(k, 0) >= v for k, v in expected.items()) else None,
        what=f"the page to show {expected}",
    )
    return html, deltas(html)


def test_identity_and_pipeline_health_move_with_what_happened(gw: Gateway) -> None:
    client = httpx.Client(base_url=gw.url, timeout=10)
    sign_in(client, TOKENS["operator"])

    def read() -> str:
        r = client.get("/console/monitoring", params={"tenant": "mall"})
        assert r.status_code == 200, r.text
        return r.text

    start = read()
    assert 'id="health-title"' in start and 'id="health-scope"' in start
    t = uuid.uuid4().hex[:8]
    # a web visitor logs in: two identifiers (two persons), merged into one
    cookie, user = f"cookie-{t}", f"user-{t}"
    r = client.post(
        "/v1/consent",
        auth=(MALL_WEB_KEY, ""),
        json={"anonymousId": cookie, "grant": LINKING, "noticeId": "notice-v1"},
    )
    assert r.status_code == 200, r.text
    login = {
        "type": "identify",
        "anonymousId": cookie,
        "userId": user,
        "messageId": mid(),
        "context": {"identityAssertion": assertion(user, cookie)},
    }
    r = client.post("/v1/batch", auth=(MALL_WEB_KEY, ""), json={"batch": [login]})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    html, got = moved(read, all_figures(start), {"merges": 1, "persons_created": 2})
    assert got == {"merges": 1, "persons_created": 2}, got
    sizes = table(html, "person-sizes")  # the merged person: two identifiers, one link
    assert re.search(r'<tr data-size="2">.*?<td class="num">1</td>', sizes, re.S), sizes
    # a person past the mall's bound of three identifiers: the fourth link is held
    before = all_figures(html)
    phone, device = held_merge(client)
    html, got = moved(read, before, {"quarantined": 1, "quarantine_size": 1})
    assert got["quarantined"] == 1 and got["quarantine_size"] == 1, got
    # the operator unlinks the web login: one split
    before = all_figures(html)
    found = client.get(
        "/admin/identity/explain",
        headers=DPO,
        params={"tenant": "mall", "a": user, "a_type": "user_id", "b": cookie, "b_type": "anonymous_id"},
    ).json()
    nodes = {"tenant": "mall", "a": {"node": found["a"]}, "b": {"node": found["b"]}}
    r = client.post("/admin/identity/unlink", headers=DPO, json=nodes)
    assert r.status_code == 200 and r.json()["split"] is True, r.text
    html, got = moved(read, before, {"splits": 1})
    assert got == {"splits": 1}, got
    # an event without consent is dropped; a product view breaking the plan (sku a number)
    before = all_figures(html)
    stranger = f"stranger-{t}"
    batch = [
        {"type": "page", "anonymousId": stranger, "name": "Home", "messageId": mid()},
        {
            "type": "track",
            "anonymousId": cookie,
            "event": "Product Viewed",
            "properties": {"sku": 12345},
            "messageId": mid(),
        },
    ]
    r = client.post("/v1/batch", auth=(MALL_WEB_KEY, ""), json={"batch": batch})
    assert r.status_code == 200 and r.json()["dropped"] == {"no_consent": 1}, r.text
    html, got = moved(read, before, {"dropped:no_consent": 1, "violation:type": 1})
    # the page view is no event of the mall's plan: unplanned (checked before consent)
    assert got == {"dropped:no_consent": 1, "violation:type": 1, "violation:unplanned": 1}, got
    # the delivery lag: every destination of the mall has a row; the warehouse delivered
    lag = table(html, "delivery-lag")
    assert set(re.findall(r'data-destination="([^"]+)"', lag)) == {
        "mall-warehouse",
        "mall-orders",
        "mall-overseas",
        "mall-ads",
    }
    warehouse = lag.split('data-destination="mall-warehouse"', 1)[1].split("</tr>", 1)[0]
    seconds = re.search(r'data-lag="([\d.]+)"', warehouse)
    assert seconds is not None and 0 <= float(seconds.group(1)) < 30, warehouse
    # canary: no identifier, pseudonym or unified ID on the page
    delivered = gw.wait_for_sink({login["messageId"]}, "mall-warehouse")
    canaries = {t, cookie, user, phone, device, stranger, found["a"], found["b"]}
    canaries |= {e["context"]["unified_id"] for e in delivered}
    for canary in canaries:
        assert canary not in html, canary


def test_in_distributed_mode_the_page_says_the_counts_are_the_replicas_own(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    gw = make_gateway(tmp_path, config=health_config(tmp_path), extra_env=redis_ns.env()).start()
    try:
        client = httpx.Client(base_url=gw.url, timeout=10)
        sign_in(client, TOKENS["auditor"])
        client.cookies.set(LANGUAGE_COOKIE, "en")
        html = client.get("/console/monitoring", params={"tenant": "mall"}).text
        scope = html.split('id="health-scope"', 1)[1].split("</p>", 1)[0]
        assert "Distributed: these counts are this replica&#39;s only" in scope, scope
    finally:
        gw.stop()
