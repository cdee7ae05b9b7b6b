"""Per-source tracking-plan validation over real HTTP with the real SDK clients (issue 14):
``omit`` (the Segment Python client, web source), ``flag`` (the Sensors Python SDK on the
app source) and ``block`` (the tenant's ``plan_mode = "enforce"`` default, the Sensors
Python SDK on the server source); unplanned events allowed, flagged or blocked per source;
each violation type; a client cannot forge ``context.idgate``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from tests.conftest import OPERATOR_TOKEN, TEST_CONFIG, WEB_KEY, Gateway, make_gateway, mid
from tests.sensors.conftest import sensors_url
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
    return config.replace(
        'dev_write_key = "app-test-key-0001"\n',
        'dev_write_key = "app-test-key-0001"\nplan_validation = "flag"\nplan_unplanned = "flag"\n',
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

    def track(name: str, event: str, props: dict) -> None:
        ok, msg = client.track(anonymous_id=anon, event=event, properties=props)
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
