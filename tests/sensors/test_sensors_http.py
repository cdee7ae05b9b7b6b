"""/sa and /sa.gif over real HTTP: every transport the SDKs use, the answers they rely on,
and a table of bad inputs with their status and field."""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import SHOP_SENSORS_TOKEN, Gateway
from tests.sensors.conftest import encode, sensors_event, sensors_url, wait_for

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def post(gw: Gateway, body: str | bytes, *, path: str = "/sa", query: str | None = None, **kw: Any):
    url = f"{gw.url}{path}?{query}" if query is not None else sensors_url(gw, path=path)
    headers = kw.pop("headers", FORM)
    return httpx.post(url, content=body, headers=headers, timeout=10, **kw)


def tagged(tag: str, **fields: Any) -> dict[str, Any]:
    properties = {"run_tag": tag, **fields.pop("properties", {})}
    return sensors_event(f"visitor-{uuid.uuid4().hex[:10]}", properties=properties, **fields)


def transports(tag: str) -> dict[str, dict[str, Any]]:
    """One event per way an SDK sends it."""
    one = lambda: tagged(tag)  # noqa: E731
    b64 = lambda ev: quote(encode(ev, compress=False))  # noqa: E731
    urlsafe = encode(one(), compress=False).replace("+", "-").replace("/", "_").rstrip("=")
    return {
        "data base64 (web ajax)": {"body": f"data={b64(one())}&ext=crc%3D12345"},
        "data gzip=1 (server SDK)": {"body": f"data={quote(encode(one()))}&gzip=1"},
        "data_list gzip=1 (batch)": {"body": f"data_list={quote(encode([one()]))}&gzip=1"},
        "data_list text/plain (mini-program)": {
            "body": f"data_list={b64([one()])}",
            "headers": {"Content-Type": "text/plain"},
        },
        "beacon text/plain;charset=UTF-8": {
            "body": f"data={b64(one())}",
            "headers": {"Content-Type": "text/plain;charset=UTF-8"},
        },
        "POST /sa.gif (web ajax to the gif url)": {"body": f"data={b64(one())}", "path": "/sa.gif"},
        "url-safe base64 without padding": {"body": f"data={urlsafe}"},
        "unescaped + in base64": {"body": "data=" + encode(one(), compress=False)},
        "plain JSON in data": {"body": "data=" + quote(json.dumps(one()))},
        "Content-Encoding gzip": {
            "body": gzip.compress(f"data={b64(one())}".encode()),
            "headers": {**FORM, "Content-Encoding": "gzip"},
        },
        "project and token in the body": {
            "body": f"data={b64(one())}&project=shop&token={SHOP_SENSORS_TOKEN}",
            "query": "",
        },
        "no Content-Type": {"body": f"data={b64(one())}", "headers": {}},
    }


@pytest.mark.parametrize("name", list(transports("x")))
def test_every_transport_is_accepted(gateway: Gateway, name: str) -> None:
    tag = uuid.uuid4().hex
    spec = transports(tag)[name]
    r = post(gateway, spec["body"], **{k: v for k, v in spec.items() if k != "body"})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    assert r.headers["access-control-allow-origin"] == "*"
    (event,) = wait_for(gateway, lambda e: e.get("properties", {}).get("run_tag") == tag, 1)
    assert event["event"] == "ViewProduct" and event["anonymousId"].startswith("k1.")


def test_image_mode_get_answers_a_gif(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    data = quote(encode(tagged(tag), compress=False))
    r = httpx.get(sensors_url(gateway, path="/sa.gif") + f"&data={data}&ext=crc%3D1", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    assert r.content.startswith(b"GIF89a")
    assert wait_for(gateway, lambda e: e.get("properties", {}).get("run_tag") == tag, 1)
    # a GET the SDKs never send still gets the JSON error
    bad = httpx.get(sensors_url(gateway, path="/sa.gif") + "&data=%25%25", timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "data"


def test_preflight_and_openapi(gateway: Gateway) -> None:
    r = httpx.options(f"{gateway.url}/sa", timeout=10)
    assert r.status_code == 204 and "POST" in r.headers["access-control-allow-methods"]
    assert httpx.put(sensors_url(gateway), timeout=10).status_code == 405
    paths = httpx.get(f"{gateway.url}/docs/openapi.json", timeout=10).json()["paths"]
    assert {"get", "post"} <= set(paths["/sa"]) and {"get", "post"} <= set(paths["/sa.gif"])


def test_a_batch_accepts_its_good_events_and_lists_the_bad(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    batch = [tagged(tag), tagged(tag, event="9lives"), tagged(tag, properties={"bad key": 1})]
    r = post(gateway, f"data_list={quote(encode(batch))}&gzip=1")
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == 1 and body["received"] == 3
    assert [(x["index"], x["field"]) for x in body["rejected"]] == [
        (1, "data_list[1].event"),
        (2, "data_list[2].properties"),
    ]
    assert all(x["messageId"].startswith("sa-") for x in body["rejected"])


def test_a_batch_of_only_bad_events_is_a_200_so_batch_senders_do_not_resend_it_forever(
    gateway: Gateway,
) -> None:
    batch = [tagged("x", event="9lives"), sensors_event("null")]
    r = post(gateway, f"data_list={quote(encode(batch))}&gzip=1")
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is False and body["accepted"] == 0
    assert [x["field"] for x in body["rejected"]] == ["data_list[0].event", "data_list[1].distinct_id"]


def test_a_resent_batch_is_deduplicated_and_the_flush_time_corrects_the_clock(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    now = int(time.time() * 1000)
    skewed = now - 3_600_000  # the device clock is an hour behind
    batch = [tagged(tag, time=skewed - 5000, _track_id=123456789, _flush_time=skewed)]
    body = f"data_list={quote(encode(batch))}&gzip=1"
    assert post(gateway, body).json()["accepted"] == 1
    # the SDK re-sends it with a new _flush_time: still the same event
    batch[0]["_flush_time"] = skewed + 60_000
    again = post(gateway, f"data_list={quote(encode(batch))}&gzip=1").json()
    assert again["duplicates"] == 1 and again["accepted"] == 0
    (event,) = wait_for(gateway, lambda e: e.get("properties", {}).get("run_tag") == tag, 1)
    received = datetime.fromisoformat(event["receivedAt"])
    stamped = datetime.fromisoformat(event["timestamp"])
    assert 4.5 < (received - stamped).total_seconds() < 6
    assert datetime.fromisoformat(event["originalTimestamp"]).timestamp() * 1000 == pytest.approx(
        skewed - 5000
    )


def single(ev: dict[str, Any]) -> str:
    return f"data={quote(encode(ev))}&gzip=1"


GOOD = {"type": "track", "event": "Buy", "distinct_id": "buyer-0001", "time": 1795312338000}
BAD_INPUTS: list[tuple[str, str | bytes, dict[str, Any], int, str, str | None]] = [
    # (case, body, request options, status, error, field)
    ("no token", single(GOOD), {"query": "project=shop"}, 401, "missing_token", "token"),
    ("unknown token", single(GOOD), {"query": "project=shop&token=nope-nope"}, 401, "invalid_token", "token"),
    (
        "token of another project",
        single(GOOD),
        {"query": f"project=mall&token={SHOP_SENSORS_TOKEN}"},
        401,
        "invalid_token",
        "project",
    ),
    ("no data", "ext=crc%3D1", {}, 400, "invalid_request", "data_list"),
    ("not base64", "data_list=%25%25%25", {}, 400, "invalid_encoding", "data_list"),
    (
        "gzip=1 but not gzip",
        f"data={quote(encode(GOOD, compress=False))}&gzip=1",
        {},
        400,
        "invalid_encoding",
        "data",
    ),
    ("encrypted (gzip=9)", f"data={quote(encode(GOOD))}&gzip=9", {}, 415, "unsupported_media_type", "gzip"),
    ("unknown gzip flag", f"data={quote(encode(GOOD))}&gzip=7", {}, 400, "invalid_field", "gzip"),
    (
        "not JSON",
        "data_list=" + quote(base64.b64encode(b"nope").decode()),
        {},
        400,
        "invalid_json",
        "data_list",
    ),
    ("empty list", f"data_list={quote(encode([]))}&gzip=1", {}, 400, "invalid_field", "data_list"),
    (
        "XML body",
        "<xml/>",
        {"headers": {"Content-Type": "application/xml"}},
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    (
        "brotli body",
        "data=x",
        {"headers": {**FORM, "Content-Encoding": "br"}},
        415,
        "unsupported_media_type",
        "Content-Encoding",
    ),
    ("body too large", "data=" + "A" * 1_100_000, {}, 413, "too_large", None),
    (
        "too many events",
        f"data_list={quote(encode([GOOD] * 2501))}&gzip=1",
        {},
        413,
        "too_large",
        "data_list",
    ),
    (
        "event too large",
        single(
            {
                **GOOD,
                "properties": {
                    "a": "x" * 8000,
                    "b": "x" * 8000,
                    "c": "x" * 8000,
                    "d": "x" * 8000,
                    "e": "x" * 8000,
                },
            }
        ),
        {},
        400,
        "too_large",
        "data",
    ),
    (
        "no type",
        single({k: v for k, v in GOOD.items() if k != "type"}),
        {},
        400,
        "invalid_field",
        "data.type",
    ),
    ("unknown type", single({**GOOD, "type": "track_everything"}), {}, 400, "invalid_field", "data.type"),
    (
        "item records",
        single({"type": "item_set", "item_type": "book", "item_id": "b1", "time": GOOD["time"]}),
        {},
        400,
        "unsupported_type",
        "data.type",
    ),
    ("bad event name", single({**GOOD, "event": "9lives"}), {}, 400, "invalid_name", "data.event"),
    (
        "track without event",
        single({k: v for k, v in GOOD.items() if k != "event"}),
        {},
        400,
        "invalid_field",
        "data.event",
    ),
    (
        "reserved property key",
        single({**GOOD, "properties": {"distinct_id": "x"}}),
        {},
        400,
        "invalid_name",
        "data.properties.distinct_id",
    ),
    (
        "property key with a space",
        single({**GOOD, "properties": {"bad key": 1}}),
        {},
        400,
        "invalid_name",
        "data.properties",
    ),
    (
        "object property value",
        single({**GOOD, "properties": {"obj": {"a": 1}}}),
        {},
        400,
        "invalid_field",
        "data.properties.obj",
    ),
    (
        "string over 8192",
        single({**GOOD, "properties": {"note": "x" * 8193}}),
        {},
        400,
        "invalid_field",
        "data.properties.note",
    ),
    (
        "distinct_id over 255",
        single({**GOOD, "distinct_id": "d" * 256}),
        {},
        400,
        "invalid_field",
        "data.distinct_id",
    ),
    (
        "identity over 255",
        single({**GOOD, "identities": {"$identity_login_id": "u" * 256}}),
        {},
        400,
        "invalid_field",
        "data.identities.$identity_login_id",
    ),
    (
        "bad identity key",
        single({**GOOD, "identities": {"no such key!": "u1"}}),
        {},
        400,
        "invalid_name",
        "data.identities",
    ),
    (
        "identity not a string",
        single({**GOOD, "identities": {"$identity_login_id": 1.5}}),
        {},
        400,
        "invalid_field",
        "data.identities",
    ),
    ("time in seconds with decimals", single({**GOOD, "time": 12345}), {}, 400, "invalid_field", "data.time"),
    ("time as a string", single({**GOOD, "time": "yesterday"}), {}, 400, "invalid_field", "data.time"),
    (
        "sign-up without original_id",
        single({**GOOD, "type": "track_signup", "event": "$SignUp"}),
        {},
        400,
        "invalid_field",
        "data.original_id",
    ),
    (
        "unbind without identities",
        single({**GOOD, "type": "track_id_unbind"}),
        {},
        400,
        "invalid_field",
        "data.identities",
    ),
    (
        "no identity at all",
        single({k: v for k, v in GOOD.items() if k != "distinct_id"}),
        {},
        400,
        "missing_identity",
        "data.distinct_id",
    ),
    (
        "placeholder distinct_id",
        single({**GOOD, "distinct_id": "undefined"}),
        {},
        400,
        "missing_identity",
        "data.distinct_id",
    ),
    (
        "event of another project",
        single({**GOOD, "project": "mall"}),
        {},
        400,
        "wrong_project",
        "data.project",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "options", "status", "error", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_get_their_4xx_and_field(
    gateway: Gateway,
    case: str,
    body: str,
    options: dict[str, Any],
    status: int,
    error: str,
    field: str | None,
) -> None:
    r = post(gateway, body, **options)
    assert r.status_code == status, r.text
    got = r.json()
    assert (got["error"], got["field"]) == (error, field), got
    assert got["detail"]
    # browser SDKs post cross-origin: every answer, errors included, must be readable
    assert r.headers.get("access-control-allow-origin") == "*", (case, dict(r.headers))
