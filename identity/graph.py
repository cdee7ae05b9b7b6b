"""The identity graph of one tenant: identifiers, the links between them, and the persons they form.

Nodes are ``"<type>:<pseudonym>"`` strings; a person is a connected component of accepted links
and carries an opaque unified ID. The graph is a deterministic state machine: ``resolve``,
``unlink`` and ``remove`` decide (rules, circuit breaker, new IDs) and return the changes they
made as ``GraphChange`` records; ``apply`` replays such records without deciding anything, so a
log of them rebuilds the same state on every replica. ``resolve`` and friends mutate the graph
through ``apply`` themselves, which is what keeps the two paths identical.

Rules against over-merging (design section 6), checked for every link that would join two persons:

1. circuit breaker: every identifier remembers the other persons it was proposed to join,
   whatever the outcome (merged, refused, held), each person once and each event once. One
   that already has ``breaker_max_merges`` of them within ``breaker_window_seconds`` (a
   shared shop tablet, a hard-coded QA id) is held: ``Quarantined("breaker:<node>")``.
   Refusals count because a shared device is usually stopped by a limit (a second user_id)
   after its first person; checked first, so it is held for review instead of refused one
   shopper at a time;
2. per-type maxima: ``EdgeRefused("limit:<type>")``;
3. component bound: ``Quarantined("component_too_large")``.

Memory: per identifier one small ``_Node`` (creation number, neighbours, recent joins) plus
its union-find entries; links are kept only as neighbours inside their component and one
provenance per link. networkx graphs are built for a single component at a time (unlink,
erasure, explain), never for the whole tenant.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from itertools import pairwise
from typing import Final, cast

import msgspec
import networkx as nx
from networkx.utils import UnionFind

from identity.identifiers import is_node, node_type

DEVICE_LIKE_LIMIT: Final = 10
DEFAULT_MAX_PER_TYPE: Final[dict[str, int]] = {
    "user_id": 1,
    "phone": 1,
    "wechat_unionid": 1,
    "email": 3,
    "oaid": DEVICE_LIKE_LIMIT,
    "idfv": DEVICE_LIKE_LIMIT,
    "idfa": DEVICE_LIKE_LIMIT,
    "android_id": DEVICE_LIKE_LIMIT,
    "device_id": DEVICE_LIKE_LIMIT,
    "anonymous_id": DEVICE_LIKE_LIMIT,
}
DEFAULT_PRIORITY: Final[tuple[str, ...]] = (
    "user_id",
    "wechat_unionid",
    "phone",
    "email",
    "wechat_openid",
    "idfv",
    "oaid",
    "idfa",
    "android_id",
    "device_id",
    "anonymous_id",
)


def _default_max_per_type() -> dict[str, int]:
    return dict(DEFAULT_MAX_PER_TYPE)


def new_unified_id() -> str:
    """A fresh opaque unified ID; random, so it reveals nothing about the identifiers."""
    return "p_" + secrets.token_hex(10)


# Provenance.rule of a link a client source proposed for an identifier it did not prove.
UNVERIFIED: Final = "unverified"


class Provenance(msgspec.Struct, frozen=True, gc=False):
    """Where a link (or a refused or quarantined proposal) came from."""

    source: str
    event_id: str
    at: datetime
    rule: str


class IdentityRules(msgspec.Struct, frozen=True):
    """The over-merging rules of one tenant."""

    # Types not listed (wechat_openid, unknown types) allow DEVICE_LIKE_LIMIT per person.
    max_per_type: dict[str, int] = msgspec.field(default_factory=_default_max_per_type)
    # Anchor choice: the first type in this order; unknown types come after all of these.
    priority: tuple[str, ...] = DEFAULT_PRIORITY
    max_component: int = 50
    # An identifier already proposed to join this many other persons within the window
    # (each person once, each event once) is quarantined on its next proposal.
    breaker_max_merges: int = 5
    breaker_window_seconds: int = 3600

    def limit(self, id_type: str) -> int:
        return self.max_per_type.get(id_type, DEVICE_LIKE_LIMIT)


# -- changes -------------------------------------------------------------------------------------------


class _Change(msgspec.Struct, frozen=True, tag_field="kind", tag=True):
    """Base of the change records; the tag is the class name."""


class NodeAdded(_Change, frozen=True):
    node: str
    unified_id: str
    at: datetime


class _Link(_Change, frozen=True):
    """A link between two nodes, as proposed by an event: its time is the event's."""

    a: str
    b: str

    @property
    def at(self) -> datetime:
        return self.provenance.at  # type: ignore[attr-defined,no-any-return]


class EdgeAdded(_Link, frozen=True):
    """An accepted link, inside one person or joining two (then a Merged follows)."""

    provenance: Provenance


class Merged(_Change, frozen=True):
    """Two persons became one: ``survivor`` (the older: its ID went downstream first) keeps
    its ID, ``merged`` becomes its alias."""

    survivor: str
    merged: str
    at: datetime


class EdgeRefused(_Link, frozen=True):
    """A proposed link that would exceed a per-type maximum (reason ``limit:<type>``)."""

    reason: str
    provenance: Provenance


class Quarantined(_Link, frozen=True):
    """A proposed link held for review: ``component_too_large`` or ``breaker:<node>``."""

    reason: str
    provenance: Provenance


class Reviewed(_Change, frozen=True):
    """An officer's decision on a quarantined link (``decision``: ``approved`` or
    ``rejected``): it leaves the review list. An approval is followed by the link, decided
    by the per-type limits (EdgeAdded and Merged, or EdgeRefused); the breaker and the size
    bound, which held it back for a person to look at, do not apply again."""

    a: str
    b: str
    decision: str
    officer: str
    at: datetime


class EdgeRemoved(_Change, frozen=True):
    a: str
    b: str
    at: datetime


class NodeRemoved(_Change, frozen=True):
    node: str
    at: datetime


class Split(_Change, frozen=True):
    """A person fell apart: representative (smallest node) of each part -> its unified ID.

    The part that keeps ``old_unified_id`` is listed with it; entries are ordered by
    representative."""

    old_unified_id: str
    parts: dict[str, str]
    at: datetime


class NodeRekeyed(_Change, frozen=True):
    """Key rotation: the identifier ``old`` (a pseudonym under an older key version) is
    ``new`` (the same raw identifier under the active version), seen together in one event.
    ``new`` takes ``old``'s place, links and person; ``unified_id`` is the person's ID then,
    kept. When ``old`` is not in the graph (never linked, so never stored) ``new`` is added
    with the ID derived from ``old``, the one downstream has seen."""

    old: str
    new: str
    unified_id: str
    at: datetime


GraphChange = (
    NodeAdded
    | EdgeAdded
    | Merged
    | Reviewed
    | EdgeRefused
    | Quarantined
    | EdgeRemoved
    | NodeRemoved
    | Split
    | NodeRekeyed
)


# -- state ---------------------------------------------------------------------------------------------


class _Node(msgspec.Struct, gc=False):
    seq: int  # creation number (NodeAdded order); the oldest node of a part keeps the ID on a split
    adj: tuple[str, ...] = ()  # neighbours; all in the same component, at most max_component - 1
    # recent proposals to join another person, flattened (time, other person's ID, event id)
    # triples, oldest first, at most breaker_max_merges + 1 of them
    joins: tuple[float | str, ...] = ()


class _Person(msgspec.Struct, frozen=True, gc=False):
    uid: str
    seq: int  # creation number of the ID: the older ID survives a merge


def _edge_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class IdentityGraph:
    """The persons of one tenant. Not thread-safe: one writer, readers between changes."""

    def __init__(
        self,
        rules: IdentityRules | None = None,
        *,
        new_id: Callable[[], str] | None = None,
        node_id: Callable[[str], str] | None = None,
    ) -> None:
        self.rules = rules if rules is not None else IdentityRules()
        self._new_id = new_id if new_id is not None else new_unified_id
        # When given, a new node's first unified ID is derived from the node (a keyed PRF of
        # its pseudonym): every replica gives a new identifier the same ID without asking.
        self._node_id = node_id
        self._rank = {t: i for i, t in enumerate(self.rules.priority)}
        self._nodes: dict[str, _Node] = {}
        self._uf = UnionFind()
        self._parents: dict[str, str] = self._uf.parents
        self._weights: dict[str, int] = self._uf.weights
        self._persons: dict[str, _Person] = {}  # union-find root -> person
        self._aliases: dict[str, str] = {}  # merged ID -> the ID it merged into
        self._provenance: dict[tuple[str, str], Provenance] = {}  # one per link, key ordered
        self._quarantine: dict[tuple[str, str], Quarantined] = {}  # first proposal per pair
        self._refused = 0
        self._seq = 0
        # set by an EdgeAdded that joined two persons, consumed by the Merged that follows it
        self._pending_join: tuple[str, _Person, _Person] | None = None
        self._appliers: dict[type, Callable[[GraphChange], None]] = {
            NodeAdded: self._apply_node_added,  # type: ignore[dict-item]
            EdgeAdded: self._apply_edge_added,  # type: ignore[dict-item]
            Merged: self._apply_merged,  # type: ignore[dict-item]
            EdgeRefused: self._apply_edge_refused,  # type: ignore[dict-item]
            Quarantined: self._apply_quarantined,  # type: ignore[dict-item]
            Reviewed: self._apply_reviewed,  # type: ignore[dict-item]
            EdgeRemoved: self._apply_edge_removed,  # type: ignore[dict-item]
            NodeRemoved: self._apply_node_removed,  # type: ignore[dict-item]
            Split: self._apply_split,  # type: ignore[dict-item]
            NodeRekeyed: self._apply_node_rekeyed,  # type: ignore[dict-item]
        }

    # -- reads -------------------------------------------------------------------------------------

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def nodes(self) -> Iterator[str]:
        """Every identifier, in creation order."""
        return iter(self._nodes)

    def edges(self) -> Iterator[tuple[str, str, Provenance]]:
        """Every accepted link (endpoints ordered), with its provenance."""
        return ((a, b, p) for (a, b), p in self._provenance.items())

    def unified_id(self, node: str) -> str | None:
        """The current unified ID of the node's person; None for an unknown node."""
        parents = self._parents
        parent = parents.get(node)
        if parent is None:
            return None
        if parent != node:
            grandparent = parents[parent]
            parent = parent if grandparent == parent else self._uf[node]
        return self._persons[parent].uid

    def resolve_alias(self, unified_id: str) -> str:
        """Follow merges from an ID handed out earlier to the ID its person has now."""
        aliases = self._aliases
        while unified_id in aliases:
            unified_id = aliases[unified_id]
        return unified_id

    def aliases_of(self, unified_id: str) -> list[str]:
        """Every earlier ID merged into ``unified_id`` (a scan: for erasures, which are rare)."""
        return sorted(a for a in self._aliases if self.resolve_alias(a) == unified_id)

    def has_links(self, node: str) -> bool:
        """Whether the node's person has more than this identifier (cheap)."""
        n = self._nodes.get(node)
        return n is not None and bool(n.adj)

    def component(self, node: str) -> frozenset[str]:
        """The identifiers of the node's person; empty for an unknown node."""
        if node not in self._nodes:
            return frozenset()
        return frozenset(self._members(node))

    def explain(self, a: str, b: str) -> list[tuple[str, str, Provenance]] | None:
        """The shortest chain of links joining a to b, each hop with its provenance.

        None when they are not the same person (or unknown); ``[]`` when ``a == b``."""
        if a not in self._nodes or b not in self._nodes or self._find(a) != self._find(b):
            return None
        if a == b:
            return []
        path: list[str] = nx.shortest_path(self._subgraph(self._members(a)), a, b)
        return [(x, y, self._provenance[_edge_key(x, y)]) for x, y in pairwise(path)]

    def quarantine(self) -> list[Quarantined]:
        """Proposals held for review, oldest first; one per pair (its first occurrence)."""
        return list(self._quarantine.values())

    def stats(self) -> dict[str, int]:
        return {
            "nodes": len(self._nodes),
            "edges": len(self._provenance),
            "persons": len(self._persons),
            "aliases": len(self._aliases),
            "quarantined": len(self._quarantine),
            "refused": self._refused,
        }

    def state(self) -> dict[str, object]:
        """The whole replayed state by identifier (for comparing two replays): creation
        order, person (ID and its age), links with provenance, recent joins; the review
        list (each pair under both ends), the aliases and the refusal count."""
        nodes: dict[str, object] = {}
        for node, s in self._nodes.items():
            person = self._persons[self._find(node)]
            links = {other: self._provenance[_edge_key(node, other)] for other in s.adj}
            nodes[node] = {
                "seq": s.seq,
                "uid": person.uid,
                "age": person.seq,
                "links": links,
                "joins": s.joins,
            }
        held: dict[str, dict[str, Quarantined]] = {}
        for (a, b), q in self._quarantine.items():
            held.setdefault(a, {})[b] = q
            held.setdefault(b, {})[a] = q
        return {"nodes": nodes, "quarantine": held, "aliases": dict(self._aliases), "refused": self._refused}

    # -- decisions ---------------------------------------------------------------------------------

    def resolve(
        self,
        nodes: Sequence[str],
        *,
        link: bool,
        provenance: Provenance,
        guarded: frozenset[str] = frozenset(),
    ) -> tuple[str, list[GraphChange]]:
        """Add unknown nodes and, if ``link``, link the rest to the anchor; return the anchor's ID.

        The anchor is the first node by ``rules.priority`` (then by node string), the same
        for every replica and for any order of ``nodes``. Refused or quarantined links leave
        the persons apart; the event still gets the anchor's ID.

        ``guarded`` nodes were asserted by a client without proof (a public write key): never
        the anchor; linked only when no other person holds them (else ``EdgeRefused("owned:
        <type>")``); their proposals are marked ``rule="unverified"`` and count against the
        client's own identifiers' breaker only, so a storm of them cannot lock a person out.
        """
        if not nodes:
            raise ValueError("resolve needs at least one node")
        order = sorted(set(nodes), key=self._priority_key)
        for node in order:
            if not is_node(node):
                raise ValueError("a node is '<type>:<pseudonym>'")
        changes: list[GraphChange] = []
        # New identifiers are born in reverse priority: a visitor's anonymous id is on every
        # event from the first launch, device ids and openids come next, the login that names
        # the person last. So when they first meet in one event, the ID their earlier (never
        # linked) events carried downstream is the oldest and survives the merge.
        for node in sorted(order, key=self._birth_key):
            if node not in self._nodes:
                uid = self._node_id(node) if self._node_id is not None else self._new_id()
                added = NodeAdded(node, uid, provenance.at)
                self._apply_node_added(added)
                changes.append(added)
        trusted = [n for n in order if n not in guarded] if guarded else order
        if not trusted:  # nothing but unproven claims: looked up, never linked
            return self._persons[self._find(order[0])].uid, changes
        anchor = trusted[0]
        if link:
            unverified = None
            for other in order:
                if other == anchor:
                    continue
                if other in guarded:
                    if unverified is None:
                        unverified = msgspec.structs.replace(provenance, rule=UNVERIFIED)
                    if self._owned_elsewhere(other, anchor):
                        refused = EdgeRefused(anchor, other, f"owned:{node_type(other)}", unverified)
                        self._apply_edge_refused(refused)
                        changes.append(refused)
                        continue
                    self._propose(anchor, other, unverified, changes)
                else:
                    self._propose(anchor, other, provenance, changes)
        return self._persons[self._find(anchor)].uid, changes

    def _owned_elsewhere(self, node: str, anchor: str) -> bool:
        """Whether ``node`` belongs to a person other than the anchor's (it has links there)."""
        root = self._find(node)
        return root != self._find(anchor) and bool(self._nodes[node].adj)

    def unlink(self, a: str, b: str, *, at: datetime) -> list[GraphChange]:
        """Remove the link a-b (a wrong bind); the person splits if it was the only path.

        Returns ``[]`` when there is no such link. The part holding the oldest node keeps
        the unified ID, every other part gets a new one (EdgeRemoved, then Split)."""
        if _edge_key(a, b) not in self._provenance:
            return []
        old = self._persons[self._find(a)].uid
        removed = EdgeRemoved(a, b, at)
        self._apply_edge_removed(removed)
        changes: list[GraphChange] = [removed]
        if self._find(a) != self._find(b):
            split = self._split_record(old, [self._members(a), self._members(b)], at)
            self._apply_split(split)
            changes.append(split)
        return changes

    def review(self, a: str, b: str, *, approve: bool, officer: str, at: datetime) -> list[GraphChange]:
        """An officer's decision on the quarantined link a-b (either order).

        Returns ``[]`` when no such link is held. Rejected: it leaves the review list (and
        is not proposed again until a merge or split, like any held link). Approved: it is
        linked as an event would link it, except that the breaker and the size bound are
        not asked again (an officer looked); a per-type limit still refuses it. The link's
        provenance is the held proposal's, with rule ``review``."""
        held = self._quarantine.get(_edge_key(a, b))
        if held is None:
            return []
        decided = Reviewed(held.a, held.b, "approved" if approve else "rejected", officer, at)
        self._apply_reviewed(decided)
        changes: list[GraphChange] = [decided]
        if not approve:
            return changes
        provenance = msgspec.structs.replace(held.provenance, rule="review")
        if self._find(held.a) == self._find(held.b):
            added = EdgeAdded(held.a, held.b, provenance)
            self._apply_edge_added(added)
            changes.append(added)
        else:
            self._join(held.a, held.b, provenance, changes, max_component=None)
        return changes

    def remove(self, node: str, *, at: datetime) -> list[GraphChange]:
        """Erase an identifier: its links, itself, and its pending review items.

        Returns ``[]`` for an unknown node. What is left of its person keeps the unified ID
        if it holds together; if it falls apart, Split as in ``unlink``."""
        state = self._nodes.get(node)
        if state is None:
            return []
        old = self._persons[self._find(node)].uid
        neighbours = state.adj
        changes: list[GraphChange] = []
        for other in neighbours:
            removed = EdgeRemoved(node, other, at)
            self._apply_edge_removed(removed)
            changes.append(removed)
        gone = NodeRemoved(node, at)
        self._apply_node_removed(gone)
        changes.append(gone)
        parts: dict[str, set[str]] = {}
        for other in neighbours:
            root = self._find(other)
            if root not in parts:
                parts[root] = self._members(other)
        if len(parts) > 1:
            split = self._split_record(old, list(parts.values()), at)
            self._apply_split(split)
            changes.append(split)
        return changes

    def rekey(self, old: str, new: str, *, unified_id: str, at: datetime) -> list[GraphChange]:
        """Move an identifier to its pseudonym under a new key version (see NodeRekeyed).

        ``unified_id`` is the ID ``old`` has downstream when it is not in the graph (its
        derived one). Returns ``[]`` when ``new`` is already known (nothing to move)."""
        if new in self._nodes:
            return []
        uid = self.unified_id(old) or unified_id
        change = NodeRekeyed(old, new, uid, at)
        self._apply_node_rekeyed(change)
        return [change]

    def _propose(self, anchor: str, other: str, provenance: Provenance, changes: list[GraphChange]) -> None:
        root_a, root_b = self._find(anchor), self._find(other)
        change: GraphChange
        if root_a == root_b:
            if _edge_key(anchor, other) not in self._provenance:
                change = EdgeAdded(anchor, other, provenance)
                self._apply_edge_added(change)
                changes.append(change)
            return
        rules = self.rules
        now = provenance.at.timestamp()
        sides: tuple[tuple[str, _Person], ...] = (
            (anchor, self._persons[root_b]),
            (other, self._persons[root_a]),
        )
        if provenance.rule == UNVERIFIED:  # only the claiming client's own identifiers answer for it
            sides = sides[:1]
        for node, other_person in sides:
            if self._breaker_tripped(node, other_person.uid, now):
                change = Quarantined(anchor, other, f"breaker:{node}", provenance)
                self._apply_quarantined(change)
                changes.append(change)
                return
        self._join(anchor, other, provenance, changes, max_component=rules.max_component)

    def _join(
        self,
        anchor: str,
        other: str,
        provenance: Provenance,
        changes: list[GraphChange],
        *,
        max_component: int | None,
    ) -> None:
        """Link two persons unless a per-type limit refuses it, or (``max_component``) the
        person would grow past the bound (then the link is quarantined)."""
        members_a, members_b = self._members(anchor), self._members(other)
        exceeded = self._exceeded_type(members_a, members_b)
        change: GraphChange
        if exceeded is not None:
            change = EdgeRefused(anchor, other, f"limit:{exceeded}", provenance)
            self._apply_edge_refused(change)
            changes.append(change)
            return
        if max_component is not None and len(members_a) + len(members_b) > max_component:
            change = Quarantined(anchor, other, "component_too_large", provenance)
            self._apply_quarantined(change)
            changes.append(change)
            return
        added = EdgeAdded(anchor, other, provenance)
        self._apply_edge_added(added)
        assert self._pending_join is not None
        _, older, newer = self._pending_join
        merged = Merged(older.uid, newer.uid, provenance.at)
        self._apply_merged(merged)
        changes += (added, merged)

    def _breaker_tripped(self, node: str, other_uid: str, now: float) -> bool:
        """Whether the node already tried to join enough *other* persons within the window."""
        joins = self._nodes[node].joins
        if not joins:
            return False
        since = now - self.rules.breaker_window_seconds
        others = sum(1 for at, uid, _ in _join_entries(joins) if at > since and uid != other_uid)
        return others >= self.rules.breaker_max_merges

    def _exceeded_type(self, *parts: Iterable[str]) -> str | None:
        counts: dict[str, int] = {}
        for part in parts:
            for node in part:
                kind = node_type(node)
                counts[kind] = counts.get(kind, 0) + 1
        limit = self.rules.limit
        for kind in sorted(counts, key=self._type_key):
            if counts[kind] > limit(kind):
                return kind
        return None

    def _split_record(self, old: str, parts: list[set[str]], at: datetime) -> Split:
        nodes = self._nodes
        keeper = min(range(len(parts)), key=lambda i: min(nodes[n].seq for n in parts[i]))
        keeper_rep = min(parts[keeper])
        reps = sorted(min(part) for part in parts)
        return Split(old, {rep: old if rep == keeper_rep else self._new_id() for rep in reps}, at)

    # -- replay ------------------------------------------------------------------------------------

    def apply(self, change: GraphChange) -> None:
        """Replay one recorded change exactly: no rule checks, no new IDs.

        NodeAdded of a known node, EdgeAdded of a known link, a repeated Merged, and the
        removal of an unknown link or node are no-ops, so a re-delivered change is harmless.
        A Merged that follows no joining EdgeAdded, or a Split whose parts do not carry its
        old ID, raises ValueError (the log is not this graph's history)."""
        applier = self._appliers.get(type(change))
        if applier is None:
            raise TypeError(f"not a graph change: {type(change).__name__}")
        applier(change)

    def _apply_node_added(self, change: NodeAdded) -> None:
        node = change.node
        if node in self._nodes:
            return
        self._seq += 1
        seq = self._seq
        self._nodes[node] = _Node(seq)
        self._parents[node] = node
        self._weights[node] = 1
        self._persons[node] = _Person(change.unified_id, seq)

    def _apply_edge_added(self, change: EdgeAdded) -> None:
        a, b = change.a, change.b
        key = _edge_key(a, b)
        if key in self._provenance:
            return
        if a == b:
            raise ValueError("a link needs two different nodes")
        node_a, node_b = self._nodes[a], self._nodes[b]
        root_a, root_b = self._find(a), self._find(b)
        if root_a != root_b:
            self._record_join(a, b, change.provenance)
            person_a, person_b = self._persons.pop(root_a), self._persons.pop(root_b)
            self._uf.union(root_a, root_b)
            older, newer = (person_a, person_b) if person_a.seq < person_b.seq else (person_b, person_a)
            self._persons[self._find(a)] = older
            self._pending_join = (a, older, newer)
        node_a.adj += (b,)
        node_b.adj += (a,)
        self._provenance[key] = change.provenance
        self._quarantine.pop(key, None)

    def _apply_merged(self, change: Merged) -> None:
        pending = self._pending_join
        if pending is None:
            if self._aliases.get(change.merged) == change.survivor:
                return
            raise ValueError("Merged without a joining EdgeAdded before it")
        node, older, newer = pending
        persons = {older.uid: older, newer.uid: newer}
        if change.survivor == change.merged or {change.survivor, change.merged} != persons.keys():
            raise ValueError("Merged does not name the two persons its EdgeAdded joined")
        self._persons[self._find(node)] = persons[change.survivor]
        self._aliases[change.merged] = change.survivor
        self._pending_join = None

    def _apply_edge_refused(self, change: EdgeRefused) -> None:
        self._refused += 1
        self._record_join(change.a, change.b, change.provenance)

    def _apply_quarantined(self, change: Quarantined) -> None:
        self._quarantine.setdefault(_edge_key(change.a, change.b), change)
        self._record_join(change.a, change.b, change.provenance)

    def _apply_reviewed(self, change: Reviewed) -> None:
        self._quarantine.pop(_edge_key(change.a, change.b), None)

    def _apply_edge_removed(self, change: EdgeRemoved) -> None:
        if _edge_key(change.a, change.b) in self._provenance:
            self._drop_edge(change.a, change.b)

    def _apply_node_removed(self, change: NodeRemoved) -> None:
        node = change.node
        state = self._nodes.get(node)
        if state is None:
            return
        for other in state.adj:
            self._drop_edge(node, other)
        # without links the node is alone in its union-find set, its own root
        del self._persons[node], self._parents[node], self._weights[node], self._nodes[node]
        if self._pending_join is not None and self._pending_join[0] == node:
            self._pending_join = None
        # erasure: no pseudonym of this node stays in the review list (a scan; erasures are rare)
        for key in [k for k in self._quarantine if node in k]:
            del self._quarantine[key]

    def _apply_node_rekeyed(self, change: NodeRekeyed) -> None:
        old, new = change.old, change.new
        if new in self._nodes:
            return
        state = self._nodes.get(old)
        if state is None:
            self._apply_node_added(NodeAdded(new, change.unified_id, change.at))
            return
        members = self._members(old)
        person = self._persons.pop(self._find(old))
        for other in state.adj:
            neighbour = self._nodes[other]
            neighbour.adj = tuple(new if n == old else n for n in neighbour.adj)
            self._provenance[_edge_key(new, other)] = self._provenance.pop(_edge_key(old, other))
        del self._nodes[old]
        self._nodes[new] = state
        members.discard(old)
        members.add(new)
        # the component gets fresh union-find entries (as _drop_edge does for a part)
        parents, weights = self._parents, self._weights
        del parents[old], weights[old]
        root = min(members)
        for node in members:
            parents[node] = root
            weights[node] = 1
        weights[root] = len(members)
        self._persons[root] = person
        for key in [k for k in self._quarantine if old in k]:
            held = self._quarantine.pop(key)
            a, b = (new if x == old else x for x in key)
            self._quarantine[_edge_key(a, b)] = msgspec.structs.replace(
                held, a=new if held.a == old else held.a, b=new if held.b == old else held.b
            )
        if self._pending_join is not None and self._pending_join[0] == old:
            self._pending_join = None

    def _apply_split(self, change: Split) -> None:
        old = change.old_unified_id
        roots = [self._find(rep) for rep in change.parts]
        people = [self._persons[root] for root in roots]
        if any(person.uid != old for person in people):
            raise ValueError("a part of the Split does not carry its old unified id")
        for root, uid, person in zip(roots, change.parts.values(), people, strict=True):
            if uid != old:
                self._seq += 1
                person = _Person(uid, self._seq)
            self._persons[root] = person

    # -- internals ---------------------------------------------------------------------------------

    def _priority_key(self, node: str) -> tuple[int, str]:
        return self._rank.get(node_type(node), len(self._rank)), node

    def _birth_key(self, node: str) -> tuple[bool, int, str]:
        rank = self._rank.get(node_type(node))
        return rank is None, -(rank or 0), node

    def _type_key(self, kind: str) -> tuple[int, str]:
        return self._rank.get(kind, len(self._rank)), kind

    def _find(self, node: str) -> str:
        parents = self._parents
        parent = parents[node]
        if parent == node or parents[parent] == parent:
            return parent
        root: str = self._uf[node]
        return root

    def _members(self, node: str) -> set[str]:
        nodes = self._nodes
        if not nodes[node].adj:
            return {node}
        seen = {node}
        stack = [node]
        while stack:
            for other in nodes[stack.pop()].adj:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return seen

    def _subgraph(self, members: Iterable[str]) -> nx.Graph:
        """The networkx graph of one component (sorted, so paths are the same on every replica)."""
        graph = nx.Graph()
        ordered = sorted(members)
        graph.add_nodes_from(ordered)
        graph.add_edges_from((n, m) for n in ordered for m in self._nodes[n].adj if n < m)
        return graph

    def _drop_edge(self, a: str, b: str) -> None:
        """Remove a link; if its person falls apart, every part gets its own union-find set,
        all still under the old person until a Split names them."""
        members = self._members(a)
        del self._provenance[_edge_key(a, b)]
        node_a, node_b = self._nodes[a], self._nodes[b]
        node_a.adj = tuple(n for n in node_a.adj if n != b)
        node_b.adj = tuple(n for n in node_b.adj if n != a)
        parts = list(nx.connected_components(self._subgraph(members)))
        if len(parts) == 1:
            return
        person = self._persons.pop(self._find(a))
        parents, weights = self._parents, self._weights
        for part in parts:
            root = min(part)
            for node in part:
                parents[node] = root
                weights[node] = 1
            weights[root] = len(part)
            self._persons[root] = person

    def _record_join(self, a: str, b: str, provenance: Provenance) -> None:
        """Count a proposal joining two persons against both identifiers' breaker history."""
        if a not in self._nodes or b not in self._nodes:
            return
        root_a, root_b = self._find(a), self._find(b)
        if root_a == root_b:
            return
        now = provenance.at.timestamp()
        uid_a, uid_b = self._persons[root_a].uid, self._persons[root_b].uid
        self._remember_join(a, now, uid_b, provenance.event_id)
        if provenance.rule != UNVERIFIED:  # an unproven claim never counts against the claimed
            self._remember_join(b, now, uid_a, provenance.event_id)

    def _remember_join(self, node: str, now: float, other_uid: str, event_id: str) -> None:
        state = self._nodes[node]
        if not state.joins:
            state.joins = (now, other_uid, event_id)
            return
        entries = _join_entries(state.joins)
        # one event is one occasion, however many new identifiers it brings
        if any(at == now and event == event_id for at, _, event in entries):
            return
        # one person counts once: keep its latest proposal only
        entries = [e for e in entries if e[1] != other_uid]
        entries.append((now, other_uid, event_id))
        entries.sort(key=lambda e: e[0])
        # enough to tell whether breaker_max_merges persons other than the next one are in the window
        keep = max(self.rules.breaker_max_merges, 0) + 1
        state.joins = tuple(x for e in entries[-keep:] for x in e)


def _join_entries(joins: tuple[float | str, ...]) -> list[tuple[float, str, str]]:
    return [
        (cast(float, joins[i]), cast(str, joins[i + 1]), cast(str, joins[i + 2]))
        for i in range(0, len(joins), 3)
    ]
