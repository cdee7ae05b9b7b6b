"""Offline rebuild of the identity partition from the change log, and its cross-check.

Two independent readings of the same log must agree: the graph replayed change by change
(what every replica holds) and the connected components (networkx) of the accepted edges
that were never removed. ``rebuild`` computes both and lists every difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import networkx as nx

from identity.graph import (
    EdgeAdded,
    EdgeRemoved,
    GraphChange,
    IdentityGraph,
    IdentityRules,
    NodeAdded,
    NodeRekeyed,
    NodeRemoved,
)
from identity.store import LogRow

_decode = msgspec.json.Decoder(GraphChange).decode
# ``progress`` is called every this many changes, and once more with the remainder.
PROGRESS_STEP = 10_000


@dataclass
class TenantRebuild:
    graph: IdentityGraph
    edges: nx.Graph = field(default_factory=nx.Graph)


@dataclass
class RebuildReport:
    changes: int = 0
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.differences


def replay(
    rows: Iterable[LogRow],
    rules: Mapping[str, IdentityRules] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, TenantRebuild], int]:
    tenants: dict[str, TenantRebuild] = {}
    count = 0
    for _seq, tenant, raw in rows:
        change = _decode(raw)
        t = tenants.get(tenant)
        if t is None:
            t = tenants[tenant] = TenantRebuild(IdentityGraph((rules or {}).get(tenant)))
        t.graph.apply(change)
        if isinstance(change, NodeAdded):
            t.edges.add_node(change.node)
        elif isinstance(change, EdgeAdded):
            t.edges.add_edge(change.a, change.b)
        elif isinstance(change, EdgeRemoved):
            if t.edges.has_edge(change.a, change.b):
                t.edges.remove_edge(change.a, change.b)
        elif isinstance(change, NodeRemoved) and change.node in t.edges:
            t.edges.remove_node(change.node)
        elif isinstance(change, NodeRekeyed) and change.new not in t.edges:
            if change.old in t.edges:
                nx.relabel_nodes(t.edges, {change.old: change.new}, copy=False)
            else:
                t.edges.add_node(change.new)
        count += 1
        if progress is not None and count % PROGRESS_STEP == 0:
            progress(PROGRESS_STEP)
    if progress is not None and count % PROGRESS_STEP:
        progress(count % PROGRESS_STEP)  # the last, partial step: progress adds up to count
    return tenants, count


def rebuild(
    rows: Iterable[LogRow],
    rules: Mapping[str, IdentityRules] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    tenants, count = replay(rows, rules, progress)
    report = RebuildReport(changes=count)
    for name, t in sorted(tenants.items()):
        components = list(nx.connected_components(t.edges))
        for comp in components:
            ids = {t.graph.unified_id(n) for n in comp}
            if len(ids) != 1 or None in ids:
                report.differences.append(
                    f"{name}: one component carries unified ids {sorted(map(str, ids))}"
                )
                continue
            node = next(iter(comp))
            if set(t.graph.component(node)) != comp:
                report.differences.append(f"{name}: the graph's person of {node} differs from its component")
        report.tenants[name] = {
            "identifiers": t.edges.number_of_nodes(),
            "persons": len(components),
            "links": t.edges.number_of_edges(),
        }
    return report
