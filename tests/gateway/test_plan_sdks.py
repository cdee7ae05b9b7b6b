"""Every violation type in every mode, through each real SDK client over real HTTP (issue 14):
the Segment Python client (shop-web), the Sensors Python SDK (shop-app) and the WeChat
mini-program SDK under Node (mall-mp, a tenant that enforces consent). Each SDK sends the
same cases: a valid event, a required property missing, a wrong type, a value out of range,
one not in the enum, an unplanned property, personal data in a class-``none`` property, and
an unplanned event. Then, in ``block``, the records are replayed after the plan is fixed:
each kept event goes out once, and a shopper who withdrew consent since is dropped, not sent."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from tests.conftest import MALL_MP_KEY, OPERATOR_TOKEN, TEST_CONFIG, WEB_KEY, Gateway, make_gateway
from tests.sensors.conftest import miniprogram, sensors_url  # noqa: F401 - the Node runner fixture
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
Runner = Callable[[dict[str, Any]], dict[str, Any]]

SDK_PLAN = """
plan: sdks
version: 1
ignore: ["Sentinel", "$*"]   # the SDKs' own presets ($MPLaunch, $MPHide...)
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
      run_tag: {class: none, type: string}
      case: {class: none, type: string}
"""

# The fix a team ships after watching the records: every property planned and loosened, the
# unplanned event planned, the version raised. (A phone number in "note" stays personal
# data in a class-none property: that record is still violating.)
FIXED_PLAN = """
plan: sdks
version: 2
ignore: ["Sentinel", "$*"]
events:
  product_added:
    description: Add to cart was clicked.
    owner: checkout
    purposes: [analytics]
    legal_basis: consent
    segment: ["Product Added"]
    sensors: ["AddToShoppingCart"]
    required: [product_id]
    properties:
      product_id: {class: none, type: string, minLength: 1}
      quantity: {class: none, type: integer}
      price: {class: financial, type: [number, string]}
      currency: {class: financial, type: string}
      colour: {class: none, type: string}
      note: {class: none, type: string}
      run_tag: {class: none, type: string}
      case: {class: none, type: string}
  wishlist_shared:
    description: A wishlist was shared.
    owner: growth
    purposes: [analytics]
    legal_basis: consent
    segment: ["Wishlist Shared"]
    sensors: ["WishlistShared"]
"""

BASE = {"product_id": "sku-1", "quantity": 1}
# case -> (event name, properties, the rule and path it breaks, the property omit removes)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, str] | None, str | None]] = {
    "valid": ("Product Added", {**BASE, "quantity": 2, "price": 9.9, "currency": "CNY"}, None, None),
    "required": ("Product Added", {"product_id": "sku-1"}, ("required", "properties.quantity"), None),
    "type": ("Product Added", {**BASE, "price": "9.90"}, ("type", "properties.price"), "price"),
    "range": ("Product Added", {**BASE, "price": -1}, ("minimum", "properties.price"), "price"),
    "enum": ("Product Added", {**BASE, "currency": "cny"}, ("enum", "properties.currency"), "currency"),
    "unplanned_property": (
        "Product Added",
        {**BASE, "colour": "red"},
        ("additionalProperties", "properties.colour"),
        "colour",
    ),
    "identifier": (
        "Product Added",
        {**BASE, "note": "call me on 13812345678"},
        ("identifier", "properties.note"),
        "note",
    ),
    "unplanned": ("Wishlist Shared", {"list": "w1"}, ("unplanned", "event"), None),
}
SENSORS_NAMES = {"Product Added": "AddToShoppingCart", "Wishlist Shared": "WishlistShared"}
MODES = {"block": "block", "omit": "allow", "flag": "flag"}  # plan_validation -> plan_unplanned
SOURCES = {  # the SDK -> its source's write key line in TEST_CONFIG, tenant, destination
    "segment": ('dev_write_key = "web-test-key-0001"\n', "shop", "warehouse"),
    "sensors": ('dev_write_key = "app-test-key-0001"\n', "shop", "warehouse"),
    "miniprogram": ('dev_write_key = "mall-mp-key-00001"\n', "mall", "mall-warehouse"),
}


def sdk_config(plan: Path, mode: str) -> str:
    config = TEST_CONFIG
    for tenant in ("shop", "mall"):
        config = config.replace(f'id = "{tenant}"\n', f'id = "{tenant}"\ntracking_plan_file = "{plan}"\n', 1)
    for key_line, _, _ in SOURCES.values():
        setting = f'plan_validation = "{mode}"\nplan_unplanned = "{MODES[mode]}"\n'
        config = config.replace(key_line, key_line + setting, 1)
    return config


def start(tmp: Path, mode: str) -> Gateway:
    plan = tmp / "sdks.yaml"
    plan.write_text(SDK_PLAN)
    return make_gateway(tmp, config=sdk_config(plan, mode)).start()


@pytest.fixture(scope="module", params=list(MODES))
def moded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Gateway]]:
    gw = start(tmp_path_factory.mktemp(f"plan-sdk-{request.param}"), request.param)
    yield request.param, gw
    gw.stop()


def cases_sent(tag: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(case, event name, properties) with the run's tag and the case in every event."""
    return [
        (case, name, {**props, "run_tag": tag, "case": case}) for case, (name, props, _, _) in CASES.items()
    ]


def send(sdk: str, gw: Gateway, runner: Runner | None, tag: str, who: str) -> None:
    """Each case through the SDK, as a client build would send it."""
    if sdk == "segment":
        errors: list[Exception] = []
        client = Client(WEB_KEY, host=gw.url, on_error=lambda e, _b: errors.append(e), max_retries=2)
        for _, name, props in cases_sent(tag):
            ok, _ = client.track(anonymous_id=who, event=name, properties=props)
            assert ok
        client.flush()
        client.join()
        assert errors == []
    elif sdk == "sensors":
        sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw), request_timeout=10))
        for _, name, props in cases_sent(tag):
            sa.track(who, SENSORS_NAMES[name], props)
        sa.close()
    else:
        assert runner is not None
        run = runner(
            {
                "server_url": sensors_url(gw, "mall"),
                "appid": "wx1a2b3c4d5e6f7a8b",
                "tag": tag,
                "events": [{"name": SENSORS_NAMES[n], "properties": p} for _, n, p in cases_sent(tag)],
                "consent": {
                    "url": gw.url + "/v1/consent",
                    "write_key": MALL_MP_KEY,
                    "grant": ["analytics"],
                    "notice_id": "notice-v1",
                },
            }
        )
        assert run["consent"] == 200 and run["left_in_queue"] == 0, run
        assert all(r["statusCode"] == 200 for r in run["responses"]), run["responses"]
        who_ran.append(run["anonymous_id"])


who_ran: list[str] = []  # the mini-program's anonymous ids, in run order (the SDK makes them)


def operator_get(gw: Gateway, path: str, **params: Any) -> Any:
    r = httpx.get(
        gw.url + path, params=params, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


def records_of(gw: Gateway, tenant: str, tag: str) -> list[dict[str, Any]]:
    """The run's violation records, each with its case (shown to read its event's tag)."""
    found = []
    for summary in operator_get(gw, "/admin/plan/violations/", tenant=tenant, limit=1000)["violations"]:
        shown = operator_get(gw, f"/admin/plan/violations/{summary['id']}")
        props = shown["event"].get("properties") or {}
        if props.get("run_tag") == tag and "case" in props:
            found.append({**summary, "case": props["case"]})
    return found


def by_case(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cases = {r["case"]: r for r in found}
    assert len(cases) == len(found), found
    return cases


def delivered(gw: Gateway, destination: str, tag: str) -> dict[str, dict[str, Any]]:
    """The run's events at the destination by case (the mini-program SDK's own events carry
    the tag too, as a super property, but no case)."""
    found = [
        e
        for e in gw.sink_lines(destination)
        if (e.get("properties") or {}).get("run_tag") == tag and "case" in e["properties"]
    ]
    cases = {e["properties"]["case"]: e for e in found}
    assert len(cases) == len(found), [e["properties"]["case"] for e in found]  # each once
    return cases


def own(props: dict[str, Any]) -> dict[str, Any]:
    """The properties a client set (SDK presets start with "$")."""
    return {k: v for k, v in props.items() if not k.startswith("$")}


def rules(violations: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((v["rule"], v["path"]) for v in violations)


@pytest.mark.parametrize("sdk", ["segment", "sensors", pytest.param("miniprogram", marks=pytest.mark.node)])
def test_each_violation_type_in_each_mode_through_each_sdk(
    moded: tuple[str, Gateway], sdk: str, request: pytest.FixtureRequest
) -> None:
    mode, gw = moded
    _, tenant, destination = SOURCES[sdk]
    runner = request.getfixturevalue("miniprogram") if sdk == "miniprogram" else None
    tag = uuid.uuid4().hex[:10]
    send(sdk, gw, runner, tag, f"visitor-{tag}")

    expected_out = {
        "block": {"valid"},
        "omit": set(CASES) - {"required"},  # removing cannot fix a required property
        "flag": set(CASES),
    }[mode]
    expected_kept = {
        "block": set(CASES) - {"valid"},
        "omit": {"required"},
        "flag": set(),
    }[mode]
    expected_omitted = expected_out - {"valid", "unplanned"} if mode == "omit" else set()
    grant = ("analytics",) if tenant == "mall" else ()
    write_key = MALL_MP_KEY if tenant == "mall" else WEB_KEY
    wait_until(
        lambda: set(delivered(gw, destination, tag)) >= expected_out,
        30,
        what=f"the {sdk} events in {destination}",
    )
    gw.wait_past(destination, write_key=write_key, grant=grant)
    out = delivered(gw, destination, tag)
    assert set(out) == expected_out, sorted(out)
    kept = by_case(records_of(gw, tenant, tag))
    assert {c for c, r in kept.items() if r["action"] == "kept"} == expected_kept
    assert {c for c, r in kept.items() if r["action"] == "omitted"} == expected_omitted

    for case, (_, props, broken, removed) in CASES.items():
        sent = {**props, "run_tag": tag, "case": case}
        if case in out:
            event = out[case]
            found = event["context"]["idgate"].get("violations", [])
            got = own(event["properties"])
            if mode == "flag" and broken is not None:
                assert rules(found) == [broken], (case, found)
            else:
                assert found == [], (case, found)
            if mode == "omit" and removed is not None:
                assert got == {k: v for k, v in sent.items() if k != removed}, (case, got)
            elif case != "identifier":  # the phone number in free text is redacted wherever it goes
                assert got == sent, (case, got)
        if case in kept:
            assert broken is not None and rules(kept[case]["violations"]) == [broken], (case, kept[case])
    assert "13812345678" not in json.dumps(list(out.values())) + json.dumps(list(kept.values()))


@pytest.mark.node
def test_kept_events_of_each_sdk_are_replayed_after_the_fix_and_consent_is_asked_again(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    runner = request.getfixturevalue("miniprogram")
    gw = start(tmp_path, "block")
    try:
        tag = uuid.uuid4().hex[:10]
        send("segment", gw, None, tag, f"visitor-{tag}")
        send("sensors", gw, None, tag, f"visitor-{tag}")
        first = len(who_ran)
        send("miniprogram", gw, runner, tag, "")  # a shopper who keeps their consent
        withdrawn_tag = uuid.uuid4().hex[:10]
        send("miniprogram", gw, runner, withdrawn_tag, "")  # one who withdraws it
        leaving = who_ran[first + 1]
        bad = set(CASES) - {"valid"}
        shop = wait_until(
            lambda: r if len(r := records_of(gw, "shop", tag)) == 2 * len(bad) else None,
            30,
            what="the shop's records of both SDKs",
        )
        assert sorted((r["source"], r["case"]) for r in shop) == sorted(
            (source, case) for source in ("shop-web", "shop-app") for case in bad
        )
        assert (
            set(by_case(records_of(gw, "mall", tag)))
            == set(by_case(records_of(gw, "mall", withdrawn_tag)))
            == bad
        )
        withdrawal = httpx.post(
            gw.url + "/v1/consent",
            json={"anonymousId": leaving, "withdraw": ["analytics"], "noticeId": "notice-v1"},
            auth=(MALL_MP_KEY, ""),
            timeout=10,
        )
        assert withdrawal.status_code == 200, withdrawal.text

        gw.stop()
        plan = Path(re.findall(r'tracking_plan_file = "([^"]+)"', gw.config_path.read_text())[0])
        plan.write_text(FIXED_PLAN)
        gw.start()
        answers = {}
        for tenant in ("shop", "mall"):
            r = httpx.post(
                gw.url + "/admin/plan/violations/replay",
                json={"tenant": tenant, "all": True},
                headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            answers[tenant] = r.json()
        # shop: both SDKs' events through, but the phone number in "note" is still personal
        # data in a class-none property
        assert answers["shop"]["replayed"] == 2 * (len(bad) - 1), answers["shop"]
        assert answers["shop"]["stillViolating"] == 2, answers["shop"]
        # mall: the shopper who kept consent has theirs replayed; the one who withdrew is
        # dropped (nothing sent, the records deleted)
        assert answers["mall"]["replayed"] == len(bad) - 1, answers["mall"]
        assert answers["mall"]["stillViolating"] == 2, answers["mall"]
        assert answers["mall"]["dropped"] == len(bad) - 1, answers["mall"]

        gw.wait_past()
        gw.wait_past("mall-warehouse", write_key=MALL_MP_KEY, grant=("analytics",))
        replayed_shop = [e for e in gw.sink_lines() if (e.get("properties") or {}).get("run_tag") == tag]
        replayed_mall = [
            e
            for e in gw.sink_lines("mall-warehouse")
            if (e.get("properties") or {}).get("run_tag") == tag and "case" in e["properties"]
        ]
        cases = sorted(e["properties"]["case"] for e in replayed_shop)
        # each replayed once (plus the valid event each SDK sent at first)
        assert cases == sorted([*(bad - {"identifier"}), "valid"] * 2), cases
        assert sorted(e["properties"]["case"] for e in replayed_mall) == sorted(
            [*(bad - {"identifier"}), "valid"]
        )
        leaving_out = [
            e
            for e in gw.sink_lines("mall-warehouse")
            if (e.get("properties") or {}).get("run_tag") == withdrawn_tag
            and e["properties"].get("case", "valid") != "valid"
        ]
        assert leaving_out == []
        assert set(by_case(records_of(gw, "mall", withdrawn_tag))) == {"identifier"}
        # a second replay finds only what still violates: nothing goes out twice
        again = httpx.post(
            gw.url + "/admin/plan/violations/replay",
            json={"tenant": "shop", "all": True},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
            timeout=60,
        ).json()
        assert again["replayed"] == 0 and again["stillViolating"] == 2, again
    finally:
        gw.stop()
