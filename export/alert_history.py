"""Alert history: every firing and resolution of an alert rule, where it was notified and
which channels failed after their retries.

Two implementations, like the dead-letter store: SQLite (``alerts.sqlite3`` in the data
directory, embedded) and Redis (one capped stream per tenant, shared by the replicas, so
the history survives the evaluator's death and reads the same from every replica). Methods
are synchronous: the CLI calls them directly, the evaluator from a thread. A record holds
config ids, numbers and exception class names only, never an identifier or a URL.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

# The newest records kept per tenant (Redis trims its stream to about this many).
MAX_RECORDS = 10_000


class ChannelDelivery(msgspec.Struct, rename="camel", frozen=True):
    """One channel's outcome for one notification."""

    channel: str
    kind: str
    delivered: bool
    attempts: int
    # the last failure's exception class (never its message: it can carry a URL's token)
    error: str | None = None


class AlertRecord(msgspec.Struct, rename="camel", frozen=True):
    """A rule started firing or resolved (``notified`` false: silent within its cooldown)."""

    tenant: str
    rule: str
    kpi: str
    status: Literal["firing", "resolved"]
    severity: str
    at: float  # epoch seconds of the transition
    value: float | None
    compared: float | None  # what the value was compared with (the rule's ``compare``)
    compare: str
    volume: int
    window_minutes: float
    notified: bool
    deliveries: list[ChannelDelivery] = []
    id: str = ""  # the store's id, set when read back


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AlertRecord).decode


class AlertHistory(Protocol):
    def record(self, entry: AlertRecord) -> str: ...

    def list(self, tenant: str, *, rule: str | None = None, limit: int = 100) -> list[AlertRecord]:
        """The newest records first."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    rule TEXT NOT NULL,
    at REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_history_tenant ON alert_history (tenant, id);
"""


class SqliteAlertHistory:
    """The ``alert_history`` table in ``alerts.sqlite3`` (embedded mode)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def record(self, entry: AlertRecord) -> str:
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO alert_history (tenant, rule, at, record) VALUES (?, ?, ?, ?)",
                (entry.tenant, entry.rule, entry.at, _encode(entry)),
            )
            row = cur.lastrowid
            # bounded: the oldest records of the tenant past MAX_RECORDS go
            self._conn.execute(
                "DELETE FROM alert_history WHERE tenant = ? AND id <= ?",
                (entry.tenant, (row or 0) - MAX_RECORDS),
            )
        return str(row)

    def list(self, tenant: str, *, rule: str | None = None, limit: int = 100) -> list[AlertRecord]:
        sql = "SELECT id, record FROM alert_history WHERE tenant = ?"
        args: list[Any] = [tenant]
        if rule is not None:
            sql += " AND rule = ?"
            args.append(rule)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [msgspec.structs.replace(_decode(record), id=str(rid)) for rid, record in rows]


class RedisAlertHistory:
    """One stream per tenant (``<prefix>:alerts:history:<tenant>``), trimmed to about
    MAX_RECORDS entries (distributed mode)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}:alerts:history"

    def close(self) -> None:
        self.client.close()

    def record(self, entry: AlertRecord) -> str:
        eid = self.client.xadd(
            f"{self.prefix}:{entry.tenant}",
            {"rule": entry.rule, "record": _encode(entry)},
            maxlen=MAX_RECORDS,
            approximate=True,
        )
        return eid.decode() if isinstance(eid, bytes) else str(eid)

    def list(self, tenant: str, *, rule: str | None = None, limit: int = 100) -> list[AlertRecord]:
        key = f"{self.prefix}:{tenant}"
        out: list[AlertRecord] = []
        upper = "+"
        while len(out) < limit:
            entries = self.client.xrevrange(key, max=upper, min="-", count=max(limit, 200))
            for eid, fields in entries:
                if rule is not None and fields[b"rule"].decode() != rule:
                    continue
                out.append(msgspec.structs.replace(_decode(fields[b"record"]), id=eid.decode()))
                if len(out) == limit:
                    break
            if len(entries) < max(limit, 200):
                break
            upper = "(" + entries[-1][0].decode()  # exclusive: continue below the last one
        return out
