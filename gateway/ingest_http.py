"""The ingest endpoints (Segment HTTP Tracking API) as Litestar ASGI route handlers.

This is the hot path, so the handlers take the raw ASGI scope instead of a Litestar
``Request``: one pass over the headers, the body read with its limit enforced as it
arrives, the response sent as bytes. Routing, the exception handlers and the lifespan are
still Litestar's; only the per-request object building is skipped (measured: it cost
about 40 µs of the gateway's ~250 µs per single-event request).

Errors are raised as ``InvalidRequest`` and turned into JSON by the app's exception
handlers, like everywhere else.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from litestar import asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.openapi.spec import OpenAPI, OpenAPIResponse, Operation, PathItem, RequestBody
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.auth import WriteKeys
from gateway.cleaning import RequestOrigin
from gateway.config import Config, Limits, ResolvedSource
from gateway.cors import check_origin
from gateway.errors import InvalidRequest, error_body, rate_limited_answer
from gateway.events import Envelope
from gateway.logging import bind_source
from gateway.openapi import (
    JSON,
    IngestResponse,
    error_response,
    limits_text,
    ref,
    register_components,
    struct_components,
)
from gateway.pipeline import Ingestor, IngestResult
from gateway.rate_limits import RateLimited, RateLimiter, client_address, client_ip
from gateway.segment import (
    MESSAGE_TYPES,
    BatchEnvelope,
    SegmentMessage,
    body_write_key,
    decode_batch,
    decode_single,
)
from identity.pseudonym import KeyRing

log = structlog.get_logger("idgate.ingest")

JSON_TYPES = frozenset({"application/json", "text/plain"})


@dataclass
class IngestContext:
    """What the ingest handlers need, put on ``app.state.ingest`` by the lifespan."""

    config: Config
    write_keys: WriteKeys
    ingestor: Ingestor
    keyring: KeyRing
    rate_limiter: RateLimiter | None = None

    def refuse_early(self, scope: Scope, src: ResolvedSource) -> None:
        """429 before decoding when the source's or network's budget of this second is spent."""
        limiter = self.rate_limiter
        if limiter is not None and limiter.limits.enabled:
            ip = client_ip(scope, self.config.rate_limits.forwarded_hops)
            limiter.refuse_early(src.tenant.id, src.source.id, ip)

    def origin(self, scope: Scope) -> RequestOrigin:
        """The request's User-Agent and client address, for data cleaning only (never stored)."""
        agent = next((v for k, v in scope["headers"] if k == b"user-agent"), b"")
        return RequestOrigin(
            agent.decode("latin-1"), client_address(scope, self.config.rate_limits.forwarded_hops)
        )

    async def check_rate(self, scope: Scope, src: ResolvedSource, events: int) -> None:
        """Count the request against its source's and client network's limits (429 over)."""
        limiter = self.rate_limiter
        if limiter is not None:
            ip = client_ip(scope, self.config.rate_limits.forwarded_hops)
            await limiter.check_request(src.tenant.id, src.source.id, ip, max(events, 1))


@dataclass(slots=True)
class IngestHeaders:
    content_type: str = "application/json"
    content_length: int | None = None
    content_encoding: str = ""
    authorization: str = ""

    @classmethod
    def from_scope(cls, scope: Scope) -> IngestHeaders:
        h = cls()
        for name, value in scope["headers"]:
            if name == b"content-type":
                h.content_type = value.decode("latin-1").split(";", 1)[0].strip().lower()
            elif name == b"content-length":
                h.content_length = int(value) if value.isdigit() else None
            elif name == b"content-encoding":
                h.content_encoding = value.decode("latin-1").strip().lower()
            elif name == b"authorization":
                h.authorization = value.decode("latin-1")
        return h


async def read_body(
    receive: Receive,
    headers: IngestHeaders,
    limit: int,
    content_types: frozenset[str] = JSON_TYPES,
    expected: str = "application/json",
) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (also after gunzip);
    415 for a Content-Type outside ``content_types`` (``expected`` names them)."""
    if headers.content_type not in content_types:
        raise InvalidRequest(
            "unsupported_media_type",
            f"Content-Type must be {expected}, got {headers.content_type[:60]!r}",
            "Content-Type",
            415,
        )
    if headers.content_length is not None and headers.content_length > limit:
        raise InvalidRequest("too_large", f"request body exceeds {limit} bytes", None, 413)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client_disconnected", "the client went away before the body arrived")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]  # an http.request message
        size += len(chunk)
        if size > limit:
            raise InvalidRequest("too_large", f"request body exceeds {limit} bytes", None, 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.content_encoding
    if encoding == "gzip":
        try:
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise InvalidRequest("invalid_encoding", "body is not valid gzip", "Content-Encoding") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise InvalidRequest("too_large", f"decompressed body exceeds {limit} bytes", None, 413)
        if not inflater.eof:
            raise InvalidRequest("invalid_encoding", "the gzip body is truncated", "Content-Encoding")
        if inflater.unused_data:
            # A second gzip member (or anything) after the first would be ignored: refuse it
            # rather than accept a body that is not what the client thinks it sent.
            raise InvalidRequest(
                "invalid_encoding",
                "data after the end of the gzip body (one gzip member only)",
                "Content-Encoding",
            )
    elif encoding not in ("", "identity"):
        raise InvalidRequest(
            "unsupported_media_type",
            f"Content-Encoding {encoding[:40]!r} is not supported",
            "Content-Encoding",
            415,
        )
    return body


def log_rejections(result: IngestResult, **extra: Any) -> None:
    """One log line per request with rejected messages (kinds of error, never the content);
    the request id, tenant and source come from the request's log context."""
    if result.rejected:
        log.info(
            "ingest.rejected",
            rejected=len(result.rejected),
            errors=sorted({r.error for r in result.rejected}),
            **extra,
        )


def authenticate(ctx: IngestContext, headers: IngestHeaders, body: bytes) -> ResolvedSource:
    """Write key as HTTP Basic user, or ``writeKey`` in the body, to its source."""
    src = ctx.write_keys.authenticate(headers.authorization, lambda: body_write_key(body))
    bind_source(src.tenant.id, src.source.id)
    return src


_encode = msgspec.json.Encoder().encode


def ingest_response(result: IngestResult) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = result.body()
    if result.in_flight:
        # Some message ids are being stored by another request right now; their client must
        # retry, not forget them. An error like any other (ErrorBody), with the counts.
        detail = "another request is storing some of these message ids right now (see inFlight); retry"
        return 503, _encode({**error_body("in_flight", detail), **body}), [(b"retry-after", b"5")]
    if result.accepted == 0 and result.rejected and result.duplicates == 0 and not result.dropped:
        first = result.rejected[0]
        return 400, _encode({**error_body(first.error, first.detail, first.field), **body}), []
    return 200, _encode(body), []


async def send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


RawHandler = Callable[[HTTPScope, Receive, Send], Awaitable[None]]


def answering_rate_limits(handler: RawHandler) -> RawHandler:
    """``handler`` answering its own 429s: a flooding client is refused without a trip through
    Litestar's exception layers (about a third of what a refusal cost), so the requests of
    other sources keep the event loop (``bench/rate_limits.py``)."""

    @functools.wraps(handler)
    async def answered(scope: HTTPScope, receive: Receive, send: Send) -> None:
        try:
            await handler(scope, receive, send)
        except RateLimited as exc:
            await send_json(send, *rate_limited_answer(exc, scope["path"]))

    return answered


Decoder = Callable[[bytes, Config, datetime], tuple[list[Envelope], IngestResult]]


def _decode_batch(body: bytes, config: Config, received_at: datetime) -> tuple[list[Envelope], IngestResult]:
    envs, rejected, count = decode_batch(body, limits=config.limits, received_at=received_at)
    return envs, IngestResult(received=count, rejected=rejected)


def _single_decoder(message_type: str) -> Decoder:
    def decode(body: bytes, config: Config, received_at: datetime) -> tuple[list[Envelope], IngestResult]:
        event = decode_single(body, message_type, limits=config.limits, received_at=received_at)
        return [Envelope(event, 0)], IngestResult(received=1)

    return decode


def _ingest_handler(path: str, decode: Decoder) -> Any:
    async def handler(scope: HTTPScope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            raise MethodNotAllowedException(detail=f"{path} accepts POST")
        ctx: IngestContext = scope["app"].state.ingest
        headers = IngestHeaders.from_scope(scope)
        body = await read_body(receive, headers, ctx.config.limits.max_batch_bytes)
        src = authenticate(ctx, headers, body)
        check_origin(scope, src)
        ctx.refuse_early(scope, src)
        envs, result = decode(body, ctx.config, datetime.now(UTC))
        await ctx.check_rate(scope, src, result.received)
        await ctx.ingestor.ingest(src, envs, result, origin=ctx.origin(scope))
        log_rejections(result)
        await send_json(send, *ingest_response(result))

    handler.__name__ = "ingest_" + path.rsplit("/", 1)[-1]
    # The handler answers the request itself (no mounted app): the scope is passed as is.
    return asgi(path, name=handler.__name__, copy_scope=False)(answering_rate_limits(handler))


INGEST_ROUTES = [
    _ingest_handler("/v1/batch", _decode_batch),
    *(_ingest_handler(f"/v1/{t}", _single_decoder(t)) for t in MESSAGE_TYPES),
    # The short paths analytics.js posts to (Segment's API answers them too): /v1/b, /v1/t...
    _ingest_handler("/v1/b", _decode_batch),
    *(_ingest_handler(f"/v1/{t[0]}", _single_decoder(t)) for t in MESSAGE_TYPES),
]


def _single_call_component(name: str, component: dict[str, Any]) -> dict[str, Any]:
    """The body of ``/v1/<type>``: the message's struct without ``type`` (the path says it)."""
    properties = {k: v for k, v in component["properties"].items() if k != "type"}
    required = [r for r in component.get("required", []) if r != "type"]
    return {
        **component,
        "title": f"{name}Call",
        "description": f"The body of POST /v1/{name.lower()}: a {name} message without `type`. "
        + component.get("description", ""),
        "properties": properties,
        "required": required,
    }


def document_ingest_routes(openapi: OpenAPI, limits: Limits) -> None:
    """ASGI handlers are not in the generated document: describe them there, with the schemas
    of the msgspec structs they decode (``gateway.segment``) and answer (``IngestResponse``),
    and the limits of the running configuration."""
    refs, components = struct_components([SegmentMessage, BatchEnvelope, IngestResponse])
    # The batch is decoded item by item (msgspec.Raw): each item is one of the messages.
    components["BatchEnvelope"]["properties"]["batch"] = {
        "type": "array",
        "items": refs[0],
        "minItems": 1,
        "maxItems": limits.max_batch_messages,
        "description": f"1 to {limits.max_batch_messages} messages, each up to "
        f"{limits.max_message_bytes} bytes; each is accepted or rejected on its own",
    }
    for struct in MESSAGE_TYPES.values():
        name = struct.__name__
        components[f"{name}Call"] = _single_call_component(name, components[name])
    register_components(openapi, components)

    answered = OpenAPIResponse(
        description="Stored durably (the answer is sent after the outbox append): counts of accepted, "
        "duplicate, rejected (with index, field, reason) and dropped (by reason) messages",
        content={JSON: MediaType(schema=ref("IngestResponse"))},
    )
    errors = {
        "401": error_response(
            401, "Missing or unknown write key (HTTP Basic user, or `writeKey` in the body)"
        ),
        "415": error_response(
            415, "Content-Type is not application/json (or text/plain), or a Content-Encoding other than gzip"
        ),
        "429": error_response(429),
        "503": error_response(
            503,
            "Nothing acknowledged: the outbox is over its bound (`overloaded`), or events could not be "
            "stored durably or Redis or the database is down (`unavailable`); or (`in_flight`) a "
            "message id is being stored by another request right now: the body also carries the "
            "IngestResponse counts, and the client retries the whole request (the messages stored "
            "already count as duplicates then)",
        ),
    }
    if openapi.paths is None:
        openapi.paths = {}
    for name in ["batch", *MESSAGE_TYPES]:
        if name == "batch":
            summary = "Segment batch"
            description = (
                'Segment HTTP Tracking API. Body `{"batch": [...], "context": {...}, "sentAt": "..."}`; '
                "each message is accepted or rejected on its own (a message over "
                f"{limits.max_message_bytes} bytes is rejected alone)."
            )
            body = ref("BatchEnvelope")
            invalid = (
                "Invalid request: malformed JSON, an empty batch, or every message rejected (then the "
                "body also carries the IngestResponse counts and rejections); `field` names the field"
            )
            too_large = (
                f"Too large: a request body over {limits.max_batch_bytes} bytes (also after gunzip), "
                f"or a batch of more than {limits.max_batch_messages} messages"
            )
        else:
            summary = f"Segment {name} (one message)"
            description = f"Segment HTTP Tracking API `{name}` call; the body is one message without `type`."
            body = ref(f"{MESSAGE_TYPES[name].__name__}Call")
            invalid = "Invalid request: malformed JSON, or the message rejected; `field` names the field"
            too_large = f"Too large: the message is over {limits.max_message_bytes} bytes (also after gunzip)"
        short = "b" if name == "batch" else name[0]
        for path, also in ((name, ""), (short, f" (`/v1/{short}`: the short path analytics.js uses)")):
            openapi.paths[f"/v1/{path}"] = PathItem(
                post=Operation(
                    tags=["ingest"],
                    summary=summary + also,
                    description=f"{description} Authenticate with the write key as HTTP Basic user "
                    f"(empty password), or as `writeKey` in the body. {limits_text(limits)}",
                    operation_id=f"ingest_{path}" if not also else f"ingest_{name}_short",
                    request_body=RequestBody(
                        content={JSON: MediaType(schema=body)},
                        required=True,
                        description="JSON, optionally gzip-compressed (Content-Encoding: gzip)",
                    ),
                    responses={
                        "200": answered,
                        "400": error_response(400, invalid),
                        "403": error_response(
                            403, "The request comes from a web page whose origin the source does not allow"
                        ),
                        "413": error_response(413, too_large),
                        **errors,
                    },
                    security=[{"WriteKey": []}],
                )
            )
