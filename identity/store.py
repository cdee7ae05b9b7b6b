"""The identity change log on SQLite (embedded) or PostgreSQL (shared by replicas).

The graph (identity.graph) is a deterministic state machine; this log is its history.
Writers append under one lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped
advisory lock on PostgreSQL) after reading what others appended, so every replica applies
the same changes in the same order and converges to the same partition. Readers follow the
log by sequence number without the lock.

The table is ``identity.models.IdentityLogEntry``; its schema comes from the Alembic
migrations in ``identity/migrations`` (``migrate_identity``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from identity.db import migrate
from identity.models import IdentityLogEntry

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
APPEND_LOCK_KEY = 0x6964_6761_7465_0101

LOG: sa.Table = IdentityLogEntry.__table__  # type: ignore[attr-defined]

LogRow = tuple[int, str, bytes]  # seq, tenant, encoded change
_NEEDLES_PER_SCAN = 200


def migrate_identity(engine: sa.Engine, *, revision: str = "head") -> None:
    """Create or upgrade the identity tables; safe at every start and from many processes at once."""
    migrate(engine, script_location=MIGRATIONS_DIR, revision=revision)


def _like(needle: bytes) -> bytes:
    """A LIKE pattern for bytes holding ``needle`` (its ``\\``, ``%`` and ``_`` escaped)."""
    escaped = needle.replace(b"\\", b"\\\\").replace(b"%", b"\\%").replace(b"_", b"\\_")
    return b"%" + escaped + b"%"


class IdentityLogStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def read_after(
        self, after_seq: int, limit: int = 50_000, conn: sa.Connection | None = None
    ) -> list[LogRow]:
        stmt = (
            sa.select(LOG.c.seq, LOG.c.tenant, LOG.c.change)
            .where(LOG.c.seq > after_seq)
            .order_by(LOG.c.seq)
            .limit(limit)
        )
        return [(int(s), t, bytes(c)) for s, t, c in self._rows(conn, stmt)]

    def all_rows(self, page: int = 50_000) -> Iterator[LogRow]:
        """The whole log in order, read page by page (for offline replays)."""
        after = 0
        while batch := self.read_after(after, page):
            yield from batch
            after = batch[-1][0]

    def begin_locked(self) -> tuple[sa.Connection, sa.RootTransaction]:
        """Open the one writer's transaction; the caller reads, decides, then commits."""
        conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        tx = conn.begin()
        if self.engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": APPEND_LOCK_KEY})
        return conn, tx

    def insert_and_commit(
        self, conn: sa.Connection, tx: sa.RootTransaction, rows: Sequence[tuple[str, str, bytes, int]]
    ) -> int:
        """Append (tenant, kind, change, at_ms) rows, commit; returns the last seq of the log."""
        try:
            if rows:
                # one driver-level executemany: this runs for every batch of new identifiers
                mark = "?" if self.engine.dialect.name == "sqlite" else "%s"
                conn.exec_driver_sql(
                    "INSERT INTO identity_log (tenant, kind, change, at_ms) "
                    f"VALUES ({mark}, {mark}, {mark}, {mark})",
                    list(rows),
                )
            last = conn.execute(sa.select(sa.func.max(LOG.c.seq))).scalar()
            tx.commit()
            return int(last or 0)
        finally:
            conn.close()

    def tenant_changes(
        self, conn: sa.Connection | None, tenant: str, kind: str | None = None, after: int = 0
    ) -> list[tuple[int, bytes]]:
        """(seq, change) of every record of one tenant after seq ``after`` (``kind``: of
        that change type only), in order; under the writer's lock with its ``conn``, else a
        read on a connection of its own."""
        stmt = (
            sa.select(LOG.c.seq, LOG.c.change)
            .where(LOG.c.tenant == tenant, LOG.c.seq > after)
            .order_by(LOG.c.seq)
        )
        if kind is not None:
            stmt = stmt.where(LOG.c.kind == kind)
        return [(int(s), bytes(c)) for s, c in self._rows(conn, stmt)]

    def changes_at(self, conn: sa.Connection, seqs: Sequence[int]) -> dict[int, bytes]:
        """The change of each of these records as it is now (seq -> encoded change)."""
        found: dict[int, bytes] = {}
        for start in range(0, len(seqs), 500):
            stmt = sa.select(LOG.c.seq, LOG.c.change).where(LOG.c.seq.in_(seqs[start : start + 500]))
            found.update((int(s), bytes(c)) for s, c in self._rows(conn, stmt))
        return found

    def _rows(self, conn: sa.Connection | None, stmt: sa.Select[Any]) -> list[Any]:
        """``stmt``'s rows: on ``conn`` (inside the writer's transaction), else on a
        connection of its own."""
        if conn is not None:
            return list(conn.execute(stmt))
        with self.engine.connect() as own:
            return list(own.execute(stmt))

    def naming(
        self, conn: sa.Connection | None, tenant: str, needles: Sequence[bytes]
    ) -> list[tuple[int, bytes]]:
        """(seq, change) of the tenant's records whose encoded change holds one of the byte
        strings ``needles``, in order: the database scans the records (one statement per
        few hundred needles), and only those found are read (``instr`` on SQLite, ``LIKE``
        with its wildcards escaped on PostgreSQL)."""
        found: dict[int, bytes] = {}
        for start in range(0, len(needles), _NEEDLES_PER_SCAN):
            chunk = needles[start : start + _NEEDLES_PER_SCAN]
            holds: list[sa.ColumnElement[bool]]
            if (conn or self.engine).dialect.name == "postgresql":
                like = LOG.c.change.op("LIKE", is_comparison=True)
                holds = [like(sa.literal(_like(n), sa.LargeBinary())) for n in chunk]
            else:
                holds = [sa.func.instr(LOG.c.change, sa.literal(n, sa.LargeBinary())) > 0 for n in chunk]
            stmt = sa.select(LOG.c.seq, LOG.c.change).where(LOG.c.tenant == tenant, sa.or_(*holds))
            found.update((int(s), bytes(c)) for s, c in self._rows(conn, stmt))
        return sorted(found.items())

    def rewrite_and_commit(
        self, conn: sa.Connection, tx: sa.RootTransaction, updates: Sequence[tuple[int, bytes]]
    ) -> None:
        """Replace the change of these (seq, change) records in place, commit (a redaction:
        the caller holds the writer's lock, so the rewrite is one step of the log's history)."""
        try:
            if updates:
                conn.execute(
                    LOG.update().where(LOG.c.seq == sa.bindparam("s")).values(change=sa.bindparam("c")),
                    [{"s": seq, "c": change} for seq, change in updates],
                )
            tx.commit()
        finally:
            conn.close()

    def abandon(self, conn: sa.Connection, tx: sa.RootTransaction) -> None:
        try:
            tx.rollback()
        finally:
            conn.close()
