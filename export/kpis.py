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
HyperLogLog) per KPI and bucket, so a week costs what one KPI needs, not every KPI. A rule
watching one source that way keeps that KPI of that source only (``source_history``), under
the history source ``*<source id>``, in the same buckets and for as long.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

from identity.redis_client import hash_tag, is_cluster
from identity.scrub import looks_like_identifier

KpiKind = Literal["count", "sum", "distinct", "ratio", "top", "new_persons", "returning_persons"]
# Distinct persons split by whether they were seen on an earlier day (China Standard Time)
# of the lookback, in one Bloom filter per tenant and day: bits of a digest, no identifier.
PERSON_KINDS = frozenset({"new_persons", "returning_persons"})
RETURNING_LOOKBACK_DAYS = 30
SEEN_FILTER_BITS = 1 << 23  # 1 MiB a day: false "returning" about 0.05 % at 500,000 persons
SEEN_FILTER_HASHES = 7  # seen in the lookback, 1.8 % at 1,000,000
DAY_OFFSET_SECONDS = 8 * 3600  # Asia/Shanghai, no daylight saving
WINDOWS: tuple[int, ...] = (1, 5, 10, 60)  # sliding windows, in buckets
# The source of the history buckets: every source summed (source ids never start with
# "*"); "*<source id>": one source's history, for a rule watching that source
ALL_SOURCES = "*"


def source_history(source: str) -> str:
    """The history source keeping one source's KPIs (a rule comparing it a day or a week back)."""
    return ALL_SOURCES + source


def is_history(source: str) -> bool:
    return source.startswith(ALL_SOURCES)


DAY_SECONDS = 86_400
# What a rule compares a window with, and how far back that is (seconds; 0: the window before).
COMPARE_OFFSETS: dict[str, int] = {"previous": 0, "day_ago": DAY_SECONDS, "week_ago": 7 * DAY_SECONDS}
PropertyValue = str | int | float | bool
# top: the values kept per bucket and source (the largest; a bounded top-K, not every SKU),
# and the longest value kept (longer ones, and values that look like identifiers, are not)
TOP_KEPT_PER_BUCKET = 500
TOP_MAX_VALUE_CHARS = 64


class KpiDefinition(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One KPI of a tenant (``[[tenants.kpis]]``)."""

    id: str
    kind: KpiKind = "count"
    # track event names; "$page" / "$screen" for page and screen calls; "*" every event
    events: list[str] = []
    # property -> the value it must have; "name" also matches a page or screen call's name
    # (a Sensors view event's $title, else $screen_name)
    where: dict[str, PropertyValue] = {}
    # sum / top: the properties holding the amount, the first present one counts
    fields: list[str] = []
    # top: the property naming what is ranked (first present: e.g. sku, product_id), inside
    # each object of the ``items`` list property when set (e.g. an order's products), the
    # amount multiplied by ``quantity_field`` when set, the ``top`` largest reported
    group_by: list[str] = []
    items: str = ""
    quantity_field: str = ""
    top: int = 10
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
    KpiDefinition(
        id="new_persons",
        kind="new_persons",
        events=_PAGES,
        description=f"Persons viewing a page not seen on any of the {RETURNING_LOOKBACK_DAYS} days before",
    ),
    KpiDefinition(
        id="returning_persons",
        kind="returning_persons",
        events=_PAGES,
        description=f"Persons viewing a page seen on one of the {RETURNING_LOOKBACK_DAYS} days before",
    ),
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
    KpiDefinition(
        id="top_skus",
        kind="top",
        events=["Order Completed"],
        items="products",
        group_by=["sku", "product_id"],
        fields=["price"],
        quantity_field="quantity",
        purpose="necessary_service",
        description="Top SKUs by sales (properties.products[]: sku or product_id, price x quantity)",
    ),
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
        if k.kind not in ("sum", "top") and k.fields:
            problems.append(f"{w}.fields: only a sum or a top takes fields")
        if k.kind == "top":
            if not k.group_by:
                problems.append(f"{w}.group_by: a top needs the property naming what is ranked")
            if not 1 <= k.top <= 100:
                problems.append(f"{w}.top: must be between 1 and 100")
        elif k.group_by or k.items or k.quantity_field:
            problems.append(f"{w}: group_by, items and quantity_field are for a top")
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
    # whether ``person`` is a linked person (identity_linking consent let the graph join the
    # event's identifiers); False: the device or account alone, which UV then counts apart
    linked: bool = True


# [matched, counted, sum]; a distinct-person KPI has no amount: its third figure counts the
# counted events whose person was a device or account alone (not linked, no
# identity_linking consent), so each window says how much of its UV is by person
Cell = list[float]


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


Tops = Mapping[tuple[str, str], Mapping[str, float]]
# (KPI, source) -> (whether the KPI counts returning persons, the digests of its persons)
Persons = Mapping[tuple[str, str], tuple[bool, set[bytes]]]


def day_of(bucket: int, bucket_seconds: float) -> int:
    return int((bucket * bucket_seconds + DAY_OFFSET_SECONDS) // DAY_SECONDS)


def seen_positions(digest: bytes) -> list[int]:
    """The filter bits of a person digest (double hashing over its two halves)."""
    h1 = int.from_bytes(digest[:4], "big")
    h2 = int.from_bytes(digest[4:8], "big") | 1
    return [(h1 + i * h2) % SEEN_FILTER_BITS for i in range(SEEN_FILTER_HASHES)]


def split_persons(persons: Persons, returning: Mapping[bytes, bool]) -> dict[tuple[str, str], set[bytes]]:
    """The members each new / returning KPI adds to its sketch, once persons are classified."""
    out: dict[tuple[str, str], set[bytes]] = {}
    for key, (wants_returning, digests) in persons.items():
        chosen = {d for d in digests if returning[d] == wants_returning}
        if chosen:
            out[key] = chosen
    return out


def fold_persons(held: dict[tuple[str, str], tuple[bool, set[bytes]]], persons: Persons) -> None:
    for key, (wants_returning, digests) in persons.items():
        held.setdefault(key, (wants_returning, set()))[1].update(digests)


class MemorySeenFilter:
    """The embedded registry: one bytearray Bloom filter per tenant and day, and the union of
    the lookback's days before today (built once a day)."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, int], bytearray] = {}
        self._before: dict[tuple[str, int], bytes] = {}

    def classify(self, tenant: str, day: int, digests: set[bytes]) -> dict[bytes, bool]:
        before = self._before.get((tenant, day))
        if before is None:
            union = 0
            for d in range(day - RETURNING_LOOKBACK_DAYS, day):
                bits = self._days.get((tenant, d))
                if bits is not None:
                    union |= int.from_bytes(bits, "big")
            before = self._before[(tenant, day)] = union.to_bytes(SEEN_FILTER_BITS // 8, "big")
            for old in [k for k in self._before if k[0] == tenant and k[1] < day]:
                del self._before[old]
            for old in [k for k in self._days if k[0] == tenant and k[1] < day - RETURNING_LOOKBACK_DAYS]:
                del self._days[old]
        today = self._days.get((tenant, day))
        if today is None:
            today = self._days[(tenant, day)] = bytearray(SEEN_FILTER_BITS // 8)
        out = {}
        for digest in digests:
            positions = seen_positions(digest)
            out[digest] = all(before[p >> 3] & (0x80 >> (p & 7)) for p in positions)
            for p in positions:
                today[p >> 3] |= 0x80 >> (p & 7)
        return out


def fold_tops(held: dict[tuple[str, str], dict[str, float]], tops: Tops) -> None:
    """Add ``tops`` into ``held``, keeping at most TOP_KEPT_PER_BUCKET values per key (the
    largest) once a key holds twice that."""
    for key, values in tops.items():
        kept = held.setdefault(key, {})
        for value, amount in values.items():
            kept[value] = kept.get(value, 0.0) + amount
        if len(kept) > 2 * TOP_KEPT_PER_BUCKET:
            largest = sorted(kept.items(), key=lambda kv: kv[1], reverse=True)[:TOP_KEPT_PER_BUCKET]
            held[key] = dict(largest)


def largest(totals: Mapping[str, float], k: int) -> list[TopValue]:
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [TopValue(name, round(amount, 6)) for name, amount in ranked]


class KpiStore(Protocol):
    """Where the per-bucket aggregates live: memory (one process) or Redis (every replica)."""

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
        tops: Tops | None = None,
        persons: Persons | None = None,
    ) -> None:
        """``persons``: the digests of new / returning KPIs' persons, which the store
        classifies against its seen filters and adds to the matching sketches."""
        ...

    async def top(
        self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int], k: int
    ) -> list[TopValue]:
        """The ``k`` largest values of a top KPI over these buckets and sources."""
        ...

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

    def __init__(
        self,
        retention_buckets: int,
        history_buckets: Mapping[str, int] | None = None,
        bucket_seconds: float = 60.0,
    ) -> None:
        # imported here, at start: datasketch pulls numpy and scipy (about a second), which
        # must not land on the first request
        from datasketch import HyperLogLog

        # the members are already keyed BLAKE2b digests (_person_digest): their first four
        # bytes are the sketch's hash, not a SHA-1 of them again
        self._sketch = functools.partial(HyperLogLog, hashfunc=_digest_hash32)
        self.retention = retention_buckets
        # tenant -> how many buckets its history (source "*") is kept
        self.history = dict(history_buckets or {})
        self._cells: dict[tuple[str, int], dict[tuple[str, str], Cell]] = {}
        self._sketches: dict[tuple[str, int, str, str], Any] = {}
        self._tops: dict[tuple[str, int], dict[tuple[str, str], dict[str, float]]] = {}
        self._newest = 0
        self.bucket_seconds = bucket_seconds
        self.seen = MemorySeenFilter()

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
        tops: Tops | None = None,
        persons: Persons | None = None,
    ) -> None:
        if bucket > self._newest:
            self._newest = bucket
            self._prune(bucket - self.retention)
        fold_cells(self._cells.setdefault((tenant, bucket), {}), cells)
        if tops:
            fold_tops(self._tops.setdefault((tenant, bucket), {}), tops)
        if persons:
            everyone = set().union(*(d for _, d in persons.values()))
            returning = self.seen.classify(tenant, day_of(bucket, self.bucket_seconds), everyone)
            members = {**members, **split_persons(persons, returning)}
        for (kpi, source), values in members.items():
            sketch = self._sketches.get((tenant, bucket, kpi, source))
            if sketch is None:
                sketch = self._sketches[(tenant, bucket, kpi, source)] = self._sketch(p=12)
            for v in values:
                sketch.update(v)

    def _prune(self, oldest: int) -> None:
        newest = oldest + self.retention

        def expired(tenant: str, bucket: int, source: str) -> bool:
            if is_history(source):
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
        for tkey in [k for k in self._tops if k[1] < oldest]:
            del self._tops[tkey]

    async def top(
        self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int], k: int
    ) -> list[TopValue]:
        totals: dict[str, float] = {}
        for b in buckets:
            held = self._tops.get((tenant, b), {})
            for s in sources:
                for value, amount in held.get((kpi, s), {}).items():
                    totals[value] = totals.get(value, 0.0) + amount
        return largest(totals, k)

    async def cells(
        self, tenant: str, buckets: Sequence[int], source: str = ""
    ) -> dict[int, dict[tuple[str, str], Cell]]:
        history = is_history(source)
        return {
            b: {k: c for k, c in self._cells.get((tenant, b), {}).items() if is_history(k[1]) == history}
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
        # Multi-key commands (BITOP over a tenant's days, PFCOUNT and ZUNION over a KPI's
        # buckets and sources) take one slot on a cluster: the tenant, or tenant and KPI, is
        # the hash tag there; on one server the names are unchanged.
        self.cluster = is_cluster(redis)
        self.ttl = max(1, int(retention_buckets * bucket_seconds) + 60)
        # tenant -> TTL of its history keys (source "*")
        self.history_ttl = {
            t: max(self.ttl, int(n * bucket_seconds) + 60) for t, n in (history_buckets or {}).items()
        }
        self.bucket_seconds = bucket_seconds
        self._before_built: set[tuple[str, int]] = set()

    def _seen(self, tenant: str, day: int) -> str:
        return f"{self.prefix}:seen:{hash_tag(self.cluster, tenant)}:{day}"

    async def _classify(self, tenant: str, day: int, digests: set[bytes]) -> dict[bytes, bool]:
        """One round trip (two on a day's first call): which persons the days before saw,
        and today's filter marks them all."""
        before = f"{self.prefix}:seen-before:{hash_tag(self.cluster, tenant)}:{day}"
        if (tenant, day) not in self._before_built:
            days = [self._seen(tenant, d) for d in range(day - RETURNING_LOOKBACK_DAYS, day)]
            if self.cluster:  # a cluster pipeline refuses BITOP (its keys share a slot here)
                await self.redis.delete(before)
                await self.redis.bitop("OR", before, *days)
                await self.redis.expire(before, 2 * DAY_SECONDS)
            else:
                pipe = self.redis.pipeline(transaction=False)
                pipe.delete(before)
                pipe.bitop("OR", before, *days)  # missing days count as empty
                pipe.expire(before, 2 * DAY_SECONDS)
                await pipe.execute()
            self._before_built.add((tenant, day))
        ordered = list(digests)
        positions = [seen_positions(d) for d in ordered]
        read = self.redis.bitfield(before)
        write = self.redis.bitfield(self._seen(tenant, day))
        for ps in positions:
            for p in ps:
                read.get("u1", p)
                write.set("u1", p, 1)
        pipe = self.redis.pipeline(transaction=False)
        pipe.execute_command(*read.command)
        pipe.execute_command(*write.command)
        pipe.expire(self._seen(tenant, day), (RETURNING_LOOKBACK_DAYS + 2) * DAY_SECONDS)
        bits, _, _ = await pipe.execute()
        out = {}
        for i, digest in enumerate(ordered):
            out[digest] = all(bits[i * SEEN_FILTER_HASHES : (i + 1) * SEEN_FILTER_HASHES])
        return out

    def _hash(self, tenant: str, bucket: int, source: str = "") -> str:
        # the history (every source summed) in a hash of its own, so it expires on its own
        where = "history:" if is_history(source) else ""
        return f"{self.prefix}:{where}{tenant}:{bucket}"

    def _top(self, tenant: str, bucket: int, kpi: str, source: str) -> str:
        return f"{self.prefix}:top:{hash_tag(self.cluster, f'{tenant}:{kpi}')}:{source}:{bucket}"

    def _ttl(self, tenant: str, source: str) -> int:
        return self.history_ttl.get(tenant, self.ttl) if is_history(source) else self.ttl

    def _hll(self, tenant: str, bucket: int, kpi: str, source: str) -> str:
        return f"{self.prefix}:hll:{hash_tag(self.cluster, f'{tenant}:{kpi}')}:{source}:{bucket}"

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
        tops: Tops | None = None,
        persons: Persons | None = None,
    ) -> None:
        if persons:
            everyone = set().union(*(d for _, d in persons.values()))
            returning = await self._classify(tenant, day_of(bucket, self.bucket_seconds), everyone)
            members = {**members, **split_persons(persons, returning)}
        pipe = self.redis.pipeline(transaction=False)
        for (kpi, source), ranked in (tops or {}).items():
            zkey = self._top(tenant, bucket, kpi, source)
            for value, amount in ranked.items():
                pipe.zincrby(zkey, amount, value)
            pipe.zremrangebyrank(zkey, 0, -TOP_KEPT_PER_BUCKET - 1)  # keep the largest
            pipe.expire(zkey, self.ttl)
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

    async def top(
        self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int], k: int
    ) -> list[TopValue]:
        keys = [self._top(tenant, b, kpi, s) for b in buckets for s in sources]
        if not keys:
            return []
        union = await self.redis.zunion(keys, withscores=True)
        return largest({(v.decode() if isinstance(v, bytes) else v): float(a) for v, a in union}, k)


class BufferedKpiStore:
    """Write-behind in front of the shared store: a batch's increments merge in memory and
    go out every ``flush`` (one pipeline per tenant and bucket), so a single-event request
    does not pay a Redis round trip for its KPIs. Reads see the shared figures, at most one
    flush period behind; a flush that fails is merged back and retried."""

    def __init__(self, inner: KpiStore) -> None:
        self.inner = inner
        self._cells: dict[tuple[str, int], dict[tuple[str, str], Cell]] = {}
        self._members: dict[tuple[str, int], dict[tuple[str, str], set[bytes]]] = {}
        self._tops: dict[tuple[str, int], dict[tuple[str, str], dict[str, float]]] = {}
        self._persons: dict[tuple[str, int], dict[tuple[str, str], tuple[bool, set[bytes]]]] = {}

    async def add(
        self,
        tenant: str,
        bucket: int,
        cells: Mapping[tuple[str, str], Cell],
        members: Mapping[tuple[str, str], set[bytes]],
        tops: Tops | None = None,
        persons: Persons | None = None,
    ) -> None:
        if persons:  # classified at flush: no round trip on the request's path
            fold_persons(self._persons.setdefault((tenant, bucket), {}), persons)
        fold_cells(self._cells.setdefault((tenant, bucket), {}), cells)
        if members:
            sets = self._members.setdefault((tenant, bucket), {})
            for key, values in members.items():
                sets.setdefault(key, set()).update(values)
        if tops:
            fold_tops(self._tops.setdefault((tenant, bucket), {}), tops)

    async def flush(self) -> None:
        cells, self._cells = self._cells, {}
        members, self._members = self._members, {}
        tops, self._tops = self._tops, {}
        persons, self._persons = self._persons, {}
        for (tenant, bucket), held in cells.items():
            sets = members.get((tenant, bucket), {})
            ranked = tops.get((tenant, bucket), {})
            who = persons.get((tenant, bucket), {})
            try:
                await self.inner.add(tenant, bucket, held, sets, ranked, who)
            except Exception:
                await self.add(tenant, bucket, held, sets, ranked, who)  # next time
                raise

    async def top(
        self, tenant: str, kpi: str, sources: Sequence[str], buckets: Sequence[int], k: int
    ) -> list[TopValue]:
        return await self.inner.top(tenant, kpi, sources, buckets, k)

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
    by_event: dict[str, list[_Compiled]]  # "*": the KPIs of every event
    # source id -> platform
    sources: dict[str, str]
    # the KPIs kept (summed over sources) for day / week comparisons, and for how many buckets
    history: frozenset[str] = frozenset()
    history_buckets: int = 0
    # source id -> the KPIs kept for that source alone (rules watching one source)
    source_history: dict[str, frozenset[str]] = field(default_factory=dict)


class TopValue(msgspec.Struct, rename="camel"):
    """One ranked value of a top KPI (a SKU, product id ...) and its amount."""

    name: str
    amount: float


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
    # a top KPI's largest values (totals only)
    top: list[TopValue] | None = None
    # a distinct-person KPI: how many of the counted events were keyed by a device or account
    # alone (no identity_linking consent: the same person counts once per device); the rest
    # by a linked person. None for the other kinds.
    by_device: int | None = None
    # the same KPI over N buckets just before the window, for the rules that compare with
    # such a baseline (N -> value; only the lengths a rule asks for)
    baselines: dict[int, float | None] | None = None

    def compared(self, compare: str, baseline: int = 0) -> float | None:
        """The value a rule compares with: ``previous``, ``day_ago`` or ``week_ago``; with
        ``baseline`` (``previous`` only), the ``baseline`` buckets before the window."""
        if baseline:
            return (self.baselines or {}).get(baseline)
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


def _digest_hash32(digest: bytes) -> int:
    return int.from_bytes(digest[:4], "little")


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
        source_history: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
    ) -> None:
        """``history``: tenant -> (the KPIs to keep for day / week comparisons, ratios
        standing for their parts; how many buckets); ``source_history``: tenant -> source
        -> the KPIs to keep for one source's comparisons (as long as the tenant's history)."""
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
            by_source = (source_history or {}).get(tenant, {})
            self.tenants[tenant] = _TenantKpis(
                tuple(defs),
                by_event,
                dict(platforms.get(tenant, {})),
                history_parts(defs, kept),
                kept_buckets,
                {src: history_parts(defs, ids) for src, ids in by_source.items() if ids},
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
        every = by_event.get("*")
        history = state.history
        # this source's own history (rules watching it a day or a week back), if any
        own = state.source_history.get(source)
        kept_as = source_history(source)
        cells: dict[tuple[str, str], Cell] = {}
        members: dict[tuple[str, str], set[bytes]] = {}
        tops: dict[tuple[str, str], dict[str, float]] = {}
        persons: dict[tuple[str, str], tuple[bool, set[bytes]]] = {}
        for ev in events:
            matching = by_event.get(ev.name)
            if every:
                matching = matching + every if matching and ev.name != "*" else every
            if not matching:
                continue
            purposes: frozenset[str] | None = None
            who: bytes | None = None  # the person's digest, made once per event
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
                digest = None
                if k.kind == "top":
                    amount = _rank(k, ev.properties, tops.setdefault(key, {}))
                elif k.kind == "sum":
                    amount = _amount(ev.properties, k.fields)
                elif k.kind == "count":
                    amount = 0.0
                else:  # distinct persons: the amount counts the events keyed by a device alone
                    amount = 0.0 if ev.linked or not ev.person else 1.0
                    if ev.person and k.kind == "distinct":
                        digest = who = who or _person_digest(ev.person)
                        members.setdefault(key, set()).add(digest)
                    elif ev.person:
                        wanted = k.kind == "returning_persons"
                        who = who or _person_digest(ev.person)
                        persons.setdefault(key, (wanted, set()))[1].add(who)
                        if k.id in history:
                            persons.setdefault((k.id, ALL_SOURCES), (wanted, set()))[1].add(who)
                        if own and k.id in own:
                            persons.setdefault((k.id, kept_as), (wanted, set()))[1].add(who)
                cell[2] += amount
                if k.id in history:  # the totals kept for day / week comparisons
                    _keep(cells, members, (k.id, ALL_SOURCES), amount, digest)
                if own and k.id in own:  # this source's, for a rule watching it
                    _keep(cells, members, (k.id, kept_as), amount, digest)
        if cells:
            await self.store.add(tenant, self.bucket(), cells, members, tops, persons)

    async def report(
        self,
        tenant: str,
        windows: Sequence[int] = WINDOWS,
        baselines: Mapping[str, Collection[tuple[int, int]]] | None = None,
    ) -> list[KpiReport]:
        """Every KPI of the tenant over each sliding window ending in the current bucket,
        with the window before it (for relative-change alerts); ``baselines``: KPI id ->
        (window, N) pairs whose window also gets the value over the N buckets before it."""
        state = self.tenants.get(tenant)
        if state is None:
            return []
        now = self.bucket()
        longest = max(windows)
        reach = max([2 * longest] + [w + n for pairs in (baselines or {}).values() for w, n in pairs])
        buckets = list(range(now - reach + 1, now + 1))
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
        if state.source_history:
            back.update(
                {
                    compare: self.offset_buckets(compare)
                    for compare in ("day_ago", "week_ago")
                    if self.offset_buckets(compare) + longest <= state.history_buckets
                }
            )
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
                lengths = sorted({n for window, n in (baselines or {}).get(k.id, ()) if window == w})
                for kind, name, members in groups:
                    cur = await self._value(tenant, k, defs, members, current, held, memo)
                    prev = await self._value(tenant, k, defs, members, before, held, memo)
                    cur.previous = prev.value
                    if lengths:
                        cur.baselines = {}
                        for n in lengths:
                            span = list(range(now - w - n + 1, now - w + 1))
                            base = await self._value(tenant, k, defs, members, span, held, memo)
                            cur.baselines[n] = base.value
                    values[(kind, name)] = cur
                if k.kind == "top":
                    values[("total", "")].top = await self.store.top(tenant, k.id, sources, current, k.top)
                parts = history_parts([k], (k.id,), defs)
                kept = [("total", "", ALL_SOURCES)] if state.history and parts <= state.history else []
                kept += [
                    ("source", s, source_history(s))
                    for s, ids in state.source_history.items()
                    if parts <= ids and ("source", s) in values
                ]
                for kind, name, kept_as in kept:
                    for compare, n in back.items():
                        then = [b - n for b in current]
                        held_then = history_held[compare]
                        value = await self._value(tenant, k, defs, [kept_as], then, held_then, memo)
                        setattr(values[(kind, name)], compare, value.value)
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
            return WindowValue(
                known.value, known.matched, known.counted, known.coverage, by_device=known.by_device
            )
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
        by_device = None
        if k.kind == "count":
            value: float = counted
        elif k.kind in ("sum", "top"):
            value = round(total, 6)
        else:  # distinct, new / returning persons
            value = await self.store.distinct(tenant, k.id, sources, buckets) if counted else 0
            by_device = round(total)
        coverage = counted / matched if matched else None
        found = WindowValue(value, matched, counted, coverage, by_device=by_device)
        memo[memo_key] = found
        return WindowValue(value, matched, counted, coverage, by_device=by_device)


def _keep(
    cells: dict[tuple[str, str], Cell],
    members: dict[tuple[str, str], set[bytes]],
    key: tuple[str, str],
    amount: float,
    digest: bytes | None,
) -> None:
    """One counted event into a history cell (no matched count: the history keeps none)."""
    cell = cells.get(key)
    if cell is None:
        cell = cells[key] = [0, 0, 0.0]
    cell[1] += 1
    cell[2] += amount
    if digest is not None:
        members.setdefault(key, set()).add(digest)


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


def _rank_name(line: Mapping[str, Any], group_by: Sequence[str]) -> str | None:
    """What a top KPI ranks for one line: a short value that is not personal data."""
    for key in group_by:
        v = line.get(key)
        if isinstance(v, bool) or not isinstance(v, str | int):
            continue
        name = str(v).strip()
        # product ids are not personal data, but a client can put anything there: a value
        # that looks like an identifier (or holds a phone, an e-mail ...), or that the
        # pipeline's scrubber already redacted, is not kept
        if not name or len(name) > TOP_MAX_VALUE_CHARS or "[redacted:" in name or looks_like_identifier(name):
            return None
        return name
    return None


def _rank(k: KpiDefinition, props: Mapping[str, Any], into: dict[str, float]) -> float:
    """Add one event's lines to a top KPI's ranking; the event's amount (every line's)."""
    lines: Sequence[Any] = [props]
    if k.items:
        found = props.get(k.items)
        lines = found if isinstance(found, list) else []
    total = 0.0
    for line in lines[:TOP_KEPT_PER_BUCKET]:
        if not isinstance(line, Mapping):
            continue
        amount = _amount(line, k.fields) if k.fields else 1.0
        if k.quantity_field:
            quantity = _amount(line, (k.quantity_field,))
            amount *= quantity if quantity else 1.0
        total += amount
        name = _rank_name(line, k.group_by)
        if name is not None:
            into[name] = into.get(name, 0.0) + amount
    return total


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
