"""Delivery proofs: which consent records each forwarded event relied on.

"What did we send to whom, and why": every event delivered to a destination is recorded
here with the ledger sequence numbers of the grants that allowed it (its ``consentProof``).
Kept in the consent store, shared by every replica, so an officer's point-in-time view
sees the deliveries of all of them. Writes are idempotent (a redelivery after a crash adds
nothing). Methods are blocking: run them in a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from consent.models import DeliveryProof
from identity.db import dialect_insert, sqlite_connect

_TABLE: sa.Table = DeliveryProof.__table__  # type: ignore[attr-defined]


class Delivery(msgspec.Struct, frozen=True, rename="camel"):
    """One forwarded event that relied on a consent record."""

    ledger_seq: int
    destination: str
    message_id: str
    delivered_at: datetime


class DeliveryProofs:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._trail: sqlite3.Connection | None = None
        self._trail_lock = threading.Lock()

    def close(self) -> None:
        with self._trail_lock:
            if self._trail is not None:
                self._trail.close()
                self._trail = None

    def record(self, destination: str, delivered: Sequence[tuple[str, Sequence[int]]]) -> int:
        """Remember (message id, ledger seqs) of each delivered event; returns rows offered."""
        now = datetime.now(UTC)
        rows = [
            {"ledger_seq": seq, "destination": destination, "message_id": message_id, "delivered_at": now}
            for message_id, proof in delivered
            for seq in proof
        ]
        if not rows:
            return 0
        engine = self.engine
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._record_sqlite(rows)
            return len(rows)
        with engine.begin() as conn:
            # executemany with one compiled statement, not one giant VALUES list per call
            conn.execute(dialect_insert(engine)(_TABLE).on_conflict_do_nothing(), rows)
        return len(rows)

    def _record_sqlite(self, rows: list[dict[str, Any]]) -> None:
        # the delivery path writes this for every event: plain sqlite3 is ~20x cheaper
        with self._trail_lock:
            if self._trail is None:
                self._trail = sqlite_connect(
                    str(self.engine.url.database), check_same_thread=False, isolation_level="DEFERRED"
                )
            with self._trail:
                self._trail.executemany(
                    "INSERT OR IGNORE INTO consent_delivery"
                    "(ledger_seq, destination, message_id, delivered_at) VALUES (?, ?, ?, ?)",
                    [
                        (
                            r["ledger_seq"],
                            r["destination"],
                            r["message_id"],
                            r["delivered_at"].replace(tzinfo=None).isoformat(sep=" "),
                        )
                        for r in rows
                    ],
                )

    def forget(self, destination: str, message_ids: Sequence[str]) -> int:
        """Take back the proofs of events that were not delivered after all (withheld at a
        retry because consent was withdrawn meanwhile); returns the rows removed."""
        if not message_ids:
            return 0
        t = _TABLE
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.delete(t).where(t.c.destination == destination, t.c.message_id.in_(list(message_ids)))
            )
            return int(result.rowcount or 0)

    def relying_on(self, ledger_seqs: Sequence[int], limit: int = 1000) -> list[Delivery]:
        """Deliveries whose consent proof includes one of these ledger records."""
        if not ledger_seqs:
            return []
        t = _TABLE
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.ledger_seq, t.c.destination, t.c.message_id, t.c.delivered_at)
                .where(t.c.ledger_seq.in_(list(ledger_seqs)))
                .order_by(t.c.delivered_at)
                .limit(limit)
            )
            return [Delivery(int(s), d, m, at) for s, d, m, at in rows]

    # -- retention (consent.retention) ---------------------------------------------------
    def expire(self, destination: str, before: datetime, *, apply: bool) -> int:
        """The proofs of deliveries to ``destination`` made before ``before``: counted, and
        removed with ``apply``. Returns how many there are (were)."""
        t = _TABLE
        where = (t.c.destination == destination, t.c.delivered_at < before)
        with self.engine.begin() as conn:
            if not apply:
                return int(conn.scalar(sa.select(sa.func.count()).select_from(t).where(*where)) or 0)
            return int(conn.execute(sa.delete(t).where(*where)).rowcount or 0)

    def delivered_between(
        self, destination: str, start: datetime, end: datetime, limit: int
    ) -> list[tuple[str, int, datetime]]:
        """(message id, ledger seq, delivered at) of the deliveries to ``destination`` in
        [start, end), oldest first, at most ``limit`` rows (a breach query)."""
        t = _TABLE
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.message_id, t.c.ledger_seq, t.c.delivered_at)
                .where(t.c.destination == destination, t.c.delivered_at >= start, t.c.delivered_at < end)
                .order_by(t.c.delivered_at, t.c.message_id)
                .limit(limit)
            )
            return [(str(m), int(s), at) for m, s, at in rows]
