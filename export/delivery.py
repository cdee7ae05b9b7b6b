"""In-process delivery: one worker per destination moves events from the outbox to its sink.

Each destination has its own cursor, so a slow or failing destination never holds back
the others. A failed write is cut back to the last commit and retried with exponential
backoff and jitter; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from prometheus_client import Counter

from export.outbox import SqliteOutbox, StoredRecord
from export.sinks import Sink

log = structlog.get_logger(__name__)

DELIVERED = Counter("idgate_delivered_events_total", "Events written to a destination", ["destination"])
DELIVERY_ERRORS = Counter("idgate_delivery_errors_total", "Failed delivery attempts", ["destination"])
WITHHELD = Counter(
    "idgate_delivery_withheld_total",
    "Events not sent because consent was withdrawn between ingest and delivery",
    ["destination"],
)

# Asked again at send time: which of these records may still go to this destination?
Recheck = Callable[[str, Sequence[StoredRecord]], Awaitable[list[bool]]]
# Told, before the sink write, what is about to be delivered (the audit trail of proofs).
OnDelivered = Callable[[str, Sequence[StoredRecord]], Awaitable[None]]


class DeliveryWorker:
    def __init__(
        self,
        outbox: SqliteOutbox,
        sink: Sink,
        *,
        batch_size: int = 2000,
        poll_seconds: float = 0.2,
        linger_seconds: float = 0.05,
        recheck: Recheck | None = None,
        on_delivered: OnDelivered | None = None,
    ) -> None:
        self.outbox = outbox
        self.sink = sink
        self.destination = sink.destination
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.linger_seconds = linger_seconds
        self.recheck = recheck
        self.on_delivered = on_delivered
        self.wakeup = asyncio.Event()
        self.last_seq = 0
        self._cursor_saved_at = 0.0
        self._saved_seq = 0
        self.healthy = True

    async def _recover(self) -> None:
        state = await self.outbox.delivery_state(self.destination)
        self.last_seq = self._saved_seq = state.last_seq
        removed = await self.sink.recover(state.sink_files)
        if removed:
            log.warning("delivery.recovered", destination=self.destination, truncated_bytes=removed)

    async def step(self) -> int:
        """Deliver one batch; returns how many outbox rows it moved past."""
        mine, upper, scanned = await self.outbox.read_for(self.destination, self.last_seq, self.batch_size)
        if not scanned:
            if self._saved_seq < self.last_seq:  # idle: save the cursor moved in memory
                await self.outbox.commit_delivery(self.destination, self.last_seq, [], {})
                self._saved_seq = self.last_seq
            return 0
        if mine and self.recheck is not None:
            still = await self.recheck(self.destination, mine)
            withheld = len(mine) - sum(still)
            if withheld:
                WITHHELD.labels(self.destination).inc(withheld)
                mine = [r for r, ok in zip(mine, still, strict=True) if ok]
        now = time.monotonic()
        if mine or now - self._cursor_saved_at > 1.0:
            if mine and self.on_delivered is not None:
                # before the write: a crash after it redelivers, and the trail is idempotent
                await self.on_delivered(self.destination, mine)
            sizes = await self.sink.write(mine) if mine else {}
            await self.outbox.commit_delivery(self.destination, upper, mine, sizes)
            self._cursor_saved_at = now
            self._saved_seq = upper
        # else: nothing for this destination in the window; the cursor moves on in memory and
        # is saved within a second (after a crash the window is only scanned again).
        self.last_seq = upper
        DELIVERED.labels(self.destination).inc(len(mine))
        return scanned

    async def run(self) -> None:
        await self._recover()
        failures = 0
        while True:
            try:
                moved = await self.step()
                failures = 0
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.healthy = False
                DELIVERY_ERRORS.labels(self.destination).inc()
                delay = min(30.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                log.error(
                    "delivery.failed",
                    destination=self.destination,
                    error=type(exc).__name__,
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                try:
                    await self._recover()
                except Exception as rexc:  # the next loop turn retries both
                    log.error(
                        "delivery.recover_failed", destination=self.destination, error=type(rexc).__name__
                    )
                continue
            if moved < self.batch_size:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), self.poll_seconds)
                # Let more events arrive before the next read: one sink write and one cursor
                # commit then serve many requests instead of one each.
                await asyncio.sleep(self.linger_seconds)


class DeliveryService:
    """Runs the destination workers and the outbox pruning as background tasks."""

    def __init__(
        self,
        outbox: SqliteOutbox,
        workers: Sequence[DeliveryWorker],
        prune_seconds: float = 30,
        checkpoint_seconds: float = 1,
    ) -> None:
        self.outbox = outbox
        self.workers = list(workers)
        self.prune_seconds = prune_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self._tasks: list[asyncio.Task[None]] = []

    def notify(self) -> None:
        for w in self.workers:
            w.wakeup.set()

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
        for w in self.workers:
            self._tasks.append(asyncio.create_task(w.run(), name=f"deliver-{w.destination}"))
        self._tasks.append(asyncio.create_task(self._prune_loop(), name="outbox-prune"))
        self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="outbox-checkpoint"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for w in self.workers:
            await w.sink.close()
