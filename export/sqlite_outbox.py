"""The embedded outbox: SQLite, group commit, message-id dedupe and delivery cursors.

One SQLite database in WAL mode with ``synchronous=FULL``. Appends are group-committed:
the requests that arrive while one commit runs share the next transaction and its fsync,
and an append resolves only after that fsync, so an acknowledged event survives a kill -9
of the process.

Dedupe (export.outbox's claim / append / release): a claim checks the ``dedupe`` table
(message ids confirmed within the window) and this process's in-flight claims; the claimed
keys are inserted in the same transaction as the records. With ``REDIS_URL`` set, replicas
that each keep an embedded outbox share their claims in Redis instead (export.dedupe).

A filter of the marks made within the window (two rotating Bloom filters, ``RecentMarks``)
answers most claims without SQLite: an id it has never seen is new; only the ids it may
have seen (about 1 % of new ones, plus real retries) are looked up. It is filled from the
table in the background at open (claims look every id up until it is), and from every mark
this process makes: the serving process is the only one that marks (``idgate serve`` holds
the data directory's lock; ``idgate dlq replay`` appends without dedupe).

Each destination has a delivery cursor (last delivered sequence number) and the committed
byte sizes of its sink files, updated in one transaction, which is what makes the file
sink exactly-once across crashes (see export.file_sinks).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from prometheus_client import Histogram
from rbloom import Bloom

from export.dedupe import RedisDedupe
from export.outbox import (
    Claim,
    ClaimStatus,
    DeliveryBatch,
    DeliveryState,
    NotedPersons,
    OutboxFull,
    OutboxRecord,
    OutboxUnavailable,
    PersonPurge,
    StoredRecord,
    claimed_as,
    dedupe_key,
    names_person,
    past_retention,
    person_pattern,
)
from export.outbox_schema import migrate_outbox_database, open_outbox_database

log = structlog.get_logger(__name__)

COMMIT_SECONDS = Histogram(
    "idgate_outbox_commit_seconds",
    "Time to durably commit one group of appends (the wait before a request is acknowledged)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
GROUP_REQUESTS = Histogram(
    "idgate_outbox_group_requests",
    "Requests sharing one group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
T = TypeVar("T")
# rows one retention transaction deletes (short transactions: the writer is the event loop's)
_RETENTION_CHUNK = 5_000
# Marks the message ids a group confirms: a claimed id is inserted, or revived when its
# earlier sighting has left the window (a sighting within the window keeps its time: the
# window counts from the first). Keys are the 16-byte digests (export.outbox.dedupe_key).
_MARK_SQL = (
    "INSERT INTO dedupe(key, seen_at_ms) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET seen_at_ms = excluded.seen_at_ms WHERE dedupe.seen_at_ms < ?"
)
# ids looked up per statement (well under SQLite's limit on bound parameters)
_LOOKUP_CHUNK = 500


class RecentMarks:
    """Which dedupe keys may have been marked within the window: a Bloom filter (rbloom)
    for the current window and one for the previous, swapped every window, so a mark is
    remembered for at least a whole window and then forgotten. No false negatives for the
    marks it was given; false positives (``error_rate`` at ``capacity`` marks per window,
    more past it) only cost a lookup. Deleted marks (a person's erasure, expiry) stay in it
    until it rotates: also a lookup, never a wrong answer."""

    def __init__(self, window_ms: int, now_ms: int, capacity: int, error_rate: float = 0.01) -> None:
        self._new = partial(Bloom, capacity, error_rate)
        self.window_ms = window_ms
        self._current = self._new()
        self._previous = self._new()
        self._rotate_at = now_ms + window_ms
        self.ready = False  # until the marks already in the table are in
        self._loaded: Bloom | None = None
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()

    def load(self, path: Path, cutoff_ms: int) -> None:
        """Read the table's marks within the window in a background thread (its own
        connection); ``ready`` once they are merged in by ``maybe`` / ``add``."""

        def run() -> None:
            bloom = self._new()
            conn = open_outbox_database(path)
            try:
                cursor = conn.execute("SELECT key FROM dedupe WHERE seen_at_ms >= ?", (cutoff_ms,))
                while not self._stop.is_set() and (rows := cursor.fetchmany(50_000)):
                    bloom.update(k for (k,) in rows if isinstance(k, bytes))
            except sqlite3.Error as exc:  # the filter stays unready: every claim is looked up
                log.warning("outbox.mark_filter_unavailable", error=type(exc).__name__)
                return
            finally:
                conn.close()
            if not self._stop.is_set():
                self._loaded = bloom

        self._loader = threading.Thread(target=run, name="outbox-marks", daemon=True)
        self._loader.start()

    def close(self) -> None:
        self._stop.set()
        if self._loader is not None:
            self._loader.join()

    def _settle(self, now_ms: int) -> None:
        if not self.ready and self._loaded is not None:
            self._current.update(self._loaded)
            self._loaded = None
            self.ready = True
        while now_ms >= self._rotate_at:
            self._previous, self._current = self._current, self._new()
            self._rotate_at += self.window_ms

    def maybe(self, key: bytes, now_ms: int) -> bool:
        """False only when ``key`` was certainly not marked within the window."""
        self._settle(now_ms)
        return not self.ready or key in self._current or key in self._previous

    def add(self, keys: Iterable[bytes], now_ms: int) -> None:
        self._settle(now_ms)
        self._current.update(keys)


def _seen(conn: sqlite3.Connection, keys: Sequence[bytes], cutoff_ms: int) -> set[bytes]:
    """Which of ``keys`` were marked within the window."""
    found: set[bytes] = set()
    for start in range(0, len(keys), _LOOKUP_CHUNK):
        chunk = keys[start : start + _LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key FROM dedupe WHERE seen_at_ms >= ? AND key IN ({marks})"  # noqa: S608
        found.update(k for (k,) in conn.execute(sql, (cutoff_ms, *chunk)))
    return found


_INSERT_SQL = (
    "INSERT INTO outbox(tenant, source, message_id, received_at_ms, destinations, payload, consent, proof, "
    "kind, person, pseudonyms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = (
    "seq, received_at_ms, destinations, payload, consent, message_id, proof, kind, person, pseudonyms, "
    "tenant, source"
)


def _row_record(row: tuple[Any, ...]) -> StoredRecord:
    # SQLite hands back the column types as written (int, str, bytes): built positionally,
    # on the delivery path's every row.
    s, r, d, p, c, m, pr, kind, person, pseudonyms, tenant, source = row
    return StoredRecord(
        s,
        r,
        tuple(d.split(",")),
        p,
        c,
        m,
        tuple(map(int, pr.split(","))) if pr else (),
        "notice" if kind == "notice" else "event",
        person,
        tuple(filter(None, pseudonyms.split(","))) if pseudonyms else (),
        tenant,
        source,
    )


class _PendingAppend:
    __slots__ = ("records", "dedupe", "claimed", "future")

    def __init__(
        self,
        records: list[OutboxRecord],
        dedupe: bool,
        claimed: list[bytes],
        future: asyncio.Future[list[bool]] | None,
    ) -> None:
        self.records = records
        self.dedupe = dedupe
        self.claimed = claimed
        self.future = future


class SqliteOutbox:
    """Embedded outbox on SQLite with group commit on the event loop.

    Appends made while a group commits wait and are committed together as the next
    group: one transaction (begin, mark the message ids, insert the rows, commit with
    fsync). The statements run on the event loop (measured: handing the whole
    transaction to a writer thread cost more in GIL hand-overs than it saved); only the
    COMMIT, where SQLite fsyncs with the GIL released, runs on a commit thread, so the
    loop serves other requests meanwhile. Every write goes through this one connection,
    one transaction at a time, so SQLite has a single writer; reads use other connections.
    """

    def __init__(
        self,
        path: Path,
        *,
        dedupe_window_seconds: int = 24 * 3600,
        clock: Callable[[], float] = time.time,
        shared_dedupe: RedisDedupe | None = None,
        max_pending: int = 0,
        mark_filter_capacity: int = 4_000_000,
    ) -> None:
        """``mark_filter_capacity``: marks per window the filter of recent marks is sized
        for (about 1.2 bytes each, twice; 0: no filter, every claim is looked up)."""
        self.path = path
        self.dedupe_window_ms = dedupe_window_seconds * 1000
        self._clock = clock
        # Replicas with an outbox each share their message-id claims in Redis.
        self.shared_dedupe = shared_dedupe
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._claims: sqlite3.Connection | None = None  # read on the loop by claim()
        self._reader_lock = threading.Lock()
        self._pending: list[_PendingAppend] = []
        self._flushing = False
        self._write_lock = asyncio.Lock()
        self._committer: ThreadPoolExecutor | None = None
        self._mark_filter_capacity = mark_filter_capacity
        self.marks: RecentMarks | None = None
        # message-id keys claimed by requests of this process that have not appended yet
        self._in_flight: set[bytes] = set()
        self.commits = 0
        self.appends_committed = 0
        self.accepting = True
        # The exact backlog, kept in memory (this process is the only writer): the last seq
        # committed, rows waiting in the next group, room claims reserved, each cursor.
        self.max_pending = max_pending
        self._top_seq = 0
        self._queued_rows = 0
        self._reserved = 0
        self._cursors: dict[str, int] = {}
        self._written_top = 0
        # destination -> the persons whose person-index rows it wrote, and when
        self._persons_written: dict[str, NotedPersons] = {}

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        writer = open_outbox_database(self.path)
        migrate_outbox_database(writer)
        # Checkpoints copy the WAL into the database and fsync it: done in the background by
        # checkpoint(), not inside a request's commit on the event loop.
        writer.execute("PRAGMA wal_autocheckpoint=0")
        self._writer = writer
        row = writer.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._top_seq = int(row[0]) if row else 0
        self._cursors = {
            d: int(s) for d, s in writer.execute("SELECT destination, last_seq FROM delivery_cursor")
        }
        self._reader = open_outbox_database(self.path)
        self._claims = open_outbox_database(self.path)
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-commit")
        if self._mark_filter_capacity and self.shared_dedupe is None:
            now_ms = int(self._clock() * 1000)
            self.marks = RecentMarks(self.dedupe_window_ms, now_ms, self._mark_filter_capacity)
            self.marks.load(self.path, now_ms - self.dedupe_window_ms)

    def close(self) -> None:
        if self.marks is not None:
            self.marks.close()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        # A read started by a task that was cancelled at shutdown may still be running in its
        # worker thread: closing the connection under it crashes the process (SQLite frees
        # what the query is using). Take the reader's lock first; later reads find it closed.
        with self._reader_lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
        for conn in (self._writer, self._claims):
            if conn is not None:
                conn.close()
        self._writer = self._claims = None

    @property
    def alive(self) -> bool:
        return self._writer is not None

    # -- writes ----------------------------------------------------------------------
    @contextmanager
    def _rolled_back_on_error(self, conn: sqlite3.Connection) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("outbox.commit_failed", error=type(exc).__name__, detail=str(exc))
            raise OutboxUnavailable(f"outbox commit failed: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction on the writer connection, synchronously."""
        conn = self._writer
        if conn is None:
            raise OutboxUnavailable("outbox is not open")
        with self._rolled_back_on_error(conn):
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the loop, then COMMIT (the fsync) on the commit thread.

        sqlite3 releases the GIL while it commits, so the loop keeps serving requests
        during the fsync; the lock keeps the next transaction out until it is done.
        """
        conn = self._writer
        if conn is None or self._committer is None:
            raise OutboxUnavailable("outbox is not open")
        async with self._write_lock:
            with self._rolled_back_on_error(conn):
                conn.execute("BEGIN IMMEDIATE")
                result = fn(conn)
                commit = asyncio.get_running_loop().run_in_executor(self._committer, conn.execute, "COMMIT")
                try:
                    await asyncio.shield(commit)
                except asyncio.CancelledError:
                    # The connection is busy committing: let it finish before anything else
                    # (a rollback included) touches it.
                    await asyncio.wait([commit])
                    raise
            return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._reader is None:
                raise OutboxUnavailable("outbox is not open")
            with self._reader_lock:
                return fn(self._reader)

        return await asyncio.to_thread(run)

    async def probe(self) -> bool:
        """One tiny durable write: can the outbox accept again (after a full disk)?"""
        now = int(self._clock() * 1000)
        try:
            await self._write(
                lambda conn: conn.execute("INSERT OR REPLACE INTO probe(id, at_ms) VALUES (1, ?)", (now,))
            )
        except Exception:
            self.accepting = False
            return False
        self.accepting = True
        return True

    # -- the bound ---------------------------------------------------------------------
    @property
    def exact_backlog(self) -> int:
        """Rows after the slowest destination's cursor, with those about to be committed."""
        low = min(self._cursors.values()) if self._cursors else self._top_seq
        return max(0, self._top_seq - low) + self._queued_rows

    def note_cursor(self, destination: str, last_seq: int) -> None:
        """A destination's queue moved its cursor (kept here for the exact backlog)."""
        if last_seq > self._cursors.get(destination, -1):
            self._cursors[destination] = last_seq

    def _reserve(self, rows: int) -> int:
        if not self.max_pending or not rows:
            return 0
        backlog = self.exact_backlog + self._reserved
        if backlog + rows > self.max_pending:
            raise OutboxFull(backlog, self.max_pending)
        self._reserved += rows
        return rows

    # -- claims ----------------------------------------------------------------------
    async def claim(self, source: str, message_ids: Sequence[str]) -> Claim:
        """Claim message ids before the request does anything with its events, and reserve
        room for them under the bound (``OutboxFull`` when there is none)."""
        if self.shared_dedupe is not None:
            keys = [self.shared_dedupe.key(source, m) for m in message_ids]
            shared = await self.shared_dedupe.claim(keys)
            claim = Claim(shared, [k for k, s in zip(keys, shared, strict=True) if s is ClaimStatus.NEW])
            try:
                claim.reserved = self._reserve(len(claim.keys))
            except OutboxFull:
                await self.shared_dedupe.release(claim.keys)
                raise
            return claim
        conn = self._claims
        if conn is None:
            raise OutboxUnavailable("outbox is not open")
        digests = [dedupe_key(source, m) for m in message_ids]
        now_ms = int(self._clock() * 1000)
        cutoff = now_ms - self.dedupe_window_ms
        marks = self.marks
        in_flight = self._in_flight
        asked = sorted(
            {d for d in digests if d not in in_flight and (marks is None or marks.maybe(d, now_ms))}
        )
        try:
            seen = _seen(conn, asked, cutoff) if asked else set()
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"dedupe lookup failed: {exc}") from exc
        statuses: list[ClaimStatus] = []
        claimed: list[bytes] = []
        mine: set[bytes] = set()
        for key in digests:
            if key in mine:  # earlier in this same request
                statuses.append(ClaimStatus.DUPLICATE)
            elif key in self._in_flight:  # claimed by another request still in flight
                statuses.append(ClaimStatus.IN_FLIGHT)
            elif key in seen:
                statuses.append(ClaimStatus.DUPLICATE)
            else:
                statuses.append(ClaimStatus.NEW)
                claimed.append(key)
                mine.add(key)
        reserved = self._reserve(len(claimed))  # before anything is marked in flight
        self._in_flight.update(claimed)
        return Claim(statuses, [], reserved, digests=claimed)

    async def release(self, claim: Claim) -> None:
        """Give claimed ids back (the request failed before its append): a retry is new."""
        self._reserved -= claim.reserved
        claim.reserved = 0
        if self.shared_dedupe is not None:
            await self.shared_dedupe.release(claim.keys)
            return
        self._in_flight.difference_update(claim.digests)

    # -- appends ---------------------------------------------------------------------
    def _append_group(self, groups: list[_PendingAppend], conn: sqlite3.Connection) -> list[list[bool]]:
        """Mark the message ids of the group and insert its rows: one statement each."""
        now_ms = int(self._clock() * 1000)
        keys = [dedupe_key(r.source, r.message_id) if p.dedupe else b"" for p in groups for r in p.records]
        marked = sorted({k for k in keys if k} | {k for p in groups for k in p.claimed})
        fresh: set[bytes] = set()
        if marked:
            cutoff = now_ms - self.dedupe_window_ms
            marks = self.marks
            if any(p.dedupe for p in groups):  # which ids are new (the rest are duplicates)
                maybe = [d for d in marked if marks is None or marks.maybe(d, now_ms)]
                seen = _seen(conn, maybe, cutoff) if maybe else set()
                fresh = {d for d in marked if d not in seen}
            conn.executemany(_MARK_SQL, [(d, now_ms, cutoff) for d in marked])
            if marks is not None:  # before the commit: a failed one leaves a false positive only
                marks.add(marked, now_ms)
        results: list[list[bool]] = []
        rows = []
        position = 0
        for p in groups:
            stored: list[bool] = []
            for r in p.records:
                key = keys[position]
                position += 1
                if key:
                    if key not in fresh:  # seen before, or earlier in this same group
                        stored.append(False)
                        continue
                    fresh.discard(key)
                stored.append(True)
                if r.destinations:
                    rows.append(
                        (
                            r.tenant,
                            r.source,
                            r.message_id,
                            r.received_at_ms,
                            ",".join(r.destinations),
                            r.payload,
                            r.consent,
                            ",".join(map(str, r.proof)),
                            r.kind,
                            r.person,
                            ",".join(r.pseudonyms),
                        )
                    )
            results.append(stored)
        if rows:
            conn.executemany(_INSERT_SQL, rows)
            top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            self._written_top = int(top[0])  # counts once the commit is through
        self.appends_committed += len(groups)
        return results

    async def append(
        self, records: Sequence[OutboxRecord], *, dedupe: bool = False, claim: Claim | None = None
    ) -> list[bool]:
        """Durably append; returns per record True (stored) or False (duplicate message id,
        with ``dedupe``). ``claim``'s ids are confirmed in the same transaction.

        Resolves only after the commit (fsync) that holds the records. Records with no
        destination still pass through dedupe but are not stored.
        """
        if self._writer is None:
            raise OutboxUnavailable("outbox is not open")
        local = list(claim.digests) if claim is not None and self.shared_dedupe is None else []
        if claim is not None:
            self._reserved -= claim.reserved  # the rows themselves count from now on
            claim.reserved = 0
        rows = sum(1 for r in records if r.destinations)
        self._queued_rows += rows
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bool]] = loop.create_future()
        self._pending.append(_PendingAppend(list(records), dedupe, local, future))
        if not self._flushing:
            self._flushing = True
            loop.create_task(self._flush())
        try:
            stored = await future
        finally:
            # committed or failed, these ids are no longer in flight here (a failed append's
            # ids are free for the client's retry)
            self._in_flight.difference_update(local)
            self._queued_rows -= rows
        if claim is not None and self.shared_dedupe is not None and claim.keys:
            await self.shared_dedupe.confirm(claim.keys)
        return stored

    async def _flush(self) -> None:
        """Commit everything pending, group after group, until nothing is left.

        Requests that arrive while a group commits wait in ``_pending`` and form the next
        group: the classic group commit."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                started = time.perf_counter()
                try:
                    results = await self._write(partial(self._append_group, batch))
                except Exception as exc:
                    self.accepting = False
                    failure = exc if isinstance(exc, OutboxUnavailable) else OutboxUnavailable(str(exc))
                    for p in batch:
                        if p.future is not None and not p.future.done():
                            p.future.set_exception(failure)
                    continue
                self.accepting = True
                self._top_seq = max(self._top_seq, self._written_top)
                COMMIT_SECONDS.observe(time.perf_counter() - started)
                GROUP_REQUESTS.observe(len(batch))
                for p, stored in zip(batch, results, strict=True):
                    # a cancelled request's events are stored all the same
                    if p.future is not None and not p.future.done():
                        p.future.set_result(stored)
        finally:
            self._flushing = False

    def append_sync(self, records: Sequence[OutboxRecord], *, dedupe: bool) -> list[bool]:
        group = _PendingAppend(list(records), dedupe, [], None)
        return self._transaction(partial(self._append_group, [group]))[0]

    # -- delivery --------------------------------------------------------------------
    async def register_destinations(self, destinations: Iterable[str]) -> None:
        names = list(destinations)

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO delivery_cursor(destination, last_seq) VALUES (?, 0)",
                [(n,) for n in names],
            )

        await self._write(tx)
        for name in names:
            self._cursors.setdefault(name, 0)

    async def read_after(self, last_seq: int, limit: int) -> list[StoredRecord]:
        def q(conn: sqlite3.Connection) -> list[StoredRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (last_seq, limit),
            ).fetchall()
            return [_row_record(row) for row in rows]

        return await self._read(q)

    async def read_for(
        self, destination: str, last_seq: int, limit: int
    ) -> tuple[list[StoredRecord], int, int]:
        """The next window of up to ``limit`` rows after ``last_seq``: the rows routed to
        ``destination`` (filtered in SQLite, so other destinations' payloads are not read),
        the last seq of the window and how many rows it spanned."""

        def q(conn: sqlite3.Connection) -> tuple[list[StoredRecord], int, int]:
            upper, count = conn.execute(
                "SELECT max(seq), count(*) FROM (SELECT seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?)",
                (last_seq, limit),
            ).fetchone()
            if not count:
                return [], last_seq, 0
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM outbox "  # noqa: S608
                "WHERE seq > ? AND seq <= ? AND instr(',' || destinations || ',', ?) > 0 ORDER BY seq",
                (last_seq, upper, f",{destination},"),
            ).fetchall()
            records = [_row_record(row) for row in rows]
            return records, int(upper), int(count)

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
        self,
        destination: str,
        last_seq: int,
        delivered: int,
        sink_files: dict[str, int],
        persons: Iterable[str] = (),
        released: Iterable[str] = (),
    ) -> None:
        """Advance the cursor past ``last_seq``, record the sink sizes and the persons whose
        data the destination now holds (notices go only where a person's data went) or was
        told to delete (``released``); one transaction."""
        now_ms = int(self._clock() * 1000)
        written = self._persons_written.setdefault(destination, NotedPersons())
        fresh = written.due(set(persons), now_ms)
        released = list(released)

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO delivered_person(destination, unified_id, delivered_at_ms) VALUES (?, ?, ?) "
                "ON CONFLICT(destination, unified_id) "
                "DO UPDATE SET delivered_at_ms = excluded.delivered_at_ms",
                [(destination, p, now_ms) for p in fresh],
            )
            conn.executemany(
                "DELETE FROM delivered_person WHERE destination = ? AND unified_id = ?",
                [(destination, p) for p in released],
            )
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
        written.note(fresh, now_ms)
        written.forget(released)
        self.note_cursor(destination, last_seq)

    async def received(self, destination: str, persons: Iterable[str]) -> set[str]:
        """Which of ``persons`` the destination has been sent data of."""
        wanted = sorted(set(persons))

        def q(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                "SELECT unified_id FROM delivered_person WHERE destination = ? "
                "AND unified_id IN (SELECT value FROM json_each(?))",
                (destination, msgspec.json.encode(wanted)),
            )
            return {r[0] for r in rows}

        return await self._read(q) if wanted else set()

    async def backlog(self) -> int:
        """Rows appended after the slowest destination's cursor (cheap: two index lookups)."""

        def q(conn: sqlite3.Connection) -> int:
            (top,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()
            (low,) = conn.execute("SELECT COALESCE(MIN(last_seq), 0) FROM delivery_cursor").fetchone()
            return max(0, int(top) - int(low))

        return await self._read(q)

    def queue(self, destination: str) -> SqliteDestinationQueue:
        return SqliteDestinationQueue(self, destination)

    async def pending(self) -> int:
        """Events appended but not yet delivered to every destination."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM outbox "
                "WHERE seq > (SELECT COALESCE(MIN(last_seq), 0) FROM delivery_cursor)"
            ).fetchone()
            return int(row[0])

        return await self._read(q)

    async def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database (PASSIVE: never blocks the writer).

        Returns (frames in the WAL, frames checkpointed)."""

        def q(conn: sqlite3.Connection) -> tuple[int, int]:
            _, log_frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(log_frames), int(done)

        return await self._read(q)

    @staticmethod
    def _person_rows(
        conn: sqlite3.Connection,
        tenant: str,
        wanted: set[str],
        limit: int | None = None,
        *,
        notices: bool = False,
    ) -> list[StoredRecord]:
        """The event rows of ``tenant`` whose person or pseudonyms include one of ``wanted``
        (and with ``notices`` the merge and split notices that name one of them)."""
        # the matching is done in SQLite on two short columns (a pseudonym is a whole item of
        # the comma-separated list); whole rows only for the matches
        rows = conn.execute(
            "SELECT seq FROM outbox, (SELECT value FROM json_each(?)) AS k "
            "WHERE tenant = ? AND kind = 'event' "
            "AND (person = k.value OR instr(',' || pseudonyms || ',', ',' || k.value || ',') > 0)",
            (msgspec.json.encode(sorted(wanted)), tenant),
        )
        seqs = sorted({seq for (seq,) in rows})
        if notices and wanted:  # merges and splits naming the person (not their deletion)
            pattern = re.compile(person_pattern(wanted).pattern.encode())
            rows = conn.execute(
                "SELECT seq, payload FROM outbox WHERE tenant = ? AND kind = 'notice'", (tenant,)
            )
            seqs += [seq for seq, payload in rows if names_person(bytes(payload), pattern)]
        found = []
        for seq in seqs[:limit]:
            row = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                found.append(_row_record(row))
        return found

    async def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> list[StoredRecord]:
        """The events of a person still held (an access request), as ``purge_person`` finds them."""
        wanted = set(pseudonyms)
        return await self._read(lambda conn: self._person_rows(conn, tenant, wanted, limit))

    async def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> PersonPurge:
        """Delete the events of a person still held (a deletion request): every event row of
        ``tenant`` whose person or pseudonyms include one of ``pseudonyms``, delivered or not,
        with the dedupe entries of their message ids (the keys are digests: only the events
        lead to them, so the entries go first, or in the same transaction), and the merge
        and split notices naming the person (their deletion notice supersedes them; it
        stays). Sequence numbers are never reused (AUTOINCREMENT), so delivery cursors stay
        right."""
        wanted = set(pseudonyms)
        doomed = await self._read(lambda conn: self._person_rows(conn, tenant, wanted, notices=True))
        claims = [(r.source, claimed_as(r)) for r in doomed if r.kind == "event"]
        shared = 0
        if self.shared_dedupe is not None and claims:
            shared = await self.shared_dedupe.forget([self.shared_dedupe.key(*c) for c in claims])

        def tx(conn: sqlite3.Connection) -> PersonPurge:
            forgotten = sum(
                conn.execute("DELETE FROM dedupe WHERE key = ?", (dedupe_key(*c),)).rowcount for c in claims
            )
            gone = {
                kind: sum(
                    conn.execute("DELETE FROM outbox WHERE seq = ?", (r.seq,)).rowcount
                    for r in doomed
                    if r.kind == kind
                )
                for kind in ("event", "notice")
            }
            return PersonPurge(events=gone["event"], dedupe_keys=forgotten + shared, notices=gone["notice"])

        return await self._write(tx)

    async def prune(self, chunk: int = 5_000) -> tuple[int, int]:
        """Delete up to ``chunk`` rows every destination has delivered and as many dedupe
        entries past the window; small chunks keep each transaction short for the loop."""
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

    # -- retention (export.retention) --------------------------------------------------
    async def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Records of ``tenant`` (events and notices) past retention (export.outbox.
        past_retention), delivered or not: counted, deleted with ``apply``. Found by a read
        in a thread, deleted in short transactions of ``_RETENTION_CHUNK`` rows."""
        if not cutoffs:
            return 0
        latest = max(cutoffs.values())

        def q(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT seq, received_at_ms, destinations FROM outbox "
                "WHERE tenant = ? AND received_at_ms < ?",
                (tenant, latest),
            )
            return [seq for seq, at, dests in rows if past_retention(at, dests.split(","), cutoffs)]

        doomed = await self._read(q)
        if not apply:
            return len(doomed)
        removed = 0
        for start in range(0, len(doomed), _RETENTION_CHUNK):
            chunk = msgspec.json.encode(doomed[start : start + _RETENTION_CHUNK])
            removed += await self._count_or_delete(
                "FROM outbox WHERE seq IN (SELECT value FROM json_each(?))", (chunk.decode(),), apply=True
            )
        return removed

    async def _count_or_delete(self, where: str, params: tuple[int | str, ...], *, apply: bool) -> int:
        """``where`` is ``FROM <table> WHERE ...``: the rows it selects, counted or deleted."""
        if not apply:
            row = await self._read(lambda c: c.execute(f"SELECT count(*) {where}", params).fetchone())
            return int(row[0])
        return int(await self._write(lambda c: c.execute(f"DELETE {where}", params).rowcount))

    async def expire_person_index(self, destination: str, cutoff_ms: int, *, apply: bool) -> int:
        """Persons whose data last went to ``destination`` before ``cutoff_ms``."""
        where = "FROM delivered_person WHERE destination = ? AND delivered_at_ms < ?"
        if apply:  # the rows it removes are written again at the person's next delivery
            self._persons_written.pop(destination, None)
        return await self._count_or_delete(where, (destination, cutoff_ms), apply=apply)

    async def expire_dedupe(self, *, apply: bool) -> int:
        """Dedupe entries past the window that ``prune`` has not reached yet."""
        cutoff = int(self._clock() * 1000) - self.dedupe_window_ms
        return await self._count_or_delete("FROM dedupe WHERE seen_at_ms < ?", (cutoff,), apply=apply)


class SqliteDestinationQueue:
    """A delivery cursor on the embedded outbox. A window with nothing for this destination
    moves the cursor in memory only; it is saved within a second (after a crash the window
    is merely scanned again)."""

    def __init__(self, outbox: SqliteOutbox, destination: str) -> None:
        self.outbox = outbox
        self.destination = destination
        self.last_seq = 0
        self._saved_seq = 0
        self._saved_at = 0.0

    async def open(self) -> dict[str, int]:
        await self.outbox.register_destinations([self.destination])
        state = await self.outbox.delivery_state(self.destination)
        self.last_seq = self._saved_seq = state.last_seq
        return state.sink_files

    async def fetch(self, limit: int) -> DeliveryBatch:
        mine, upper, scanned = await self.outbox.read_for(self.destination, self.last_seq, limit)
        if not scanned and self._saved_seq < self.last_seq:  # idle: save the cursor moved in memory
            await self.outbox.commit_delivery(self.destination, self.last_seq, 0, {})
            self._saved_seq = self.last_seq
        return DeliveryBatch(mine, scanned, upper)

    async def commit(
        self,
        batch: DeliveryBatch,
        delivered: int,
        sink_files: dict[str, int],
        persons: Iterable[str],
        released: Iterable[str] = (),
    ) -> None:
        upper = int(batch.token)  # type: ignore[call-overload]
        now = time.monotonic()
        persons = list(persons)
        released = list(released)
        if delivered or sink_files or persons or released or now - self._saved_at > 1.0:
            await self.outbox.commit_delivery(
                self.destination, upper, delivered, sink_files, persons, released
            )
            self._saved_at = now
            self._saved_seq = upper
        self.last_seq = upper
        self.outbox.note_cursor(self.destination, upper)

    async def received(self, persons: Iterable[str]) -> set[str]:
        return await self.outbox.received(self.destination, persons)

    async def commit_files(self, sink_files: dict[str, int]) -> None:
        if sink_files:
            await self.outbox.commit_delivery(self.destination, self.last_seq, 0, sink_files)
