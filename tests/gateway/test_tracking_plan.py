"""Tracking plans over real HTTP (issue 14): the seed e-commerce plan validates Segment and
Sensors events alike; observe delivers and counts, enforce keeps violating events as
records that can be replayed once the plan is fixed; data classes drive consent and
pseudonymisation; ``config check`` and ``plan check`` report a broken plan or bad events."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.canaries import Canaries
from tests.conftest import (
    IDGATE,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    ROOT,
    SHARED_KEYS,
    TEST_CONFIG,
    WEB_KEY,
    Gateway,
    RedisNamespace,
    make_gateway,
    mid,
)
from tests.e2e.test_canary_every_field import redis_value
from tests.sensors.conftest import encode, sensors_event, sensors_url

pytestmark = pytest.mark.slow
SEED = ROOT / "plans" / "ecommerce.yaml"
# The mall's own small plan: a sensitive-class and a contact-class property.
MALL_PLAN = """
plan: mall
version: 1
ignore: ["Sentinel", "Payment Requested"]
events:
  product_viewed:
    description: A product detail page was shown.
    owner: merchandising
    purposes: [analytics]
    legal_basis: consent
    segment: ["Product Viewed"]
    properties:
      sku: {class: none, type: string}
      skin_type: {class: sensitive, type: string}
      stylist_wechat: {class: contact, type: string}
"""


PRICE_RULE = "      price: {class: financial, type: number, minimum: 0}\n"


def seed_plan(tmp: Path) -> Path:
    """The seed plan, with the test's sentinel event (Gateway.wait_past) ignored."""
    path = tmp / "ecommerce.yaml"
    path.write_text(SEED.read_text().replace("ignore:\n", 'ignore:\n  - "Sentinel"\n', 1))
    return path


def plan_config(shop_plan: Path, mode: str, mall_plan: Path | None = None) -> str:
    config = TEST_CONFIG.replace(
        'id = "shop"\n', f'id = "shop"\ntracking_plan_file = "{shop_plan}"\nplan_mode = "{mode}"\n', 1
    )
    if mall_plan is not None:
        config = config.replace('id = "mall"\n', f'id = "mall"\ntracking_plan_file = "{mall_plan}"\n', 1)
    return config


def product_added(price: object, **extra: object) -> dict:
    return {
        "type": "track",
        "event": "Product Added",
        "messageId": mid(),
        "anonymousId": f"anon-{uuid.uuid4().hex[:8]}",
        "properties": {"product_id": "sku-1", "price": price, "quantity": 1, **extra},
    }


def batch(gw: Gateway, *messages: dict, key: str = WEB_KEY) -> dict:
    r = httpx.post(gw.url + "/v1/batch", json={"batch": list(messages)}, auth=(key, ""), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def metric(gw: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def admin(gw: Gateway, method: str, path: str, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    return httpx.request(method, gw.url + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def observing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("plan-observe")
    mall_plan = tmp / "mall.yaml"
    mall_plan.write_text(MALL_PLAN)
    gw = make_gateway(tmp, config=plan_config(seed_plan(tmp), "observe", mall_plan)).start()
    yield gw
    gw.stop()


def test_observe_delivers_a_string_price_and_counts_it(observing: Gateway) -> None:
    good, bad = product_added(9.9), product_added("9.90")
    before = metric(observing, "idgate_events_plan_violation_total", event="product_added", rule="type")
    out = batch(observing, good, bad)
    assert out["accepted"] == 2
    assert out["planViolations"] == [
        {
            "index": 1,
            "event": "product_added",
            "action": "delivered",
            "violations": [
                {"rule": "type", "path": "properties.price", "detail": "must satisfy type: 'number'"}
            ],
            "messageId": bad["messageId"],
        }
    ]
    delivered = observing.wait_for_sink({good["messageId"], bad["messageId"]})
    assert {e["messageId"] for e in delivered} == {good["messageId"], bad["messageId"]}
    after = metric(observing, "idgate_events_plan_violation_total", event="product_added", rule="type")
    assert after == before + 1


def test_unplanned_events_are_counted_in_observe(observing: Gateway) -> None:
    before = metric(observing, "idgate_events_plan_violation_total", event="unplanned", rule="unplanned")
    msg = {"type": "track", "event": "Wishlist Shared", "messageId": mid(), "anonymousId": "anon-unplanned"}
    ignored = {"type": "track", "event": "$AppStart", "messageId": mid(), "anonymousId": "anon-unplanned"}
    out = batch(observing, msg, ignored)
    assert out["accepted"] == 2
    assert [(v["index"], v["event"], v["violations"][0]["rule"]) for v in out["planViolations"]] == [
        (0, "unplanned", "unplanned")
    ]
    assert (
        metric(observing, "idgate_events_plan_violation_total", event="unplanned", rule="unplanned")
        == before + 1
    )


def test_segment_page_calls_and_missing_required_properties(observing: Gateway) -> None:
    home = {
        "type": "page",
        "name": "Home",
        "messageId": mid(),
        "anonymousId": "anon-p",
        "properties": {"dwell_time": -3},
    }
    order = {
        "type": "track",
        "event": "Order Completed",
        "messageId": mid(),
        "anonymousId": "anon-p",
        "properties": {"order_id": "o-1", "total": 10, "currency": "cny"},
    }
    out = batch(observing, home, order)
    found = {v["event"]: v["violations"] for v in out["planViolations"]}
    assert found["home_viewed"] == [
        {"rule": "minimum", "path": "properties.dwell_time", "detail": "must satisfy minimum: 0"}
    ]
    assert sorted((v["rule"], v["path"]) for v in found["order_completed"]) == [
        ("pattern", "properties.currency"),
        ("required", "properties.products"),
    ]


def test_segment_and_sensors_validate_against_one_plan_entry(observing: Gateway) -> None:
    """Segment "Product Added" and Sensors "AddToShoppingCart" are one plan event: the
    same string price is the same violation for both."""
    labels = {"event": "product_added", "rule": "type"}
    web = metric(observing, "idgate_events_plan_violation_total", source="shop-web", **labels)
    app = metric(observing, "idgate_events_plan_violation_total", source="shop-app", **labels)
    batch(observing, product_added("12"))
    tag = uuid.uuid4().hex[:10]
    ev = sensors_event(
        f"visitor-{tag}",
        event="AddToShoppingCart",
        properties={"product_id": "sku-1", "price": "12", "quantity": 1, "run_tag": tag},
    )
    r = httpx.post(
        sensors_url(observing),
        content=f"data_list={encode([ev])}&gzip=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert metric(observing, "idgate_events_plan_violation_total", source="shop-web", **labels) == web + 1
    assert metric(observing, "idgate_events_plan_violation_total", source="shop-app", **labels) == app + 1
    # a valid Sensors event is no violation
    ok = sensors_event(
        f"visitor-{tag}", event="AddToShoppingCart", properties={"product_id": "s", "price": 3, "quantity": 2}
    )
    httpx.post(
        sensors_url(observing),
        content=f"data_list={encode([ok])}&gzip=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert metric(observing, "idgate_events_plan_violation_total", source="shop-app", **labels) == app + 1


def test_data_classes_sensitive_needs_sensitive_pi_and_contact_is_pseudonymised(observing: Gateway) -> None:
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    r = httpx.post(
        observing.url + "/v1/consent",
        json={"noticeId": "notice-v1", "anonymousId": anon, "grant": ["analytics"]},
        auth=(MALL_WEB_KEY, ""),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    props = {"sku": "A1", "skin_type": "dry", "stylist_wechat": "wxid_stylist_8841"}
    m = mid()
    out = batch(
        observing,
        {
            "type": "track",
            "event": "Product Viewed",
            "messageId": m,
            "anonymousId": anon,
            "properties": props,
        },
        key=MALL_WEB_KEY,
    )
    assert out["accepted"] == 1 and "planViolations" not in out
    (event,) = observing.wait_for_sink({m}, "mall-warehouse")
    delivered = event["properties"]
    assert "skin_type" not in delivered  # sensitive class, no sensitive_pi consent
    assert delivered["sku"] == "A1"
    assert delivered["stylist_wechat"] != "wxid_stylist_8841" and "8841" not in json.dumps(event)


@pytest.fixture
def enforcing(tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    plan = seed_plan(tmp_path)
    gw = make_gateway(tmp_path, config=plan_config(plan, "enforce")).start()
    yield gw, plan
    gw.stop()


def test_enforce_keeps_violations_then_replays_them_after_the_plan_is_fixed(
    enforcing: tuple[Gateway, Path],
) -> None:
    gw, plan = enforcing
    good, bad = product_added(9.9), product_added("9.90")
    unplanned = {"type": "track", "event": "Wishlist Shared", "messageId": mid(), "anonymousId": "anon-w"}
    out = batch(gw, good, bad, unplanned)
    assert out["accepted"] == 1
    assert [(v["index"], v["event"], v["action"]) for v in out["planViolations"]] == [
        (1, "product_added", "kept"),
        (2, "unplanned", "kept"),
    ]
    gw.wait_past()
    delivered = {e["messageId"] for e in gw.sink_lines()}
    assert good["messageId"] in delivered
    assert bad["messageId"] not in delivered and unplanned["messageId"] not in delivered
    # a retry of the same bad event is not a second record
    batch(gw, bad)
    listed = admin(gw, "GET", "/admin/plan/violations/", params={"tenant": "shop"})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["counts"] == {"product_added": 1, "unplanned": 1}
    record = next(v for v in body["violations"] if v["event"] == "product_added")
    assert record["messageId"] == bad["messageId"]
    assert record["violations"] == [
        {"rule": "type", "path": "properties.price", "detail": "must satisfy type: 'number'"}
    ]
    listed_cli = run_cli("plan", "violations", "--data-dir", str(gw.data_dir), "--tenant", "shop", "--json")
    assert listed_cli.returncode == 0, listed_cli.stderr
    assert json.loads(listed_cli.stdout)["counts"] == {"product_added": 1, "unplanned": 1}
    shown = admin(gw, "GET", f"/admin/plan/violations/{record['id']}").json()
    assert shown["event"]["properties"]["price"] == "9.90"
    assert shown["event"]["anonymousId"] != bad["anonymousId"]  # pseudonymised, never raw
    assert bad["anonymousId"] not in (gw.data_dir / "violations.sqlite3").read_bytes().decode("latin-1")
    # ids that are not a stored row: a clear 404, never a 500 (fuzzing found "²", a digit to
    # str.isdigit that int() refuses, and a number past SQLite's 64-bit range)
    for missing in ("%C2%B2", "99999999999999999999999", "0", "abc"):
        answer = admin(gw, "GET", f"/admin/plan/violations/{missing}")
        assert answer.status_code == 404, (missing, answer.text)

    # replay before the fix: still violating, kept
    again = admin(gw, "POST", "/admin/plan/violations/replay", json={"tenant": "shop", "all": True})
    assert again.status_code == 200, again.text
    assert again.json()["stillViolating"] == 2

    fix_plan(plan)
    gw.stop()
    gw.start()
    replayed = admin(gw, "POST", "/admin/plan/violations/replay", json={"tenant": "shop", "all": True})
    assert replayed.json() == {
        "replayed": 2,
        "duplicates": 0,
        "dropped": 0,
        "stillViolating": 0,
        "rejected": 0,
        "unknownSource": 0,
        "records": [  # what became of each, in id order
            {"id": v["id"], "messageId": v["messageId"], "event": v["event"], "outcome": "replayed"}
            for v in body["violations"]
        ],
    }
    assert [r["messageId"] for r in replayed.json()["records"]] == [bad["messageId"], unplanned["messageId"]]
    found = gw.wait_for_sink({bad["messageId"], unplanned["messageId"]})
    assert {e["messageId"] for e in found} == {bad["messageId"], unplanned["messageId"]}
    assert admin(gw, "GET", "/admin/plan/violations/", params={"tenant": "shop"}).json()["counts"] == {}
    # the client's retry after the replay is a duplicate, not a second delivery
    assert batch(gw, bad)["duplicates"] == 1


def fix_plan(plan: Path) -> None:
    """The fix a team ships: product_added's price may be a decimal string now, the
    unplanned "Wishlist Shared" is planned, and the version is raised, as a fix must."""
    head, tail = plan.read_text().split("  product_added:\n", 1)
    fixed = '      price: {class: financial, type: [number, string], pattern: "^[0-9]+(\\\\.[0-9]+)?$"}\n'
    assert PRICE_RULE in tail
    text = re.sub(
        r"^version: (\d+)$",
        lambda m: f"version: {int(m[1]) + 1}",
        head + "  product_added:\n" + tail.replace(PRICE_RULE, fixed, 1),
        count=1,
        flags=re.M,
    )
    text += (
        "  wishlist_shared:\n    description: A wishlist was shared.\n    owner: growth\n"
        '    purposes: [analytics]\n    legal_basis: consent\n    segment: ["Wishlist Shared"]\n'
    )
    plan.write_text(text)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IDGATE, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


BROKEN_PLAN = """
plan: broken
version: 1
events:
  product_added:
    description: Add to cart.
    owner: checkout
    purposes: [analytics, spying]
    legal_basis: consent
    required: [price]
    properties:
      price: {class: money, type: number}
      buyer_phone: {class: contact, type: string, pattern: "^1[0-9]{10}$"}
      quantity: {class: none, type: integr}
"""


def test_config_check_reports_a_broken_plan_with_its_location(tmp_path: Path) -> None:
    ok = tmp_path / "ok.toml"
    ok.write_text(plan_config(SEED, "enforce"))
    good = run_cli("config", "check", str(ok))
    assert good.returncode == 0, good.stderr
    plan = tmp_path / "plans" / "broken.yaml"
    plan.parent.mkdir()
    plan.write_text(BROKEN_PLAN)
    config = tmp_path / "idgate.toml"
    config.write_text(plan_config(Path("plans/broken.yaml"), "observe"))  # relative to the config
    bad = run_cli("config", "check", str(config))
    assert bad.returncode == 1
    where = f"tenants[0].tracking_plan_file: {plan}: events.product_added"
    for problem in (
        f"{where}.purposes: unknown purpose 'spying'",
        f"{where}.properties.price.class: 'money' is not one of",
        f"{where}.properties.buyer_phone.pattern: a contact property is checked after pseudonymisation",
        f"{where}.properties.quantity.type: not a valid JSON Schema",
    ):
        assert problem in bad.stderr, bad.stderr
    plan.write_text("plan: x\nversion: 1\nevents:\n  a: {description: d, owner: o, purposes: [analytics]\n")
    syntax = run_cli("config", "check", str(config))
    assert syntax.returncode == 1 and re.search(r"YAML syntax \(line \d+\)", syntax.stderr), syntax.stderr


def test_plan_check_reports_a_sample_of_events(tmp_path: Path) -> None:
    config = tmp_path / "idgate.toml"
    config.write_text(plan_config(SEED, "observe"))
    sample = tmp_path / "sample.jsonl"
    events = [
        {
            "type": "track",
            "event": "Product Added",
            "properties": {"product_id": "a", "price": "9", "quantity": 1},
        },
        {
            "type": "track",
            "event": "AddToShoppingCart",
            "properties": {"product_id": "a", "price": 9, "quantity": 1},
        },
        {"type": "track", "event": "Order Completed", "properties": {"order_id": "o"}},
        {"type": "track", "event": "Wishlist Shared"},
        {"type": "page", "name": "Home", "properties": {"dwell_time": 4.5}},
        {"type": "track", "event": "$MPViewScreen", "properties": {"$title": "Home"}},
        {"type": "track", "event": "$MPPageLeave", "properties": {"event_duration": -2}},
    ]
    sample.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    out = run_cli("plan", "check", "--config", str(config), "--tenant", "shop", "--events", str(sample))
    assert out.returncode == 1, out.stderr
    report = out.stdout
    assert "7 events checked: 3 valid, 4 with violations, 1 line unreadable" in report
    assert "product_added" in report and "properties.price" in report and "type" in report
    assert "order_completed" in report and "properties.products" in report and "required" in report
    assert "unplanned" in report and "Wishlist Shared" in report
    assert "page_left" in report and "minimum properties.event_duration" in report
    as_json = run_cli(
        "plan", "check", "--config", str(config), "--tenant", "shop", "--events", str(sample), "--json"
    )
    summary = json.loads(as_json.stdout)
    assert summary["checked"] == 7 and summary["valid"] == 3
    assert summary["violations"]["product_added"]["type properties.price"] == 1


def test_violation_records_and_reports_pass_the_canary_scan(enforcing: tuple[Gateway, Path]) -> None:
    """Events full of personal data in every field, kept as violations: the records, the
    ingest response, the live tail, the coverage counts, /v1/validate's answer and the log
    hold none of it."""
    gw, _ = enforcing
    c = Canaries()
    messages = c.segment_batch(uuid.uuid4().hex[:8])
    for m in messages:  # every one breaks the plan: a string price, or not planned at all
        if m.get("type") == "track":
            m["properties"] = {**m.get("properties", {}), "price": c.forms["phone"]}
    out = batch(gw, *messages)
    kept = [v for v in out["planViolations"] if v["action"] == "kept"]
    assert kept, out
    c.assert_nowhere(json.dumps(out, ensure_ascii=False), "the ingest response")
    listed = admin(gw, "GET", "/admin/plan/violations/", params={"tenant": "shop"}).json()
    assert sum(listed["counts"].values()) == len(kept)
    for record in listed["violations"]:
        shown = admin(gw, "GET", f"/admin/plan/violations/{record['id']}")
        c.assert_nowhere(shown.text, "a violation record")
    # the live tail, the coverage report, and /v1/validate's answer to the same events
    tail = admin(gw, "GET", "/admin/plan/tail", params={"tenant": "shop"})
    assert tail.status_code == 200 and tail.json()["violations"], tail.text
    c.assert_nowhere(tail.text, "the live tail")
    coverage = admin(gw, "GET", "/admin/plan/coverage", params={"tenant": "shop"})
    assert coverage.status_code == 200 and coverage.json()["notPlanned"], coverage.text
    c.assert_nowhere(coverage.text, "the coverage report")
    validated = httpx.post(
        gw.url + "/v1/validate",
        json={"batch": c.segment_batch(uuid.uuid4().hex[:8])},
        auth=(WEB_KEY, ""),
        timeout=10,
    )
    assert validated.status_code == 200 and validated.json()["results"], validated.text
    c.assert_nowhere(validated.text, "the /v1/validate answer")
    store = gw.data_dir / "violations.sqlite3"
    raw = b"".join(p.read_bytes() for p in store.parent.glob("violations.sqlite3*"))
    c.assert_nowhere(raw.decode("latin-1"), "violations.sqlite3")
    c.assert_nowhere(gw.log_text(), "the gateway log")


@pytest.mark.redis
def test_replicas_share_the_live_tail_and_the_coverage_counts(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """With Redis, a team watching the plan sees every replica's violations and counts from
    any one of them (the API and the CLI), not only what the replica it reached saw."""
    config = plan_config(seed_plan(tmp_path), "observe")
    a = make_gateway(tmp_path / "a", config=config, extra_env=redis_ns.env()).start()
    b = make_gateway(tmp_path / "b", config=config, extra_env=redis_ns.env()).start()
    try:
        tag = uuid.uuid4().hex[:8]
        sent = {
            gw.url: batch(gw, product_added("12", run=tag))["planViolations"][0]["messageId"] for gw in (a, b)
        }
        batch(b, {**product_added(3), "event": f"Unplanned {tag}"})
        tail = admin(a, "GET", "/admin/plan/tail", params={"tenant": "shop"})
        assert tail.status_code == 200, tail.text
        assert set(sent.values()) <= {v["messageId"] for v in tail.json()["violations"]}, tail.text
        coverage = admin(a, "GET", "/admin/plan/coverage", params={"tenant": "shop"}).json()
        assert coverage["events"]["product_added"]["seen"] >= 2, coverage
        assert f"Unplanned {tag}" in coverage["notPlanned"], coverage  # counted on b, read on a
        cli = subprocess.run(
            [IDGATE, "plan", "coverage", "--config", str(a.config_path), "--tenant", "shop", "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**a.env},
        )
        assert cli.returncode == 1, cli.stderr  # an unplanned name was seen
        assert f"Unplanned {tag}" in json.loads(cli.stdout)["notPlanned"], cli.stdout
    finally:
        a.stop()
        b.stop()


@pytest.mark.redis
def test_past_the_shared_stores_bound_a_blocked_event_is_rejected_to_its_client(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """With Redis a tenant's violation records are bounded (IDGATE_VIOLATIONS_MAX_RECORDS):
    past it a blocked event is not lost silently but rejected, so its client still holds it;
    a retry of a record already kept replaces it as before."""
    env = {**redis_ns.env(), "IDGATE_VIOLATIONS_MAX_RECORDS": "1"}
    gw = make_gateway(tmp_path, config=plan_config(seed_plan(tmp_path), "enforce"), extra_env=env).start()
    try:
        first, second = product_added("1"), product_added("2")
        out = batch(gw, first, second, product_added(3))
        assert out["accepted"] == 1
        assert [(r["index"], r["messageId"]) for r in out["rejected"]] == [(1, second["messageId"])], out
        assert out["rejected"][0]["error"] == "plan_violation"
        assert "violation store is full" in out["rejected"][0]["detail"]
        listed = admin(gw, "GET", "/admin/plan/violations/", params={"tenant": "shop"}).json()
        assert [v["messageId"] for v in listed["violations"]] == [first["messageId"]]
        assert batch(gw, first)["rejected"] == []
        assert "plan.violation_store_full" in gw.log_text()
    finally:
        gw.stop()


@pytest.mark.redis
def test_a_gateway_joining_the_distributed_mode_moves_its_records_into_redis(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """Records a gateway kept in its own file before it had REDIS_URL are moved into the
    shared store at its next start, not left where listing, replay and deletions no longer
    look."""
    config = plan_config(seed_plan(tmp_path), "enforce")
    gw = make_gateway(tmp_path, config=config, extra_env=SHARED_KEYS)
    gw.start()
    try:
        bad = product_added("9.90")
        assert batch(gw, bad)["planViolations"][0]["action"] == "kept"
    finally:
        gw.stop()
    gw.env.update(redis_ns.env())
    gw.start()
    try:
        listed = admin(gw, "GET", "/admin/plan/violations/", params={"tenant": "shop"}).json()
        assert [(v["messageId"], v["id"].startswith("shop.")) for v in listed["violations"]] == [
            (bad["messageId"], True)
        ]
        assert "plan.violations_moved" in gw.log_text()
        left = sqlite3.connect(gw.data_dir / "violations.sqlite3")
        try:
            assert left.execute("SELECT count(*) FROM plan_violation").fetchone() == (0,)
        finally:
            left.close()
    finally:
        gw.stop()


@pytest.mark.redis
def test_violation_records_in_redis_pass_the_canary_scan(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """Distributed, the records, the live tail and the coverage counts live in Redis, shared
    by the replicas: events full of personal data, kept by one replica and flagged by
    another, leave none of it in any Redis key or value (each read by type, the records'
    msgpack as stored), in what either replica answers, or in their logs."""
    a = make_gateway(
        tmp_path / "a", config=plan_config(seed_plan(tmp_path), "enforce"), extra_env=redis_ns.env()
    ).start()
    b = make_gateway(
        tmp_path / "b", config=plan_config(seed_plan(tmp_path), "observe"), extra_env=redis_ns.env()
    ).start()
    try:
        c = Canaries()
        for gw in (a, b):
            messages = c.segment_batch(uuid.uuid4().hex[:8])
            for m in messages:  # every track breaks the plan: a phone number as the price
                if m.get("type") == "track":
                    m["properties"] = {**m.get("properties", {}), "price": c.forms["phone"]}
            out = batch(gw, *messages)
            assert out["planViolations"], out
            c.assert_nowhere(json.dumps(out, ensure_ascii=False), "the ingest response")
        listed = admin(b, "GET", "/admin/plan/violations/", params={"tenant": "shop"}).json()
        assert listed["violations"] and all(v["id"].startswith("shop.") for v in listed["violations"])
        for record in listed["violations"]:  # kept on a, shown by b
            c.assert_nowhere(admin(b, "GET", f"/admin/plan/violations/{record['id']}").text, "a record")
        for path in ("/admin/plan/tail", "/admin/plan/coverage"):
            answer = admin(a, "GET", path, params={"tenant": "shop"})
            assert answer.status_code == 200, answer.text
            c.assert_nowhere(answer.text, path)
        a.stop()  # the coverage counts are written at shutdown at the latest
        b.stop()
        r = redis.Redis.from_url(redis_ns.url)
        keys = list(r.scan_iter(match=f"{redis_ns.prefix}:*"))
        assert any(b":plan:violations:" in k for k in keys), keys
        for key in keys:
            c.assert_nowhere(key.decode("utf-8", "replace"), "a Redis key")
            c.assert_nowhere(redis_value(r, key), f"the Redis value of {key!r}")
        assert (
            not (a.data_dir / "violations.sqlite3").exists()
            or not sqlite3.connect(a.data_dir / "violations.sqlite3")
            .execute("SELECT count(*) FROM plan_violation")
            .fetchone()[0]
        )
        c.assert_nowhere(a.log_text() + b.log_text(), "the gateway logs")
    finally:
        a.stop()
        b.stop()


def redis_state(r: redis.Redis, prefix: str) -> dict[str, str]:
    """Every key of the namespace and its value, but the rate limits' counters (a validation
    is rate limited like ingest)."""
    return {
        key.decode(): redis_value(r, key) for key in r.scan_iter(match=f"{prefix}:*") if b":rl:" not in key
    }


@pytest.mark.redis
def test_validate_stores_nothing_in_redis_either(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """Distributed, the violation records, tail, coverage counts and dedupe claims are in
    Redis: /v1/validate writes none of them; the same events sent for real afterwards are
    not duplicates and are kept."""
    gw = make_gateway(tmp_path, config=plan_config(seed_plan(tmp_path), "enforce"), extra_env=redis_ns.env())
    gw.start()
    try:
        r = redis.Redis.from_url(redis_ns.url)
        gw.wait_past()
        before = redis_state(r, redis_ns.prefix)
        bad, unplanned = product_added("9.90"), {**product_added(3), "event": "Wishlist Shared"}
        answer = httpx.post(
            gw.url + "/v1/validate", json={"batch": [bad, unplanned]}, auth=(WEB_KEY, ""), timeout=10
        )
        assert answer.status_code == 200, answer.text
        assert [x["action"] for x in answer.json()["results"]] == ["block", "block"]
        gw.stop()  # the coverage counts are written at shutdown at the latest
        after = redis_state(r, redis_ns.prefix)
        assert {k: v for k, v in after.items() if before.get(k) != v} == {}
        gw.start()
        out = batch(gw, bad, unplanned)
        assert out["duplicates"] == 0 and [v["action"] for v in out["planViolations"]] == ["kept", "kept"]
    finally:
        gw.stop()
