"""The current consent state: a projection of the ledger, for fast decisions.

The ledger (consent.ledger) is the truth; this module keeps, per tenant and identifier
pseudonym, the latest record of each purpose, plus the published notices, and answers the
pipeline's lookups. A projection watermark (the last ledger seq applied) lets any process
catch up from the ledger after a crash, and ``rebuild`` recomputes it from scratch.

Two stores, one interface:

- ``SqlConsentState``: tables in the consent database (SQLite embedded, or PostgreSQL).
  On SQLite, the only writer is this process, so lookups are served from an in-process
  cache that ``apply`` keeps current.
- ``RedisConsentState``: hashes in Redis shared by every replica; ``apply`` runs before a
  consent call is acknowledged, so a withdrawal is seen by every replica's next decision.
  Entries only move forward (a record never overwrites a later one), whatever order
  replicas apply them in.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec
import sqlalchemy as sa

from consent.decisions import MINOR_FLAG, StateEntry
from consent.models import ConsentStateRow, NoticeRow, ProjectionRow, advance_projection_mark, projection_mark
from consent.suppression import ERASED_FLAG, is_erased, suppression_entries
from identity.db import dialect_insert, sqlite_connect
from identity.identifiers import node_value
from identity.redis_client import is_cluster, slot_groups

ALL_PURPOSES = "*"
# the SQL projection's watermark: its consent_projection row
_WATERMARK = "consent_state"


class RecordView(msgspec.Struct, frozen=True):
    """What the projection needs of a ledger record."""

    seq: int
    tenant: str
    record_type: str
    identifiers: tuple[str, ...]
    purposes: tuple[str, ...]
    state: str
    consent_kind: str = "general"
    notice_id: str | None = None
    notice_hash: str | None = None
    at: datetime | None = None
    detail: dict[str, Any] = {}


class Notice(msgspec.Struct, frozen=True):
    notice_id: str
    content_hash: str
    seq: int
    material: bool
    purposes: tuple[str, ...]


class UnknownNotice(Exception):
    def __init__(self, notice_id: str) -> None:
        super().__init__(f"unknown notice {notice_id!r}")
        self.notice_id = notice_id


def notice_floor(notices: Iterable[Notice], purposes: Iterable[str]) -> dict[str, int]:
    """Per purpose, the seq of the last material notice that changed it."""
    floor: dict[str, int] = {}
    all_purposes = list(purposes)
    for n in notices:
        if not n.material:
            continue
        for p in n.purposes or all_purposes:
            floor[p] = max(floor.get(p, 0), n.seq)
    return floor


class Snapshot(msgspec.Struct):
    """What one batch's decisions read: the subjects' state, the tenant's notices, and the
    restrictive epoch read *before* them (see ``restrictive_seq``)."""

    state: dict[str, dict[str, StateEntry]]
    notices: dict[str, Notice]
    epoch: int


class ConsentStateStore(Protocol):
    async def lookup(self, tenant: str, identifiers: Sequence[str]) -> dict[str, dict[str, StateEntry]]: ...
    async def snapshot(self, tenant: str, identifiers: Sequence[str]) -> Snapshot: ...
    async def notices(self, tenant: str) -> dict[str, Notice]: ...
    async def erased(self, tenant: str, identifiers: Sequence[str]) -> set[str]:
        """Which of ``identifiers`` are on the suppression list (consent.suppression)."""
        ...

    # True while the projection is being rebuilt after it lost records it had (a restored
    # or emptied Redis): decisions are refused meanwhile rather than made on partial state.
    rebuilding: bool
    # True when the projection lives in the ledger's own database (one backup, one restore):
    # what was applied there stays applied, so a reconcile need not apply it again.
    beside_ledger: bool

    async def apply(self, records: Sequence[RecordView], *, advance: bool = True) -> None:
        """Apply records (idempotent: a field only moves forward). ``advance`` also moves the
        watermark to their last seq: only for a run contiguous with it."""
        ...

    async def advance(self, seq: int) -> None:
        """Move the watermark forward to ``seq`` (every record up to it is applied)."""
        ...

    async def applied_seq(self) -> int: ...
    async def restrictive_seq(self) -> int: ...


def is_restrictive(r: RecordView) -> bool:
    """Records that can take away a basis an earlier decision relied on (grants never do)."""
    if r.record_type == "consent":
        return r.state != "given"
    if r.record_type == "subject_flag":
        return r.state == "flagged"
    return r.record_type == "notice" and bool(r.detail.get("material"))


# An epoch that is never reached: with it every queued event is checked again.
ALWAYS_RECHECK = 2**62


def _entries_from_record(r: RecordView, notices: Mapping[str, Notice]) -> list[tuple[str, str, StateEntry]]:
    """(identifier pseudonym, purpose, entry) for every state change a record makes."""
    erased = [
        (node_value(n), ERASED_FLAG, e)
        for n, e in suppression_entries(r.record_type, r.state, r.detail, r.identifiers, r.seq)
    ]
    if r.record_type == "consent":
        notice_seq = notices[r.notice_id].seq if r.notice_id and r.notice_id in notices else 0
        entry = StateEntry(r.state, r.seq, notice_seq, r.consent_kind)
        return [(node_value(i), p, entry) for i in r.identifiers for p in r.purposes] + erased
    if erased:
        return erased
    if r.record_type == "subject_flag":
        entry = StateEntry(r.state, r.seq)
        return [(node_value(i), MINOR_FLAG, entry) for i in r.identifiers]
    return []


def _notice_from_record(r: RecordView) -> Notice | None:
    if r.record_type != "notice" or not r.notice_id:
        return None
    return Notice(
        notice_id=r.notice_id,
        content_hash=r.notice_hash or "",
        seq=r.seq,
        material=bool(r.detail.get("material")),
        purposes=tuple(r.detail.get("purposes_changed") or ()),
    )


class SqlConsentState:
    """The projection in SQL tables; cached in process when this process is the only writer."""

    def __init__(self, engine: sa.Engine, *, cache_size: int = 200_000) -> None:
        self.engine = engine
        self.single_writer = engine.dialect.name == "sqlite"
        self._cache: OrderedDict[tuple[str, str], dict[str, StateEntry]] = OrderedDict()
        self._cache_size = cache_size
        self._notices: dict[str, dict[str, Notice]] = {}
        self._restrictive: int | None = None
        self.rebuilding = False
        self.beside_ledger = True
        self._sqlite_reader: sqlite3.Connection | None = None
        # True while every row of the projection is in the cache (None: not loaded yet)
        self._complete: bool | None = None
        if self.single_writer and engine.url.database and engine.url.database != ":memory:":
            self._sqlite_reader = sqlite_connect(engine.url.database, readonly=True, check_same_thread=False)

    # -- reads -----------------------------------------------------------------------
    def _query(self, tenant: str, identifiers: Sequence[str]) -> dict[str, dict[str, StateEntry]]:
        out: dict[str, dict[str, StateEntry]] = {i: {} for i in identifiers}
        if self._sqlite_reader is not None:
            # Cache misses on the hot path: plain sqlite3 costs ~20 us, a SQLAlchemy query ~500 us.
            marks = ",".join("?" * len(identifiers))
            rows = self._sqlite_reader.execute(
                "SELECT identifier, purpose, state, seq, notice_seq, kind FROM consent_state "  # noqa: S608
                f"WHERE tenant = ? AND identifier IN ({marks})",
                (tenant, *identifiers),
            )
            for ident, purpose, state, seq, notice_seq, kind in rows:
                out[ident][purpose] = StateEntry(state, seq, notice_seq, kind)
            return out
        t = ConsentStateRow.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(t.c.identifier, t.c.purpose, t.c.state, t.c.seq, t.c.notice_seq, t.c.kind).where(
                    t.c.tenant == tenant, t.c.identifier.in_(list(identifiers))
                )
            )
            for ident, purpose, state, seq, notice_seq, kind in found:
                out[ident][purpose] = StateEntry(state, seq, notice_seq, kind)
        return out

    async def lookup(self, tenant: str, identifiers: Sequence[str]) -> dict[str, dict[str, StateEntry]]:
        if not identifiers:
            return {}
        if not self.single_writer:
            return self._query(tenant, identifiers)
        if self._complete is None:
            self._load_all()
        found: dict[str, dict[str, StateEntry]] = {}
        missing = []
        for ident in identifiers:
            entries = self._cache.get((tenant, ident))
            if entries is None:
                missing.append(ident)
            else:
                found[ident] = entries
        if missing and self._complete:
            # the whole table is in memory: an identifier not there has no record
            for ident in missing:
                found[ident] = {}
        elif missing:
            for ident, entries in self._query(tenant, missing).items():
                self._remember(tenant, ident, entries)
                found[ident] = entries
        return found

    async def erased(self, tenant: str, identifiers: Sequence[str]) -> set[str]:
        """Which of ``identifiers`` are on the suppression list (consent.suppression)."""
        return {i for i, entries in (await self.lookup(tenant, identifiers)).items() if is_erased(entries)}

    def _remember(self, tenant: str, ident: str, entries: dict[str, StateEntry]) -> None:
        self._cache[(tenant, ident)] = entries
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
            self._complete = False

    def _load_all(self) -> None:
        """Embedded mode: hold the whole projection in memory when it fits, so an unknown
        identifier (a new visitor) costs no query."""
        self._complete = False
        if self._sqlite_reader is None:
            return
        (count,) = self._sqlite_reader.execute(
            "SELECT count(DISTINCT tenant || ':' || identifier) FROM consent_state"
        ).fetchone()
        if count > self._cache_size // 2:
            return
        rows = self._sqlite_reader.execute(
            "SELECT tenant, identifier, purpose, state, seq, notice_seq, kind FROM consent_state"
        )
        for tenant, ident, purpose, state, seq, notice_seq, kind in rows:
            self._cache.setdefault((tenant, ident), {})[purpose] = StateEntry(state, seq, notice_seq, kind)
        self._complete = True

    async def notices(self, tenant: str) -> dict[str, Notice]:
        cached = self._notices.get(tenant) if self.single_writer else None
        if cached is not None:
            return cached
        t = NoticeRow.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.tenant == tenant)).mappings()
            result = {
                r["notice_id"]: Notice(
                    r["notice_id"], r["content_hash"], r["seq"], r["material"], tuple(r["purposes"])
                )
                for r in rows
            }
        self._notices[tenant] = result
        return result

    async def restrictive_seq(self) -> int:
        """The last ledger seq that restricted consent. Another process may write to a shared
        database, so only a single writer can know it; after a restart it starts at the
        watermark, so events decided before the restart are checked again."""
        if not self.single_writer:
            return ALWAYS_RECHECK
        if self._restrictive is None:
            self._restrictive = await self.applied_seq()
        return self._restrictive

    async def snapshot(self, tenant: str, identifiers: Sequence[str]) -> Snapshot:
        epoch = await self.restrictive_seq()
        return Snapshot(await self.lookup(tenant, identifiers), await self.notices(tenant), epoch)

    async def applied_seq(self) -> int:
        with self.engine.connect() as conn:
            return projection_mark(conn, _WATERMARK) or 0

    # -- writes ----------------------------------------------------------------------
    async def advance(self, seq: int) -> None:
        with self.engine.begin() as conn:
            self.advance_in(conn, seq)

    async def apply(self, records: Sequence[RecordView], *, advance: bool = True) -> None:
        if not records:
            return
        with self.engine.connect() as plain, plain.execution_options(sqlite_begin="IMMEDIATE").begin():
            changes = self.write(plain, records)
            if advance:
                self.advance_in(plain, max(r.seq for r in records))
        self.written(changes)

    def write(self, conn: sa.Connection, records: Sequence[RecordView]) -> ProjectionChanges:
        """Write the records' state changes in ``conn``'s transaction (the ledger append's
        own, from ``consent.group_commit``); ``written`` then brings the in-process caches up
        to date, once the transaction has committed."""
        notice_t = NoticeRow.__table__  # type: ignore[attr-defined]
        insert = dialect_insert(self.engine)
        # notices as of each record, including ones published earlier in this same batch
        known: dict[str, dict[str, Notice]] = {}
        changed: list[tuple[str, str, str, StateEntry]] = []
        rows: list[tuple[str, str, str, str, int, int, str]] = []
        for r in sorted(records, key=lambda x: x.seq):
            if r.tenant not in known:
                known[r.tenant] = dict(self._notices_in(conn, r.tenant))
            notice = _notice_from_record(r)
            if notice is not None:
                stmt = insert(notice_t).values(
                    tenant=r.tenant,
                    notice_id=notice.notice_id,
                    content_hash=notice.content_hash,
                    seq=notice.seq,
                    material=notice.material,
                    purposes=list(notice.purposes),
                    at=r.at,
                )
                conn.execute(stmt.on_conflict_do_nothing())
                known[r.tenant].setdefault(notice.notice_id, notice)
                continue
            for ident, purpose, e in _entries_from_record(r, known[r.tenant]):
                changed.append((r.tenant, ident, purpose, e))
                rows.append((r.tenant, ident, purpose, e.state, e.seq, e.notice_seq, e.kind))
        if rows:
            # One driver-level executemany for the whole group: compiling an ORM upsert per
            # record cost more than the writes themselves.
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            conn.exec_driver_sql(_UPSERT_STATE.replace("?", mark), rows)
        restrictive = [r.seq for r in records if is_restrictive(r)]
        return ProjectionChanges(known, changed, max(restrictive, default=0))

    def advance_in(self, conn: sa.Connection, seq: int, *, expected: int | None = None) -> None:
        """Move the watermark to ``seq`` in ``conn``'s transaction; with ``expected``, only
        from exactly there (a group appended right after the records already applied)."""
        proj_t = ProjectionRow.__table__  # type: ignore[attr-defined]
        if expected is None:
            advance_projection_mark(conn, _WATERMARK, seq)
            return
        moved = conn.execute(
            sa.update(proj_t)
            .where(proj_t.c.name == _WATERMARK, proj_t.c.applied_seq == expected)
            .values(applied_seq=seq)
        ).rowcount
        if moved or expected != 0:
            return
        stmt = dialect_insert(self.engine)(proj_t).values(name=_WATERMARK, applied_seq=seq)
        conn.execute(stmt.on_conflict_do_nothing())

    def written(self, changes: ProjectionChanges) -> None:
        """After the commit of ``write``'s transaction: the caches take the changes."""
        for tenant, notices in changes.notices.items():
            self._notices[tenant] = notices
        # Write-through: cached subjects take the new entries (a later seq wins); the others
        # are read on their next lookup.
        for tenant, ident, purpose, entry in changes.entries:
            cached = self._cache.get((tenant, ident))
            if cached is None and self._complete:
                cached = {}
                self._remember(tenant, ident, cached)
            if cached is not None and (purpose not in cached or cached[purpose].seq < entry.seq):
                cached[purpose] = entry
        if changes.restrictive and self._restrictive is not None:
            self._restrictive = max(self._restrictive, changes.restrictive)

    def _notices_in(self, conn: sa.Connection, tenant: str) -> dict[str, Notice]:
        cached = self._notices.get(tenant) if self.single_writer else None
        if cached is not None:
            return cached
        t = NoticeRow.__table__  # type: ignore[attr-defined]
        rows = conn.execute(sa.select(t).where(t.c.tenant == tenant)).mappings()
        return {
            r["notice_id"]: Notice(
                r["notice_id"], r["content_hash"], r["seq"], r["material"], tuple(r["purposes"])
            )
            for r in rows
        }


class ProjectionChanges(msgspec.Struct):
    """What ``SqlConsentState.write`` wrote, for the caches once it is committed."""

    notices: dict[str, dict[str, Notice]]
    entries: list[tuple[str, str, str, StateEntry]]
    restrictive: int


# A field moves forward only (a record never overwrites a later one).
_UPSERT_STATE = (
    "INSERT INTO consent_state (tenant, identifier, purpose, state, seq, notice_seq, kind) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, identifier, purpose) DO UPDATE SET "
    "state = excluded.state, seq = excluded.seq, notice_seq = excluded.notice_seq, kind = excluded.kind "
    "WHERE consent_state.seq < excluded.seq"
)


# A field moves forward only: the stored entry keeps its seq as the second element.
_APPLY_LUA = """
for i = 1, #KEYS do
  local field = ARGV[3 * i - 2]
  local value = ARGV[3 * i - 1]
  local seq = tonumber(ARGV[3 * i])
  local old = redis.call('HGET', KEYS[i], field)
  local old_seq = old and tonumber(string.match(old, '^%[[^,]*,(%d+)')) or -1
  if seq > old_seq then redis.call('HSET', KEYS[i], field, value) end
end
return #KEYS
"""
# On a cluster the keys of one apply fall in many slots: calls per slot in flight at once.
_APPLY_CONCURRENCY = 64
# The watermark moves from exactly ARGV[1] to ARGV[2]: a group applied right after the
# records already applied (a group of another replica in between leaves it to the reconcile).
_ADVANCE_FROM_LUA = """
if tonumber(redis.call('GET', KEYS[1]) or '0') == tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_ADVANCE_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

# One field of each key, in order (nil where a key lacks it): HMGET across keys.
_FIELDS_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGET', KEYS[i], ARGV[1]) end
return out
"""


class RedisConsentState:
    """The projection in Redis, shared by every replica (used when REDIS_URL is set)."""

    def __init__(self, client: Any, *, prefix: str = "idgate") -> None:
        self.client = client
        self.prefix = prefix
        self._apply = client.register_script(_APPLY_LUA)
        # a cluster: one apply call per slot (each key's move forward stands on its own)
        self.cluster = is_cluster(client)
        self._advance = client.register_script(_ADVANCE_LUA)
        self._fields = client.register_script(_FIELDS_LUA)
        self._advance_from = client.register_script(_ADVANCE_FROM_LUA)
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(StateEntry).decode
        self._notice_decode = msgspec.json.Decoder(Notice).decode
        self.rebuilding = False
        # Redis can lose or go back on what it applied (restart, restored snapshot) while the
        # ledger does not: a reconcile applies every record after the watermark again.
        self.beside_ledger = False

    def _key(self, tenant: str, ident: str) -> str:
        return f"{self.prefix}:consent:{tenant}:{ident}"

    async def lookup(self, tenant: str, identifiers: Sequence[str]) -> dict[str, dict[str, StateEntry]]:
        if not identifiers:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for ident in identifiers:
                pipe.hgetall(self._key(tenant, ident))
            results = await pipe.execute()
        return {
            ident: {k.decode(): self._decode(v) for k, v in raw.items()}
            for ident, raw in zip(identifiers, results, strict=True)
        }

    async def erased(self, tenant: str, identifiers: Sequence[str]) -> set[str]:
        """Which of ``identifiers`` are on the suppression list: one round trip, one field each."""
        if not identifiers:
            return set()
        keys = [self._key(tenant, ident) for ident in identifiers]
        if self.cluster:  # the keys fall in many slots: one HGET each, pipelined per node
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hget(key, ERASED_FLAG)
                flags = await pipe.execute()
        else:  # one command, however many identifiers (a batch names several hundred)
            flags = await self._fields(keys=keys, args=[ERASED_FLAG])
        return {
            i
            for i, raw in zip(identifiers, flags, strict=True)
            if raw is not None and self._decode(raw).state == "flagged"
        }

    async def notices(self, tenant: str) -> dict[str, Notice]:
        raw = await self.client.hgetall(f"{self.prefix}:notices:{tenant}")
        return {k.decode(): self._notice_decode(v) for k, v in raw.items()}

    async def applied_seq(self) -> int:
        return int(await self.client.get(f"{self.prefix}:consent:applied") or 0)

    async def restrictive_seq(self) -> int:
        return int(await self.client.get(f"{self.prefix}:consent:restrictive") or 0)

    async def snapshot(self, tenant: str, identifiers: Sequence[str]) -> Snapshot:
        """One round trip: the epoch first, then notices and state (apply writes the state
        before it advances the epoch, so a change seen here with an older epoch is simply
        checked again at delivery)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(f"{self.prefix}:consent:restrictive")
            pipe.hgetall(f"{self.prefix}:notices:{tenant}")
            for ident in identifiers:
                pipe.hgetall(self._key(tenant, ident))
            epoch, notices, *states = await pipe.execute()
        return Snapshot(
            state={
                ident: {k.decode(): self._decode(v) for k, v in raw.items()}
                for ident, raw in zip(identifiers, states, strict=True)
            },
            notices={k.decode(): self._notice_decode(v) for k, v in notices.items()},
            epoch=int(epoch or 0),
        )

    async def advance(self, seq: int) -> None:
        await self._advance(keys=[f"{self.prefix}:consent:applied"], args=[seq])

    async def _apply_some(self, keys: list[str], args: list[Any], which: list[int]) -> None:
        """The apply script over the keys at ``which`` (one slot) and their three args each."""
        some = [a for i in which for a in args[3 * i : 3 * i + 3]]
        await self._apply(keys=[keys[i] for i in which], args=some)

    async def advance_from(self, expected: int, seq: int) -> bool:
        """Move the watermark to ``seq`` only if it is at ``expected`` (records
        ``expected + 1 .. seq`` were just applied); True when it moved."""
        return bool(await self._advance_from(keys=[f"{self.prefix}:consent:applied"], args=[expected, seq]))

    async def apply(self, records: Sequence[RecordView], *, advance: bool = True) -> None:
        if not records:
            return
        keys: list[str] = []
        args: list[Any] = []
        # one read of a tenant's notices per apply (a group of consent calls), kept current
        # with the notices published in the same group
        known: dict[str, dict[str, Notice]] = {}
        for r in sorted(records, key=lambda x: x.seq):
            notice = _notice_from_record(r)
            if notice is not None:
                await self.client.hset(
                    f"{self.prefix}:notices:{r.tenant}", notice.notice_id, self._encode(notice)
                )
                known.pop(r.tenant, None)
                continue
            notices: dict[str, Notice] = {}
            if r.record_type == "consent":
                if r.tenant not in known:
                    known[r.tenant] = await self.notices(r.tenant)
                notices = known[r.tenant]
            for ident, purpose, e in _entries_from_record(r, notices):
                keys.append(self._key(r.tenant, ident))
                args += [purpose, self._encode(e), e.seq]
        groups = slot_groups(self.cluster, keys)
        for lo in range(0, len(groups), _APPLY_CONCURRENCY):
            chunk = groups[lo : lo + _APPLY_CONCURRENCY]
            await asyncio.gather(*(self._apply_some(keys, args, g) for g in chunk))
        restrictive = [r.seq for r in records if is_restrictive(r)]
        if restrictive:
            await self._advance(keys=[f"{self.prefix}:consent:restrictive"], args=[max(restrictive)])
        if advance:
            await self.advance(max(r.seq for r in records))
