"""Wiring of data-subject rights requests for the app: the clock from config, the person
lookup and the deletion steps of the other domains, and the ``/metrics`` gauge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from consent.ledger_format import rfc3339
from consent.proofs import DeliveryProofs
from consent.rights import DeletionStep, Holdings, HoldingsOf, RightsService
from consent.rights_clock import RightsClock, WorkingCalendar
from consent.service import ConsentService
from export.deadletter import DeadLetterStore
from export.outbox import Outbox
from gateway.config import Config, RightsConfig
from identity.identifiers import Identifier, node_type, node_value
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


def event_purge(identity: IdentityService, outbox: Outbox, dead_letters: DeadLetterStore) -> DeletionStep:
    """The person's events still held: in the outbox (delivered or not) and in the dead
    letters, found by their pseudonyms and unified ID (read before the graph is erased)."""

    async def purge(tenant: str, nodes: Sequence[str]) -> Mapping[str, int]:
        keys = {node_value(n) for n in nodes} | {identity.unified_id(tenant, n) for n in nodes}
        held = await outbox.purge_person(tenant, keys)
        dead = await asyncio.to_thread(dead_letters.purge_person, tenant, keys)
        return {"outbox_events": held, "dead_letters": dead}

    return purge


def _event(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _ms(ms: int) -> str:
    return rfc3339(datetime.fromtimestamp(ms / 1000, UTC))


def holdings_of(config: Config, outbox: Outbox, dead_letters: DeadLetterStore) -> HoldingsOf:
    """The events held on a person (outbox and dead letters) and the destinations that
    received their data (the per-destination person index), for access bundles."""
    destinations = {t.id: [d.id for d in t.destinations] for t in config.tenants}

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
        recipients = [d for d in destinations.get(tenant, []) if await outbox.queue(d).received(unified_ids)]
        return Holdings(events, recipients)

    return holdings


# What a deletion does not reach yet (issue 13): it completes as ``partly_done`` naming them.
DELETION_GAPS = ("dedupe_keys", "person_index", "file_sink_lines", "destination_receipts")


def open_rights(
    config: Config,
    consent: ConsentService,
    proofs: DeliveryProofs,
    identity: IdentityService,
    outbox: Outbox,
    dead_letters: DeadLetterStore,
) -> RightsService:
    # In this order: consent is withdrawn first (by the service: events in flight are then
    # withheld at delivery), the held events go while the unified ID is still known, and
    # the graph last (its deletion notices go to the outbox after the purge).
    steps: dict[str, DeletionStep] = {
        "events": event_purge(identity, outbox, dead_letters),
        "identity_graph": identity_erasure(identity),
    }
    service = RightsService(
        consent,
        rights_clock(config.rights),
        people=identity,
        proofs=proofs,
        holdings=holdings_of(config, outbox, dead_letters),
        deletion_steps=steps,
        deletion_gaps=DELETION_GAPS,
    )
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
    (``on_time``, ``nearly_due``, ``overdue``), read from the ledger at each scrape."""

    def __init__(self) -> None:
        self.service: RightsService | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "idgate_rights_requests_open",
            "Open data-subject rights requests by tenant, kind and clock (on_time, nearly_due, overdue)",
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
