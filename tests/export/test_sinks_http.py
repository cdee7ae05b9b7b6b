"""HTTP sinks (webhook, Segment, Sensors) against a real local receiver (tests.receivers):
exactly once by message id through a receiver that fails 30 % of requests and lets some
time out, error classification, the Segment calls and the Sensors body decoded back."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from export.http_sinks import (
    DELETED_EVENT,
    SPLIT_EVENT,
    WITHDRAWN_EVENT,
    HttpSink,
    idempotency_key,
    raise_for_status,
    segment_message,
    sensors_event,
    sensors_form,
    sensors_name,
    track_id,
)
from export.outbox import StoredRecord
from export.sink import PermanentSinkError, RetryableSinkError
from export.sinks import build_sink
from identity.notices import decode_notice, encode_notice, withdrawal_notice
from tests.conftest import free_port
from tests.receivers import Receiver, decode_sensors_form, sample_records

WRITE_KEY = "segment-test-write-key"
T0 = 1_763_700_000_000
NO_ROOT = Path("/nonexistent")  # HTTP sinks write no files


def _record(seq: int, body: dict) -> StoredRecord:
    kind = "notice" if body["type"].startswith("identity.") else "event"
    return StoredRecord(seq, T0, ("d",), json.dumps(body).encode(), b"", body["messageId"], (), kind=kind)


def _batches(records: Sequence[StoredRecord], size: int) -> list[Sequence[StoredRecord]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


async def _deliver(sink: HttpSink, batches: list[Sequence[StoredRecord]], max_retries: int = 200) -> int:
    """What the delivery worker does, minus the backoff: write each batch until it succeeds."""
    retries = 0
    for batch in batches:
        while True:
            try:
                await sink.write(batch)
                break
            except RetryableSinkError:
                retries += 1
                assert retries < max_retries
    await sink.close()
    return retries


def _flaky() -> Receiver:
    # 30 % answered 500, 10 % received but answered after the client's timeout
    return Receiver(fail_rate=0.3, timeout_rate=0.1, hang_seconds=0.6, seed=7, write_key=WRITE_KEY)


# -- webhook ---------------------------------------------------------------------------------
def test_webhook_exactly_once_through_failures_and_timeouts() -> None:
    records = sample_records(300)
    with _flaky() as rx:
        sink = build_sink(
            "webhook",
            root=NO_ROOT,
            destination="hook",
            options={"url": rx.webhook_url, "timeout_seconds": 0.3},
        )
        retries = asyncio.run(_deliver(sink, _batches(records, 25)))
    assert rx.message_ids == [r.message_id for r in records]
    assert rx.events == [json.loads(r.payload) for r in records]
    assert retries > 0 and rx.statuses[500] > 0
    assert rx.duplicates > 0  # timed-out requests had arrived: their retry was deduped
    # every request of one batch carried the same Idempotency-Key, other batches another
    keys: dict[tuple[str, ...], set[str]] = {}
    for request in rx.requests:
        if request.message_ids:
            keys.setdefault(request.message_ids, set()).add(request.headers["idempotency-key"])
    assert all(len(k) == 1 for k in keys.values())
    assert len({next(iter(k)) for k in keys.values()}) == len(keys)


def test_webhook_headers_and_idempotency_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDGATE_TEST_HOOK_TOKEN", "Bearer s3cret")
    records = sample_records(3)
    options = {
        "url": "",
        "headers": {"X-Team": "bi"},
        "headers_env": {"Authorization": "IDGATE_TEST_HOOK_TOKEN"},
    }
    with Receiver() as rx:
        sink = build_sink(
            "webhook", root=NO_ROOT, destination="hook", options={**options, "url": rx.webhook_url}
        )
        asyncio.run(_deliver(sink, [records, records]))
    first, second = rx.requests
    assert first.headers["x-team"] == "bi" and first.headers["authorization"] == "Bearer s3cret"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("idgate/")
    key = idempotency_key("hook", [r.message_id for r in records])
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == key
    assert key != idempotency_key("other-destination", [r.message_id for r in records])
    assert key != idempotency_key("hook", [r.message_id for r in records[:2]])
    assert rx.message_ids == ["m-1", "m-2", "m-3"] and rx.duplicates == 3
    # a secret named by environment variable must be there at start
    monkeypatch.delenv("IDGATE_TEST_HOOK_TOKEN")
    with pytest.raises(ValueError, match="IDGATE_TEST_HOOK_TOKEN is not set"):
        build_sink("webhook", root=NO_ROOT, destination="hook", options={**options, "url": "http://h"})


def test_refused_records_are_permanent_and_the_message_is_safe_to_log() -> None:
    records = sample_records(4)
    poison = _record(5, {"type": "track", "messageId": "m-poison", "userId": "u.x", "event": "Poison"})
    with Receiver(reject=lambda event: event.get("event") == "Poison") as rx:
        sink = build_sink("webhook", root=NO_ROOT, destination="hook", options={"url": rx.webhook_url})

        async def main() -> str:
            with pytest.raises(PermanentSinkError) as info:
                await sink.write([*records, poison])
            await sink.write(records)  # without the refused one the rest goes through
            await sink.close()
            return str(info.value)

        message = asyncio.run(main())
    assert message == "webhook sink hook: HTTP 400 from 127.0.0.1:" + rx.url.rsplit(":", 1)[1] + (
        ": the receiver refused the records"
    )
    assert "Poison" not in message and "m-" not in message and "/webhook" not in message
    assert rx.message_ids == [r.message_id for r in records]


def test_down_refused_and_unreachable_receivers_are_retryable() -> None:
    records = sample_records(2)

    async def attempt(sink: HttpSink) -> str:
        try:
            with pytest.raises(RetryableSinkError) as info:
                await sink.write(records)
            return str(info.value)
        finally:
            await sink.close()

    with Receiver(write_key=WRITE_KEY) as rx:
        rx.down = True
        hook = build_sink("webhook", root=NO_ROOT, destination="hook", options={"url": rx.webhook_url})
        assert "HTTP 503" in asyncio.run(attempt(hook))
        rx.down = False
        wrong_key = {"url": rx.segment_url, "write_key": "wrong"}
        segment = build_sink("segment", root=NO_ROOT, destination="seg", options=wrong_key)
        assert "HTTP 401" in asyncio.run(attempt(segment))
        assert rx.message_ids == []
    closed = f"http://127.0.0.1:{free_port()}/in?token=secret"
    hook = build_sink("webhook", root=NO_ROOT, destination="hook", options={"url": closed})
    message = asyncio.run(attempt(hook))
    assert "ConnectError" in message and "secret" not in message


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, None),
        (204, None),
        (301, RetryableSinkError),
        (400, PermanentSinkError),
        (401, RetryableSinkError),
        (403, RetryableSinkError),
        (404, RetryableSinkError),
        (408, RetryableSinkError),
        (409, PermanentSinkError),
        (413, PermanentSinkError),
        (422, PermanentSinkError),
        (429, RetryableSinkError),
        (500, RetryableSinkError),
        (502, RetryableSinkError),
        (503, RetryableSinkError),
    ],
)
def test_status_classification(status: int, outcome: type[Exception] | None) -> None:
    if outcome is None:
        raise_for_status("webhook", "d", "h:1", status)
    else:
        with pytest.raises(outcome):
            raise_for_status("webhook", "d", "h:1", status)


# -- Segment ---------------------------------------------------------------------------------
NOTICES = [
    {
        "type": "identity.merged",
        "messageId": "identity.merged:p_b",
        "survivor": "p_a",
        "merged": "p_b",
        "receivedAt": "2025-11-21T05:00:00+00:00",
        "context": {"idgate": {"tenant": "shop", "notice": True}},
    },
    {
        "type": "identity.split",
        "messageId": "identity.split:p_a:1763701200.0",
        "previous": "p_a",
        "parts": ["p_c", "p_d"],
        "receivedAt": "2025-11-21T05:00:00+00:00",
        "context": {"idgate": {"tenant": "shop", "notice": True}},
    },
    {
        "type": "identity.deleted",
        "messageId": "identity.deleted:p_d",
        "unifiedId": "p_d",
        "receivedAt": "2025-11-21T05:00:00+00:00",
        "context": {"idgate": {"tenant": "shop", "notice": True}},
    },
]


def test_segment_exactly_once_with_unified_user_ids() -> None:
    records = sample_records(200)
    with _flaky() as rx:
        options = {"url": rx.segment_url, "write_key": WRITE_KEY, "timeout_seconds": 0.3}
        sink = build_sink("segment", root=NO_ROOT, destination="seg", options=options)
        retries = asyncio.run(_deliver(sink, _batches(records, 40)))
    assert retries > 0 and rx.duplicates > 0
    assert rx.message_ids == [r.message_id for r in records]
    assert {r.path for r in rx.requests} == {"/v1/batch"}
    first, original = rx.events[0], json.loads(records[0].payload)
    assert first["userId"] == original["context"]["unified_id"] == "p_person0"
    assert first["anonymousId"] == original["anonymousId"]
    assert first["context"]["idgate"]["userId"] == original["userId"]
    assert first["context"]["idgate"]["anonymousId"] == original["anonymousId"]
    assert {k: v for k, v in first.items() if k not in ("userId", "context")} == {
        k: v for k, v in original.items() if k not in ("userId", "context")
    }


def test_segment_notices_become_alias_and_track_calls() -> None:
    records = [_record(i, n) for i, n in enumerate(NOTICES, start=1)]
    with Receiver(write_key=WRITE_KEY) as rx:
        sink = build_sink(
            "segment", root=NO_ROOT, destination="seg", options={"url": rx.url, "write_key": WRITE_KEY}
        )
        asyncio.run(_deliver(sink, [records]))
    alias, split, deleted = rx.events
    assert alias == {
        "type": "alias",
        "messageId": "identity.merged:p_b",
        "previousId": "p_b",
        "userId": "p_a",
        "timestamp": "2025-11-21T05:00:00+00:00",
        "context": {"idgate": {"tenant": "shop", "notice": True}},
    }
    assert (split["type"], split["event"], split["userId"]) == ("track", SPLIT_EVENT, "p_a")
    assert split["properties"] == {"previous": "p_a", "parts": ["p_c", "p_d"]}
    assert (deleted["type"], deleted["event"], deleted["userId"]) == ("track", DELETED_EVENT, "p_d")
    assert rx.message_ids == [n["messageId"] for n in NOTICES]


def test_segment_requests_stay_under_the_size_limit_in_order() -> None:
    records = sample_records(60)
    with Receiver(write_key=WRITE_KEY) as rx:
        options = {"url": rx.url + "/v1/batch", "write_key": WRITE_KEY, "max_request_bytes": 5_000}
        sink = build_sink("segment", root=NO_ROOT, destination="seg", options=options)
        asyncio.run(_deliver(sink, [records]))
    assert len(rx.requests) > 5
    assert rx.message_ids == [r.message_id for r in records]


def test_receiver_speaks_segment_like_the_segment_sdk() -> None:
    """The receiver's Segment route takes what the official Python SDK sends (gzipped)."""
    from segment.analytics import Client

    with Receiver(write_key=WRITE_KEY) as rx:
        client = Client(WRITE_KEY, host=rx.url, sync_mode=True, gzip=True)
        client.track(user_id="u-1", event="Order Completed", properties={"total": 3}, message_id="sdk-1")
        client.alias(previous_id="a-1", user_id="u-1", message_id="sdk-2")
    assert rx.message_ids == ["sdk-1", "sdk-2"]
    assert rx.events[0]["event"] == "Order Completed" and rx.events[1]["previousId"] == "a-1"


# -- Sensors ---------------------------------------------------------------------------------
def _sensors_records() -> list[StoredRecord]:
    ctx = {
        "unified_id": "p_u1",
        "ip": "203.0.113.0",
        "os": {"name": "iOS", "version": "17.2"},
        "app": {"version": "5.1.0"},
        "device": {"model": "iPhone15,2", "manufacturer": "Apple"},
        "idgate": {"tenant": "shop", "source": "shop-app", "platform": "app", "purposes": ["analytics"]},
    }
    at = "2025-11-21T04:40:00.123Z"
    events = [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u.p1",
            "anonymousId": "a.p1",
            "properties": {
                "order_id": "o-1",
                "total": 99.5,
                "paid": True,
                "skus": ["a", "b"],
                "coupon": None,
                "address": {"city": "Hangzhou"},
                "time": "x",
                "商品": "茶",
            },
        },
        {"type": "track", "event": "下单", "anonymousId": "a.p2", "properties": {"amount": 3}},
        {"type": "identify", "userId": "u.p1", "traits": {"vip": True, "level": 3}},
        {
            "type": "page",
            "anonymousId": "a.p1",
            "name": "Home",
            "properties": {"url": "https://s/x", "path": "/x"},
        },
        {"type": "screen", "anonymousId": "a.p1", "name": "Cart", "properties": {"items": 2}},
        {"type": "alias", "userId": "u.p1", "previousId": "a.p1"},
    ]
    records = []
    for i, e in enumerate(events, start=1):
        body = {**e, "messageId": f"sa-{i}", "timestamp": at, "receivedAt": at, "context": ctx}
        records.append(_record(i, body))
    return records + [_record(100 + i, n) for i, n in enumerate(NOTICES)]


def test_sensors_body_decodes_to_what_the_sink_derived() -> None:
    records = _sensors_records()
    with Receiver() as rx:
        options = {"url": rx.sensors_url, "project": "production", "events_per_request": 4}
        sink = build_sink("sensors", root=NO_ROOT, destination="sa", options=options)
        asyncio.run(_deliver(sink, [records]))
    # the receiver checked every record with the Sensors SDK's own rules (else 400)
    assert rx.statuses == {200: 3} and [r.path for r in rx.requests] == ["/sa?project=default"] * 3
    derived = [
        sensors_event(
            json.loads(r.payload),
            r.message_id,
            project="production",
            notice=decode_notice(r.payload) if r.kind == "notice" else None,
        )
        for r in records
    ]
    assert rx.events == derived
    assert rx.message_ids == [r.message_id for r in records]

    order, chinese, profile, page, screen, alias, merged, split, deleted = rx.events
    source = json.loads(records[0].payload)
    # fields round-trip
    assert order["type"] == "track" and order["event"] == "Order_Completed"
    assert order["distinct_id"] == "p_u1" and order["project"] == "production"
    stamp = datetime.fromisoformat(source["timestamp"]).timestamp() * 1000
    assert order["time"] == int(stamp) == 1_763_700_000_123
    assert order["_track_id"] == track_id("sa-1") < 2**31
    props = order["properties"]
    assert props["idgate_message_id"] == "sa-1" and props["idgate_event_name"] == "Order Completed"
    assert props["order_id"] == "o-1" and props["total"] == 99.5 and props["paid"] is True
    assert props["skus"] == ["a", "b"] and "coupon" not in props
    assert json.loads(props["address"]) == {"city": "Hangzhou"}
    assert props["_time"] == "x" and props[sensors_name("商品")] == "茶"
    assert props["idgate_user_id"] == "u.p1" and props["idgate_anonymous_id"] == "a.p1"
    assert (props["$os"], props["$os_version"], props["$app_version"]) == ("iOS", "17.2", "5.1.0")
    assert (props["$model"], props["$manufacturer"], props["$ip"]) == ("iPhone15,2", "Apple", "203.0.113.0")
    assert props["$lib"] == order["lib"]["$lib"] == "iOS"
    assert props["idgate_source"] == "shop-app" and props["idgate_purposes"] == ["analytics"]
    assert chinese["event"] == sensors_name("下单") != sensors_name("支付")
    assert chinese["properties"]["idgate_event_name"] == "下单"
    assert profile["type"] == "profile_set" and profile["properties"]["vip"] is True
    assert page["event"] == "$pageview" and page["properties"]["$url"] == "https://s/x"
    assert page["properties"]["$url_path"] == "/x" and page["properties"]["$title"] == "Home"
    assert screen["event"] == "$AppViewScreen" and screen["properties"]["$screen_name"] == "Cart"
    assert (alias["type"], alias["original_id"], alias["distinct_id"]) == ("track_signup", "a.p1", "p_u1")
    # notices: a merge is a sign-up of the survivor with the merged ID as original_id
    assert (merged["type"], merged["event"]) == ("track_signup", "$SignUp")
    assert (merged["distinct_id"], merged["original_id"]) == ("p_a", "p_b")
    assert (split["event"], split["distinct_id"]) == ("idgate_identity_split", "p_a")
    assert split["properties"]["idgate_parts"] == ["p_c", "p_d"]
    assert (deleted["event"], deleted["distinct_id"]) == ("idgate_identity_deleted", "p_d")
    assert merged["properties"]["idgate_message_id"] == "identity.merged:p_b"


def test_sensors_form_is_the_sdk_encoding() -> None:
    """Our body and the Sensors SDK's BatchConsumer body decode the same way, and the
    receiver takes what the SDK itself sends."""
    from sensorsanalytics.sdk import BatchConsumer, DefaultConsumer, SensorsAnalytics

    events = [sensors_event(json.loads(r.payload), r.message_id) for r in _sensors_records()]
    ours = decode_sensors_form(sensors_form(events))
    sdk_body = DefaultConsumer("http://unused")._encode_msg_list([json.dumps(e) for e in events])
    assert ours == events == json.loads(gzip.decompress(base64.b64decode(sdk_body)))

    with Receiver() as rx:
        consumer = BatchConsumer(rx.sensors_url, max_size=2)
        sa = SensorsAnalytics(consumer)
        # The receiver tells Sensors records apart by _track_id, distinct_id and time; this
        # SDK sends no _track_id, so two calls of one distinct id in the same millisecond
        # would be one record there: give the sign-up its own id.
        sa.track("p_u1", "OrderCompleted", {"total": 3})
        sa.track_signup("p_u2", "a.p1")
        sa.close()
    assert [e["type"] for e in rx.events] == ["track", "track_signup"]
    assert rx.events[0]["properties"]["total"] == 3


def test_sensors_exactly_once_through_failures_and_timeouts() -> None:
    records = sample_records(150)
    with _flaky() as rx:
        options = {"url": rx.sensors_url, "timeout_seconds": 0.3, "events_per_request": 50}
        sink = build_sink("sensors", root=NO_ROOT, destination="sa", options=options)
        retries = asyncio.run(_deliver(sink, _batches(records, 50)))
    assert retries > 0
    assert rx.message_ids == [r.message_id for r in records]
    assert [e["distinct_id"] for e in rx.events] == [
        json.loads(r.payload)["context"]["unified_id"] for r in records
    ]


def test_segment_message_keeps_events_without_unified_id() -> None:
    event = {"type": "track", "messageId": "x", "anonymousId": "a.1", "event": "E", "context": {}}
    assert segment_message(event, "x") == event
    assert segment_message({**event, "messageId": ""}, "from-record")["messageId"] == "from-record"


def test_a_slow_receiver_times_out_within_the_configured_timeout() -> None:
    with Receiver(timeout_rate=1.0, hang_seconds=1.0) as rx:
        sink = build_sink(
            "webhook",
            root=NO_ROOT,
            destination="hook",
            options={"url": rx.webhook_url, "timeout_seconds": 0.2},
        )

        async def main() -> float:
            started = time.monotonic()
            with pytest.raises(RetryableSinkError, match="ReadTimeout after 0.2s"):
                await sink.write(sample_records(1))
            await sink.close()
            return time.monotonic() - started

        assert asyncio.run(main()) < 0.8


def test_a_withdrawal_notice_becomes_a_segment_track_and_a_sensors_event() -> None:
    at = datetime(2025, 11, 21, 5, tzinfo=UTC)
    notice = withdrawal_notice("shop", "p_w", ["marketing", "analytics"], [12, 11], at)
    record = StoredRecord(1, T0, ("d",), encode_notice(notice), b"", notice.message_id, (), kind="notice")
    with Receiver(write_key=WRITE_KEY) as seg, Receiver() as sa:
        segment = build_sink(
            "segment", root=NO_ROOT, destination="seg", options={"url": seg.url, "write_key": WRITE_KEY}
        )
        sensors = build_sink("sensors", root=NO_ROOT, destination="sa", options={"url": sa.sensors_url})
        asyncio.run(_deliver(segment, [[record]]))
        asyncio.run(_deliver(sensors, [[record]]))
    (track,) = seg.events
    assert (track["type"], track["event"], track["userId"]) == ("track", WITHDRAWN_EVENT, "p_w")
    assert track["properties"] == {
        "unifiedId": "p_w",
        "purposes": ["analytics", "marketing"],
        "ledgerSeqs": [11, 12],
    }
    (event,) = sa.events
    assert (event["event"], event["distinct_id"]) == ("idgate_consent_withdrawn", "p_w")
    assert event["properties"]["idgate_purposes"] == ["analytics", "marketing"]
