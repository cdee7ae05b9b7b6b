"""Identity resolution for the pipeline: the graph of each tenant, kept in step with the log.

``GraphResolver`` answers most batches from memory: when every identifier is known and
nothing new needs linking, the unified ID is read from the graph. Otherwise the batch
joins a group that is resolved under the log's lock: catch up with what other replicas
appended, let the graph decide (rules, circuit breaker), append the changes, commit. All
graph mutations happen on the event-loop thread between awaits, so readers never see a
half-applied change; only database I/O runs on the store's thread.

Merges and splits are reported through ``on_changes`` (the gateway turns them into
notices for downstream destinations).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import msgspec
import sqlalchemy as sa
import structlog

from identity.graph import (
    EdgeRefused,
    EdgeRemoved,
    GraphChange,
    IdentityGraph,
    IdentityRules,
    Merged,
    NodeRemoved,
    Provenance,
    Quarantined,
    Split,
)
from identity.identifiers import DEVICE_TYPES, Identifier, node_type, node_value
from identity.redaction import (
    ERASED_MARK,
    RedactionPlan,
    count_expiring_aliases,
    history,
    merged_before,
    names_any,
    names_unknown_tombstone,
    plan_alias_expiry,
    plan_redaction,
)
from identity.store import IdentityLogStore, LogRow

log = structlog.get_logger(__name__)
T = TypeVar("T")

OnChanges = Callable[[str, Sequence[GraphChange]], Awaitable[None]]
# (tenant, changes this replica decided and committed, the tenant's graph after them):
# every change once, on the replica that made it, never for a replay (health metrics)
OnCommitted = Callable[[str, Sequence[GraphChange], IdentityGraph], None]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GraphChange).decode


# What was decided under the log's lock: per tenant, the changes, and the list collecting
# their merges and splits for the caller (None: they go to on_changes).
Decided = list[tuple[str, list[GraphChange], list[GraphChange] | None]]


_NO_GUARD: frozenset[str] = frozenset()
_EXPIRY_TRIES = 3  # alias expiries planned without the log's lock before one planned under it


class _PlanStale(Exception):
    """A rewrite planned without the log's lock no longer fits the log (nothing written)."""


class _Pending:
    __slots__ = ("tenant", "items", "future", "notices")

    def __init__(
        self,
        tenant: str,
        items: list[tuple[list[str], bool, Provenance, frozenset[str]]],
        future: asyncio.Future[Any],
        notices: list[GraphChange] | None = None,
    ):
        self.tenant = tenant
        self.items = items
        self.future = future
        self.notices = notices


class GraphResolver:
    links = True

    def __init__(
        self,
        store: IdentityLogStore,
        rules: Mapping[str, IdentityRules],
        *,
        on_changes: OnChanges | None = None,
        follow_seconds: float = 1.0,
        node_ids: Mapping[str, Callable[[str], str]] | None = None,
    ) -> None:
        self.store = store
        self.rules = rules
        self.node_ids = node_ids or {}
        self.graphs = self._fresh_graphs()
        # Links the rules refused or quarantined: not proposed again until a merge or split.
        self._settled: dict[str, set[frozenset[str]]] = {t: set() for t in rules}
        self.on_changes = on_changes
        self.on_committed: OnCommitted | None = None
        self.follow_seconds = follow_seconds
        self.applied_seq = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-log")
        self._pending: list[_Pending] = []
        self._flushing = False
        self._write_lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        self._rebuilding: asyncio.Task[None] | None = None
        self._rewrites = 0  # log rewrites this process committed (a rebuild checks it did not miss one)
        self._priority = {t: {name: i for i, name in enumerate(r.priority)} for t, r in rules.items()}

    def graph(self, tenant: str) -> IdentityGraph | None:
        return self.graphs.get(tenant)

    def _fresh_graphs(self) -> dict[str, IdentityGraph]:
        return {t: IdentityGraph(r, node_id=self.node_ids.get(t)) for t, r in self.rules.items()}

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------
    def _apply_rows(self, rows: Sequence[LogRow], *, check: bool = True) -> bool:
        """Apply rows after ``applied_seq``; False (and nothing more applied) at a record
        that names a tombstone this graph does not hold: a redaction (identity.redaction)
        rewrote records this replica had not read yet, so it must replay the log again."""
        self.applied_seq, complete = self._apply_to(self.graphs, rows, self.applied_seq, check=check)
        return complete

    def _apply_to(
        self, graphs: Mapping[str, IdentityGraph], rows: Sequence[LogRow], after: int, *, check: bool = True
    ) -> tuple[int, bool]:
        """Apply to ``graphs`` the rows after seq ``after``; the last seq applied, and False
        when it stopped at a record naming a tombstone the graph does not hold."""
        for seq, tenant, raw in rows:
            if seq <= after:  # already in the graph (our own append, read again)
                continue
            graph = graphs.get(tenant)
            if graph is not None:
                change = _decode(raw)
                if check and ERASED_MARK in raw and names_unknown_tombstone(graph, change):
                    return after, False
                graph.apply(change)
                if isinstance(change, Merged | Split | EdgeRemoved | NodeRemoved):
                    self._settled[tenant].clear()
            after = seq
        return after, True

    async def _catch_up_with(self, conn: sa.Connection | None = None) -> list[LogRow]:
        """Read and apply what others appended (with ``conn``: inside its transaction);
        replay the whole log again (once: read in one statement, it is consistent) after a
        redaction rewrote records not read yet."""
        rows = await self._io(self.store.read_after, self.applied_seq, 10_000_000, conn)
        if self._apply_rows(rows):
            return rows
        log.info("identity.log_redacted_replaying")
        return await self._replay_all(conn)

    async def _replay_all(self, conn: sa.Connection | None = None) -> list[LogRow]:
        """Rebuild every graph from the whole log (with ``conn``: inside its transaction),
        off the event loop, and swap them in at once: readers keep the old graphs until
        then. The caller holds the write lock."""
        rows = await self._io(self.store.read_after, 0, 10_000_000, conn)
        self._swap_in(await self._io(self._replayed, rows), rows[-1][0] if rows else 0)
        return rows

    def _swap_in(self, graphs: dict[str, IdentityGraph], applied_seq: int) -> None:
        """Replace every graph with ``graphs`` (the log's replay up to ``applied_seq``)."""
        self.graphs, self.applied_seq = graphs, applied_seq
        for settled in self._settled.values():
            settled.clear()

    async def catch_up(self) -> int:
        """Apply what was appended since the last look (other replicas' changes). Holds the
        write lock, so it never interleaves with this process's own appends."""
        applied = 0
        async with self._write_lock:
            while True:
                rows = await self._catch_up_with()
                if not rows:
                    return applied
                applied += len(rows)

    async def flush(self) -> None:
        """Wait until every change decided so far is in the log."""
        async with self._write_lock:
            pass

    async def start(self) -> None:
        started = time.perf_counter()
        loaded = await self.catch_up()
        log.info(
            "identity.loaded",
            changes=loaded,
            seconds=round(time.perf_counter() - started, 2),
            persons={t: g.stats().get("persons", 0) for t, g in self.graphs.items()},
        )
        self._follower = asyncio.create_task(self._follow(), name="identity-follow")

    async def stop(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # derived IDs come back the same when the identifiers are seen again
            log.error("identity.flush_on_stop_failed", error=type(exc).__name__)
        for task in (self._follower, self._rebuilding):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.follow_seconds)
            try:
                await self.catch_up()
            except Exception as exc:  # the next turn tries again
                log.error("identity.follow_failed", error=type(exc).__name__)

    # -- reads -----------------------------------------------------------------------
    def anchor(self, tenant: str, nodes: Sequence[str], guarded: frozenset[str] = _NO_GUARD) -> str:
        order = self._priority[tenant]
        trusted = [n for n in nodes if n not in guarded] if guarded else nodes
        return min(trusted or nodes, key=lambda n: (order.get(node_type(n), len(order)), n))

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]], *, person_level: bool = False
    ) -> list[tuple[str, ...]]:
        """Pseudonyms of the other identifiers each event's person already has (for consent:
        a withdrawal or a flag recorded on a person-level identifier counts for the whole
        person)."""
        graph = self.graphs.get(tenant)
        if graph is None:
            return [()] * len(identifier_sets)
        out = []
        for ids in identifier_sets:
            own = {i.node for i in ids}
            linked: set[str] = set()
            for node in own:
                if graph.has_links(node):
                    linked.update(graph.component(node))
            if person_level:
                out.append(tuple(node_value(n) for n in linked - own if node_type(n) not in DEVICE_TYPES))
            else:
                out.append(tuple(node_value(n) for n in linked - own) if linked else ())
        return out

    def _fast_answer(
        self, tenant: str, nodes: list[str], link: bool, guarded: frozenset[str] = _NO_GUARD
    ) -> str | None:
        """Answer without the log's lock when nothing needs linking. An identifier that was
        never linked is not even stored: its unified ID is derived from it (a keyed PRF), the
        same on every replica, and it enters the graph and the log the day it is linked.
        None when the event proposes a link between persons."""
        graph = self.graphs[tenant]
        ids = {graph.unified_id(n) for n in nodes}
        proposes_link = link and len(nodes) > 1 and (None in ids or len(ids) > 1)
        if proposes_link and (None in ids or frozenset(nodes) not in self._settled[tenant]):
            return None
        anchor = self.anchor(tenant, nodes, guarded)
        uid = graph.unified_id(anchor)
        if uid is None:
            derive = self.node_ids.get(tenant)
            if derive is None:
                return None  # without derived IDs a new identifier needs the lock
            uid = derive(anchor)
        return uid

    # -- resolution ------------------------------------------------------------------
    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
        notices: list[GraphChange] | None = None,
        guarded: Sequence[frozenset[str]] | None = None,
    ) -> list[str | None]:
        graph = self.graphs.get(tenant)
        if graph is None:  # identity resolution is off for this tenant
            return [None] * len(identifier_sets)
        if len(linking_allowed) != len(identifier_sets):
            raise ValueError("one linking_allowed per identifier set")
        slow: list[tuple[int, list[str], Provenance, frozenset[str]]] = []
        now = datetime.now(UTC)
        # the common case: every identifier known, one person (nothing to link)
        results = graph.common_unified_ids(identifier_sets)
        for i, known in enumerate(results):
            if known is not None:
                continue
            nodes = [x.node for x in identifier_sets[i]]
            if not nodes:
                continue
            link = linking_allowed[i]
            guard = guarded[i] if guarded else _NO_GUARD
            known = self._fast_answer(tenant, nodes, link, guard)
            if known is None:
                source, event_id = provenance[i] if provenance else ("", "")
                prov = Provenance(source=source, event_id=event_id, at=now, rule="event")
                slow.append((i, nodes, prov, guard))
            else:
                results[i] = known
        if not slow:
            return results
        items = [(nodes, linking_allowed[i], prov, guard) for i, nodes, prov, guard in slow]
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(tenant, items, future, notices))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        for (i, _, _, _), uid in zip(slow, await future, strict=True):
            results[i] = uid
        return results

    async def _locked(self, decide: Callable[[], Decided]) -> None:
        """Catch up and decide under the log's lock, append what was decided, commit, then
        hand the merges and splits on: to the list a caller gave to collect them, else to
        ``on_changes``.

        ``decide`` may also return changes already in the graph (identifiers added on the
        fast path): the lock only orders them in the log, and replaying a known node does
        nothing."""
        async with self._write_lock:
            conn, tx = await self._io(self.store.begin_locked)
            try:
                await self._catch_up_with(conn)
                decided = decide()
                now_ms = int(time.time() * 1000)
                encoded = [
                    (tenant, type(c).__name__, _encode(c), now_ms)
                    for tenant, changes, _ in decided
                    for c in changes
                ]
            except BaseException:
                await self._io(self.store.abandon, conn, tx)
                raise
            try:
                self.applied_seq = await self._io(self.store.insert_and_commit, conn, tx, encoded)
            except BaseException:
                # the graph holds changes the log does not: rebuild it from the log (the
                # write lock is held: catch_up, which takes it, would wait for ever)
                log.error("identity.commit_failed_rebuilding")
                await self._replay_all()
                raise
        if self.on_committed is not None:
            for tenant, changes, _ in decided:
                if changes:
                    self.on_committed(tenant, changes, self.graphs[tenant])
        for tenant, changes, collect in decided:
            notable = [c for c in changes if isinstance(c, Merged | Split)]
            if not notable:
                continue
            if collect is not None:  # the caller sends these after its own events
                collect.extend(notable)
            elif self.on_changes is not None:
                await self.on_changes(tenant, notable)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                answers: list[list[str]] = []

                decide = partial(self._resolve_pending, batch, answers)

                try:
                    await self._locked(decide)
                except Exception as exc:
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, uids in zip(batch, answers, strict=True):
                    if not p.future.done():
                        p.future.set_result(uids)
        finally:
            self._flushing = False

    def _resolve_pending(self, batch: list[_Pending], answers: list[list[str]]) -> Decided:
        decided: Decided = []
        answers.clear()
        for p in batch:
            graph = self.graphs[p.tenant]
            uids = []
            for nodes, link, prov, guard in p.items:
                uid, changes = graph.resolve(nodes, link=link, provenance=prov, guarded=guard)
                uids.append(uid)
                decided.append((p.tenant, changes, p.notices))
                if any(isinstance(c, Merged | Split) for c in changes):
                    self._settled[p.tenant].clear()
                elif link and any(isinstance(c, EdgeRefused | Quarantined) for c in changes):
                    settled = self._settled[p.tenant]
                    if len(settled) > 100_000:
                        settled.clear()
                    settled.add(frozenset(nodes))
            answers.append(uids)
        return decided

    # -- operator actions ------------------------------------------------------------
    async def unlink(self, tenant: str, a: str, b: str) -> list[GraphChange]:
        out: list[GraphChange] = []

        def decide() -> Decided:
            out[:] = self.graphs[tenant].unlink(a, b, at=datetime.now(UTC))
            return [(tenant, list(out), None)]

        await self._locked(decide)
        return out

    async def review(self, tenant: str, a: str, b: str, *, approve: bool, officer: str) -> list[GraphChange]:
        """An officer's decision on a quarantined link (``IdentityGraph.review``), in the
        log like any change; a resulting merge goes downstream like an event's."""
        out: list[GraphChange] = []

        def decide() -> Decided:
            out[:] = self.graphs[tenant].review(a, b, approve=approve, officer=officer, at=datetime.now(UTC))
            return [(tenant, list(out), None)]

        await self._locked(decide)
        return out

    def unified_id(self, tenant: str, node: str) -> str:
        """The node's unified ID: its person's, or the derived one of a never-linked node."""
        uid = self.graphs[tenant].unified_id(node)
        if uid is not None:
            return uid
        derive = self.node_ids.get(tenant)
        return derive(node) if derive is not None else node

    async def rekey(self, tenant: str, moves: Sequence[tuple[str, str]]) -> list[GraphChange]:
        """Key rotation: move each (old node, new node) to the new key version's pseudonym
        (``IdentityGraph.rekey``), in the log like any change; returns the changes made."""
        out: list[GraphChange] = []
        derive = self.node_ids.get(tenant)

        def decide() -> Decided:
            graph = self.graphs[tenant]
            now = datetime.now(UTC)
            out.clear()
            for old, new in moves:
                uid = derive(old) if derive is not None else new
                out.extend(graph.rekey(old, new, unified_id=uid, at=now))
            return [(tenant, list(out), None)]

        await self._locked(decide)
        return out

    async def remove(
        self, tenant: str, node: str, collect: list[GraphChange] | None = None
    ) -> list[GraphChange]:
        """Erase a node; its person's splits go to ``collect`` when given (the caller
        decides which to announce), else to ``on_changes``."""
        out: list[GraphChange] = []

        def decide() -> Decided:
            out[:] = self.graphs[tenant].remove(node, at=datetime.now(UTC))
            return [(tenant, list(out), collect)]

        await self._locked(decide)
        return out

    async def redact(self, tenant: str, nodes: Sequence[str]) -> RedactionPlan:
        """Rename the erased ``nodes`` and their person's unified IDs in the tenant's past
        log records to tombstones (``identity.redaction``), in one transaction under the
        log's lock. Only the person's history is read (``identity.redaction.history``:
        the database finds the records that name their strings), never the whole log.

        This replica's graph no longer holds the erased identifiers (their removal came
        first) but still holds the person's old unified IDs among its aliases: it is
        replaced by a replay of the rewritten log in the background (``rebuilt``), and
        answers as before meanwhile. Other replicas replay the log when they read a record
        naming a tombstone they do not hold, or at their next start."""
        plan = await self._rewrite_log(
            tenant,
            lambda conn: history(partial(self.store.naming, conn, tenant), nodes),
            lambda records, rules, node_id: plan_redaction(records, nodes, rules, node_id),
            swap=False,
        )
        if plan.updates:
            self._rebuild_soon()
        return plan

    async def _rewrite_log(
        self,
        tenant: str,
        read: Callable[[sa.Connection], list[tuple[int, bytes]]],
        plan_for: Callable[..., RedactionPlan],
        *,
        swap: bool,
    ) -> RedactionPlan:
        """Under the log's lock: catch up, ``read(conn)`` the tenant's records to rewrite,
        plan the rewrite with ``plan_for(records, rules, node_id)`` (off the loop), and
        write it in the same transaction; with ``swap``, the plan's graph (the replay of
        the rewritten records: the whole log) replaces the tenant's graph."""
        async with self._write_lock:
            conn, tx = await self._io(self.store.begin_locked)
            try:
                await self._catch_up_with(conn)
                records = await self._io(read, conn)
                plan = await self._io(plan_for, records, self.rules.get(tenant), self.node_ids.get(tenant))
            except BaseException:
                await self._io(self.store.abandon, conn, tx)
                raise
            await self._io(self.store.rewrite_and_commit, conn, tx, plan.updates)
            if plan.updates:
                self._rewrites += 1
            if swap and plan.graph is not None and tenant in self.graphs:
                self.graphs[tenant] = plan.graph
                self._settled[tenant].clear()
        return plan

    def _rebuild_soon(self) -> None:
        """Replay the whole log again in the background (after a redaction), unless a
        rebuild is already under way: it sees the rewrite and reads the log again."""
        if self._rebuilding is None or self._rebuilding.done():
            loop = asyncio.get_running_loop()
            self._rebuilding = loop.create_task(self._rebuild(), name="identity-rebuild")

    async def _rebuild(self) -> None:
        """Read and replay the whole log on a thread of its own, without the write lock
        (appends go on meanwhile), then under the lock apply what was appended since and
        swap the graphs in at once. A rewrite in between (``_rewrites`` moved) reads the
        log again; one by another process (a record naming an unknown tombstone) replays
        it under the lock."""
        try:
            while True:
                rewrites = self._rewrites
                rows = await asyncio.to_thread(self.store.read_after, 0, 10_000_000)
                graphs = await asyncio.to_thread(self._replayed, rows)
                read = rows[-1][0] if rows else 0
                async with self._write_lock:
                    if self._rewrites != rewrites:
                        continue
                    newer = await self._io(self.store.read_after, read, 10_000_000)
                    upto, complete = self._apply_to(graphs, newer, read)
                    if not complete:
                        await self._replay_all()
                        return
                    self._swap_in(graphs, upto)
                    log.info("identity.rebuilt", changes=upto)
                    return
        except Exception as exc:  # the graph stays as it was; the next start replays the log
            log.error("identity.rebuild_failed", error=type(exc).__name__)

    async def rebuilt(self) -> None:
        """Wait until a background rebuild (after a redaction) has swapped its graphs in."""
        while self._rebuilding is not None and not self._rebuilding.done():
            await asyncio.shield(self._rebuilding)

    async def expire_aliases(self, tenant: str, before: datetime, *, apply: bool = True) -> int:
        """Retention of aliases: the unified IDs merged into another person before
        ``before`` (and no person's current ID) are renamed to tombstones in the tenant's
        log records (``identity.redaction.plan_alias_expiry``); this replica's graph then
        becomes the replay of the rewritten log. Returns how many expired (``apply``
        False: how many would, nothing written).

        A cheap read of the tenant's merges comes first: when none is old enough, nothing
        is written, and a graph still holding aliases the log no longer names (another
        replica expired them) is replayed again from the log. Otherwise the rewrite is
        planned on a read of the log without the log's lock (links go on meanwhile) and
        written under it only if the records it rewrites are unchanged and nothing
        appended since names an expiring alias; else planned again, and after a third
        try under the lock. The graph is replayed again off the lock too."""
        if tenant not in self.rules:
            return 0
        applied = self.applied_seq
        merges = await asyncio.to_thread(self.store.tenant_changes, None, tenant, Merged.__name__)
        changes = [_decode(raw) for _, raw in merges]
        if not merged_before(changes, before):
            if self.applied_seq == applied:  # else the graph may hold merges newer than the read
                await self._reload_if_renamed(tenant, changes)
            return 0
        rules, node_id = self.rules.get(tenant), self.node_ids.get(tenant)
        if not apply:
            rows = await asyncio.to_thread(self.store.tenant_changes, None, tenant)
            return await asyncio.to_thread(count_expiring_aliases, rows, before, rules)
        for _ in range(_EXPIRY_TRIES):
            rows = await asyncio.to_thread(self.store.tenant_changes, None, tenant)
            plan = await asyncio.to_thread(plan_alias_expiry, rows, before, rules, node_id)
            if not plan.updates or await self._commit_planned(tenant, rows, plan):
                break
            log.info("identity.alias_expiry_replanned", tenant=tenant)
        else:
            plan = await self._rewrite_log(
                tenant,
                lambda conn: self.store.tenant_changes(conn, tenant),
                lambda records, rules, node_id: plan_alias_expiry(records, before, rules, node_id),
                swap=True,
            )
            return plan.aliases
        if plan.updates:
            self._rebuild_soon()
            await self.rebuilt()
        return plan.aliases

    async def _commit_planned(
        self, tenant: str, rows: Sequence[tuple[int, bytes]], plan: RedactionPlan
    ) -> bool:
        """Under the log's lock, write a rewrite planned on ``rows`` (the tenant's records
        read without the lock) if it still holds: every record it rewrites is as read, and
        no record appended since names a string it renames. False: nothing written."""
        read = dict(rows)
        last = rows[-1][0] if rows else 0

        def still_holds(conn: sa.Connection) -> list[tuple[int, bytes]]:
            now = self.store.changes_at(conn, [seq for seq, _ in plan.updates])
            moved = any(now.get(seq) != read[seq] for seq, _ in plan.updates)
            if moved or names_any(self.store.tenant_changes(conn, tenant, None, last), plan.renamed):
                raise _PlanStale
            return []

        try:
            await self._rewrite_log(tenant, still_holds, lambda *_: plan, swap=False)
        except _PlanStale:
            return False
        return True

    async def _reload_if_renamed(self, tenant: str, merges: Sequence[GraphChange]) -> None:
        """Another process expired (or redacted) aliases this graph still holds: the log's
        merges no longer name them. Replay the whole log again without the log's lock,
        and swap the graphs in at once (readers keep the old ones meanwhile)."""
        graph = self.graphs.get(tenant)
        named = {m.merged for m in merges if isinstance(m, Merged)}
        if graph is None or all(a in named for a in graph.aliases()):
            return
        self._rebuild_soon()
        await self.rebuilt()
        log.info("identity.aliases_renamed_replayed", tenant=tenant)

    def _replayed(self, rows: Sequence[LogRow]) -> dict[str, IdentityGraph]:
        graphs = self._fresh_graphs()
        for _, tenant, raw in rows:
            if (graph := graphs.get(tenant)) is not None:
                graph.apply(_decode(raw))
        return graphs
