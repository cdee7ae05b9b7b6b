"""The identity graph: over-merging rules, ID stability, unlink and erasure, explain, replay."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from identity.graph import (
    EdgeAdded,
    EdgeRefused,
    EdgeRemoved,
    GraphChange,
    IdentityGraph,
    IdentityRules,
    Merged,
    NodeAdded,
    NodeRemoved,
    Provenance,
    Quarantined,
    Split,
)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
_event = itertools.count(1)


def prov(seconds: float = 0, *, event_id: str | None = None) -> Provenance:
    return Provenance(
        source="app",
        event_id=event_id or f"evt-{next(_event)}",
        at=T0 + timedelta(seconds=seconds),
        rule="event",
    )


def counter(prefix: str = "p") -> Callable[[], str]:
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


class Recorder:
    """A graph plus the log of every change it returned."""

    def __init__(self, rules: IdentityRules | None = None) -> None:
        self.rules = rules
        self.graph = IdentityGraph(rules, new_id=counter())
        self.log: list[GraphChange] = []

    def link(self, *nodes: str, at: float = 0, event_id: str | None = None) -> tuple[str, list[GraphChange]]:
        uid, changes = self.graph.resolve(nodes, link=True, provenance=prov(at, event_id=event_id))
        self.log += changes
        return uid, changes

    def see(self, *nodes: str, at: float = 0) -> str:
        uid, changes = self.graph.resolve(nodes, link=False, provenance=prov(at))
        self.log += changes
        return uid

    def unlink(self, a: str, b: str) -> list[GraphChange]:
        changes = self.graph.unlink(a, b, at=T0)
        self.log += changes
        return changes

    def remove(self, node: str) -> list[GraphChange]:
        changes = self.graph.remove(node, at=T0)
        self.log += changes
        return changes


def kinds(changes: Iterable[GraphChange]) -> list[str]:
    return [type(c).__name__ for c in changes]


def partition(graph: IdentityGraph) -> set[frozenset[str]]:
    return {graph.component(n) for n in graph.nodes()}


# -- per-type maxima ---------------------------------------------------------------------------


def test_two_user_ids_never_merge() -> None:
    r = Recorder()
    first, _ = r.link("user_id:alice", "phone:p1")
    uid, changes = r.link("user_id:bob", "phone:p1")
    assert kinds(changes) == ["NodeAdded", "EdgeRefused"]
    refused = changes[1]
    assert isinstance(refused, EdgeRefused)
    assert (refused.a, refused.b, refused.reason) == ("user_id:bob", "phone:p1", "limit:user_id")
    # the event still gets its anchor's person, which stays apart
    assert uid == r.graph.unified_id("user_id:bob") != first
    assert r.graph.component("user_id:alice") == {"user_id:alice", "phone:p1"}
    assert r.graph.component("user_id:bob") == {"user_id:bob"}
    assert r.graph.stats()["refused"] == 1


def test_one_phone_per_person() -> None:
    r = Recorder()
    r.link("user_id:alice", "phone:p1")
    _, changes = r.link("user_id:alice", "phone:p2")
    assert isinstance(changes[-1], EdgeRefused) and changes[-1].reason == "limit:phone"


def test_up_to_three_emails() -> None:
    r = Recorder()
    _, changes = r.link("user_id:u", "email:a", "email:b", "email:c")
    assert kinds(changes).count("Merged") == 3
    _, changes = r.link("user_id:u", "email:d")
    assert isinstance(changes[-1], EdgeRefused) and changes[-1].reason == "limit:email"
    assert len(r.graph.component("user_id:u")) == 4


@pytest.mark.parametrize("id_type", ["device_id", "anonymous_id", "idfv", "loyalty_card"])
def test_device_like_and_unknown_types_up_to_ten(id_type: str) -> None:
    rules = IdentityRules()
    assert rules.limit(id_type) == 10
    r = Recorder()
    for i in range(10):
        r.link("user_id:u", f"{id_type}:{i}", at=i * 3600)  # spread out: not a breaker test
    assert len(r.graph.component("user_id:u")) == 11
    _, changes = r.link("user_id:u", f"{id_type}:10", at=99 * 3600)
    assert isinstance(changes[-1], EdgeRefused) and changes[-1].reason == f"limit:{id_type}"


def test_a_custom_limit_overrides_the_default() -> None:
    r = Recorder(IdentityRules(max_per_type={"user_id": 1, "device_id": 2}))
    _, changes = r.link("user_id:u", "device_id:1", "device_id:2", "device_id:3")
    assert kinds(changes)[-1] == "EdgeRefused"
    assert len(r.graph.component("user_id:u")) == 3


# -- anchor ------------------------------------------------------------------------------------


def test_links_go_to_the_anchor_chosen_by_priority_whatever_the_order() -> None:
    r = Recorder()
    nodes = ("anonymous_id:x", "device_id:d", "loyalty:l", "phone:p", "user_id:u", "wechat_openid:o")
    uid, changes = r.link(*nodes)
    edges = [(c.a, c.b) for c in changes if isinstance(c, EdgeAdded)]
    # anchor = user_id; the others in priority order, unknown types last
    assert edges == [
        ("user_id:u", "phone:p"),
        ("user_id:u", "wechat_openid:o"),
        ("user_id:u", "device_id:d"),
        ("user_id:u", "anonymous_id:x"),
        ("user_id:u", "loyalty:l"),
    ]
    assert uid == r.graph.unified_id("user_id:u")
    # new nodes are born in reverse priority (the visitor's anonymous id first, the login that
    # names the person last), so the ID their earlier events carried is the oldest and survives
    born = [c.node for c in changes if isinstance(c, NodeAdded)]
    assert born == ["anonymous_id:x", "device_id:d", "wechat_openid:o", "phone:p", "user_id:u", "loyalty:l"]
    assert [c for c in changes if isinstance(c, Merged)][-1].survivor == uid
    assert uid == r.graph.unified_id("anonymous_id:x")
    # same nodes, other order: same anchor, nothing new to do
    uid2, changes2 = r.link(*reversed(nodes))
    assert (uid2, changes2) == (uid, [])


def test_without_link_each_node_stays_its_own_person_and_the_event_gets_the_anchor() -> None:
    r = Recorder()
    uid = r.see("device_id:d", "user_id:u")
    assert uid == r.graph.unified_id("user_id:u") != r.graph.unified_id("device_id:d")
    assert kinds(r.log) == ["NodeAdded", "NodeAdded"]
    assert r.graph.stats()["edges"] == 0


def test_resolve_rejects_malformed_nodes() -> None:
    g = IdentityGraph()
    with pytest.raises(ValueError):
        g.resolve([], link=True, provenance=prov())
    with pytest.raises(ValueError):
        g.resolve(["no-type"], link=True, provenance=prov())
    with pytest.raises(ValueError):
        g.resolve(["phone:"], link=True, provenance=prov())
    assert len(g) == 0


# -- component bound ---------------------------------------------------------------------------


def _person(r: Recorder, anchor: str, others: list[str], hour: int) -> None:
    for i, other in enumerate(others):
        r.link(anchor, other, at=(hour * 100 + i) * 3600)


def test_a_merge_past_the_component_bound_is_quarantined() -> None:
    r = Recorder()
    left = [f"device_id:{i}" for i in range(10)] + [f"anonymous_id:{i}" for i in range(10)]
    left += [f"idfv:{i}" for i in range(4)]
    right = [f"android_id:{i}" for i in range(10)] + [f"oaid:{i}" for i in range(10)]
    right += [f"idfa:{i}" for i in range(5)]
    _person(r, "user_id:u", left, 1)  # 25 identifiers
    _person(r, "phone:p", right, 2)  # 26 identifiers
    uid, changes = r.link("user_id:u", "phone:p", at=1e7)
    held = changes[0]
    assert isinstance(held, Quarantined) and held.reason == "component_too_large"
    assert r.graph.quarantine() == [held]
    assert len(r.graph.component("user_id:u")) == 25
    assert uid == r.graph.unified_id("user_id:u") != r.graph.unified_id("phone:p")
    # one identifier less on the right: exactly 50, allowed
    r.remove("idfa:4")
    _, changes = r.link("user_id:u", "phone:p", at=2e7)
    assert kinds(changes) == ["EdgeAdded", "Merged"]
    assert len(r.graph.component("user_id:u")) == 50
    # the accepted pair leaves the review list
    assert r.graph.quarantine() == []


# -- circuit breaker ---------------------------------------------------------------------------


def test_a_shared_shop_tablet_is_quarantined_after_five_persons() -> None:
    r = Recorder()
    tablet = "device_id:shop-tablet"
    outcomes = []
    for i in range(60):
        _, changes = r.link(f"user_id:c{i}", f"phone:c{i}", tablet, at=i * 30)
        outcomes.append(changes[-1])
    # the first shopper gets the tablet; the next four are refused (a second user_id) and
    # count as persons the tablet tried to join; from the sixth on the tablet is held
    assert isinstance(outcomes[0], Merged)
    assert [o.reason for o in outcomes[1:5]] == ["limit:user_id"] * 4  # type: ignore[union-attr]
    assert all(isinstance(o, Quarantined) and o.reason == f"breaker:{tablet}" for o in outcomes[5:])
    # no mega-person: every shopper is their own person (user_id + phone)
    assert max(len(c) for c in partition(r.graph)) == 3
    assert len({r.graph.unified_id(f"user_id:c{i}") for i in range(60)}) == 60
    assert all(r.graph.component(f"phone:c{i}") >= {f"user_id:c{i}"} for i in range(60))
    held = r.graph.quarantine()
    assert len(held) == 55 and r.graph.stats()["quarantined"] == 55


def test_anonymous_shoppers_on_a_shared_tablet_merge_five_times_then_quarantine() -> None:
    r = Recorder()
    tablet = "device_id:shop-tablet"
    last = []
    for i in range(60):
        _, changes = r.link(f"anonymous_id:a{i}", tablet, at=i * 30)
        last.append(changes[-1])
    assert kinds(last[:5]) == ["Merged"] * 5
    assert all(isinstance(c, Quarantined) and c.reason == f"breaker:{tablet}" for c in last[5:])
    assert len(r.graph.component(tablet)) == 6


def test_the_breaker_forgets_after_its_window() -> None:
    r = Recorder(IdentityRules(breaker_max_merges=2, breaker_window_seconds=600))
    tablet = "device_id:t"
    assert kinds(r.link("anonymous_id:1", tablet, at=0)[1])[-1] == "Merged"
    assert kinds(r.link("anonymous_id:2", tablet, at=60)[1])[-1] == "Merged"
    assert kinds(r.link("anonymous_id:3", tablet, at=120)[1])[-1] == "Quarantined"
    # the quarantined proposal counts too: still held 10 minutes after the first two
    assert kinds(r.link("anonymous_id:4", tablet, at=650)[1])[-1] == "Quarantined"
    # quiet for a window: the tablet may join again
    assert kinds(r.link("anonymous_id:5", tablet, at=1400)[1])[-1] == "Merged"


def test_one_event_with_many_new_identifiers_is_one_occasion() -> None:
    r = Recorder()
    nodes = ["user_id:u", "phone:p", "email:e", "wechat_unionid:w", "wechat_openid:o"]
    nodes += ["anonymous_id:a", "device_id:d", "idfv:v"]
    _, changes = r.link(*nodes)
    assert kinds(changes).count("Merged") == 7
    assert r.graph.quarantine() == []


def test_a_repeated_conflict_with_one_person_does_not_trip_the_breaker() -> None:
    r = Recorder()
    r.link("user_id:alice", "device_id:shared")
    for i in range(10):  # bob keeps using alice's device: one conflict, one other person
        _, changes = r.link("user_id:bob", "device_id:shared", at=10 + i)
        assert kinds(changes)[-1] == "EdgeRefused"
    # bob's new device still links
    _, changes = r.link("user_id:bob", "device_id:own", at=30)
    assert kinds(changes)[-1] == "Merged"


# -- stability ---------------------------------------------------------------------------------


def test_the_older_unified_id_survives_a_merge_and_the_other_becomes_an_alias() -> None:
    r = Recorder()
    device_uid = r.see("device_id:d")  # older, though device ids rank low
    user_uid, _ = r.link("user_id:u", "phone:p", at=10)
    uid, changes = r.link("user_id:u", "device_id:d", at=20)
    assert changes[-1] == Merged(survivor=device_uid, merged=user_uid, at=T0 + timedelta(seconds=20))
    assert uid == device_uid
    assert {r.graph.unified_id(n) for n in ("user_id:u", "phone:p", "device_id:d")} == {device_uid}
    assert r.graph.resolve_alias(user_uid) == device_uid
    assert r.graph.resolve_alias(device_uid) == device_uid
    assert r.graph.stats()["aliases"] == 2  # phone's fresh ID, then the user's


# -- unlink and erasure ------------------------------------------------------------------------


def test_unlinking_a_bridge_splits_and_the_part_with_the_oldest_node_keeps_the_id() -> None:
    r = Recorder()
    r.see("device_id:d2")  # the oldest node of the person to be
    uid, _ = r.link("user_id:u", "device_id:d1", "device_id:d2", at=1)
    r.link("device_id:d2", "anonymous_id:x", at=2)
    assert len(r.graph.component("user_id:u")) == 4
    changes = r.unlink("user_id:u", "device_id:d2")
    assert kinds(changes) == ["EdgeRemoved", "Split"]
    split = changes[1]
    assert isinstance(split, Split) and split.old_unified_id == uid
    assert split.parts == {"anonymous_id:x": uid, "device_id:d1": "p5"}
    assert r.graph.component("device_id:d2") == {"device_id:d2", "anonymous_id:x"}
    assert r.graph.component("user_id:u") == {"user_id:u", "device_id:d1"}
    assert r.graph.unified_id("anonymous_id:x") == uid
    assert r.graph.unified_id("user_id:u") == "p5"


def test_unlinking_an_edge_on_a_cycle_does_not_split() -> None:
    r = Recorder()
    uid, _ = r.link("user_id:u", "device_id:d1", "device_id:d2")
    _, changes = r.link("device_id:d1", "device_id:d2", at=1)  # inside the person: recorded only
    assert kinds(changes) == ["EdgeAdded"]
    changes = r.unlink("device_id:d1", "user_id:u")
    assert kinds(changes) == ["EdgeRemoved"]
    assert r.graph.component("user_id:u") == {"user_id:u", "device_id:d1", "device_id:d2"}
    assert r.graph.unified_id("device_id:d1") == uid
    # no such link: nothing happens
    assert r.unlink("device_id:d1", "user_id:u") == []
    assert r.unlink("device_id:d1", "phone:unknown") == []


def test_erasure_removes_the_node_and_splits_what_it_held_together() -> None:
    r = Recorder()
    uid, _ = r.link("user_id:u", "device_id:d1", "device_id:d2", "anonymous_id:a")
    r.link("user_id:v", "device_id:d1", at=1)  # refused: a second user_id
    r.link("device_id:d2", "anonymous_id:b", at=2)
    changes = r.remove("user_id:u")
    assert kinds(changes) == ["EdgeRemoved"] * 3 + ["NodeRemoved", "Split"]
    assert changes[3] == NodeRemoved("user_id:u", T0)
    split = changes[-1]
    assert isinstance(split, Split)
    # a was born first (the visitor's anonymous id): its part keeps the ID
    assert split.parts == {"anonymous_id:a": uid, "anonymous_id:b": "p7", "device_id:d1": "p8"}
    assert r.graph.unified_id("user_id:u") is None
    assert "user_id:u" not in r.graph
    assert r.graph.component("user_id:u") == frozenset()
    assert partition(r.graph) == {
        frozenset({"device_id:d1"}),
        frozenset({"device_id:d2", "anonymous_id:b"}),
        frozenset({"anonymous_id:a"}),
        frozenset({"user_id:v"}),
    }
    assert r.remove("user_id:u") == []


def test_erasure_without_a_split_keeps_the_id_and_drops_review_items() -> None:
    r = Recorder(IdentityRules(max_component=2))
    uid, _ = r.link("user_id:u", "device_id:d")
    r.link("device_id:d", "anonymous_id:a", at=1)  # would make 3: quarantined
    assert len(r.graph.quarantine()) == 1
    changes = r.remove("anonymous_id:a")
    assert kinds(changes) == ["NodeRemoved"]
    assert r.graph.quarantine() == []
    changes = r.remove("user_id:u")
    assert kinds(changes) == ["EdgeRemoved", "NodeRemoved"]
    assert r.graph.unified_id("device_id:d") == uid
    before = r.graph.stats()["persons"]
    r.remove("device_id:d")
    assert r.graph.stats() == {
        "nodes": 0,
        "edges": 0,
        "persons": before - 1,
        "aliases": 1,
        "quarantined": 0,
        "refused": 0,
    }


# -- explain -----------------------------------------------------------------------------------


def test_explain_returns_the_chain_of_links_with_provenance() -> None:
    r = Recorder()
    r.link("user_id:u", "device_id:d", event_id="login-1")
    r.link("device_id:d", "anonymous_id:web", at=5, event_id="visit-7")
    path = r.graph.explain("user_id:u", "anonymous_id:web")
    assert path is not None
    assert [(a, b, p.event_id) for a, b, p in path] == [
        ("user_id:u", "device_id:d", "login-1"),
        ("device_id:d", "anonymous_id:web", "visit-7"),
    ]
    assert path[1][2].at == T0 + timedelta(seconds=5)
    assert r.graph.explain("anonymous_id:web", "anonymous_id:web") == []
    r.see("phone:other")
    assert r.graph.explain("user_id:u", "phone:other") is None
    assert r.graph.explain("user_id:u", "phone:unknown") is None


# -- replay ------------------------------------------------------------------------------------


def snapshot(graph: IdentityGraph, ids: Iterable[str]) -> dict[str, object]:
    return {
        "persons": sorted((graph.unified_id(min(c)), sorted(c)) for c in partition(graph)),
        "edges": sorted(graph.edges()),
        "aliases": {i: graph.resolve_alias(i) for i in ids},
        "quarantine": graph.quarantine(),
        "stats": graph.stats(),
    }


def ids_in(log: Iterable[GraphChange]) -> set[str]:
    out: set[str] = set()
    for c in log:
        if isinstance(c, NodeAdded):
            out.add(c.unified_id)
        elif isinstance(c, Split):
            out.update(c.parts.values())
    return out


def replay(log: list[GraphChange], rules: IdentityRules | None = None) -> IdentityGraph:
    encoded = msgspec.json.encode(log)
    decoded = msgspec.json.decode(encoded, type=list[GraphChange])
    assert decoded == log
    replica = IdentityGraph(rules, new_id=counter("never-"))
    for change in decoded:
        replica.apply(change)
    return replica


def test_replaying_the_log_on_a_fresh_graph_reproduces_the_state() -> None:
    rules = IdentityRules(max_component=6)
    r = Recorder(rules)
    r.link("user_id:u", "phone:p", "device_id:d1", "anonymous_id:a1")
    r.link("user_id:v", "phone:p", at=1)  # refused
    r.link("device_id:d1", "device_id:d2", "anonymous_id:a2", at=2)
    r.link("user_id:u", "email:e1", "email:e2", at=3)  # the second would make 7: quarantined
    r.see("idfv:x", "user_id:u", at=4)
    r.link("idfv:x", "device_id:d2", at=5)
    r.unlink("user_id:u", "device_id:d1")  # splits
    r.remove("phone:p")
    r.link("user_id:u", "device_id:d1", at=6)  # merges back
    r.remove("device_id:d1")
    replica = replay(r.log, rules)
    ids = ids_in(r.log)
    assert snapshot(replica, ids) == snapshot(r.graph, ids)
    assert kinds(r.log).count("Split") >= 2 and "Quarantined" in kinds(r.log)


def test_apply_is_idempotent_for_redelivered_changes_and_strict_for_foreign_ones() -> None:
    r = Recorder()
    r.link("user_id:u", "phone:p")
    replica = replay(r.log)
    for change in r.log:
        if not isinstance(change, EdgeRefused | Quarantined):
            replica.apply(change)
    replica.apply(EdgeRemoved("user_id:u", "phone:unknown", T0))
    replica.apply(NodeRemoved("phone:unknown", T0))
    ids = ids_in(r.log)
    assert snapshot(replica, ids) == snapshot(r.graph, ids)
    with pytest.raises(ValueError):
        replica.apply(Merged("p1", "p9", T0))
    with pytest.raises(ValueError):
        replica.apply(Split("p9", {"user_id:u": "p9", "phone:p": "p10"}, T0))


# -- review of the quarantine ------------------------------------------------------------------


def _held_merge(r: Recorder) -> Quarantined:
    """Two persons of two identifiers each, held apart by a bound of three."""
    r.link("user_id:u", "device_id:d1")
    r.link("phone:p", "device_id:d2", at=1)
    _, changes = r.link("user_id:u", "phone:p", at=2)
    (held,) = changes
    assert isinstance(held, Quarantined) and held.reason == "component_too_large"
    return held


def test_an_approved_merge_is_linked_past_the_bound_and_replays() -> None:
    r = Recorder(IdentityRules(max_component=3))
    held = _held_merge(r)
    survivor = r.graph.unified_id("user_id:u")
    changes = r.graph.review(held.b, held.a, approve=True, officer="dpo", at=T0)
    r.log += changes
    assert kinds(changes) == ["Reviewed", "EdgeAdded", "Merged"]
    assert changes[1].provenance == msgspec.structs.replace(held.provenance, rule="review")  # type: ignore[union-attr]
    assert r.graph.quarantine() == []
    assert len(r.graph.component("phone:p")) == 4
    assert r.graph.unified_id("phone:p") == r.graph.unified_id("user_id:u") == survivor
    assert partition(replay(r.log, r.rules)) == partition(r.graph)
    assert replay(r.log, r.rules).quarantine() == []
    # decided once: nothing is held any more
    assert r.graph.review(held.a, held.b, approve=True, officer="dpo", at=T0) == []


def test_a_rejected_merge_leaves_the_review_list_and_the_persons_apart() -> None:
    r = Recorder(IdentityRules(max_component=3))
    held = _held_merge(r)
    changes = r.graph.review(held.a, held.b, approve=False, officer="dpo", at=T0)
    r.log += changes
    assert kinds(changes) == ["Reviewed"] and changes[0].decision == "rejected"  # type: ignore[union-attr]
    assert r.graph.quarantine() == []
    assert r.graph.unified_id("phone:p") != r.graph.unified_id("user_id:u")
    replica = replay(r.log, r.rules)
    assert replica.quarantine() == [] and partition(replica) == partition(r.graph)


def test_an_approval_still_obeys_the_per_type_limits() -> None:
    r = Recorder(IdentityRules(max_component=3))
    held = _held_merge(r)
    r.link("phone:p", "user_id:v", at=3)  # meanwhile the other person got a user id of its own
    changes = r.graph.review(held.a, held.b, approve=True, officer="dpo", at=T0)
    assert kinds(changes) == ["Reviewed", "EdgeRefused"]
    assert changes[1].reason == "limit:user_id"  # type: ignore[union-attr]
    assert r.graph.quarantine() == [] and r.graph.unified_id("user_id:u") != r.graph.unified_id("user_id:v")
