"""Wiring of data-subject rights requests for the app: the clock from config, the person
lookup and the deletion steps of the other domains, and the ``/metrics`` gauge."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from consent.rights import DeletionStep, RightsService
from consent.rights_clock import RightsClock, WorkingCalendar
from consent.service import ConsentService
from gateway.config import RightsConfig
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


def open_rights(
    config: RightsConfig,
    consent: ConsentService,
    identity: IdentityService,
    extra_steps: Mapping[str, DeletionStep] | None = None,
) -> RightsService:
    steps: dict[str, DeletionStep] = {"identity_graph": identity_erasure(identity), **(extra_steps or {})}
    service = RightsService(consent, rights_clock(config), person_of=identity.person, deletion_steps=steps)
    RIGHTS_GAUGE.service = service
    return service


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
