"""Wiring of the identity domain for the app: database, log, resolver, downstream notices."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from export.outbox import OutboxRecord, SqliteOutbox
from gateway.config import Config, Tenant
from gateway.settings import Settings
from identity.db import make_engine, migrate
from identity.graph import GraphChange, IdentityRules, Merged, Split
from identity.pseudonym import KeyRing
from identity.resolution import IdentityResolver, NoResolution
from identity.resolver import GraphResolver
from identity.store import MIGRATIONS_DIR, IdentityLogStore


def identity_rules(tenant: Tenant) -> IdentityRules:
    base = IdentityRules()
    cfg = tenant.identity
    return IdentityRules(
        max_per_type={**base.max_per_type, **cfg.max_per_type},
        priority=base.priority,
        max_component=cfg.max_component,
        breaker_max_merges=cfg.breaker_max_merges,
        breaker_window_seconds=cfg.breaker_window_seconds,
    )


def _notice_id(kind: str, *parts: str) -> str:
    """A notice's message id: stable (redelivery dedupes) and opaque (it must not carry the
    tenant-domain unified ID, which destinations only see re-keyed for their domain)."""
    return f"{kind}:" + hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def notices_for(tenant: Tenant, changes: Sequence[GraphChange]) -> list[OutboxRecord]:
    """Merge and split notices for every destination of the tenant, in its outbox format."""
    records = []
    destinations = tuple(d.id for d in tenant.destinations)
    for c in changes:
        at = c.at.astimezone(UTC)
        if isinstance(c, Merged):
            body: dict[str, Any] = {
                "type": "identity.merged",
                "messageId": _notice_id("identity.merged", c.merged),
                "survivor": c.survivor,
                "merged": c.merged,
            }
        elif isinstance(c, Split):
            body = {
                "type": "identity.split",
                "messageId": _notice_id("identity.split", c.old_unified_id, str(at.timestamp())),
                "previous": c.old_unified_id,
                "parts": sorted(set(c.parts.values())),
            }
        else:
            continue
        body["receivedAt"] = at.isoformat()
        body["context"] = {"idgate": {"tenant": tenant.id, "notice": True}}
        records.append(
            OutboxRecord(
                tenant=tenant.id,
                source="idgate",
                message_id=body["messageId"],
                received_at_ms=int(at.timestamp() * 1000),
                destinations=destinations,
                payload=msgspec.json.encode(body),
            )
        )
    return records


def deletion_notice(tenant: Tenant, unified_id: str, nodes: Sequence[str], at: datetime) -> OutboxRecord:
    """``identity.deleted``: these identifiers of the person were erased; recipients delete
    what they hold under them (and under the unified ID when ``person`` is true)."""
    when = at.astimezone(UTC)
    identifiers = [{"type": n.split(":", 1)[0], "id": n.split(":", 1)[1]} for n in sorted(nodes)]
    body: dict[str, Any] = {
        "type": "identity.deleted",
        "messageId": _notice_id("identity.deleted", unified_id, *sorted(nodes)),
        "unifiedId": unified_id,
        "identifiers": identifiers,
        "receivedAt": when.isoformat(),
        "context": {"idgate": {"tenant": tenant.id, "notice": True}},
    }
    return OutboxRecord(
        tenant=tenant.id,
        source="idgate",
        message_id=body["messageId"],
        received_at_ms=int(when.timestamp() * 1000),
        destinations=tuple(d.id for d in tenant.destinations),
        payload=msgspec.json.encode(body),
    )


def derived_unified_id(pseudonym: Callable[[str], str]) -> Callable[[str], str]:
    """A new identifier's first unified ID: a keyed PRF (the tenant's key) of its node, so
    every replica gives it the same opaque ID without coordination. It reveals nothing:
    without the key it cannot be computed from the identifier or its pseudonym."""

    # Derived again for every event of a never-linked identifier (it is not stored): cached.
    @functools.lru_cache(maxsize=100_000)
    def node_id(node: str) -> str:
        return "p_" + pseudonym(f"unified-id\x1f{node}").split(".", 1)[1]

    return node_id


async def open_identity(
    settings: Settings, config: Config, outbox: SqliteOutbox, notify: Callable[[], None], keyring: KeyRing
) -> tuple[IdentityResolver, sa.Engine | None]:
    tenants = {t.id: t for t in config.tenants if t.identity.enabled}
    if not tenants:
        return NoResolution(), None
    url = settings.database_url or f"sqlite:///{settings.data_dir / 'identity.sqlite3'}"
    engine = make_engine(url)
    await asyncio.to_thread(migrate, engine, script_location=MIGRATIONS_DIR)

    async def on_changes(tenant: str, changes: Sequence[GraphChange]) -> None:
        records = notices_for(tenants[tenant], changes)
        if records:
            await outbox.append(records, dedupe=True)
            notify()

    resolver = GraphResolver(
        IdentityLogStore(engine),
        {tid: identity_rules(t) for tid, t in tenants.items()},
        on_changes=on_changes,
        node_ids={tid: derived_unified_id(keyring.pseudonymiser(tid)) for tid in tenants},
    )
    await resolver.start()
    return resolver, engine
