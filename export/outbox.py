"""The durable outbox: the gateway's ack point, with message-id dedupe and delivery cursors.

Embedded mode keeps it in one SQLite database in WAL mode. All writes go through a single
writer thread that takes every job waiting in its queue and commits them in one
transaction with ``synchronous=FULL`` (group commit): one fsync serves many concurrent
requests, and an append's future resolves only after that fsync, so an acknowledged event
survives a kill -9 of the process.

Each destination has a delivery cursor (last delivered sequence number) and the committed
byte sizes of its sink files, updated in one transaction, which is what makes the file
sink exactly-once across crashes (see export.sinks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    destinations TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dedupe (
    key TEXT PRIMARY KEY,
    seen_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_cursor (
    destination TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sink_file (
    destination TEXT NOT NULL,
    file TEXT NOT NULL,
    committed_bytes INTEGER NOT NULL,
    PRIMARY KEY (destination, file)
) WITHOUT ROWID;
"""


class OutboxUnavailable(Exception):
    """The outbox could not durably store the events; nothing from the request was acked."""


class OutboxRecord(msgspec.Struct, frozen=True):
    tenant: str
    source: str
    message_id: str
    received_at_ms: int
    destinations: tuple[str, ...]
    payload: bytes


class StoredRecord(msgspec.Struct, frozen=True):
    seq: int
    received_at_ms: int
    destinations: tuple[str, ...]
    payload: bytes


class DeliveryState(msgspec.Struct):
    last_seq: int
    delivered: int
    sink_files: dict[str, int]


def dedupe_key(source: str, message_id: str) -> bytes:
    """Message ids are hashed with their source so the dedupe table holds nothing readable."""
    return hashlib.blake2b(f"{source}\x1f{message_id}".encode(), digest_size=16).digest()


# One statement claims every message id of a group commit: the rows it inserts (or revives
# after the window) come back, the ones it leaves alone are duplicates.
_CLAIM_SQL = (
    "INSERT INTO dedupe(key, seen_at_ms) SELECT value, ? FROM json_each(?) WHERE true "
    "ON CONFLICT(key) DO UPDATE SET seen_at_ms = excluded.seen_at_ms WHERE dedupe.seen_at_ms < ? "
    "RETURNING key"
)
_INSERT_SQL = (
    "INSERT INTO outbox(tenant, source, message_id, received_at_ms, destinations, payload) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class Outbox(Protocol):
    async def append(self, records: Sequence[OutboxRecord], *, dedupe: bool) -> list[bool]: ...
    async def read_after(self, last_seq: int, limit: int) -> list[StoredRecord]: ...
    async def delivery_state(self, destination: str) -> DeliveryState: ...
    async def commit_delivery(
        self, destination: str, last_seq: int, delivered: int, sink_files: dict[str, int]
    ) -> None: ...
    async def pending(self) -> int: ...
    async def prune(self) -> tuple[int, int]: ...


class _Job:
    """One unit of work for the writer thread: a function to run in the transaction, or
    records to append. Answered through a concurrent future (synchronous callers) or an
    asyncio future (the event loop)."""

    __slots__ = ("fn", "records", "dedupe", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        records: Sequence[OutboxRecord] | None = None,
        dedupe: bool = True,
    ) -> None:
        self.fn = fn
        self.records = records
        self.dedupe = dedupe
        self.loop = loop
        self.future: Future[Any] | asyncio.Future[Any] = loop.create_future() if loop else Future()


def _settle(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in outcomes:
        if fut.cancelled():  # the request went away; its events are stored all the same
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


_STOP = object()


class SqliteOutbox:
    """Embedded outbox on SQLite with a group-committing writer thread."""

    def __init__(
        self,
        path: Path,
        *,
        dedupe_window_seconds: int = 24 * 3600,
        max_group: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.dedupe_window_ms = dedupe_window_seconds * 1000
        self._max_group = max_group
        self._clock = clock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._running = False
        self.commits = 0
        self.jobs_committed = 0

    # -- lifecycle -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        (version,) = writer.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise OutboxUnavailable(f"outbox schema {version} is newer than this idgate ({SCHEMA_VERSION})")
        writer.executescript(_SCHEMA)
        writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._reader = self._connect()
        self._thread = threading.Thread(target=self._run, args=(writer,), name="outbox-writer", daemon=True)
        self._running = True
        self._thread.start()

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the writer thread -----------------------------------------------------------
    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                jobs: list[_Job] = [first]
                stop = False
                while len(jobs) < self._max_group:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    jobs.append(nxt)
                self._commit_group(conn, jobs)
                if stop:
                    return
        finally:
            self._running = False
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        appends = [j for j in jobs if j.records is not None]
        others = [j for j in jobs if j.records is None]
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            if appends:
                # All appends of the group in a fixed number of statements: every statement
                # hands the GIL to the event loop and back, so per-job statements cost more
                # in thread switches than in SQLite.
                for job, stored in zip(appends, self._append_group(conn, appends), strict=True):
                    outcomes[id(job)] = (True, stored)
            for job in others:
                # A savepoint per job: one failing job leaves no half-written rows behind.
                conn.execute("SAVEPOINT job")
                try:
                    outcomes[id(job)] = (True, job.fn(conn))  # type: ignore[misc]
                    conn.execute("RELEASE job")
                except Exception as exc:  # reported to that job's caller only
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes[id(job)] = (False, exc)
            conn.execute("COMMIT")
        except Exception as exc:  # the whole group failed; the writer thread lives on
            log.error("outbox.commit_failed", error=type(exc).__name__, detail=str(exc), jobs=len(jobs))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = OutboxUnavailable(f"outbox commit failed: {exc}")
            self._answer(jobs, [(False, failure)] * len(jobs))
            return
        self.commits += 1
        self.jobs_committed += len(jobs)
        self._answer(jobs, [outcomes[id(j)] for j in jobs])

    def _append_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[list[bool]]:
        now_ms = int(self._clock() * 1000)
        keys = [
            dedupe_key(r.source, r.message_id).hex() if job.dedupe else ""
            for job in jobs
            for r in job.records  # type: ignore[union-attr]
        ]
        claimed = {k for k in keys if k}
        if claimed:
            fresh = {
                k
                for (k,) in conn.execute(
                    _CLAIM_SQL, (now_ms, msgspec.json.encode(sorted(claimed)), now_ms - self.dedupe_window_ms)
                )
            }
        else:
            fresh = set()
        results: list[list[bool]] = []
        rows = []
        position = 0
        for job in jobs:
            stored: list[bool] = []
            for r in job.records:  # type: ignore[union-attr]
                key = keys[position]
                position += 1
                if key:
                    if key not in fresh:  # seen before, or earlier in this same group
                        stored.append(False)
                        continue
                    fresh.discard(key)
                stored.append(True)
                if r.destinations:
                    destinations = ",".join(r.destinations)
                    rows.append((r.tenant, r.source, r.message_id, r.received_at_ms, destinations, r.payload))
            results.append(stored)
        if rows:
            conn.executemany(_INSERT_SQL, rows)
        return results

    @staticmethod
    def _answer(jobs: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
        # One wake-up of each event loop per group, not one per job.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if job.loop is None:
                sync_future: Future[Any] = job.future  # type: ignore[assignment]
                if ok:
                    sync_future.set_result(value)
                else:
                    sync_future.set_exception(value)
            else:
                per_loop.setdefault(job.loop, []).append((job.future, ok, value))  # type: ignore[arg-type]
        for loop, outcomes_ in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(_settle, outcomes_)

    def _enqueue(self, job: _Job) -> None:
        if not self._running:
            raise OutboxUnavailable("outbox writer is not running")
        self._queue.put(job)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Run ``fn`` in the writer's next transaction; for synchronous callers."""
        job = _Job(fn)
        self._enqueue(job)
        return job.future  # type: ignore[return-value]

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        job = _Job(fn, asyncio.get_running_loop())
        self._enqueue(job)
        return await job.future  # type: ignore[no-any-return]

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._reader is not None, "outbox is not open"
            with self._reader_lock:
                return fn(self._reader)

        return await asyncio.to_thread(run)

    # -- appends ---------------------------------------------------------------------
    async def append(self, records: Sequence[OutboxRecord], *, dedupe: bool) -> list[bool]:
        """Durably append; returns per record True (stored) or False (duplicate message id).

        Records with no destination still pass through dedupe but are not stored.
        """
        job = _Job(loop=asyncio.get_running_loop(), records=list(records), dedupe=dedupe)
        self._enqueue(job)
        return await job.future  # type: ignore[no-any-return]

    def append_sync(self, records: Sequence[OutboxRecord], *, dedupe: bool) -> list[bool]:
        job = _Job(records=list(records), dedupe=dedupe)
        self._enqueue(job)
        return job.future.result()  # type: ignore[no-any-return]

    # -- delivery --------------------------------------------------------------------
    async def register_destinations(self, destinations: Iterable[str]) -> None:
        names = list(destinations)

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO delivery_cursor(destination, last_seq) VALUES (?, 0)",
                [(n,) for n in names],
            )

        await self._write(tx)

    async def read_after(self, last_seq: int, limit: int) -> list[StoredRecord]:
        def q(conn: sqlite3.Connection) -> list[StoredRecord]:
            rows = conn.execute(
                "SELECT seq, received_at_ms, destinations, payload FROM outbox "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (last_seq, limit),
            ).fetchall()
            return [StoredRecord(s, r, tuple(d.split(",")), p) for s, r, d, p in rows]

        return await self._read(q)

    async def delivery_state(self, destination: str) -> DeliveryState:
        def q(conn: sqlite3.Connection) -> DeliveryState:
            row = conn.execute(
                "SELECT last_seq, delivered FROM delivery_cursor WHERE destination = ?", (destination,)
            ).fetchone()
            files = conn.execute(
                "SELECT file, committed_bytes FROM sink_file WHERE destination = ?", (destination,)
            ).fetchall()
            last_seq, delivered = row if row else (0, 0)
            return DeliveryState(last_seq=last_seq, delivered=delivered, sink_files=dict(files))

        return await self._read(q)

    async def commit_delivery(
        self, destination: str, last_seq: int, delivered: int, sink_files: dict[str, int]
    ) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO delivery_cursor(destination, last_seq, delivered) VALUES (?, ?, ?) "
                "ON CONFLICT(destination) DO UPDATE SET last_seq = excluded.last_seq, "
                "delivered = delivery_cursor.delivered + excluded.delivered",
                (destination, last_seq, delivered),
            )
            conn.executemany(
                "INSERT INTO sink_file(destination, file, committed_bytes) VALUES (?, ?, ?) "
                "ON CONFLICT(destination, file) DO UPDATE SET committed_bytes = excluded.committed_bytes",
                [(destination, f, size) for f, size in sink_files.items()],
            )

        await self._write(tx)

    async def pending(self) -> int:
        """Events appended but not yet delivered to every destination."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM outbox "
                "WHERE seq > (SELECT COALESCE(MIN(last_seq), 0) FROM delivery_cursor)"
            ).fetchone()
            return int(row[0])

        return await self._read(q)

    async def prune(self, chunk: int = 50_000) -> tuple[int, int]:
        """Delete rows every destination has delivered and dedupe entries past the window."""
        cutoff = int(self._clock() * 1000) - self.dedupe_window_ms

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            delivered = conn.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq <= "
                "(SELECT COALESCE(MIN(last_seq), 0) FROM delivery_cursor) LIMIT ?)",
                (chunk,),
            ).rowcount
            expired = conn.execute(
                "DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe WHERE seen_at_ms < ? LIMIT ?)",
                (cutoff, chunk),
            ).rowcount
            return delivered, expired

        return await self._write(tx)
