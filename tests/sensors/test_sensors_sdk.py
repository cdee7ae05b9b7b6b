"""End to end with the real SensorsAnalyticsSDK Python client from PyPI (module sensorsanalytics),
as a shop's backend runs it: through the tenant's server source."""

from __future__ import annotations

import base64
import gzip
import json
import random
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sensorsanalytics import (
    BatchConsumer,
    DefaultConsumer,
    SensorsAnalytics,
    SensorsAnalyticsNetworkException,
)
from sensorsanalytics import SensorsAnalyticsIdentity as Identity

from tests.conftest import Gateway
from tests.sensors.conftest import (
    current_persons,
    explain,
    sensors_events,
    sensors_url,
    wait_for,
)


class RecordingBatchConsumer(BatchConsumer):
    """The SDK's BatchConsumer, remembering the form fields of each request it sent."""

    def __init__(self, url: str, max_size: int = 50) -> None:
        super().__init__(url, max_size=max_size)
        self.sent: list[dict[str, Any]] = []

    def _do_request(self, data: dict[str, Any]) -> bool:
        result = super()._do_request(data)
        self.sent.append(data)
        return result


def people() -> tuple[str, str, str]:
    run = uuid.uuid4().hex[:10]
    return f"anon-{run}", f"user-{run}", f"139{random.randrange(10**8):08d}"


def journey(sa: SensorsAnalytics, anon: str, user: str, mobile: str) -> int:
    """A shopper browses anonymously, signs up, buys, gets a profile, binds a phone number
    that turns out to be wrong (unbind), and the phone is used alone afterwards."""
    sa.track(anon, "ViewProduct", {"sku": "SKU-1", "$device_id": f"dev-{anon}"})
    sa.track_signup(user, anon, {"channel": "web"})
    sa.track(user, "PayOrder", {"amount": 99, "note": f"call me on {mobile}"}, is_login_id=True)
    sa.profile_set(user, {"plan": "gold"}, is_login_id=True)
    sa.profile_set_once(user, {"first_channel": "web"}, is_login_id=True)
    sa.profile_increment(user, {"orders": 1}, is_login_id=True)
    sa.profile_append(user, {"tags": ["vip"]}, is_login_id=True)
    sa.profile_unset(user, ["plan"], is_login_id=True)
    sa.bind(Identity(Identity.LOGIN_ID, user), Identity(Identity.MOBILE, mobile))
    sa.profile_set_by_id({"city": "Shanghai"}, Identity(Identity.MOBILE, mobile))
    # The unbind takes effect where it stands, also inside a batch: the events after it
    # see the phone alone.
    sa.unbind(Identity(Identity.MOBILE, mobile))
    sa.track_by_id("ViewProduct", {"sku": "SKU-2"}, Identity(Identity.MOBILE, mobile))
    sa.profile_delete(user, is_login_id=True)
    return 13


def check_journey(
    gw: Gateway, events: list[dict[str, Any]], anon: str, user: str, mobile: str, downstream: bool = True
) -> None:
    dump = json.dumps(events)
    for raw in (anon, user, mobile, "+86" + mobile):
        assert raw not in dump
    kinds = [e["context"]["sensors"]["type"] for e in events]
    assert sorted(kinds) == sorted(
        ["track", "track_signup", "track", "profile_set", "profile_set_once", "profile_increment"]
        + ["profile_append", "profile_unset", "track_id_bind", "profile_set", "track_id_unbind"]
        + ["track", "profile_delete"]
    )
    for e in events:
        assert e["context"]["unified_id"].startswith("p_")
        assert (e.get("userId") or e.get("anonymousId")).startswith("k1.")
        assert e["context"]["library"]["name"] == "python"
        assert e["type"] == ("identify" if e["context"]["sensors"]["type"].startswith("profile") else "track")
    by_kind = {e["context"]["sensors"]["type"]: e for e in events}
    signup = by_kind["track_signup"]
    assert signup["event"] == "$SignUp" and signup["userId"] and signup["anonymousId"]
    pay = next(e for e in events if e.get("event") == "PayOrder")
    assert pay["properties"]["note"] == "call me on [redacted:phone]"
    assert by_kind["profile_unset"]["traits"] == {"plan": True, "$is_login_id": True}
    assert by_kind["profile_increment"]["traits"]["orders"] == 1
    view = next(e for e in events if e.get("properties", {}).get("sku") == "SKU-1")
    assert view["properties"]["$device_id"].startswith("k1.")
    assert view["context"]["device"]["id"] == view["properties"]["$device_id"]
    bind = by_kind["track_id_bind"]
    assert [x["type"] for x in bind["context"]["externalIds"]] == ["phone"]
    assert bind["context"]["externalIds"][0]["id"].startswith("k1.")

    unbind = by_kind["track_id_unbind"]
    assert unbind["event"] == "$UnbindID"
    assert [u["type"] for u in unbind["context"]["sensors"]["unbind"]] == ["phone"]
    # The graph: anonymous browsing, sign-up and login are one person; the phone was bound
    # and then unbound, and is somebody else now.
    assert explain(gw, "shop", ("anonymous_id", anon, None), ("user_id", user, None))["linked"] is True
    assert explain(gw, "shop", ("phone", mobile, None), ("user_id", user, None))["linked"] is False
    if downstream:
        check_downstream(gw, events)


def check_downstream(gw: Gateway, events: list[dict[str, Any]]) -> None:
    """What downstream sees with the notices it received (IDs in its pseudonym domain)."""
    # One person until the unbind: anonymous browsing, sign-up, purchase, profile, phone.
    lines = gw.sink_lines("warehouse")
    before = [e for e in events if e["context"]["sensors"]["type"] != "track_id_unbind"]
    before = [e for e in before if e.get("properties", {}).get("sku") != "SKU-2"]
    person = current_persons([e["context"]["unified_id"] for e in before], lines)
    assert len(person) == 1
    # The unbind split the phone off: downstream got a split notice, and the phone alone is
    # somebody else now.
    splits = [n for n in lines if n["type"] == "identity.split"]
    assert splits and splits[0]["previous"] in person
    after = next(e for e in events if e.get("properties", {}).get("sku") == "SKU-2")
    assert current_persons([after["context"]["unified_id"]], lines) != person


def test_default_consumer_every_call_type_arrives_cleaned_with_unified_ids(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway.start()
    anon, user, mobile = people()
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw, server=True), request_timeout=10))
    sent = journey(sa, anon, user, mobile)
    sa.close()
    events = wait_for(gw, lambda e: "sensors" in e.get("context", {}), sent)
    assert len(events) == sent
    check_journey(gw, events, anon, user, mobile)
    # the Python SDK runs on the shop's backend: its server source may bind and unbind
    assert all(e["context"]["idgate"]["source"] == "shop-server" for e in events)


def test_batch_consumer_and_a_resent_batch_is_deduplicated(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway.start()
    anon, user, mobile = people()
    consumer = RecordingBatchConsumer(sensors_url(gw, server=True), max_size=50)
    sa = SensorsAnalytics(consumer)
    for i in range(40):
        sa.track(anon, "ViewProduct", {"i": i})
    sent = 40 + journey(sa, anon, user, mobile)
    sa.close()
    sizes = [len(json.loads(gzip.decompress(base64.b64decode(d["data_list"])))) for d in consumer.sent]
    assert sizes == [50, 3]  # max_size, then the rest on close
    events = wait_for(gw, lambda e: "sensors" in e.get("context", {}), sent)
    assert len(events) == sent == len({e["messageId"] for e in events})
    # Inside one batch, downstream reconciliation is the known delivery issue: see below.
    journey_events = [e for e in events if "i" not in e.get("properties", {})]
    check_journey(gw, journey_events, anon, user, mobile, downstream=False)

    # The SDK sends a batch again after an error it did not see the answer of: same events,
    # same derived message ids, nothing stored twice.
    again = httpx.post(
        sensors_url(gw, server=True),
        content=urlencode(consumer.sent[0]),  # the SDK's own encoding
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert again.status_code == 200, again.text
    assert again.json()["duplicates"] == 50 and again.json()["accepted"] == 0
    assert len(sensors_events(gw)) == sent


def test_batch_consumer_downstream_reconciles_the_journey(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway.start()
    anon, user, mobile = people()
    sa = SensorsAnalytics(BatchConsumer(sensors_url(gw, server=True), max_size=50))
    sent = journey(sa, anon, user, mobile)
    sa.close()
    check_downstream(gw, wait_for(gw, lambda e: "sensors" in e.get("context", {}), sent))


def test_the_python_client_raises_on_a_rejected_single_event(gateway: Gateway) -> None:
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gateway, server=True), request_timeout=10))
    with pytest.raises(SensorsAnalyticsNetworkException, match="400"):
        sa.track("null", "ViewProduct")  # a placeholder id is never a person
    wrong = SensorsAnalytics(
        DefaultConsumer(sensors_url(gateway, server=True).replace("token=", "token=x"), 10)
    )
    with pytest.raises(SensorsAnalyticsNetworkException, match="401"):
        wrong.track("someone-1", "ViewProduct")
