"""The Litestar application: one factory, one lifespan that opens every resource.

``create_app`` loads and checks the configuration and keys (failing fast), and the lifespan
opens the outbox, Redis (when configured) and the delivery workers, and puts them on
``app.state``. Handlers are thin: read the body, authenticate, decode, hand to the Ingestor.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consent.decisions import ConsentPolicy, LedgerlessPolicy
from export.dedupe import RedisDedupe
from export.delivery import DeliveryService, DeliveryWorker
from export.outbox import OutboxUnavailable, SqliteOutbox
from export.sinks import build_sink
from gateway import metrics
from gateway.config import Config, ResolvedSource, hash_write_key, index_write_keys, load_config
from gateway.events import Envelope
from gateway.pipeline import Ingestor, IngestResult
from gateway.segment import MESSAGE_TYPES, InvalidRequest, body_write_key, decode_batch, decode_single
from gateway.settings import Settings
from identity.pseudonym import KeyRing, new_key_document, write_private_file
from identity.resolution import NoResolution

log = structlog.get_logger("idgate.gateway")

JSON_TYPES = ("application/json", "text/plain")


@dataclass
class GatewayState:
    settings: Settings
    config: Config
    keyring: KeyRing
    write_keys: dict[str, ResolvedSource]
    outbox: SqliteOutbox
    delivery: DeliveryService
    ingestor: Ingestor
    redis: Any = None
    auth_cache: dict[str, ResolvedSource] = field(default_factory=dict)


def load_keyring(settings: Settings, config: Config) -> KeyRing:
    """Keys from IDGATE_KEYS / IDGATE_KEY_FILE; in dev, a generated key file under the data dir."""
    key_file = settings.key_file
    if not settings.keys_json and key_file is None:
        key_file = settings.dev_key_file
        tenants = [t.id for t in config.tenants]
        existing = key_file.read_text(encoding="utf-8") if key_file.exists() else None
        known = KeyRing.from_json(existing).tenants if existing else frozenset()
        missing = [t for t in tenants if t not in known]
        if missing:
            write_private_file(key_file, new_key_document(missing, existing))
            log.warning("keys.dev_generated", path=str(key_file), tenants=missing)
    keyring = KeyRing.load(env_value=settings.keys_json, key_file=key_file)
    for tenant in config.tenants:
        keyring.pseudonymiser(tenant.id)  # raises MissingKey now rather than on the first event
    return keyring


def error_body(error: str, detail: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, "field": field, **extra}


def _error_response(
    status: int,
    error: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[Any]:
    metrics.REQUESTS_REFUSED.labels(error).inc()
    return Response(error_body(error, detail, field, **extra), status_code=status, headers=headers)


# -- request helpers ------------------------------------------------------------------------
def _state(request: Request[Any, Any, Any]) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def _read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise InvalidRequest(
            "unsupported_media_type",
            f"Content-Type must be application/json, got {ctype!r}",
            "Content-Type",
            415,
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest("too_large", f"request body exceeds {limit} bytes", None, 413)
    body = await request.body()
    encoding = request.headers.get("content-encoding", "").lower()
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
            f"Content-Encoding {encoding!r} is not supported",
            "Content-Encoding",
            415,
        )
    if len(body) > limit:
        raise InvalidRequest("too_large", f"request body exceeds {limit} bytes", None, 413)
    return body


_AUTH_CACHE_SIZE = 1024


def _authenticate(request: Request[Any, Any, Any], body: bytes) -> ResolvedSource:
    state = _state(request)
    auth = request.headers.get("authorization", "")
    # Clients send the same header on every request: remember the answer, not the key.
    cached = state.auth_cache.get(auth) if auth else None
    if cached is not None:
        return cached
    write_key: str | None = None
    if auth[:6].lower() == "basic ":
        try:
            write_key = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8").split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidRequest(
                "invalid_write_key", "malformed Basic authorization header", "Authorization", 401
            ) from None
    if not write_key:
        write_key = body_write_key(body)
    if not write_key:
        raise InvalidRequest(
            "missing_write_key", "send the write key as HTTP Basic user or as writeKey", "Authorization", 401
        )
    resolved = state.write_keys.get(hash_write_key(write_key))
    if resolved is None:
        raise InvalidRequest("invalid_write_key", "unknown write key", "Authorization", 401)
    if auth[:6].lower() == "basic ":
        if len(state.auth_cache) >= _AUTH_CACHE_SIZE:
            state.auth_cache.clear()
        state.auth_cache[auth] = resolved
    return resolved


_request_numbers = itertools.count(1)


def _request_id(request: Request[Any, Any, Any]) -> str:
    """The caller's X-Request-ID, or a process-unique number; only computed when logging."""
    rid = request.headers.get("x-request-id")
    return rid[:64] if rid else f"{os.getpid():x}-{next(_request_numbers)}"


_encode = msgspec.json.Encoder().encode


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


def _ingest_response(result: IngestResult) -> Response[bytes]:
    body = result.body()
    if result.in_flight:
        # Some message ids are being stored by another request right now; their client must
        # retry, not forget them.
        return _json(body, 503, {"Retry-After": "5"})
    if result.accepted == 0 and result.rejected and result.duplicates == 0 and not result.dropped:
        first = result.rejected[0]
        return _json({**error_body(first.error, first.detail, first.field), **body}, 400)
    return _json(body, 200)


async def _run_ingest(
    request: Request[Any, Any, Any], src: ResolvedSource, envs: list[Envelope], result: IngestResult
) -> Response[bytes]:
    await _state(request).ingestor.ingest(src, envs, result)
    if result.rejected:
        log.info(
            "ingest.rejected",
            request_id=_request_id(request),
            tenant=src.tenant.id,
            source=src.source.id,
            rejected=len(result.rejected),
            errors=sorted({r.error for r in result.rejected}),
        )
    return _ingest_response(result)


# -- handlers --------------------------------------------------------------------------------
@post("/v1/batch", status_code=200, summary="Segment batch", tags=["ingest"])
async def ingest_batch(request: Request[Any, Any, Any]) -> Response[Any]:
    """Segment HTTP Tracking API batch: `{"batch": [...], "context": {...}, "sentAt": ...}`.

    Authenticate with the write key as HTTP Basic user (or `writeKey` in the body). Each
    message is accepted or rejected on its own; the response lists the rejected ones.
    """
    state = _state(request)
    limits = state.config.limits
    body = await _read_body(request, limits.max_batch_bytes)
    src = _authenticate(request, body)
    received_at = datetime.now(UTC)
    envs, rejected, count = decode_batch(body, limits=limits, received_at=received_at)
    return await _run_ingest(request, src, envs, IngestResult(received=count, rejected=rejected))


def _single_handler(message_type: str) -> Any:
    @post(
        f"/v1/{message_type}",
        status_code=200,
        summary=f"Segment {message_type}",
        tags=["ingest"],
        name=f"ingest_{message_type}",
    )
    async def handler(request: Request[Any, Any, Any]) -> Response[Any]:
        state = _state(request)
        limits = state.config.limits
        body = await _read_body(request, limits.max_batch_bytes)
        src = _authenticate(request, body)
        event = decode_single(body, message_type, limits=limits, received_at=datetime.now(UTC))
        return await _run_ingest(request, src, [Envelope(event, 0)], IngestResult(received=1))

    handler.fn.__doc__ = f"Segment HTTP Tracking API `{message_type}` call (one message)."
    return handler


@get("/healthz", tags=["operations"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["operations"], summary="Readiness: outbox writer, delivery, Redis")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    state = _state(request)
    checks: dict[str, bool] = {"outbox": state.outbox.alive}
    checks["delivery"] = all(w.healthy for w in state.delivery.workers)
    if state.redis is not None:
        try:
            checks["redis"] = bool(await state.redis.ping())
        except Exception:
            checks["redis"] = False
    ok = all(checks.values())
    return Response(
        {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
    )


@get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics() -> Response[bytes]:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# -- errors ----------------------------------------------------------------------------------
def _invalid_request(_: Request[Any, Any, Any], exc: InvalidRequest) -> Response[Any]:
    return _error_response(exc.status, exc.error, exc.detail, exc.field)


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    names = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}
    error = names.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "unavailable")
    return _error_response(exc.status_code, error, str(exc.detail), None, headers=exc.headers)


def _outbox_unavailable(_: Request[Any, Any, Any], exc: OutboxUnavailable) -> Response[Any]:
    log.error("ingest.outbox_unavailable", detail=str(exc))
    return _error_response(
        503, "unavailable", "events could not be stored durably; retry", None, headers={"Retry-After": "2"}
    )


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected_error", error=type(exc).__name__)
    return _error_response(
        500, "internal_error", "unexpected error; nothing from this request was acknowledged"
    )


# -- factory ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path, dev=settings.dev)
    keyring = load_keyring(settings, config)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        outbox = SqliteOutbox(settings.outbox_path, dedupe_window_seconds=config.limits.dedupe_window_seconds)
        outbox.open()
        redis_client = None
        redis_dedupe = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            redis_client = aioredis.from_url(settings.redis_url)
            await redis_client.ping()
            redis_dedupe = RedisDedupe(redis_client, window_seconds=config.limits.dedupe_window_seconds)
        workers = [
            DeliveryWorker(
                outbox,
                build_sink(d.sink, root=settings.sink_dir, destination=d.id),
                batch_size=settings.delivery_batch_size,
                poll_seconds=settings.delivery_poll_seconds,
            )
            for t in config.tenants
            for d in t.destinations
        ]
        delivery = DeliveryService(outbox, workers)
        consent: ConsentPolicy = LedgerlessPolicy()
        ingestor = Ingestor(
            keyring=keyring,
            outbox=outbox,
            consent=consent,
            resolver=NoResolution(),
            redis_dedupe=redis_dedupe,
            on_appended=delivery.notify,
        )
        app.state.gateway = GatewayState(
            settings=settings,
            config=config,
            keyring=keyring,
            write_keys=index_write_keys(config, dev=settings.dev),
            outbox=outbox,
            delivery=delivery,
            ingestor=ingestor,
            redis=redis_client,
        )
        await delivery.start()
        log.info(
            "gateway.started",
            env=settings.env,
            tenants=[t.id for t in config.tenants],
            destinations=[w.destination for w in workers],
            redis=bool(redis_client),
            consent_enforced=consent.enforced,
        )
        try:
            yield
        finally:
            await delivery.stop()
            outbox.close()
            if redis_client is not None:
                await redis_client.aclose()
            log.info("gateway.stopped")

    single = [_single_handler(t) for t in MESSAGE_TYPES]
    return Litestar(
        route_handlers=[ingest_batch, *single, healthz, readyz, prometheus_metrics],
        lifespan=[lifespan],
        # Above this Litestar refuses the body before reading it; _read_body applies the exact limit.
        request_max_body_size=config.limits.max_batch_bytes + 1024,
        exception_handlers={
            InvalidRequest: _invalid_request,
            OutboxUnavailable: _outbox_unavailable,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
        openapi_config=OpenAPIConfig(
            title="idgate",
            version="0.1.0",
            description="Privacy-compliant identity resolution and consent gateway",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(), JsonRenderPlugin()],
            use_handler_docstrings=True,
        ),
        debug=False,
        logging_config=None,  # gateway.logging configures structlog JSON for everything
    )
