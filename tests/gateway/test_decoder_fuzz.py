"""Property tests: no body makes the Segment decoder raise anything but a 4xx-mapped error."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Limits
from gateway.errors import InvalidRequest
from gateway.segment import decode_batch, decode_single

NOW = datetime(2026, 11, 21, tzinfo=UTC)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "x"]) | json_values,
        "userId": st.text(max_size=10) | st.integers() | json_values,
        "anonymousId": st.text(max_size=10) | st.none(),
        "event": st.text(max_size=10) | json_values,
        "timestamp": st.datetimes().map(lambda d: d.isoformat()) | json_values,
        "properties": json_values,
        "context": json_values,
        "previousId": json_values,
        "groupId": json_values,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=200)
    | st.lists(message_like, max_size=5).map(lambda b: json.dumps({"batch": b}).encode())
)
def test_batch_decoder_only_raises_invalid_request(body: bytes) -> None:
    try:
        events, rejected, count = decode_batch(body, limits=Limits(), received_at=NOW)
    except InvalidRequest as exc:
        assert 400 <= exc.status < 500
        return
    assert len(events) + len(rejected) == count
    assert all(e.event.user_id or e.event.anonymous_id for e in events)


@settings(max_examples=300)
@given(
    message_like.map(lambda m: json.dumps(m).encode()) | st.binary(max_size=100),
    st.sampled_from(["track", "identify", "page", "screen", "group", "alias"]),
)
def test_single_decoder_only_raises_invalid_request(body: bytes, kind: str) -> None:
    try:
        event = decode_single(body, kind, limits=Limits(), received_at=NOW)
    except InvalidRequest as exc:
        assert 400 <= exc.status < 500
        return
    assert event.type == kind
