"""Wiring of the consent domain for the app: database, ledger, state store, services, policy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
import structlog

from consent.access_log import AccessLog
from consent.audit import ConsentAudit
from consent.db import migrate_consent
from consent.decisions import DeliveryVerdict, DestinationSpec
from consent.ledger import Ledger
from consent.proofs import DeliveryProofs
from consent.rotation import SubjectAliases
from consent.service import ConsentService, LedgerPolicy, PurposeRules, non_personalised_ticket
from consent.signing import InvalidLedgerKey, LedgerSigner, load_signer
from consent.state import ConsentStateStore, RedisConsentState, SqlConsentState
from export.delivery import OnDelivered, OnWithheld, Recheck
from export.outbox import StoredRecord
from gateway.config import Config, Tenant
from gateway.privacy import message_id_digest
from gateway.settings import Settings
from identity.db import make_engine
from identity.pseudonym import MESSAGE_ID, KeyRing

log = structlog.get_logger(__name__)


@dataclass
class ConsentRuntime:
    engine: sa.Engine
    ledger: Ledger
    store: ConsentStateStore
    service: ConsentService
    policy: LedgerPolicy
    audit: ConsentAudit
    proofs: DeliveryProofs
    access_log: AccessLog
    store_kind: str

    def close(self) -> None:
        self.proofs.close()
        self.engine.dispose()


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
    proofs = DeliveryProofs(engine)
    aliases = SubjectAliases(engine)
    return ConsentRuntime(
        engine=engine,
        ledger=ledger,
        store=store,
        service=service,
        policy=LedgerPolicy(store, rules, aliases),
        audit=ConsentAudit(ledger, proofs, aliases),
        proofs=proofs,
        access_log=AccessLog(engine),
        store_kind=kind,
    )


def delivery_recheck(policy: LedgerPolicy, specs: Mapping[str, DestinationSpec]) -> Recheck:
    """Consent asked again at send time, for the delivery workers: each record withheld
    (None), as it is, or flagged non-personalised when the subject lost the
    ``personalisation`` basis since it was accepted (PIPL Art. 24; its ticket says so too,
    so a retry or a dead-letter replay does not ask to rewrite it again)."""

    async def recheck(destination: str, records: Sequence[StoredRecord]) -> list[StoredRecord | None]:
        answers: list[StoredRecord | None] = list(records)
        changed = await policy.ask_again(specs[destination], [r.consent for r in records])
        for i, verdict in changed.items():
            if verdict is DeliveryVerdict.WITHHOLD:
                answers[i] = None
            elif verdict is DeliveryVerdict.SEND_NON_PERSONALISED:
                r = records[i]
                answers[i] = msgspec.structs.replace(
                    r, payload=non_personalised(r.payload), consent=non_personalised_ticket(r.consent)
                )
        return answers

    return recheck


_decode_event = msgspec.json.Decoder(dict[str, Any]).decode
_encode_event = msgspec.json.Encoder().encode


def non_personalised(payload: bytes) -> bytes:
    """An outbox event's payload with ``context.idgate.personalisation`` false (the flag
    gateway.pipeline.encode_for_outbox writes); idgate's own context only, so a property
    that happens to be called ``personalisation`` is left alone."""
    event = _decode_event(payload)
    context = event.get("context")
    idgate = context.get("idgate") if isinstance(context, dict) else None
    if not isinstance(idgate, dict) or idgate.get("personalisation") is not True:
        return payload
    idgate["personalisation"] = False
    return _encode_event(event)


# (tenant, message id) -> how the proofs table keeps it: a keyed hash
MessageKey = Callable[[str, str], str]


def message_keys(keyring: KeyRing) -> MessageKey:
    """Message ids as the delivery proofs keep them (gateway.privacy.message_id_digest)."""

    def key(tenant: str, message_id: str) -> str:
        # the anchor version's message-id derivation: the same digest across key rotations
        return message_id_digest(message_id, keyring.anchor(tenant).internal(MESSAGE_ID))

    return key


def delivery_trail(proofs: DeliveryProofs, message_key: MessageKey) -> OnDelivered:
    """Record, in the shared consent store, which consent records each delivery relied on
    (message ids as keyed hashes: ``message_key(tenant, message_id)``)."""

    async def on_delivered(destination: str, records: Sequence[StoredRecord]) -> None:
        delivered = [(message_key(r.tenant, r.message_id), r.proof) for r in records if r.proof]
        if delivered:
            await asyncio.to_thread(proofs.record, destination, delivered)

    return on_delivered


def delivery_retraction(proofs: DeliveryProofs, message_key: MessageKey) -> OnWithheld:
    """Take back the proofs of events a retry withheld (consent withdrawn meanwhile)."""

    async def on_withheld(destination: str, records: Sequence[StoredRecord]) -> None:
        withheld = [message_key(r.tenant, r.message_id) for r in records if r.proof]
        await asyncio.to_thread(proofs.forget, destination, withheld)

    return on_withheld


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
