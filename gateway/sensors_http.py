"""The Sensors Data ingest endpoints: ``/sa`` and ``/sa.gif``, GET and POST, as SDKs send them.

A team moves its Sensors SDKs to idgate by changing the server URL to
``https://<idgate>/sa?project=<project>&token=<token>``; the token (with its project)
names the source, like a Segment write key. Like ``gateway.ingest_http`` these are raw
ASGI handlers (the hot path); errors are raised as ``InvalidRequest`` and become JSON in the
app's exception handlers.

What the SDKs do with the answer decides the status codes:

- the web SDK's batch mode and the Python ``BatchConsumer`` send the same batch again after
  any non-2xx answer, forever (the ``BatchConsumer`` holds back everything after it), so a
  ``data_list`` whose events were all rejected is answered 200 with the rejections listed
  (and logged and counted), never 400;
- single sends (``data=``: web ajax/beacon/image mode, Python ``DefaultConsumer``) are not
  retried: a rejected event is a 400 naming the field, which the Python client raises;
- 401 (unknown token), 413 and 415 are answered as such: nothing in the request could be
  read, and the batch senders keep the data until the configuration is fixed;
- 503 with Retry-After when nothing could be stored; batch senders retry, the Python client
  raises. The WeChat mini-program SDK drops a batch on any answer, whatever its status, and
  re-sends only when the request itself failed: idgate cannot do better for it than not
  failing;
- a GET of ``/sa.gif`` (the web SDK's image mode) that succeeds is answered with a 1x1 GIF;
- every answer allows any origin (the web SDK posts cross-origin without credentials).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import structlog
from litestar import asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    PathItem,
    Reference,
    RequestBody,
    Schema,
)
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.cleaning import RequestOrigin
from gateway.config import Limits, ResolvedSource, hash_write_key
from gateway.errors import InvalidRequest
from gateway.events import Rejection
from gateway.ingest_http import (
    IngestContext,
    IngestHeaders,
    answering_rate_limits,
    ingest_response,
    log_rejections,
    read_body,
)
from gateway.logging import bind_source
from gateway.openapi import JSON, error_response, limits_text, ref, register_structs
from gateway.pipeline import IngestResult
from gateway.sensors import SensorsBatch, SensorsEvent, decode_events, parse_form, payload_json
from identity.pseudonym import MESSAGE_ID

log = structlog.get_logger("idgate.ingest")

FORM_TYPES = frozenset(
    {
        "application/x-www-form-urlencoded",  # web ajax and batch modes, server SDKs
        "text/plain",  # the mini-program SDK, navigator.sendBeacon
        "application/json",  # what IngestHeaders assumes when there is no Content-Type
        "application/octet-stream",
    }
)
# The encoding overhead of a form (base64, percent escapes) on top of the JSON limit.
FORM_OVERHEAD = 2
CORS = [(b"access-control-allow-origin", b"*")]
PREFLIGHT = [
    *CORS,
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"Content-Type, Content-Encoding, Dry-Run"),
    (b"access-control-max-age", b"86400"),
]
PIPELINE_FIELDS = {"userId": "distinct_id", "anonymousId": "distinct_id", "previousId": "original_id"}
# A transparent 1x1 GIF: what an <img> expects from /sa.gif.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
_encode = msgspec.json.Encoder().encode


async def read_form(receive: Receive, headers: IngestHeaders, limit: int) -> bytes:
    """The form body, refused with 413 as soon as it passes ``limit`` (also after gunzip)."""
    return await read_body(
        receive, headers, limit, FORM_TYPES, "application/x-www-form-urlencoded or text/plain"
    )


def authenticate_sensors(tokens: dict[str, ResolvedSource], form: dict[str, str]) -> ResolvedSource:
    """``token`` (and ``project``, when given) from the server URL to its source."""
    token = form.get("token", "").strip()
    if not token:
        raise InvalidRequest(
            "missing_token", "add &token=<the source's Sensors token> to the server URL", "token", 401
        )
    resolved = tokens.get(hash_write_key(token))
    if resolved is None:
        raise InvalidRequest("invalid_token", "unknown Sensors token", "token", 401)
    project = form.get("project", "").strip()
    if project and project != resolved.source.sensors_project:
        raise InvalidRequest("invalid_token", "the token belongs to another project", "project", 401)
    return resolved


def _token_index(scope: Scope) -> dict[str, ResolvedSource]:
    index: dict[str, ResolvedSource] = scope["app"].state.sensors_tokens  # set by the lifespan
    return index


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def sensors_response(result: IngestResult, *, batch: bool) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    status, body, extra = ingest_response(result)
    if status == 400 and batch:
        # Every event of the batch was rejected. Batch senders would send it again after a
        # 400, forever: the rejections are in the body, the log and the metrics instead.
        return 200, _encode(result.body()), extra
    return status, body, extra


async def ingest_in_order(
    ctx: IngestContext,
    src: ResolvedSource,
    batch: SensorsBatch,
    result: IngestResult,
    origin: RequestOrigin | None = None,
) -> None:
    """Run the pipeline over the batch; an unbind takes effect where it stands in it: the
    events before it are resolved first, the events after it see the person split (the
    batch is cut after each unbind, and the pipeline detaches at the end of each part)."""
    if not batch.unbind:
        await ctx.ingestor.ingest(src, batch.envelopes, result, origin=origin)
        return
    cuts = set(batch.unbind)
    start = 0
    for end, env in enumerate(batch.envelopes, 1):
        if env.index not in cuts and end < len(batch.envelopes):
            continue
        part = result if start == 0 else IngestResult(received=0)
        await ctx.ingestor.ingest(src, batch.envelopes[start:end], part, origin=origin)
        if part is not result:
            result.merge(part)
        start = end


async def read_sensors_request(
    scope: HTTPScope, receive: Receive, ctx: IngestContext
) -> tuple[ResolvedSource, SensorsBatch, bool]:
    """The source (token), rate limits, and the decoded events of a Sensors request; ``single``:
    the events came as ``data=`` (one event, or a list)."""
    limits = ctx.config.limits
    headers = IngestHeaders.from_scope(scope)
    form = parse_form(scope.get("query_string", b""))
    if scope["method"] == "POST":
        body = await read_form(receive, headers, FORM_OVERHEAD * limits.max_batch_bytes)
        form = {**form, **parse_form(body)}
    src = authenticate_sensors(_token_index(scope), form)
    bind_source(src.tenant.id, src.source.id)
    ctx.refuse_early(scope, src)
    payload, single = payload_json(form, limit=limits.max_batch_bytes)
    batch = decode_events(
        payload,
        single=single,
        limits=limits,
        received_at=datetime.now(UTC),
        derive=ctx.keyring.anchor(src.tenant.id).internal(MESSAGE_ID),
        project=src.source.sensors_project,
    )
    await ctx.check_rate(scope, src, batch.received)
    return src, batch, single


def name_sensors_fields(rejected: list[Rejection], *, single: bool, received: int) -> None:
    """The pipeline names the Segment fields of a rejected event: the Sensors ones instead."""
    for r in rejected:
        if r.field in PIPELINE_FIELDS:
            where = (
                "data." if single and received == 1 else f"{'data' if single else 'data_list'}[{r.index}]."
            )
            r.field = where + PIPELINE_FIELDS[r.field]


async def _sensors(scope: HTTPScope, receive: Receive, send: Send) -> None:
    method = scope["method"]
    if method == "OPTIONS":
        await _send(send, 204, b"", PREFLIGHT)
        return
    if method not in ("GET", "POST"):
        raise MethodNotAllowedException(detail="/sa accepts GET and POST")
    ctx: IngestContext = scope["app"].state.ingest
    src, batch, single = await read_sensors_request(scope, receive, ctx)
    result = IngestResult(received=batch.received, rejected=batch.rejected)
    await ingest_in_order(ctx, src, batch, result, ctx.origin(scope))
    name_sensors_fields(result.rejected, single=single, received=batch.received)
    log_rejections(result, protocol="sensors")
    status, body, extra = sensors_response(result, batch=not single)
    if method == "GET" and status == 200:
        await _send(
            send, 200, PIXEL, [(b"content-type", b"image/gif"), (b"cache-control", b"no-store"), *CORS]
        )
        return
    await _send(send, status, body, [(b"content-type", b"application/json"), *extra, *CORS])


# The handler answers the request itself (no mounted app): the scope is passed as is.
SENSORS_ROUTES = [
    asgi("/sa", name="ingest_sensors", copy_scope=False)(answering_rate_limits(_sensors)),
    asgi("/sa.gif", name="ingest_sensors_gif", copy_scope=False)(answering_rate_limits(_sensors)),
]


def sensors_form(openapi: OpenAPI, limits: Limits) -> tuple[Schema, dict[str, Schema | Reference], Parameter]:
    """The documented form of a Sensors request: its schema, its event fields (``data``,
    ``data_list``, ``gzip``, ``ext``) and the ``project`` query parameter."""
    (event,) = register_structs(openapi, SensorsEvent)
    events = Schema(
        type=OpenAPIType.ARRAY,
        items=event,
        min_items=1,
        max_items=limits.max_batch_messages,
    )
    payload = (
        f"base64 of JSON (up to {limits.max_batch_bytes} bytes), or with `gzip=1` of gzipped JSON; "
        "plain JSON is accepted too"
    )
    fields: dict[str, Schema | Reference] = {
        "data": Schema(
            type=OpenAPIType.STRING,
            description=f"One event (or an array of events): {payload}",
            content_media_type=JSON,
            content_schema=Schema(any_of=[event, events]),
        ),
        "data_list": Schema(
            type=OpenAPIType.STRING,
            description=f"Events, a JSON array of 1 to {limits.max_batch_messages}: {payload}",
            content_media_type=JSON,
            content_schema=events,
        ),
        "gzip": Schema(
            type=OpenAPIType.STRING,
            enum=["0", "1"],
            description="1: the JSON was gzipped before base64 (9, the encryption plugin: refused, 415)",
        ),
        "ext": Schema(type=OpenAPIType.STRING, description="The web SDK's checksum (ignored)"),
    }
    form = Schema(
        type=OpenAPIType.OBJECT,
        properties={
            **fields,
            "project": Schema(type=OpenAPIType.STRING, description="Sensors project (or in the query)"),
            "token": Schema(type=OpenAPIType.STRING, description="The source's token (or in the query)"),
        },
        any_of=[Schema(required=["data"]), Schema(required=["data_list"])],
        description="`data` or `data_list`, with `gzip`",
    )
    project = Parameter(
        name="project",
        param_in="query",
        required=False,
        schema=Schema(type=OpenAPIType.STRING),
        description="Sensors project; when given, it must be the token's",
    )
    return form, fields, project


def sensors_form_body(form: Schema) -> RequestBody:
    """A POSTed Sensors form: urlencoded, or the same as text/plain."""
    return RequestBody(
        content={
            "application/x-www-form-urlencoded": MediaType(schema=form),
            "text/plain": MediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="The same form as text/plain (the mini-program SDK, sendBeacon)",
                )
            ),
        },
        required=True,
    )


def document_sensors_routes(openapi: OpenAPI, limits: Limits) -> None:
    """ASGI handlers are not in the generated document: describe them there: the form fields,
    the events they carry (``SensorsEvent``), the answer (``IngestResponse``) and the limits of
    the running configuration."""
    form, fields, project = sensors_form(openapi, limits)
    query_fields = [
        Parameter(name=name, param_in="query", required=False, schema=schema, description=schema.description)
        for name, schema in fields.items()
        if isinstance(schema, Schema)
    ]
    stored = (
        "Stored durably: counts of accepted, duplicate, rejected (with index, field, reason) and "
        "dropped (by reason) events. A data_list whose events were all rejected is a 200 too "
        "(batch senders would re-send it forever)."
    )
    json_answer = OpenAPIResponse(description=stored, content={JSON: MediaType(schema=ref("IngestResponse"))})
    gif_answer = OpenAPIResponse(
        description=f"{stored} The answer is a transparent 1x1 GIF, for an <img>.",
        content={
            "image/gif": MediaType(schema=Schema(type=OpenAPIType.STRING, content_media_type="image/gif"))
        },
    )
    errors: dict[str, OpenAPIResponse | Reference] = {
        "400": error_response(
            400,
            "Unreadable request (no data or data_list, bad base64 or gzip, malformed "
            "JSON), or the one event of `data=` rejected; `field` names the field",
        ),
        "401": error_response(401, "Missing or unknown token, or a token of another project"),
        "413": error_response(
            413,
            f"Too large: a form body over {FORM_OVERHEAD * limits.max_batch_bytes} bytes, JSON over "
            f"{limits.max_batch_bytes} bytes (also after gunzip), or more than "
            f"{limits.max_batch_messages} events",
        ),
        "415": error_response(415, "Unsupported Content-Type or Content-Encoding, or gzip=9 (encrypted)"),
        "429": error_response(429),
        "503": error_response(
            503,
            "Nothing acknowledged: the outbox is over its bound (`overloaded`), or events could not be "
            "stored durably or Redis or the database is down (`unavailable`): retry",
        ),
    }
    description = (
        "Sensors Data SDKs (web, mini-program, App, server): form fields `data` (one event) or "
        "`data_list` (several), base64 of JSON or, with `gzip=1`, of gzipped JSON; in the body "
        "(POST) or the query string (GET). The source is named by `token` (and `project`) in the "
        "query string or the form, as in the SDKs' server URL. Each event is accepted or rejected "
        f"on its own; an event over {limits.max_message_bytes} bytes is rejected alone. "
        f"{limits_text(limits)}"
    )

    def operation(method: str, path: str) -> Operation:
        post = method == "POST"
        return Operation(
            tags=["ingest"],
            summary=f"Sensors Data events ({method} {path})",
            description=description,
            operation_id=f"ingest_sensors_{method.lower()}_{path.strip('/').replace('.', '_')}",
            parameters=[project] if post else [project, *query_fields],
            request_body=sensors_form_body(form) if post else None,
            responses={"200": json_answer if post else gif_answer, **errors},
            security=[{"SensorsToken": []}],
        )

    if openapi.paths is None:
        openapi.paths = {}
    for path in ("/sa", "/sa.gif"):
        openapi.paths[path] = PathItem(post=operation("POST", path), get=operation("GET", path))
