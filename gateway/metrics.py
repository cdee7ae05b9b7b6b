"""Prometheus metrics of the ingest path. Labels carry tenant/source ids, never identifiers.

The per-message counts are plain integers added up on the event loop and turned into
Prometheus counters only when ``/metrics`` is scraped: a ``prometheus_client.Counter``
takes a lock on every increment, which the hot path does not need.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REQUESTS_REFUSED = Counter("idgate_requests_refused_total", "Requests refused as a whole", ["error"])

_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": ("Messages received", ("tenant", "source")),
    "accepted": ("Messages durably accepted", ("tenant", "source")),
    "duplicate": ("Messages dropped as duplicates of an earlier messageId", ("tenant", "source")),
    "rejected": ("Messages rejected as invalid", ("tenant", "source", "error")),
    "coalesced": (
        "Requests (not messages) run as one batch with other small requests of their source "
        "that arrived together; each is still answered with its own counts",
        ("tenant", "source"),
    ),
    "dropped": (
        "Messages not stored: no lawful basis or destination, an erased subject (erased), "
        "a bot or crawler (bot), internal or QA traffic (internal)",
        ("tenant", "reason"),
    ),
    "plan_violation": (
        "Tracking plan violations by plan event (or unplanned) and rule",
        ("tenant", "source", "event", "rule"),
    ),
    "plan_kept": (
        "Events kept as violation records instead of delivered (plan validation block)",
        ("tenant", "source"),
    ),
    "plan_omitted": (
        "Events delivered without the properties that broke the plan (plan validation omit), recorded",
        ("tenant", "source"),
    ),
    "plan_seen": (
        "Events checked against the tracking plan by plan event (or unplanned)",
        ("tenant", "source", "event"),
    ),
    "plan_valid": (
        "Events that fit their tracking plan entry, by plan event",
        ("tenant", "source", "event"),
    ),
    "flagged": ("Messages kept with a data-cleaning flag (e.g. timestamp_skew)", ("tenant", "flag")),
    "identifier_blocked": (
        "Identifiers not linked because the tenant blocks their value or pattern",
        ("tenant",),
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


class KpiGauges(Collector):
    """``idgate_kpi_value`` / ``idgate_kpi_coverage`` per tenant, KPI, window and platform
    ("all" for the total), and ``idgate_alert_firing`` per rule: the latest values the
    monitoring loop read (gateway.monitoring). Labels are config ids, never identifiers."""

    def __init__(self) -> None:
        self.reports: Mapping[str, Sequence[Any]] = {}
        self.alerts: Mapping[tuple[str, str], bool] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["tenant", "kpi", "window", "platform"]
        value = GaugeMetricFamily("idgate_kpi_value", "Business KPI over a sliding window", labels=labels)
        coverage = GaugeMetricFamily(
            "idgate_kpi_coverage", "Share of matching events the KPI could count (consent)", labels=labels
        )
        for tenant, reports in list(self.reports.items()):
            for r in reports:
                for w in r.windows:
                    window = f"{w.minutes:g}m"
                    for platform, v in [("all", w.total), *w.by_platform.items()]:
                        if v.value is not None:
                            value.add_metric([tenant, r.id, window, platform], v.value)
                        if v.coverage is not None:
                            coverage.add_metric([tenant, r.id, window, platform], v.coverage)
        firing = GaugeMetricFamily(
            "idgate_alert_firing", "1 while an alert rule fires", labels=["tenant", "rule"]
        )
        for (tenant, rule), on in list(self.alerts.items()):
            firing.add_metric([tenant, rule], 1.0 if on else 0.0)
        yield value
        yield coverage
        yield firing


KPIS = KpiGauges()
REGISTRY.register(KPIS)
