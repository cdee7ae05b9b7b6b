"""Prometheus metrics of identity-graph health. Labels carry the tenant id only, never an
identifier, pseudonym or unified ID.

The counters count the changes a replica decided and committed to the identity log
(``GraphResolver.on_committed``); a replica replaying another's changes does not count
them, so summing over replicas counts each change once. The quarantine gauge is read from
this replica's graph at scrape (every replica holds the whole replayed graph: take max).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from identity.graph import EdgeAdded, GraphChange, IdentityGraph, Merged, NodeAdded, Quarantined, Split
from identity.resolver import GraphResolver

_CHANGE_DOC = ", decided on this replica (a replay of another replica's change is not counted)"

PERSONS_CREATED = Counter(
    "idgate_identity_persons_created",
    "Identifiers new to the identity graph (a person each)" + _CHANGE_DOC,
    ["tenant"],
)
MERGES = Counter("idgate_identity_merges", "Two persons merged into one" + _CHANGE_DOC, ["tenant"])
SPLITS = Counter(
    "idgate_identity_splits", "A person split apart (unlink, detach, erasure)" + _CHANGE_DOC, ["tenant"]
)
QUARANTINED = Counter(
    "idgate_identity_quarantined",
    "Links held for review by the circuit breaker or the person size bound" + _CHANGE_DOC,
    ["tenant"],
)
BREAKER_TRIPS = Counter(
    "idgate_identity_breaker_trips",
    "Links held for review because an identifier tried to join too many persons" + _CHANGE_DOC,
    ["tenant"],
)
PERSON_SIZE = Histogram(
    "idgate_identity_person_identifiers",
    "Identifiers of the person an accepted link joined, at commit" + _CHANGE_DOC,
    ["tenant"],
    buckets=(2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)


def record_changes(tenant: str, changes: Sequence[GraphChange], graph: IdentityGraph) -> None:
    """``GraphResolver.on_committed``: one batch of committed changes into the counters."""
    kinds = Tally(type(c) for c in changes)
    if n := kinds[NodeAdded]:
        PERSONS_CREATED.labels(tenant).inc(n)
    if n := kinds[Merged]:
        MERGES.labels(tenant).inc(n)
    if n := kinds[Split]:
        SPLITS.labels(tenant).inc(n)
    if n := kinds[Quarantined]:
        QUARANTINED.labels(tenant).inc(n)
        trips = sum(1 for c in changes if isinstance(c, Quarantined) and c.reason.startswith("breaker:"))
        if trips:
            BREAKER_TRIPS.labels(tenant).inc(trips)
    if kinds[EdgeAdded]:
        # the person each accepted link is in now (bounded by the size rule: a cheap walk)
        persons = {c.a for c in changes if isinstance(c, EdgeAdded) and c.a in graph}
        sizes: dict[frozenset[str], int] = {}
        for node in persons:
            members = graph.component(node)
            sizes[members] = len(members)
        histogram = PERSON_SIZE.labels(tenant)
        for size in sizes.values():
            histogram.observe(size)


class QuarantineSize(Collector):
    """``idgate_identity_quarantine_size`` per tenant: links held for review now."""

    def __init__(self) -> None:
        self.resolver: GraphResolver | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "idgate_identity_quarantine_size",
            "Links held for review in the identity graph now (every replica: take max)",
            labels=["tenant"],
        )
        resolver = self.resolver
        if resolver is not None:
            for tenant, graph in list(resolver.graphs.items()):
                family.add_metric([tenant], graph.stats()["quarantined"])
        yield family


QUARANTINE = QuarantineSize()
REGISTRY.register(QUARANTINE)


def watch(resolver: GraphResolver) -> None:
    """Count what ``resolver`` commits and export its quarantine size. Every tenant's
    series starts at zero, so the first change shows in ``increase()``."""
    for tenant in resolver.rules:
        for metric in (PERSONS_CREATED, MERGES, SPLITS, QUARANTINED, BREAKER_TRIPS, PERSON_SIZE):
            metric.labels(tenant)
    resolver.on_committed = record_changes
    QUARANTINE.resolver = resolver
