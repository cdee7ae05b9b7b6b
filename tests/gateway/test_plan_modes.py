"""Per-source tracking-plan validation over real HTTP with the real SDK clients (issue 14):
``omit`` (the Segment Python client, web source), ``flag`` (the Sensors Python SDK on the
app source) and ``block`` (the tenant's ``plan_mode = "enforce"`` default, the Sensors
Python SDK on the server source); unplanned events allowed, flagged or blocked per source;
each violation type; a client cannot forge ``context.idgate``."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from gateway.config import ConfigProblems, parse_config
from tests.conftest import (
    APP_KEY,
    IDGATE,
    OPERATOR_TOKEN,
    ROOT,
    TEST_CONFIG,
    WEB_KEY,
    Gateway,
    make_gateway,
    mid,
)
from tests.security.test_rate_limits import limited_config
from tests.sensors.conftest import encode, sensors_event, sensors_url
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MODES_PLAN = """
plan: modes
version: 1
ignore: ["Sentinel"]
events:
  product_added:
    description: Add to cart was clicked.
    owner: checkout
    purposes: [analytics]
    legal_basis: consent
    segment: ["Product Added"]
    sensors: ["AddToShoppingCart"]
    required: [product_id, quantity]
    additional_properties: false
    properties:
      product_id: {class: none, type: string, minLength: 1}
      quantity: {class: none, type: integer, minimum: 1, maximum: 999}
      price: {class: financial, type: number, minimum: 0}
      currency: {class: financial, type: string, enum: [CNY, USD]}
      note: {class: none, type: string}
      buyer_phone: {class: contact, type: string}
  order_completed:
    description: An order was paid (never sent in these tests).
    owner: checkout
    purposes: [analytics]
    legal_basis: consent
    segment: ["Order Completed"]
"""


def modes_config(plan: Path) -> str:
    config = TEST_CONFIG.replace(
        'id = "shop"\n', f'id = "shop"\ntracking_plan_file = "{plan}"\nplan_mode = "enforce"\n', 1
    )
    config = config.replace(
        'dev_write_key = "web-test-key-0001"\n',
        'dev_write_key = "web-test-key-0001"\nplan_validation = "omit"\nplan_unplanned = "allow"\n',
        1,
    )
    config = config.replace(
        'dev_write_key = "app-test-key-0001"\n',
        'dev_write_key = "app-test-key-0001"\nplan_validation = "flag"\nplan_unplanned = "flag"\n',
        1,
    )
    # the stream destination may receive the financial properties and two named ones
    return config.replace(
        'id = "stream"\nsink = "jsonl"\npurposes = ["analytics"]\n',
        'id = "stream"\nsink = "jsonl"\npurposes = ["analytics"]\n'
        'data_classes = ["financial"]\nproperties = ["product_id", "qua*"]\n',
        1,
    )


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("plan-modes")
    plan = tmp / "modes.yaml"
    plan.write_text(MODES_PLAN)
    gateway = make_gateway(tmp, config=modes_config(plan)).start()
    yield gateway
    gateway.stop()


def records(gw: Gateway) -> list[dict]:
    r = httpx.get(
        gw.url + "/admin/plan/violations/",
        params={"tenant": "shop", "limit": 1000},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["violations"])


def rules(record: dict) -> list[tuple[str, str]]:
    return sorted((v["rule"], v["path"]) for v in record["violations"])


def segment_client(gw: Gateway) -> tuple[Client, list[Exception]]:
    errors: list[Exception] = []
    return Client(WEB_KEY, host=gw.url, on_error=lambda e, _b: errors.append(e), max_retries=2), errors


def test_omit_removes_exactly_the_bad_properties_and_records_them(gw: Gateway) -> None:
    """Segment Python client on the web source (omit, unplanned allowed)."""
    client, errors = segment_client(gw)
    anon = f"anon-{uuid.uuid4().hex[:8]}"
    sent: dict[str, str] = {}

    # an identifier inside a URL: pseudonymised once, the same in every event
    page = {"page": {"url": "https://shop.example/cart?openid=oPq3x8Kd2LmN7vB4zR1sT6uW9yA0"}}

    def track(name: str, event: str, props: dict) -> None:
        ok, msg = client.track(anonymous_id=anon, event=event, properties=props, context=page)
        assert ok
        sent[name] = msg["messageId"]

    good = {
        "product_id": "sku-1",
        "quantity": 2,
        "price": 9.9,
        "currency": "CNY",
        "buyer_phone": "13812345678",
    }
    track("valid", "Product Added", good)
    track(
        "fixable",
        "Product Added",
        {
            "product_id": "sku-1",
            "quantity": 1,
            "price": -1,  # out of range
            "currency": "cny",  # not in the enum
            "colour": "red",  # not in the plan (additional_properties: false)
            "note": "call me on 13812345678",  # personal data in a class-none property
        },
    )
    track("required_missing", "Product Added", {"product_id": "sku-1"})
    track("required_wrong_type", "Product Added", {"product_id": "sku-1", "quantity": "2"})
    track("unplanned", "Wishlist Shared", {"list": "w1"})
    client.flush()
    client.join()
    assert errors == []
    gw.wait_past()
    delivered = {e["messageId"]: e for e in gw.sink_lines() if e["messageId"] in sent.values()}
    assert set(delivered) == {sent["valid"], sent["fixable"], sent["unplanned"]}
    valid = delivered[sent["valid"]]["properties"]
    assert {k: valid[k] for k in ("product_id", "quantity", "price", "currency")} == {
        "product_id": "sku-1",
        "quantity": 2,
        "price": 9.9,
        "currency": "CNY",
    }
    assert valid["buyer_phone"].startswith("k1.")  # a contact property: pseudonymised, no violation
    assert delivered[sent["fixable"]]["properties"] == {"product_id": "sku-1", "quantity": 1}
    url = delivered[sent["valid"]]["context"]["page"]["url"]
    assert "oPq3x8Kd2LmN7vB4zR1sT6uW9yA0" not in url
    assert delivered[sent["fixable"]]["context"]["page"]["url"] == url
    assert "violations" not in delivered[sent["unplanned"]]["context"]["idgate"]  # allowed, not flagged

    by_id = {r["messageId"]: r for r in records(gw)}
    omitted = by_id[sent["fixable"]]
    assert omitted["action"] == "omitted"
    assert rules(omitted) == [
        ("additionalProperties", "properties.colour"),
        ("enum", "properties.currency"),
        ("identifier", "properties.note"),
        ("minimum", "properties.price"),
    ]
    # a required property missing or broken cannot be fixed by removing it: blocked
    assert by_id[sent["required_missing"]]["action"] == "kept"
    assert rules(by_id[sent["required_missing"]]) == [("required", "properties.quantity")]
    assert rules(by_id[sent["required_wrong_type"]]) == [("type", "properties.quantity")]
    assert sent["unplanned"] not in by_id and sent["valid"] not in by_id
    # the record holds the removed values, scrubbed like a stored event
    shown = httpx.get(
        f"{gw.url}/admin/plan/violations/{omitted['id']}",
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=10,
    ).json()
    assert shown["event"]["properties"]["currency"] == "cny"
    assert "13812345678" not in json.dumps(shown)
    assert "13812345678" not in (gw.data_dir / "violations.sqlite3").read_bytes().decode("latin-1")


def test_replay_all_skips_omitted_records(gw: Gateway) -> None:
    """An omitted event went out already: replaying "all" only takes the blocked ones."""
    before = {r["id"]: r["action"] for r in records(gw)}
    r = httpx.post(
        gw.url + "/admin/plan/violations/replay",
        json={"tenant": "shop", "all": True},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["stillViolating"] == sum(1 for a in before.values() if a == "kept")
    assert {r["id"]: r["action"] for r in records(gw)} == before


def test_flag_forwards_with_the_violations_in_context(gw: Gateway) -> None:
    """The Sensors Python SDK on the app source (flag, unplanned flagged)."""
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw), request_timeout=10))
    tag = uuid.uuid4().hex[:10]
    distinct = f"visitor-{tag}"
    sku = f"sku-{tag}"
    sa.track(distinct, "AddToShoppingCart", {"product_id": sku, "quantity": 1000, "run_tag": tag})
    sa.track(distinct, "AddToShoppingCart", {"product_id": sku, "quantity": 3})
    sa.track(distinct, "ShareToFriend", {"channel_name": tag})
    sa.close()

    def mine() -> list[dict]:
        found = [e for e in gw.sink_lines() if tag in json.dumps(e.get("properties", {}))]
        return found if len(found) == 3 else []

    events = wait_until(mine, 20, what="the flagged Sensors events")
    assert distinct not in json.dumps(events)
    bad = next(e for e in events if e["properties"].get("quantity") == 1000)
    assert bad["properties"]["run_tag"] == tag  # flag keeps every property
    assert sorted((v["rule"], v["path"]) for v in bad["context"]["idgate"]["violations"]) == [
        ("additionalProperties", "properties.run_tag"),
        ("maximum", "properties.quantity"),
    ]
    ok = next(e for e in events if e["properties"].get("quantity") == 3)
    assert "violations" not in ok["context"]["idgate"]
    share = next(e for e in events if e["event"] == "ShareToFriend")
    assert [v["rule"] for v in share["context"]["idgate"]["violations"]] == ["unplanned"]


def test_block_is_the_enforce_default_for_the_server_source(gw: Gateway) -> None:
    """The Sensors Python SDK on the server source: no source setting, plan_mode enforce."""
    before = {r["id"] for r in records(gw)}
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw, server=True), request_timeout=10))
    user = f"user-{uuid.uuid4().hex[:8]}"
    sa.track(user, "AddToShoppingCart", {"product_id": "", "quantity": 1}, is_login_id=True)
    sa.track(user, "RefundApplied", {"order_id": "o-1"}, is_login_id=True)
    sa.close()
    new = wait_until(
        lambda: (
            [r for r in records(gw) if r["id"] not in before] if len(records(gw)) >= len(before) + 2 else []
        ),
        20,
        what="two blocked events",
    )
    found = {r["event"]: r for r in new}
    assert found["product_added"]["action"] == "kept"
    assert rules(found["product_added"]) == [("minLength", "properties.product_id")]
    assert rules(found["unplanned"]) == [("unplanned", "event")]


def test_a_client_cannot_forge_context_idgate(gw: Gateway) -> None:
    m = mid()
    forged = {"violations": [{"rule": "none", "path": "x", "detail": "forged"}], "verified": True}
    r = httpx.post(
        gw.url + "/v1/track",
        json={
            "anonymousId": "anon-forger",
            "event": "Product Added",
            "messageId": m,
            "properties": {"product_id": "p", "quantity": 1},
            "context": {"idgate": forged},
        },
        auth=(WEB_KEY, ""),
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    (event,) = gw.wait_for_sink({m})
    assert event["context"]["idgate"]["source"] == "shop-web"
    assert "violations" not in event["context"]["idgate"] and "verified" not in event["context"]["idgate"]


# Written by the gateway's health probe (readyz), whatever requests come.
PROBE_TABLES = frozenset({"probe"})


def snapshot(gw: Gateway) -> dict[str, str]:
    """Every store under the data dir (outbox and dedupe, violation store, consent, identity,
    sinks...) by content: each SQLite database's rows table by table, every other file's
    bytes."""
    out: dict[str, str] = {}
    for path in sorted(gw.data_dir.rglob("*")):
        name = str(path.relative_to(gw.data_dir))
        if not path.is_file() or path.name.endswith(("-wal", "-shm")):
            continue
        if path.suffix != ".sqlite3":
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                if table not in PROBE_TABLES:
                    rows = sorted(map(repr, db.execute(f'SELECT * FROM "{table}"')))
                    out[f"{name}:{table}"] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        finally:
            db.close()
    return out


def quiet_snapshot(gw: Gateway) -> dict[str, str]:
    """The snapshot once everything sent before has been delivered to both destinations and
    the data dir has not changed for a second (delivery acknowledges in the outbox after the
    sink write)."""
    sentinel = gw.wait_past()
    gw.wait_for_sink({sentinel["messageId"]}, "stream")
    last = (snapshot(gw), time.monotonic())

    def unchanged() -> dict[str, str] | None:
        nonlocal last
        now = snapshot(gw)
        if now != last[0]:
            last = (now, time.monotonic())
            return None
        return now if time.monotonic() - last[1] >= 1.0 else None

    return wait_until(unchanged, 20, what="a data dir that stopped changing", interval=0.2)


def metric_total(gw: Gateway, prefix: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_validate_answers_what_the_plan_would_do_and_stores_nothing(gw: Gateway) -> None:
    before_records = records(gw)  # (an admin read is itself logged: before the file snapshot)
    before_seen = metric_total(gw, "idgate_events_plan_seen_total{")
    before_files = quiet_snapshot(gw)
    anon = f"anon-{uuid.uuid4().hex[:8]}"

    def track(event: str, props: dict) -> dict:
        return {"type": "track", "event": event, "messageId": mid(), "anonymousId": anon, "properties": props}

    valid = track("Product Added", {"product_id": "p", "quantity": 1})
    fixable = track("Product Added", {"product_id": "p", "quantity": 1, "currency": "cny", "colour": "red"})
    broken = track("Product Added", {"product_id": "p"})
    unplanned = track("Wishlist Shared", {})
    identify = {"type": "identify", "messageId": mid(), "anonymousId": anon, "traits": {"plan": "gold"}}
    nobody = {"type": "track", "event": "Product Added", "messageId": mid(), "userId": "null"}
    r = httpx.post(
        gw.url + "/v1/validate",
        json={"batch": [valid, fixable, broken, unplanned, identify, nobody]},
        auth=(WEB_KEY, ""),  # the web source: omit, unplanned allowed
        timeout=10,
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["plan"], answer["planVersion"], answer["received"], answer["valid"]) == ("modes", 1, 6, 3)
    assert [(x["index"], x["action"], x.get("event")) for x in answer["results"]] == [
        (0, "deliver", "product_added"),
        (1, "omit", "product_added"),
        (2, "block", "product_added"),
        (3, "deliver", "unplanned"),
        (4, "deliver", None),
    ]
    assert answer["results"][1]["omitted"] == ["colour", "currency"]
    assert [(v["rule"], v["path"]) for v in answer["results"][2]["violations"]] == [
        ("required", "properties.quantity")
    ]
    assert [(x["index"], x["error"]) for x in answer["rejected"]] == [(5, "missing_identity")]

    # the app source flags what the web source omits
    r = httpx.post(
        gw.url + "/v1/validate", json={"batch": [fixable, unplanned]}, auth=(APP_KEY, ""), timeout=10
    )
    assert [x["action"] for x in r.json()["results"]] == ["flag", "flag"]

    # nothing stored, forwarded, recorded or counted; the message ids are not claimed
    assert snapshot(gw) == before_files
    assert records(gw) == before_records
    assert metric_total(gw, "idgate_events_plan_seen_total{") == before_seen
    out = httpx.post(gw.url + "/v1/batch", json={"batch": [valid]}, auth=(WEB_KEY, ""), timeout=10).json()
    assert out["accepted"] == 1 and out["duplicates"] == 0


def test_validate_needs_the_write_key_and_a_readable_batch(gw: Gateway) -> None:
    body = {"batch": [{"type": "track", "event": "Product Added", "anonymousId": "a"}]}
    assert httpx.post(gw.url + "/v1/validate", json=body, timeout=10).status_code == 401
    assert httpx.post(gw.url + "/v1/validate", json=body, auth=("nope", ""), timeout=10).status_code == 401
    bad = httpx.post(gw.url + "/v1/validate", content=b"{", auth=(WEB_KEY, ""), timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]
    empty = httpx.post(gw.url + "/v1/validate", json={"batch": []}, auth=(WEB_KEY, ""), timeout=10)
    assert empty.status_code == 400


def test_sensors_validate_answers_for_the_app_source_and_stores_nothing(gw: Gateway) -> None:
    before = quiet_snapshot(gw)
    tag = uuid.uuid4().hex[:8]
    events = [
        sensors_event(f"v-{tag}", event="AddToShoppingCart", properties={"product_id": "p", "quantity": 0}),
        sensors_event(f"v-{tag}", event="AddToShoppingCart", properties={"product_id": "p", "quantity": 2}),
        sensors_event(f"v-{tag}", event="$AppStart"),  # not in ignore: unplanned
    ]
    r = httpx.post(
        sensors_url(gw, path="/sa/validate"),
        content=f"data_list={encode(events)}&gzip=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [(x["index"], x["action"], x["event"]) for x in answer["results"]] == [
        (0, "flag", "product_added"),
        (1, "deliver", "product_added"),
        (2, "flag", "unplanned"),
    ]
    assert [(v["rule"], v["path"]) for v in answer["results"][0]["violations"]] == [
        ("minimum", "properties.quantity")
    ]
    assert snapshot(gw) == before
    wrong = httpx.post(
        gw.url + "/sa/validate?project=shop&token=nope", content=f"data_list={encode(events)}", timeout=10
    )
    assert wrong.status_code == 401


def admin_get(gw: Gateway, path: str, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    return httpx.get(gw.url + path, params=params, headers=headers, timeout=10)  # type: ignore[arg-type]


def test_counters_coverage_and_the_live_tail(gw: Gateway) -> None:
    tag = uuid.uuid4().hex[:6]
    names = [f"Unplanned {tag} {i}" for i in range(3)]
    seen = metric_total(gw, 'idgate_events_plan_seen_total{event="unplanned",source="shop-server"')
    valid = metric_total(gw, 'idgate_events_plan_valid_total{event="product_added",source="shop-server"')
    bad = {"type": "track", "event": "Product Added", "messageId": mid(), "anonymousId": "anon-tail-0001"}
    bad["properties"] = {"product_id": "p", "quantity": 0}
    good = {**bad, "messageId": mid(), "properties": {"product_id": "p", "quantity": 1}}
    unplanned = [
        {"type": "track", "event": n, "messageId": mid(), "anonymousId": "anon-tail-0001"} for n in names
    ]
    r = httpx.post(
        gw.url + "/v1/batch",
        json={"batch": [good, bad, *unplanned]},
        auth=("shop-server-secret-key-000000000000001", ""),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    # Prometheus: per plan event and source; every unplanned name is one label value
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    assert tag not in text
    assert (
        metric_total(gw, 'idgate_events_plan_seen_total{event="unplanned",source="shop-server"') == seen + 3
    )
    assert (
        metric_total(gw, 'idgate_events_plan_valid_total{event="product_added",source="shop-server"')
        == valid + 1
    )
    # the live tail: newest first, rules and paths, never a value
    tail = admin_get(gw, "/admin/plan/tail", tenant="shop", source="shop-server", limit=4)
    assert tail.status_code == 200, tail.text
    entries = tail.json()["violations"]
    assert [(e["event"], e.get("name"), e["action"]) for e in entries] == [
        *((("unplanned", n, "kept")) for n in reversed(names)),
        ("product_added", None, "kept"),
    ][:4]
    assert [(v["rule"], v["path"]) for v in entries[3]["violations"]] == [("minimum", "properties.quantity")]
    assert entries[3]["messageId"] == bad["messageId"]
    assert admin_get(gw, "/admin/plan/tail", tenant="shop", limit=101).status_code == 400
    # coverage: the CLI reads the data dir beside the running gateway (new names are written at once)
    out = subprocess.run(
        [IDGATE, "plan", "coverage", "--config", str(gw.config_path), "--tenant", "shop", "--data-dir"]
        + [str(gw.data_dir), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr  # a planned event never seen, unplanned ones seen
    report = json.loads(out.stdout)
    assert report["neverSeen"] == ["order_completed"]
    assert {n: report["notPlanned"][n] for n in names} == dict.fromkeys(names, 1)
    assert report["events"]["product_added"]["seen"] >= 2
    assert "shop-server" in report["events"]["product_added"]["sources"]
    text_out = subprocess.run(
        [IDGATE, "plan", "coverage", "--config", str(gw.config_path), "--data-dir", str(gw.data_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "planned, never seen: order_completed" in text_out.stdout, text_out.stderr
    # the admin API answers the same, with the counts written first
    api = admin_get(gw, "/admin/plan/coverage", tenant="shop")
    assert api.status_code == 200, api.text
    assert api.json()["neverSeen"] == ["order_completed"]
    assert api.json()["events"]["product_added"]["seen"] >= report["events"]["product_added"]["seen"]
    assert admin_get(gw, "/admin/plan/coverage", tenant="mall").status_code == 404


def test_unplanned_page_names_are_counted_and_tailed_without_identifiers(gw: Gateway) -> None:
    openid = "oPq3x8Kd2LmN7vB4zR1sT6uW9yA0"
    page = {
        "type": "page",
        "name": f"Promo https://shop.example/p?openid={openid}&q=13812345678",
        "messageId": mid(),
        "anonymousId": "anon-page-0001",
    }
    r = httpx.post(
        gw.url + "/v1/batch",
        json={"batch": [page]},
        auth=("shop-server-secret-key-000000000000001", ""),
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["planViolations"][0]["event"] == "unplanned", r.text
    (entry,) = admin_get(gw, "/admin/plan/tail", tenant="shop", source="shop-server", limit=1).json()[
        "violations"
    ]
    assert entry["name"].startswith("page:Promo https://shop.example/p?openid=")
    coverage = admin_get(gw, "/admin/plan/coverage", tenant="shop").text
    for shown in (json.dumps(entry), coverage):
        assert openid not in shown and "13812345678" not in shown


def test_a_destination_receives_only_what_it_declares(gw: Gateway) -> None:
    """stream: data_classes = ["financial"] (price, currency), properties = product_id and
    the glob qua*; warehouse declares nothing and gets every property."""
    m = mid()
    props = {"product_id": "p-9", "quantity": 2, "price": 5.5, "currency": "USD", "note": "gift wrap"}
    event = {"type": "track", "event": "Product Added", "messageId": m, "anonymousId": "anon-minimise"}
    r = httpx.post(
        gw.url + "/v1/batch", json={"batch": [{**event, "properties": props}]}, auth=(APP_KEY, ""), timeout=10
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    (full,) = gw.wait_for_sink({m})
    (minimised,) = gw.wait_for_sink({m}, "stream")
    assert full["properties"] == props
    assert minimised["properties"] == {k: props[k] for k in ("product_id", "quantity", "price", "currency")}
    assert minimised["anonymousId"] != full["anonymousId"]  # still re-keyed for its own domain


def test_config_check_names_plan_settings_that_cannot_work() -> None:
    config = TEST_CONFIG.replace(
        'dev_write_key = "web-test-key-0001"\n',
        'dev_write_key = "web-test-key-0001"\nplan_validation = "omit"\n',
        1,
    ).replace(
        'id = "stream"\nsink = "jsonl"\n', 'id = "stream"\nsink = "jsonl"\ndata_classes = ["money"]\n', 1
    )
    with pytest.raises(ConfigProblems) as caught:
        parse_config(config, dev=True)
    problems = "\n".join(caught.value.problems)
    assert "sources[0]: plan_validation / plan_unplanned need the tenant's tracking_plan_file" in problems
    assert "destinations[1].data_classes: 'money' is not one of" in problems
    assert "destinations[1].data_classes: needs the tenant's tracking_plan_file" in problems
    bad_mode = TEST_CONFIG.replace(
        'dev_write_key = "web-test-key-0001"\n',
        'dev_write_key = "web-test-key-0001"\nplan_validation = "drop"\n',
        1,
    )
    with pytest.raises(ConfigProblems) as caught:
        parse_config(bad_mode, dev=True)
    assert "plan_validation" in "\n".join(caught.value.problems)


def test_a_replay_under_omit_keeps_the_record_of_what_it_removed(tmp_path: Path) -> None:
    plan = tmp_path / "modes.yaml"
    plan.write_text(MODES_PLAN)
    blocking = TEST_CONFIG.replace(
        'id = "shop"\n', f'id = "shop"\ntracking_plan_file = "{plan}"\nplan_mode = "enforce"\n', 1
    )
    gw = make_gateway(tmp_path, config=blocking).start()
    try:
        m = mid()
        props = {"product_id": "p", "quantity": 1, "currency": "cny"}
        event = {"type": "track", "event": "Product Added", "messageId": m, "anonymousId": "anon-replay-omit"}
        out = httpx.post(
            gw.url + "/v1/batch",
            json={"batch": [{**event, "properties": props}]},
            auth=(WEB_KEY, ""),
            timeout=10,
        ).json()
        assert [v["action"] for v in out["planViolations"]] == ["kept"]
        gw.stop()
        gw.config_path.write_text(modes_config(plan))  # the web source omits now
        gw.start()
        replay = httpx.post(
            gw.url + "/admin/plan/violations/replay",
            json={"tenant": "shop", "all": True},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
            timeout=30,
        )
        assert replay.status_code == 200 and replay.json()["replayed"] == 1, replay.text
        (delivered,) = gw.wait_for_sink({m})
        assert delivered["properties"] == {"product_id": "p", "quantity": 1}
        (record,) = records(gw)
        assert (record["messageId"], record["action"]) == (m, "omitted")
        assert rules(record) == [("enum", "properties.currency")]
        # counted for coverage once, when it came; not again when replayed
        coverage = admin_get(gw, "/admin/plan/coverage", tenant="shop").json()
        assert coverage["events"]["product_added"]["seen"] == 1
    finally:
        gw.stop()


def until_refused(send: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Requests until one is refused (3 a second are allowed: a burst of 40 cannot all pass)."""
    answers: list[httpx.Response] = []
    for _ in range(40):
        answers.append(send())
        if answers[-1].status_code == 429:
            break
    return answers


def test_validate_is_rate_limited_like_ingest(tmp_path: Path) -> None:
    gw = make_gateway(
        tmp_path, config=limited_config(ip_requests_per_second=3, ip_events_per_second=1000)
    ).start()
    try:
        body = {"batch": [{"type": "track", "event": "Product Added", "anonymousId": "anon-flood-01"}]}
        segment = until_refused(
            lambda: httpx.post(gw.url + "/v1/validate", json=body, auth=(WEB_KEY, ""), timeout=10)
        )
        assert segment[0].status_code == 200 and segment[-1].status_code == 429, [
            r.status_code for r in segment
        ]
        assert segment[-1].json()["field"] == "rate_limits.ip_requests_per_second"
        assert segment[-1].headers["Retry-After"]
        form = f"data_list={encode([sensors_event('flooder-01', event='AddToShoppingCart')])}&gzip=1"
        sensors = until_refused(
            lambda: httpx.post(
                sensors_url(gw, path="/sa/validate"),
                content=form,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=10,
            )
        )
        assert sensors[-1].status_code == 429, [r.status_code for r in sensors]
    finally:
        gw.stop()


def test_config_check_warns_of_data_classes_a_destination_does_not_need(tmp_path: Path) -> None:
    plan = tmp_path / "modes.yaml"
    plan.write_text(MODES_PLAN)
    config = tmp_path / "idgate.toml"
    config.write_text(
        modes_config(plan).replace(
            'data_classes = ["financial"]', 'data_classes = ["financial", "sensitive"]', 1
        )
    )
    done = subprocess.run(
        [IDGATE, "config", "check", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr  # warnings, not problems
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: tenants[0].destinations[1].data_classes: 'sensitive': no plan event for its purposes "
        "(analytics) has one",
        "warning: tenants[0].destinations[1].data_classes: 'sensitive' properties pass only with "
        "sensitive_pi, not among its purposes",
    ]
