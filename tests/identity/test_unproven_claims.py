"""The graph's rules for identifiers a client named without proof (``guarded``): never the
anchor, linked only while no other person holds them, and never counted against another
person's circuit breaker; replaying the log gives the same state."""

from __future__ import annotations

from identity.graph import EdgeRefused, IdentityGraph, Merged, Quarantined
from tests.identity.test_graph import Recorder, prov


def claim(r: Recorder, device: str, claimed: str, *, at: float = 0) -> tuple[str, list]:
    uid, changes = r.graph.resolve(
        [device, claimed], link=True, provenance=prov(at), guarded=frozenset({claimed})
    )
    r.log += changes
    return uid, changes


def test_an_owned_identifier_is_refused_and_the_claimer_keeps_its_own_id() -> None:
    r = Recorder()
    victim, _ = r.link("user_id:victim", "phone:p1", "anonymous_id:dev-v")
    uid, changes = claim(r, "anonymous_id:evil", "phone:p1")
    assert uid != victim  # never the anchor: the event carries the claimer's own person
    refused = [c for c in changes if isinstance(c, EdgeRefused)]
    assert [c.reason for c in refused] == ["owned:phone"]
    assert refused[0].provenance.rule == "unverified"
    assert r.graph.component("phone:p1") == {"user_id:victim", "phone:p1", "anonymous_id:dev-v"}


def test_an_unowned_identifier_may_be_claimed_once() -> None:
    r = Recorder()
    uid, changes = claim(r, "anonymous_id:first", "user_id:new")
    assert any(isinstance(c, Merged) for c in changes)
    assert r.graph.unified_id("user_id:new") == uid
    # the next device claiming it finds it owned
    other, changes = claim(r, "anonymous_id:second", "user_id:new")
    assert other != uid and [c.reason for c in changes if isinstance(c, EdgeRefused)] == ["owned:user_id"]


def test_a_storm_of_unproven_claims_does_not_trip_the_persons_breaker() -> None:
    r = Recorder()
    victim, _ = r.link("user_id:victim", "anonymous_id:dev-1", at=0)
    for i in range(12):
        claim(r, f"anonymous_id:evil-{i}", "user_id:victim", at=1 + i)
    # the person's real new device (a proven link) still joins
    uid, changes = r.link("user_id:victim", "anonymous_id:dev-2", at=20)
    assert uid == victim and not any(isinstance(c, Quarantined) for c in changes)
    assert "anonymous_id:dev-2" in r.graph.component("user_id:victim")


def test_only_unproven_claims_means_no_link() -> None:
    r = Recorder()
    r.link("user_id:victim", "anonymous_id:dev-1")
    uid, changes = r.graph.resolve(
        ["user_id:victim"], link=True, provenance=prov(), guarded=frozenset({"user_id:victim"})
    )
    assert changes == [] and uid == r.graph.unified_id("user_id:victim")


def test_replaying_the_log_rebuilds_the_same_graph() -> None:
    r = Recorder()
    r.link("user_id:victim", "anonymous_id:dev-1")
    claim(r, "anonymous_id:a", "user_id:free")
    for i in range(8):
        claim(r, f"anonymous_id:evil-{i}", "user_id:victim", at=i)
    replay = IdentityGraph(r.rules)
    for change in r.log:
        replay.apply(change)
    for node in r.graph.nodes():
        assert replay.component(node) == r.graph.component(node)
        assert replay.unified_id(node) == r.graph.unified_id(node)
    # the claimers' own breakers hold their history; the victim's has none of it
    assert r.graph.resolve(["user_id:victim", "anonymous_id:dev-9"], link=True, provenance=prov(30))[
        0
    ] == r.graph.unified_id("user_id:victim")
