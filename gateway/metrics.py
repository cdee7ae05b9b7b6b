"""Prometheus metrics of the ingest path. Labels carry tenant/source ids, never identifiers.

The per-message counts are plain integers added up on the event loop and turned into
Prometheus counters only when ``/metrics`` is scraped: a ``prometheus_client.Counter``
takes a lock on every increment, which the hot path does not need.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

REQUESTS_REFUSED = Counter("idgate_requests_refused_total", "Requests refused as a whole", ["error"])

_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": ("Messages received", ("tenant", "source")),
    "accepted": ("Messages durably accepted", ("tenant", "source")),
    "duplicate": ("Messages dropped as duplicates of an earlier messageId", ("tenant", "source")),
    "rejected": ("Messages rejected as invalid", ("tenant", "source", "error")),
    "dropped": ("Messages not stored for lack of a lawful basis or destination", ("tenant", "reason")),
    "plan_violation": (
        "Tracking plan violations by plan event (or unplanned) and rule",
        ("tenant", "source", "event", "rule"),
    ),
    "plan_kept": (
        "Events kept as violation records instead of delivered (plan_mode enforce)",
        ("tenant", "source"),
    ),
    "refused_assertion": (
        "Assertions a sender could not back (unproven identifiers, bad identity assertions, "
        "minor-flag clearing without a guardian assertion): refused, the rest went on",
        ("tenant", "reason"),
    ),
}


class IngestCounts(Collector):
    """``idgate_events_<kind>_total`` counters, kept as plain integers between scrapes."""

    def __init__(self) -> None:
        self.values: dict[str, defaultdict[tuple[str, ...], int]] = {k: defaultdict(int) for k in _FAMILIES}

    def add(self, kind: str, labels: tuple[str, ...], n: int = 1) -> None:
        self.values[kind][labels] += n

    def collect(self) -> Iterator[CounterMetricFamily]:
        for kind, (doc, label_names) in _FAMILIES.items():
            family = CounterMetricFamily(f"idgate_events_{kind}", doc, labels=list(label_names))
            for labels, value in list(self.values[kind].items()):
                family.add_metric(list(labels), value)
            yield family


INGEST = IngestCounts()
REGISTRY.register(INGEST)
