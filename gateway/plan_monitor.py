"""Watching a tracking plan at work (issue 14): a live tail of the last violations per source,
and the coverage counts behind ``idgate plan coverage`` (planned events never seen, seen
events not planned).

``check_plan`` notes every event it checks here. The tail is a bounded ring per (tenant,
source) in memory (per gateway process; what a team watches while a new build's events
arrive). The coverage counts go to the ``plan_seen`` table of the violation store
(``export.violations``): buffered in memory, written when a (source, event, name) shows up
for the first time (so coverage is always current) and otherwise at most every few seconds
(so the hot path does not write per batch), and at shutdown.

Labels stay bounded: a plan event is counted under its plan id; an unplanned event under
its name as sent (scrubbed like a stored event name), the first ``UNPLANNED_NAMES`` distinct
names per tenant, then under ``(other)``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from export.violations import SeenCount, SqliteViolations
from gateway.plan import UNPLANNED, TrackingPlan, Violation

TAIL_SIZE: Final = 100
UNPLANNED_NAMES: Final = 200
OTHER_NAMES: Final = "(other)"
FLUSH_SECONDS: Final = 5.0
_NAME_LENGTH: Final = 200


class TailEntry(msgspec.Struct, rename="camel", omit_defaults=True):
    """One message that broke the plan, as the live tail shows it (no value it sent)."""

    at_ms: int
    source: str
    event: str
    action: str
    violations: list[Violation]
    name: str = ""  # an unplanned event's name (scrubbed)
    message_id: str | None = None


_Key = tuple[str, str, str, str]  # tenant, source, event, name


class PlanMonitor:
    """The live tail and the buffered coverage counts (see the module docstring)."""

    def __init__(
        self,
        store: SqliteViolations | None,
        *,
        tail_size: int = TAIL_SIZE,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.store = store
        self.tail_size = tail_size
        self.flush_seconds = flush_seconds
        self._tails: dict[tuple[str, str], deque[TailEntry]] = {}
        self._pending: dict[_Key, list[int]] = {}  # seen, valid, last seen (ms)
        self._known: set[_Key] = set()
        self._unplanned: dict[str, set[str]] = {}
        self._new = False
        self._last_flush = time.monotonic()
        if store is not None:
            for c in store.seen():
                self._remember((c.tenant, c.source, c.event, c.name))

    def _remember(self, key: _Key) -> None:
        self._known.add(key)
        if key[2] == UNPLANNED:
            self._unplanned.setdefault(key[0], set()).add(key[3])

    # -- the tail ------------------------------------------------------------------------------
    def note(self, tenant: str, entry: TailEntry) -> None:
        ring = self._tails.get((tenant, entry.source))
        if ring is None:
            ring = self._tails[(tenant, entry.source)] = deque(maxlen=self.tail_size)
        ring.append(entry)

    def tail(self, tenant: str, source: str | None = None, limit: int = TAIL_SIZE) -> list[TailEntry]:
        """The last violations, newest first: of one source, or of every source of the tenant."""
        rings = [r for (t, s), r in self._tails.items() if t == tenant and (source is None or s == source)]
        entries = [e for ring in rings for e in reversed(ring)]
        entries.sort(key=lambda e: e.at_ms, reverse=True)  # stable: one batch's stay newest first
        return entries[:limit]

    # -- coverage counts -----------------------------------------------------------------------
    def count(
        self, tenant: str, source: str, event: str, name: str, *, seen: int, valid: int, at_ms: int
    ) -> None:
        """Checked events of one plan event (``name`` "") or unplanned name (scrubbed)."""
        if event == UNPLANNED:
            names = self._unplanned.setdefault(tenant, set())
            name = name[:_NAME_LENGTH]
            if name not in names and len(names) >= UNPLANNED_NAMES:
                name = OTHER_NAMES
        key = (tenant, source, event, name)
        if key not in self._known:
            self._remember(key)
            self._new = True
        cell = self._pending.get(key)
        if cell is None:
            cell = self._pending[key] = [0, 0, 0]
        cell[0] += seen
        cell[1] += valid
        cell[2] = max(cell[2], at_ms)

    def _take(self) -> list[SeenCount]:
        pending, self._pending = self._pending, {}
        self._new = False
        self._last_flush = time.monotonic()
        return [SeenCount(*key, seen, valid, last) for key, (seen, valid, last) in pending.items()]

    async def flush_if_due(self) -> None:
        """Write the counts when a new (source, event, name) appeared or the interval passed."""
        if self.store is None or not self._pending:
            return
        if self._new or time.monotonic() - self._last_flush >= self.flush_seconds:
            await asyncio.to_thread(self.store.add_seen, self._take())

    async def flush(self) -> None:
        if self.store is not None and self._pending:
            await asyncio.to_thread(self.store.add_seen, self._take())


def coverage(plan: TrackingPlan, counts: Sequence[SeenCount]) -> dict[str, Any]:
    """Planned events never seen, seen events not planned, and per plan event how many were
    seen and how many fit."""
    events: dict[str, dict[str, Any]] = {}
    unplanned: dict[str, int] = {}
    for c in counts:
        if c.event == UNPLANNED:
            unplanned[c.name] = unplanned.get(c.name, 0) + c.seen
            continue
        row = events.setdefault(c.event, {"seen": 0, "valid": 0, "sources": []})
        row["seen"] += c.seen
        row["valid"] += c.valid
        row["sources"] = sorted({*row["sources"], c.source})
    return {
        "plan": plan.name,
        "version": plan.version,
        "events": {e: events[e] for e in sorted(events) if e in plan.events},
        "neverSeen": sorted(set(plan.events) - set(events)),
        "notPlanned": dict(sorted(unplanned.items())),
        # counted under a plan event the current plan no longer has
        "retired": sorted(set(events) - set(plan.events)),
    }


def coverage_lines(report: dict[str, Any]) -> list[str]:
    out = [f"plan {report['plan']} v{report['version']}: coverage"]
    for event, row in report["events"].items():
        out.append(f"  {event}: {row['seen']} seen, {row['valid']} valid ({', '.join(row['sources'])})")
    out.append(f"  planned, never seen: {', '.join(report['neverSeen']) or '-'}")
    out.append(
        "  seen, not planned: "
        + (", ".join(f"{name} ({n})" for name, n in report["notPlanned"].items()) or "-")
    )
    if report["retired"]:
        out.append(f"  seen under events the plan no longer has: {', '.join(report['retired'])}")
    return out
