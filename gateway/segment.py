"""Segment HTTP Tracking API adapter: decode ``/v1/batch`` and the single-message endpoints.

Messages are msgspec Structs (a tagged union on ``type``) decoded straight from the body.
A batch is decoded item by item from ``msgspec.Raw`` so one bad item is rejected alone and
the good ones go on. The output is the internal ``Event`` with raw identifiers still in it;
the pipeline pseudonymises them before anything is stored.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec

from gateway.config import Limits
from gateway.errors import InvalidRequest
from gateway.events import Envelope, Event, Rejection, RejectMessage

Id = str | int
# ISO 8601 / RFC 3339 (the JSON Schema says so; msgspec also accepts a time without offset, as UTC).
Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]


class _Message(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    message_id: str | None = None
    user_id: Id | None = None
    anonymous_id: Id | None = None
    timestamp: Timestamp | None = None
    sent_at: Timestamp | None = None
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    write_key: str | None = None


class Track(_Message, tag="track"):
    """Something the person did (`event`), with its properties. `userId` or `anonymousId` is required."""

    event: str
    properties: dict[str, Any] | None = None


class Identify(_Message, tag="identify"):
    """Who the person is: their identifiers and traits. `userId` or `anonymousId` is required."""

    traits: dict[str, Any] | None = None


class Page(_Message, tag="page"):
    """A page view on a website. `userId` or `anonymousId` is required."""

    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


class Screen(_Message, tag="screen"):
    """A screen view in an app. `userId` or `anonymousId` is required."""

    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


class Group(_Message, tag="group"):
    """The person belongs to a group (`groupId`, e.g. a company). `userId` or `anonymousId` is required."""

    group_id: Id
    traits: dict[str, Any] | None = None


class Alias(_Message, tag="alias"):
    """`previousId` and `userId` are the same person. `userId` is required."""

    previous_id: Id


SegmentMessage = Track | Identify | Page | Screen | Group | Alias
MESSAGE_TYPES: dict[str, type[_Message]] = {
    "track": Track,
    "identify": Identify,
    "page": Page,
    "screen": Screen,
    "group": Group,
    "alias": Alias,
}


class BatchEnvelope(msgspec.Struct, rename="camel", kw_only=True):
    """The body of POST /v1/batch: messages, and the context, integrations and sentAt they share."""

    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sent_at: Timestamp | None = None
    write_key: str | None = None


class WriteKeyOnly(msgspec.Struct, rename="camel"):
    write_key: str | None = None


_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def describe_decode_error(exc: Exception, prefix: str = "") -> tuple[str, str, str | None]:
    """Turn a msgspec error into (error code, readable detail, field path)."""
    text = str(exc)
    if isinstance(exc, RecursionError) or "recursion depth" in text:
        return "too_deep", "JSON nested too deeply", prefix.rstrip(".") or None
    if isinstance(exc, msgspec.ValidationError):
        m = _AT.search(text)
        detail = _AT.sub("", text)
        field: str | None = None
        if m:
            field = m.group(1)
        if (mm := _MISSING.search(text)) is not None:
            field = f"{field}.{mm.group(1)}" if field else mm.group(1)
        if field is not None:
            field = prefix + field
        elif prefix:
            field = prefix.rstrip(".")
        return "invalid_field", detail, field
    if isinstance(exc, UnicodeDecodeError) or "utf-8" in text.lower():
        return "invalid_encoding", "body is not valid UTF-8", prefix.rstrip(".") or None
    return "invalid_json", f"malformed JSON: {text}", prefix.rstrip(".") or None


_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)
T = TypeVar("T")


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a whole request body; any failure is a 400 naming the field."""
    try:
        return decoder.decode(body)
    except _DECODE_ERRORS as exc:
        error, detail, field = describe_decode_error(exc)
        raise InvalidRequest(error, detail, field) from None


_single_decoders = {name: msgspec.json.Decoder(t) for name, t in MESSAGE_TYPES.items()}
_union_decoder = msgspec.json.Decoder(SegmentMessage)
_batch_decoder = msgspec.json.Decoder(BatchEnvelope)
_write_key_decoder = msgspec.json.Decoder(WriteKeyOnly)


def body_write_key(body: bytes) -> str | None:
    """The ``writeKey`` field of a body, for clients that do not use HTTP Basic auth."""
    try:
        return _write_key_decoder.decode(body).write_key
    except _DECODE_ERRORS:
        return None


def may_nest_deeper(raw: bytes | msgspec.Raw, limit: int) -> bool:
    """Cheap upper bound: JSON cannot nest deeper than its number of opening brackets."""
    data = bytes(raw) if isinstance(raw, msgspec.Raw) else raw
    return data.count(b"{") + data.count(b"[") > limit


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return False


def _as_utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _id(value: Id | None) -> str | None:
    if value is None:
        return None
    return str(value)


def to_event(
    msg: _Message,
    *,
    received_at: datetime,
    limits: Limits,
    batch_context: dict[str, Any] | None = None,
    batch_integrations: dict[str, Any] | None = None,
    batch_sent_at: datetime | None = None,
    check_depth: bool = True,
) -> Event:
    """Validate one decoded message against the limits and build the internal Event."""
    context = msg.context
    if batch_context:
        context = {**batch_context, **(context or {})}
    integrations = msg.integrations
    if batch_integrations:
        integrations = {**batch_integrations, **(integrations or {})}
    properties = getattr(msg, "properties", None)
    traits = getattr(msg, "traits", None)
    if check_depth:
        for name, value in (("properties", properties), ("traits", traits), ("context", context)):
            if value is not None and _depth_exceeds(value, limits.max_property_depth):
                detail = f"{name} nested deeper than {limits.max_property_depth}"
                raise RejectMessage("too_deep", detail, name)

    user_id, anonymous_id = _id(msg.user_id), _id(msg.anonymous_id)
    if not user_id and not anonymous_id:
        raise RejectMessage("missing_identity", "userId or anonymousId is required", "userId")
    if isinstance(msg, Track) and not msg.event.strip():
        raise RejectMessage("invalid_field", "event must be a non-empty string", "event")
    if isinstance(msg, Alias) and not user_id:
        raise RejectMessage("missing_identity", "alias needs userId", "userId")

    # Clock-skew correction as Segment does it: the device clock may be wrong, but the
    # difference between its sentAt and its timestamp is right.
    original = _as_utc(msg.timestamp)
    sent_at = _as_utc(msg.sent_at or batch_sent_at)
    if original is not None and sent_at is not None:
        try:
            timestamp = received_at - (sent_at - original)
        except OverflowError:  # e.g. timestamp year 1 and sentAt year 9999: no real clock
            raise RejectMessage(
                "invalid_field",
                "timestamp and sentAt are too far apart to correct the device clock",
                "timestamp",
            ) from None
    else:
        timestamp = original or received_at

    return Event(
        type=msg.__struct_config__.tag,  # type: ignore[arg-type]
        message_id=msg.message_id or f"idgate-{uuid.uuid4()}",
        timestamp=timestamp,
        original_timestamp=original,
        sent_at=sent_at,
        received_at=received_at,
        user_id=user_id,
        anonymous_id=anonymous_id,
        previous_id=_id(getattr(msg, "previous_id", None)),
        group_id=_id(getattr(msg, "group_id", None)),
        event=getattr(msg, "event", None),
        name=getattr(msg, "name", None),
        category=getattr(msg, "category", None),
        properties=properties,
        traits=traits,
        context=context or {},
        integrations=integrations,
    )


def _message_id_hint(raw: bytes) -> str | None:
    m = re.search(rb'"messageId"\s*:\s*"([^"\\]{1,128})"', raw)
    return m.group(1).decode("utf-8", "replace") if m else None


def decode_batch(
    body: bytes, *, limits: Limits, received_at: datetime
) -> tuple[list[Envelope], list[Rejection], int]:
    """Decode a ``/v1/batch`` body; returns (envelopes, rejections, number of items)."""
    try:
        envelope = _batch_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        error, detail, field = describe_decode_error(exc)
        raise InvalidRequest(error, detail, field) from None
    if not envelope.batch:
        raise InvalidRequest("invalid_field", "batch must contain at least one message", "batch")
    if len(envelope.batch) > limits.max_batch_messages:
        raise InvalidRequest(
            "too_large", f"batch holds more than {limits.max_batch_messages} messages", "batch", status=413
        )
    batch_may_be_deep = envelope.context is not None and _depth_exceeds(
        envelope.context, limits.max_property_depth
    )
    events: list[Envelope] = []
    rejected: list[Rejection] = []
    for i, raw in enumerate(envelope.batch):
        prefix = f"batch[{i}]."
        if len(raw) > limits.max_message_bytes:
            rejected.append(
                Rejection(
                    i,
                    "too_large",
                    f"message exceeds {limits.max_message_bytes} bytes",
                    f"batch[{i}]",
                    _message_id_hint(bytes(raw)),
                )
            )
            continue
        try:
            msg = _union_decoder.decode(raw)
            event = to_event(
                msg,
                received_at=received_at,
                limits=limits,
                batch_context=envelope.context,
                batch_integrations=envelope.integrations,
                batch_sent_at=envelope.sent_at,
                # The batch context is merged in: count its brackets too.
                check_depth=batch_may_be_deep or may_nest_deeper(raw, limits.max_property_depth),
            )
        except RejectMessage as exc:
            field = prefix + exc.field if exc.field else None
            rejected.append(Rejection(i, exc.error, exc.detail, field, _message_id_hint(bytes(raw))))
            continue
        except _DECODE_ERRORS as exc:
            error, detail, field = describe_decode_error(exc, prefix)
            rejected.append(Rejection(i, error, detail, field, _message_id_hint(bytes(raw))))
            continue
        events.append(Envelope(event, i))
    return events, rejected, len(envelope.batch)


def decode_single(body: bytes, message_type: str, *, limits: Limits, received_at: datetime) -> Event:
    """Decode the body of ``/v1/<type>``; raise InvalidRequest naming the field."""
    if len(body) > limits.max_message_bytes:
        raise InvalidRequest(
            "too_large", f"message exceeds {limits.max_message_bytes} bytes", None, status=413
        )
    try:
        msg = _single_decoders[message_type].decode(body)
        return to_event(
            msg,
            received_at=received_at,
            limits=limits,
            check_depth=may_nest_deeper(body, limits.max_property_depth),
        )
    except RejectMessage as exc:
        raise InvalidRequest(exc.error, exc.detail, exc.field) from None
    except _DECODE_ERRORS as exc:
        error, detail, field = describe_decode_error(exc)
        raise InvalidRequest(error, detail, field) from None
