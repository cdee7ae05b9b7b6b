"""Properties of the identity graph under random sequences of resolve, unlink and erasure."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from identity.graph import (
    EdgeRefused,
    GraphChange,
    IdentityGraph,
    IdentityRules,
    NodeAdded,
    Provenance,
    Quarantined,
    Split,
)

UNIVERSE = (
    ["user_id:u1", "user_id:u2", "phone:p1", "phone:p2", "email:e1", "email:e2", "email:e3"]
    + ["device_id:d1", "device_id:d2", "device_id:d3", "anonymous_id:a1", "anonymous_id:a2"]
    + ["anonymous_id:a3", "loyalty:l1"]
)
RULES = IdentityRules(
    max_per_type={"user_id": 1, "phone": 1, "email": 2, "device_id": 2, "anonymous_id": 3},
    max_component=5,
    breaker_max_merges=4,
    breaker_window_seconds=120,
)
T0 = datetime(2025, 3, 1, tzinfo=UTC)

resolve_op = st.tuples(
    st.just("resolve"),
    st.lists(st.sampled_from(UNIVERSE), min_size=1, max_size=4),
    st.sampled_from([True, True, True, False]),
    st.integers(0, 100),
)
unlink_op = st.tuples(st.just("unlink"), st.integers(0, 100))
relink_op = st.tuples(st.just("relink"), st.integers(0, 100))
remove_op = st.tuples(st.just("remove"), st.sampled_from(UNIVERSE))
operations = st.lists(
    st.one_of(resolve_op, resolve_op, resolve_op, unlink_op, relink_op, remove_op), min_size=8, max_size=40
)


def new_ids() -> Any:
    numbers = itertools.count(1)
    return lambda: f"p{next(numbers)}"


def partition(graph: IdentityGraph) -> set[frozenset[str]]:
    return {graph.component(n) for n in graph.nodes()}


def expected_partition(graph: IdentityGraph) -> set[frozenset[str]]:
    links = nx.Graph()
    links.add_nodes_from(graph.nodes())
    links.add_edges_from((a, b) for a, b, _ in graph.edges())
    return {frozenset(c) for c in nx.connected_components(links)}


def ids_of(graph: IdentityGraph) -> dict[str, str | None]:
    return {n: graph.unified_id(n) for n in graph.nodes()}


def check_invariants(graph: IdentityGraph) -> None:
    people = partition(graph)
    # (1) the persons are the connected components of the accepted links
    assert people == expected_partition(graph)
    # (2) the rules hold in every person
    for person in people:
        assert len(person) <= RULES.max_component
        for id_type, count in Counter(n.split(":", 1)[0] for n in person).items():
            assert count <= RULES.limit(id_type), (id_type, person)
    # one unified ID per person, a different one for each person
    uids = [{graph.unified_id(n) for n in person} for person in people]
    assert all(len(u) == 1 for u in uids)
    assert len(set().union(*uids)) == len(people)


class Run:
    def __init__(self) -> None:
        self.graph = IdentityGraph(RULES, new_id=new_ids())
        self.log: list[GraphChange] = []
        self.clock = 0
        self.events = itertools.count(1)

    def provenance(self, advance: int = 0) -> Provenance:
        self.clock += advance
        return Provenance("app", f"e{next(self.events)}", T0 + timedelta(seconds=self.clock), "event")

    def resolve(self, nodes: list[str], link: bool, advance: int = 0) -> list[GraphChange]:
        _, changes = self.graph.resolve(nodes, link=link, provenance=self.provenance(advance))
        self.log += changes
        return changes

    def edge(self, index: int) -> tuple[str, str] | None:
        edges = sorted((a, b) for a, b, _ in self.graph.edges())
        return edges[index % len(edges)] if edges else None

    def step(self, op: tuple[Any, ...]) -> set[str]:
        """Run one operation; return the nodes it touched."""
        kind = op[0]
        at = T0 + timedelta(seconds=self.clock)
        if kind == "resolve":
            _, nodes, link, advance = op
            self.resolve(nodes, link, advance)
            return set(nodes)
        if kind == "remove":
            self.log += self.graph.remove(op[1], at=at)
            return {op[1]}
        edge = self.edge(op[1])
        if edge is None:
            return set()
        a, b = edge
        if kind == "unlink":
            self.log += self.graph.unlink(a, b, at=at)
            return {a, b}
        # relink: unlink, then the same pair seen again with linking allowed
        before, before_ids = partition(self.graph), ids_of(self.graph)
        self.log += self.graph.unlink(a, b, at=at)
        check_invariants(self.graph)
        changes = self.resolve([a, b], link=True)
        if not any(isinstance(c, EdgeRefused | Quarantined) for c in changes):
            # (4) the partition, and the unified IDs, are back
            assert partition(self.graph) == before
            assert ids_of(self.graph) == before_ids
        return {a, b}


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_operations_keep_the_graph_consistent(ops: list[tuple[Any, ...]]) -> None:
    run = Run()
    for op in ops:
        before = partition(run.graph)
        before_ids = ids_of(run.graph)
        touched = run.step(op)
        check_invariants(run.graph)
        # (3) persons that no touched node belongs to keep their members and their ID
        after = partition(run.graph)
        for person in before:
            if person & touched:
                continue
            assert person in after
            assert {run.graph.unified_id(n) for n in person} == {before_ids[min(person)]}
        # a resolve only merges: every earlier ID leads to its node's current ID
        if op[0] == "resolve":
            for node, uid in before_ids.items():
                assert uid is not None
                assert run.graph.resolve_alias(uid) == run.graph.unified_id(node)

    # (5) a fresh graph fed the log (through its JSON encoding) ends in the same state
    log = msgspec.json.decode(msgspec.json.encode(run.log), type=list[GraphChange])
    replica = IdentityGraph(RULES, new_id=lambda: "never")
    for change in log:
        replica.apply(change)
    assert ids_of(replica) == ids_of(run.graph)
    assert partition(replica) == partition(run.graph)
    assert sorted(replica.edges()) == sorted(run.graph.edges())
    assert replica.quarantine() == run.graph.quarantine()
    assert replica.stats() == run.graph.stats()
    every_id = {c.unified_id for c in log if isinstance(c, NodeAdded)}
    every_id |= {u for c in log if isinstance(c, Split) for u in c.parts.values()}
    aliases = {u: run.graph.resolve_alias(u) for u in every_id}
    assert {u: replica.resolve_alias(u) for u in every_id} == aliases
    # and it decides the next event the same way (rules and breaker history included)
    probe = [n for n in UNIVERSE if n in run.graph][:4]
    if probe:
        at = Provenance("app", "probe", T0 + timedelta(seconds=run.clock + 1), "event")
        assert replica.resolve(probe, link=True, provenance=at) == run.graph.resolve(
            probe, link=True, provenance=at
        )
