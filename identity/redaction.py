"""Redaction of an erased person from the identity change log (PIPL Art. 47).

The graph erases a person with removal records appended at the end of the log; the
earlier records (their identifiers' links, merges, splits, refusals, quarantines, rekeys)
still name their pseudonyms and unified IDs. ``plan_redaction`` renames every occurrence
of those strings in the tenant's records to tombstones that are random per deletion and
carry nothing (``erased:<hex>`` for an identifier, one per identifier; a fresh ``p_``
unified ID for each of the person's IDs, ``p_x`` + 20 hex digits, so parsers still accept
it and it is never taken for a real one), the erasure records included.

Why replay stays exact: replaying the log only compares these strings for equality (and
takes ``min`` of node strings to pick an internal union-find root, which no reader sees).
A consistent renaming over the tenant's whole log therefore replays to the same graph
with the names changed, and the erased identifiers are gone at its end as before. Two
guards keep it to what is the person's alone:

- an identifier the graph still holds at the end of the log (not erased, or seen again
  since) is not renamed, nor a unified ID some remaining identifier carries or resolves to;
- the plan replays the rewritten records and compares the whole graph with the original
  one renamed: any difference refuses the redaction (``RedactionUnsafe``), nothing changes.

Replicas: a replica that had already applied the rewritten records keeps its graph (the
same one, holding the erased person's IDs in its aliases and breaker history until it
restarts); one that had not reads a record naming a tombstone it does not hold
(``names_unknown_tombstone``) and replays the whole log again (identity.resolver). A
rekey (NodeRekeyed) names tombstones it brings itself, so it cannot tell: a replica
lagging behind an erased identifier's rekey and its redaction at once would keep the old
pseudonym until it restarts.

Retention uses the same rewrite for aliases (``plan_alias_expiry``): a unified ID merged
into another person before the cutoff, and no person's current ID, is renamed to a
tombstone in every record; the alias then reads tombstone -> survivor, so the old ID no
longer resolves and neither the log nor the graph names it. A replica that had already read
the records keeps the old alias in memory until its own next expiry run sees that the log
no longer names it (``GraphResolver.expire_aliases``) or it restarts.

Every record type can be renamed this way (``Quarantined.reason`` ``breaker:<node>``
included); what is not a pseudonym or a unified ID (sources, event ids, times, officers)
is kept. Idempotent: once redacted, the log names none of the person's strings, and a
second plan finds nothing to do.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeVar

import msgspec

from identity.graph import (
    GraphChange,
    IdentityGraph,
    IdentityRules,
    Merged,
    NodeAdded,
    NodeRekeyed,
    NodeRemoved,
)

ERASED_TYPE: Final = "erased"
ERASED_MARK: Final = b'"erased:'  # in an encoded change that names a tombstone node
_TOMBSTONE = re.compile(r"erased:[0-9a-f]{32}")
_BREAKER: Final = "breaker:"
# a unified ID tombstone: ``p_x`` + 20 hex digits (23 characters: a derived ID has 24, a
# random one 22, so none is ever taken for one)
_UID_TOMBSTONE_PREFIX: Final = "p_x"
_JSON_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"')  # a JSON string's content, escapes kept
_T = TypeVar("_T")
_FEW: Final = 16  # more names than this: one pass over each text's strings

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GraphChange).decode


class RedactionUnsafe(Exception):
    """The rewritten log would not replay to the same graph: nothing was changed."""


def names_unknown_tombstone(graph: IdentityGraph, change: GraphChange) -> bool:
    """Whether ``change`` names a tombstone node the graph does not hold (other than the
    NodeAdded or NodeRekeyed that brings it): the graph read the records before a
    redaction renamed them."""
    if isinstance(change, NodeAdded | NodeRekeyed):
        return False
    return any(t not in graph for t in _TOMBSTONE.findall(_encode(change).decode()))


def tombstone_node() -> str:
    return f"{ERASED_TYPE}:{secrets.token_hex(16)}"


def tombstone_unified_id() -> str:
    """A unified ID that carries nothing, shaped so parsers accept it (``p_`` and
    base64url characters) and ``is_tombstone_unified_id`` tells it from any real one."""
    return _UID_TOMBSTONE_PREFIX + secrets.token_hex(10)


@dataclass
class RedactionPlan:
    """What to write back: (seq, new encoded change) per record naming the person."""

    updates: list[tuple[int, bytes]] = field(default_factory=list)
    identifiers: int = 0  # erased identifiers found in the log
    unified_ids: int = 0  # the person's unified IDs found in the log
    aliases: int = 0  # expired aliases found in the log (plan_alias_expiry)
    renamed: frozenset[str] = frozenset()  # the strings the updates rename
    graph: IdentityGraph | None = None  # the replay of the rewritten log (None: nothing to do)


def rename(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` (msgspec builtins: dicts, lists, strings...) with every string found in
    ``names`` replaced, dict keys included, and the node of a ``breaker:<node>`` reason."""
    if isinstance(value, str):
        found = names.get(value)
        if found is not None:
            return found
        if value.startswith(_BREAKER) and (node := names.get(value[len(_BREAKER) :])) is not None:
            return _BREAKER + node
        return value
    if isinstance(value, dict):
        return {rename(k, names): rename(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rename(v, names) for v in value]
    return value


def _replay(changes: Iterable[GraphChange], rules: IdentityRules | None) -> IdentityGraph:
    graph = IdentityGraph(rules)
    for change in changes:
        graph.apply(change)
    return graph


def plan_redaction(
    rows: Iterable[tuple[int, bytes]],
    nodes: Collection[str],
    rules: IdentityRules | None = None,
    node_id: Callable[[str], str] | None = None,
) -> RedactionPlan:
    """Plan the redaction of the erased ``nodes`` from one tenant's log ``rows`` (seq,
    encoded change, in order). The person's unified IDs are those their identifiers had
    when the log removed them, with the IDs merged into those."""
    records = [(seq, raw, _decode(raw)) for seq, raw in rows]
    targets = set(nodes)
    for _, _, change in reversed(records):  # an earlier key version of an erased identifier
        if isinstance(change, NodeRekeyed) and change.new in targets:
            targets.add(change.old)
    graph = IdentityGraph(rules)
    unified: set[str] = set()
    for _, _, change in records:
        if isinstance(change, NodeRemoved) and change.node in targets and change.node in graph:
            uid = graph.unified_id(change.node)
            if uid is not None:
                unified.add(uid)
                unified.update(graph.aliases_of(uid))
        graph.apply(change)
    # what the graph still holds is not the erased person's alone
    targets = {n for n in targets if n not in graph}
    live = _live_ids(graph)
    unified = {u for u in unified if u not in live and graph.resolve_alias(u) not in live}
    names = {n: tombstone_node() for n in sorted(targets)} | {u: tombstone_unified_id() for u in unified}
    plan, seen = _rewrite(records, graph, names, rules, node_id)
    plan.identifiers = len(seen & targets)
    plan.unified_ids = len(seen & unified)
    return plan


_NOT_NAMES: Final = frozenset({"kind", "at", "provenance", "decision", "officer", "reason"})


def names_in(change: GraphChange) -> set[str]:
    """The node strings and unified IDs ``change`` names (the node of a quarantine reason
    ``breaker:<node>`` included; sources, events, officers and times are not names)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    for key, value in msgspec.structs.asdict(change).items():
        if key == "reason":
            if isinstance(value, str) and value.startswith(_BREAKER):
                found.add(value[len(_BREAKER) :])
        elif key not in _NOT_NAMES:
            walk(value)
    return found


def history(
    search: Callable[[Sequence[bytes]], Iterable[tuple[int, bytes]]], nodes: Collection[str]
) -> list[tuple[int, bytes]]:
    """The history of ``nodes`` in one tenant's log: every record (seq, encoded change)
    that names one of them and, transitively, every record that names a string such a
    record names (``names_in``), in log order. ``search(needles)`` gives the records whose
    encoding holds one of the byte strings: a name's JSON encoding without its opening
    quote, which finds ``"name"`` and ``"breaker:name"`` alike; a record it gives that
    names none of the strings looked for is left out.

    Why the history is enough for a redaction: replaying the log only compares these
    strings for equality, and no record outside the history names a string inside it, so
    the history replays to the same persons, IDs, links, aliases and review items for its
    strings alone as the whole log does; the rest of the log is never read."""
    found: dict[int, bytes] = {}
    seen: set[str] = set()
    frontier = set(nodes)
    while frontier:
        seen |= frontier
        named: set[str] = set()
        for seq, raw in search([_encode(name)[1:] for name in sorted(frontier)]):
            if seq not in found and (names := names_in(_decode(raw))) & seen:
                found[seq] = raw
                named |= names
        frontier = named - seen
    return sorted(found.items())


def _live_ids(graph: IdentityGraph) -> set[str]:
    """The current unified IDs of the persons the graph holds."""
    return {uid for n in graph.nodes() if (uid := graph.unified_id(n)) is not None}


def is_tombstone_unified_id(uid: str) -> bool:
    """Whether ``uid`` is a tombstone (``tombstone_unified_id``): no derived (``p_`` + 22
    characters) or random (``p_`` + 20 hex digits) ID has this shape."""
    return len(uid) == len(_UID_TOMBSTONE_PREFIX) + 20 and uid.startswith(_UID_TOMBSTONE_PREFIX)


def expiring_aliases(records: Iterable[GraphChange], graph: IdentityGraph, before: datetime) -> list[str]:
    """The unified IDs merged into another person before ``before`` (every ``Merged`` that
    names them as ``merged`` is older; ``records``: the tenant's changes, ``graph``: their
    replay) that are no person's current ID and not tombstones already, in log order."""
    live = _live_ids(graph)
    return [uid for uid in merged_before(records, before) if uid not in live]


def merged_before(records: Iterable[GraphChange], before: datetime) -> list[str]:
    """The unified IDs every ``Merged`` of ``records`` naming them as ``merged`` made
    before ``before``, tombstones left out, in log order (a cheap look: no replay)."""
    last_merge: dict[str, datetime] = {}
    for change in records:
        if isinstance(change, Merged):
            last_merge[change.merged] = max(change.at, last_merge.get(change.merged, change.at))
    return [uid for uid, at in last_merge.items() if at < before and not is_tombstone_unified_id(uid)]


def count_expiring_aliases(
    rows: Iterable[tuple[int, bytes]], before: datetime, rules: IdentityRules | None = None
) -> int:
    """How many aliases ``plan_alias_expiry`` would expire (a replay, nothing rewritten)."""
    changes = [_decode(raw) for _, raw in rows]
    return len(expiring_aliases(changes, _replay(changes, rules), before))


def plan_alias_expiry(
    rows: Iterable[tuple[int, bytes]],
    before: datetime,
    rules: IdentityRules | None = None,
    node_id: Callable[[str], str] | None = None,
) -> RedactionPlan:
    """Plan the expiry of the aliases made before ``before`` (retention, PIPL Art. 19) in
    one tenant's log ``rows``: each unified ID merged into another person by then (and no
    person's current ID) is renamed to a tombstone in every record, by the same rewrite
    and check as a redaction. The graph's alias entry then reads tombstone -> survivor:
    the old ID no longer resolves, and the log and the graph no longer name it."""
    records = [(seq, raw, _decode(raw)) for seq, raw in rows]
    graph = _replay((change for _, _, change in records), rules)
    expired = expiring_aliases((change for _, _, change in records), graph, before)
    plan, seen = _rewrite(records, graph, {u: tombstone_unified_id() for u in expired}, rules, node_id)
    plan.aliases = len(seen)
    return plan


def _rewrite(
    records: Sequence[tuple[int, bytes, GraphChange]],
    graph: IdentityGraph,
    names: Mapping[str, str],
    rules: IdentityRules | None,
    node_id: Callable[[str], str] | None,
) -> tuple[RedactionPlan, set[str]]:
    """Rename ``names`` (old -> tombstone) in every record that holds one, and check that
    the rewritten log replays to ``graph`` (the replay of ``records``) renamed; returns the
    plan and the names found. ``RedactionUnsafe`` when the replay differs."""
    plan = RedactionPlan()
    seen: set[str] = set()
    if not names:
        return plan, seen
    plan.renamed = frozenset(names)
    found_in = _finder(names)
    rewritten: list[GraphChange] = []
    for seq, raw, change in records:
        if found := found_in(raw):
            seen.update(found)
            change = msgspec.convert(rename(msgspec.to_builtins(change), names), GraphChange)
            plan.updates.append((seq, _encode(change)))
        rewritten.append(change)
    if not plan.updates:
        return plan, seen
    after = IdentityGraph(rules, node_id=node_id)
    for change in rewritten:
        after.apply(change)
    if _encode(after.state()) != renamed(_encode(graph.state()), names):
        raise RedactionUnsafe("the rewritten log would replay to a different graph")
    plan.graph = after
    return plan, seen


def names_any(rows: Iterable[tuple[int, bytes]], names: Collection[str]) -> bool:
    """Whether any of these encoded records names one of ``names``."""
    found_in = _finder(dict.fromkeys(names, ""))
    return any(found_in(raw) for _, raw in rows)


def renamed(encoded: bytes, names: Mapping[str, str]) -> bytes:
    """``rename`` on JSON text, the fast way for a whole graph's state: an exact string is
    always quoted in JSON (pseudonyms and unified IDs hold no character JSON escapes), and
    both replays list everything in the same order, so the texts compare byte for byte.
    A few names (a redaction) are replaced one by one; many (an alias expiry) in one pass
    over the text's strings."""
    if len(names) <= _FEW:
        for old, new in names.items():
            for prefix in ("", _BREAKER):
                encoded = encoded.replace(f'"{prefix}{old}"'.encode(), f'"{prefix}{new}"'.encode())
        return encoded
    table = _byte_table(names, lambda old, new: b'"' + new + b'"')
    pieces = _JSON_STRING.split(encoded)  # text, string content, text, ...
    pieces[1::2] = [table.get(p) or b'"' + p + b'"' for p in pieces[1::2]]
    return b"".join(pieces)


def _byte_table(names: Mapping[str, str], value: Callable[[str, bytes], _T]) -> dict[bytes, _T]:
    """``names`` keyed by their JSON string content, plain and as ``breaker:<name>``; each
    value made by ``value`` from the old name and the new content."""
    table: dict[bytes, _T] = {}
    for old, new in names.items():
        for prefix in ("", _BREAKER):
            table[(prefix + old).encode()] = value(old, (prefix + new).encode())
    return table


def _finder(names: Mapping[str, str]) -> Callable[[bytes], set[str]]:
    """A function giving the ``names`` an encoded record holds: a substring search per name
    when there are few, else one pass over the record's strings (a set look-up each)."""
    if len(names) <= _FEW:
        needles = [(s, s.encode()) for s in names]
        return lambda raw: {s for s, needle in needles if needle in raw}
    table = _byte_table(names, lambda old, new: old)

    def found_in(raw: bytes) -> set[str]:
        return {table[t] for t in _JSON_STRING.findall(raw) if t in table}

    return found_in
