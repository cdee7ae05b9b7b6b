"""The Litestar application: one factory, one lifespan that opens every resource.

``create_app`` loads and checks the configuration and keys (failing fast), and the lifespan
opens the outbox, Redis (when configured) and the delivery workers, and puts them on
``app.state``. The ingest endpoints live in ``gateway.ingest_http``; this module holds
the operations endpoints and the one place where errors become HTTP responses.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import structlog
from litestar import Litestar, Request, Response, get
from litestar.openapi import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consent.ledger import verify_database
from export.delivery import DeliveryService
from export.outbox import Outbox
from export.violations import SqliteViolations
from gateway.admin import ADMIN_CONTROLLERS, AdminServices
from gateway.admin.deps import log_refused_admin_request
from gateway.auth import AdminTokens, WriteKeys
from gateway.config import Config, index_sensors_tokens, index_write_keys, load_config
from gateway.consent_api import consent_controller
from gateway.consent_setup import checkpoint_periodically, ledger_signer, open_consent
from gateway.console import console_lifespan, console_routes, console_templates
from gateway.cors import cors, document_cors
from gateway.delivery_setup import (
    build_delivery,
    open_dead_letters,
    open_outbox,
    open_violations,
    redis_options,
    rekeyer,
)
from gateway.errors import exception_handlers
from gateway.exposures import open_exposures
from gateway.hot_routes import IdgateApp
from gateway.identity_setup import notice_publisher, open_identity
from gateway.ingest_http import INGEST_ROUTES, IngestContext, document_ingest_routes
from gateway.logging import request_context
from gateway.maintenance import keep_healthy
from gateway.monitoring import build_monitoring, check_alert_secrets, file_clock, open_alert_history
from gateway.openapi import docs_assets_routers, finish_document, openapi_config
from gateway.pipeline import Ingestor, IngestServices
from gateway.plan_admin import PlanMonitorController, PlanViolationsController
from gateway.plan_monitor import PlanMonitor
from gateway.plan_validate import VALIDATE_ROUTES, document_validate_routes
from gateway.rate_limits import open_rate_limiter
from gateway.retention_setup import RetentionStores, retention_periodically
from gateway.rights_setup import DeletionReceipts, follow_sink_purges, open_rights, resume_open_requests
from gateway.sensors_http import SENSORS_ROUTES, document_sensors_routes
from gateway.settings import Settings
from gateway.trust import assertion_verifiers
from gateway.withdrawal_setup import WithdrawalConsequences, sweep_periodically
from identity.key_files import key_file_mode_problem
from identity.pseudonym import InvalidKeyMaterial, KeyRing, new_key_document, write_private_file

log = structlog.get_logger("idgate.gateway")


@dataclass
class GatewayState:
    settings: Settings
    config: Config
    keyring: KeyRing
    outbox: Outbox
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
    problem = key_file_mode_problem(key_file) if key_file is not None and not settings.keys_json else None
    if problem is not None:
        raise InvalidKeyMaterial(f"pseudonymisation {problem}")
    keyring = KeyRing.load(env_value=settings.keys_json, key_file=key_file)
    for tenant in config.tenants:
        keyring.pseudonymiser(tenant.id)  # raises MissingKey now rather than on the first event
    return keyring


# -- operations ------------------------------------------------------------------------------
class Health(msgspec.Struct):
    status: Literal["ok"]


class Backlog(msgspec.Struct):
    events: Annotated[int, msgspec.Meta(ge=0, description="undelivered events a destination has not taken")]
    overloaded: Annotated[bool, msgspec.Meta(description="ingest answers 503 while true")]


class Readiness(msgspec.Struct):
    status: Literal["ready", "not_ready"]
    checks: Annotated[dict[str, bool], msgspec.Meta(description="what readiness needs: outbox, redis")]
    destinations: Annotated[
        dict[str, Literal["ok", "retrying"]],
        msgspec.Meta(description="delivery state per destination (does not affect readiness)"),
    ]
    backlog: Backlog


@get("/healthz", tags=["operations"], summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    tags=["operations"],
    summary="Readiness: outbox writer, Redis; delivery state",
    responses={
        503: ResponseSpec(Readiness, description="Not ready: a check failed", generate_examples=False)
    },
)
async def readyz(request: Request[Any, Any, Any]) -> Response[Readiness]:
    """Ready while events can be stored durably. A failing destination does not make the
    gateway unready (its events wait in the outbox; reported under ``destinations``), nor
    does a full outbox: ingest itself answers 503 with Retry-After then, which SDKs retry,
    where an unready replica would only be taken out of the load balancer."""
    state: GatewayState = request.app.state.gateway
    checks: dict[str, bool] = {"outbox": state.outbox.alive and state.outbox.accepting}
    if state.redis is not None:
        try:
            checks["redis"] = bool(await state.redis.ping())
        except Exception:
            checks["redis"] = False
    ok = all(checks.values())
    destinations: dict[str, Literal["ok", "retrying"]] = {
        w.destination: "ok" if w.healthy else "retrying" for w in state.delivery.workers
    }
    backlog = Backlog(events=state.delivery.backlog, overloaded=state.delivery.overloaded)
    return Response(
        Readiness(
            status="ready" if ok else "not_ready", checks=checks, destinations=destinations, backlog=backlog
        ),
        status_code=200 if ok else 503,
    )


# Prometheus' text format, for scrapers: not part of the OpenAPI document.
@get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics() -> Response[bytes]:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# -- factory ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path, dev=settings.dev)
    keyring = load_keyring(settings, config)
    signer = ledger_signer(settings)
    verifiers = assertion_verifiers(config, path=str(settings.config_path))
    check_alert_secrets(config, path=str(settings.config_path))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis_client = None
        if settings.redis_url:
            from identity.redis_client import open_async_redis

            redis_client = open_async_redis(settings.redis_url, **redis_options())
            await redis_client.ping()
        outbox = open_outbox(settings, config.limits.dedupe_window_seconds, redis_client)
        dead_letters = open_dead_letters(settings)
        violations = open_violations(settings)  # tracking plan
        plan_monitor = PlanMonitor(
            # embedded, the coverage counts live in the violation store's file; with Redis, in Redis
            violations if isinstance(violations, SqliteViolations) else None,
            redis=redis_client,
            prefix=settings.redis_prefix,
        )
        consent = await open_consent(settings, config, redis_client, signer)
        receipts = DeletionReceipts(config)
        delivery = build_delivery(settings, config, keyring, consent, outbox, dead_letters, receipts)
        resolver, identity, identity_engine = await open_identity(
            settings, config, keyring, notice_publisher(config, outbox, delivery.notify)
        )
        monitoring = build_monitoring(
            config,
            redis_client,
            prefix=settings.redis_prefix,
            bucket_seconds=settings.kpi_bucket_seconds,
            interval_seconds=settings.alert_interval_seconds,
            replica=settings.replica_id,
            clock=file_clock(settings.dev_clock_file) if settings.dev_clock_file else time.time,
            history=open_alert_history(settings),
        )
        ingestor = Ingestor(
            IngestServices(
                keyring=keyring,
                outbox=outbox,
                consent=consent.policy,
                resolver=resolver,
                consent_service=consent.service,
                identity=identity,
                assertions=verifiers,
                violations=violations,
                plan_monitor=plan_monitor,
                kpis=monitoring.feed,
                exposures=open_exposures(redis_client, settings.redis_prefix),
            ),
            on_appended=delivery.notify,
            coalesce=settings.ingest_coalesce,
        )
        rate_limiter = open_rate_limiter(config.rate_limits, redis_client, settings.redis_prefix)
        ingestor.services.rate_limiter = rate_limiter
        write_keys = WriteKeys(index_write_keys(config, dev=settings.dev))
        tokens = AdminTokens.build(config, config.admin_tokens, dev=settings.dev)
        state = app.state
        state.gateway = GatewayState(
            settings=settings,
            config=config,
            keyring=keyring,
            outbox=outbox,
            delivery=delivery,
            redis=redis_client,
        )
        state.ingest = IngestContext(
            config=config,
            write_keys=write_keys,
            ingestor=ingestor,
            keyring=keyring,
            rate_limiter=rate_limiter,
        )
        state.rate_limiter = rate_limiter
        state.write_keys = write_keys
        state.sensors_tokens = index_sensors_tokens(config, dev=settings.dev)
        state.keyring = keyring
        state.violations = violations
        state.plan_monitor = plan_monitor
        state.consent = consent.service
        state.assertions = verifiers
        state.admin_tokens = tokens
        state.monitoring = monitoring
        state.services = AdminServices(
            config=config,
            keyring=keyring,
            tokens=tokens,
            audit=consent.audit,
            access_log=consent.access_log,
            consent=consent.service,
            identity=identity,
            rekeyers={
                t.id: {d.id: rekeyer(keyring, t.id, d) for d in t.destinations} for t in config.tenants
            },
            verify_ledger=lambda: verify_database(consent.ledger),
        )
        state.rights = open_rights(
            config,
            consent.service,
            consent.proofs,
            identity,
            outbox,
            dead_letters,
            delivery,
            rate_limiter,
            receipts,
            violations,
        )
        withdrawals = WithdrawalConsequences(
            config,
            identity,
            outbox,
            consent.service.rules,
            delivery.notify,
            consent.ledger,
            consent.policy.aliases,
            hold=settings.dev_withdraw_all_hold,
        )
        withdrawals.rights = state.rights
        consent.service.on_withdrawn = withdrawals
        await withdrawals.start_sweep()
        await delivery.start()
        resumed = asyncio.create_task(resume_open_requests(state.rights), name="rights-resume")
        # on_withdraw_all = "delete": the deletions a withdrawal should have opened, opened
        swept = asyncio.create_task(sweep_periodically(withdrawals), name="withdraw-all-sweep")
        monitoring.start()
        state.proofs = consent.proofs  # the breach query (gateway.admin.breach)
        retention_stores = RetentionStores(
            outbox,
            dead_letters,
            consent.proofs,
            consent.access_log,
            consent.ledger,
            settings.sink_dir,
            violations,
            identity,
        )
        retention = asyncio.create_task(
            retention_periodically(
                config, retention_stores, settings.retention_interval_seconds, settings.replica_id
            ),
            name="retention",
        )
        checkpoints = asyncio.create_task(
            checkpoint_periodically(consent.ledger, settings.checkpoint_seconds), name="ledger-checkpoint"
        )
        # distributed mode: each replica's own sink files follow the deletions of all of them
        follow = (
            asyncio.create_task(
                follow_sink_purges(
                    consent.service,
                    delivery,
                    config,
                    settings.sink_dir / ".idgate-sink-purges",
                    violations=violations,
                ),
                name="rights-sink-purges",
            )
            if redis_client is not None
            else None
        )
        health = asyncio.create_task(
            keep_healthy(consent.service, outbox, settings.consent_reconcile_seconds), name="keep-healthy"
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
            retention.cancel()
            health.cancel()
            if follow is not None:
                follow.cancel()
            resumed.cancel()
            swept.cancel()
            await monitoring.stop()
            await resolver.stop()
            await delivery.stop()
            outbox.close()
            dead_letters.close()
            await plan_monitor.flush()
            violations.close()
            await consent.service.committer.close()
            consent.close()
            if identity_engine is not None:
                identity_engine.dispose()
            if redis_client is not None:
                await redis_client.aclose()
            log.info("gateway.stopped")

    app = IdgateApp(
        route_handlers=[
            *INGEST_ROUTES,
            *SENSORS_ROUTES,
            *VALIDATE_ROUTES,
            consent_controller(config.limits),
            *ADMIN_CONTROLLERS,
            PlanViolationsController,
            PlanMonitorController,
            healthz,
            readyz,
            prometheus_metrics,
            *docs_assets_routers(),
            *console_routes(),
        ],
        lifespan=[
            lifespan,
            console_lifespan(
                idle_minutes=settings.console_session_minutes, secure_cookie=settings.console_secure_cookie
            ),
        ],
        template_config=console_templates(),
        # Above this Litestar refuses the body before reading it; _read_body applies the exact limit.
        request_max_body_size=config.limits.max_batch_bytes + 1024,
        exception_handlers=exception_handlers(),
        # refused admin requests (401/403) go to the officers' access log too
        after_exception=[log_refused_admin_request],
        middleware=[request_context, cors(config)],
        openapi_config=openapi_config(),
        debug=False,
        logging_config=None,  # gateway.logging configures structlog JSON for everything
    )
    if settings.hot_routes:
        app.route_hot([*INGEST_ROUTES, *SENSORS_ROUTES, *VALIDATE_ROUTES])
    # The document is built now, from this configuration (its limits), not on the first request.
    openapi = app.openapi_schema
    document_ingest_routes(openapi, config.limits)
    document_sensors_routes(openapi, config.limits)
    document_validate_routes(openapi, config.limits)
    document_cors(openapi)
    finish_document(openapi)
    return app
