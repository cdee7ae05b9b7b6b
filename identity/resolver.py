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
import structlog

from identity.graph import GraphChange, IdentityGraph, IdentityRules, Provenance
from identity.identifiers import Identifier
from identity.store import IdentityLogStore, LogRow

log = structlog.get_logger(__name__)
T = TypeVar("T")

OnChanges = Callable[[str, Sequence[GraphChange]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GraphChange).decode


def node_of(ident: Identifier) -> str:
    return f"{ident.type}:{ident.value}"


def pseudonym_of(node: str) -> str:
    return node.rsplit(":", 1)[-1]


class _Pending:
    __slots__ = ("tenant", "items", "future")

    def __init__(
        self, tenant: str, items: list[tuple[list[str], bool, Provenance]], future: asyncio.Future[Any]
    ):
        self.tenant = tenant
        self.items = items
        self.future = future


class GraphResolver:
    links = True

    def __init__(
        self,
        store: IdentityLogStore,
        rules: Mapping[str, IdentityRules],
        *,
        on_changes: OnChanges | None = None,
        follow_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.rules = rules
        self.graphs = {tenant: IdentityGraph(r) for tenant, r in rules.items()}
        self.on_changes = on_changes
        self.follow_seconds = follow_seconds
        self.applied_seq = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-log")
        self._pending: list[_Pending] = []
        self._flushing = False
        self._write_lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        self._priority = {t: {name: i for i, name in enumerate(r.priority)} for t, r in rules.items()}

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------------
    def _apply_rows(self, rows: Sequence[LogRow]) -> None:
        for seq, tenant, raw in rows:
            graph = self.graphs.get(tenant)
            if graph is not None:
                graph.apply(_decode(raw))
            self.applied_seq = seq

    async def catch_up(self) -> int:
        """Apply what was appended since the last look (other replicas' changes)."""
        applied = 0
        while True:
            rows = await self._io(self.store.read_after, self.applied_seq)
            if not rows:
                return applied
            self._apply_rows(rows)
            applied += len(rows)

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
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.follow_seconds)
            try:
                await self.catch_up()
            except Exception as exc:  # the next turn tries again
                log.error("identity.follow_failed", error=type(exc).__name__)

    # -- reads -----------------------------------------------------------------------
    def anchor(self, tenant: str, nodes: Sequence[str]) -> str:
        order = self._priority[tenant]
        return min(nodes, key=lambda n: (order.get(n.split(":", 1)[0], len(order)), n))

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]]
    ) -> list[tuple[str, ...]]:
        """Pseudonyms of the other identifiers each event's person already has (for consent:
        a withdrawal anywhere in the person counts)."""
        graph = self.graphs.get(tenant)
        if graph is None:
            return [()] * len(identifier_sets)
        out = []
        for ids in identifier_sets:
            own = {node_of(i) for i in ids}
            linked: set[str] = set()
            for node in own:
                if graph.unified_id(node) is not None:
                    linked.update(graph.component(node))
            out.append(tuple(pseudonym_of(n) for n in linked - own))
        return out

    def _known_answer(self, tenant: str, nodes: list[str], link: bool) -> str | None:
        graph = self.graphs[tenant]
        ids = [graph.unified_id(n) for n in nodes]
        if any(i is None for i in ids):
            return None
        if link and len(set(ids)) > 1:
            return None
        return graph.unified_id(self.anchor(tenant, nodes))

    # -- resolution ------------------------------------------------------------------
    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
    ) -> list[str | None]:
        results: list[str | None] = [None] * len(identifier_sets)
        if tenant not in self.graphs:  # identity resolution is off for this tenant
            return results
        slow: list[int] = []
        for i, (ids, link) in enumerate(zip(identifier_sets, linking_allowed, strict=True)):
            nodes = [node_of(x) for x in ids]
            if not nodes:
                continue
            known = self._known_answer(tenant, nodes, link)
            if known is None:
                slow.append(i)
            else:
                results[i] = known
        if not slow:
            return results
        now = datetime.now(UTC)
        items = []
        for i in slow:
            source, event_id = provenance[i] if provenance else ("", "")
            nodes = [node_of(x) for x in identifier_sets[i]]
            items.append(
                (
                    nodes,
                    linking_allowed[i],
                    Provenance(source=source, event_id=event_id, at=now, rule="event"),
                )
            )
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(tenant, items, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        for i, uid in zip(slow, await future, strict=True):
            results[i] = uid
        return results

    async def _locked(self, decide: Callable[[], list[tuple[str, list[GraphChange]]]]) -> None:
        """Catch up and decide under the log's lock, append what was decided, commit."""
        async with self._write_lock:
            conn, tx = await self._io(self.store.begin_locked)
            try:
                rows = await self._io(self.store.read_after, self.applied_seq, 10_000_000, conn)
                self._apply_rows(rows)
                decided = decide()
                now_ms = int(time.time() * 1000)
                encoded = [
                    (tenant, type(c).__name__, _encode(c), now_ms)
                    for tenant, changes in decided
                    for c in changes
                ]
            except BaseException:
                await self._io(self.store.abandon, conn, tx)
                raise
            try:
                self.applied_seq = await self._io(self.store.insert_and_commit, conn, tx, encoded)
            except BaseException:
                # the graph holds changes the log does not: rebuild it from the log
                log.error("identity.commit_failed_rebuilding")
                self.graphs = {t: IdentityGraph(r) for t, r in self.rules.items()}
                self.applied_seq = 0
                await self.catch_up()
                raise
        if self.on_changes is not None:
            for tenant, changes in decided:
                notable = [c for c in changes if type(c).__name__ in ("Merged", "Split")]
                if notable:
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

    def _resolve_pending(
        self, batch: list[_Pending], answers: list[list[str]]
    ) -> list[tuple[str, list[GraphChange]]]:
        decided = []
        answers.clear()
        for p in batch:
            graph = self.graphs[p.tenant]
            uids = []
            for nodes, link, prov in p.items:
                uid, changes = graph.resolve(nodes, link=link, provenance=prov)
                uids.append(uid)
                decided.append((p.tenant, changes))
            answers.append(uids)
        return decided

    # -- operator actions ------------------------------------------------------------
    async def unlink(self, tenant: str, a: str, b: str) -> list[GraphChange]:
        out: list[GraphChange] = []

        def decide() -> list[tuple[str, list[GraphChange]]]:
            out[:] = self.graphs[tenant].unlink(a, b, at=datetime.now(UTC))
            return [(tenant, list(out))]

        await self._locked(decide)
        return out

    async def remove(self, tenant: str, node: str) -> list[GraphChange]:
        out: list[GraphChange] = []

        def decide() -> list[tuple[str, list[GraphChange]]]:
            out[:] = self.graphs[tenant].remove(node, at=datetime.now(UTC))
            return [(tenant, list(out))]

        await self._locked(decide)
        return out
