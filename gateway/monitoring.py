"""Wiring of the business KPIs (export.kpis) into the gateway: the pipeline's feed, the
refresh loop that keeps the latest values for /metrics and evaluates alert rules.

The feed sees every event of a batch past dedupe: the accepted ones with the purposes the
consent decision found a basis for (contract purposes, and what the allowed destinations
need), the dropped ones with contract purposes only, so each KPI knows what it could not
count (consent coverage).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from export.alert_history import AlertHistory, RedisAlertHistory, SqliteAlertHistory
from export.alerts import (
    AlertEvaluator,
    LocalLease,
    MemoryStateStore,
    Notifier,
    RedisLease,
    RedisStateStore,
    StateStore,
    missing_secrets,
)
from export.kpis import (
    DAY_SECONDS,
    WINDOWS,
    BufferedKpiStore,
    KpiEngine,
    KpiEvent,
    KpiReport,
    KpiStore,
    MemoryKpiStore,
    RedisKpiStore,
)
from gateway import metrics
from gateway.config import Config, ConfigProblems, Tenant
from gateway.health import HealthHistory
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.pipeline import IngestBatch

log = structlog.get_logger("idgate.monitoring")

# The Sensors SDKs' page views: their page name is $title (else $screen_name).
SENSORS_VIEWS = frozenset({"$pageview", "$AppViewScreen", "$MPViewScreen"})


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

            props = ev.properties or {}
            page_name = ev.name
            if name in SENSORS_VIEWS:
                page_name = props.get("$title") or props.get("$screen_name")
            events.append(
                KpiEvent(
                    name,
                    page_name,
                    props,
                    purposes,
                    env.unified_id or ev.user_id or ev.anonymous_id,
                    env.linkable,
                )
            )
        try:
            await self.engine.observe(src.tenant.id, src.source.id, events)
        except Exception as exc:  # after the ack point: the events are stored, KPIs lag
            log.warning("kpis.observe_failed", tenant=src.tenant.id, error=type(exc).__name__)


class AlertStatus(msgspec.Struct, rename="camel"):
    """An alert rule's shared state (the same whichever replica answers)."""

    rule: str
    kpi: str
    state: str
    since: float | None
    value: float | None
    previous: float | None
    evaluated_at: float | None
    evaluations: int
    notifications: int
    failures: int


@dataclass
class Monitoring:
    """The KPI engine, the latest reports per tenant and the refresh/evaluation loop."""

    engine: KpiEngine
    feed: KpiFeed
    interval_seconds: float
    alerts: AlertEvaluator
    states: StateStore
    replica: str
    config: Config
    buffer: BufferedKpiStore | None = None
    history: AlertHistory | None = None
    reports: dict[str, list[KpiReport]] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    # snapshots of the identity and pipeline counters, for the last hour's figures
    health: HealthHistory = field(default_factory=HealthHistory)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        """Whether the KPIs are shared through Redis (several replicas may answer)."""
        return self.buffer is not None

    async def alert_states(self, tenant: str) -> list[AlertStatus]:
        held = await self.states.load(tenant)
        out = []
        for t in self.config.tenants:
            if t.id != tenant:
                continue
            for rule in t.alerts:
                st = held.get(rule.id)
                out.append(
                    AlertStatus(
                        rule=rule.id,
                        kpi=rule.kpi,
                        state=st.state if st else "ok",
                        since=st.since if st and st.since else None,
                        value=st.value if st else None,
                        previous=st.previous if st else None,
                        evaluated_at=st.evaluated_at if st else None,
                        evaluations=st.evaluations if st else 0,
                        notifications=st.notifications if st else 0,
                        failures=st.failures if st else 0,
                    )
                )
        return out

    async def refresh(self) -> None:
        self.health.note(self.engine.tenants)
        for tenant in self.engine.tenants:
            self.reports[tenant] = await self.engine.report(tenant, baselines=self.alerts.baselines(tenant))
        metrics.KPIS.reports = self.reports
        if await self.alerts.run(self.reports, now=self.clock()):
            metrics.KPIS.alerts = dict(self.alerts.firing)
        else:  # another replica evaluates: show the shared states
            firing = {}
            for tenant in self.engine.tenants:
                for status in await self.alert_states(tenant):
                    firing[(tenant, status.rule)] = status.state == "firing"
            metrics.KPIS.alerts = firing

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("kpis.refresh_failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval_seconds)

    async def _flush_loop(self, buffer: BufferedKpiStore) -> None:
        period = min(0.5, self.interval_seconds)
        while True:
            await asyncio.sleep(period)
            try:
                await buffer.flush()
            except Exception as exc:
                log.warning("kpis.flush_failed", error=type(exc).__name__)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._loop(), name="kpi-monitoring"))
        if self.buffer is not None:
            self._tasks.append(asyncio.create_task(self._flush_loop(self.buffer), name="kpi-flush"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.buffer is not None:
            try:
                await self.buffer.flush()
            except Exception as exc:
                log.warning("kpis.flush_failed", error=type(exc).__name__)
        if self.history is not None:
            self.history.close()


def open_alert_history(settings: Settings) -> AlertHistory:
    """Where alert firings and resolutions are kept: Redis when the replicas share one (the
    evaluator can move), else ``alerts.sqlite3`` in the data directory."""
    if settings.redis_url:
        from identity.redis_client import open_redis

        return RedisAlertHistory(open_redis(settings.redis_url), settings.redis_prefix)
    return SqliteAlertHistory(settings.data_dir / "alerts.sqlite3")


def file_clock(path: Path) -> Callable[[], float]:
    """``IDGATE_DEV_CLOCK_FILE`` (dev only): the KPIs' and alert rules' time is the epoch
    seconds written in this file, the system's while the file is absent or empty, so a test
    can put the gateway a week back and forth."""

    def now() -> float:
        try:
            text = path.read_text().strip()
            return float(text) if text else time.time()
        except (OSError, ValueError):
            return time.time()

    return now


@dataclass(frozen=True)
class KeptHistory:
    """What a tenant's rules compare with a day or a week earlier: the KPIs in total, the
    KPIs of each source a rule watches alone, and how many buckets they are kept."""

    totals: list[str]
    by_source: dict[str, list[str]]
    buckets: int


def kpi_history(config: Config, bucket_seconds: float) -> dict[str, KeptHistory]:
    """Per tenant: the KPIs its rules compare with a day or a week earlier (in total, or of
    the one source a rule watches), kept ``kpi_history_days``. Tenants without such a rule
    keep none."""
    out: dict[str, KeptHistory] = {}
    for t in config.tenants:
        back = [r for r in t.alerts if r.compare != "previous"]
        if not back or not t.kpi_history_days:
            continue
        by_source: dict[str, list[str]] = {}
        for r in back:
            if r.source:
                by_source.setdefault(r.source, []).append(r.kpi)
        out[t.id] = KeptHistory(
            [r.kpi for r in back if not r.source],
            by_source,
            math.ceil(t.kpi_history_days * DAY_SECONDS / bucket_seconds),
        )
    return out


def build_monitoring(
    config: Config,
    redis: Any,
    *,
    prefix: str,
    bucket_seconds: float,
    interval_seconds: float,
    replica: str,
    clock: Callable[[], float] = time.time,
    history: AlertHistory | None = None,
) -> Monitoring:
    retention = 2 * max(WINDOWS) + 2
    kept = kpi_history(config, bucket_seconds)
    history_buckets = {t: h.buckets for t, h in kept.items()}
    buffer = None
    store: KpiStore
    if redis is not None:
        store = buffer = BufferedKpiStore(
            RedisKpiStore(redis, prefix, retention, bucket_seconds, history_buckets)
        )
    else:
        store = MemoryKpiStore(retention, history_buckets, bucket_seconds)
    engine = KpiEngine(
        store,
        {t.id: t.all_kpis() for t in config.tenants},
        {t.id: {s.id: s.platform for s in t.sources} for t in config.tenants},
        bucket_seconds=bucket_seconds,
        clock=clock,
        history={t: (h.totals, h.buckets) for t, h in kept.items()},
        source_history={t: h.by_source for t, h in kept.items()},
    )
    states: StateStore
    if redis is not None:
        states = RedisStateStore(redis, prefix)
        lease: Any = RedisLease(redis, prefix, replica, max(1000, int(interval_seconds * 3000)))
    else:
        states, lease = MemoryStateStore(), LocalLease(replica)
    evaluator = AlertEvaluator(
        {t.id: t.alerts for t in config.tenants},
        states,
        lease,
        Notifier(config.alert_channels),
        bucket_seconds,
        history,
    )
    return Monitoring(
        engine,
        KpiFeed(engine, config),
        interval_seconds,
        evaluator,
        states,
        replica,
        config,
        buffer,
        history,
        clock=clock,
    )


def check_alert_secrets(config: Config, *, path: str) -> None:
    """Every alert channel's secrets are in the environment, or the gateway does not start."""
    problems = missing_secrets(config.alert_channels, os.environ)
    if problems:
        raise ConfigProblems(path, problems)
