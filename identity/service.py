"""Operator and compliance actions on the identity graph, and the notices they cause.

``IdentityService`` is what the admin API and the ingest pipeline call beyond resolution:
explain a link, unlink a wrong bind, detach identifiers (a Sensors ``track_id_unbind``),
erase identifiers (a deletion request), list the quarantine and decide on what it holds.
Every merge, split and deletion it causes becomes a typed notice (identity.notices) handed
to ``publish``, which the gateway wires to the durable outbox. Identifiers come in pseudonymised (as
``Identifier`` values or node strings); raw identifiers never reach this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from identity.graph import (
    EdgeRefused,
    EdgeRemoved,
    GraphChange,
    IdentityGraph,
    Provenance,
    Quarantined,
    Split,
)
from identity.identifiers import Identifier
from identity.notices import Notice, deletion_notice, notices_for_changes
from identity.redaction import RedactionPlan
from identity.resolution import IdentityResolver

# (tenant, notices) -> stored durably for delivery
NoticePublisher = Callable[[str, Sequence[Notice]], Awaitable[None]]


class IdentityResolutionOff(Exception):
    """The tenant has no identity graph (identity resolution is disabled for it)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"identity resolution is off for tenant {tenant!r}")
        self.tenant = tenant


class NotLinked(Exception):
    """There is no direct link between the two identifiers."""


class NotQuarantined(Exception):
    """No link between the two identifiers is held for review."""


@dataclass(frozen=True)
class ReviewOutcome:
    """An officer's decision on a held link: ``linked`` (approved and merged or joined),
    ``refused`` (approved, but a per-type limit refuses it) or ``rejected``."""

    outcome: str
    unified_id: str | None  # the person's ID after a link


@dataclass(frozen=True)
class Hop:
    a: str
    b: str
    provenance: Provenance


@dataclass(frozen=True)
class Explanation:
    a: str
    b: str
    linked: bool
    unified_id: str | None
    path: list[Hop]


@dataclass(frozen=True)
class Unlinked:
    split: bool
    unified_ids: dict[str, str]  # "a" / "b" -> the unified ID each side has now


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: the identifiers it removed from the graph, the ones the graph
    never held (never linked: only their derived unified ID ever went downstream), the
    persons concerned and the deletion notices sent for them."""

    removed: list[str]
    not_in_graph: list[str]
    unified_ids: list[str]
    notices: int
    changes: int = 0
    notice_ids: list[str] = field(default_factory=list)


class IdentityService:
    def __init__(self, resolver: IdentityResolver, publish: NoticePublisher) -> None:
        self.resolver = resolver
        self.publish = publish

    async def on_changes(self, tenant: str, changes: Sequence[GraphChange]) -> None:
        """The resolver's change hook: merges and splits it made on its own (operator
        actions, catch-up) go downstream as notices."""
        notices = notices_for_changes(tenant, changes)
        if notices:
            await self.publish(tenant, notices)

    def graph(self, tenant: str) -> IdentityGraph:
        graph = self.resolver.graph(tenant)
        if graph is None:
            raise IdentityResolutionOff(tenant)
        return graph

    def unified_id(self, tenant: str, node: str) -> str:
        return self.resolver.unified_id(tenant, node)

    def unified_ids(self, tenant: str, nodes: Sequence[str]) -> list[str]:
        """Every unified ID these nodes' persons have had: the current ones and the IDs
        merged into them (what downstream may have received)."""
        current = {self.resolver.unified_id(tenant, n) for n in nodes}
        graph = self.resolver.graph(tenant)
        earlier = {a for uid in current for a in graph.aliases_of(uid)} if graph is not None else set()
        return sorted(current | earlier)

    def person(self, tenant: str, node: str) -> list[str]:
        """Every identifier node of the person ``node`` belongs to (its identity-graph
        component), itself included; only itself when the graph does not hold it or the
        tenant has no graph."""
        graph = self.resolver.graph(tenant)
        if graph is None or node not in graph:
            return [node]
        return sorted(graph.component(node))

    def explain(self, tenant: str, a: str, b: str) -> Explanation:
        graph = self.graph(tenant)
        path = graph.explain(a, b)
        return Explanation(
            a=a,
            b=b,
            linked=path is not None,
            unified_id=graph.unified_id(a) if path is not None else None,
            path=[Hop(x, y, p) for x, y, p in (path or [])],
        )

    def quarantine(self, tenant: str, limit: int) -> list[Quarantined]:
        return self.graph(tenant).quarantine()[-limit:] if limit > 0 else []

    async def unlink(self, tenant: str, a: str, b: str) -> Unlinked:
        """Remove the direct link a-b; the person splits where it was the only path."""
        self.graph(tenant)
        changes = await self.resolver.unlink(tenant, a, b)
        if not changes:
            raise NotLinked()
        return Unlinked(
            split=any(isinstance(c, Split) for c in changes),
            unified_ids={"a": self.unified_id(tenant, a), "b": self.unified_id(tenant, b)},
        )

    async def review(self, tenant: str, a: str, b: str, *, approve: bool, officer: str) -> ReviewOutcome:
        """Approve or reject the quarantined link a-b (``IdentityGraph.review``); an
        approved merge sends its notice downstream. NotQuarantined when none is held."""
        self.graph(tenant)
        changes = await self.resolver.review(tenant, a, b, approve=approve, officer=officer)
        if not changes:
            raise NotQuarantined()
        if not approve:
            return ReviewOutcome("rejected", None)
        if any(isinstance(c, EdgeRefused) for c in changes):
            return ReviewOutcome("refused", None)
        return ReviewOutcome("linked", self.unified_id(tenant, a))

    async def detach(self, tenant: str, identifiers: Sequence[Identifier]) -> int:
        """Remove every direct link of these identifiers (a Sensors ``track_id_unbind``):
        each leaves its person, which splits where those links were the only path. Needs
        no consent: it only ever separates. Returns the number of links removed."""
        graph = self.resolver.graph(tenant)
        if graph is None:
            return 0
        removed = 0
        for ident in identifiers:
            node = ident.node
            for other in sorted(graph.component(node) - {node}):
                path = graph.explain(node, other)
                if path is not None and len(path) == 1:  # a direct link
                    changes = await self.resolver.unlink(tenant, node, other)
                    removed += sum(1 for c in changes if isinstance(c, EdgeRemoved))
        return removed

    async def erase(self, tenant: str, identifiers: Sequence[Identifier]) -> Erasure:
        """Erase identifiers from the graph (the person splits where they held it
        together) and send an ``identity.deleted`` notice per person concerned."""
        graph = self.graph(tenant)
        unique = list(dict.fromkeys(identifiers))
        by_person: dict[str, list[Identifier]] = {}
        for ident in unique:
            by_person.setdefault(self.unified_id(tenant, ident.node), []).append(ident)
        removed: list[str] = []
        missing: list[str] = []
        changes = 0
        # the persons' other identifiers: the parts of a split that outlive the erasure
        others = {n for i in unique if i.node in graph for n in graph.component(i.node)}
        splits: list[GraphChange] = []
        for ident in unique:
            if ident.node in graph:
                changes += len(await self.resolver.remove(tenant, ident.node, splits))
                removed.append(ident.node)
            else:
                missing.append(ident.node)
        # a split is announced only when a part of it is still held: an erased whole
        # person's intermediate splits would name IDs nobody keeps
        kept = {uid for n in others - set(removed) if (uid := graph.unified_id(n)) is not None}
        announced = [c for c in splits if not isinstance(c, Split) or kept & set(c.parts.values())]
        now = datetime.now(UTC)
        notices: list[Notice] = [deletion_notice(tenant, uid, ids, now) for uid, ids in by_person.items()]
        # the splits first: a destination then learns the surviving parts' IDs before the deletion
        await self.publish(tenant, [*notices_for_changes(tenant, announced), *notices])
        return Erasure(
            removed=removed,
            not_in_graph=missing,
            unified_ids=sorted(by_person),
            notices=len(notices),
            changes=changes,
            notice_ids=[n.message_id for n in notices],
        )

    async def redact_log(self, tenant: str, nodes: Sequence[str]) -> RedactionPlan:
        """After ``erase``: the erased identifiers and their person's unified IDs leave the
        past records of the change log (renamed to tombstones, ``identity.redaction``).
        Idempotent: a second call finds nothing to rename."""
        return await self.resolver.redact(tenant, nodes)

    async def expire_aliases(self, tenant: str, before: datetime, *, apply: bool = True) -> int:
        """Retention (PIPL Art. 19): the unified IDs merged into another person before
        ``before`` leave the change log and the graph (renamed to tombstones,
        ``identity.redaction.plan_alias_expiry``), so they no longer resolve. Returns how
        many expired (``apply`` False: how many would; nothing changes). No notice goes
        downstream: the merge notice told destinations long ago which ID the person keeps."""
        return await self.resolver.expire_aliases(tenant, before, apply=apply)
