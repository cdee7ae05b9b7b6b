"""The PIPL decision rules, one test per rule, on the pure ``decide`` function."""

from __future__ import annotations

from consent.decisions import MINOR_FLAG, ConsentQuery, DestinationSpec, StateEntry, decide

WAREHOUSE = DestinationSpec("warehouse", ("analytics",), overseas=False, third_party=False)
ORDERS = DestinationSpec("orders", ("necessary_service",), overseas=False, third_party=False)
OVERSEAS = DestinationSpec("overseas-bi", ("analytics",), overseas=True, third_party=False)
ADS = DestinationSpec("ads", ("ad_measurement",), overseas=False, third_party=True)
ALL = [WAREHOUSE, ORDERS, OVERSEAS, ADS]


def query(purposes=("analytics",), device=("dev-a",), user=(), **kw) -> ConsentQuery:
    return ConsentQuery(
        tenant="t", device_ids=tuple(device), user_ids=tuple(user), purposes=tuple(purposes), **kw
    )


def given(seq: int, notice_seq: int = 1, kind: str = "general") -> StateEntry:
    return StateEntry("given", seq, notice_seq, kind)


def withdrawn(seq: int) -> StateEntry:
    return StateEntry("withdrawn", seq)


def test_default_deny_only_necessary_service_passes() -> None:
    assert decide(query(), ALL, {}).dropped_reason == "no_consent"
    d = decide(query(purposes=("necessary_service", "analytics")), ALL, {})
    assert d.destinations == ("orders",) and d.proof == ()


def test_grant_allows_and_carries_its_proof() -> None:
    d = decide(query(), ALL, {"dev-a": {"analytics": given(7)}})
    assert d.destinations == ("warehouse",) and d.proof == (7,)


def test_overseas_needs_separate_cross_border_consent() -> None:
    state = {"dev-a": {"analytics": given(7)}}
    assert "overseas-bi" not in decide(query(), ALL, state).destinations
    state["dev-a"]["cross_border"] = given(9, kind="separate")
    d = decide(query(), ALL, state)
    assert d.destinations == ("warehouse", "overseas-bi") and d.proof == (7, 9)
    assert decide(query(), [OVERSEAS], {"dev-a": {"analytics": given(7)}}).dropped_reason == (
        "cross_border_without_consent"
    )


def test_third_party_needs_third_party_sharing() -> None:
    q = query(purposes=("ad_measurement",))
    state = {"dev-a": {"ad_measurement": given(3)}}
    assert decide(q, [ADS], state).dropped_reason == "third_party_without_consent"
    state["dev-a"]["third_party_sharing"] = given(4, kind="separate")
    assert decide(q, [ADS], state).destinations == ("ads",)


def test_withdrawal_on_any_linked_identifier_wins() -> None:
    state = {"dev-a": {"analytics": given(7)}, "user-1": {"analytics": withdrawn(8)}}
    assert decide(query(user=("user-1",)), ALL, state).dropped_reason == "withdrawn"
    # also when the user id reaches the event only through the identity graph
    assert decide(query(linked_ids=("user-1",)), ALL, state).dropped_reason == "withdrawn"


def test_grant_on_one_device_does_not_spread_to_another() -> None:
    state = {"dev-a": {"analytics": given(7)}}
    assert decide(query(device=("dev-b",), linked_ids=("dev-a",)), ALL, state).dropped_reason == "no_consent"
    # a user-level grant covers server-side events that carry no device identifier
    state = {"user-1": {"analytics": given(5)}}
    assert decide(query(device=(), user=("user-1",)), ALL, state).destinations == ("warehouse",)
    assert decide(query(device=("dev-b",), user=("user-1",)), ALL, state).dropped_reason == "no_consent"


def test_regrant_after_withdrawal() -> None:
    state = {"dev-a": {"analytics": given(9)}}  # the projection keeps the latest record only
    assert decide(query(), ALL, state).destinations == ("warehouse",)


def test_material_notice_change_needs_reconsent() -> None:
    state = {"dev-a": {"analytics": given(7, notice_seq=1)}}
    assert decide(query(), ALL, state, notice_floor={"analytics": 5}).dropped_reason == "needs_reconsent"
    state = {"dev-a": {"analytics": given(8, notice_seq=5)}}
    assert decide(query(), ALL, state, notice_floor={"analytics": 5}).destinations == ("warehouse",)


def test_minor_needs_guardian_consent() -> None:
    state = {"dev-a": {"analytics": given(7), MINOR_FLAG: StateEntry("flagged", 6)}}
    assert decide(query(), ALL, state).dropped_reason == "minor_without_guardian"
    state["dev-a"]["analytics"] = given(8, kind="guardian")
    assert decide(query(), ALL, state).destinations == ("warehouse",)
    # necessary_service still passes for a minor
    assert decide(query(purposes=("necessary_service",)), ALL, state).destinations == ("orders",)


def test_event_claim_narrows_never_widens() -> None:
    state = {"dev-a": {"analytics": given(7)}}
    assert decide(query(narrowed=("analytics",)), ALL, state).dropped_reason == "refused_in_event"
    assert decide(query(narrowed=("marketing",)), ALL, {}).dropped_reason == "no_consent"


def test_sensitive_properties_need_sensitive_pi() -> None:
    state = {"dev-a": {"analytics": given(7)}}
    d = decide(query(has_sensitive=True), ALL, state)
    assert d.destinations == ("warehouse",) and d.strip_sensitive
    state["dev-a"]["sensitive_pi"] = given(11, kind="separate")
    d = decide(query(has_sensitive=True), ALL, state)
    assert not d.strip_sensitive and d.proof == (7, 11)


def test_identity_linking_flag() -> None:
    assert not decide(query(), ALL, {}).linking_allowed
    assert decide(query(), ALL, {"dev-a": {"identity_linking": given(2)}}).linking_allowed


def test_irrelevant_destinations_are_not_reasons() -> None:
    d = decide(query(purposes=("marketing",)), ALL, {})
    assert d.destinations == () and d.dropped_reason == "no_destination"


def test_key_rotation_aliases_count_as_one_identifier_and_the_later_record_wins() -> None:
    # granted under the old key version: still a basis for the new pseudonym
    q = query(device=("k2.a",), aliases=(("k1.a", "k2.a"),))
    assert decide(q, [WAREHOUSE], {"k1.a": {"analytics": given(3)}}).destinations == ("warehouse",)
    # withdrawn under the old version after... nothing newer: withdrawn
    assert decide(q, [WAREHOUSE], {"k1.a": {"analytics": withdrawn(4)}}).dropped_reason == "withdrawn"
    # an old withdrawal does not outlive a later grant under the new version
    state = {"k1.a": {"analytics": withdrawn(4)}, "k2.a": {"analytics": given(9)}}
    assert decide(q, [WAREHOUSE], state).destinations == ("warehouse",)
    # nor an old grant a later withdrawal
    state = {"k1.a": {"analytics": given(4)}, "k2.a": {"analytics": withdrawn(9)}}
    assert decide(q, [WAREHOUSE], state).dropped_reason == "withdrawn"
    assert "k1.a" in q.all_ids()
