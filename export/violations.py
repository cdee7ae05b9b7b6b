"""The violation store: events a tenant's tracking plan kept from delivery (``block``) or
delivered without some of their properties (``omit``), so that nothing is lost and each
kept one can be replayed once the plan or the client is fixed.

A record holds the event as it would have been stored in the outbox (identifiers
pseudonymised, properties and context scrubbed: never raw), the pseudonymised identifiers
the pipeline found in it, and what the plan said (rule, property path, detail; never a
value). One record per (tenant, source, message id): a client's retry of the same bad event
replaces its record instead of adding one, and a replay that gets the event through
deletes it.

Two implementations of one protocol (``ViolationStore``): SQLite under the data dir
(``violations.sqlite3``, embedded: one file per gateway, which also holds the coverage
counts) and Redis (``RedisViolations``, distributed: one store every replica shares, so a
record kept on one replica is listed, replayed and deleted from any). Methods are
synchronous (the pipeline calls them from a thread).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec

from identity.db import row_id
from identity.identifiers import Identifier
from identity.redis_client import hash_tag, is_cluster


class PlanFinding(msgspec.Struct, frozen=True, omit_defaults=True):
    """One rule an event broke (gateway.plan.Violation as stored)."""

    rule: str
    path: str
    detail: str


class ViolationRecord(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    source: str
    message_id: str
    event: str  # the plan event id, or "unplanned"
    plan_version: int
    received_at_ms: int
    findings: tuple[PlanFinding, ...]
    payload: bytes  # the event (gateway.events.Event) as JSON, pseudonymised and scrubbed
    identifiers: tuple[Identifier, ...] = ()
    unproven: tuple[Identifier, ...] = ()
    pseudonyms: tuple[str, ...] = ()
    server: bool = False  # sent by a server source (it proves its identifiers)
    id: str = ""
    kept_at_ms: int = 0
    # "kept": not delivered (replayable); "omitted": delivered without the properties the
    # findings name (the record holds them)
    action: str = "kept"

    def names_any(self, wanted: AbstractSet[str]) -> bool:
        """Whether the record holds one of the ``wanted`` pseudonyms (an identifier it names,
        proven or not, or any pseudonym written into its event); a scan builds the set once."""
        return not wanted.isdisjoint(self.pseudonyms) or any(
            i.value in wanted for i in (*self.identifiers, *self.unproven)
        )

    def summary(self) -> dict[str, Any]:
        """What a listing shows: no payload."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "source": self.source,
            "messageId": self.message_id,
            "event": self.event,
            "planVersion": self.plan_version,
            "receivedAtMs": self.received_at_ms,
            "keptAtMs": self.kept_at_ms,
            "action": self.action,
            "violations": [msgspec.structs.asdict(f) for f in self.findings],
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS plan_violation (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    event TEXT NOT NULL,
    plan_version INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    kept_at_ms INTEGER NOT NULL,
    findings BLOB NOT NULL,
    payload BLOB NOT NULL,
    envelope BLOB NOT NULL,
    action TEXT NOT NULL DEFAULT 'kept',
    UNIQUE (tenant, source, message_id)
);
CREATE INDEX IF NOT EXISTS plan_violation_tenant ON plan_violation (tenant, id);
CREATE TABLE IF NOT EXISTS plan_seen (
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    name TEXT NOT NULL,
    seen INTEGER NOT NULL,
    valid INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, source, event, name)
) WITHOUT ROWID;
"""


class SeenCount(msgspec.Struct, frozen=True):
    """How often a source sent a plan event (``name``: "") or an unplanned name
    (``event``: "unplanned"), and how many of them fit the plan."""

    tenant: str
    source: str
    event: str
    name: str
    seen: int
    valid: int
    last_seen_ms: int


class _Envelope(msgspec.Struct, frozen=True):
    identifiers: tuple[Identifier, ...] = ()
    unproven: tuple[Identifier, ...] = ()
    pseudonyms: tuple[str, ...] = ()
    server: bool = False


_encode = msgspec.json.Encoder().encode
_decode_findings = msgspec.json.Decoder(tuple[PlanFinding, ...]).decode
_decode_envelope = msgspec.json.Decoder(_Envelope).decode


class ViolationStore(Protocol):
    """Where the tracking plan's violation records are kept (see the module docstring)."""

    # whether every replica reads and writes this one store: then a deletion carried out on
    # one replica removes the records for all of them, and none follows it for its own
    shared: bool

    def close(self) -> None: ...

    def keep(self, records: Sequence[ViolationRecord]) -> Sequence[ViolationRecord]:
        """Store (or, for a message id already kept, replace) records; answers those it could
        not keep (a store at its bound), which the caller must not lose silently."""
        ...

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        event: str | None = None,
        action: str | None = None,
    ) -> list[ViolationRecord]: ...

    def get(self, record_id: str) -> ViolationRecord | None: ...

    def delete(self, record_ids: Sequence[str]) -> int:
        """Delete records by id; how many went (a record deleted twice counts once)."""
        ...

    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[ViolationRecord]: ...

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int: ...

    def expire(self, tenant: str, before_ms: int, *, apply: bool) -> int: ...

    def counts(self, tenant: str | None = None) -> dict[str, int]: ...


class SqliteViolations:
    """The ``plan_violation`` table in ``violations.sqlite3``."""

    shared = False

    _COLUMNS = (
        "id, tenant, source, message_id, event, plan_version, received_at_ms, kept_at_ms, findings, payload,"
        " envelope, action"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(plan_violation)")}
        if "action" not in columns:  # a store from before omit
            self._conn.execute("ALTER TABLE plan_violation ADD COLUMN action TEXT NOT NULL DEFAULT 'kept'")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def keep(self, records: Sequence[ViolationRecord]) -> Sequence[ViolationRecord]:
        """Store (or, for a message id already kept, replace) records in one transaction;
        the file has no bound of its own: every record is kept."""
        now = int(time.time() * 1000)
        rows = [
            (
                r.tenant,
                r.source,
                r.message_id,
                r.event,
                r.plan_version,
                r.received_at_ms,
                now,
                _encode(r.findings),
                r.payload,
                _encode(_Envelope(r.identifiers, r.unproven, r.pseudonyms, r.server)),
                r.action,
            )
            for r in records
        ]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO plan_violation (tenant, source, message_id, event, plan_version,"
                    " received_at_ms, kept_at_ms, findings, payload, envelope, action)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (tenant, source, message_id) DO UPDATE SET event = excluded.event,"
                    " plan_version = excluded.plan_version, kept_at_ms = excluded.kept_at_ms,"
                    " findings = excluded.findings, payload = excluded.payload, envelope = excluded.envelope,"
                    " action = excluded.action",
                    rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return ()

    @staticmethod
    def _row(row: tuple[Any, ...]) -> ViolationRecord:
        i, tenant, source, mid, event, version, received, kept, findings, payload, envelope, action = row
        env = _decode_envelope(envelope)
        return ViolationRecord(
            id=str(i),
            tenant=tenant,
            source=source,
            message_id=mid,
            event=event,
            plan_version=version,
            received_at_ms=received,
            kept_at_ms=kept,
            findings=_decode_findings(findings),
            payload=bytes(payload),
            identifiers=env.identifiers,
            unproven=env.unproven,
            pseudonyms=env.pseudonyms,
            server=env.server,
            action=action,
        )

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        event: str | None = None,
        action: str | None = None,
    ) -> list[ViolationRecord]:
        where: list[str] = []
        args: list[Any] = []
        if action is not None:
            where.append("action = ?")
            args.append(action)
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if event is not None:
            where.append("event = ?")
            args.append(event)
        sql = f"SELECT {self._COLUMNS} FROM plan_violation"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def get(self, record_id: str) -> ViolationRecord | None:
        rowid = row_id(record_id)
        if rowid is None:
            return None
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM plan_violation WHERE id = ?", (rowid,)
            ).fetchone()
        return self._row(row) if row else None

    def delete(self, record_ids: Sequence[str]) -> int:
        ids = [(rowid,) for rowid in map(row_id, record_ids) if rowid is not None]
        with self._lock:
            before = self._conn.total_changes
            self._conn.executemany("DELETE FROM plan_violation WHERE id = ?", ids)
            return self._conn.total_changes - before

    # -- a person's records (rights requests) and retention ---------------------------
    def _scan(self, tenant: str) -> Sequence[ViolationRecord]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM plan_violation WHERE tenant = ? ORDER BY id", (tenant,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[ViolationRecord]:
        """The records of a person (an access request): those naming one of ``pseudonyms``."""
        wanted = set(pseudonyms)
        return [r for r in self._scan(tenant) if r.names_any(wanted)][:limit]

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int:
        """Delete the records of a person (a deletion request); how many went."""
        wanted = set(pseudonyms)
        ids = [r.id for r in self._scan(tenant) if r.names_any(wanted)]
        return self.delete(ids)

    def expire(self, tenant: str, before_ms: int, *, apply: bool) -> int:
        """Records of ``tenant`` received before ``before_ms``: counted, deleted with ``apply``."""
        where = "FROM plan_violation WHERE tenant = ? AND received_at_ms < ?"
        with self._lock:
            if not apply:
                return int(self._conn.execute(f"SELECT count(*) {where}", (tenant, before_ms)).fetchone()[0])
            return self._conn.execute(f"DELETE {where}", (tenant, before_ms)).rowcount

    def add_seen(self, counts: Sequence[SeenCount]) -> None:
        """Add to the coverage counts (``plan_seen``) in one transaction."""
        rows = [(c.tenant, c.source, c.event, c.name, c.seen, c.valid, c.last_seen_ms) for c in counts]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO plan_seen (tenant, source, event, name, seen, valid, last_seen_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, source, event, name) DO UPDATE"
                    " SET seen = seen + excluded.seen, valid = valid + excluded.valid,"
                    " last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
                    rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def seen(self, tenant: str | None = None) -> tuple[SeenCount, ...]:
        """The coverage counts, per source, plan event and unplanned name."""
        sql = "SELECT tenant, source, event, name, seen, valid, last_seen_ms FROM plan_seen"
        args: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            args = (tenant,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY tenant, event, name, source", args).fetchall()
        return tuple(SeenCount(*row) for row in rows)

    def counts(self, tenant: str | None = None) -> dict[str, int]:
        """Records kept per plan event (or "unplanned")."""
        sql = "SELECT event, count(*) FROM plan_violation"
        args: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            args = (tenant,)
        with self._lock:
            return {e: n for e, n in self._conn.execute(sql + " GROUP BY event", args).fetchall()}


# -- distributed mode: one store in Redis ------------------------------------------------------

# The records one tenant may have in Redis: past it a new record is refused (``keep`` answers
# it; the pipeline rejects a blocked event to its client), a record already kept may still be
# replaced. Retention and replays make room. Memory, measured: 1.8 KB a record for a 650-byte
# event (the record 1.2 KB, its index entries 0.45 KB), so some 180 MB per tenant at the
# bound; events at the 32 KB limit would take about 3.3 GB.
MAX_RECORDS: Final = 100_000

# KEYS: records (hash id -> record), ids (hash source<US>message id -> id), order (zset id by
# id), received (zset id by received_at_ms), counts (hash event -> records), meta (hash
# id -> event<US>source<US>message id), seq (the tenant's last id). All of one tenant: one
# cluster slot (``hash_tag``). ARGV: the bound, then per record: source<US>message id, event,
# received_at_ms, record. Answers the indexes (1-based, per record) it refused.
_KEEP = """
local cap = tonumber(ARGV[1])
local refused = {}
local n = 0
for i = 2, #ARGV, 4 do
  n = n + 1
  local mk, ev, recv, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local id = redis.call('HGET', KEYS[2], mk)
  local ok = true
  if id then
    local meta = redis.call('HGET', KEYS[6], id)
    local old = string.sub(meta, 1, string.find(meta, '\\31', 1, true) - 1)
    if redis.call('HINCRBY', KEYS[5], old, -1) <= 0 then redis.call('HDEL', KEYS[5], old) end
  elseif redis.call('HLEN', KEYS[1]) >= cap then
    ok = false
    table.insert(refused, n)
  else
    id = tostring(redis.call('INCR', KEYS[7]))
    redis.call('HSET', KEYS[2], mk, id)
    redis.call('ZADD', KEYS[3], id, id)
  end
  if ok then
    redis.call('HSET', KEYS[1], id, blob)
    redis.call('HSET', KEYS[6], id, ev .. '\\31' .. mk)
    redis.call('ZADD', KEYS[4], recv, id)
    redis.call('HINCRBY', KEYS[5], ev, 1)
  end
end
return refused
"""

# KEYS as _KEEP's; ARGV: ids. Answers how many were there (so a record two replicas delete
# at once counts once).
_DELETE = """
local removed = 0
for i = 1, #ARGV do
  local id = ARGV[i]
  local meta = redis.call('HGET', KEYS[6], id)
  if meta then
    local cut = string.find(meta, '\\31', 1, true)
    local ev, mk = string.sub(meta, 1, cut - 1), string.sub(meta, cut + 1)
    if redis.call('HGET', KEYS[2], mk) == id then redis.call('HDEL', KEYS[2], mk) end
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[6], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    if redis.call('HINCRBY', KEYS[5], ev, -1) <= 0 then redis.call('HDEL', KEYS[5], ev) end
    removed = removed + 1
  end
end
return removed
"""

_US = "\x1f"
_PAGE = 500
_encode_stored = msgspec.msgpack.Encoder().encode
_decode_stored = msgspec.msgpack.Decoder(ViolationRecord).decode


class RedisViolations:
    """The violation records in Redis, shared by the replicas (distributed mode).

    Per tenant a few keys in one hash slot (see ``_KEEP``), written and deleted by scripts so
    a record, its message-id index, its orderings and the counts per event change together;
    a record's id is ``<tenant>.<n>`` (``n`` counts the tenant's records). The set
    ``<prefix>:plan:violation-tenants`` names the tenants with records. At most
    ``max_records`` per tenant (``MAX_RECORDS``). A synchronous client: the pipeline calls it
    from a thread, the CLI directly."""

    shared = True

    def __init__(self, client: Any, prefix: str, *, max_records: int = MAX_RECORDS) -> None:
        self.client = client
        self.prefix = prefix
        self.max_records = max_records
        self.cluster = is_cluster(client)
        self._keep = client.register_script(_KEEP)
        self._delete = client.register_script(_DELETE)

    def close(self) -> None:
        self.client.close()

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self.prefix}:plan:violations:{hash_tag(self.cluster, tenant)}"
        return [f"{base}:{part}" for part in ("records", "ids", "order", "received", "counts", "meta", "seq")]

    @property
    def _tenants_key(self) -> str:
        return f"{self.prefix}:plan:violation-tenants"

    def _tenants(self, tenant: str | None) -> list[str]:
        if tenant is not None:
            return [tenant]
        return sorted(t.decode() for t in self.client.smembers(self._tenants_key))

    @staticmethod
    def _split(record_id: str) -> tuple[str, str] | None:
        tenant, _, n = record_id.rpartition(".")
        return (tenant, n) if tenant and row_id(n) is not None else None

    def keep(self, records: Sequence[ViolationRecord]) -> Sequence[ViolationRecord]:
        now = int(time.time() * 1000)
        by_tenant: dict[str, list[ViolationRecord]] = {}
        for r in records:
            by_tenant.setdefault(r.tenant, []).append(r)
        refused: list[ViolationRecord] = []
        for tenant, rs in by_tenant.items():
            self.client.sadd(self._tenants_key, tenant)
            args: list[Any] = [self.max_records]
            for r in rs:
                stored = msgspec.structs.replace(r, id="", kept_at_ms=now)
                args += [f"{r.source}{_US}{r.message_id}", r.event, r.received_at_ms, _encode_stored(stored)]
            refused += [rs[int(i) - 1] for i in self._keep(keys=self._keys(tenant), args=args)]
        return refused

    def _records(self, tenant: str, ids: Sequence[bytes | str]) -> list[ViolationRecord]:
        if not ids:
            return []
        blobs = self.client.hmget(self._keys(tenant)[0], list(ids))
        return [
            msgspec.structs.replace(
                _decode_stored(blob), id=f"{tenant}.{i.decode() if isinstance(i, bytes) else i}"
            )
            for i, blob in zip(ids, blobs, strict=True)
            if blob is not None  # deleted between the two reads
        ]

    def _pages(self, tenant: str) -> Iterator[list[ViolationRecord]]:
        """The tenant's records in id order, a page at a time."""
        order, after = self._keys(tenant)[2], "-inf"
        while True:
            ids = self.client.zrangebyscore(order, after, "+inf", start=0, num=_PAGE)
            if not ids:
                return
            yield self._records(tenant, ids)
            after = f"({int(ids[-1])}"

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        event: str | None = None,
        action: str | None = None,
    ) -> list[ViolationRecord]:
        """In id order per tenant, tenants by name."""
        out: list[ViolationRecord] = []
        for t in self._tenants(tenant):
            for page in self._pages(t):
                out += [r for r in page if event in (None, r.event) and action in (None, r.action)]
                if len(out) >= limit:
                    return out[:limit]
        return out

    def get(self, record_id: str) -> ViolationRecord | None:
        found = self._split(record_id)
        if found is None:
            return None
        records = self._records(found[0], [found[1]])
        return records[0] if records else None

    def delete(self, record_ids: Sequence[str]) -> int:
        by_tenant: dict[str, list[str]] = {}
        for rid in record_ids:
            found = self._split(rid)
            if found is not None:
                by_tenant.setdefault(found[0], []).append(found[1])
        return sum(self._delete_ids(tenant, ids) for tenant, ids in by_tenant.items())

    def _delete_ids(self, tenant: str, ids: Sequence[bytes | str]) -> int:
        keys = self._keys(tenant)
        return sum(
            int(self._delete(keys=keys, args=list(ids[i : i + _PAGE]))) for i in range(0, len(ids), _PAGE)
        )

    # -- a person's records (rights requests) and retention ---------------------------
    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[ViolationRecord]:
        wanted = set(pseudonyms)
        found = [r for page in self._pages(tenant) for r in page if r.names_any(wanted)]
        return found[:limit]

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int:
        ids = [r.id.rpartition(".")[2] for r in self.find_person(tenant, pseudonyms, limit=self.max_records)]
        return self._delete_ids(tenant, ids)

    def expire(self, tenant: str, before_ms: int, *, apply: bool) -> int:
        received = self._keys(tenant)[3]
        if not apply:
            return int(self.client.zcount(received, "-inf", f"({before_ms}"))
        return self._delete_ids(tenant, self.client.zrangebyscore(received, "-inf", f"({before_ms}"))

    def counts(self, tenant: str | None = None) -> dict[str, int]:
        total: dict[str, int] = {}
        for t in self._tenants(tenant):
            for e, n in self.client.hgetall(self._keys(t)[4]).items():
                total[e.decode()] = total.get(e.decode(), 0) + int(n)
        return {e: n for e, n in total.items() if n > 0}


def move_records(source: ViolationStore, target: ViolationStore, *, page: int = _PAGE) -> tuple[int, int]:
    """Move every record of ``source`` into ``target`` (a replica's own file into the store the
    replicas share, when it joins the distributed mode), so no record is left where listing,
    replay, deletions and retention no longer look. Each page is kept in ``target`` before it
    leaves ``source``; records ``target`` refuses (its bound) stay. Answers (moved, left)."""
    moved = 0
    while records := source.list(limit=page):
        refused = target.keep(records)
        refused_ids = {r.id for r in refused}
        moved += source.delete([r.id for r in records if r.id not in refused_ids])
        if refused:
            return moved, len(source.list(limit=1_000_000_000))
    return moved, 0
