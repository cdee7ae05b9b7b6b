"""End to end with the real segment-analytics-python client from PyPI."""

from __future__ import annotations

import json
import uuid

from segment.analytics import Client

from tests.conftest import WEB_KEY, Gateway


def test_every_call_type_and_a_200_event_flush_reach_the_sink(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway.start()
    errors: list[Exception] = []
    client = Client(
        WEB_KEY, host=gw.url, on_error=lambda e, _batch: errors.append(e), max_retries=2, upload_size=100
    )
    run = uuid.uuid4().hex[:8]
    user, anon = f"sdk-user-{run}", f"sdk-anon-{run}"
    sent: dict[str, str] = {}

    def remember(kind: str, result: tuple[bool, dict]) -> None:
        ok, msg = result
        assert ok, msg
        sent[msg["messageId"]] = kind

    remember("identify", client.identify(user, {"email": f"{run}@example.com", "plan": "gold"}))
    remember("track", client.track(user, "Product Added", {"sku": "SKU-1", "price": 99}))
    remember("page", client.page(user, "Shop", "Home", {"url": "https://shop.example/"}))
    remember("screen", client.screen(user, "App", "Cart"))
    remember("group", client.group(user, "store-17", {"name": "Store 17"}))
    remember("alias", client.alias(anon, user))
    for i in range(200):
        remember("track", client.track(anonymous_id=anon, event="Product Viewed", properties={"i": i}))
    client.flush()
    client.join()
    assert errors == []

    events = gw.wait_for_sink(set(sent), timeout=30)
    by_id = {e["messageId"]: e for e in events}
    assert len(events) == len(by_id) == len(sent) == 206  # all arrived, none twice
    assert {m: e["type"] for m, e in by_id.items()} == sent
    dump = json.dumps(events)
    assert user not in dump and anon not in dump and f"{run}@example.com" not in dump
    for e in events:
        assert e["receivedAt"]
        assert e["context"]["library"]["name"] == "analytics-python"
        assert (e.get("userId") or e.get("anonymousId")).startswith("k1.")
    identify = next(e for e in events if e["type"] == "identify")
    alias = next(e for e in events if e["type"] == "alias")
    track = next(e for e in events if e["type"] == "track" and e.get("userId"))
    assert identify["userId"] == alias["userId"] == track["userId"]
    assert alias["previousId"] == next(e for e in events if e.get("anonymousId"))["anonymousId"]
    assert identify["traits"]["plan"] == "gold" and identify["traits"]["email"].startswith("k1.")
