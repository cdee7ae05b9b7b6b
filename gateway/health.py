"""Identity and pipeline health per tenant, for the console's monitoring page: persons
created, merges, splits and links held for review (totals and the last hour), the quarantine
now, identifiers per person, events dropped by reason, tracking-plan violations by rule and
the delivery lag per destination.

The figures are the ones ``/metrics`` exports, read from this process: the identity
counters (gateway.identity_metrics), the ingest counts (gateway.metrics) and the delivery
workers' lag (export.delivery). They count what *this replica* did since it started (in
distributed mode every replica counts its own; Prometheus sums them), except the
quarantine size, which every replica reads from the whole replayed graph.

The last hour needs the counters of an hour ago: ``HealthHistory`` keeps one snapshot a
minute for a little over an hour (bounded: about 62 snapshots of a few figures per tenant).
While the process is younger than an hour, the last hour is everything since it started.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from export.delivery import DeliveryWorker
from gateway import identity_metrics, metrics

HOUR_SECONDS = 3600.0
SNAPSHOT_SECONDS = 60.0
# the identity counters, in the order the page shows them
IDENTITY_COUNTERS: tuple[tuple[str, Counter], ...] = (
    ("persons_created", identity_metrics.PERSONS_CREATED),
    ("merges", identity_metrics.MERGES),
    ("splits", identity_metrics.SPLITS),
    ("quarantined", identity_metrics.QUARANTINED),
    ("breaker_trips", identity_metrics.BREAKER_TRIPS),
)
Figures = dict[str, float]  # figure name ("merges", "dropped:no_consent", ...) -> count


def _counter_value(counter: Counter, tenant: str) -> float:
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("tenant") == tenant:
                return float(sample.value)
    return 0.0


def person_sizes(tenant: str, histogram: Histogram = identity_metrics.PERSON_SIZE) -> list[tuple[str, int]]:
    """The identifiers-per-person histogram as (range, links) per bucket, not cumulative:
    the person an accepted link joined, counted at each link since start."""
    cumulative: list[tuple[float, float]] = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("tenant") == tenant:
                cumulative.append((float(sample.labels["le"]), float(sample.value)))
    cumulative.sort()
    out: list[tuple[str, int]] = []
    below, lower = 0.0, 1.0
    for bound, count in cumulative:
        if bound == float("inf"):
            label = f"> {lower:g}"
        elif bound == lower + 1:
            label = f"{bound:g}"
        else:
            label = f"{lower + 1:g}–{bound:g}"
        out.append((label, round(count - below)))
        below, lower = count, bound
    return out


def counted_figures(tenant: str) -> Figures:
    """Every counter the health section shows, for one tenant, as this process holds it."""
    out: Figures = {name: _counter_value(c, tenant) for name, c in IDENTITY_COUNTERS}
    for (t, reason), n in list(metrics.INGEST.values["dropped"].items()):
        if t == tenant:
            out[f"dropped:{reason}"] = out.get(f"dropped:{reason}", 0.0) + n
    for (t, _source, _event, rule), n in list(metrics.INGEST.values["plan_violation"].items()):
        if t == tenant:
            out[f"violation:{rule}"] = out.get(f"violation:{rule}", 0.0) + n
    for (t, _source), n in list(metrics.INGEST.values["plan_kept"].items()):
        if t == tenant:
            out["plan_kept"] = out.get("plan_kept", 0.0) + n
    return out


class HealthHistory:
    """Snapshots of the counted figures, one a minute, kept a little over an hour."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.snapshots: deque[tuple[float, dict[str, Figures]]] = deque()

    def note(self, tenants: Iterable[str], read: Callable[[str], Figures] = counted_figures) -> None:
        """Keep a snapshot if the last one is a minute old (called by the refresh loop)."""
        now = self.clock()
        if self.snapshots and now - self.snapshots[-1][0] < SNAPSHOT_SECONDS:
            return
        self.snapshots.append((now, {t: read(t) for t in tenants}))
        # keep the newest snapshot at least an hour old, drop the ones before it
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - HOUR_SECONDS:
            self.snapshots.popleft()

    def last_hour(self, tenant: str, now_figures: Figures) -> tuple[Figures, float]:
        """Each figure's increase over the last hour (a little more: up to a snapshot
        period), and the minutes that covers; everything since start while the process is
        younger than an hour (the counters start at zero with it)."""
        now = self.clock()
        base: Figures = {}
        since = self.started
        for at, held in self.snapshots:
            if at > now - HOUR_SECONDS:
                break
            base, since = held.get(tenant, {}), at
        if not base and since == self.started:
            return dict(now_figures), (now - since) / 60
        return {k: v - base.get(k, 0.0) for k, v in now_figures.items()}, (now - since) / 60


@dataclass(frozen=True)
class Figure:
    name: str
    total: float  # since this process started
    last_hour: float


@dataclass(frozen=True)
class DestinationLag:
    destination: str
    lag_seconds: float | None  # None: nothing delivered or waiting since start
    delivered_ago: float | None  # seconds since the last delivered batch
    healthy: bool


@dataclass(frozen=True)
class HealthReport:
    identity: list[Figure]
    quarantine_size: int | None
    person_sizes: list[tuple[str, int]]
    dropped: list[Figure]
    violations: list[Figure]
    plan_kept: Figure
    lag: list[DestinationLag]
    minutes: int  # what "the last hour" covers (less while the process is young), at least 1


def _figures(names: Sequence[str], total: Figures, hour: Figures, prefix: str = "") -> list[Figure]:
    return [Figure(n, total.get(prefix + n, 0.0), hour.get(prefix + n, 0.0)) for n in names]


def health_report(
    tenant: str,
    history: HealthHistory,
    destinations: Sequence[str],
    workers: Sequence[DeliveryWorker],
    *,
    now: Callable[[], float] = time.time,
) -> HealthReport:
    total = counted_figures(tenant)
    hour, minutes = history.last_hour(tenant, total)
    resolver = identity_metrics.QUARANTINE.resolver
    graph = resolver.graphs.get(tenant) if resolver is not None else None
    by_destination = {w.destination: w for w in workers}
    lag = []
    at = now()
    for d in destinations:
        w = by_destination.get(d)
        if w is None:
            continue
        lag.append(
            DestinationLag(
                d, w.lag_seconds(at), at - w.delivered_at if w.delivered_at is not None else None, w.healthy
            )
        )

    def named(prefix: str) -> list[str]:
        return sorted(k.removeprefix(prefix) for k in total if k.startswith(prefix))

    return HealthReport(
        identity=_figures([n for n, _ in IDENTITY_COUNTERS], total, hour),
        quarantine_size=int(graph.stats()["quarantined"]) if graph is not None else None,
        person_sizes=person_sizes(tenant),
        dropped=_figures(named("dropped:"), total, hour, "dropped:"),
        violations=_figures(named("violation:"), total, hour, "violation:"),
        plan_kept=Figure("plan_kept", total.get("plan_kept", 0.0), hour.get("plan_kept", 0.0)),
        lag=lag,
        minutes=max(1, round(minutes)),
    )
