"""Streaming business KPIs: counts, sums and distinct persons over tumbling windows.

A KPI counts the accepted events that match its filter (event names, property values) in
tumbling buckets (``bucket_seconds``, 1 minute by default) per source; reads roll the
buckets up into sliding windows of 1, 5, 10 and 60 buckets, in total, per platform and per
source. Distinct persons go into HyperLogLog sketches (Redis ``PFADD``/``PFCOUNT`` shared by
every replica, ``datasketch`` in memory), so a KPI holds aggregates only: no identifier,
pseudonym or unified ID is stored, only sketch registers of a keyed digest of the person.

Each KPI declares the purpose it serves: an event feeds it only with a lawful basis for that
purpose (a contract purpose, or a destination the consent decision allowed that needs it).
Every matching event is counted as "matched", so each KPI reports its consent coverage
(counted / matched) and a dashboard never undercounts silently.

Comparisons with the same window a day or a week earlier need the buckets of a week ago,
which the per-source buckets (kept for two of the longest windows) do not reach. The KPIs
a tenant compares that way (``history``) also go, summed over sources, into a second set
of buckets kept for the tenant's history retention: totals only, one hash field (or one
HyperLogLog) per KPI and bucket, so a week costs what one KPI needs, not every KPI.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

KpiKind = Literal["count", "sum", "distinct", "ratio"]
WINDOWS: tuple[int, ...] = (1, 5, 10, 60)  # sliding windows, in buckets
# The source of the history buckets: every source summed (source ids never are "*").
ALL_SOURCES = "*"
DAY_SECONDS = 86_400
# What a rule compares a window with, and how far back that is (seconds; 0: the window before).
COMPARE_OFFSETS: dict[str, int] = {"previous": 0, "day_ago": DAY_SECONDS, "week_ago": 7 * DAY_SECONDS}
PropertyValue = str | int | float | bool


class KpiDefinition(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One KPI of a tenant (``[[tenants.kpis]]``)."""

    id: str
    kind: KpiKind = "count"
    # track event names; "$page" / "$screen" for page and screen calls
    events: list[str] = []
    # property -> the value it must have; "name" also matches a page or screen call's name
    # (a Sensors view event's $title, else $screen_name)
    where: dict[str, PropertyValue] = {}
    # sum: the properties holding the amount, the first present one counts
    fields: list[str] = []
    # ratio: numerator / denominator, ids of other KPIs of the tenant
    numerator: str = ""
    denominator: str = ""
    purpose: str = "analytics"
    description: str = ""


def _count(id: str, events: list[str], purpose: str, description: str, **kw: Any) -> KpiDefinition:
    return KpiDefinition(id=id, kind="count", events=events, purpose=purpose, description=description, **kw)


def _distinct(id: str, events: list[str], description: str, **kw: Any) -> KpiDefinition:
    return KpiDefinition(
        id=id, kind="distinct", events=events, purpose="analytics", description=description, **kw
    )


def _ratio(id: str, numerator: str, denominator: str, description: str) -> KpiDefinition:
    return KpiDefinition(
        id=id, kind="ratio", numerator=numerator, denominator=denominator, description=description
    )


# Segment page/screen calls, and the Sensors SDKs' view events (web, App, mini-program)
_PAGES = ["$page", "$screen", "$pageview", "$AppViewScreen", "$MPViewScreen"]
_AMOUNT = ["revenue", "total", "amount"]
# The seed's set (Segment e-commerce spec event names): what a tenant without
# [[tenants.kpis]] gets. Behavioural KPIs need analytics consent; the transaction ones run
# on the contract basis (necessary_service).
DEFAULT_KPIS: tuple[KpiDefinition, ...] = (
    _count("pv_home", _PAGES, "analytics", "Home page views", where={"name": "Home"}),
    _distinct("uv_home", _PAGES, "Persons who viewed the home page", where={"name": "Home"}),
    _count("pv_product", ["Product Viewed"], "analytics", "Product detail page views"),
    _distinct("uv_product", ["Product Viewed"], "Persons who viewed a product detail page"),
    _count("pv_cart", ["Cart Viewed"], "analytics", "Cart page views"),
    _distinct("uv_cart", ["Cart Viewed"], "Persons who viewed the cart"),
    _count("add_to_cart", ["Product Added"], "analytics", "Products added to a cart"),
    _distinct("cart_persons", ["Product Added"], "Persons who added a product to a cart"),
    _distinct("paying_persons", ["Order Completed"], "Persons who completed a paid order"),
    _ratio("conversion_home_product", "uv_product", "uv_home", "Funnel: home -> product detail"),
    _ratio("conversion_product_cart", "cart_persons", "uv_product", "Funnel: product detail -> cart"),
    _ratio("conversion_cart_paid", "paying_persons", "cart_persons", "Funnel: cart -> payment success"),
    _ratio("conversion_overall", "paying_persons", "uv_home", "Funnel: home -> payment success"),
    _ratio("add_to_cart_rate", "add_to_cart", "pv_product", "Products added per product detail view"),
    _count("payments_requested", ["Payment Requested"], "necessary_service", "Payments requested"),
    _count("payments_succeeded", ["Payment Succeeded"], "necessary_service", "Payments that succeeded"),
    _ratio("payment_success_rate", "payments_succeeded", "payments_requested", "Payment success rate"),
    _count("orders", ["Order Completed"], "necessary_service", "Orders completed"),
    KpiDefinition(
        id="gmv",
        kind="sum",
        events=["Order Completed"],
        fields=_AMOUNT,
        purpose="necessary_service",
        description="Gross merchandise value (properties.revenue, total or amount)",
    ),
    _ratio("average_order_value", "gmv", "orders", "Average order value"),
)


def check_kpis(
    kpis: Sequence[KpiDefinition],
    purposes: Iterable[str],
    where: str,
    inherited: Sequence[KpiDefinition] = (),
) -> list[str]:
    """The problems of a tenant's own KPI list (unknown purpose, ratio over an unknown KPI,
    ...); ``inherited``: the defaults it keeps, which ratios may refer to."""
    problems: list[str] = []
    known = set(purposes)
    everything = {**{k.id: k for k in inherited}, **{k.id: k for k in kpis}}
    ids = set(everything)
    seen: set[str] = set()
    for i, k in enumerate(kpis):
        w = f"{where}[{i}]"
        if not k.id or not all(c.isalnum() or c in "_-" for c in k.id):
            problems.append(f"{w}.id: {k.id!r} must be letters, digits, '_' or '-'")
        if k.id in seen:
            problems.append(f"{w}.id: duplicate KPI id {k.id!r}")
        seen.add(k.id)
        if k.kind == "ratio":
            for part in ("numerator", "denominator"):
                ref = getattr(k, part)
                if ref not in ids:
                    problems.append(f"{w}.{part}: unknown KPI {ref!r}")
                elif everything[ref].kind == "ratio":
                    problems.append(f"{w}.{part}: {ref!r} is itself a ratio")
            if k.events or k.where or k.fields:
                problems.append(f"{w}: a ratio takes numerator and denominator, not events/where/fields")
            continue
        if not k.events:
            problems.append(f"{w}.events: name at least one event")
        if k.purpose not in known:
            problems.append(f"{w}.purpose: unknown purpose {k.purpose!r}")
        if k.kind == "sum" and not k.fields:
            problems.append(f"{w}.fields: a sum needs the properties holding the amount")
        if k.kind != "sum" and k.fields:
            problems.append(f"{w}.fields: only a sum takes fields")
    return problems


# -- what the pipeline hands over ------------------------------------------------------------
@dataclass(slots=True)
class KpiEvent:
    """One event past dedupe, as the KPIs see it (no identifier beyond ``person``, which
    is only hashed into sketches)."""

    name: str  # track event name, or "$page" / "$screen" / "$identify" ...
    page_name: str | None
    properties: Mapping[str, Any]
    # the purposes the event has a lawful basis for; None: not accepted (dropped)
    purposes: frozenset[str] | Callable[[], frozenset[str]] | None
    person: str | None


Cell = list[float]  # [matched, counted, sum]


def fold_cells(held: dict[tuple[str, str], Cell], cells: Mapping[tuple[str, str], Cell]) -> None:
    """Add ``cells`` into ``held``, cell by cell (new keys get a copy)."""
    for key, (m, c, s) in cells.items():
        cell = held.get(key)
        if cell is None:
            held[key] = [m, c, s]
        else:
            cell[0] += m
            cell[1] += c
            cell[2] += s


class KpiStore(Protocol):
    """Where the per-bucket aggregates live: memory (one process) or Redis (every replica)."""

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
    ) -> None: ...

    async def cells(
        self, tenant: str, buckets: Sequence[int], source: str = ""
    ) -> dict[int, dict[tuple[str, str], Cell]]:
        """The cells of these buckets: per source, or (``ALL_SOURCES``) the history."""
        ...

    async def distinct(
        self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int]
    ) -> int: ...


class MemoryKpiStore:
    """The embedded store: dicts and ``datasketch`` HyperLogLogs, pruned past retention."""

    def __init__(self, retention_buckets: int, history_buckets: Mapping[str, int] | None = None) -> None:
        # imported here, at start: datasketch pulls numpy and scipy (about a second), which
        # must not land on the first request
        from datasketch import HyperLogLog

        self._sketch = HyperLogLog
        self.retention = retention_buckets
        # tenant -> how many buckets its history (source "*") is kept
        self.history = dict(history_buckets or {})
        self._cells: dict[tuple[str, int], dict[tuple[str, str], Cell]] = {}
        self._sketches: dict[tuple[str, int, str, str], Any] = {}
        self._newest = 0

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
    ) -> None:
        if bucket > self._newest:
            self._newest = bucket
            self._prune(bucket - self.retention)
        fold_cells(self._cells.setdefault((tenant, bucket), {}), cells)
        for (kpi, source), values in members.items():
            sketch = self._sketches.get((tenant, bucket, kpi, source))
            if sketch is None:
                sketch = self._sketches[(tenant, bucket, kpi, source)] = self._sketch(p=12)
            for v in values:
                sketch.update(v)

    def _prune(self, oldest: int) -> None:
        newest = oldest + self.retention

        def expired(tenant: str, bucket: int, source: str) -> bool:
            if source == ALL_SOURCES:
                return bucket < newest - max(self.retention, self.history.get(tenant, 0))
            return bucket < oldest

        for key, cells in list(self._cells.items()):
            if key[1] >= oldest:
                continue
            for cell in [c for c in cells if expired(key[0], key[1], c[1])]:
                del cells[cell]
            if not cells:
                del self._cells[key]
        for skey in [k for k in self._sketches if k[1] < oldest and expired(k[0], k[1], k[3])]:
            del self._sketches[skey]

    async def cells(
        self, tenant: str, buckets: Sequence[int], source: str = ""
    ) -> dict[int, dict[tuple[str, str], Cell]]:
        history = source == ALL_SOURCES
        return {
            b: {k: c for k, c in self._cells.get((tenant, b), {}).items() if (k[1] == ALL_SOURCES) == history}
            for b in buckets
        }

    async def distinct(self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int]) -> int:
        union = self._sketch(p=12)
        found = False
        for b in buckets:
            for s in sources:
                sketch = self._sketches.get((tenant, b, kpi, s))
                if sketch is not None:
                    union.merge(sketch)
                    found = True
        return round(union.count()) if found else 0


class RedisKpiStore:
    """KPIs summed over every replica: one hash per tenant and bucket (``HINCRBY``) and one
    HyperLogLog per KPI, source and bucket (``PFADD``), both expiring after retention."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        retention_buckets: int,
        bucket_seconds: float,
        history_buckets: Mapping[str, int] | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:kpi"
        self.ttl = max(1, int(retention_buckets * bucket_seconds) + 60)
        # tenant -> TTL of its history keys (source "*")
        self.history_ttl = {
            t: max(self.ttl, int(n * bucket_seconds) + 60) for t, n in (history_buckets or {}).items()
        }

    def _hash(self, tenant: str, bucket: int, source: str = "") -> str:
        # the history (every source summed) in a hash of its own, so it expires on its own
        where = "history:" if source == ALL_SOURCES else ""
        return f"{self.prefix}:{where}{tenant}:{bucket}"

    def _ttl(self, tenant: str, source: str) -> int:
        return self.history_ttl.get(tenant, self.ttl) if source == ALL_SOURCES else self.ttl

    def _hll(self, tenant: str, bucket: int, kpi: str, source: str) -> str:
        return f"{self.prefix}:hll:{tenant}:{kpi}:{source}:{bucket}"

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
    ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        keys: set[tuple[str, str]] = set()
        for (kpi, source), (m, c, s) in cells.items():
            key = self._hash(tenant, bucket, source)
            keys.add((key, source))
            base = f"{kpi}\x1f{source}"
            if m:  # the history keeps no matched count
                pipe.hincrby(key, base + "\x1fm", int(m))
            if c:
                pipe.hincrby(key, base + "\x1fc", int(c))
            if s:
                pipe.hincrbyfloat(key, base + "\x1fs", s)
        for key, source in keys:
            pipe.expire(key, self._ttl(tenant, source))
        for (kpi, source), values in members.items():
            hll = self._hll(tenant, bucket, kpi, source)
            pipe.pfadd(hll, *values)
            pipe.expire(hll, self._ttl(tenant, source))
        await pipe.execute()

    async def cells(
        self, tenant: str, buckets: Sequence[int], source: str = ""
    ) -> dict[int, dict[tuple[str, str], Cell]]:
        pipe = self.redis.pipeline(transaction=False)
        for b in buckets:
            pipe.hgetall(self._hash(tenant, b, source))
        out: dict[int, dict[tuple[str, str], Cell]] = {}
        for b, raw in zip(buckets, await pipe.execute(), strict=True):
            held: dict[tuple[str, str], Cell] = {}
            for f, v in raw.items():
                f = f.decode() if isinstance(f, bytes) else f
                kpi, source, part = f.split("\x1f")
                cell = held.setdefault((kpi, source), [0.0, 0.0, 0.0])
                cell["mcs".index(part)] += float(v)
            out[b] = held
        return out

    async def distinct(self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int]) -> int:
        keys = [self._hll(tenant, b, kpi, s) for b in buckets for s in sources]
        if not keys:
            return 0
        return int(await self.redis.pfcount(*keys))


class BufferedKpiStore:
    """Write-behind in front of the shared store: a batch's increments merge in memory and
    go out every ``flush`` (one pipeline per tenant and bucket), so a single-event request
    does not pay a Redis round trip for its KPIs. Reads see the shared figures, at most one
    flush period behind; a flush that fails is merged back and retried."""

    def __init__(self, inner: KpiStore) -> None:
        self.inner = inner
        self._cells: dict[tuple[str, int], dict[tuple[str, str], Cell]] = {}
        self._members: dict[tuple[str, int], dict[tuple[str, str], set[bytes]]] = {}

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
    ) -> None:
        fold_cells(self._cells.setdefault((tenant, bucket), {}), cells)
        if members:
            sets = self._members.setdefault((tenant, bucket), {})
            for key, values in members.items():
                sets.setdefault(key, set()).update(values)

    async def flush(self) -> None:
        cells, self._cells = self._cells, {}
        members, self._members = self._members, {}
        for (tenant, bucket), held in cells.items():
            sets = members.get((tenant, bucket), {})
            try:
                await self.inner.add(tenant, bucket, held, sets)
            except Exception:
                await self.add(tenant, bucket, held, sets)  # next time
                raise

    async def cells(
        self, tenant: str, buckets: Sequence[int], source: str = ""
    ) -> dict[int, dict[tuple[str, str], Cell]]:
        return await self.inner.cells(tenant, buckets, source)

    async def distinct(self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int]) -> int:
        return await self.inner.distinct(tenant, kpi, sources, buckets)


# -- the engine ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Compiled:
    kpi: KpiDefinition
    where: tuple[tuple[str, PropertyValue], ...]


@dataclass
class _TenantKpis:
    definitions: tuple[KpiDefinition, ...]
    by_event: dict[str, list[_Compiled]]
    # source id -> platform
    sources: dict[str, str]
    # the KPIs kept (summed over sources) for day / week comparisons, and for how many buckets
    history: frozenset[str] = frozenset()
    history_buckets: int = 0


class WindowValue(msgspec.Struct, rename="camel"):
    """A KPI over one sliding window (ending now), in total, per platform or per source."""

    value: float | None
    matched: int
    counted: int
    coverage: float | None
    previous: float | None = None  # the same KPI over the window before
    # the same window a day / a week earlier: totals of KPIs kept in history only
    day_ago: float | None = None
    week_ago: float | None = None

    def compared(self, compare: str) -> float | None:
        """The value a rule compares with: ``previous``, ``day_ago`` or ``week_ago``."""
        value: float | None = getattr(self, compare)
        return value


class KpiWindow(msgspec.Struct, rename="camel"):
    minutes: float
    total: WindowValue
    by_platform: dict[str, WindowValue]
    by_source: dict[str, WindowValue]


class KpiReport(msgspec.Struct, rename="camel"):
    id: str
    kind: str
    purpose: str
    description: str
    windows: list[KpiWindow]


_Memo = dict[tuple[str, tuple[str, ...], int, int], WindowValue]


def _person_digest(person: str) -> bytes:
    # the sketch sees a digest of the (already pseudonymous) unified ID, never the ID itself
    return hashlib.blake2b(person.encode(), digest_size=8, person=b"idgate-kpi-uv").digest()


class KpiEngine:
    """Feeds a tenant's KPIs from accepted events and reads them back per window."""

    def __init__(
        self,
        store: KpiStore,
        kpis: Mapping[str, Sequence[KpiDefinition]],
        platforms: Mapping[str, Mapping[str, str]],
        *,
        bucket_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        history: Mapping[str, tuple[Iterable[str], int]] | None = None,
    ) -> None:
        """``history``: tenant -> (the KPIs to keep for day / week comparisons, ratios
        standing for their parts; how many buckets)."""
        self.store = store
        self.bucket_seconds = bucket_seconds
        self.clock = clock
        self.tenants: dict[str, _TenantKpis] = {}
        for tenant, defs in kpis.items():
            by_event: dict[str, list[_Compiled]] = {}
            for k in defs:
                if k.kind == "ratio":
                    continue
                compiled = _Compiled(k, tuple(k.where.items()))
                for name in k.events:
                    by_event.setdefault(name, []).append(compiled)
            kept, kept_buckets = (history or {}).get(tenant, ((), 0))
            self.tenants[tenant] = _TenantKpis(
                tuple(defs),
                by_event,
                dict(platforms.get(tenant, {})),
                history_parts(defs, kept),
                kept_buckets,
            )

    def offset_buckets(self, compare: str) -> int:
        """How many buckets back a comparison looks (``day_ago``, ``week_ago``)."""
        return round(COMPARE_OFFSETS[compare] / self.bucket_seconds)

    def bucket(self, now: float | None = None) -> int:
        return int((self.clock() if now is None else now) // self.bucket_seconds)

    async def observe(self, tenant: str, source: str, events: Iterable[KpiEvent]) -> None:
        """Count a batch of events (past dedupe) of one source: one store round trip."""
        state = self.tenants.get(tenant)
        if state is None or not state.by_event:
            return
        by_event = state.by_event
        history = state.history
        cells: dict[tuple[str, str], Cell] = {}
        members: dict[tuple[str, str], set[bytes]] = {}
        for ev in events:
            matching = by_event.get(ev.name)
            if not matching:
                continue
            purposes: frozenset[str] | None = None
            for c in matching:
                if c.where and not _matches(c.where, ev):
                    continue
                k = c.kpi
                key = (k.id, source)
                cell = cells.get(key)
                if cell is None:
                    cell = cells[key] = [0, 0, 0.0]
                cell[0] += 1
                if ev.purposes is None:
                    continue
                if purposes is None:
                    purposes = ev.purposes if isinstance(ev.purposes, frozenset) else ev.purposes()
                if k.purpose not in purposes:
                    continue
                cell[1] += 1
                amount = _amount(ev.properties, k.fields) if k.kind == "sum" else 0.0
                cell[2] += amount
                digest = _person_digest(ev.person) if k.kind == "distinct" and ev.person else None
                if digest is not None:
                    members.setdefault(key, set()).add(digest)
                if k.id in history:  # the totals kept for day / week comparisons
                    total = cells.get((k.id, ALL_SOURCES))
                    if total is None:
                        total = cells[(k.id, ALL_SOURCES)] = [0, 0, 0.0]
                    total[1] += 1
                    total[2] += amount
                    if digest is not None:
                        members.setdefault((k.id, ALL_SOURCES), set()).add(digest)
        if cells:
            await self.store.add(tenant, self.bucket(), cells, members)

    async def report(self, tenant: str, windows: Sequence[int] = WINDOWS) -> list[KpiReport]:
        """Every KPI of the tenant over each sliding window ending in the current bucket,
        with the window before it (for relative-change alerts)."""
        state = self.tenants.get(tenant)
        if state is None:
            return []
        now = self.bucket()
        longest = max(windows)
        buckets = list(range(now - 2 * longest + 1, now + 1))
        held = await self.store.cells(tenant, buckets)
        sources = sorted(state.sources)
        groups: list[tuple[str, str, list[str]]] = [("total", "", sources)]
        for platform in sorted(set(state.sources.values())):
            groups.append(("platform", platform, [s for s in sources if state.sources[s] == platform]))
        groups += [("source", s, [s]) for s in sources]
        defs = {k.id: k for k in state.definitions}
        memo: _Memo = {}
        # the history of a day and a week ago, where it is kept long enough
        back = {
            compare: self.offset_buckets(compare)
            for compare in ("day_ago", "week_ago")
            if state.history and self.offset_buckets(compare) + longest <= state.history_buckets
        }
        history_held = {
            compare: await self.store.cells(tenant, range(now - n - longest + 1, now - n + 1), ALL_SOURCES)
            for compare, n in back.items()
        }
        out: list[KpiReport] = []
        for k in state.definitions:
            report_windows = []
            for w in windows:
                current = list(range(now - w + 1, now + 1))
                before = list(range(now - 2 * w + 1, now - w + 1))
                values: dict[tuple[str, str], WindowValue] = {}
                for kind, name, members in groups:
                    cur = await self._value(tenant, k, defs, members, current, held, memo)
                    prev = await self._value(tenant, k, defs, members, before, held, memo)
                    cur.previous = prev.value
                    values[(kind, name)] = cur
                if history_parts([k], (k.id,), defs) <= state.history:
                    total = values[("total", "")]
                    for compare, n in back.items():
                        then = [b - n for b in current]
                        held_then = history_held[compare]
                        value = await self._value(tenant, k, defs, [ALL_SOURCES], then, held_then, memo)
                        setattr(total, compare, value.value)
                report_windows.append(
                    KpiWindow(
                        minutes=w * self.bucket_seconds / 60,
                        total=values[("total", "")],
                        by_platform={n: v for (kind, n), v in values.items() if kind == "platform"},
                        by_source={n: v for (kind, n), v in values.items() if kind == "source"},
                    )
                )
            out.append(
                KpiReport(k.id, k.kind, k.purpose if k.kind != "ratio" else "", k.description, report_windows)
            )
        return out

    async def _value(
        self,
        tenant: str,
        k: KpiDefinition,
        defs: Mapping[str, KpiDefinition],
        sources: Sequence[str],
        buckets: Sequence[int],
        held: Mapping[int, Mapping[tuple[str, str], Cell]],
        memo: _Memo,
    ) -> WindowValue:
        if k.kind == "ratio":
            num = await self._value(tenant, defs[k.numerator], defs, sources, buckets, held, memo)
            den = await self._value(tenant, defs[k.denominator], defs, sources, buckets, held, memo)
            ratio = num.value / den.value if num.value is not None and den.value else None
            matched, counted = num.matched + den.matched, num.counted + den.counted
            # the ratio's volume is its denominator's (what min_volume compares against)
            return WindowValue(ratio, den.matched, den.counted, counted / matched if matched else None)
        memo_key = (k.id, tuple(sources), buckets[0], buckets[-1])
        known = memo.get(memo_key)
        if known is not None:
            return WindowValue(known.value, known.matched, known.counted, known.coverage)
        matched = counted = 0
        total = 0.0
        for b in buckets:
            cells = held.get(b)
            if not cells:
                continue
            for s in sources:
                cell = cells.get((k.id, s))
                if cell is not None:
                    matched += int(cell[0])
                    counted += int(cell[1])
                    total += cell[2]
        if k.kind == "count":
            value: float = counted
        elif k.kind == "sum":
            value = round(total, 6)
        else:
            value = await self.store.distinct(tenant, k.id, sources, buckets) if counted else 0
        found = WindowValue(value, matched, counted, counted / matched if matched else None)
        memo[memo_key] = found
        return WindowValue(value, matched, counted, found.coverage)


def history_parts(
    kpis: Iterable[KpiDefinition], ids: Iterable[str], defs: Mapping[str, KpiDefinition] | None = None
) -> frozenset[str]:
    """The KPIs whose buckets keep the history of ``ids``: a ratio's numerator and
    denominator stand for it."""
    by_id = dict(defs) if defs is not None else {}
    by_id.update({k.id: k for k in kpis})
    out: set[str] = set()
    for i in ids:
        k = by_id.get(i)
        if k is None:
            continue
        out.update((k.numerator, k.denominator) if k.kind == "ratio" else (k.id,))
    return frozenset(out)


def _matches(where: tuple[tuple[str, PropertyValue], ...], ev: KpiEvent) -> bool:
    props = ev.properties
    for key, want in where:
        if key in props:
            have = props[key]
        elif key == "name":
            have = ev.page_name
        else:
            return False
        if have != want:
            return False
    return True


def _amount(props: Mapping[str, Any], fields: Sequence[str]) -> float:
    for f in fields:
        v = props.get(f)
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return 0.0
    return 0.0


@dataclass
class KpiSnapshot:
    """The latest reports per tenant, refreshed by the evaluation loop (what /metrics shows)."""

    reports: dict[str, list[KpiReport]] = field(default_factory=dict)
