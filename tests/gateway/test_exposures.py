"""Exposure dedupe and one event name across protocols (issue 14, data cleaning), with the real
Segment and Sensors Python clients against a real gateway on the seed plan, and the two
sighting stores (memory, Redis) on their own."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from gateway.exposures import MemoryExposures, RedisExposures, sighting_keys
from gateway.plan import ExposureSpec, PlanProblems, parse_plan
from identity.redis_client import key_slot, open_async_redis
from tests.conftest import (
    WEB_KEY,
    Gateway,
    PostgresSchema,
    RedisNamespace,
    free_port,
    make_gateway,
    mid,
)
from tests.gateway.test_tracking_plan import metric, plan_config, seed_plan
from tests.sensors.conftest import sensors_url
from tests.waiting import ManualClock

SECOND = 1000


# -- the stores ---------------------------------------------------------------------------------
def test_memory_sightings_repeat_within_the_window_and_a_retry_is_not_its_own_repeat() -> None:
    clock = ManualClock()
    store = MemoryExposures(capacity=3, clock=clock)

    async def ask(*sightings: tuple[bytes, bytes]) -> list[bool]:
        return await store.first_sightings(list(sightings), 60 * SECOND)

    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    assert asyncio.run(ask((a, b"m1"), (b, b"m1"))) == [True, True]
    assert asyncio.run(ask((a, b"m2"))) == [False]  # another message showing a again
    assert asyncio.run(ask((a, b"m1"))) == [True]  # m1 sent again (its request failed)
    clock.now += 61  # the window has passed: a counts again, and is remembered anew
    assert asyncio.run(ask((a, b"m3"))) == [True]
    assert asyncio.run(ask((a, b"m4"))) == [False]
    assert len(store) == 1  # b expired and was forgotten
    asyncio.run(ask((b, b"m5"), (c, b"m5"), (d, b"m5")))
    assert len(store) == 3  # capacity: the oldest (a) went first
    assert asyncio.run(ask((a, b"m6"))) == [True]


@pytest.mark.redis
def test_redis_sightings_are_shared_and_expire(redis_ns: RedisNamespace) -> None:
    async def go() -> None:
        client = aioredis.from_url(redis_ns.url)
        one, two = RedisExposures(client, redis_ns.prefix), RedisExposures(client, redis_ns.prefix)
        a, b = b"\x01" * 16, b"\x02" * 16
        assert await one.first_sightings([(a, b"m1"), (b, b"m1")], 60 * SECOND) == [True, True]
        assert await two.first_sightings([(a, b"m2"), (a, b"m1")], 60 * SECOND) == [False, True]
        keys = [k async for k in client.scan_iter(match=f"{redis_ns.prefix}:exposure:*")]
        ttls = [await client.pttl(k) for k in keys]
        assert len(keys) == 2 and all(0 < t <= 60 * SECOND for t in ttls), ttls
        await client.aclose()

    asyncio.run(go())


def test_redis_sightings_fail_open_while_redis_is_unreachable() -> None:
    async def go() -> list[bool]:
        client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
        try:
            return await RedisExposures(client, "x").first_sightings(
                [(b"a" * 16, b"m"), (b"b" * 16, b"m")], 1000
            )
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [True, True]  # counted as new: nothing is dropped


@pytest.mark.redis
def test_redis_sightings_on_a_cluster_spread_over_the_masters(cluster_ns: RedisNamespace) -> None:
    """One single-key SET per item: any slot, so a cluster takes them in one pipeline."""

    async def go() -> None:
        client = open_async_redis(cluster_ns.url)
        store = RedisExposures(client, cluster_ns.prefix)
        keys = [bytes([i]) * 16 for i in range(40)]
        assert await store.first_sightings([(k, b"m1") for k in keys], 60 * SECOND) == [True] * 40
        assert await store.first_sightings([(k, b"m2") for k in keys], 60 * SECOND) == [False] * 40
        slots = {key_slot(f"{cluster_ns.prefix}:exposure:{k.hex()}".encode()) for k in keys}
        assert len(slots) > 30
        await client.aclose()

    asyncio.run(go())


def test_sighting_keys_per_item_person_and_page() -> None:
    single = ExposureSpec(item="promotion_id", page=["page_view_id", "url"])
    listed = ExposureSpec(item="products[].product_id", page=["page_view_id"])

    def keys(spec: ExposureSpec, props: dict[str, Any], person: str = "p_1") -> list[tuple[int, bytes]]:
        return sighting_keys(spec, props, "shop", person, "e")

    (only,) = keys(single, {"promotion_id": "x", "page_view_id": "pv1"})
    assert only[0] == -1
    assert keys(single, {"promotion_id": "x", "page_view_id": "pv1", "url": "/a"}) == [
        only
    ]  # first page wins
    assert keys(single, {"promotion_id": "x", "page_view_id": "pv2"}) != [only]
    assert keys(single, {"promotion_id": "x", "page_view_id": "pv1"}, person="p_2") != [only]
    assert keys(single, {"page_view_id": "pv1"}) == []  # nothing to count
    products = {"products": [{"product_id": "a"}, {"position": 2}, {"product_id": "b"}], "page_view_id": "v"}
    assert [p for p, _ in keys(listed, products)] == [0, 2]
    assert keys(listed, {"products": "a"}) == []
    # a list of values, as Sensors SDKs send lists (of strings): the same items, the same keys
    values = ExposureSpec(item="product_ids[]", page=["page_view_id"])
    ids = keys(values, {"product_ids": ["a", {"x": 1}, "b"], "page_view_id": "v"})
    assert [p for p, _ in ids] == [0, 2]
    assert [k for _, k in ids] == [k for _, k in keys(listed, products)]


def test_the_plan_checks_its_exposure_rules() -> None:
    plan = """
plan: p
version: 1
events:
  shown:
    description: d
    owner: o
    purposes: [analytics]
    legal_basis: consent
    exposure: {item: "items[].id", page: [view]}
    properties:
      items: {class: none, type: string}
  banner:
    description: d
    owner: o
    purposes: [analytics]
    legal_basis: consent
    exposure: {item: banner_id}
    properties:
      other: {class: none, type: string}
  odd:
    description: d
    owner: o
    purposes: [analytics]
    legal_basis: consent
    exposure: {item: "a[].b[].c"}
    properties:
      a: {class: none, type: array}
"""
    with pytest.raises(PlanProblems) as found:
        parse_plan(plan)
    assert found.value.problems == [
        "events.shown.exposure.item: 'items' must be declared type: array",
        "events.shown.exposure.page: 'view' is not among the event's properties",
        "events.banner.exposure.item: 'banner_id' is not among the event's properties",
        "events.odd.exposure.item: a property (promotion_id), a list (product_ids[]) or a list's item "
        "property (products[].product_id)",
    ]


# -- through the gateway, with the real SDK clients ----------------------------------------------
@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("exposures")
    gw = make_gateway(tmp, config=plan_config(seed_plan(tmp), "observe")).start()
    yield gw
    gw.stop()


def segment_client(gw: Gateway, errors: list[Exception]) -> Client:
    return Client(
        WEB_KEY, host=gw.url, on_error=lambda e, _batch: errors.append(e), max_retries=2, sync_mode=True
    )


def delivered(gw: Gateway, tag: str) -> list[dict[str, Any]]:
    """The run's events in the warehouse sink (every property carries the run tag)."""
    return [e for e in gw.sink_lines() if e.get("properties", {}).get("run") == tag]


@pytest.mark.slow
def test_one_exposure_through_sensors_and_segment_counts_once_for_the_person(shop: Gateway) -> None:
    tag = uuid.uuid4().hex[:10]
    user = f"shopper-{tag}"
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(shop, server=True), request_timeout=10))
    errors: list[Exception] = []
    segment = segment_client(shop, errors)
    dropped_before = metric(shop, "idgate_events_dropped_total", tenant="shop", reason="exposure_repeat")

    def banner(promotion: str, page_view: str) -> dict[str, Any]:
        return {"promotion_id": promotion, "page_view_id": page_view, "run": tag}

    # the App's Sensors SDK (the shop's backend relays it) reports the banner first, for the
    # shopper's device before the log-in is sent; the log-in links the device to the user ...
    device = f"device-{tag}"
    sa.track(device, "ActivityExposure", banner("promo-1", "pv-1"))
    sa.track_signup(user, device)
    sa.flush()
    # ... then the web page's Segment SDK reports the same banner on the same page view
    segment.track(user, "Promotion Viewed", banner("promo-1", "pv-1"))
    segment.track(user, "Promotion Viewed", banner("promo-1", "pv-2"))  # a new page view
    segment.track(user, "Promotion Viewed", banner("promo-2", "pv-1"))  # another banner
    other = f"someone-else-{tag}"
    segment.track(other, "Promotion Viewed", banner("promo-1", "pv-1"))  # another person
    # a list (Segment's list of objects): products already shown on this page view are taken
    # out, and a list with nothing new left is dropped
    for products in (["A", "B"], ["B", "C"], ["A", "C"]):
        listed = {"products": [{"product_id": p} for p in products], "page_view_id": "pv-1", "run": tag}
        segment.track(user, "Product List Viewed (first screen)", listed)
    segment.flush()
    assert errors == []
    shop.wait_past()

    events = delivered(shop, tag)
    banners = sorted(
        (e["properties"]["promotion_id"], e["properties"]["page_view_id"], e["event"])
        for e in events
        if e["event"] in ("ActivityExposure", "Promotion Viewed")
    )
    assert banners == [
        ("promo-1", "pv-1", "ActivityExposure"),  # Sensors' (first)
        ("promo-1", "pv-1", "Promotion Viewed"),  # the other person's
        ("promo-1", "pv-2", "Promotion Viewed"),
        ("promo-2", "pv-1", "Promotion Viewed"),
    ], json.dumps(events)[:2000]
    # one plan event name on both protocols
    shown = [e for e in events if e["event"] in ("ActivityExposure", "Promotion Viewed")]
    assert {e["context"]["idgate"]["event"] for e in shown} == {"activity_exposed"}
    lists = [e for e in events if "products" in e["properties"]]
    assert [[p["product_id"] for p in e["properties"]["products"]] for e in lists] == [["A", "B"], ["C"]]
    assert "flags" not in lists[0]["context"]["idgate"]
    assert lists[1]["context"]["idgate"]["flags"] == ["exposure_repeat_items"]
    assert {e["context"]["idgate"]["event"] for e in lists} == {"first_screen_products_exposed"}
    dropped = metric(shop, "idgate_events_dropped_total", tenant="shop", reason="exposure_repeat")
    assert dropped == dropped_before + 2  # the repeated banner and the emptied list


@pytest.mark.slow
def test_the_ingest_response_counts_a_repeat_and_a_resent_message_stays_a_duplicate(shop: Gateway) -> None:
    tag = uuid.uuid4().hex[:10]
    first = {
        "type": "track",
        "event": "Promotion Viewed",
        "userId": f"shopper-{tag}",
        "messageId": mid(),
        "properties": {"promotion_id": "promo-9", "url": "/home", "run": tag},
    }
    repeat = {**first, "messageId": mid()}
    with shop.client() as c:
        assert c.post("/v1/batch", json={"batch": [first]}).json()["accepted"] == 1
        answer = c.post("/v1/batch", json={"batch": [repeat]}).json()
        assert (answer["accepted"], answer["dropped"]) == (0, {"exposure_repeat": 1}), answer
        resent = c.post("/v1/batch", json={"batch": [first]}).json()
        assert (resent["accepted"], resent["duplicates"]) == (0, 1), resent  # dedupe answers first


@pytest.mark.slow
def test_one_event_name_across_protocols_and_a_client_cannot_forge_it(shop: Gateway) -> None:
    tag = uuid.uuid4().hex[:10]
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(shop, server=True), request_timeout=10))
    sa.track(f"visitor-{tag}", "$pageview", {"$url_path": "/", "run": tag})
    sa.track(f"visitor-{tag}", "$MPViewScreen", {"$url_path": "pages/index", "run": tag})
    sa.flush()
    forged = {
        "type": "page",
        "anonymousId": f"anon-{tag}",
        "messageId": mid(),
        "properties": {"run": tag},
        "context": {"idgate": {"event": "payment_succeeded", "purposes": ["marketing"]}},
    }
    r = httpx.post(shop.url + "/v1/page", json=forged, auth=(WEB_KEY, ""), timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    planless = {"type": "track", "event": "Something Else", "anonymousId": f"anon-{tag}", "messageId": mid()}
    r = httpx.post(shop.url + "/v1/track", json={**planless, "properties": {"run": tag}}, auth=(WEB_KEY, ""))
    assert r.status_code == 200, r.text
    shop.wait_past()
    names = {
        e["event"] if e["type"] == "track" else e["type"]: e["context"]["idgate"]
        for e in delivered(shop, tag)
    }
    assert set(names) == {"$pageview", "$MPViewScreen", "page", "Something Else"}
    assert {k: v.get("event") for k, v in names.items()} == {
        "$pageview": "screen_viewed",
        "$MPViewScreen": "screen_viewed",
        "page": "screen_viewed",
        "Something Else": None,  # unplanned: no plan name
    }
    assert names["page"]["purposes"] == ["analytics"]  # idgate's own, not the client's


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_two_replicas_share_sightings(
    tmp_path: Path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    env = {**redis_ns.env(), "DATABASE_URL": pg_schema.url}
    config = plan_config(seed_plan(tmp_path), "observe")
    a = make_gateway(tmp_path / "a", config=config, extra_env={**env, "IDGATE_REPLICA_ID": "a"}).start()
    b = make_gateway(tmp_path / "b", config=config, extra_env={**env, "IDGATE_REPLICA_ID": "b"}).start()
    try:
        tag = uuid.uuid4().hex[:10]
        event = {
            "type": "track",
            "event": "Promotion Viewed",
            "userId": f"shopper-{tag}",
            "properties": {"promotion_id": "promo-1", "page_view_id": "pv-1", "run": tag},
        }
        with a.client() as ca, b.client() as cb:
            assert (
                ca.post("/v1/batch", json={"batch": [{**event, "messageId": mid()}]}).json()["accepted"] == 1
            )
            answer = cb.post("/v1/batch", json={"batch": [{**event, "messageId": mid()}]}).json()
        assert answer["dropped"] == {"exposure_repeat": 1}, answer
    finally:
        a.stop()
        b.stop()
