"""The dead-letter store: events a destination could not take after its retry policy ran out.

An event lands here when its sink kept failing for ``retry.max_attempts`` attempts or
``retry.max_age_seconds`` since it was received, or at once when the receiver refused that
one event (a 4xx after the batch was bisected down to it). Nothing is dropped: each entry
keeps the stored event as it was in the outbox (tenant pseudonyms, consent ticket, proof),
so ``idgate dlq replay`` puts it back in the outbox for its destination, where delivery
asks consent again before sending it.

Two implementations: SQLite (a table in the embedded outbox database) and Redis (one
stream per destination, for the distributed mode). The CLI and the delivery workers use
the same classes; methods are synchronous (workers call them from a thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from export.outbox import OutboxRecord, RecordKind, StoredRecord
from export.outbox_schema import migrate_outbox_database, open_outbox_database, v2_record_fields
from identity.db import row_id


class DeadLetter(msgspec.Struct, frozen=True):
    id: str
    destination: str
    message_id: str
    received_at_ms: int
    dead_at_ms: int
    attempts: int
    reason: str
    payload: bytes
    consent: bytes = b""
    proof: tuple[int, ...] = ()
    tenant: str = ""
    source: str = ""
    kind: RecordKind = "event"
    person: str = ""
    pseudonyms: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """What ``dlq list`` shows: no payload."""
        return {
            "id": self.id,
            "destination": self.destination,
            "messageId": self.message_id,
            "receivedAtMs": self.received_at_ms,
            "deadAtMs": self.dead_at_ms,
            "attempts": self.attempts,
            "reason": self.reason,
        }

    def to_outbox(self) -> OutboxRecord:
        """The event as an outbox record routed to its destination only (for replay)."""
        tenant, source = self.tenant, self.source
        if not tenant:  # dead-lettered before entries kept their tenant and source
            meta = _decode_meta(self.payload).context.get("idgate", {})
            tenant = str(meta.get("tenant", "")) if isinstance(meta, dict) else ""
            source = str(meta.get("source", "idgate")) if isinstance(meta, dict) else "idgate"
        return OutboxRecord(
            tenant=tenant,
            source=source or "idgate",
            message_id=self.message_id,
            received_at_ms=self.received_at_ms,
            destinations=(self.destination,),
            payload=self.payload,
            consent=self.consent,
            proof=self.proof,
            kind=self.kind,
            person=self.person,
            pseudonyms=self.pseudonyms,
        )


class _Meta(msgspec.Struct):
    context: dict[str, Any] = {}


_decode_meta = msgspec.json.Decoder(_Meta).decode


class DeadLetterStore(Protocol):
    def add(self, destination: str, records: Sequence[StoredRecord], reason: str, attempts: int) -> None: ...
    def list(self, destination: str | None = None, limit: int = 100) -> list[DeadLetter]: ...
    def get(self, entry_id: str) -> DeadLetter | None: ...
    def delete(self, entry_ids: Sequence[str]) -> int: ...
    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int: ...
    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[DeadLetter]: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...

    # -- retention (export.retention) ------------------------------------------------
    def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Dead letters of ``tenant`` that died before their destination's cutoff (ms):
        counted, deleted with ``apply``. A destination without a cutoff keeps its own."""
        ...


def _now_ms() -> int:
    return int(time.time() * 1000)


class SqliteDeadLetters:
    """The ``dead_letter`` table beside the embedded outbox (its own connection)."""

    _COLUMNS = (
        "id, destination, message_id, received_at_ms, dead_at_ms, attempts, reason, payload, consent, proof, "
        "tenant, source, kind, person, pseudonyms"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = open_outbox_database(path)
        migrate_outbox_database(self._conn)
        # Workers write from a thread, the CLI and admin read on theirs: one statement at a
        # time, and never a close under a running one (SQLite would crash the process).
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def _row(row: tuple[Any, ...]) -> DeadLetter:
        i, d, m, r, dead, a, reason, p, c, pr, tenant, source, kind, person, pseudonyms = row
        return DeadLetter(
            id=str(i),
            destination=d,
            message_id=m,
            received_at_ms=r,
            dead_at_ms=dead,
            attempts=a,
            reason=reason,
            payload=bytes(p),
            consent=bytes(c),
            proof=tuple(int(x) for x in pr.split(",") if x),
            tenant=tenant,
            source=source,
            kind="notice" if kind == "notice" else "event",
            person=person,
            pseudonyms=tuple(x for x in pseudonyms.split(",") if x),
        )

    def add(self, destination: str, records: Sequence[StoredRecord], reason: str, attempts: int) -> None:
        now = _now_ms()
        rows = [
            (
                destination,
                r.message_id,
                r.received_at_ms,
                now,
                attempts,
                reason[:500],
                r.payload,
                r.consent,
                ",".join(map(str, r.proof)),
                r.tenant,
                r.source,
                r.kind,
                r.person,
                ",".join(r.pseudonyms),
            )
            for r in records
        ]
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT INTO dead_letter(destination, message_id, received_at_ms, dead_at_ms, attempts, "
                "reason, payload, consent, proof, tenant, source, kind, person, pseudonyms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def list(self, destination: str | None = None, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            if destination is None:
                rows = self._conn.execute(
                    f"SELECT {self._COLUMNS} FROM dead_letter ORDER BY id LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {self._COLUMNS} FROM dead_letter WHERE destination = ? ORDER BY id LIMIT ?",
                    (destination, limit),
                ).fetchall()
        return [self._row(r) for r in rows]

    def get(self, entry_id: str) -> DeadLetter | None:
        rowid = row_id(entry_id)
        if rowid is None:
            return None
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM dead_letter WHERE id = ?", (rowid,)
            ).fetchone()
        return self._row(row) if row else None

    def delete(self, entry_ids: Sequence[str]) -> int:
        ids = [(rowid,) for rowid in map(row_id, entry_ids) if rowid is not None]
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            return sum(self._conn.execute("DELETE FROM dead_letter WHERE id = ?", i).rowcount for i in ids)

    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[DeadLetter]:
        """The dead-lettered events of a person (an access request)."""
        wanted = set(pseudonyms)
        rows = self._conn.execute(
            f"SELECT {self._COLUMNS} FROM dead_letter WHERE tenant = ? AND kind = 'event' ORDER BY id",
            (tenant,),
        )
        found = [e for e in map(self._row, rows) if e.person in wanted or wanted & set(e.pseudonyms)]
        return found[:limit]

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int:
        """Delete the dead-lettered events of a person (a deletion request): every event of
        ``tenant`` whose person or pseudonyms include one of ``pseudonyms``. Notices stay."""
        wanted = set(pseudonyms)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            rows = self._conn.execute(
                "SELECT id, person, pseudonyms FROM dead_letter WHERE tenant = ? AND kind = 'event'",
                (tenant,),
            ).fetchall()
            ids = [(i,) for i, person, names in rows if person in wanted or wanted & set(names.split(","))]
            self._conn.executemany("DELETE FROM dead_letter WHERE id = ?", ids)
        return len(ids)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT destination, COUNT(*) FROM dead_letter GROUP BY destination"
            ).fetchall()
        return {d: n for d, n in rows}

    # -- retention (export.retention) --------------------------------------------------
    def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Dead letters of ``tenant`` that died before their destination's cutoff (ms)."""
        where = "FROM dead_letter WHERE tenant = ? AND destination = ? AND dead_at_ms < ?"
        found = 0
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for destination, cutoff in sorted(cutoffs.items()):
                params = (tenant, destination, cutoff)
                if apply:
                    found += self._conn.execute(f"DELETE {where}", params).rowcount  # noqa: S608
                else:
                    found += int(self._conn.execute(f"SELECT count(*) {where}", params).fetchone()[0])  # noqa: S608
        return found


class RedisDeadLetters:
    """One Redis stream per destination (``<prefix>:dlq:<destination>``), for distributed mode.

    Uses a synchronous client: the CLI calls it directly, workers from a thread."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}:dlq"

    def close(self) -> None:
        self.client.close()

    def _key(self, destination: str) -> str:
        return f"{self.prefix}:{destination}"

    def _destinations(self) -> list[str]:
        return sorted(
            k.decode().rsplit(":", 1)[1] for k in self.client.scan_iter(match=f"{self.prefix}:*", count=1000)
        )

    def _entry(self, destination: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        proof = fields.get(b"proof", b"").decode()
        if b"kind" in fields:
            kind: RecordKind = "notice" if fields[b"kind"] == b"notice" else "event"
            person, pseudonyms = fields.get(b"person", b"").decode(), fields.get(b"pseudonyms", b"").decode()
        else:  # dead-lettered before entries kept these
            legacy_kind, person, pseudonyms = v2_record_fields(fields[b"payload"])
            kind = "notice" if legacy_kind == "notice" else "event"
        return DeadLetter(
            id=f"{destination}/{eid}",
            destination=destination,
            message_id=fields[b"message_id"].decode(),
            received_at_ms=int(fields[b"received_at_ms"]),
            dead_at_ms=int(fields[b"dead_at_ms"]),
            attempts=int(fields[b"attempts"]),
            reason=fields[b"reason"].decode(),
            payload=fields[b"payload"],
            consent=fields.get(b"consent", b""),
            proof=tuple(int(x) for x in proof.split(",") if x),
            tenant=fields.get(b"tenant", b"").decode(),
            source=fields.get(b"source", b"").decode(),
            kind=kind,
            person=person,
            pseudonyms=tuple(x for x in pseudonyms.split(",") if x),
        )

    def add(self, destination: str, records: Sequence[StoredRecord], reason: str, attempts: int) -> None:
        now = _now_ms()
        pipe = self.client.pipeline(transaction=True)
        for r in records:
            pipe.xadd(
                self._key(destination),
                {
                    "message_id": r.message_id,
                    "received_at_ms": r.received_at_ms,
                    "dead_at_ms": now,
                    "attempts": attempts,
                    "reason": reason[:500],
                    "payload": r.payload,
                    "consent": r.consent,
                    "proof": ",".join(map(str, r.proof)),
                    "tenant": r.tenant,
                    "source": r.source,
                    "kind": r.kind,
                    "person": r.person,
                    "pseudonyms": ",".join(r.pseudonyms),
                },
            )
        pipe.execute()

    def list(self, destination: str | None = None, limit: int = 100) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for d in [destination] if destination else self._destinations():
            for eid, fields in self.client.xrange(self._key(d), count=limit - len(out)):
                out.append(self._entry(d, eid, fields))
            if len(out) >= limit:
                break
        return out

    def get(self, entry_id: str) -> DeadLetter | None:
        destination, _, eid = entry_id.partition("/")
        if not eid:
            return None
        try:
            rows = self.client.xrange(self._key(destination), min=eid, max=eid)
        except Exception:  # a malformed stream id
            return None
        return self._entry(destination, rows[0][0], rows[0][1]) if rows else None

    def delete(self, entry_ids: Sequence[str]) -> int:
        removed = 0
        for entry_id in entry_ids:
            destination, _, eid = entry_id.partition("/")
            if eid:
                removed += int(self.client.xdel(self._key(destination), eid))
        return removed

    def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> Sequence[DeadLetter]:
        """The dead-lettered events of a person (an access request)."""
        wanted = set(pseudonyms)
        found: list[DeadLetter] = []
        for d in self._destinations():
            for eid, fields in self.client.xrange(self._key(d)):
                entry = self._entry(d, eid, fields)
                if (
                    entry.kind == "event"
                    and entry.tenant == tenant
                    and (entry.person in wanted or wanted & set(entry.pseudonyms))
                ):
                    found.append(entry)
        return found[:limit]

    def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> int:
        """Delete the dead-lettered events of a person (see SqliteDeadLetters.purge_person)."""
        wanted = set(pseudonyms)
        removed = 0
        for d in self._destinations():
            key, start = self._key(d), "-"
            while True:
                rows = self.client.xrange(key, min=start, count=1000)
                if not rows:
                    break
                doomed = []
                for eid, fields in rows:
                    entry = self._entry(d, eid, fields)
                    if (
                        entry.kind == "event"
                        and entry.tenant == tenant
                        and (entry.person in wanted or wanted & set(entry.pseudonyms))
                    ):
                        doomed.append(eid)
                if doomed:
                    removed += int(self.client.xdel(key, *doomed))
                last = rows[-1][0]
                start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return removed

    def counts(self) -> dict[str, int]:
        counts = {d: int(self.client.xlen(self._key(d))) for d in self._destinations()}
        return {d: n for d, n in counts.items() if n}  # a stream stays behind, empty, after XDEL

    # -- retention (export.retention) --------------------------------------------------
    def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Dead letters of ``tenant`` that died before their destination's cutoff (ms)."""
        found = 0
        for destination, cutoff in sorted(cutoffs.items()):
            key, start = self._key(destination), "-"
            while True:
                rows = self.client.xrange(key, min=start, count=1000)
                if not rows:
                    break
                doomed = [
                    eid
                    for eid, fields in rows
                    if fields.get(b"tenant", b"").decode() == tenant and int(fields[b"dead_at_ms"]) < cutoff
                ]
                if doomed and apply:
                    found += int(self.client.xdel(key, *doomed))
                else:
                    found += len(doomed)
                last = rows[-1][0]
                start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return found
