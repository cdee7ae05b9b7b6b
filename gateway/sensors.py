"""Sensors Data protocol adapter: decode what Sensors SDKs send to ``/sa`` and ``/sa.gif``.

The transport: a form (``data=`` one event, ``data_list=`` a JSON array) in the body or the
query string, each value base64 of JSON or, with ``gzip=1``, base64 of gzipped JSON
(``gzip=9`` is Sensors' encryption plugin, which needs Sensors' private key: refused). The
events: ``track``, ``track_signup``, ``track_id_bind``, ``track_id_unbind``, the
``profile_*`` calls and the ``item_*`` calls, with ``distinct_id``, ``login_id``,
``anonymous_id``, ``original_id`` and ID-Mapping 3.0 ``identities``.

Each event becomes the internal ``Event`` the Segment adapter produces, so consent, identity,
scrubbing and delivery treat both protocols alike:

- track-like types (``track``, ``track_signup``, ``track_id_bind``, ``track_id_unbind``) are
  ``track`` events named as in Sensors (``$SignUp``, ``$BindID``, ``$UnbindID``, ...); the
  ``profile_*`` calls are ``identify`` calls whose traits are the profile properties; the
  Sensors type is kept in ``context.sensors.type``;
- the login id is ``userId``; the anonymous id (``$identity_anonymous_id``,
  ``$identity_cookie_id``, ``$identity_mp_id``) is ``anonymousId``; the other identities go
  to ``context.externalIds`` typed as idgate identifier types (a WeChat openid scoped by its
  mini-program appid), where the pipeline pseudonymises them and links the identifiers of
  one event (``track_signup`` and ``track_id_bind`` are such events);
- ``track_id_unbind`` names identifiers to detach from their person: they travel raw in
  the envelope (``Envelope.unbind``); the pipeline pseudonymises them and detaches them;
- Sensors events carry no message id: one is derived (keyed, so it reveals nothing) from
  ``_track_id``, ``distinct_id``, ``time``, the type and the event name, or from the whole
  event when an SDK sends no ``_track_id``; ``_flush_time`` corrects the device clock;
- ``item_*`` records describe catalogue items, not people: there is no subject to ask
  consent of or to resolve, so they are rejected one by one (``unsupported_type``).

Keys and limits follow Sensors: names ``^[a-zA-Z_$][a-zA-Z\\d_$]{0,99}$`` minus the reserved
ones, ids at most 255 characters, string values at most 8192. A bad event is rejected alone
and the others go on; no input raises anything but ``InvalidRequest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from gateway.config import Limits
from gateway.errors import InvalidRequest
from gateway.events import Envelope, Event, RawIdentifier, Rejection, RejectMessage
from gateway.segment import describe_decode_error

Id = str | int
# The tenant's keyed derivation, for message ids only (they must reveal nothing).
Derive = Callable[[str], str]

# Sensors' rules for event names, property keys and identity keys (sa-sdk NAME_PATTERN).
NAME = re.compile(r"^[a-zA-Z_$][a-zA-Z\d_$]{0,99}$")
RESERVED_NAME = re.compile(
    r"^(?:distinct_id|original_id|time|properties|id|first_id|second_id|users|events|event|event_id"
    r"|device_id|user_id|date|datetime)$|^(?:user_group|user_tag)",
    re.IGNORECASE,
)
MAX_ID_LENGTH = 255
MAX_STRING_LENGTH = 8192
MAX_FORM_FIELDS = 32

TRACK_TYPES = {
    "track": None,
    "track_signup": "$SignUp",
    "track_id_bind": "$BindID",
    "track_id_unbind": "$UnbindID",
}
PROFILE_TYPES = frozenset(
    {
        "profile_set",
        "profile_set_once",
        "profile_unset",
        "profile_increment",
        "profile_append",
        "profile_delete",
    }
)
ITEM_TYPES = frozenset({"item_set", "item_delete"})

LOGIN_KEY = "$identity_login_id"
# Per-install ids of the SDKs: the web cookie, the mini-program's generated id, the App's
# anonymous id. The first one present is the event's anonymousId.
ANONYMOUS_KEYS = ("$identity_anonymous_id", "$identity_cookie_id", "$identity_mp_id")
IDENTITY_TYPES = {
    LOGIN_KEY: "user_id",
    **{key: "anonymous_id" for key in ANONYMOUS_KEYS},
    "$identity_mp_unionid": "wechat_unionid",
    "$identity_android_id": "android_id",
    "$identity_android_oaid": "oaid",
    "$identity_oaid": "oaid",
    "$identity_idfv": "idfv",
    "$identity_ios_idfv": "idfv",
    "$identity_idfa": "idfa",
    "$identity_mobile": "phone",
    "$identity_email": "email",
}
# "$identity_mp_openid" (appid from the properties) or "$identity_mp_<appid>_openid".
_OPENID_KEY = re.compile(r"^\$identity_mp_(?:(?P<appid>[A-Za-z0-9]+)_)?openid$")


class SensorsEvent(msgspec.Struct, kw_only=True):
    """One Sensors record as SDKs send it (unknown fields are ignored, like Sensors does)."""

    type: str
    event: str | None = None
    time: int | float | None = None
    distinct_id: Id | None = None
    login_id: Id | None = None
    anonymous_id: Id | None = None
    original_id: Id | None = None
    identities: dict[str, Id] | None = None
    lib: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    project: str | None = None
    item_type: str | None = None
    item_id: Id | None = None
    track_id: int | str | None = msgspec.field(default=None, name="_track_id")
    flush_time: int | float | None = msgspec.field(default=None, name="_flush_time")


_event_decoder = msgspec.json.Decoder(SensorsEvent)
_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


@dataclass
class SensorsBatch:
    """What one request decoded to."""

    envelopes: list[Envelope]
    rejected: list[Rejection]
    received: int
    # Indexes of the track_id_unbind events (their envelopes carry what to detach).
    unbind: list[int] = field(default_factory=list)


# -- transport --------------------------------------------------------------------------------
def parse_form(raw: bytes) -> dict[str, str]:
    """A form body or query string as a dict (first value wins); 400 when it is not one."""
    try:
        text = raw.decode("utf-8", "replace")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:
        raise InvalidRequest("invalid_request", f"more than {MAX_FORM_FIELDS} form fields", None) from None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def _unbase64(value: str, name: str) -> bytes:
    # Form decoding turns an unescaped "+" into a space; some senders use the URL-safe
    # alphabet or drop the padding.
    text = value.strip().replace(" ", "+").replace("-", "+").replace("_", "/")
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("invalid_encoding", f"{name} is not base64", name) from None


def payload_json(form: dict[str, str], *, limit: int) -> tuple[bytes, bool]:
    """The JSON carried by ``data`` or ``data_list`` (and whether it was ``data``).

    Raises InvalidRequest: 400 without either field or for bad base64/gzip, 415 for the
    encryption plugin's ``gzip=9``, 413 when the JSON is larger than ``limit``."""
    name = "data_list" if "data_list" in form else "data"
    value = form.get(name)
    if value is None or not value.strip():
        raise InvalidRequest("invalid_request", "send the events as data= or data_list=", "data_list")
    gzip_flag = form.get("gzip", "0").strip() or "0"
    if gzip_flag == "9":
        raise InvalidRequest(
            "unsupported_media_type",
            "encrypted payloads (gzip=9) need Sensors' private key: disable the SDK's "
            "encryption plugin for idgate",
            "gzip",
            415,
        )
    if gzip_flag not in ("0", "1"):
        raise InvalidRequest("invalid_field", "gzip must be 0 or 1", "gzip")
    stripped = value.lstrip()
    if gzip_flag == "0" and stripped[:1] in ("{", "["):
        raw = stripped.encode("utf-8", "surrogatepass")  # plain JSON, as some senders post it
    else:
        raw = _unbase64(value, name)
        if gzip_flag == "1":
            try:
                inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header
                inflated = inflater.decompress(raw, limit + 1)
            except zlib.error:
                raise InvalidRequest("invalid_encoding", f"{name} is not valid gzip", name) from None
            if len(inflated) > limit or inflater.unconsumed_tail:
                raise InvalidRequest("too_large", f"decompressed {name} exceeds {limit} bytes", name, 413)
            if not inflater.eof:
                raise InvalidRequest("invalid_encoding", f"the gzip data of {name} is truncated", name)
            if inflater.unused_data:
                raise InvalidRequest(
                    "invalid_encoding",
                    f"data after the end of the gzip data of {name} (one member only)",
                    name,
                )
            raw = inflated
    if len(raw) > limit:
        raise InvalidRequest("too_large", f"{name} exceeds {limit} bytes", name, 413)
    return raw, name == "data"


# -- events -----------------------------------------------------------------------------------
def _check_name(value: str, what: str, where: str) -> None:
    if not NAME.match(value) or RESERVED_NAME.match(value):
        raise RejectMessage(
            "invalid_name",
            f"{what} must match ^[a-zA-Z_$][a-zA-Z\\d_$]{{0,99}}$ and not be a reserved name",
            where,
        )


def _check_id(value: Id | None, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # msgspec does not give bools for int, but be sure
        raise RejectMessage("invalid_field", "an id must be a string or an integer", where)
    text = str(value)
    if not text.strip():
        raise RejectMessage("invalid_field", "an id must not be empty", where)
    if len(text) > MAX_ID_LENGTH:
        raise RejectMessage("invalid_field", f"longer than {MAX_ID_LENGTH} characters", where)
    return text


def _check_properties(props: dict[str, Any], where: str) -> None:
    for key, value in props.items():
        _check_name(key, "a property key", f"{where}.{key}" if NAME.match(key) else where)
        if isinstance(value, str):
            if len(value) > MAX_STRING_LENGTH:
                raise RejectMessage(
                    "invalid_field", f"longer than {MAX_STRING_LENGTH} characters", f"{where}.{key}"
                )
        elif isinstance(value, list):
            if any(isinstance(v, dict | list) for v in value):
                raise RejectMessage("invalid_field", "a list property holds strings", f"{where}.{key}")
            if any(isinstance(v, str) and len(v) > MAX_STRING_LENGTH for v in value):
                raise RejectMessage(
                    "invalid_field",
                    f"an item is longer than {MAX_STRING_LENGTH} characters",
                    f"{where}.{key}",
                )
        elif isinstance(value, dict):
            raise RejectMessage(
                "invalid_field", "property values are strings, numbers, booleans or lists", f"{where}.{key}"
            )


def _timestamp_ms(value: int | float, where: str) -> int:
    ms = int(value)
    digits = len(str(abs(ms)))
    if ms <= 0 or digits < 10 or digits > 13:
        raise RejectMessage("invalid_field", "time is milliseconds since the epoch", where)
    return ms * 1000 if digits == 10 else ms


def _from_ms(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


@dataclass(slots=True)
class _Subject:
    user_id: str | None = None
    anonymous_id: str | None = None
    external: list[dict[str, Any]] = field(default_factory=list)
    # (idgate type, raw value, appid scope, Sensors key) of every identity
    identities: list[tuple[str | None, str, str | None, str]] = field(default_factory=list)


def _identity_type(key: str, appid: str | None) -> tuple[str | None, str | None]:
    """idgate type and scope of a Sensors identity key; (None, None) for an unknown key."""
    if key.startswith("$mp_"):  # the pre-3.0 spelling the mini-program SDK migrates
        key = "$identity_" + key[1:]
    id_type = IDENTITY_TYPES.get(key)
    if id_type is not None:
        return id_type, None
    m = _OPENID_KEY.match(key)
    if m is not None:
        scope = m.group("appid") or appid
        # An openid is only unique inside its mini-program: without the appid it is kept
        # (pseudonymised) but never linked.
        return ("wechat_openid", scope) if scope else (None, None)
    return None, None


def _subject(ev: SensorsEvent, ids: dict[str, str], appid: str | None, where: str) -> _Subject:
    s = _Subject()
    for key, value in (ev.identities or {}).items():
        _check_name(key, "an identity key", f"{where}identities")
        text = _check_id(value, f"{where}identities.{key}")
        assert text is not None
        id_type, scope = _identity_type(key, appid)
        s.identities.append((id_type, text, scope, key))
    login = ids.get("login_id")
    anonymous = ids.get("anonymous_id")
    distinct = ids.get("distinct_id")
    for id_type, text, _, _ in s.identities:
        if id_type == "user_id" and login is None:
            login = text
    if anonymous is None:
        for key in ANONYMOUS_KEYS:
            found = next((v for t, v, _, k in s.identities if k == key), None)
            if found is not None:
                anonymous = found
                break
    if ev.type == "track_signup":
        login = login or distinct
        anonymous = anonymous or ids.get("original_id")
    elif login is None and (ev.properties or {}).get("$is_login_id") is True:
        login = distinct  # the server SDKs' track(distinct_id, is_login_id=True)
    if login is None and anonymous is None:
        anonymous = distinct  # pre-3.0 SDKs, or only other identities ("$identity_mobile+...")
    s.user_id, s.anonymous_id = login, anonymous
    for id_type, value, scope, key in s.identities:
        if (id_type == "user_id" and value == login) or (id_type == "anonymous_id" and value == anonymous):
            continue
        item: dict[str, Any] = {"id": value, "type": id_type or key, "collection": "users", "sensorsKey": key}
        if scope:
            item["appid"] = scope
        s.external.append(item)
    return s


def _unbind_identifiers(s: _Subject) -> list[RawIdentifier]:
    return [RawIdentifier(t, value, scope) for t, value, scope, _ in s.identities if t is not None]


def derive_message_id(ev: SensorsEvent, raw: bytes, derive: Derive) -> str:
    """A stable id for dedupe: the same event sent twice gets the same one; keyed, so it
    reveals nothing about the distinct id in it."""
    if ev.track_id is not None:
        basis = f"{ev.type}\x1f{ev.event}\x1f{ev.distinct_id}\x1f{ev.time}\x1f{ev.track_id}"
    else:  # server SDKs send no _track_id: the event itself (a retry sends the same bytes)
        basis = f"{ev.type}\x1fraw\x1f{hashlib.sha256(raw).hexdigest()}"
    return "sa-" + derive(basis)


def to_event(
    ev: SensorsEvent,
    *,
    message_id: str,
    received_at: datetime,
    project: str,
    where: str = "",
) -> tuple[Event, list[RawIdentifier]]:
    """Validate one record and build the internal Event (and, for an unbind, the
    identifiers to detach). Raises RejectMessage naming the field."""
    kind = ev.type
    if kind in ITEM_TYPES:
        raise RejectMessage(
            "unsupported_type",
            "item records describe catalogue items, not people: idgate forwards personal event data only",
            f"{where}type",
        )
    if kind not in TRACK_TYPES and kind not in PROFILE_TYPES:
        raise RejectMessage("invalid_field", f"unknown Sensors type {kind[:40]!r}", f"{where}type")
    if ev.project is not None and project and ev.project != project:
        raise RejectMessage(
            "wrong_project", "the event names another project than its token", f"{where}project"
        )
    name = None
    if kind in TRACK_TYPES:
        name = ev.event or TRACK_TYPES[kind]
        if not name:
            raise RejectMessage("invalid_field", "a track event needs event", f"{where}event")
        _check_name(name, "event", f"{where}event")
    properties = ev.properties or {}
    _check_properties(properties, f"{where}properties")  # flat: nothing nests
    ids: dict[str, str] = {}
    for attr in ("distinct_id", "login_id", "anonymous_id", "original_id"):
        value = _check_id(getattr(ev, attr), f"{where}{attr}")
        if value is not None:
            ids[attr] = value
    if kind == "track_signup" and "original_id" not in ids:
        raise RejectMessage("invalid_field", "track_signup needs original_id", f"{where}original_id")
    appid = properties.get("$app_id") or (ev.lib or {}).get("$app_id")
    subject = _subject(ev, ids, str(appid) if isinstance(appid, str | int) and appid else None, where)
    unbind: list[RawIdentifier] = []
    if kind == "track_id_unbind":
        if not subject.identities:
            raise RejectMessage(
                "invalid_field", "track_id_unbind names the identity to unbind", f"{where}identities"
            )
        # The event is about the person of distinct_id; the identities are only detached.
        unbind = _unbind_identifiers(subject)
        distinct = ids.get("distinct_id")
        logins = {v for t, v, _, _ in subject.identities if t == "user_id"}
        subject = _Subject(
            user_id=distinct if distinct in logins else None,
            anonymous_id=distinct if distinct not in logins else None,
        )
    if subject.user_id is None and subject.anonymous_id is None:
        raise RejectMessage(
            "missing_identity", "distinct_id or identities is required", f"{where}distinct_id"
        )

    original = _from_ms(_timestamp_ms(ev.time, f"{where}time")) if ev.time is not None else None
    sent_at = _from_ms(_timestamp_ms(ev.flush_time, f"{where}_flush_time")) if ev.flush_time else None
    # Clock-skew correction: the device clock may be wrong, but the time between the event
    # and its flush is right.
    if original is not None and sent_at is not None:
        timestamp = received_at - (sent_at - original)
    else:
        timestamp = original or received_at

    lib = {k: v for k, v in (ev.lib or {}).items() if isinstance(v, str | int | float | bool)}
    context: dict[str, Any] = {"sensors": {"type": kind, "lib": lib}}
    if isinstance(lib.get("$lib"), str):
        context["library"] = {"name": lib["$lib"], "version": str(lib.get("$lib_version", ""))}
    if project:
        context["sensors"]["project"] = project
    if subject.external:
        context["externalIds"] = subject.external
    if "$ip" in properties:  # the pipeline truncates context.ip
        properties = dict(properties)
        context["ip"] = str(properties.pop("$ip"))
    device_id = (ev.properties or {}).get("$device_id")
    if isinstance(device_id, str | int) and not isinstance(device_id, bool):
        context["device"] = {"id": str(device_id)}

    is_track = kind in TRACK_TYPES
    return (
        Event(
            type="track" if is_track else "identify",
            message_id=message_id,
            timestamp=timestamp,
            original_timestamp=original,
            sent_at=sent_at,
            received_at=received_at,
            user_id=subject.user_id,
            anonymous_id=subject.anonymous_id,
            event=name,
            properties=properties if is_track else None,
            traits=None if is_track else properties,
            context=context,
        ),
        unbind,
    )


def decode_events(
    payload: bytes,
    *,
    single: bool,
    limits: Limits,
    received_at: datetime,
    derive: Derive,
    project: str = "",
) -> SensorsBatch:
    """Decode the JSON of ``data`` (one event, or a list) or ``data_list`` (a list).

    Each event is accepted or rejected on its own; InvalidRequest when the JSON as a whole
    is unusable."""
    name = "data" if single else "data_list"
    stripped = payload.lstrip()
    if stripped[:1] == b"{":
        items: list[bytes | msgspec.Raw] = [payload]
        prefix: Callable[[int], str] = (lambda i: "data.") if single else (lambda i: "data_list[0].")
    else:
        try:
            items = list(_list_decoder.decode(payload))
        except _DECODE_ERRORS as exc:
            error, detail, field_name = describe_decode_error(exc)
            raise InvalidRequest(
                error, detail, name if field_name is None else f"{name}.{field_name}"
            ) from None
        prefix = lambda i: f"{name}[{i}]."  # noqa: E731
        if not items:
            raise InvalidRequest("invalid_field", f"{name} must hold at least one event", name)
    if len(items) > limits.max_batch_messages:
        raise InvalidRequest(
            "too_large", f"{name} holds more than {limits.max_batch_messages} events", name, 413
        )
    batch = SensorsBatch([], [], len(items))
    for i, item in enumerate(items):
        raw = bytes(item) if isinstance(item, msgspec.Raw) else item
        where = prefix(i)
        if len(raw) > limits.max_message_bytes:
            batch.rejected.append(
                Rejection(
                    i, "too_large", f"event exceeds {limits.max_message_bytes} bytes", where.rstrip(".")
                )
            )
            continue
        mid: str | None = None
        try:
            ev = _event_decoder.decode(raw)
            mid = derive_message_id(ev, raw, derive)
            event, unbind = to_event(
                ev, message_id=mid, received_at=received_at, project=project, where=where
            )
        except RejectMessage as exc:
            batch.rejected.append(Rejection(i, exc.error, exc.detail, exc.field, mid))
            continue
        except _DECODE_ERRORS as exc:
            error, detail, field_name = describe_decode_error(exc, where)
            # msgspec writes a dict key it does not name as "[...]"
            field_name = field_name.replace("[...]", "") if field_name else field_name
            batch.rejected.append(Rejection(i, error, detail, field_name, mid))
            continue
        batch.envelopes.append(Envelope(event, i, unbind=unbind))
        if unbind:
            batch.unbind.append(i)
    return batch
