"""Watching a tracking plan at work (issue 14): a live tail of the last violations per source,
and the coverage counts behind ``idgate plan coverage`` (planned events never seen, seen
events not planned).

``check_plan`` notes every event it checks here. The tail is a bounded ring per (tenant,
source): what a team watches while a new build's events arrive. The coverage counts are
buffered in memory and written when a (source, event, name) shows up for the first time (so
coverage is always current) and otherwise at most every few seconds (so the hot path does not
write per batch), and at shutdown.

Embedded, both live in this process: the tail in memory, the counts in the ``plan_seen``
table of the violation store (``export.violations``). With Redis (distributed mode) every
replica shares them, so a team sees every replica's violations and counts from any one: the
tail is a capped list per (tenant, source) (``LPUSH`` + ``LTRIM``, written with the counts),
the counts one hash per tenant added to by a script (one key: any cluster slot).

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
import structlog
from redis.exceptions import RedisError

from export.violations import SeenCount, SqliteViolations
from gateway.plan import UNPLANNED, TrackingPlan, Violation

log = structlog.get_logger(__name__)

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
        redis: Any = None,
        prefix: str = "idgate",
    ) -> None:
        self.store = store
        self.tail_size = tail_size
        self.flush_seconds = flush_seconds
        self.redis = redis  # shared by the replicas (redis.asyncio client), else None
        self.prefix = prefix
        self._add_seen = redis.register_script(_ADD_SEEN) if redis is not None else None
        self._tail_out: list[tuple[str, TailEntry]] = []  # noted, not yet in Redis
        self._tails: dict[tuple[str, str], deque[TailEntry]] = {}
        self._pending: dict[_Key, list[int]] = {}  # seen, valid, last seen (ms)
        self._known: set[_Key] = set()
        self._unplanned: dict[str, set[str]] = {}
        self._new = False
        self._last_flush = time.monotonic()
        if store is not None and redis is None:
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
        if self.redis is not None:
            self._tail_out.append((tenant, entry))

    def tail(self, tenant: str, source: str | None = None, limit: int = TAIL_SIZE) -> list[TailEntry]:
        """The last violations this process saw, newest first: of one source, or of every
        source of the tenant."""
        rings = [r for (t, s), r in self._tails.items() if t == tenant and (source is None or s == source)]
        entries = [e for ring in rings for e in reversed(ring)]
        entries.sort(key=lambda e: e.at_ms, reverse=True)  # stable: one batch's stay newest first
        return entries[:limit]

    async def read_tail(
        self, tenant: str, source: str | None = None, limit: int = TAIL_SIZE
    ) -> list[TailEntry]:
        """The last violations of every replica (Redis), else of this process; newest first."""
        if self.redis is None:
            return self.tail(tenant, source, limit)
        await self._push_tail()
        if source is None:
            sources = sorted(s.decode() for s in await self.redis.smembers(self._sources_key(tenant)))
        else:
            sources = [source]
        entries: list[TailEntry] = []
        for name in sources:
            raw = await self.redis.lrange(self._tail_key(tenant, name), 0, limit - 1)
            entries += [_decode_tail(r) for r in raw]  # each list newest first
        entries.sort(key=lambda e: e.at_ms, reverse=True)
        return entries[:limit]

    def _tail_key(self, tenant: str, source: str) -> str:
        return f"{self.prefix}:plan:tail:{tenant}:{source}"

    def _sources_key(self, tenant: str) -> str:
        return f"{self.prefix}:plan:tail-sources:{tenant}"

    def _seen_key(self, tenant: str) -> str:
        return f"{self.prefix}:plan:seen:{tenant}"

    async def _push_tail(self) -> None:
        out, self._tail_out = self._tail_out, []
        if not out or self.redis is None:
            return
        by_key: dict[tuple[str, str], list[bytes]] = {}
        for tenant, entry in out:
            by_key.setdefault((tenant, entry.source), []).append(_encode(entry))
        try:
            for (tenant, source), entries in by_key.items():  # single-key commands: any cluster slot
                key = self._tail_key(tenant, source)
                await self.redis.lpush(key, *entries)
                await self.redis.ltrim(key, 0, self.tail_size - 1)
                await self.redis.sadd(self._sources_key(tenant), source)
        except RedisError as exc:  # the tail is a view: what Redis missed is in this process's
            log.warning("plan.tail_unshared", error=type(exc).__name__, entries=len(out))

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
        """Write the counts when a new (source, event, name) appeared or the interval passed
        (and, shared, the tail noted since the last write)."""
        due = self._new or time.monotonic() - self._last_flush >= self.flush_seconds
        if self._tail_out and (due or len(self._tail_out) >= self.tail_size):
            await self._push_tail()
        if self._pending and due:
            await self._write(self._take())

    async def flush(self) -> None:
        await self._push_tail()
        if self._pending:
            await self._write(self._take())

    async def _write(self, counts: list[SeenCount]) -> None:
        if self._add_seen is not None:
            by_tenant: dict[str, list[SeenCount]] = {}
            for c in counts:
                by_tenant.setdefault(c.tenant, []).append(c)
            try:
                await self._write_shared(by_tenant)
            except RedisError as exc:  # kept for the next write: an ingest never fails on this
                log.warning("plan.counts_unshared", error=type(exc).__name__, counts=len(counts))
                for c in counts:
                    cell = self._pending.setdefault((c.tenant, c.source, c.event, c.name), [0, 0, 0])
                    cell[0] += c.seen
                    cell[1] += c.valid
                    cell[2] = max(cell[2], c.last_seen_ms)
        elif self.store is not None:
            await asyncio.to_thread(self.store.add_seen, counts)

    async def _write_shared(self, by_tenant: dict[str, list[SeenCount]]) -> None:
        """One script call per tenant (a tenant's counts are one hash: one slot)."""
        assert self._add_seen is not None
        for tenant, cs in by_tenant.items():
            args = [
                a for c in cs for a in (_field(c.source, c.event, c.name), c.seen, c.valid, c.last_seen_ms)
            ]
            await self._add_seen(keys=[self._seen_key(tenant)], args=args)

    async def read_seen(self, tenant: str) -> tuple[SeenCount, ...]:
        """The coverage counts of every replica (Redis), else of this gateway's store."""
        await self.flush()
        if self.redis is None:
            return await asyncio.to_thread(self.store.seen, tenant) if self.store is not None else ()
        return seen_from_hash(tenant, await self.redis.hgetall(self._seen_key(tenant)))


# Adds (seen, valid) and keeps the latest time per "source<US>event<US>name": fields +"<US>s",
# +"<US>v", +"<US>l" of one hash per tenant.
_ADD_SEEN = """
for i = 1, #ARGV, 4 do
  local f = ARGV[i]
  redis.call('HINCRBY', KEYS[1], f .. '\x1fs', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], f .. '\x1fv', ARGV[i + 2])
  local last = tonumber(redis.call('HGET', KEYS[1], f .. '\x1fl') or '0')
  if tonumber(ARGV[i + 3]) > last then redis.call('HSET', KEYS[1], f .. '\x1fl', ARGV[i + 3]) end
end
return 1
"""
_US = "\x1f"
_encode = msgspec.json.Encoder().encode
_decode_tail = msgspec.json.Decoder(TailEntry).decode


def _field(source: str, event: str, name: str) -> str:
    return _US.join((source, event, name))


def seen_from_hash(tenant: str, raw: dict[bytes, bytes]) -> tuple[SeenCount, ...]:
    """The counts of one tenant's shared hash (``_ADD_SEEN``), ordered like the store's."""
    cells: dict[tuple[str, str, str], list[int]] = {}
    for k, v in raw.items():
        source, event, name, part = k.decode().split(_US)
        cell = cells.setdefault((source, event, name), [0, 0, 0])
        cell["svl".index(part)] = int(v)
    counts = [SeenCount(tenant, s, e, n, *cell) for (s, e, n), cell in cells.items()]
    return tuple(sorted(counts, key=lambda c: (c.event, c.name, c.source)))


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
