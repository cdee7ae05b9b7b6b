"""The violation store: events a tenant's tracking plan kept from delivery (``block``) or
delivered without some of their properties (``omit``), so that nothing is lost and each
kept one can be replayed once the plan or the client is fixed.

A record holds the event as it would have been stored in the outbox (identifiers
pseudonymised, properties and context scrubbed: never raw), the pseudonymised identifiers
the pipeline found in it, and what the plan said (rule, property path, detail; never a
value). One record per (tenant, source, message id): a client's retry of the same bad event
replaces its record instead of adding one, and a replay that gets the event through
deletes it.

SQLite under the data dir (``violations.sqlite3``), one file per gateway; methods are
synchronous (the pipeline calls them from a thread).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import msgspec

from identity.db import row_id
from identity.identifiers import Identifier


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

    def names_any(self, pseudonyms: Collection[str]) -> bool:
        """Whether the record holds one of ``pseudonyms`` (an identifier it names, proven or
        not, or any pseudonym written into its event)."""
        wanted = set(pseudonyms)
        return bool(
            wanted.intersection(self.pseudonyms)
            or any(i.value in wanted for i in (*self.identifiers, *self.unproven))
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


class SqliteViolations:
    """The ``plan_violation`` table in ``violations.sqlite3``."""

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

    def keep(self, records: Sequence[ViolationRecord]) -> None:
        """Store (or, for a message id already kept, replace) records in one transaction."""
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
        return [r for r in self._scan(tenant) if r.names_any(pseudonyms)][:limit]

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int:
        """Delete the records of a person (a deletion request); how many went."""
        ids = [r.id for r in self._scan(tenant) if r.names_any(pseudonyms)]
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
