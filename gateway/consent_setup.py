"""Wiring of the consent domain for the app: database, ledger, state store, service, policy."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
import structlog

from consent.db import migrate_consent
from consent.decisions import ConsentQuery, ConsentTicket, DestinationSpec
from consent.ledger import Ledger
from consent.service import ConsentService, LedgerPolicy, PurposeRules
from consent.signing import InvalidLedgerKey, LedgerSigner, load_signer
from consent.state import ConsentStateStore, RedisConsentState, SqlConsentState
from export.delivery import OnDelivered, Recheck
from export.outbox import StoredRecord
from gateway.config import Config, Tenant
from gateway.settings import Settings
from identity.db import make_engine

log = structlog.get_logger(__name__)


@dataclass
class ConsentRuntime:
    engine: sa.Engine
    ledger: Ledger
    store: ConsentStateStore
    service: ConsentService
    policy: LedgerPolicy
    store_kind: str


def purpose_rules(tenant: Tenant) -> PurposeRules:
    purposes = tenant.all_purposes()
    return PurposeRules(
        contract=frozenset(p for p, spec in purposes.items() if spec.legal_basis == "contract"),
        kinds={p: spec.kind for p, spec in purposes.items()},
    )


def ledger_signer(settings: Settings) -> LedgerSigner:
    """The ledger's signing key, checked before the server starts."""
    if settings.database_url and not (settings.ledger_key or settings.ledger_key_file):
        raise InvalidLedgerKey(
            "replicas sharing PostgreSQL must share the ledger signing key: "
            "set IDGATE_LEDGER_KEY or IDGATE_LEDGER_KEY_FILE (idgate keys ledger-key)"
        )
    return load_signer(
        env_value=settings.ledger_key,
        key_file=settings.ledger_key_file,
        dev_file=settings.dev_ledger_key_file if settings.dev else None,
    )


async def open_consent(
    settings: Settings, config: Config, redis_client: Any, signer: LedgerSigner
) -> ConsentRuntime:
    engine = make_engine(settings.consent_database_url)
    await asyncio.to_thread(migrate_consent, engine)
    ledger = Ledger(engine, signer)
    store: ConsentStateStore
    if redis_client is not None:
        store, kind = RedisConsentState(redis_client, prefix=settings.redis_prefix), "redis"
    else:
        store, kind = SqlConsentState(engine), engine.dialect.name
    rules = {t.id: purpose_rules(t) for t in config.tenants}
    service = ConsentService(ledger, store, rules)
    caught_up = await service.catch_up()
    if caught_up:
        log.info("consent.projection_caught_up", records=caught_up)
    for tenant in config.tenants:
        for notice in tenant.notices:
            await service.publish_notice(tenant.id, notice.id, notice.content_sha256)
    return ConsentRuntime(engine, ledger, store, service, LedgerPolicy(store, rules), kind)


def delivery_recheck(policy: LedgerPolicy, specs: Mapping[str, DestinationSpec]) -> Recheck:
    """Consent asked again at send time: a withdrawal that landed while an event waited in
    the outbox stops it for the withdrawn purposes. Events decided after the last
    restricting record (a withdrawal, a minor flag, a material notice) cannot have lost
    their basis and are not asked again."""
    decode = msgspec.json.Decoder(ConsentTicket).decode

    async def recheck(destination: str, records: Sequence[StoredRecord]) -> list[bool]:
        still = [True] * len(records)
        current = await policy.restrictive_seq()
        by_tenant: dict[str, list[tuple[int, ConsentQuery]]] = {}
        for i, r in enumerate(records):
            if not r.consent:
                continue
            ticket = decode(r.consent)
            if ticket.epoch >= current:
                continue
            by_tenant.setdefault(ticket.query.tenant, []).append((i, ticket.query))
        for items in by_tenant.values():
            decisions = await policy.decide_batch([q for _, q in items], [specs[destination]])
            for (i, _), decision in zip(items, decisions, strict=True):
                still[i] = destination in decision.destinations
        return still

    return recheck


def delivery_trail(service: ConsentService) -> OnDelivered:
    """Record, in the shared consent store, which consent records each delivery relied on."""

    async def on_delivered(destination: str, records: Sequence[StoredRecord]) -> None:
        delivered = [(r.message_id, r.proof) for r in records if r.proof]
        if delivered:
            await asyncio.to_thread(service.record_deliveries, destination, delivered)

    return on_delivered


async def checkpoint_periodically(ledger: Ledger, seconds: float) -> None:
    """Sign a checkpoint over the records appended since the last one, every ``seconds``
    (the ledger also checkpoints every 1,000 records). Replicas may all run this: the
    ledger's lock lets one of them find something to sign."""
    while True:
        await asyncio.sleep(seconds)
        try:
            checkpoint = await asyncio.to_thread(ledger.checkpoint)
            if checkpoint is not None:
                log.info("ledger.checkpointed", from_seq=checkpoint.from_seq, to_seq=checkpoint.to_seq)
        except Exception as exc:  # retried at the next period
            log.error("ledger.checkpoint_failed", error=type(exc).__name__)
