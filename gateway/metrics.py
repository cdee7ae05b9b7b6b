"""Prometheus metrics of the ingest path. Labels carry tenant/source ids, never identifiers."""

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Histogram

RECEIVED = Counter("idgate_events_received_total", "Messages received", ["tenant", "source"])
ACCEPTED = Counter("idgate_events_accepted_total", "Messages durably accepted", ["tenant", "source"])
REJECTED = Counter(
    "idgate_events_rejected_total", "Messages rejected as invalid", ["tenant", "source", "error"]
)
DUPLICATES = Counter("idgate_events_duplicate_total", "Messages dropped as duplicates", ["tenant", "source"])
DROPPED = Counter(
    "idgate_events_dropped_total", "Messages not stored for lack of a basis", ["tenant", "reason"]
)
REQUESTS_REFUSED = Counter("idgate_requests_refused_total", "Requests refused as a whole", ["error"])
OUTBOX_APPEND_SECONDS = Histogram(
    "idgate_outbox_append_seconds",
    "Time to durably append one request's events",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


@dataclass(frozen=True)
class SourceCounters:
    """The labelled children of one source, looked up once instead of on every request."""

    tenant: str
    source: str
    received: Counter
    accepted: Counter
    duplicates: Counter

    def rejected(self, error: str) -> Counter:
        return REJECTED.labels(self.tenant, self.source, error)


@cache
def source_counters(tenant: str, source: str) -> SourceCounters:
    return SourceCounters(
        tenant,
        source,
        RECEIVED.labels(tenant, source),
        ACCEPTED.labels(tenant, source),
        DUPLICATES.labels(tenant, source),
    )
