"""Data cleaning (issue 14 item 6, gateway.cleaning) over real HTTP with the real SDK clients
(the Segment Python client, the Sensors Python SDK) and plain httpx: bots and crawlers and
internal / QA traffic dropped and counted by reason, blocked identifier values and patterns
not linked, far-off timestamps flagged; the QA ids and the internal address leave no trace
in any log, row or sink; ``config check`` names a bad CIDR or regular expression."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from gateway.config import ConfigProblems, parse_config
from tests.conftest import APP_KEY, SHOP_SERVER_KEY, TEST_CONFIG, WEB_KEY, Gateway, make_gateway, mid
from tests.gateway.test_config import run_cli
from tests.sensors.conftest import sensors_url
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

QA_USER = "qa-canary-7731"
QA_SENSORS_LOGIN = "qa-canary-sensors-5519"
INTERNAL_IP = "198.51.100.23"
INTERNAL_PEER = "198.51.100.9"
CLEANING = f"""
[tenants.cleaning]
bot_patterns = ["idgate-test-crawler/"]
internal_ids = [
  {{ type = "user_id", value = "{QA_USER}" }},
  {{ type = "user_id", value = "{QA_SENSORS_LOGIN}" }},
]
internal_networks = ["198.51.100.0/24", "2001:db8:77::/48"]
blocked_identifiers = ["test-user"]
blocked_identifier_patterns = ["demo-[0-9]+"]
max_future_seconds = 86400
max_past_seconds = 2592000

"""
BOTS = {
    "Baiduspider": "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    "Sogou": "Sogou web spider/4.0(+http://www.sogou.com/docs/help/webmasters.htm#07)",
    "360Spider": "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/535.1 (KHTML, like Gecko) "
    "Chrome/14.0.835.163 Safari/535.1; 360Spider",
    "Bytespider": "Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile "
    "Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)",
    "YisouSpider": "Mozilla/5.0 (compatible; YisouSpider)",
    "Googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "bingbot": "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "HeadlessChrome": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.0.0 Safari/537.36",
    "tenant pattern": "idgate-test-crawler/1.0",
}
HUMAN = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148 MicroMessenger/8.0.40(0x18002831) NetType/WIFI Language/zh_CN"
)


def cleaning_config() -> str:
    # the shop's cleaning table; one proxy in front, so X-Forwarded-For names the client
    config = TEST_CONFIG.replace(
        '[[tenants.destinations]]\nid = "warehouse"',
        CLEANING + '[[tenants.destinations]]\nid = "warehouse"',
        1,
    )
    return config.replace("[rate_limits]\n", "[rate_limits]\nforwarded_hops = 1\n", 1)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = make_gateway(tmp_path_factory.mktemp("cleaning"), config=cleaning_config()).start()
    yield gateway
    gateway.stop()


def post_batch(
    gw: Gateway, batch: list[dict], key: str = WEB_KEY, headers: dict[str, str] | None = None
) -> dict:
    with gw.client(key) as c:
        r = c.post("/v1/batch", json={"batch": batch}, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def track(anon: str, **fields: object) -> dict:
    return {"type": "track", "anonymousId": anon, "event": "Product Viewed", "messageId": mid(), **fields}


def metric(gw: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def delivered(gw: Gateway, message_ids: set[str]) -> set[str]:
    gw.wait_past()
    return {e["messageId"] for e in gw.sink_lines() if e["messageId"] in message_ids}


def test_bots_are_dropped_before_anything_is_stored_and_counted(gw: Gateway) -> None:
    before = metric(gw, "idgate_events_dropped_total", tenant="shop", reason="bot")
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    bots = [track(anon, context={"userAgent": ua}) for ua in BOTS.values()]
    human = track(anon, context={"userAgent": HUMAN})
    body = post_batch(gw, [*bots, human])
    assert body["accepted"] == 1 and body["dropped"] == {"bot": len(BOTS)}, body
    assert delivered(gw, {m["messageId"] for m in [*bots, human]}) == {human["messageId"]}
    assert metric(gw, "idgate_events_dropped_total", tenant="shop", reason="bot") == before + len(BOTS)


def test_bots_through_the_sdks_and_the_request_header(gw: Gateway) -> None:
    """Segment client (context.userAgent), Sensors SDK ($user_agent), and a web request's
    browser-style User-Agent header when the event names none."""
    errors: list[Exception] = []
    client = Client(WEB_KEY, host=gw.url, on_error=lambda e, _b: errors.append(e), max_retries=2)
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    _, bot = client.track(
        anonymous_id=anon, event="Product Viewed", context={"userAgent": BOTS["Bytespider"]}
    )
    _, person = client.track(anonymous_id=anon, event="Product Viewed", context={"userAgent": HUMAN})
    client.flush()
    assert not errors
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw), request_timeout=10))
    tag = uuid.uuid4().hex[:10]
    sa.track(f"visitor-{tag}", "ViewProduct", {"$user_agent": BOTS["Baiduspider"], "run_tag": f"bot-{tag}"})
    sa.track(f"visitor-{tag}", "ViewProduct", {"$user_agent": HUMAN, "run_tag": f"human-{tag}"})
    sa.close()

    header_bot = track(anon)
    body = post_batch(gw, [header_bot], headers={"User-Agent": BOTS["Googlebot"]})
    assert body["dropped"] == {"bot": 1} and body["accepted"] == 0, body
    # an app's request header is its HTTP library's, never the person's: not checked
    app_event = track(anon)
    body = post_batch(gw, [app_event], key=APP_KEY, headers={"User-Agent": BOTS["Googlebot"]})
    assert body["accepted"] == 1, body

    gw.wait_past()
    lines = gw.sink_lines()
    ids = {e["messageId"] for e in lines}
    assert person["messageId"] in ids and bot["messageId"] not in ids
    assert header_bot["messageId"] not in ids and app_event["messageId"] in ids
    tags = {e.get("properties", {}).get("run_tag") for e in lines}
    assert f"human-{tag}" in tags and f"bot-{tag}" not in tags


def test_internal_networks_and_qa_accounts_are_dropped(gw: Gateway) -> None:
    before = metric(gw, "idgate_events_dropped_total", tenant="shop", reason="internal")
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    by_ip = track(anon, context={"ip": INTERNAL_IP})
    by_v6 = track(anon, context={"ip": "2001:db8:77:1::5"})
    by_qa = track(anon, userId=QA_USER)
    kept = track(anon, context={"ip": "203.0.113.7"})
    body = post_batch(gw, [by_ip, by_v6, by_qa, kept])
    assert body["accepted"] == 1 and body["dropped"] == {"internal": 3}, body
    # the request's own address (through the proxy): a client source's is the person's
    from_office = track(anon)
    body = post_batch(gw, [from_office], headers={"X-Forwarded-For": INTERNAL_PEER})
    assert body["dropped"] == {"internal": 1}, body
    # a server source's request comes from the shop's backend, not the shopper
    from_backend = track(anon)
    body = post_batch(gw, [from_backend], key=SHOP_SERVER_KEY, headers={"X-Forwarded-For": INTERNAL_PEER})
    assert body["accepted"] == 1, body

    # the Segment client and the Sensors SDK with a QA account
    errors: list[Exception] = []
    client = Client(SHOP_SERVER_KEY, host=gw.url, on_error=lambda e, _b: errors.append(e), max_retries=2)
    _, qa_segment = client.track(user_id=QA_USER, event="Order Completed")
    client.flush()
    assert not errors
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw, server=True), request_timeout=10))
    tag = uuid.uuid4().hex[:10]
    sa.track(QA_SENSORS_LOGIN, "ViewProduct", {"run_tag": tag}, is_login_id=True)
    sa.close()
    wait_until(
        lambda: metric(gw, "idgate_events_dropped_total", tenant="shop", reason="internal") >= before + 6,
        what="the SDKs' QA events counted as internal",
    )
    assert delivered(gw, {m["messageId"] for m in (by_ip, by_v6, by_qa, from_office, qa_segment)}) == set()
    lines = gw.sink_lines()
    ids = {e["messageId"] for e in lines}
    assert {kept["messageId"], from_backend["messageId"]} <= ids
    assert tag not in {e.get("properties", {}).get("run_tag") for e in lines}


def test_blocked_identifiers_are_not_linked(gw: Gateway) -> None:
    before = metric(gw, "idgate_events_identifier_blocked_total", tenant="shop")
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    by_value = track(anon, userId="Test-User")
    by_pattern = track(anon, userId="demo-12345")
    only_blocked = {"type": "track", "userId": "demo-1", "event": "Product Viewed", "messageId": mid()}
    body = post_batch(gw, [by_value, by_pattern, only_blocked])
    assert body["accepted"] == 2, body
    assert [r["error"] for r in body["rejected"]] == ["missing_identity"]
    gw.wait_past()
    lines = {e["messageId"]: e for e in gw.sink_lines()}
    for m in (by_value, by_pattern):
        assert "userId" not in lines[m["messageId"]] and lines[m["messageId"]]["anonymousId"]
    assert metric(gw, "idgate_events_identifier_blocked_total", tenant="shop") == before + 3


def test_far_off_timestamps_are_flagged_not_dropped(gw: Gateway) -> None:
    before = metric(gw, "idgate_events_flagged_total", tenant="shop", flag="timestamp_skew")
    now = datetime.now(UTC)
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    future = track(anon, timestamp=(now + timedelta(days=3)).isoformat())
    past = track(anon, timestamp=(now - timedelta(days=45)).isoformat())
    # a client cannot forge idgate's own context
    recent = track(
        anon, timestamp=(now - timedelta(hours=2)).isoformat(), context={"idgate": {"flags": ["x"]}}
    )
    body = post_batch(gw, [future, past, recent])
    assert body["accepted"] == 3 and not body["dropped"], body
    gw.wait_past()
    lines = {e["messageId"]: e for e in gw.sink_lines()}
    assert lines[future["messageId"]]["context"]["idgate"]["flags"] == ["timestamp_skew"]
    assert lines[past["messageId"]]["context"]["idgate"]["flags"] == ["timestamp_skew"]
    assert "flags" not in lines[recent["messageId"]]["context"]["idgate"]
    assert metric(gw, "idgate_events_flagged_total", tenant="shop", flag="timestamp_skew") == before + 2


def test_the_qa_ids_and_internal_addresses_leave_no_trace(gw: Gateway) -> None:
    """Runs after the tests above (module order): every file of the data dir (databases,
    outbox, sinks, key-free state) and the log."""
    gw.wait_past()
    canaries = [QA_USER, QA_SENSORS_LOGIN, INTERNAL_IP, INTERNAL_PEER, "2001:db8:77:1::5"]
    for path in Path(gw.data_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for canary in canaries:
                assert canary.encode() not in data, f"{canary} in {path}"
    log = gw.log_text()
    for canary in canaries:
        assert canary not in log


def test_config_check_names_the_bad_field(tmp_path: Path) -> None:
    broken = (
        cleaning_config()
        .replace('"198.51.100.0/24"', '"198.51.100.0/33"')
        .replace('"demo-[0-9]+"', '"demo-[0-9"')
    )
    broken = broken.replace(f'value = "{QA_USER}"', 'value = "null"')
    with pytest.raises(ConfigProblems) as info:
        parse_config(broken, path="broken.toml", dev=True)
    text = "\n".join(info.value.problems)
    assert "tenants[0].cleaning.internal_networks[0]" in text, text
    assert "tenants[0].cleaning.blocked_identifier_patterns[0]" in text, text
    assert "tenants[0].cleaning.internal_ids[0]: placeholder value" in text, text
    assert "198.51.100.0/33" in text and QA_USER not in text
    # the same through `idgate config check`
    path = tmp_path / "broken.toml"
    path.write_text(broken)
    check = run_cli("config", "check", str(path))
    assert check.returncode == 1 and "tenants[0].cleaning.internal_networks[0]" in check.stderr
    good = tmp_path / "good.toml"
    good.write_text(cleaning_config())
    assert run_cli("config", "check", str(good)).returncode == 0
