"""Group commit of ledger appends: many concurrent consent calls, one transaction.

Each append of the ledger is a transaction holding the ledger's lock (one chain across
processes and replicas) and, on SQLite, an fsync: one per consent call capped the writes at
a few hundred per second. ``GroupCommitter`` queues the calls of this process and one writer
appends everything queued in one transaction, chained in queue order; while it commits, the
next calls queue up and become the next group. The state projection, when it lives in the
ledger's database, is written in that same transaction (it commits with the records or not at
all); a projection elsewhere (Redis) is applied once per group after the commit. Each
caller's future resolves only then: an acknowledged call is durable and already decides.

A draft that cannot be a record fails its own caller before it is queued. A transaction that
fails fails every caller of its group (``GroupCommitFailed``: nothing of theirs is recorded,
they may retry) and no other. A projection write that fails for one caller (a savepoint per
caller, tried only after the whole group's write failed) leaves that caller's records
pending: the periodic reconcile applies them from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from consent.ledger import AppendedRecord, AppendRefused, Ledger, Precondition, RecordDraft

log = structlog.get_logger(__name__)

# Records per transaction at most: bounds the time a group holds the ledger's lock.
MAX_GROUP_RECORDS = 2_000

# (connection, seq before the group, each caller's records) -> per caller, whether its
# records' state was written; runs in the append's transaction, in the writer's thread.
WriteInTransaction = Callable[[sa.Connection, int, list[list[AppendedRecord]]], list[bool]]
# After the commit, before any caller is answered: (each caller's records, written in the
# transaction) -> per caller, whether its records' state is now applied.
AfterCommit = Callable[[list[list[AppendedRecord]], list[bool]], Awaitable[list[bool]]]


class GroupCommitFailed(Exception):
    """The transaction of a group of appends failed: none of its callers' records is in the
    ledger (the cause is chained); the call may be retried."""


@dataclass(frozen=True)
class Appended:
    """One caller's records, and whether the state projection already shows them."""

    records: list[AppendedRecord]
    applied: bool


@dataclass
class _Call:
    prepared: list[dict[str, Any]]
    future: asyncio.Future[Appended]
    precondition: Precondition | None = None
    refused: AppendRefused | None = None

    def checked(self) -> Precondition | None:
        """The precondition, remembering its refusal for this caller."""
        precondition = self.precondition
        if precondition is None:
            return None

        def check(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
            try:
                precondition(conn, rows)
            except AppendRefused as exc:
                self.refused = exc
                raise

        return check


class GroupCommitter:
    """Queues this process's ledger appends and commits them in groups (see the module doc)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        in_transaction: WriteInTransaction | None = None,
        after_commit: AfterCommit | None = None,
        max_group_records: int = MAX_GROUP_RECORDS,
    ) -> None:
        self.ledger = ledger
        self.in_transaction = in_transaction
        self.after_commit = after_commit
        self.max_group_records = max_group_records
        self._queue: deque[_Call] = deque()
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self.groups = 0  # committed groups, for the benchmark and the tests
        self.largest_group = 0

    async def append(
        self, drafts: Sequence[RecordDraft], *, precondition: Precondition | None = None
    ) -> Appended:
        """Append the drafts as consecutive records; returns once they are committed.
        ``precondition`` is checked under the ledger's lock just before they are chained
        (``Ledger.append_prepared``); its ``AppendRefused`` is raised here, nothing appended."""
        prepared = self.ledger.prepare(drafts)  # InvalidRecord: this caller only
        if not prepared:
            return Appended([], True)
        loop = asyncio.get_running_loop()
        call = _Call(prepared, loop.create_future(), precondition)
        self._queue.append(call)
        self._ensure_writer()
        assert self._wakeup is not None
        self._wakeup.set()
        # shield: a caller that goes away (client disconnect) does not cancel its group
        return await asyncio.shield(call.future)

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._wakeup = asyncio.Event()
            self._writer = asyncio.create_task(self._write_loop(), name="ledger-group-commit")

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        while self._queue and self._writer is not None and not self._writer.done():
            await asyncio.sleep(0.005)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    def _take_group(self) -> list[_Call]:
        group: list[_Call] = []
        records = 0
        while self._queue and (not group or records + len(self._queue[0].prepared) <= self.max_group_records):
            call = self._queue.popleft()
            group.append(call)
            records += len(call.prepared)
        return group

    async def _write_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            group = self._take_group()
            try:
                await self._commit(group)
            except asyncio.CancelledError:
                for call in group:
                    if not call.future.done():
                        call.future.set_exception(GroupCommitFailed("the ledger writer stopped"))
                raise

    async def _commit(self, group: list[_Call]) -> None:
        written: list[bool] = []

        def in_transaction(conn: sa.Connection, prev_seq: int, records: list[list[AppendedRecord]]) -> None:
            if self.in_transaction is not None:
                written.extend(self.in_transaction(conn, prev_seq, records))

        try:
            per_call = await asyncio.to_thread(
                self.ledger.append_prepared,
                [c.prepared for c in group],
                in_transaction=in_transaction,
                preconditions=[c.checked() for c in group],
            )
        except Exception as exc:
            log.error("ledger.group_commit_failed", calls=len(group), error=type(exc).__name__)
            failure = GroupCommitFailed(
                f"the ledger transaction of {len(group)} grouped consent calls failed "
                f"({type(exc).__name__}); nothing of this call was recorded"
            )
            failure.__cause__ = exc
            for call in group:
                if not call.future.done():
                    call.future.set_exception(failure)
            return
        self.groups += 1
        self.largest_group = max(self.largest_group, len(group))
        applied = written or [False] * len(group)
        if self.after_commit is not None:
            try:
                applied = await self.after_commit(per_call, applied)
            except Exception as exc:  # recorded all the same: the reconcile applies them
                log.error("consent.projection_apply_failed", error=type(exc).__name__, calls=len(group))
        for call, records, ok in zip(group, per_call, applied, strict=True):
            if call.future.done():
                continue
            if call.refused is not None:
                call.future.set_exception(call.refused)
            else:
                call.future.set_result(Appended(records, ok))
