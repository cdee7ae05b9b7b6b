"""Wiring of the identity domain for the app: database, change log, resolver, service."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from export.outbox import Outbox, notice_record
from gateway import identity_metrics
from gateway.config import Config, Tenant
from gateway.settings import Settings
from identity.db import make_engine
from identity.graph import IdentityRules
from identity.notices import Notice
from identity.pseudonym import KeyRing
from identity.resolution import IdentityResolver, NoResolution
from identity.resolver import GraphResolver
from identity.service import IdentityService, NoticePublisher
from identity.store import IdentityLogStore, migrate_identity
from identity.unified_ids import versioned_unified_id


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


def identity_database_url(settings: Settings) -> str:
    return settings.database_url or f"sqlite:///{settings.data_dir / 'identity.sqlite3'}"


def notice_publisher(config: Config, outbox: Outbox, notify: Callable[[], None]) -> NoticePublisher:
    """Notices go to the outbox for every destination of their tenant (delivery sends each
    only where the person's data went), deduplicated by their stable message ids."""
    destinations = {t.id: tuple(d.id for d in t.destinations) for t in config.tenants}

    async def publish(tenant: str, notices: Sequence[Notice]) -> None:
        if notices:
            await outbox.append([notice_record(n, destinations[tenant]) for n in notices], dedupe=True)
            notify()

    return publish


async def open_identity(
    settings: Settings, config: Config, keyring: KeyRing, publish: NoticePublisher
) -> tuple[IdentityResolver, IdentityService, sa.Engine | None]:
    tenants = {t.id: t for t in config.tenants if t.identity.enabled}
    if not tenants:
        resolver: IdentityResolver = NoResolution()
        return resolver, IdentityService(resolver, publish), None
    engine = make_engine(identity_database_url(settings))
    await asyncio.to_thread(migrate_identity, engine)
    graph_resolver = GraphResolver(
        IdentityLogStore(engine),
        {tid: identity_rules(t) for tid, t in tenants.items()},
        node_ids={tid: versioned_unified_id(keyring, tid) for tid in tenants},
    )
    service = IdentityService(graph_resolver, publish)
    graph_resolver.on_changes = service.on_changes
    identity_metrics.watch(graph_resolver)
    await graph_resolver.start()
    return graph_resolver, service, engine
