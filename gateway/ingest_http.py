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

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from litestar import Litestar, asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.openapi.spec import OpenAPIResponse, Operation, PathItem, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.auth import WriteKeys
from gateway.config import Config, ResolvedSource
from gateway.errors import InvalidRequest, error_body
from gateway.events import Envelope
from gateway.logging import bind_source
from gateway.pipeline import Ingestor, IngestResult
from gateway.segment import MESSAGE_TYPES, body_write_key, decode_batch, decode_single
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
        # retry, not forget them.
        return 503, _encode(body), [(b"retry-after", b"5")]
    if result.accepted == 0 and result.rejected and result.duplicates == 0 and not result.dropped:
        first = result.rejected[0]
        return 400, _encode({**error_body(first.error, first.detail, first.field), **body}), []
    return 200, _encode(body), []


async def send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


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
        envs, result = decode(body, ctx.config, datetime.now(UTC))
        await ctx.ingestor.ingest(src, envs, result)
        log_rejections(result)
        await send_json(send, *ingest_response(result))

    handler.__name__ = "ingest_" + path.rsplit("/", 1)[-1]
    return asgi(path, name=handler.__name__)(handler)


INGEST_ROUTES = [
    _ingest_handler("/v1/batch", _decode_batch),
    *(_ingest_handler(f"/v1/{t}", _single_decoder(t)) for t in MESSAGE_TYPES),
]


def document_ingest_routes(app: Litestar) -> None:
    """ASGI handlers are not in the generated OpenAPI document: describe them there."""
    json_object = Schema(type=OpenAPIType.OBJECT)
    responses = {
        "200": OpenAPIResponse(
            description="Stored durably: counts of accepted, duplicate, rejected (with index, field, "
            "reason) and dropped (by reason) messages",
            content={"application/json": MediaType(schema=json_object)},
        ),
        "400": OpenAPIResponse(description="Invalid input: {error, detail, field}"),
        "401": OpenAPIResponse(description="Missing or unknown write key"),
        "413": OpenAPIResponse(description="Message over 32 KB or request over 500 KB"),
        "415": OpenAPIResponse(description="Content-Type is not application/json"),
        "503": OpenAPIResponse(description="Could not store durably, or a message id is in flight: retry"),
    }
    paths = app.openapi_schema.paths
    if paths is None:
        return
    for name in ["batch", *MESSAGE_TYPES]:
        summary = "Segment batch" if name == "batch" else f"Segment {name} (one message)"
        description = (
            'Segment HTTP Tracking API. Body `{"batch": [...], "context": {...}, "sentAt": "..."}`; '
            "each message is accepted or rejected on its own."
            if name == "batch"
            else f"Segment HTTP Tracking API `{name}` call; the body is one message without `type`."
        )
        paths[f"/v1/{name}"] = PathItem(
            post=Operation(
                tags=["ingest"],
                summary=summary,
                description=description + " Authenticate with the write key as HTTP Basic user.",
                operation_id=f"ingest_{name}",
                request_body=RequestBody(
                    content={"application/json": MediaType(schema=json_object)}, required=True
                ),
                responses=responses,
            )
        )
