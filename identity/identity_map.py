"""The identity map: which unified ID each linked identifier had, and when.

Replays the identity change log for one tenant and returns, per identifier node, the
intervals ``[valid_from, valid_to)`` of its unified ID: it starts when the identifier is
first linked, changes when its person merges into an older one or splits, and ends when
the identifier is erased. Warehouses join it with events to restate history under the
current person. Identifiers that were never linked are not in the log: their unified ID is
the derived one they carry on every event, and it never changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

import msgspec

from identity.graph import GraphChange, IdentityGraph, IdentityRules, Merged, NodeAdded, NodeRemoved, Split
from identity.store import LogRow

_decode = msgspec.json.Decoder(GraphChange).decode


class MapInterval(NamedTuple):
    node: str  # "<type>:<tenant pseudonym>"
    unified_id: str
    valid_from: datetime
    valid_to: datetime | None  # None: still valid


def identity_map(
    rows: Iterable[LogRow], tenant: str, rules: IdentityRules | None = None
) -> list[MapInterval]:
    graph = IdentityGraph(rules)
    current: dict[str, tuple[str, datetime]] = {}
    members: dict[str, set[str]] = {}
    out: list[MapInterval] = []

    def move(node: str, uid: str, at: datetime) -> None:
        old = current.get(node)
        if old is not None:
            if old[0] == uid:
                return
            if old[1] != at:  # an ID given and replaced by one event never held
                out.append(MapInterval(node, old[0], old[1], at))
            members.get(old[0], set()).discard(node)
        current[node] = (uid, at)
        members.setdefault(uid, set()).add(node)

    for _seq, row_tenant, raw in rows:
        if row_tenant != tenant:
            continue
        change = _decode(raw)
        graph.apply(change)
        if isinstance(change, NodeAdded):
            move(change.node, change.unified_id, change.at)
        elif isinstance(change, Merged):
            for node in list(members.pop(change.merged, ())):
                move(node, change.survivor, change.at)
        elif isinstance(change, Split):
            for node in list(members.get(change.old_unified_id, ())):
                uid = graph.unified_id(node)
                if uid is not None:
                    move(node, uid, change.at)
        elif isinstance(change, NodeRemoved) and change.node in current:
            uid, since = current.pop(change.node)
            members.get(uid, set()).discard(change.node)
            out.append(MapInterval(change.node, uid, since, change.at))
    out.extend(MapInterval(node, uid, since, None) for node, (uid, since) in current.items())
    out.sort(key=lambda i: (i.node, i.valid_from))
    return out
