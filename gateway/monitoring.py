"""Wiring of the business KPIs (export.kpis) into the gateway: the pipeline's feed, the
refresh loop that keeps the latest values for /metrics and evaluates alert rules.

The feed sees every event of a batch past dedupe: the accepted ones with the purposes the
consent decision found a basis for (contract purposes, and what the allowed destinations
need), the dropped ones with contract purposes only, so each KPI knows what it could not
count (consent coverage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from export.kpis import WINDOWS, KpiEngine, KpiEvent, KpiReport, KpiStore, MemoryKpiStore, RedisKpiStore
from gateway import metrics
from gateway.config import Config, Tenant

if TYPE_CHECKING:
    from gateway.pipeline import IngestBatch

log = structlog.get_logger("idgate.monitoring")


@dataclass(frozen=True)
class _Bases:
    contract: frozenset[str]
    by_destination: Mapping[str, frozenset[str]]
    everything: frozenset[str]
    enforced: bool


def _bases(tenant: Tenant) -> _Bases:
    purposes = tenant.all_purposes()
    contract = frozenset(p for p, v in purposes.items() if v.legal_basis == "contract")
    by_destination: dict[str, frozenset[str]] = {}
    for d in tenant.destinations:
        needed = set(d.purposes)
        if d.region == "overseas":
            needed.add("cross_border")
        if d.recipient and d.recipient.third_party:
            needed.add("third_party_sharing")
        by_destination[d.id] = contract | needed
    return _Bases(contract, by_destination, frozenset(purposes), tenant.consent.enforce)


class KpiFeed:
    """The pipeline's ``observe_kpis`` callback: one batch's events into the engine."""

    def __init__(self, engine: KpiEngine, config: Config) -> None:
        self.engine = engine
        self.bases = {t.id: _bases(t) for t in config.tenants}

    async def __call__(self, batch: IngestBatch) -> None:
        src = batch.src
        bases = self.bases[src.tenant.id]
        accepted = {id(e) for e in batch.envelopes}
        events = []
        for env in batch.claimed:
            ev = env.event
            name = ev.event if ev.type == "track" and ev.event else f"${ev.type}"
            purposes: Any
            if id(env) not in accepted:
                purposes = bases.contract  # dropped: only what needs no consent
            elif not bases.enforced:
                purposes = bases.everything
            else:
                destinations = env.destinations

                def purposes(d: tuple[str, ...] = destinations) -> frozenset[str]:
                    out = bases.contract
                    for dest in d:
                        out = out | bases.by_destination.get(dest, frozenset())
                    return out

            events.append(
                KpiEvent(
                    name,
                    ev.name,
                    ev.properties or {},
                    purposes,
                    env.unified_id or ev.user_id or ev.anonymous_id,
                )
            )
        try:
            await self.engine.observe(src.tenant.id, src.source.id, events)
        except Exception as exc:  # after the ack point: the events are stored, KPIs lag
            log.warning("kpis.observe_failed", tenant=src.tenant.id, error=type(exc).__name__)


class AlertStatus(msgspec.Struct, rename="camel", omit_defaults=True):
    rule: str
    state: str


@dataclass
class Monitoring:
    """The KPI engine, the latest reports per tenant and the refresh/evaluation loop."""

    engine: KpiEngine
    feed: KpiFeed
    interval_seconds: float
    reports: dict[str, list[KpiReport]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def alert_states(self, tenant: str) -> list[AlertStatus]:
        return []

    async def refresh(self) -> None:
        for tenant in self.engine.tenants:
            self.reports[tenant] = await self.engine.report(tenant)
        metrics.KPIS.reports = self.reports

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("kpis.refresh_failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kpi-monitoring")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def build_monitoring(
    config: Config, redis: Any, *, prefix: str, bucket_seconds: float, interval_seconds: float
) -> Monitoring:
    retention = 2 * max(WINDOWS) + 2
    store: KpiStore = (
        RedisKpiStore(redis, prefix, retention, bucket_seconds)
        if redis is not None
        else MemoryKpiStore(retention)
    )
    engine = KpiEngine(
        store,
        {t.id: t.all_kpis() for t in config.tenants},
        {t.id: {s.id: s.platform for s in t.sources} for t in config.tenants},
        bucket_seconds=bucket_seconds,
    )
    return Monitoring(engine, KpiFeed(engine, config), interval_seconds)
