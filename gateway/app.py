"""The Litestar application: one factory, one lifespan that opens every resource.

``create_app`` loads and checks the configuration and keys (failing fast), and the lifespan
opens the outbox, Redis (when configured) and the delivery workers, and puts them on
``app.state``. The ingest endpoints live in ``gateway.ingest_http``; this module holds
the operations endpoints and the one place where errors become HTTP responses.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consent.service import ConsentRefused
from export.dedupe import RedisDedupe
from export.delivery import DeliveryService
from export.outbox import OutboxUnavailable
from gateway import metrics
from gateway.admin_http import AdminContext, AdminController, index_admin_tokens
from gateway.config import Config, index_write_keys, load_config
from gateway.consent_http import consent_route
from gateway.consent_setup import checkpoint_periodically, ledger_signer, open_consent
from gateway.delivery_setup import build_delivery, open_dead_letters, open_outbox
from gateway.identity_setup import open_identity
from gateway.ingest_http import INGEST_ROUTES, IngestContext, document_ingest_routes, error_body
from gateway.pipeline import Ingestor, Overloaded
from gateway.segment import InvalidRequest
from gateway.sensors_http import SENSORS_ROUTES, document_sensors_routes
from gateway.settings import Settings
from identity.pseudonym import InvalidKeyMaterial, KeyRing, new_key_document, write_private_file
from identity.resolver import GraphResolver

log = structlog.get_logger("idgate.gateway")


@dataclass
class GatewayState:
    settings: Settings
    config: Config
    keyring: KeyRing
    outbox: Any  # SqliteOutbox or RedisStreamOutbox
    delivery: DeliveryService
    redis: Any = None


def load_keyring(settings: Settings, config: Config) -> KeyRing:
    """Keys from IDGATE_KEYS / IDGATE_KEY_FILE; in dev, a generated key file under the data dir."""
    key_file = settings.key_file
    if not settings.keys_json and key_file is None and (settings.redis_url or settings.database_url):
        raise InvalidKeyMaterial(
            "replicas sharing Redis or PostgreSQL must share pseudonymisation keys: "
            "set IDGATE_KEYS or IDGATE_KEY_FILE (idgate keys generate)"
        )
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


def _error_response(
    status: int,
    error: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request[Any, Any, Any] | None = None,
    **extra: Any,
) -> Response[Any]:
    metrics.REQUESTS_REFUSED.labels(error).inc()
    if request is not None and request.scope["path"] in ("/sa", "/sa.gif"):
        # Browser Sensors SDKs post cross-origin: without this header they cannot read the
        # error and treat it as a network failure (and retry).
        headers = {**(headers or {}), "Access-Control-Allow-Origin": "*"}
    return Response(error_body(error, detail, field, **extra), status_code=status, headers=headers)


# -- operations ------------------------------------------------------------------------------
@get("/healthz", tags=["operations"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["operations"], summary="Readiness: outbox writer, Redis; delivery state")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    """Ready while events can be stored durably. A failing destination does not make the
    gateway unready (its events wait in the outbox; reported under ``destinations``), nor
    does a full outbox: ingest itself answers 503 with Retry-After then, which SDKs retry,
    where an unready replica would only be taken out of the load balancer."""
    state: GatewayState = request.app.state.gateway
    checks: dict[str, bool] = {"outbox": state.outbox.alive}
    if state.redis is not None:
        try:
            checks["redis"] = bool(await state.redis.ping())
        except Exception:
            checks["redis"] = False
    ok = all(checks.values())
    destinations = {w.destination: "ok" if w.healthy else "retrying" for w in state.delivery.workers}
    backlog = {"events": state.delivery.backlog, "overloaded": state.delivery.overloaded}
    return Response(
        {
            "status": "ready" if ok else "not_ready",
            "checks": checks,
            "destinations": destinations,
            "backlog": backlog,
        },
        status_code=200 if ok else 503,
    )


@get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics() -> Response[bytes]:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# -- errors ----------------------------------------------------------------------------------
def _invalid_request(request: Request[Any, Any, Any], exc: InvalidRequest) -> Response[Any]:
    return _error_response(exc.status, exc.error, exc.detail, exc.field, request=request)


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    names = {
        400: "invalid_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
        429: "rate_limited",
    }
    error = names.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "unavailable")
    # Litestar's parameter validation names the offending query/path parameter in ``extra``.
    extra = getattr(exc, "extra", None)
    field = None
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        field = extra[0].get("key")
    return _error_response(
        exc.status_code, error, str(exc.detail), field, headers=exc.headers, request=request
    )


def _consent_refused(request: Request[Any, Any, Any], exc: ConsentRefused) -> Response[Any]:
    return _error_response(400, "invalid_consent", exc.detail, exc.field, request=request)


def _outbox_unavailable(request: Request[Any, Any, Any], exc: OutboxUnavailable) -> Response[Any]:
    log.error("ingest.outbox_unavailable", detail=str(exc))
    return _error_response(
        503,
        "unavailable",
        "events could not be stored durably; retry",
        None,
        headers={"Retry-After": "2"},
        request=request,
    )


def _overloaded(request: Request[Any, Any, Any], exc: Overloaded) -> Response[Any]:
    return _error_response(
        503, "overloaded", str(exc), None, headers={"Retry-After": str(exc.retry_after)}, request=request
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected_error", error=type(exc).__name__)
    return _error_response(
        500,
        "internal_error",
        "unexpected error; nothing from this request was acknowledged",
        request=request,
    )


# -- factory ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path, dev=settings.dev)
    keyring = load_keyring(settings, config)
    signer = ledger_signer(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis_client = None
        redis_dedupe = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            redis_client = aioredis.from_url(settings.redis_url)
            await redis_client.ping()
            redis_dedupe = RedisDedupe(
                redis_client,
                window_seconds=config.limits.dedupe_window_seconds,
                claim_seconds=settings.dedupe_claim_seconds,
                prefix=f"{settings.redis_prefix}:dedupe",
            )
        outbox = open_outbox(settings, config.limits.dedupe_window_seconds, redis_client)
        dead_letters = open_dead_letters(settings)
        consent = await open_consent(settings, config, redis_client, signer)
        delivery = build_delivery(settings, config, keyring, consent, outbox, dead_letters)
        resolver, identity_engine = await open_identity(settings, config, outbox, delivery.notify, keyring)
        ingestor = Ingestor(
            keyring=keyring,
            outbox=outbox,
            consent=consent.policy,
            resolver=resolver,
            redis_dedupe=redis_dedupe,
            on_appended=delivery.notify,
            consent_service=consent.service,
            overloaded=lambda: delivery.overloaded,
        )
        app.state.gateway = GatewayState(
            settings=settings,
            config=config,
            keyring=keyring,
            outbox=outbox,
            delivery=delivery,
            redis=redis_client,
        )
        app.state.ingest = IngestContext(
            config=config,
            write_keys=index_write_keys(config, dev=settings.dev),
            ingestor=ingestor,
            keyring=keyring,
        )
        app.state.consent = consent.service
        app.state.admin = AdminContext(
            config=config,
            tokens=index_admin_tokens(config.admin_tokens, dev=settings.dev),
            keyring=keyring,
            ledger=consent.ledger,
            consent=consent.service,
            outbox=outbox,
            resolver=resolver,
            notify=delivery.notify,
        )
        await delivery.start()
        checkpoints = asyncio.create_task(
            checkpoint_periodically(consent.ledger, settings.checkpoint_seconds), name="ledger-checkpoint"
        )
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's way, so full collections stay short on the hot path.
        gc.collect()
        gc.freeze()
        log.info(
            "gateway.started",
            env=settings.env,
            tenants=[t.id for t in config.tenants],
            destinations=[w.destination for w in delivery.workers],
            redis=bool(redis_client),
            consent_enforced={t.id: t.consent.enforce for t in config.tenants},
            consent_store=consent.store_kind,
        )
        try:
            yield
        finally:
            checkpoints.cancel()
            if isinstance(resolver, GraphResolver):
                await resolver.stop()
            await delivery.stop()
            outbox.close()
            dead_letters.close()
            consent.engine.dispose()
            if identity_engine is not None:
                identity_engine.dispose()
            if redis_client is not None:
                await redis_client.aclose()
            log.info("gateway.stopped")

    return Litestar(
        route_handlers=[
            *INGEST_ROUTES,
            *SENSORS_ROUTES,
            consent_route,
            AdminController,
            healthz,
            readyz,
            prometheus_metrics,
        ],
        lifespan=[lifespan],
        on_startup=[document_ingest_routes, document_sensors_routes],
        # Above this Litestar refuses the body before reading it; _read_body applies the exact limit.
        request_max_body_size=config.limits.max_batch_bytes + 1024,
        exception_handlers={
            InvalidRequest: _invalid_request,
            OutboxUnavailable: _outbox_unavailable,
            Overloaded: _overloaded,
            ConsentRefused: _consent_refused,
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
