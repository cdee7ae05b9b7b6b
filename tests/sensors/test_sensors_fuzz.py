"""Property tests: no input makes the Sensors decoders (or the pipeline stages after them, or
the endpoints) fail with anything but a 4xx."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime
from urllib.parse import quote_from_bytes, urlencode

import httpx
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Limits, Tenant
from gateway.errors import InvalidRequest
from gateway.events import RejectMessage
from gateway.pipeline import pseudonymise_identifiers, scrub_personal_data
from gateway.sensors import decode_events, parse_form, payload_json
from identity.pseudonym import Pseudonymiser
from tests.conftest import Gateway
from tests.sensors.conftest import sensors_url

NOW = datetime(2026, 11, 21, tzinfo=UTC)
PSEUDONYM = Pseudonymiser(b"fuzz-key-" * 4, 1)
TENANT = Tenant(id="fuzz", external_id_types={"$identity_member_id": "user_id"})

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
identity_keys = st.sampled_from(
    [
        "$identity_login_id",
        "$identity_anonymous_id",
        "$identity_cookie_id",
        "$identity_mp_id",
        "$identity_mp_openid",
        "$identity_mp_wx1234567890abcdef_openid",
        "$mp_openid",
        "$identity_mp_unionid",
        "$identity_android_id",
        "$identity_mobile",
        "$identity_email",
        "$identity_member_id",
    ]
) | st.text(max_size=12)
ids = st.sampled_from(["null", "0", "", " ", "13800138000", "a@b.co", "oOpenId12345678"]) | st.text(
    max_size=30
)
ids = ids | st.integers() | json_values
property_keys = st.sampled_from(
    ["$device_id", "$ip", "$app_id", "$share_distinct_id", "$is_login_id", "note"]
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["track", "track_signup", "track_id_bind", "track_id_unbind", "profile_set", "profile_unset"]
            + ["profile_delete", "item_set", "x"]
        )
        | json_values,
        "event": st.sampled_from(["$pageview", "Buy", "9lives", "", "$SignUp"]) | json_values,
        "time": st.integers() | st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "_flush_time": st.integers() | json_values,
        "_track_id": st.integers() | json_values,
        "distinct_id": ids,
        "login_id": ids,
        "anonymous_id": ids,
        "original_id": ids,
        "identities": st.dictionaries(identity_keys, ids, max_size=4) | json_values,
        "properties": st.dictionaries(property_keys | st.text(max_size=10), json_values, max_size=5)
        | json_values,
        "lib": json_values,
        "project": st.sampled_from(["shop", "mall"]) | json_values,
    },
)


def check_batch(payload: bytes, single: bool) -> None:
    try:
        batch = decode_events(
            payload, single=single, limits=Limits(), received_at=NOW, derive=PSEUDONYM, project="shop"
        )
    except InvalidRequest as exc:
        assert 400 <= exc.status < 500
        return
    assert len(batch.envelopes) + len(batch.rejected) == batch.received
    for env in batch.envelopes:
        assert env.event.message_id.startswith("sa-")
        # the stages that read the content after decoding take it too
        try:
            pseudonymise_identifiers(env, TENANT, PSEUDONYM)
        except RejectMessage:
            continue
        scrub_personal_data(env, TENANT, PSEUDONYM)
        msgspec.json.encode(env.event)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_like, max_size=4), st.booleans())
def test_event_decoder_only_rejects(events: list[dict], single: bool) -> None:
    check_batch(json.dumps(events[0] if single and events else events).encode(), single)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_event_decoder_takes_any_bytes(payload: bytes, single: bool) -> None:
    check_batch(payload, single)


forms = st.dictionaries(
    st.sampled_from(["data", "data_list", "gzip", "ext", "project", "token"]) | st.text(max_size=5),
    st.text(max_size=40)
    | st.lists(event_like, max_size=2).map(
        lambda e: base64.b64encode(gzip.compress(json.dumps(e).encode())).decode()
    )
    | st.sampled_from(["0", "1", "9", ""]),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(forms)
def test_transport_decoder_only_raises_4xx(form: dict[str, str]) -> None:
    try:
        payload, single = payload_json(form, limit=Limits().max_batch_bytes)
    except InvalidRequest as exc:
        assert 400 <= exc.status < 500
        return
    check_batch(payload, single)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_form_parser_only_raises_4xx(raw: bytes) -> None:
    try:
        form = parse_form(raw)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        forms.map(lambda f: urlencode(f).encode()),
        st.lists(event_like, max_size=3).map(
            lambda e: urlencode(
                {"data_list": base64.b64encode(gzip.compress(json.dumps(e).encode())), "gzip": 1}
            )
        ),
    ),
    st.sampled_from(["POST /sa", "POST /sa.gif", "GET /sa.gif"]),
)
def test_no_request_makes_a_500(gateway: Gateway, body: bytes | str, route: str) -> None:
    method, path = route.split()
    url = sensors_url(gateway, "shop", path)
    if method == "GET":
        raw = body if isinstance(body, bytes) else body.encode()
        r = httpx.get(url + "&" + quote_from_bytes(raw, safe="=&+%"), timeout=10)
    else:
        r = httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code < 500, r.text
    if r.headers["content-type"] != "image/gif":
        assert set(r.json()) >= ({"error", "detail", "field"} if r.status_code >= 400 else {"accepted"})
