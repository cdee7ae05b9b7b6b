"""The unified ID downstream received first survives a merge: an anonymous visitor keeps
theirs when they log in, with each SDK family (Segment, Sensors, the WeChat mini-program).

(The mini-program's is in tests/sensors/test_miniprogram.py, beside its SDK harness.)

A visitor's events before login carry their anonymous ID's unified ID (never linked yet,
so it is derived from that ID). At login the anonymous ID and the login id first meet; the
warehouse must not see the person change ID: every event, before and after the login, is
delivered under one unified ID, with no merge notice needed to reconcile them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from segment.analytics import Client
from sensorsanalytics import DefaultConsumer, SensorsAnalytics

from tests.conftest import MALL_APP_KEY, MALL_WEB_KEY, Gateway, make_gateway
from tests.sensors.conftest import sensors_url, wait_for

pytestmark = pytest.mark.slow
LINKING = ["analytics", "identity_linking"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = make_gateway(tmp_path_factory.mktemp("stable-ids")).start()
    yield g
    g.stop()


def grant(gw: Gateway, key: str, anonymous_id: str) -> None:
    r = httpx.post(
        gw.url + "/v1/consent",
        auth=(key, ""),
        json={"anonymousId": anonymous_id, "grant": LINKING, "noticeId": "notice-v1"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def never_retired(gw: Gateway, unified_id: str) -> bool:
    """No merge notice turns this ID (which the warehouse received) into an alias. (The
    login's own fresh ID, never sent anywhere, may be merged into it: that is the point.)"""
    notices = [e for e in gw.sink_lines("mall-warehouse") if e.get("type") == "identity.merged"]
    return not [n for n in notices if n["merged"] == unified_id]


def test_segment_visitor_keeps_their_id_at_login(gw: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    anon, user = f"seg-anon-{tag}", f"seg-user-{tag}"
    grant(gw, MALL_WEB_KEY, anon)
    errors: list[Exception] = []
    client = Client(MALL_WEB_KEY, host=gw.url, sync_mode=True, on_error=lambda e, _b: errors.append(e))
    sent = []
    for call in (
        lambda: client.page(anonymous_id=anon, name="Home"),
        lambda: client.track(anonymous_id=anon, event="Product Viewed", properties={"sku": "SKU-1"}),
        lambda: client.identify(user, {"plan": "gold"}, anonymous_id=anon),  # the login
        lambda: client.track(user, "Order Completed", {"order_id": "o-1"}, anonymous_id=anon),
    ):
        ok, message = call()
        assert ok, message
        sent.append(message["messageId"])
    assert errors == []
    events = {e["messageId"]: e for e in gw.wait_for_sink(set(sent), "mall-warehouse")}
    ids = [events[m]["context"]["unified_id"] for m in sent]
    assert len(set(ids)) == 1, ids  # before and after the login: one ID
    assert never_retired(gw, ids[0])


def test_sensors_visitor_keeps_their_id_at_sign_up(gw: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    anon, user = f"sa-anon-{tag}", f"sa-user-{tag}"
    grant(gw, MALL_APP_KEY, anon)
    sa = SensorsAnalytics(DefaultConsumer(sensors_url(gw, "mall"), request_timeout=10))
    sa.track(anon, "ViewProduct", {"sku": "SKU-1", "run": tag})
    sa.track_signup(user, anon, {"run": tag})  # the login: both ids in one event
    sa.close()
    events = wait_for(gw, lambda e: (e.get("properties") or {}).get("run") == tag, 2, "mall-warehouse")
    assert sorted(e["event"] for e in events) == ["$SignUp", "ViewProduct"]
    ids = {e["context"]["unified_id"] for e in events}
    assert len(ids) == 1, events
    assert never_retired(gw, ids.pop())
