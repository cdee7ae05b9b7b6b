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

Memory (issue 17: at most 250 B per linked identifier at 1M, see bench/identity.py): the
union-find is flat. One dict maps each node's key (a type byte and the pseudonym's bytes) to
the id of its component's root, the same int object for every member, so a lookup is one
index hit and one list slot; a merge relabels the smaller side (components are bounded by
``max_component``). Everything else per node, per link and per alias is in typed arrays
indexed by int ids (a node's id is its creation number); unified IDs other than a person's
current one are packed to 128-bit numbers. networkx graphs are built for a single component
at a time (splits on unlink and erasure, explain), never for the whole tenant.
"""

from __future__ import annotations

import binascii
import secrets
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from itertools import pairwise
from typing import Any, Final, cast

import msgspec
import networkx as nx

from identity.identifiers import Identifier, is_node, node_type

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

_MASK64: Final = (1 << 64) - 1
_NO_ALIAS: Final = 255


# The index key of a node of a known type is one byte for the type, then the pseudonym in
# UTF-8: 8 to 13 bytes smaller than "<type>:" in front. The bytes 0xF5-0xFF never occur in
# UTF-8, so these keys cannot collide with the plain UTF-8 key of a node of any other type.
_TYPE_CODES: Final[dict[str, bytes]] = {
    name: bytes([0xF5 + i])
    for i, name in enumerate(
        (
            "user_id",
            "phone",
            "email",
            "wechat_unionid",
            "wechat_openid",
            "oaid",
            "idfv",
            "idfa",
            "android_id",
            "device_id",
            "anonymous_id",
        )
    )
}
_CODE_TYPES: Final = {code[0]: name + ":" for name, code in _TYPE_CODES.items()}
_TYPE_NAMES: Final = {code[0]: name for name, code in _TYPE_CODES.items()}


def _identifier_key(kind: str, value: str) -> bytes:
    code = _TYPE_CODES.get(kind)
    if code is None:
        return f"{kind}:{value}".encode("utf-8", "surrogatepass")
    return code + value.encode("utf-8", "surrogatepass")


def _key(node: str) -> bytes:
    kind, _, value = node.partition(":")
    code = _TYPE_CODES.get(kind)
    if code is None:
        return node.encode("utf-8", "surrogatepass")
    return code + value.encode("utf-8", "surrogatepass")


def _key_type(key: bytes) -> str:
    name = _TYPE_NAMES.get(key[0])
    return name if name is not None else node_type(_text(key))


def _text(key: bytes) -> str:
    prefix = _CODE_TYPES.get(key[0])
    if prefix is None:
        return key.decode("utf-8", "surrogatepass")
    return prefix + key[1:].decode("utf-8", "surrogatepass")


_TO_STANDARD: Final = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _pack_uid(uid: str, texts: list[str]) -> tuple[int, int]:
    """A unified ID as (kind, 128-bit number): 1 = ``p_`` + 22 base64url characters (derived),
    2 = ``p_`` + 20 hex digits (random); 0 = any other text, kept in ``texts`` (the number is
    its index). Exact: ``_unpack_uid`` gives the same string back."""
    if uid.startswith("p_"):
        body = uid[2:]
        # canonical base64url of 16 bytes: the last character carries 2 bits, the rest zero
        if len(body) == 22 and body[-1] in "AQgw" and "+" not in body and "/" not in body:
            try:
                raw = binascii.a2b_base64(
                    body.encode("ascii").translate(_TO_STANDARD) + b"==", strict_mode=True
                )
            except (binascii.Error, UnicodeEncodeError):
                raw = b""
            if len(raw) == 16:
                return 1, int.from_bytes(raw, "big")
        elif len(body) == 20 and body.isascii():
            try:
                number = int(body, 16)
            except ValueError:
                number = -1
            if number >= 0 and f"{number:020x}" == body:
                return 2, number
    texts.append(uid)
    return 0, len(texts) - 1


def _unpack_uid(kind: int, number: int, texts: list[str]) -> str:
    if kind == 1:
        encoded = binascii.b2a_base64(number.to_bytes(16, "big"), newline=False)[:22]
        return "p_" + encoded.translate(_TO_URLSAFE).decode("ascii")
    if kind == 2:
        return f"p_{number:020x}"
    return texts[number]


def _reserve(columns: Sequence[tuple[array[Any] | list[Any], Any]], size: int) -> None:
    """Grow every column to at least ``size`` slots, doubling: a column that grew one slot at
    a time would be copied hundreds of times, and the blocks it left behind stay in the
    process (the allocator cannot give back holes between live blocks)."""
    have = len(columns[0][0])
    if size <= have:
        return
    target = max(size, 2 * have, 1024)
    for column, fill in columns:
        missing = target - len(column)
        if isinstance(column, array):
            column.extend(array(column.typecode, [fill]) * missing)
        else:
            column.extend([fill] * missing)


class _Person(msgspec.Struct, frozen=True, gc=False):
    uid: str
    seq: int  # creation number of the ID: the older ID survives a merge


def _edge_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class IdentityGraph:
    """The persons of one tenant. Not thread-safe: one writer, readers between changes.

    Compact layout (issue 17): every node has a small int id (its creation number); the one
    dict ``_index`` maps the node's UTF-8 key to the id of its component's root, shared by
    every member, so a lookup is two hits (index, then the root's unified ID) and a merge
    relabels the smaller side (components are small: ``max_component``). Everything else
    per node, per link and per alias lives in typed arrays; unified IDs that are not a
    person's current one (aliases, breaker history) are packed to 128-bit numbers."""

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
        # Stored nodes are never derived again: the uncached function, when it has one.
        self._node_id = getattr(node_id, "__wrapped__", node_id)
        self._rank = {t: i for i, t in enumerate(self.rules.priority)}
        self._index: dict[bytes, int] = {}  # node key -> root id of its component
        # per node id (holes for removed nodes and for creation numbers a Split used)
        self._keys: list[bytes | None] = [None]
        self._head = array("i", [-1])  # first half-link
        self._uid: list[str | None] = [None]  # at a root: the person's unified ID
        self._age = array("i", [0])  # at a root: the person's creation number
        # breaker history: a single entry that came with a link that merged two persons is
        # inline (the link gives its time and event; the other person's ID is that merge's
        # alias i, or ~i for the ID it merged into); any other in _joins_more (flattened triples)
        self._join_link = array("i", [-1])
        self._join_alias = array("i", [0])
        self._joins_more: dict[int, tuple[float | str, ...]] = {}
        self._inline_candidates: list[tuple[int, int]] = []  # (node id, link) until the Merged
        # links: link e has half-links 2e (towards _to[2e]) and 2e+1; removed links stay as holes
        self._to = array("i")
        self._next = array("i")
        self._link_source = array("I")
        self._link_rule = array("I")
        # a removed link keeps its provenance (breaker history may point at it); _to says -1
        self._link_event: list[str | None] = []
        self._link_at: list[datetime | None] = []
        self._names: list[str] = []  # interned sources and rules
        self._name_ids: dict[str, int] = {}
        # aliases, in the order they were made: merged ID (packed) -> the ID it merged into
        self._alias_kind = array("B")  # _NO_ALIAS: room for one
        self._alias_hi = array("Q")
        self._alias_lo = array("Q")
        self._alias_to: list[str | None] = []
        self._aliases = 0
        self._uid_texts: list[str] = []  # unified IDs of no known shape (kind 0)
        self._packed: dict[str, tuple[int, int]] = {}
        self._quarantine: dict[tuple[str, str], Quarantined] = {}  # first proposal per pair
        self._refused = 0
        self._seq = 0
        self._persons = 0
        self._links = 0
        self._link_slots = 0
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
        return isinstance(node, str) and _key(node) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def nodes(self) -> Iterator[str]:
        """Every identifier, in creation order."""
        return (_text(k) for k in self._index)

    def edges(self) -> Iterator[tuple[str, str, Provenance]]:
        """Every accepted link (endpoints ordered), with its provenance."""
        for link in range(self._link_slots):
            if self._to[2 * link] >= 0:
                a, b = self._name_of(self._to[2 * link + 1]), self._name_of(self._to[2 * link])
                yield (*_edge_key(a, b), self._provenance(link))

    def unified_id(self, node: str) -> str | None:
        """The current unified ID of the node's person; None for an unknown node."""
        root = self._index.get(_key(node))
        return None if root is None else self._uid[root]

    def common_unified_ids(self, identifier_sets: Iterable[Iterable[Identifier]]) -> list[str | None]:
        """For each set, the unified ID every one of its identifiers has; None when one is
        unknown or they are not one person (or the set is empty). The hot path of
        resolution: per identifier one index hit and one list slot, the key built straight
        from type and pseudonym (``Identifier.node``, encoded as ``_key`` does)."""
        index, uids, codes = self._index, self._uid, _TYPE_CODES
        out: list[str | None] = []
        for identifiers in identifier_sets:
            common = None
            for identifier in identifiers:
                code = codes.get(identifier.type)
                if code is None:
                    root = index.get(_identifier_key(identifier.type, identifier.value))
                else:
                    try:
                        root = index.get(code + identifier.value.encode())
                    except UnicodeEncodeError:  # a lone surrogate: the key _key makes of it
                        root = index.get(_identifier_key(identifier.type, identifier.value))
                if root is None:
                    common = None
                    break
                uid = uids[root]
                if common is None:
                    common = uid
                elif uid != common:
                    common = None
                    break
            out.append(common)
        return out

    def resolve_alias(self, unified_id: str) -> str:
        """Follow merges from an ID handed out earlier to the ID its person has now."""
        seen = 0
        while (target := self._alias_target(unified_id)) is not None and seen <= self._aliases:
            unified_id, seen = target, seen + 1
        return unified_id

    def aliases_of(self, unified_id: str) -> list[str]:
        """Every earlier ID merged into ``unified_id`` (a scan: for erasures, which are rare)."""
        aliases = self._alias_map()

        def resolve(uid: str) -> str:
            while uid in aliases:
                uid = aliases[uid]
            return uid

        return sorted(a for a in aliases if resolve(a) == unified_id)

    def aliases(self) -> dict[str, str]:
        """Every earlier ID -> the ID it merged into (a scan: for retention runs)."""
        return self._alias_map()

    def has_links(self, node: str) -> bool:
        """Whether the node's person has more than this identifier (cheap)."""
        key = _key(node)
        root = self._index.get(key)
        return root is not None and (self._keys[root] != key or self._head[root] >= 0)

    def component(self, node: str) -> frozenset[str]:
        """The identifiers of the node's person; empty for an unknown node."""
        if node not in self:
            return frozenset()
        return frozenset(self._members(node))

    def explain(self, a: str, b: str) -> list[tuple[str, str, Provenance]] | None:
        """The shortest chain of links joining a to b, each hop with its provenance.

        None when they are not the same person (or unknown); ``[]`` when ``a == b``."""
        if a not in self or b not in self or self._find(a) != self._find(b):
            return None
        if a == b:
            return []
        members = self._names_of(a)
        path: list[str] = nx.shortest_path(self._subgraph(members), a, b)
        out = []
        for x, y in pairwise(path):
            link = self._link_between(members[x], members[y])
            out.append((x, y, self._provenance(link)))
        return out

    def quarantine(self) -> list[Quarantined]:
        """Proposals held for review, oldest first; one per pair (its first occurrence)."""
        return list(self._quarantine.values())

    def stats(self) -> dict[str, int]:
        return {
            "nodes": len(self._index),
            "edges": self._links,
            "persons": self._persons,
            "aliases": self._aliases,
            "quarantined": len(self._quarantine),
            "refused": self._refused,
        }

    def state(self) -> dict[str, object]:
        """The whole replayed state by identifier (for comparing two replays): creation
        order, person (ID and its age), links with provenance, recent joins; the review
        list (each pair under both ends), the aliases and the refusal count."""
        nodes: dict[str, object] = {}
        for key, root in self._index.items():
            seq = self._id_in(key, root)
            links = {self._name_of(self._to[h]): self._provenance(h >> 1) for h in self._halves(seq)}
            nodes[_text(key)] = {
                "seq": seq,
                "uid": self._uid[root],
                "age": self._age[root],
                "links": links,
                "joins": self._joins(seq),
            }
        held: dict[str, dict[str, Quarantined]] = {}
        for (a, b), q in self._quarantine.items():
            held.setdefault(a, {})[b] = q
            held.setdefault(b, {})[a] = q
        return {"nodes": nodes, "quarantine": held, "aliases": self._alias_map(), "refused": self._refused}

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
            if node not in self:
                uid = self._node_id(node) if self._node_id is not None else self._new_id()
                added = NodeAdded(node, uid, provenance.at)
                self._apply_node_added(added)
                changes.append(added)
        trusted = [n for n in order if n not in guarded] if guarded else order
        if not trusted:  # nothing but unproven claims: looked up, never linked
            return self._uid_of_root(self._find(order[0])), changes
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
        return self._uid_of_root(self._find(anchor)), changes

    def _owned_elsewhere(self, node: str, anchor: str) -> bool:
        """Whether ``node`` belongs to a person other than the anchor's (it has links there)."""
        root = self._find(node)
        return root != self._find(anchor) and self.has_links(node)

    def unlink(self, a: str, b: str, *, at: datetime) -> list[GraphChange]:
        """Remove the link a-b (a wrong bind); the person splits if it was the only path.

        Returns ``[]`` when there is no such link. The part holding the oldest node keeps
        the unified ID, every other part gets a new one (EdgeRemoved, then Split)."""
        if not self._linked(a, b):
            return []
        old = self._uid_of_root(self._find(a))
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
        seq = self._id(node)
        if seq is None:
            return []
        old = self._uid_of_root(self._find(node))
        neighbours = [self._name_of(self._to[h]) for h in self._halves(seq)]
        changes: list[GraphChange] = []
        for other in neighbours:
            removed = EdgeRemoved(node, other, at)
            self._apply_edge_removed(removed)
            changes.append(removed)
        gone = NodeRemoved(node, at)
        self._apply_node_removed(gone)
        changes.append(gone)
        parts: dict[int, set[str]] = {}
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
        if new in self:
            return []
        uid = self.unified_id(old) or unified_id
        change = NodeRekeyed(old, new, uid, at)
        self._apply_node_rekeyed(change)
        return [change]

    def _propose(self, anchor: str, other: str, provenance: Provenance, changes: list[GraphChange]) -> None:
        root_a, root_b = self._find(anchor), self._find(other)
        change: GraphChange
        if root_a == root_b:
            if not self._linked(anchor, other):
                change = EdgeAdded(anchor, other, provenance)
                self._apply_edge_added(change)
                changes.append(change)
            return
        rules = self.rules
        now = provenance.at.timestamp()
        sides: tuple[tuple[str, _Person], ...] = (
            (anchor, self._person(root_b)),
            (other, self._person(root_a)),
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
        members_a, members_b = self._member_types(anchor), self._member_types(other)
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
        joins = self._joins(self._need(node))
        if not joins:
            return False
        since = now - self.rules.breaker_window_seconds
        others = sum(1 for at, uid, _ in _join_entries(joins) if at > since and uid != other_uid)
        return others >= self.rules.breaker_max_merges

    def _member_types(self, node: str) -> list[str]:
        """The type of every identifier of the node's person."""
        keys = self._keys
        return [_key_type(cast(bytes, keys[m])) for m in self._member_ids(self._need(node))]

    def _exceeded_type(self, *parts: Iterable[str]) -> str | None:
        counts: dict[str, int] = {}
        for part in parts:
            for kind in part:
                counts[kind] = counts.get(kind, 0) + 1
        limit = self.rules.limit
        for kind in sorted(counts, key=self._type_key):
            if counts[kind] > limit(kind):
                return kind
        return None

    def _split_record(self, old: str, parts: list[set[str]], at: datetime) -> Split:
        seqs = [min(self._need(n) for n in part) for part in parts]
        keeper = min(range(len(parts)), key=seqs.__getitem__)
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
        key = _key(change.node)
        if key in self._index:
            return
        self._seq += 1
        seq = self._seq
        if seq >= len(self._keys):
            self._grow(seq)
        self._keys[seq] = key
        self._index[key] = seq
        self._put_person(seq, change.unified_id, seq)

    def _apply_edge_added(self, change: EdgeAdded) -> None:
        a, b = change.a, change.b
        key_a, key_b = _key(a), _key(b)
        index = self._index
        root_a, root_b = index.get(key_a), index.get(key_b)
        id_a = id_b = -1
        if root_a is not None and root_b is not None:
            id_a, id_b = self._id_in(key_a, root_a), self._id_in(key_b, root_b)
            if self._head[id_a] >= 0 and self._link_between(id_a, id_b) >= 0:
                return
        if a == b:
            raise ValueError("a link needs two different nodes")
        if root_a is None or root_b is None:
            raise KeyError(a if root_a is None else b)
        if root_a != root_b:
            self._inline_candidates.clear()
            self._join_ids(id_a, id_b, root_a, root_b, change.provenance, self._link_slots)
            person_a, person_b = self._drop_person(root_a), self._drop_person(root_b)
            # union by size: the smaller side is relabelled to the larger side's root
            side_a, side_b = self._member_ids(id_a), self._member_ids(id_b)
            root, small = (root_a, side_b) if len(side_a) >= len(side_b) else (root_b, side_a)
            keys = self._keys
            shared = index[cast(bytes, keys[root])]
            for member in small:
                index[cast(bytes, keys[member])] = shared
            older, newer = (person_a, person_b) if person_a.seq < person_b.seq else (person_b, person_a)
            self._put_person(root, older.uid, older.seq)
            self._pending_join = (a, older, newer)
        self._add_link(id_a, id_b, change.provenance)
        if self._quarantine:
            self._quarantine.pop(_edge_key(a, b), None)

    def _apply_merged(self, change: Merged) -> None:
        pending = self._pending_join
        if pending is None:
            if self._alias_target(change.merged) == change.survivor:
                return
            raise ValueError("Merged without a joining EdgeAdded before it")
        node, older, newer = pending
        persons = {older.uid: older, newer.uid: newer}
        if change.survivor == change.merged or {change.survivor, change.merged} != persons.keys():
            raise ValueError("Merged does not name the two persons its EdgeAdded joined")
        survivor = persons[change.survivor]
        root = self._find(node)
        self._uid[root] = survivor.uid  # the root holds a person: the count stays
        self._age[root] = survivor.seq
        kind, number = self._pack(change.merged)
        i = self._aliases
        if i >= len(self._alias_to):
            columns = (
                (self._alias_kind, _NO_ALIAS),
                (self._alias_hi, 0),
                (self._alias_lo, 0),
                (self._alias_to, None),
            )
            _reserve(columns, i + 1)
        self._alias_kind[i] = kind
        self._alias_hi[i] = number >> 64
        self._alias_lo[i] = number & _MASK64
        self._alias_to[i] = change.survivor
        self._aliases += 1
        if self._inline_candidates:
            self._inline_joins(i, change.merged, change.survivor)
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
        if self._linked(change.a, change.b):
            self._drop_edge(change.a, change.b)

    def _apply_node_removed(self, change: NodeRemoved) -> None:
        node = change.node
        seq = self._id(node)
        if seq is None:
            return
        for half in list(self._halves(seq)):
            self._drop_edge(node, self._name_of(self._to[half]))
        # without links the node is alone in its component, its own root
        self._drop_person(seq)
        del self._index[cast(bytes, self._keys[seq])]
        self._keys[seq] = None
        self._set_joins(seq, ())
        if self._pending_join is not None and self._pending_join[0] == node:
            self._pending_join = None
        # erasure: no pseudonym of this node stays in the review list (a scan; erasures are rare)
        for key in [k for k in self._quarantine if node in k]:
            del self._quarantine[key]

    def _apply_node_rekeyed(self, change: NodeRekeyed) -> None:
        old, new = change.old, change.new
        if new in self:
            return
        seq = self._id(old)
        if seq is None:
            self._apply_node_added(NodeAdded(new, change.unified_id, change.at))
            return
        # the node keeps its id, links and person; only its key changes (and moves to the
        # end of the creation order, as a re-inserted node)
        old_key, new_key = _key(old), _key(new)
        root = self._index.pop(old_key)
        self._keys[seq] = new_key
        self._index[new_key] = root
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
        people = [self._person(root) for root in roots]
        if any(person.uid != old for person in people):
            raise ValueError("a part of the Split does not carry its old unified id")
        for root, uid, person in zip(roots, change.parts.values(), people, strict=True):
            if uid != old:
                self._seq += 1
                person = _Person(uid, self._seq)
            self._drop_person(root)
            self._put_person(root, person.uid, person.seq)

    # -- internals ---------------------------------------------------------------------------------

    def _priority_key(self, node: str) -> tuple[int, str]:
        return self._rank.get(node_type(node), len(self._rank)), node

    def _birth_key(self, node: str) -> tuple[bool, int, str]:
        rank = self._rank.get(node_type(node))
        return rank is None, -(rank or 0), node

    def _type_key(self, kind: str) -> tuple[int, str]:
        return self._rank.get(kind, len(self._rank)), kind

    def _grow(self, seq: int) -> None:
        """Make room in the per-node arrays for ids up to ``seq``."""
        columns = (
            (self._keys, None),
            (self._head, -1),
            (self._uid, None),
            (self._age, 0),
            (self._join_link, -1),
            (self._join_alias, 0),
        )
        _reserve(columns, seq + 1)

    def _find(self, node: str) -> int:
        """The root id of the node's component (KeyError for an unknown node)."""
        return self._index[_key(node)]

    def _id_in(self, key: bytes, root: int) -> int:
        """The id of the node ``key`` in the component of ``root`` (a walk: components are small)."""
        keys = self._keys
        if keys[root] == key:
            return root
        for member in self._member_ids(root):
            if keys[member] == key:
                return member
        raise KeyError(key)

    def _id(self, node: str) -> int | None:
        key = _key(node)
        root = self._index.get(key)
        return None if root is None else self._id_in(key, root)

    def _need(self, node: str) -> int:
        seq = self._id(node)
        if seq is None:
            raise KeyError(node)
        return seq

    def _name_of(self, seq: int) -> str:
        return _text(cast(bytes, self._keys[seq]))

    def _person(self, root: int) -> _Person:
        return _Person(cast(str, self._uid[root]), self._age[root])

    def _uid_of_root(self, root: int) -> str:
        return cast(str, self._uid[root])

    def _put_person(self, root: int, uid: str, age: int) -> None:
        if self._uid[root] is None:
            self._persons += 1
        self._uid[root] = uid
        self._age[root] = age

    def _drop_person(self, root: int) -> _Person:
        person = self._person(root)
        self._uid[root] = None
        self._persons -= 1
        return person

    def _halves(self, seq: int) -> Iterator[int]:
        """The node's half-links, in the order they were made."""
        half, nxt = self._head[seq], self._next
        while half >= 0:
            yield half
            half = nxt[half]

    def _member_ids(self, seq: int) -> list[int]:
        seen = {seq}
        stack = [seq]
        to, nxt, head = self._to, self._next, self._head
        while stack:
            half = head[stack.pop()]
            while half >= 0:
                other = to[half]
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
                half = nxt[half]
        return list(seen)

    def _members(self, node: str) -> set[str]:
        return {self._name_of(m) for m in self._member_ids(self._need(node))}

    def _link_between(self, id_a: int, id_b: int) -> int:
        """The link joining two node ids, or -1."""
        for half in self._halves(id_a):
            if self._to[half] == id_b:
                return half >> 1
        return -1

    def _linked(self, a: str, b: str) -> bool:
        id_a = self._id(a)
        if id_a is None or self._head[id_a] < 0:
            return False
        id_b = self._id(b)
        return id_b is not None and self._link_between(id_a, id_b) >= 0

    def _name_id(self, name: str) -> int:
        found = self._name_ids.get(name)
        if found is None:
            found = self._name_ids[name] = len(self._names)
            self._names.append(name)
        return found

    def _add_link(self, id_a: int, id_b: int, provenance: Provenance) -> None:
        link = self._link_slots
        self._link_slots += 1
        if 2 * link + 2 > len(self._to):
            _reserve(((self._to, -1), (self._next, -1)), 2 * link + 2)
        if link >= len(self._link_event):
            columns = (
                (self._link_source, 0),
                (self._link_rule, 0),
                (self._link_event, None),
                (self._link_at, None),
            )
            _reserve(columns, link + 1)
        self._to[2 * link], self._to[2 * link + 1] = id_b, id_a
        self._append_half(id_a, 2 * link)
        self._append_half(id_b, 2 * link + 1)
        self._link_source[link] = self._name_id(provenance.source)
        self._link_rule[link] = self._name_id(provenance.rule)
        self._link_event[link] = provenance.event_id
        self._link_at[link] = provenance.at
        self._links += 1

    def _append_half(self, seq: int, half: int) -> None:
        last, nxt = self._head[seq], self._next
        if last < 0:
            self._head[seq] = half
            return
        while nxt[last] >= 0:
            last = nxt[last]
        nxt[last] = half

    def _unhook_half(self, seq: int, half: int) -> None:
        previous = -1
        for current in self._halves(seq):
            if current == half:
                break
            previous = current
        if previous < 0:
            self._head[seq] = self._next[half]
        else:
            self._next[previous] = self._next[half]

    def _provenance(self, link: int) -> Provenance:
        names = self._names
        return Provenance(
            names[self._link_source[link]],
            cast(str, self._link_event[link]),
            cast(datetime, self._link_at[link]),
            names[self._link_rule[link]],
        )

    def _names_of(self, node: str) -> dict[str, int]:
        """The node's component: name -> id."""
        return {self._name_of(m): m for m in self._member_ids(self._need(node))}

    def _subgraph(self, members: dict[str, int]) -> nx.Graph:
        """The networkx graph of one component (sorted, so paths are the same on every replica)."""
        graph = nx.Graph()
        ordered = sorted(members)
        graph.add_nodes_from(ordered)
        for n in ordered:
            graph.add_edges_from(
                (n, m) for h in self._halves(members[n]) if n < (m := self._name_of(self._to[h]))
            )
        return graph

    def _drop_edge(self, a: str, b: str) -> None:
        """Remove a link; if its person falls apart, every part gets its own root, all still
        under the old person until a Split names them."""
        members = self._names_of(a)
        id_a, id_b = members[a], members[b]
        link = self._link_between(id_a, id_b)
        self._unhook_half(id_a, 2 * link if self._to[2 * link] == id_b else 2 * link + 1)
        self._unhook_half(id_b, 2 * link if self._to[2 * link] == id_a else 2 * link + 1)
        self._to[2 * link] = self._to[2 * link + 1] = -1
        self._links -= 1
        parts = list(nx.connected_components(self._subgraph(members)))
        if len(parts) == 1:
            return
        person = self._drop_person(self._find(a))
        index = self._index
        for part in parts:
            root = members[min(part)]
            for node in part:
                index[_key(node)] = root
            self._put_person(root, person.uid, person.seq)

    def _joins(self, seq: int) -> tuple[float | str, ...]:
        """The node's recent proposals to join another person, flattened (time, other
        person's ID, event id) triples, oldest first."""
        more = self._joins_more.get(seq)
        if more is not None:
            return more
        link = self._join_link[seq]
        if link < 0:
            return ()
        ref = self._join_alias[seq]
        if ref >= 0:
            number = (self._alias_hi[ref] << 64) | self._alias_lo[ref]
            uid = _unpack_uid(self._alias_kind[ref], number, self._uid_texts)
        else:
            uid = cast(str, self._alias_to[~ref])
        at = cast(datetime, self._link_at[link]).timestamp()
        return (at, uid, cast(str, self._link_event[link]))

    def _set_joins(self, seq: int, joins: tuple[float | str, ...], link: int = -1) -> None:
        """Keep the node's joins; ``link``: the link whose provenance the only entry has (it
        moves inline when the Merged of that link names the other person's ID)."""
        if self._joins_more:
            self._joins_more.pop(seq, None)
        self._join_link[seq] = -1
        if joins:
            self._joins_more[seq] = joins
            if len(joins) == 3 and link >= 0:
                self._inline_candidates.append((seq, link))

    def _inline_joins(self, alias: int, merged: str, survivor: str) -> None:
        """After the Merged that made ``alias``: the joins its link recorded move inline."""
        more = self._joins_more
        for seq, link in self._inline_candidates:
            joins = more.get(seq)
            if joins is None or len(joins) != 3:
                continue
            if joins[1] == merged:
                ref = alias
            elif joins[1] == survivor:
                ref = ~alias
            else:
                continue
            del more[seq]
            self._join_link[seq] = link
            self._join_alias[seq] = ref
        self._inline_candidates.clear()

    def _pack(self, uid: str) -> tuple[int, int]:
        """``_pack_uid`` into this graph's texts; the last few answers are remembered (a merge
        packs the same two IDs for both breaker histories and the alias)."""
        packed = self._packed.get(uid)
        if packed is None:
            if len(self._packed) >= 4:
                self._packed.clear()
            packed = self._packed[uid] = _pack_uid(uid, self._uid_texts)
        return packed

    def _alias_target(self, unified_id: str) -> str | None:
        """The ID ``unified_id`` merged into, or None (a scan of the packed aliases)."""
        kind, number = _pack_uid(unified_id, [])
        if kind == 0:
            for i, alias_kind in enumerate(self._alias_kind):
                if alias_kind == 0 and self._uid_texts[self._alias_lo[i]] == unified_id:
                    return self._alias_to[i]
            return None
        hi, lo, start = number >> 64, number & _MASK64, 0
        while True:
            try:
                i = self._alias_lo.index(lo, start)
            except ValueError:
                return None
            if self._alias_hi[i] == hi and self._alias_kind[i] == kind:
                return self._alias_to[i]
            start = i + 1

    def _alias_map(self) -> dict[str, str]:
        texts = self._uid_texts
        n = self._aliases
        return {
            _unpack_uid(kind, (hi << 64) | lo, texts): cast(str, to)
            for kind, hi, lo, to in zip(
                self._alias_kind[:n], self._alias_hi[:n], self._alias_lo[:n], self._alias_to[:n], strict=True
            )
        }

    def _record_join(self, a: str, b: str, provenance: Provenance) -> None:
        """Count a proposal joining two persons against both identifiers' breaker history."""
        key_a, key_b = _key(a), _key(b)
        root_a, root_b = self._index.get(key_a), self._index.get(key_b)
        if root_a is None or root_b is None or root_a == root_b:
            return
        self._join_ids(self._id_in(key_a, root_a), self._id_in(key_b, root_b), root_a, root_b, provenance, -1)

    def _join_ids(
        self, id_a: int, id_b: int, root_a: int, root_b: int, provenance: Provenance, link: int
    ) -> None:
        """``_record_join`` by ids; ``link``: the id of the link this proposal is about to
        add (with this provenance), or -1."""
        now = provenance.at.timestamp()
        uid_a, uid_b = self._uid_of_root(root_a), self._uid_of_root(root_b)
        self._remember_join(id_a, now, uid_b, provenance.event_id, link)
        if provenance.rule != UNVERIFIED:  # an unproven claim never counts against the claimed
            self._remember_join(id_b, now, uid_a, provenance.event_id, link)

    def _remember_join(self, seq: int, now: float, other_uid: str, event_id: str, link: int) -> None:
        joins = self._joins(seq)
        if not joins:
            self._set_joins(seq, (now, other_uid, event_id), link)
            return
        entries = _join_entries(joins)
        # one event is one occasion, however many new identifiers it brings
        if any(at == now and event == event_id for at, _, event in entries):
            return
        # one person counts once: keep its latest proposal only
        entries = [e for e in entries if e[1] != other_uid]
        entries.append((now, other_uid, event_id))
        entries.sort(key=lambda e: e[0])
        # enough to tell whether breaker_max_merges persons other than the next one are in the window
        keep = max(self.rules.breaker_max_merges, 0) + 1
        kept = entries[-keep:]
        # the only entry kept is this proposal's: inline, like a first one
        inline = link if kept == [(now, other_uid, event_id)] else -1
        self._set_joins(seq, tuple(x for e in kept for x in e), inline)


def _join_entries(joins: tuple[float | str, ...]) -> list[tuple[float, str, str]]:
    return [
        (cast(float, joins[i]), cast(str, joins[i + 1]), cast(str, joins[i + 2]))
        for i in range(0, len(joins), 3)
    ]
