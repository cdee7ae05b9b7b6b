"""Wiring of the delivery domain for the app: the outbox, dead letters, and one worker per
destination of every tenant.

Each worker gets its destination's queue on the outbox, its sink, its retry policy, the
dead-letter store, the re-keying for its pseudonym domain, and the consent re-check.
"""

from __future__ import annotations

from typing import Any

import structlog

from export.deadletter import DeadLetterStore, RedisDeadLetters, SqliteDeadLetters
from export.dedupe import RedisDedupe
from export.delivery import DeliveryService, DeliveryWorker, OnDeletionNotices, Retry
from export.domains import DomainRekeyer
from export.minimise import PropertyMinimiser
from export.outbox import Outbox
from export.redis_outbox import RedisStreamOutbox
from export.sinks import build_sink
from export.sqlite_outbox import SqliteOutbox
from export.violations import RedisViolations, SqliteViolations, ViolationStore, move_records
from gateway.config import Config, Destination, Tenant
from gateway.consent_setup import (
    ConsentRuntime,
    delivery_recheck,
    delivery_retraction,
    delivery_trail,
    message_keys,
)
from gateway.pipeline import destination_specs
from gateway.plan import keys_of_class, plan_for
from gateway.settings import Settings
from identity.pseudonym import DOMAIN, KeyRing

log = structlog.get_logger(__name__)


def redis_options() -> dict[str, Any]:
    """How every replica talks to Redis: a command that meets a connection Redis (or a
    network device) dropped is retried once on a new one, instead of failing the request
    that happened to take it from the pool; a Redis that hangs fails a request after 2 s
    rather than holding it."""
    import redis.asyncio.retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    return {
        "retry": redis.asyncio.retry.Retry(NoBackoff(), 1),
        "retry_on_error": [ConnectionError, TimeoutError],
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "health_check_interval": 15,
    }


def open_outbox(settings: Settings, dedupe_window_seconds: int, redis_client: Any) -> Outbox:
    """The outbox of the deployment mode (settings.outbox_kind); Redis needs ``redis_client``
    (redis.asyncio). With Redis, message-id claims are shared by every replica."""
    dedupe = (
        RedisDedupe(
            redis_client,
            window_seconds=dedupe_window_seconds,
            claim_seconds=settings.dedupe_claim_seconds,
            prefix=f"{settings.redis_prefix}:dedupe",
        )
        if redis_client is not None
        else None
    )
    if settings.outbox_kind == "redis":
        assert dedupe is not None
        return RedisStreamOutbox(
            redis_client,
            prefix=settings.redis_prefix,
            replica=settings.replica_id,
            dedupe=dedupe,
            dedupe_window_seconds=dedupe_window_seconds,
            claim_idle_ms=settings.claim_idle_ms,
            max_pending=settings.outbox_max_pending,
        )
    outbox = SqliteOutbox(
        settings.outbox_path,
        dedupe_window_seconds=dedupe_window_seconds,
        shared_dedupe=dedupe,
        max_pending=settings.outbox_max_pending,
    )
    outbox.open()
    return outbox


def open_dead_letters(settings: Settings) -> DeadLetterStore:
    """The dead-letter store beside the deployment's outbox."""
    if settings.outbox_kind == "redis":
        from identity.redis_client import open_redis

        assert settings.redis_url
        return RedisDeadLetters(open_redis(settings.redis_url), settings.redis_prefix)
    return SqliteDeadLetters(settings.dead_letter_path)


def open_violations(settings: Settings) -> ViolationStore:
    """The tracking plan's violation records: with Redis one store every replica shares (like
    the plan's live tail and coverage counts), else ``violations.sqlite3`` in the data dir."""
    local = settings.data_dir / "violations.sqlite3"
    if settings.redis_url:
        from identity.redis_client import open_redis

        shared = RedisViolations(
            open_redis(settings.redis_url), settings.redis_prefix, max_records=settings.violations_max_records
        )
        if local.exists():  # kept by this replica before it shared them: moved, not orphaned
            own = SqliteViolations(local)
            try:
                moved, left = move_records(own, shared)
            finally:
                own.close()
            if left:  # the shared store is at its bound: the rest waits for the next start
                log.warning("plan.violations_not_moved", moved=moved, left=left)
            elif moved:
                log.info("plan.violations_moved", records=moved)
        return shared
    return SqliteViolations(local)


def retry_policy(d: Destination) -> Retry:
    r = d.retry
    return Retry(
        max_attempts=r.max_attempts,
        max_age_seconds=r.max_age_seconds,
        initial_backoff=r.initial_backoff_ms / 1000,
        max_backoff=r.max_backoff_ms / 1000,
    )


def rekeyer(keyring: KeyRing, tenant: str, d: Destination) -> DomainRekeyer:
    # the anchor version, not the active one: a rotation must not change every value downstream
    return DomainRekeyer(keyring.anchor(tenant).internal(DOMAIN), d.pseudonym_domain or d.id)


def minimiser(tenant: Tenant, d: Destination) -> PropertyMinimiser | None:
    """What the destination may receive (``properties``, ``data_classes``), or None: all."""
    if not d.properties and not d.data_classes:
        return None
    names = [p for p in d.properties if not any(c in p for c in "*?[")]
    globs = [p for p in d.properties if p not in names]
    return PropertyMinimiser([*names, *keys_of_class(tenant, *d.data_classes)], globs)


def minimisation_warnings(config: Config) -> list[str]:
    """Destinations asking for a data class their purposes do not need: no plan event that
    serves one of their purposes carries a property of it, or (``sensitive``) they lack the
    ``sensitive_pi`` purpose such properties pass with. ``idgate config check`` prints them."""
    found: list[str] = []
    for i, t in enumerate(config.tenants):
        plan = plan_for(t)
        for j, d in enumerate(t.destinations):
            if not d.data_classes or plan is None:
                continue
            where = f"tenants[{i}].destinations[{j}].data_classes"
            purposes = set(d.purposes)
            carried = {
                c for e in plan.events.values() if purposes & set(e.spec.purposes) for c in e.classes.values()
            }
            found.extend(
                f"{where}: {c!r}: no plan event for its purposes ({', '.join(d.purposes)}) has one"
                for c in d.data_classes
                if c not in carried
            )
            if "sensitive" in d.data_classes and "sensitive_pi" not in purposes:
                found.append(
                    f"{where}: 'sensitive' properties pass only with sensitive_pi, not among its purposes"
                )
    return found


def build_delivery(
    settings: Settings,
    config: Config,
    keyring: KeyRing,
    consent: ConsentRuntime,
    outbox: Outbox,
    dead_letters: DeadLetterStore,
    on_deletion_notices: OnDeletionNotices | None = None,
) -> DeliveryService:
    specs = {
        d.id: spec
        for t in config.tenants
        for d, spec in zip(t.destinations, destination_specs(t.destinations), strict=True)
    }
    recheck = delivery_recheck(consent.policy, specs)
    trail = delivery_trail(consent.proofs, message_keys(keyring))
    retraction = delivery_retraction(consent.proofs, message_keys(keyring))
    workers = [
        DeliveryWorker(
            outbox.queue(d.id),
            build_sink(d.sink, root=settings.sink_dir, destination=d.id, options=d.options),
            batch_size=min(d.batch_size, settings.delivery_batch_size),
            poll_seconds=settings.delivery_poll_seconds,
            retry=retry_policy(d),
            dead_letters=dead_letters,
            rekey=rekeyer(keyring, t.id, d),
            minimise=minimiser(t, d),
            recheck=recheck,
            on_delivered=trail,
            on_withheld=retraction,
            on_deletion_notices=on_deletion_notices,
        )
        for t in config.tenants
        for d in t.destinations
    ]
    return DeliveryService(outbox, workers, max_backlog=settings.outbox_max_pending)
