"""HTTP sinks: a JSON webhook, Segment-compatible ``/v1/batch`` and the Sensors Data receiver.

What they guarantee: at-least-once delivery with the message id in every record, so the
receiver can drop redeliveries (a retried write resends the whole batch):

* ``webhook``: ``POST url`` with ``{"batch": [event, ...]}``, the cleaned events as stored
  (each with its ``messageId``), and an ``Idempotency-Key`` header derived from the
  destination and the batch's message ids (the same batch sent again has the same key; a
  batch cut differently after a crash has another, so receivers should dedupe per event).
* ``segment``: ``POST <url>/v1/batch`` (basic auth ``write_key:``) with
  ``{"batch": [...], "sentAt": ...}``, each call keeping its ``messageId``; the unified ID
  is the ``userId`` (the pseudonymous ``userId`` / ``anonymousId`` stay in
  ``context.idgate``); identity notices become calls: merged -> ``alias`` (previousId =
  merged, userId = survivor), split -> track "idgate Identity Split", deleted -> track
  "idgate Identity Deleted". A batch is cut into requests under ``max_request_bytes``.
* ``sensors``: the Sensors Analytics receiver protocol, ``POST url`` with the form
  ``data_list=<base64 of gzip JSON array>&gzip=1``, ``events_per_request`` events per
  request. Events become Sensors records (track / profile_set / track_signup,
  ``distinct_id`` = unified ID, ``time`` in ms, ``_track_id`` = a stable 31-bit hash of the
  message id, the message id itself in property ``idgate_message_id``); notices: merged ->
  ``track_signup`` (original_id = merged), split / deleted -> track events.

The requests of one write go out one after another in outbox order, so a receiver sees each
person's events in order. One ``httpx.AsyncClient`` per sink is kept open across batches.

Errors: timeouts, connection errors, 408, 425, 429 and 5xx are retryable; so are 401, 403,
404, 405, 407 and redirects (not followed), which refuse the destination's credentials or
URL rather than the records: bisecting the batch into the dead-letter store would not help,
fixing the configuration does. Any other 4xx is permanent: the receiver refused these
records. Error messages hold the status, the host and the error class, never a payload,
a URL path or query (they may hold tokens) or a response body.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import msgspec

from export.outbox import StoredRecord
from export.sink import (
    Option,
    PermanentSinkError,
    RetryableSinkError,
    check_options,
    message_id_of,
    non_empty,
    number_check,
    safe_location,
    url_check,
    with_defaults,
)
from identity.notices import (
    ConsentWithdrawn,
    IdentityMerged,
    IdentityRekeyed,
    IdentitySplit,
    Notice,
    decode_notice,
)

try:
    IDGATE_VERSION = metadata.version("idgate")
except metadata.PackageNotFoundError:  # running from a source tree
    IDGATE_VERSION = "0"
USER_AGENT = f"idgate/{IDGATE_VERSION}"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

# -- options ---------------------------------------------------------------------------------
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_HEADERS = {"content-type", "content-length", "host", "idempotency-key", "transfer-encoding"}


def _header_table(value: Any) -> str | None:
    for name, header_value in value.items():
        if not _HEADER_NAME.match(name):
            return f"{name!r} is not a valid header name"
        if name.lower() in _RESERVED_HEADERS:
            return f"{name!r} is set by the sink"
        if not isinstance(header_value, str) or "\r" in header_value or "\n" in header_value:
            return f"the value of {name!r} must be a string on one line"
    return None


def _header_env_table(value: Any) -> str | None:
    for name, variable in value.items():
        if not _HEADER_NAME.match(name):
            return f"{name!r} is not a valid header name"
        if name.lower() in _RESERVED_HEADERS:
            return f"{name!r} is set by the sink"
        if not isinstance(variable, str) or not _ENV_NAME.match(variable):
            return f"the value of {name!r} must name an environment variable"
    return None


def _sensors_project(value: Any) -> str | None:
    return None if _SENSORS_VALID.match(value) else "must be a Sensors project name (letters, digits, _)"


_URL = url_check("http", "https")
_TIMEOUT = Option((int, float), "seconds per request", default=10, check=number_check(0.05, 300))

HTTP_OPTIONS: dict[str, dict[str, Option]] = {
    "webhook": {
        "url": Option((str,), "where batches are POSTed", required=True, check=_URL),
        "timeout_seconds": _TIMEOUT,
        "headers": Option((dict,), "extra request headers", default={}, check=_header_table),
        "headers_env": Option(
            (dict,),
            "header -> environment variable holding its value (secrets)",
            default={},
            check=_header_env_table,
        ),
    },
    "segment": {
        "url": Option((str,), "base URL; /v1/batch is appended", required=True, check=_URL),
        "write_key": Option((str,), "the receiver's write key", check=non_empty),
        "write_key_env": Option((str,), "environment variable holding the write key", check=non_empty),
        "timeout_seconds": _TIMEOUT,
        "max_request_bytes": Option(
            (int,), "largest request body", default=500_000, check=number_check(1_000, 50_000_000)
        ),
    },
    "sensors": {
        "url": Option(
            (str,), "the receiver, e.g. http://host:8106/sa?project=default", required=True, check=_URL
        ),
        "timeout_seconds": _TIMEOUT,
        "project": Option((str,), "Sensors project of every record", check=_sensors_project),
        "events_per_request": Option((int,), "events per request", default=50, check=number_check(1, 1000)),
    },
}


def validate_http_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = check_options(kind, options, HTTP_OPTIONS[kind])
    if kind == "segment":
        given = [name for name in ("write_key", "write_key_env") if name in options]
        if not given:
            problems.append(("write_key", "required by the segment sink (or write_key_env)"))
        elif len(given) == 2:
            problems.append(("write_key_env", "give write_key or write_key_env, not both"))
    return problems


def _from_env(option: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"{option}: environment variable {variable} is not set")
    return value


def build_http_sink(kind: str, *, destination: str, options: Mapping[str, Any]) -> HttpSink:
    opts = with_defaults(options, HTTP_OPTIONS[kind])
    timeout = float(opts["timeout_seconds"])
    if kind == "webhook":
        headers = dict(opts["headers"])
        for name, variable in opts["headers_env"].items():
            headers[name] = _from_env(f"headers_env.{name}", variable)
        return WebhookSink(destination, opts["url"], timeout_seconds=timeout, headers=headers)
    if kind == "segment":
        write_key = opts["write_key"] or _from_env("write_key_env", opts["write_key_env"])
        return SegmentSink(
            destination,
            opts["url"],
            write_key=write_key,
            timeout_seconds=timeout,
            max_request_bytes=opts["max_request_bytes"],
        )
    if kind == "sensors":
        return SensorsSink(
            destination,
            opts["url"],
            timeout_seconds=timeout,
            project=opts["project"],
            events_per_request=opts["events_per_request"],
        )
    raise ValueError(f"not an HTTP sink kind: {kind!r}")


# -- transport -------------------------------------------------------------------------------
_CONFIGURATION_REFUSED = {
    401: "credentials",
    403: "credentials",
    407: "proxy credentials",
    404: "URL",
    405: "URL",
}
_RETRYABLE_4XX = {408, 425, 429}


def raise_for_status(kind: str, destination: str, where: str, status: int) -> None:
    """Map an HTTP answer to success, a retryable or a permanent sink error."""
    if 200 <= status < 300:
        return
    prefix = f"{kind} sink {destination}: HTTP {status} from {where}"
    if status in _CONFIGURATION_REFUSED:
        refused = _CONFIGURATION_REFUSED[status]
        raise RetryableSinkError(f"{prefix}: the receiver refused the destination's {refused}")
    if 300 <= status < 400:
        raise RetryableSinkError(f"{prefix}: redirects are not followed, check the destination's URL")
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise PermanentSinkError(f"{prefix}: the receiver refused the records")
    raise RetryableSinkError(prefix)


class HttpSink:
    """POSTs each write's requests in order over one kept-open client."""

    kind: ClassVar[str] = "http"

    def __init__(
        self, destination: str, url: str, *, timeout_seconds: float, headers: Mapping[str, str]
    ) -> None:
        self.destination = destination
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.requests = 0
        self._headers = {"User-Agent": USER_AGENT, **headers}
        self._where = safe_location(url)
        self._client: httpx.AsyncClient | None = None

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        """Each kind turns the records into its receiver's requests."""
        raise NotImplementedError

    async def recover(self, committed: Mapping[str, int]) -> int:
        return 0  # nothing local to cut back; the receiver dedupes by message id

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on first use, inside the event loop that uses it
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_seconds),
                headers=self._headers,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            )
        return self._client

    async def _post(self, content: bytes, headers: Mapping[str, str]) -> None:
        self.requests += 1
        try:
            response = await self._http().post(self.url, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise RetryableSinkError(
                f"{self.kind} sink {self.destination}: {type(exc).__name__} after "
                f"{self.timeout_seconds:g}s from {self._where}"
            ) from exc
        except httpx.HTTPError as exc:
            raise RetryableSinkError(
                f"{self.kind} sink {self.destination}: {type(exc).__name__} talking to {self._where}"
            ) from exc
        raise_for_status(self.kind, self.destination, self._where, response.status_code)

    def _decode(self, record: StoredRecord) -> dict[str, Any]:
        try:
            event = _decoder.decode(record.payload)
        except msgspec.DecodeError:
            event = None
        if not isinstance(event, dict):
            raise PermanentSinkError(
                f"{self.kind} sink {self.destination}: outbox record {record.seq} is not a JSON object"
            )
        return event


# -- webhook ---------------------------------------------------------------------------------
def idempotency_key(destination: str, message_ids: Sequence[str]) -> str:
    """The same destination and batch of message ids always give the same key."""
    digest = hashlib.blake2b(digest_size=16, person=b"idgate-webhook")
    digest.update(destination.encode())
    for message_id in message_ids:
        digest.update(b"\x1f" + message_id.encode())
    return digest.hexdigest()


class WebhookSink(HttpSink):
    kind = "webhook"

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        if not records:
            return {}
        # The stored payloads are JSON already: joined, not decoded and encoded again.
        body = b'{"batch":[' + b",".join(r.payload for r in records) + b"]}"
        key = idempotency_key(self.destination, [message_id_of(r) for r in records])
        await self._post(body, {"Content-Type": "application/json", "Idempotency-Key": key})
        return {}


# -- Segment ---------------------------------------------------------------------------------
SPLIT_EVENT = "idgate Identity Split"
DELETED_EVENT = "idgate Identity Deleted"
REKEYED_EVENT = "idgate Identity Rekeyed"
WITHDRAWN_EVENT = "idgate Consent Withdrawn"
NOTICE_EVENT = "idgate Identity Notice"


def segment_notice(notice: Notice, message_id: str) -> dict[str, Any]:
    """The Segment call for an identity notice."""
    base: dict[str, Any] = {
        "messageId": message_id,
        "timestamp": notice.received_at.isoformat(),
        "context": msgspec.to_builtins(notice.context),
    }
    if isinstance(notice, IdentityMerged):
        return {**base, "type": "alias", "previousId": notice.merged, "userId": notice.survivor}
    if isinstance(notice, IdentitySplit):
        properties = {"previous": notice.previous, "parts": list(notice.parts)}
        return {
            **base,
            "type": "track",
            "event": SPLIT_EVENT,
            "userId": notice.previous,
            "properties": properties,
        }
    if isinstance(notice, IdentityRekeyed):
        return {
            **base,
            "type": "track",
            "event": REKEYED_EVENT,
            "userId": notice.unified_id,
            "properties": {
                "unifiedId": notice.unified_id,
                "oldIdentifier": msgspec.to_builtins(notice.old_identifier),
                "newIdentifier": msgspec.to_builtins(notice.new_identifier),
            },
        }
    if isinstance(notice, ConsentWithdrawn):
        return {
            **base,
            "type": "track",
            "event": WITHDRAWN_EVENT,
            "userId": notice.unified_id,
            "properties": {
                "unifiedId": notice.unified_id,
                "purposes": list(notice.purposes),
                "ledgerSeqs": list(notice.ledger_seqs),
            },
        }
    properties = {"unifiedId": notice.unified_id}
    return {
        **base,
        "type": "track",
        "event": DELETED_EVENT,
        "userId": notice.unified_id,
        "properties": properties,
    }


def segment_message(event: Mapping[str, Any], message_id: str) -> dict[str, Any]:
    """The Segment call sent for one cleaned event."""
    message = dict(event)
    message["messageId"] = message_id
    context = dict(message.get("context") or {})
    unified_id = context.get("unified_id")
    if unified_id:
        idgate = dict(context.get("idgate") or {})
        for field in ("userId", "anonymousId"):
            if message.get(field):
                idgate[field] = message[field]
        context["idgate"] = idgate
        message["context"] = context
        message["userId"] = unified_id
    return message


def segment_batch_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1/batch") else f"{url}/v1/batch"


def _chunks_by_size(items: Sequence[bytes], limit: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for item in items:
        if chunk and size + len(item) + 1 > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        yield chunk


class SegmentSink(HttpSink):
    kind = "segment"

    def __init__(
        self,
        destination: str,
        url: str,
        *,
        write_key: str,
        timeout_seconds: float,
        max_request_bytes: int = 500_000,
    ) -> None:
        auth = base64.b64encode(f"{write_key}:".encode()).decode()
        super().__init__(
            destination,
            segment_batch_url(url),
            timeout_seconds=timeout_seconds,
            headers={"Authorization": f"Basic {auth}"},
        )
        self.max_request_bytes = max_request_bytes

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        messages = [
            _encoder.encode(
                segment_notice(decode_notice(r.payload), message_id_of(r))
                if r.kind == "notice"
                else segment_message(self._decode(r), message_id_of(r))
            )
            for r in records
        ]
        # room for the envelope and sentAt
        for chunk in _chunks_by_size(messages, self.max_request_bytes - 80):
            sent_at = datetime.now(UTC).isoformat(timespec="milliseconds").encode()
            body = b'{"batch":[' + b",".join(chunk) + b'],"sentAt":"' + sent_at + b'"}'
            await self._post(body, {"Content-Type": "application/json"})
        return {}


# -- Sensors ---------------------------------------------------------------------------------
SENSORS_MESSAGE_ID = "idgate_message_id"
SENSORS_EVENT_NAME = "idgate_event_name"
_SENSORS_VALID = re.compile(r"^[a-zA-Z_$][a-zA-Z0-9_$]{0,99}$")
# names Sensors keeps for itself (its SDKs refuse them as property or event names)
_SENSORS_RESERVED = re.compile(
    r"^(distinct_id|original_id|time|properties|id|first_id|second_id|users|events|event|event_id"
    r"|device_id|user_id|date|datetime)$|^(user_group|user_tag)",
    re.IGNORECASE,
)
_SENSORS_INVALID = re.compile(r"[^a-zA-Z0-9_$]+")
# context field (or object -> field) -> Sensors preset property
_SENSORS_CONTEXT: dict[str, str | dict[str, str]] = {
    "ip": "$ip",
    "userAgent": "$user_agent",
    "os": {"name": "$os", "version": "$os_version"},
    "device": {"manufacturer": "$manufacturer", "model": "$model"},
    "app": {"name": "$app_name", "version": "$app_version"},
    "screen": {"width": "$screen_width", "height": "$screen_height"},
    "network": {"carrier": "$carrier", "wifi": "$wifi"},
    "page": {"url": "$url", "path": "$url_path", "title": "$title", "referrer": "$referrer"},
}
_SENSORS_PAGE = {"url": "$url", "path": "$url_path", "title": "$title", "referrer": "$referrer"}
_SENSORS_LIB = {"web": "js", "miniprogram": "MiniProgram", "server": "python"}


@functools.lru_cache(maxsize=4096)
def sensors_name(name: str) -> str:
    """A valid Sensors event or property name for a Segment one.

    Valid names stay; otherwise runs of other characters become "_", a reserved or
    digit-first name gets a "_" in front, and a name that had non-ASCII characters gets a
    short hash of the original appended, so "下单" and "支付" stay different names."""
    if _SENSORS_VALID.match(name) and not _SENSORS_RESERVED.match(name):
        return name
    cleaned = _SENSORS_INVALID.sub("_", name)
    if not name.isascii():
        cleaned = f"{cleaned[:90]}_{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"
    if not cleaned or not (cleaned[0].isalpha() or cleaned[0] in "_$") or _SENSORS_RESERVED.match(cleaned):
        cleaned = "_" + cleaned
    return cleaned[:100]


def track_id(message_id: str) -> int:
    """Sensors' ``_track_id`` for a message id: stable, 31 bits."""
    return int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def _sensors_value(value: Any) -> Any:
    """Sensors takes numbers, booleans, strings (up to 8191 characters) and lists of strings;
    anything else travels as JSON text."""
    if isinstance(value, str):
        return value[:8191]
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list):
        return [v if isinstance(v, str) else _encoder.encode(v).decode() for v in value if v is not None]
    return _encoder.encode(value).decode()


def _sensors_properties(source: Mapping[str, Any] | None, into: dict[str, Any]) -> None:
    for key, value in (source or {}).items():
        if value is not None:
            into[sensors_name(str(key))] = _sensors_value(value)


def _epoch_ms(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value).timestamp() * 1000)
        except ValueError:
            pass
    return int(datetime.now(UTC).timestamp() * 1000)


def _sensors_lib(platform: str | None, os_name: str | None) -> str:
    if platform == "app":
        name = (os_name or "").lower()
        return (
            "iOS" if name in ("ios", "ipados", "iphone os") else "Android" if name == "android" else "idgate"
        )
    return _SENSORS_LIB.get(platform or "", "idgate")


def sensors_event(
    event: Mapping[str, Any], message_id: str, *, project: str | None = None, notice: Notice | None = None
) -> dict[str, Any]:
    """The Sensors record sent for one cleaned event, or for an identity notice (``notice``
    given, ``event`` its JSON object)."""
    kind = str(event.get("type", ""))
    context = event.get("context") or {}
    idgate = context.get("idgate") or {}
    properties: dict[str, Any] = {}
    record: dict[str, Any] = {"_track_id": track_id(message_id)}
    if notice is not None:
        if isinstance(notice, IdentityMerged):
            record.update(type="track_signup", event="$SignUp", distinct_id=notice.survivor)
            record["original_id"] = notice.merged
        elif isinstance(notice, IdentitySplit):
            record.update(type="track", event="idgate_identity_split", distinct_id=notice.previous)
            properties["idgate_parts"] = list(notice.parts)
        elif isinstance(notice, IdentityRekeyed):
            record.update(type="track", event="idgate_identity_rekeyed", distinct_id=notice.unified_id)
            properties["idgate_old_identifier"] = notice.old_identifier.id
            properties["idgate_new_identifier"] = notice.new_identifier.id
        elif isinstance(notice, ConsentWithdrawn):
            record.update(type="track", event="idgate_consent_withdrawn", distinct_id=notice.unified_id)
            properties["idgate_purposes"] = list(notice.purposes)
            # a Sensors list property holds strings
            properties["idgate_ledger_seqs"] = [str(s) for s in notice.ledger_seqs]
        else:
            record.update(type="track", event="idgate_identity_deleted", distinct_id=notice.unified_id)
        time_source: Any = notice.received_at.isoformat()
    else:
        distinct_id = context.get("unified_id") or event.get("userId") or event.get("anonymousId") or ""
        record["distinct_id"] = distinct_id
        if kind == "identify":
            record["type"] = "profile_set"
            _sensors_properties(event.get("traits"), properties)
        elif kind == "alias":
            record.update(type="track_signup", event="$SignUp", original_id=event.get("previousId") or "")
        elif kind == "page":
            record.update(type="track", event="$pageview")
            for key, value in (event.get("properties") or {}).items():
                if value is not None:
                    properties[_SENSORS_PAGE.get(key) or sensors_name(str(key))] = _sensors_value(value)
            if event.get("name"):
                properties.setdefault("$title", event["name"])
        elif kind == "screen":
            record.update(type="track", event="$AppViewScreen")
            _sensors_properties(event.get("properties"), properties)
            if event.get("name"):
                properties["$screen_name"] = event["name"]
        elif kind == "group":
            record.update(type="track", event="idgate_group")
            _sensors_properties(event.get("traits"), properties)
            properties["idgate_group_id"] = str(event.get("groupId") or "")
        else:
            name = str(event.get("event") or kind or "idgate_event")
            record.update(type="track", event=sensors_name(name))
            _sensors_properties(event.get("properties"), properties)
            if record["event"] != name:
                properties[SENSORS_EVENT_NAME] = name
        for field, preset in _SENSORS_CONTEXT.items():
            value = context.get(field)
            if value is None:
                continue
            if isinstance(preset, str):
                properties.setdefault(preset, _sensors_value(value))
            elif isinstance(value, dict):
                for key, name in preset.items():
                    if value.get(key) is not None:
                        properties.setdefault(name, _sensors_value(value[key]))
        for field, name in (("userId", "idgate_user_id"), ("anonymousId", "idgate_anonymous_id")):
            if event.get(field):
                properties[name] = str(event[field])
        time_source = event.get("timestamp") or event.get("receivedAt")
    os_info = context.get("os")
    lib = _sensors_lib(idgate.get("platform"), os_info.get("name") if isinstance(os_info, dict) else None)
    properties["$lib"] = lib
    properties["$lib_version"] = IDGATE_VERSION
    if idgate.get("source"):
        properties["idgate_source"] = str(idgate["source"])
    if idgate.get("purposes"):
        properties["idgate_purposes"] = [str(p) for p in idgate["purposes"]]
    properties[SENSORS_MESSAGE_ID] = message_id
    record["time"] = _epoch_ms(time_source)
    record["lib"] = {"$lib": lib, "$lib_version": IDGATE_VERSION, "$lib_method": "code"}
    record["properties"] = properties
    if project:
        record["project"] = project
    return record


def sensors_form(events: Sequence[Mapping[str, Any]]) -> bytes:
    """The receiver's form body: ``data_list`` = base64 of the gzipped JSON array, ``gzip=1``."""
    data_list = base64.b64encode(gzip.compress(_encoder.encode(list(events)), compresslevel=6))
    return b"data_list=" + quote(data_list, safe="").encode() + b"&gzip=1"


class SensorsSink(HttpSink):
    kind = "sensors"

    def __init__(
        self,
        destination: str,
        url: str,
        *,
        timeout_seconds: float,
        project: str | None = None,
        events_per_request: int = 50,
    ) -> None:
        super().__init__(destination, url, timeout_seconds=timeout_seconds, headers={})
        self.project = project
        self.events_per_request = events_per_request

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        events = [
            sensors_event(
                self._decode(r),
                message_id_of(r),
                project=self.project,
                notice=decode_notice(r.payload) if r.kind == "notice" else None,
            )
            for r in records
        ]
        for start in range(0, len(events), self.events_per_request):
            body = sensors_form(events[start : start + self.events_per_request])
            await self._post(body, {"Content-Type": "application/x-www-form-urlencoded"})
        return {}
