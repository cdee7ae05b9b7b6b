"""The Segment HTTP Tracking API over real HTTP: acceptance, error contract, dedupe, clock skew."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import APP_KEY, WEB_KEY, Gateway, mid


def track(message_id: str, **extra: object) -> dict:
    return {
        "type": "track",
        "userId": "shopper-42",
        "event": "Product Viewed",
        "messageId": message_id,
        "properties": {"sku": "A-1", "price": 12.5},
        **extra,
    }


def test_batch_reaches_sink_pseudonymised_with_received_at(gateway: Gateway) -> None:
    ids = [mid() for _ in range(3)]
    body = {
        "batch": [
            track(ids[0]),
            {**track(ids[1]), "type": "page", "name": "Home"},
            {
                "type": "identify",
                "userId": "shopper-42",
                "messageId": ids[2],
                "traits": {"email": "Shopper@Example.com", "plan": "gold"},
            },
        ]
    }
    with gateway.client() as c:
        r = c.post("/v1/batch", json=body)
    assert r.status_code == 200, r.text
    assert r.json() | {"rejected": []} == {
        "success": True,
        "received": 3,
        "accepted": 3,
        "duplicates": 0,
        "rejected": [],
        "dropped": {},
    }
    events = {e["messageId"]: e for e in gateway.wait_for_sink(set(ids))}
    assert set(events) == set(ids)
    for e in events.values():
        assert e["userId"].startswith("k1.") and "shopper" not in json.dumps(e)
        assert datetime.fromisoformat(e["receivedAt"]) <= datetime.now(UTC)
        assert e["context"]["idgate"]["source"] == "shop-web"
    assert events[ids[1]]["type"] == "page" and events[ids[1]]["name"] == "Home"
    assert events[ids[2]]["traits"]["plan"] == "gold"
    assert events[ids[2]]["traits"]["email"].startswith("k1.")
    # The same person gets the same pseudonym in every event.
    assert len({e["userId"] for e in events.values()}) == 1
    # Every destination receives its copy.
    assert {e["messageId"] for e in gateway.wait_for_sink(set(ids), "stream")} == set(ids)


@pytest.mark.parametrize("kind", ["track", "identify", "page", "screen", "group", "alias"])
def test_single_endpoints(gateway: Gateway, kind: str) -> None:
    m = mid()
    body: dict[str, object] = {"userId": "single-user", "messageId": m}
    body |= {
        "track": {"event": "Clicked"},
        "group": {"groupId": "g-1"},
        "alias": {"previousId": "anon-xyz-1"},
        "page": {"name": "Cart"},
        "screen": {"name": "Cart"},
        "identify": {"traits": {"age": 3}},
    }[kind]
    with gateway.client() as c:
        r = c.post(f"/v1/{kind}", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    (event,) = gateway.wait_for_sink({m})
    assert event["type"] == kind
    if kind == "alias":
        assert event["previousId"].startswith("k1.")


def test_clock_skew_correction_and_batch_context(gateway: Gateway) -> None:
    """timestamp = receivedAt - (sentAt - originalTimestamp); batch context merged into items."""
    m = mid()
    device_now = datetime(2020, 1, 1, 12, 0, 10, tzinfo=UTC)  # a device clock years behind
    body = {
        "sentAt": device_now.isoformat(),
        "context": {"library": {"name": "test"}, "locale": "zh-CN"},
        "batch": [
            track(m, timestamp=(device_now - timedelta(seconds=10)).isoformat(), context={"locale": "en-US"})
        ],
    }
    with gateway.client() as c:
        assert c.post("/v1/batch", json=body).status_code == 200
    (event,) = gateway.wait_for_sink({m})
    received = datetime.fromisoformat(event["receivedAt"])
    assert datetime.fromisoformat(event["timestamp"]) == received - timedelta(seconds=10)
    assert event["originalTimestamp"].startswith("2020-01-01T12:00:00")
    assert event["context"]["library"] == {"name": "test"}
    assert event["context"]["locale"] == "en-US"  # the message's own context wins


def test_write_key_in_body_and_gzip(gateway: Gateway) -> None:
    m = mid()
    raw = json.dumps({"writeKey": APP_KEY, "batch": [track(m)]}).encode()
    r = httpx.post(
        gateway.url + "/v1/batch",
        content=gzip.compress(raw),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    (event,) = gateway.wait_for_sink({m})
    assert event["context"]["idgate"]["source"] == "shop-app"


def test_duplicate_message_ids_are_counted_not_stored_twice(gateway: Gateway) -> None:
    m = mid()
    with gateway.client() as c:
        first = c.post("/v1/batch", json={"batch": [track(m), track(m)]}).json()
        again = c.post("/v1/track", json=track(m)).json()
        metrics = c.get("/metrics").text
    assert (first["accepted"], first["duplicates"]) == (1, 1)
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    gateway.wait_for_sink({m})
    assert [e["messageId"] for e in gateway.sink_lines()].count(m) == 1
    duplicates = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "idgate_events_duplicate_total"
        and sample.labels == {"tenant": "shop", "source": "shop-web"}
    ]
    assert duplicates and duplicates[0] >= 2


def test_same_message_id_from_two_sources_is_not_a_duplicate(gateway: Gateway) -> None:
    m = mid()
    with gateway.client(WEB_KEY) as web, gateway.client(APP_KEY) as app:
        assert web.post("/v1/track", json=track(m)).json()["accepted"] == 1
        assert app.post("/v1/track", json=track(m)).json()["accepted"] == 1


def test_partial_batch_accepts_good_and_lists_bad(gateway: Gateway) -> None:
    good, bad = mid(), mid()
    body = {"batch": [track(good), {"type": "track", "messageId": bad, "event": "x"}, 7]}
    with gateway.client() as c:
        r = c.post("/v1/batch", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["accepted"] == 1
    assert [(x["index"], x["error"], x["field"]) for x in out["rejected"]] == [
        (1, "missing_identity", "batch[1].userId"),
        (2, "invalid_field", "batch[2]"),
    ]
    assert out["rejected"][0]["messageId"] == bad
    assert {e["messageId"] for e in gateway.wait_for_sink({good})} == {good}


DEEP = (
    '{"batch":[{"type":"track","userId":"u","event":"e","properties":'
    + '{"a":' * 10_000
    + "1"
    + "}" * 10_000
    + "}]}"
)

BAD_INPUTS = [
    # (name, path, body bytes, headers, auth key, status, error, field)
    ("malformed json", "/v1/batch", b'{"batch": [', {}, WEB_KEY, 400, "invalid_json", None),
    ("not an object", "/v1/batch", b"[1, 2]", {}, WEB_KEY, 400, "invalid_field", None),
    (
        "wrong content type",
        "/v1/batch",
        b"batch=1",
        {"Content-Type": "application/x-www-form-urlencoded"},
        WEB_KEY,
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    ("missing ids", "/v1/track", b'{"event": "e"}', {}, WEB_KEY, 400, "missing_identity", "userId"),
    (
        "placeholder ids",
        "/v1/track",
        b'{"event": "e", "userId": "undefined", "anonymousId": "null"}',
        {},
        WEB_KEY,
        400,
        "missing_identity",
        "userId",
    ),
    ("missing event", "/v1/track", b'{"userId": "u-1"}', {}, WEB_KEY, 400, "invalid_field", "event"),
    ("empty batch", "/v1/batch", b'{"batch": []}', {}, WEB_KEY, 400, "invalid_field", "batch"),
    (
        "oversized message",
        "/v1/track",
        json.dumps({"userId": "u", "event": "e", "properties": {"x": "y" * 40_000}}).encode(),
        {},
        WEB_KEY,
        413,
        "too_large",
        None,
    ),
    (
        "oversized batch",
        "/v1/batch",
        json.dumps(
            {"batch": [track(f"big-{i}", properties={"x": "y" * 20_000}) for i in range(30)]}
        ).encode(),
        {},
        WEB_KEY,
        413,
        "too_large",
        None,
    ),
    ("deep nesting", "/v1/batch", DEEP.encode(), {}, WEB_KEY, 400, "too_deep", None),
    (
        "properties deeper than the limit",
        "/v1/batch",
        json.dumps(
            {"batch": [track("deep-1", properties=json.loads('{"a":' * 40 + "1" + "}" * 40))]}
        ).encode(),
        {},
        WEB_KEY,
        400,
        "too_deep",
        "batch[0].properties",
    ),
    (
        "invalid utf-8",
        "/v1/track",
        b'{"userId": "\xff\xfe", "event": "e"}',
        {},
        WEB_KEY,
        400,
        "invalid_encoding",
        None,
    ),
    (
        "wrong write key",
        "/v1/batch",
        json.dumps({"batch": [track("k")]}).encode(),
        {},
        "nope-nope-nope",
        401,
        "invalid_write_key",
        "Authorization",
    ),
    (
        "no write key",
        "/v1/batch",
        json.dumps({"batch": [track("k")]}).encode(),
        {},
        None,
        401,
        "missing_write_key",
        "Authorization",
    ),
    (
        "bad timestamp",
        "/v1/track",
        b'{"userId": "u", "event": "e", "timestamp": "yesterday"}',
        {},
        WEB_KEY,
        400,
        "invalid_field",
        "timestamp",
    ),
    (
        "numeric timestamp",
        "/v1/batch",
        b'{"batch": [{"type": "track", "userId": "u", "event": "e", "timestamp": 12}]}',
        {},
        WEB_KEY,
        400,
        "invalid_field",
        "batch[0].timestamp",
    ),
    (
        "non-object batch items",
        "/v1/batch",
        b'{"batch": ["a", null, 3]}',
        {},
        WEB_KEY,
        400,
        "invalid_field",
        "batch[0]",
    ),
    (
        "unknown type",
        "/v1/batch",
        b'{"batch": [{"type": "purchase", "userId": "u"}]}',
        {},
        WEB_KEY,
        400,
        "invalid_field",
        "batch[0].type",
    ),
    (
        "bad gzip",
        "/v1/batch",
        b"not gzip",
        {"Content-Encoding": "gzip"},
        WEB_KEY,
        400,
        "invalid_encoding",
        "Content-Encoding",
    ),
    (
        "gzip bomb",
        "/v1/batch",
        gzip.compress(b" " * 5_000_000),
        {"Content-Encoding": "gzip"},
        WEB_KEY,
        413,
        "too_large",
        None,
    ),
    ("wrong method", "/v1/batch", None, {}, WEB_KEY, 405, "method_not_allowed", None),
    ("unknown path", "/v1/purchase", b"{}", {}, WEB_KEY, 404, "not_found", None),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "key", "status", "error", "field"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_documented_4xx_and_keeps_earlier_data(
    gateway: Gateway,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    key: str | None,
    status: int,
    error: str,
    field: str | None,
) -> None:
    before = mid()
    with gateway.client() as c:
        assert c.post("/v1/track", json=track(before)).status_code == 200
    auth = (key, "") if key else None
    hdrs = {"Content-Type": "application/json", **headers}
    if body is None:
        r = httpx.get(gateway.url + path, auth=auth, timeout=10)
    else:
        r = httpx.post(gateway.url + path, content=body, headers=hdrs, auth=auth, timeout=10)
    assert r.status_code == status, r.text
    out = r.json()
    assert out["error"] == error
    assert out["detail"]
    assert out.get("field") == field
    # What was accepted before the bad request is still delivered.
    assert [e["messageId"] for e in gateway.wait_for_sink({before})] == [before]
    assert gateway.proc is not None and gateway.proc.poll() is None


def test_health_readiness_and_docs(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["outbox"] is True
    spec = httpx.get(gateway.url + "/docs/openapi.json").json()
    assert {"/v1/batch", "/v1/track", "/v1/identify", "/v1/alias", "/healthz"} <= set(spec["paths"])


def test_an_out_of_range_timestamp_rejects_that_message_only(gateway: Gateway) -> None:
    """A message whose timestamp and sentAt cannot be reconciled is rejected alone (the
    rest of the batch is stored), instead of failing the whole batch with a 500 that a
    retrying SDK would send again forever."""
    good, bad = mid(), mid()
    batch = [
        {"type": "track", "userId": "u-time", "event": "Viewed", "messageId": good},
        {
            "type": "track",
            "userId": "u-time",
            "event": "Viewed",
            "messageId": bad,
            "timestamp": "0001-01-01T00:00:00Z",
            "sentAt": "9999-12-31T23:59:59Z",
        },
    ]
    with gateway.client() as c:
        r = c.post("/v1/batch", json={"batch": batch})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1
    [rejected] = body["rejected"]
    assert (rejected["index"], rejected["field"], rejected["messageId"]) == (1, "batch[1].timestamp", bad)
    assert gateway.wait_for_sink({good})


def test_objects_inside_an_identifier_list_are_walked_not_looked_up(gateway: Gateway) -> None:
    """A list under an identifier key may hold objects and lists, not only values: they are
    scrubbed like any nested value (fuzzing found a 500 here: an object is not hashable)."""
    message_id = mid()
    context = {"phonenumber": [{"home": "13912340020", "n": [None, -156851131161161236480]}, [False, 11211]]}
    with gateway.client() as c:
        r = c.post("/v1/track", json={**track(message_id), "context": context})
    assert r.status_code == 200, r.text
    (event,) = gateway.wait_for_sink({message_id})
    sent = event["context"]["phonenumber"]
    assert "13912340020" not in json.dumps(event)
    assert sent[0]["n"][0] is None and sent[1][0] is False
