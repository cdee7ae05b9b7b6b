"""The tracking plan over the admin API: violation records (list, show, replay), the live tail
of the last violations per source, and the coverage report.

Replay puts a kept event back through the pipeline after ``pseudonymise`` (the record holds
the pseudonymised identifiers the first pass found): it is checked against the plan the
gateway runs now, claims its message id (a replay of an event already delivered is a
duplicate), asks consent again and is stored for delivery. A record is deleted once its
event went through (accepted, a duplicate, or dropped for lack of consent); an event that
still breaks the plan keeps its record, updated.

With Redis the records are one store every replica shares: any replica lists, shows and
replays any replica's records. Two replays of one record (two replicas, or a retry) claim
the same message id in the shared dedupe window, so the event is delivered once; the
record's deletion counts once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from export.violations import ViolationRecord, ViolationStore
from gateway.admin.deps import ADMIN_DEPENDENCIES, READ_ERRORS, WRITE_ERRORS, AdminServices, log_access
from gateway.auth import Officer, admin_guard, roles
from gateway.config import Config, ResolvedSource
from gateway.errors import InvalidRequest
from gateway.events import Envelope, Event
from gateway.openapi import error_responses
from gateway.pipeline import Ingestor, IngestResult, pseudonymise
from gateway.plan import plan_for
from gateway.plan_monitor import TAIL_SIZE, PlanMonitor, TailEntry
from gateway.plan_monitor import coverage as plan_coverage
from identity.assertions import CLIENT, SERVER

_decode_event = msgspec.json.Decoder(Event).decode
_SHOW_ERRORS = {**READ_ERRORS, **error_responses(404)}


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    ids: list[str] = []
    all: bool = False  # every record of the tenant


class ReplayedRecord(msgspec.Struct, rename="camel"):
    """What became of one record: ``outcome`` names the ``ReplayOutcome`` count it went to."""

    id: str
    message_id: str
    event: str
    outcome: str


class ReplayOutcome(msgspec.Struct):
    replayed: int = 0  # went through: stored for delivery
    duplicates: int = 0  # already delivered under the same message id
    dropped: int = 0  # no lawful basis now (consent): not stored, record deleted
    still_violating: int = msgspec.field(default=0, name="stillViolating")
    rejected: int = 0  # refused by another stage: record kept
    unknown_source: int = msgspec.field(default=0, name="unknownSource")
    records: list[ReplayedRecord] = []  # per record, in the order replayed

    def count(self, record: ViolationRecord, outcome: str) -> None:
        """One more record with ``outcome`` (a count's JSON name)."""
        field = {"stillViolating": "still_violating", "unknownSource": "unknown_source"}.get(outcome, outcome)
        setattr(self, field, getattr(self, field) + 1)
        self.records.append(ReplayedRecord(record.id, record.message_id, record.event, outcome))


def _source(config: Config, tenant: str, source: str) -> ResolvedSource | None:
    for t in config.tenants:
        if t.id == tenant:
            for s in t.sources:
                if s.id == source:
                    return ResolvedSource(tenant=t, source=s, destinations=tuple(t.destinations))
    return None


async def replay_records(
    ingestor: Ingestor, config: Config, store: ViolationStore, records: list[ViolationRecord]
) -> ReplayOutcome:
    runner = Ingestor(
        # a replayed event was counted for coverage when it first came
        dataclasses.replace(ingestor.services, plan_monitor=None),
        stages=tuple(st for st in ingestor.stages if st is not pseudonymise),
        on_appended=ingestor.on_appended,
    )
    outcome = ReplayOutcome()
    done: list[str] = []
    for record in records:
        src = _source(config, record.tenant, record.source)
        if src is None:
            outcome.count(record, "unknownSource")
            continue
        env = Envelope(
            event=_decode_event(record.payload),
            index=0,
            identifiers=list(record.identifiers),
            pseudonyms=set(record.pseudonyms),
            unproven=list(record.unproven),
            standing=SERVER if record.server else CLIENT,
        )
        result = await runner.ingest(src, [env], IngestResult(received=1))
        if result.accepted and any(r.action == "omitted" for r in result.plan_violations):
            # went out without some properties: the record (updated) keeps them
            outcome.count(record, "replayed")
            continue
        if result.accepted:
            outcome.count(record, "replayed")
        elif result.duplicates:
            outcome.count(record, "duplicates")
        elif result.dropped:
            outcome.count(record, "dropped")
        elif any(r.action == "kept" for r in result.plan_violations):
            outcome.count(record, "stillViolating")
            continue
        else:
            outcome.count(record, "rejected")
            continue
        done.append(record.id)
    await asyncio.to_thread(store.delete, done)
    return outcome


def _store(request: Request[Any, Any, Any]) -> ViolationStore:
    store: ViolationStore = request.app.state.violations
    return store


class PlanViolationsController(Controller):
    path = "/admin/plan/violations"
    tags = ["tracking plan"]
    guards = [admin_guard]
    dependencies = ADMIN_DEPENDENCIES
    security = [{"AdminToken": []}]

    @get(
        "/",
        responses=READ_ERRORS,
        summary="Events kept for breaking the tracking plan",
        opt=roles("operator"),
    )
    async def list_violations(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        event: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100,
    ) -> dict[str, Any]:
        """Operator role. Summaries (rule, property path, detail; no payload) and counts per event."""
        services.tokens.check_tenant(officer, tenant)
        store = _store(request)
        records = [r.summary() for r in await asyncio.to_thread(store.list, tenant, limit, event)]
        await log_access(services, officer, "plan.violations.list", tenant, {"event": event}, len(records))
        return {"counts": await asyncio.to_thread(store.counts, tenant), "violations": records}

    @get("/{record_id:str}", responses=_SHOW_ERRORS, summary="One kept event", opt=roles("operator"))
    async def show_violation(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        record_id: FromPath[str],
    ) -> dict[str, Any]:
        """Operator role. The record with its event as stored (pseudonymised, scrubbed)."""
        record = await asyncio.to_thread(_store(request).get, record_id)
        if record is None:
            raise NotFoundException(detail=f"no violation record {record_id!r}")
        services.tokens.check_tenant(officer, record.tenant)
        await log_access(services, officer, "plan.violations.show", record.tenant, {"id": record_id}, 1)
        return {**record.summary(), "event": msgspec.json.decode(record.payload)}

    @post(
        "/replay",
        responses=WRITE_ERRORS,
        status_code=200,
        summary="Put kept events back through the pipeline (after a plan or client fix)",
        opt=roles("operator"),
    )
    async def replay(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: JSONBody[ReplayRequest],
    ) -> ReplayOutcome:
        """Operator role. Each event is checked against the current plan, deduplicated by
        message id and asked consent again."""
        services.tokens.check_tenant(officer, data.tenant)
        store = _store(request)
        if data.ids:
            found = await asyncio.to_thread(lambda: [store.get(i) for i in data.ids])
            records = [r for r in found if r is not None and r.tenant == data.tenant]
            if len(records) != len(data.ids):
                raise InvalidRequest("invalid_field", "unknown violation record id for this tenant", "ids")
        elif data.all:
            # omitted ones went out
            records = await asyncio.to_thread(store.list, data.tenant, 1_000_000, None, "kept")
        else:
            raise InvalidRequest("invalid_field", "name record ids, or set all", "ids")
        outcome = await replay_records(request.app.state.ingest.ingestor, services.config, store, records)
        await log_access(
            services,
            officer,
            "plan.violations.replay",
            data.tenant,
            {"ids": data.ids, "all": data.all},
            len(records),
        )
        return outcome


def _monitor(request: Request[Any, Any, Any]) -> PlanMonitor:
    monitor: PlanMonitor = request.app.state.plan_monitor
    return monitor


class TailAnswer(msgspec.Struct):
    tenant: str
    violations: list[TailEntry]


class PlanMonitorController(Controller):
    """A team watching its plan at work: the live tail and the coverage report."""

    path = "/admin/plan"
    tags = ["tracking plan"]
    guards = [admin_guard]
    dependencies = ADMIN_DEPENDENCIES
    security = [{"AdminToken": []}]

    @get(
        "/tail", responses=READ_ERRORS, summary="The last violations per source (live)", opt=roles("operator")
    )
    async def tail(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        source: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=TAIL_SIZE)] = TAIL_SIZE,
    ) -> TailAnswer:
        """Operator role. Newest first: each message that broke the plan (flagged, omitted or
        kept), its rules and property paths, never a value; the last 100 per source this
        gateway process saw (with Redis: that every replica saw)."""
        services.tokens.check_tenant(officer, tenant)
        entries = await _monitor(request).read_tail(tenant, source, limit)
        await log_access(services, officer, "plan.tail", tenant, {"source": source}, len(entries))
        return TailAnswer(tenant=tenant, violations=entries)

    @get(
        "/coverage",
        responses=_SHOW_ERRORS,
        summary="Planned events never seen, seen events not planned",
        opt=roles("operator"),
    )
    async def coverage(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
    ) -> dict[str, Any]:
        """Operator role. From the counts the gateway keeps since its violation store was
        created (with Redis: every replica's, shared): per plan event how many were seen and
        fit, the planned events never seen, and the unplanned names seen (with counts)."""
        services.tokens.check_tenant(officer, tenant)
        found = next((t for t in services.config.tenants if t.id == tenant), None)
        plan = plan_for(found) if found is not None else None
        if plan is None:
            raise NotFoundException(detail=f"tenant {tenant!r} has no tracking plan")
        report = plan_coverage(plan, await _monitor(request).read_seen(tenant))
        await log_access(services, officer, "plan.coverage", tenant, {}, len(report["events"]))
        return report
