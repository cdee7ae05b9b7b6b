"""Wiring of data-subject rights requests for the app: the clock from config, the person
lookup and the deletion steps of the other domains, the destinations' deletion receipts
(reported by delivery), and the ``/metrics`` gauge."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from consent.ledger_format import rfc3339
from consent.proofs import DeliveryProofs
from consent.rights import DeletionStep, Holdings, HoldingsOf, ReceiptStatus, RightsService
from consent.rights_clock import RightsClock, WorkingCalendar
from consent.service import ConsentService
from export.deadletter import DeadLetterStore
from export.delivery import DeliveryService
from export.outbox import Outbox
from export.violations import ViolationStore
from gateway.config import Config, RightsConfig
from gateway.rate_limits import RateLimiter
from identity.identifiers import Identifier, node_type, node_value
from identity.notices import IdentityDeleted
from identity.service import IdentityService

log = structlog.get_logger(__name__)


def rights_clock(config: RightsConfig) -> RightsClock:
    calendar = WorkingCalendar.build(config.holidays, config.workdays, official=config.official_calendar)
    return RightsClock(calendar, config.due_working_days, config.nearly_due_working_days)


def identity_erasure(identity: IdentityService) -> DeletionStep:
    async def erase(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        if identity.resolver.graph(tenant) is None:
            return {"erased": 0, "not_in_graph": len(nodes), "notices": 0}
        done = await identity.erase(tenant, [Identifier(node_type(n), node_value(n)) for n in nodes])
        return {"erased": len(done.removed), "not_in_graph": len(done.not_in_graph), "notices": done.notices}

    return erase


def identity_log_redaction(identity: IdentityService) -> DeletionStep:
    """The erased identifiers and unified IDs leave the identity change log's past records
    (renamed to tombstones; the log still replays to the same graph for everyone else)."""

    async def redact(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        done = await identity.redact_log(tenant, nodes)
        return {
            "records": len(done.updates),
            "identifiers": done.identifiers,
            "unified_ids": done.unified_ids,
        }

    return redact


def person_keys(identity: IdentityService, tenant: str, nodes: Sequence[str]) -> set[str]:
    """The values a person's records are found by: their pseudonyms and every unified ID
    they have had (read before the graph is erased)."""
    return {node_value(n) for n in nodes} | set(identity.unified_ids(tenant, nodes))


async def recipients_of(outbox: Outbox, destinations: Sequence[str], unified_ids: Sequence[str]) -> list[str]:
    """The destinations that received data of these persons (their person index)."""
    return [d for d in destinations if await outbox.queue(d).received(unified_ids)]


def deletion_recipients(config: Config, identity: IdentityService, outbox: Outbox) -> DeletionStep:
    """The destinations holding the person's data, read before anything is deleted: each
    owes a receipt of the ``identity.deleted`` notice the graph step sends them."""
    destinations = tenant_destinations(config)

    async def recipients(tenant: str, nodes: Sequence[str]) -> Mapping[str, Any]:
        unified = identity.unified_ids(tenant, nodes)
        held = await recipients_of(outbox, destinations.get(tenant, []), unified)
        return {"destinations": held, "unified_ids": unified}

    return recipients


def event_purge(identity: IdentityService, outbox: Outbox, dead_letters: DeadLetterStore) -> DeletionStep:
    """The person's events still held: in the outbox (delivered or not, with the dedupe
    entries of their message ids) and in the dead letters."""

    async def purge(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        keys = person_keys(identity, tenant, nodes)
        held = await outbox.purge_person(tenant, keys)
        dead = await asyncio.to_thread(dead_letters.purge_person, tenant, keys)
        return {
            "outbox_events": held.events,
            "outbox_notices": held.notices,
            "dedupe_keys": held.dedupe_keys,
            "dead_letters": dead,
        }

    return purge


def violation_purge(identity: IdentityService, violations: ViolationStore) -> DeletionStep:
    """The person's events the tracking plan kept (``block``) or trimmed (``omit``): the
    violation records naming their pseudonyms. With a shared store (Redis) this removes them
    for every replica; a replica's own store (SQLite) is followed by the others from the
    ledger (``follow_sink_purges``)."""

    async def purge(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        keys = {node_value(n) for n in nodes}
        return {"records_removed": await asyncio.to_thread(violations.purge_person, tenant, keys)}

    return purge


def file_sink_purge(config: Config, identity: IdentityService, delivery: DeliveryService) -> DeletionStep:
    """The person's lines in the files idgate writes (JSONL, Parquet sinks), per sink."""
    destinations = tenant_destinations(config)

    async def purge(tenant: str, nodes: Sequence[str]) -> Mapping[str, Any]:
        removed = await delivery.purge_person(
            destinations.get(tenant, []), person_keys(identity, tenant, nodes)
        )
        # what the other replicas purge their own files by (follow_sink_purges)
        return {"lines_removed": removed, "unified_ids": identity.unified_ids(tenant, nodes)}

    return purge


async def follow_sink_purges(
    consent: ConsentService,
    delivery: DeliveryService,
    config: Config,
    marker: Path,
    seconds: float = 2.0,
    violations: ViolationStore | None = None,
) -> None:
    """Distributed mode: every replica writes its own sink files, so each applies the
    ``file_sinks`` steps of deletions carried out on any replica (the ledger's records after
    this replica's ``marker``, a file beside its sinks) to its own; likewise the
    ``plan_violations`` steps when its violation store is its own (a shared one lost the
    records in the step itself: following it again would only scan it on every replica).
    Idempotent: the replica that carried out the request finds nothing more."""
    destinations = tenant_destinations(config)
    own_violations = violations if violations is not None and not violations.shared else None
    after = int(marker.read_text()) if marker.exists() else 0
    while True:
        full = False
        try:
            page = await asyncio.to_thread(
                consent.ledger.records, tenant=None, record_type="rights_request", after_seq=after, limit=1000
            )
            for r in page:
                detail = r.detail or {}
                if detail.get("step") == VIOLATIONS_STEP and own_violations is not None:
                    nodes = {node_value(n) for n in r.identifiers or ()}
                    gone = await asyncio.to_thread(own_violations.purge_person, r.tenant, nodes)
                    if gone:
                        request_id = detail.get("request_id")
                        log.info("rights.violation_purge_followed", request_id=request_id, records=gone)
                if detail.get("step") == "file_sinks":
                    keys = {node_value(n) for n in r.identifiers or ()} | set(detail.get("unified_ids") or ())
                    removed = await delivery.purge_person(destinations.get(r.tenant, []), keys)
                    if any(removed.values()):
                        log.info(
                            "rights.sink_purge_followed", request_id=detail.get("request_id"), lines=removed
                        )
            if page:
                after = page[-1].seq
                await asyncio.to_thread(_save_marker, marker, after)
            full = len(page) == 1000
        except Exception as exc:  # the next round tries again from the same marker
            log.error("rights.sink_purge_follow_failed", error=type(exc).__name__)
        if not full:
            await asyncio.sleep(seconds)


def _save_marker(marker: Path, seq: int) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    temp = marker.with_name(marker.name + ".tmp")
    temp.write_text(str(seq))
    os.replace(temp, marker)


def rate_limit_purge(identity: IdentityService, limiter: RateLimiter) -> DeletionStep:
    """The person's rate-limit counters and per-day identifier sets (keyed by pseudonyms)."""

    async def purge(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        return {"counters": await limiter.store.forget(person_keys(identity, tenant, nodes))}

    return purge


def tenant_destinations(config: Config) -> dict[str, list[str]]:
    return {t.id: [d.id for d in t.destinations] for t in config.tenants}


def _event(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _ms(ms: int) -> str:
    return rfc3339(datetime.fromtimestamp(ms / 1000, UTC))


def holdings_of(
    config: Config, outbox: Outbox, dead_letters: DeadLetterStore, violations: ViolationStore | None = None
) -> HoldingsOf:
    """The events held on a person (outbox, dead letters, the tracking plan's violation
    records) and the destinations that received their data (the per-destination person
    index), for access bundles."""
    destinations = tenant_destinations(config)

    async def holdings(tenant: str, nodes: Sequence[str], unified_ids: Sequence[str]) -> Holdings:
        keys = {node_value(n) for n in nodes} | set(unified_ids)
        events: list[dict[str, Any]] = [
            {
                "store": "outbox",
                "messageId": r.message_id,
                "receivedAt": _ms(r.received_at_ms),
                "destinations": list(r.destinations),
                "event": _event(r.payload),
            }
            for r in await outbox.find_person(tenant, keys)
        ]
        for d in await asyncio.to_thread(dead_letters.find_person, tenant, keys):
            events.append(
                {
                    "store": "dead_letter",
                    "messageId": d.message_id,
                    "receivedAt": _ms(d.received_at_ms),
                    "destinations": [d.destination],
                    "deadAt": _ms(d.dead_at_ms),
                    "reason": d.reason,
                    "event": _event(d.payload),
                }
            )
        if violations is not None:
            for v in await asyncio.to_thread(violations.find_person, tenant, keys):
                events.append(
                    {
                        "store": "plan_violation",
                        "messageId": v.message_id,
                        "receivedAt": _ms(v.received_at_ms),
                        "destinations": [],
                        "planEvent": v.event,
                        "action": v.action,
                        "violations": [msgspec.structs.asdict(f) for f in v.findings],
                        "event": _event(v.payload),
                    }
                )
        recipients = await recipients_of(outbox, destinations.get(tenant, []), unified_ids)
        return Holdings(events, recipients)

    return holdings


# The deletion step of the tracking plan's violation records (followed by each replica that
# keeps its own).
VIOLATIONS_STEP = "plan_violations"

# What a deletion does not reach: it completes as ``partly_done`` naming it (none left: the
# identity change log is redacted by the ``identity_log`` step).
DELETION_GAPS: tuple[str, ...] = ()

# Sinks whose receiver answers each delivery (2xx): their receipts are ``acknowledged``.
ACKNOWLEDGING_SINKS = frozenset({"webhook", "segment", "sensors"})


class DeletionReceipts:
    """What delivery reports of ``identity.deleted`` notices (export.delivery's
    ``on_deletion_notices``), recorded as receipts on the rights requests; built before the
    rights service, which ``open_rights`` attaches."""

    def __init__(self, config: Config) -> None:
        self.service: RightsService | None = None
        self.acknowledging = {
            d.id for t in config.tenants for d in t.destinations if d.sink in ACKNOWLEDGING_SINKS
        }

    async def __call__(self, destination: str, notices: Sequence[IdentityDeleted], status: str) -> set[str]:
        if self.service is None:  # delivery retries the batch
            raise RuntimeError("rights requests are not open yet")
        receipt: ReceiptStatus = "failed"
        if status == "delivered":
            receipt = "acknowledged" if destination in self.acknowledging else "delivered"
        by_tenant: dict[str, set[str]] = {}
        for n in notices:
            by_tenant.setdefault(n.tenant, set()).add(n.unified_id)
        released: set[str] = set()
        for tenant, unified_ids in by_tenant.items():
            released |= await self.service.deletion_receipt(
                tenant=tenant, destination=destination, unified_ids=unified_ids, status=receipt
            )
        return released


def open_rights(
    config: Config,
    consent: ConsentService,
    proofs: DeliveryProofs,
    identity: IdentityService,
    outbox: Outbox,
    dead_letters: DeadLetterStore,
    delivery: DeliveryService,
    limiter: RateLimiter,
    receipts: DeletionReceipts | None = None,
    violations: ViolationStore | None = None,
) -> RightsService:
    # In this order (consent is withdrawn and the person suppressed first, by the service):
    # the destinations holding the person are read from their person index; the held events
    # (and their dedupe entries) and the sink files' lines go while the unified ID is still
    # known; the graph last: its deletion notices go to the outbox after the purge, and
    # each destination's person index forgets the person once it received its notice; then
    # the erased person's strings leave the identity change log's past records.
    steps: dict[str, DeletionStep] = {
        "recipients": deletion_recipients(config, identity, outbox),
        "events": event_purge(identity, outbox, dead_letters),
        **({VIOLATIONS_STEP: violation_purge(identity, violations)} if violations is not None else {}),
        "file_sinks": file_sink_purge(config, identity, delivery),
        "rate_limits": rate_limit_purge(identity, limiter),
        "identity_graph": identity_erasure(identity),
        "identity_log": identity_log_redaction(identity),
    }
    service = RightsService(
        consent,
        rights_clock(config.rights),
        people=identity,
        proofs=proofs,
        holdings=holdings_of(config, outbox, dead_letters, violations),
        deletion_steps=steps,
        deletion_gaps=DELETION_GAPS,
    )
    if receipts is not None:
        receipts.service = service
    RIGHTS_GAUGE.service = service
    return service


async def resume_open_requests(service: RightsService) -> None:
    """At start: finish the withdrawals and deletions a crash left half done."""
    try:
        done = await service.resume()
    except Exception as exc:  # the requests stay open, listed as such; the next start tries again
        log.error("rights.resume_failed", error=type(exc).__name__)
        return
    if done:
        log.info("rights.resumed", requests=len(done))


class RightsGauge(Collector):
    """``idgate_rights_requests_open{tenant,kind,clock}``: open requests by their clock
    (``on_time``, ``nearly_due``, ``overdue``, ``paused``: a paused one is never counted as
    overdue or nearly due), read from the ledger at each scrape."""

    def __init__(self) -> None:
        self.service: RightsService | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "idgate_rights_requests_open",
            "Open data-subject rights requests by tenant, kind and clock "
            "(on_time, nearly_due, overdue, paused)",
            labels=["tenant", "kind", "clock"],
        )
        if self.service is not None:
            try:
                counts = self.service.open_counts()
            except Exception as exc:  # a scrape never fails for it; the gauge is left out
                log.error("rights.gauge_failed", error=type(exc).__name__)
                counts = {}
            for (tenant, kind, clock), n in sorted(counts.items()):
                family.add_metric([tenant, kind, clock], n)
        yield family


RIGHTS_GAUGE = RightsGauge()
REGISTRY.register(RIGHTS_GAUGE)
