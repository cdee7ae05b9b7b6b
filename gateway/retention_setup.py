"""Wiring of retention (PIPL Art. 19): the periods from ``[tenants.retention]``, one run over
the export stores (export.retention), the consent stores (consent.retention) and the
identity graph's aliases (identity.redaction), its ledger record, and the gateway's
periodic job. ``idgate retention run`` calls the same run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog
from prometheus_client import Counter

from consent.access_log import AccessLog
from consent.ledger import Ledger
from consent.proofs import DeliveryProofs
from consent.retention import RetentionRun, expire_consent_side, record_run
from export.deadletter import DeadLetterStore
from export.outbox import Outbox
from export.retention import EXPORT_STORES, DestinationPeriod, cutoff, destination_days, expire_export_side
from export.violations import ViolationStore
from gateway.config import Config, Tenant
from identity.service import IdentityService

log = structlog.get_logger(__name__)

REMOVED = Counter(
    "idgate_retention_removed_total",
    "Entries (files for the file sinks) removed by retention runs, by tenant (none for the "
    "shared dedupe entries) and store",
    ["tenant", "store"],
)

# what one tenant's run goes through, in order (a progress bar counts these)
RUN_STEPS = (*EXPORT_STORES, "consent", "aliases")


@dataclass
class RetentionStores:
    outbox: Outbox
    dead_letters: DeadLetterStore
    proofs: DeliveryProofs
    access_log: AccessLog
    ledger: Ledger
    sink_dir: Path
    # the tracking plan's violation records (this replica's file, or Redis: shared)
    violations: ViolationStore | None = None
    # the identity graph and its change log (aliases past ``aliases_days``); None: not kept
    identity: IdentityService | None = None


def tenant_periods(tenant: Tenant) -> list[DestinationPeriod]:
    """The destinations of the tenant that have a period, with it."""
    r = tenant.retention
    periods = []
    for d in tenant.destinations:
        days = destination_days(
            default_days=r.days,
            purpose_days=r.purposes,
            destination_days=r.destinations.get(d.id),
            purposes=d.purposes,
        )
        if days is not None:
            periods.append(DestinationPeriod(d.id, d.sink, days))
    return periods


def limited_tenants(config: Config, only: str | None = None) -> list[Tenant]:
    """The tenants a run covers: those whose retention limits anything (``only``: just that one)."""
    return [t for t in config.tenants if t.retention.limits_data and (only is None or t.id == only)]


async def run_retention(
    config: Config,
    stores: RetentionStores,
    *,
    apply: bool,
    by: str,
    only: str | None = None,
    now: datetime | None = None,
    step: Callable[[str], None] = lambda store: None,
    record_empty: bool = True,
) -> list[RetentionRun]:
    """One run over every store for each tenant with periods; an applied run is recorded in
    the ledger per tenant (``by``: who ran it; without ``record_empty`` only when it removed
    something). ``step`` is called after each of ``RUN_STEPS``."""
    started = now or datetime.now(UTC)
    dedupe = await stores.outbox.expire_dedupe(apply=apply)
    if apply:
        REMOVED.labels("", "dedupe_entries").inc(dedupe)  # shared by the tenants
    runs = []
    for tenant in limited_tenants(config, only):
        periods = tenant_periods(tenant)
        removed = await expire_export_side(
            tenant=tenant.id,
            periods=periods,
            now=started,
            outbox=stores.outbox,
            dead_letters=stores.dead_letters,
            sink_dir=stores.sink_dir,
            apply=apply,
            step=step,
            violations=stores.violations,
            destinations=len(tenant.destinations),
        )
        cutoffs = {p.destination: cutoff(started, p.days) for p in periods}
        days = tenant.retention.access_log_days
        access_cutoff = cutoff(started, days) if days else None
        removed |= await asyncio.to_thread(
            expire_consent_side,
            stores.proofs,
            stores.access_log,
            tenant=tenant.id,
            destination_cutoffs=cutoffs,
            access_log_cutoff=access_cutoff,
            apply=apply,
        )
        # dedupe entries are shared by the tenants: each run's record names them
        removed["dedupe_entries"] = dedupe
        step("consent")
        aliases_cutoff = None
        if tenant.retention.aliases_days and stores.identity is not None:
            # rewrites the identity log under its lock when something expires (identity.resolver)
            aliases_cutoff = cutoff(started, tenant.retention.aliases_days)
            removed["aliases"] = await stores.identity.expire_aliases(tenant.id, aliases_cutoff, apply=apply)
        step("aliases")
        run = RetentionRun(
            tenant=tenant.id,
            apply=apply,
            cutoffs=cutoffs,
            periods_days={p.destination: p.days for p in periods},
            removed=removed,
            access_log_cutoff=access_cutoff,
            aliases_cutoff=aliases_cutoff,
        )
        if apply:
            for store, n in removed.items():
                if store != "dedupe_entries":
                    REMOVED.labels(tenant.id, store).inc(n)
        if apply and (record_empty or any(removed.values())):
            seq = await asyncio.to_thread(record_run, stores.ledger, run, started_at=started, by=by)
            run = msgspec.structs.replace(run, ledger_seq=seq)
        log.info("retention.run", tenant=tenant.id, apply=apply, removed=removed, ledger_seq=run.ledger_seq)
        runs.append(run)
    return runs


async def retention_periodically(
    config: Config, stores: RetentionStores, interval_seconds: float, replica: str
) -> None:
    """The gateway's job: an applied run every ``interval_seconds`` (the first one interval
    after the start), ledgered when it removed something (an hourly "nothing to do" would
    only fill the ledger); a failed run is logged and tried again at the next interval.
    Every replica runs it: the file sinks are each replica's own, and the shared stores
    make a second removal a no-op."""
    if interval_seconds <= 0 or not limited_tenants(config):
        return
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await run_retention(config, stores, apply=True, by=f"retention-job:{replica}", record_empty=False)
        except Exception as exc:  # the next interval tries again
            log.error("retention.run_failed", error=type(exc).__name__)
