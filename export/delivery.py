"""Delivery: one worker per destination moves events from its queue on the outbox to its sink.

Each destination reads its own queue (a cursor on the embedded outbox, a consumer group on
the Redis Streams outbox), so a slow or failing destination never holds back the others.
For each batch the worker:

1. asks consent again (a withdrawal that landed while the events waited stops them, and
   one of ``personalisation`` has them sent flagged non-personalised: the recheck hands
   back each record as consent allows it now);
2. drops identity notices about persons the destination never received data of;
3. removes the event properties the destination may not receive, when it declares what it
   may (``export.minimise``), and re-keys pseudonyms and unified IDs for the destination's
   pseudonym domain;
4. writes to the sink, retrying with exponential backoff and jitter, and asking consent
   again before every retry (a withdrawal that lands while a destination is down stops
   the events still waiting for it, or flags them non-personalised); a batch the receiver refuses
   (``PermanentSinkError``) is bisected so only the refused events are set aside; events
   still failing after ``Retry.max_attempts`` attempts or ``Retry.max_age_seconds`` since
   they were received go to the dead-letter store (never silently dropped; a replay puts
   them back in the outbox, where consent is asked again like for any event);
5. commits the batch (cursor or stream acks, sink file sizes, persons now held) at once.

Which consent records the events relied on (delivery proofs) is written ahead of each
attempt; events withheld at a retry have theirs taken back.

Delivery is at-least-once; every record carries its message id so receivers can dedupe,
and the file sinks are exactly-once through their committed sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import structlog
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from export.deadletter import DeadLetterStore
from export.domains import DomainRekeyer
from export.minimise import PropertyMinimiser
from export.outbox import DestinationQueue, Outbox, StoredRecord
from export.sink import FileSink, PermanentSinkError, Sink
from identity.notices import IdentityDeleted, decode_notice

log = structlog.get_logger(__name__)

DELIVERED = Counter("idgate_delivered_events_total", "Events written to a destination", ["destination"])
DELIVERY_ERRORS = Counter("idgate_delivery_errors_total", "Failed delivery attempts", ["destination"])
WITHHELD = Counter(
    "idgate_delivery_withheld_total",
    "Events not sent because consent was withdrawn between ingest and delivery",
    ["destination"],
)
DEAD_LETTERED = Counter(
    "idgate_dead_lettered_total", "Events moved to the dead-letter store", ["destination", "reason"]
)
NOTICES_SKIPPED = Counter(
    "idgate_notices_skipped_total",
    "Identity notices not sent to a destination that never received the person's data",
    ["destination"],
)
BACKLOG = Gauge("idgate_outbox_backlog", "Events in the outbox not yet delivered everywhere")

# Asked again at send time: may each of these records still go to this destination, and as
# what? None: withheld; else the record itself, or a copy rewritten for what consent allows
# now (its payload flagged non-personalised). Only a changed record is a new object.
Recheck = Callable[[str, Sequence[StoredRecord]], Awaitable[list[StoredRecord | None]]]
# Told before each sink attempt what is about to be delivered (the audit trail of proofs;
# idempotent, and a crash after the write redelivers); and what a retry then withheld.
OnDelivered = Callable[[str, Sequence[StoredRecord]], Awaitable[None]]
OnWithheld = Callable[[str, Sequence[StoredRecord]], Awaitable[None]]
# Told which person deletions (``identity.deleted`` notices) a destination was sent
# ("delivered": after the sink write, before the commit, so a failure retries the batch) or
# gave up on ("failed": dead-lettered; a replay delivers it later): deletion receipts.
# Returns the unified IDs erased whole (a deletion request): the person index forgets them.
OnDeletionNotices = Callable[[str, Sequence[IdentityDeleted], str], Awaitable[set[str]]]


@dataclass(frozen=True)
class Retry:
    """A destination's retry policy (config: ``[tenants.destinations.retry]``)."""

    max_attempts: int = 8
    max_age_seconds: float = 24 * 3600
    initial_backoff: float = 0.2
    max_backoff: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Equal jitter: uniform in [base/2, base], where base doubles per attempt up to the cap."""
        base = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        return float(base * random.uniform(0.5, 1.0))


def persons_held(written: Sequence[StoredRecord]) -> set[str]:
    """The unified IDs a destination holds data of (or knows from a notice) once these
    records are written: what identity notices are routed by."""
    held: set[str] = set()
    for r in written:
        if r.kind == "notice":
            held.update(decode_notice(r.payload).named())
        elif r.person:
            held.add(r.person)
    return held


def deletion_notices(records: Sequence[StoredRecord]) -> list[IdentityDeleted]:
    """The ``identity.deleted`` notices among these records."""
    found = []
    for r in records:
        if r.kind == "notice":
            notice = decode_notice(r.payload)
            if isinstance(notice, IdentityDeleted):
                found.append(notice)
    return found


class _GaveUp(Exception):
    """The retry policy ran out for the records still pending."""


class DeliveryWorker:
    def __init__(
        self,
        queue: DestinationQueue,
        sink: Sink,
        *,
        batch_size: int = 500,
        poll_seconds: float = 0.2,
        linger_seconds: float = 0.05,
        retry: Retry | None = None,
        dead_letters: DeadLetterStore | None = None,
        rekey: DomainRekeyer | None = None,
        minimise: PropertyMinimiser | None = None,
        recheck: Recheck | None = None,
        on_delivered: OnDelivered | None = None,
        on_withheld: OnWithheld | None = None,
        on_deletion_notices: OnDeletionNotices | None = None,
    ) -> None:
        self.queue = queue
        self.sink = sink
        self.destination = queue.destination
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.linger_seconds = linger_seconds
        self.retry = retry or Retry()
        self.dead_letters = dead_letters
        self.rekey = rekey
        self.minimise = minimise
        self.recheck = recheck
        self.on_delivered = on_delivered
        self.on_withheld = on_withheld
        self.on_deletion_notices = on_deletion_notices
        self.wakeup = asyncio.Event()
        self.committed_files: dict[str, int] = {}
        self.healthy = True
        # the delivery lag: receipt to delivery of the last delivered batch (its oldest
        # event), and the oldest event of the batch in hand (a retry makes it grow)
        self.last_lag: float | None = None
        self.delivered_at: float | None = None
        self._waiting_ms: int | None = None
        # one writer of the sink's files: a batch, a recovery or a purge at a time
        self._files = asyncio.Lock()
        self._recovered = False

    async def _recover(self) -> None:
        async with self._files:
            await self._recover_files()

    async def _recover_files(self) -> None:
        self.committed_files = dict(await self.queue.open())
        removed = await self.sink.recover(self.committed_files)
        self._recovered = True
        if removed:
            log.warning("delivery.recovered", destination=self.destination, truncated_bytes=removed)

    async def purge_person(self, keys: Collection[str]) -> int | None:
        """Remove a person's records from the files this destination's sink keeps (a
        deletion request), between batches; ``keys`` are the person's pseudonyms and unified
        IDs as stored (re-keyed here for the destination). None: the sink keeps no files."""
        if not isinstance(self.sink, FileSink):
            return None
        held = set(keys)
        if self.rekey is not None:
            held |= {self.rekey.value(k) for k in keys}
        async with self._files:
            if not self._recovered:  # the files as committed, nothing past them
                await self._recover_files()
            removed, sizes = await self.sink.purge(self.committed_files, held)
            await self.queue.commit_files(sizes)
            self.committed_files.update(sizes)
        return removed

    # -- one batch ---------------------------------------------------------------------
    async def step(self) -> int:
        """Deliver one batch; returns how many queue entries it moved past."""
        async with self._files:
            return await self._step()

    async def _step(self) -> int:
        batch = await self.queue.fetch(self.batch_size)
        if not batch.scanned:
            return 0
        oldest = min((r.received_at_ms for r in batch.records), default=None)
        if self._waiting_ms is None:
            self._waiting_ms = oldest
        records = await self._still_allowed(batch.records)
        if records:
            records = await self._concerned(records)
        written, sizes = await self._deliver(records) if records else ([], {})
        released: set[str] = set()
        deleted = deletion_notices(written)
        if deleted and self.on_deletion_notices is not None:
            released = await self.on_deletion_notices(self.destination, deleted, "delivered")
        await self.queue.commit(batch, len(written), sizes, persons_held(written), released)
        self.committed_files.update(sizes)
        DELIVERED.labels(self.destination).inc(len(written))
        if written and self._waiting_ms is not None:
            self.delivered_at = time.time()
            self.last_lag = max(0.0, self.delivered_at - self._waiting_ms / 1000)
        self._waiting_ms = None
        return batch.scanned

    def lag_seconds(self, now: float) -> float | None:
        """How far behind this destination is: the lag of the last delivered batch, or the
        age of the oldest event in hand when that is more (a destination that is down)."""
        waiting = self._waiting_ms
        if waiting is None:
            return self.last_lag
        return max(self.last_lag or 0.0, now - waiting / 1000)

    async def _still_allowed(self, records: list[StoredRecord]) -> list[StoredRecord]:
        """The records consent still allows for this destination (asked again now), each as
        consent allows it now (a rewritten copy where that changed)."""
        if not records or self.recheck is None:
            return records
        answers = await self.recheck(self.destination, records)
        withheld = answers.count(None)
        if not withheld:
            return cast(list[StoredRecord], answers)  # no None in it
        WITHHELD.labels(self.destination).inc(withheld)
        return [r for r in answers if r is not None]

    async def _concerned(self, records: list[StoredRecord]) -> list[StoredRecord]:
        """Drop notices about persons this destination never got data of (nor gets now)."""
        notices = {r.seq: decode_notice(r.payload) for r in records if r.kind == "notice"}
        if not notices:
            return records
        known = await self.queue.received({p for n in notices.values() for p in n.subjects()})
        persons: set[str] = set()  # what the batch sends, in order, before each notice
        kept = []
        for r in records:
            notice = notices.get(r.seq)
            if notice is None:
                if r.person:
                    persons.add(r.person)
            else:
                if not any(s in known or s in persons for s in notice.subjects()):
                    NOTICES_SKIPPED.labels(self.destination).inc()
                    continue
                # the persons a notice names (a merge survivor, split parts) are now known here
                persons.update(notice.named())
            kept.append(r)
        return kept

    def _outgoing(self, records: list[StoredRecord]) -> list[StoredRecord]:
        """The records as this destination receives them: minimised and re-keyed."""
        outgoing = records
        if self.minimise is not None:
            minimise = self.minimise.payload
            outgoing = [msgspec.structs.replace(r, payload=minimise(r)) for r in outgoing]
        if self.rekey is not None:
            rekey = self.rekey.payload
            outgoing = [msgspec.structs.replace(r, payload=rekey(r)) for r in outgoing]
        return outgoing

    async def _deliver(self, records: list[StoredRecord]) -> tuple[list[StoredRecord], dict[str, int]]:
        """Write with retries; returns (the records written, sink file sizes)."""
        outgoing = self._outgoing(records)
        original = {r.seq: r for r in records}
        dead: set[int] = set()
        attempt = 0
        while True:
            pending = [r for r in outgoing if r.seq not in dead]
            if attempt:
                # a retry: what the destination may still receive, and as what, is asked again
                asked = await self._still_allowed([original[r.seq] for r in pending])
                allowed = {r.seq for r in asked}
                withheld = [original[r.seq] for r in pending if r.seq not in allowed]
                if withheld:
                    dead.update(r.seq for r in withheld)  # set aside like refused ones
                    pending = [r for r in pending if r.seq in allowed]
                    if self.on_withheld is not None:
                        await self.on_withheld(self.destination, withheld)
                changed = [r for r in asked if r is not original[r.seq]]
                if changed:  # e.g. flagged non-personalised: what is sent (and dead-lettered)
                    original.update((r.seq, r) for r in changed)
                    rewritten = {r.seq: r for r in self._outgoing(changed)}
                    outgoing = [rewritten.get(r.seq, r) for r in outgoing]
                    pending = [rewritten.get(r.seq, r) for r in pending]
            if not pending:
                return [], {}
            if self.on_delivered is not None:
                # Ahead of the write, not part of the sink's retries: if the trail cannot be
                # written nothing is sent and the worker retries the batch whole (nothing is
                # dead-lettered for it).
                await self.on_delivered(self.destination, [original[r.seq] for r in pending])
            try:
                sizes = await self._write_isolating(pending, original, dead)
                self.healthy = True
                return [original[r.seq] for r in pending if r.seq not in dead], sizes
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.healthy = False
                DELIVERY_ERRORS.labels(self.destination).inc()
                oldest = min(r.received_at_ms for r in pending) / 1000
                too_old = time.time() - oldest > self.retry.max_age_seconds
                if attempt >= self.retry.max_attempts or too_old:
                    reason = f"{'max_age' if too_old else 'max_attempts'}: {type(exc).__name__}: {exc}"
                    await self._dead_letter([original[r.seq] for r in pending], reason, attempt)
                    return [], {}
                delay = self.retry.backoff(attempt)
                log.warning(
                    "delivery.retry",
                    destination=self.destination,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    records=len(pending),
                )
                await asyncio.sleep(delay)
                # file sinks cut back what the failed write left behind
                await self.sink.recover(self.committed_files)

    async def _write_isolating(
        self, records: list[StoredRecord], original: dict[int, StoredRecord], dead: set[int]
    ) -> dict[str, int]:
        """Write; when the receiver refuses the batch, bisect it so only the records it
        refuses one by one are set aside (dead-lettered) and the rest go through."""
        try:
            return await self.sink.write(records)
        except PermanentSinkError as exc:
            if len(records) == 1:
                r = records[0]
                await self._dead_letter([original[r.seq]], f"refused: {exc}", 1)
                dead.add(r.seq)
                return {}
            half = len(records) // 2
            sizes = await self._write_isolating(records[:half], original, dead)
            sizes.update(await self._write_isolating(records[half:], original, dead))
            return sizes

    async def _dead_letter(self, records: list[StoredRecord], reason: str, attempts: int) -> None:
        if self.dead_letters is None:
            raise _GaveUp(f"{len(records)} records failed and no dead-letter store is configured")
        await asyncio.to_thread(self.dead_letters.add, self.destination, records, reason, attempts)
        DEAD_LETTERED.labels(self.destination, reason.split(":", 1)[0]).inc(len(records))
        deleted = deletion_notices(records)
        if deleted and self.on_deletion_notices is not None:
            try:
                await self.on_deletion_notices(self.destination, deleted, "failed")
            except Exception as exc:  # the notice is in the dead letters; its replay records it
                log.error("delivery.receipt_failed", destination=self.destination, error=type(exc).__name__)
        log.error(
            "delivery.dead_lettered",
            destination=self.destination,
            records=len(records),
            reason=reason[:200],
            attempts=attempts,
        )

    # -- loop --------------------------------------------------------------------------
    async def run(self) -> None:
        await self._recover_until_ok()
        failures = 0
        while True:
            try:
                moved = await self.step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the queue itself (outbox, Redis) failed: back off
                failures += 1
                self.healthy = False
                DELIVERY_ERRORS.labels(self.destination).inc()
                delay = self.retry.backoff(min(failures, 12))
                log.error(
                    "delivery.failed",
                    destination=self.destination,
                    error=type(exc).__name__,
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                await self._recover_until_ok()
                continue
            if moved < self.batch_size:
                self.wakeup.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that lands as the wait ends, and the worker then outlives stop()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self.wakeup.wait()
                # Let more events arrive before the next read: one sink write and one commit
                # then serve many requests instead of one each.
                await asyncio.sleep(self.linger_seconds)

    async def _recover_until_ok(self) -> None:
        attempt = 0
        while True:
            try:
                await self._recover()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                log.error("delivery.recover_failed", destination=self.destination, error=type(exc).__name__)
                await asyncio.sleep(self.retry.backoff(min(attempt, 12)))


class DeliveryLag(Collector):
    """``idgate_delivery_lag_seconds`` per destination: this replica's workers' lag."""

    def __init__(self) -> None:
        self.workers: Sequence[DeliveryWorker] = ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "idgate_delivery_lag_seconds",
            "Receipt to delivery of the last delivered batch's oldest event, or the age of the "
            "oldest event waiting when more (this replica's worker)",
            labels=["destination"],
        )
        now = time.time()
        for w in list(self.workers):
            lag = w.lag_seconds(now)
            if lag is not None:
                family.add_metric([w.destination], lag)
        yield family


LAG = DeliveryLag()
REGISTRY.register(LAG)


class DeliveryService:
    """Runs the destination workers, outbox pruning and the backlog watch as background tasks.

    ``overloaded`` (reported by readiness) turns true while the outbox holds ``max_backlog``
    undelivered events and false again below 90 % of it; ingest itself answers 503 with
    Retry-After when an append would pass the bound (the outbox checks it exactly).
    """

    def __init__(
        self,
        outbox: Outbox,
        workers: Sequence[DeliveryWorker],
        prune_seconds: float = 30,
        checkpoint_seconds: float = 1,
        max_backlog: int = 0,
        backlog_seconds: float = 0.5,
    ) -> None:
        self.outbox = outbox
        self.workers = list(workers)
        self.prune_seconds = prune_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self.max_backlog = max_backlog
        self.backlog_seconds = backlog_seconds
        self.backlog = 0
        self.overloaded = False
        self._tasks: list[asyncio.Task[None]] = []

    async def measure_backlog(self) -> int:
        self.backlog = await self.outbox.backlog()
        BACKLOG.set(self.backlog)
        if self.max_backlog:
            if self.backlog >= self.max_backlog:
                if not self.overloaded:
                    log.warning("outbox.overloaded", backlog=self.backlog, bound=self.max_backlog)
                self.overloaded = True
            elif self.backlog < self.max_backlog * 0.9:
                if self.overloaded:
                    log.info("outbox.recovered", backlog=self.backlog)
                self.overloaded = False
        return self.backlog

    async def _backlog_loop(self) -> None:
        while True:
            try:
                await self.measure_backlog()
            except Exception as exc:
                log.error("outbox.backlog_failed", error=type(exc).__name__)
            await asyncio.sleep(self.backlog_seconds)

    def notify(self) -> None:
        for w in self.workers:
            w.wakeup.set()

    async def purge_person(self, destinations: Collection[str], keys: Collection[str]) -> dict[str, int]:
        """Remove a person's records from the files of these destinations' sinks (those that
        keep files): records removed per destination."""
        removed: dict[str, int] = {}
        for w in self.workers:
            if w.destination in destinations:
                count = await w.purge_person(keys)
                if count is not None:
                    removed[w.destination] = count
        return removed

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_seconds)
            try:
                await self.outbox.checkpoint()
            except Exception as exc:
                log.error("outbox.checkpoint_failed", error=type(exc).__name__)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.prune_seconds)
            try:
                total_delivered = total_expired = 0
                while True:
                    delivered, expired = await self.outbox.prune(chunk=5_000)
                    total_delivered += delivered
                    total_expired += expired
                    if delivered < 5_000 and expired < 5_000:
                        break
                    await asyncio.sleep(0.01)  # let requests in between chunks
                if total_delivered or total_expired:
                    log.info("outbox.pruned", delivered_rows=total_delivered, expired_dedupe=total_expired)
            except Exception as exc:
                log.error("outbox.prune_failed", error=type(exc).__name__)

    async def start(self) -> None:
        await self.outbox.register_destinations(w.destination for w in self.workers)
        LAG.workers = self.workers
        for w in self.workers:
            self._tasks.append(asyncio.create_task(w.run(), name=f"deliver-{w.destination}"))
        self._tasks.append(asyncio.create_task(self._prune_loop(), name="outbox-prune"))
        self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="outbox-checkpoint"))
        self._tasks.append(asyncio.create_task(self._backlog_loop(), name="outbox-backlog"))

    async def stop(self) -> None:
        # Cancel until every task has ended: a cancellation that lands inside a client call
        # can come back as that client's own error (caught by the loops' error handling), and
        # the task would then run on and stop() wait for it forever.
        pending = set(self._tasks)
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        self._tasks.clear()
        for w in self.workers:
            await w.sink.close()
