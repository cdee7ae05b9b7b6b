"""Retention on the export side (PIPL Art. 19): what idgate holds for delivery is removed
once it is older than the period of the destinations it is for.

The period of a destination is the shortest of its own (``[tenants.retention]
destinations``) and those of the purposes it serves (``purposes``); the tenant's ``days``
applies when neither is set; a destination with none keeps its data (no cutoff). A run
covers, per tenant:

- outbox records (by time received; kept while any of their destinations still keeps
  data that old) and dead letters (by time dead-lettered);
- file sinks: whole JSONL day files and Parquet date partitions before the cutoff's day;
- the per-destination person index (persons whose data last went out before the cutoff);
- the tracking plan's violation records (by time received): kept no longer than the
  longest period of the tenant's destinations (a replay could send the event to any of
  them), and kept while one destination has no period;
- dedupe entries past the dedupe window (shared by every tenant; Redis lets them expire).

A dry run counts what an applied run would remove and changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from export.deadletter import DeadLetterStore
from export.file_sinks import expired_sink_files, remove_sink_files
from export.outbox import Outbox
from export.violations import ViolationStore

FILE_SINKS = frozenset({"jsonl", "parquet"})
# the stores a run goes through for each tenant, in order (progress bars count these)
EXPORT_STORES = ("outbox", "dead_letters", "sink_files", "person_index", "plan_violations")


@dataclass(frozen=True)
class DestinationPeriod:
    destination: str
    sink: str
    days: int


def destination_days(
    *,
    default_days: int,
    purpose_days: Mapping[str, int],
    destination_days: int | None,
    purposes: Collection[str],
) -> int | None:
    """A destination's period: the shortest of its own and its purposes', else the tenant's
    default (0: none); None when nothing limits it."""
    candidates = [purpose_days[p] for p in purposes if p in purpose_days]
    if destination_days is not None:
        candidates.append(destination_days)
    if not candidates and default_days:
        candidates.append(default_days)
    return min(candidates) if candidates else None


def cutoff(now: datetime, days: int) -> datetime:
    return now.astimezone(UTC) - timedelta(days=days)


def cutoff_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def expire_export_side(
    *,
    tenant: str,
    periods: Collection[DestinationPeriod],
    now: datetime,
    outbox: Outbox,
    dead_letters: DeadLetterStore,
    sink_dir: Path,
    apply: bool,
    step: Callable[[str], None] = lambda store: None,
    violations: ViolationStore | None = None,
    destinations: int | None = None,
) -> dict[str, int]:
    """One tenant's export stores past retention: counted, removed with ``apply``. ``step``
    is called after each store of ``EXPORT_STORES``."""
    cutoffs = {p.destination: cutoff_ms(cutoff(now, p.days)) for p in periods}
    removed = {"outbox": await outbox.expire(tenant, cutoffs, apply=apply)}
    step("outbox")
    removed["dead_letters"] = await asyncio.to_thread(dead_letters.expire, tenant, cutoffs, apply=apply)
    step("dead_letters")
    files = [
        path
        for p in periods
        if p.sink in FILE_SINKS
        for path in expired_sink_files(
            sink_dir / p.destination, p.sink, cutoff(now, p.days).date().isoformat()
        )
    ]
    removed["sink_files"] = await asyncio.to_thread(remove_sink_files, files) if apply else len(files)
    step("sink_files")
    person_index = 0
    for destination, ms in sorted(cutoffs.items()):
        person_index += await outbox.expire_person_index(destination, ms, apply=apply)
    removed["person_index"] = person_index
    step("person_index")
    # violation records: the longest period, once every destination has one
    limited = destinations is None or len(periods) >= destinations
    if violations is not None and periods and limited:
        oldest = cutoff_ms(cutoff(now, max(p.days for p in periods)))
        removed["plan_violations"] = await asyncio.to_thread(violations.expire, tenant, oldest, apply=apply)
    else:
        removed["plan_violations"] = 0
    step("plan_violations")
    return removed
