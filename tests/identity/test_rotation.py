"""Key rotation inside the identity domain: the graph moves a node to its new-version
pseudonym without changing its person, the log replays the move, and the key derivations
are separated by purpose (derivation 2) while legacy versions derive as they always did."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import msgspec
import pytest

from identity.graph import GraphChange, IdentityGraph, NodeRekeyed, Provenance
from identity.notices import IdentityRekeyed, notices_for_changes
from identity.pseudonym import (
    DOMAIN,
    MESSAGE_ID,
    UNIFIED_ID,
    InvalidKeyMaterial,
    KeyRing,
    Pseudonymiser,
    new_key_document,
    retire_key_version,
)
from identity.unified_ids import derived_unified_id, versioned_unified_id

T0 = datetime(2026, 11, 30, tzinfo=UTC)


def prov(event: str) -> Provenance:
    return Provenance(source="app", event_id=event, at=T0, rule="event")


PERSON = ["user_id:k1.u", "anonymous_id:k1.a", "device_id:k1.d"]


def linked_graph() -> tuple[IdentityGraph, str]:
    g = IdentityGraph()
    uid, _ = g.resolve(PERSON, link=True, provenance=prov("e1"))
    return g, uid


def test_rekey_moves_a_linked_node_and_keeps_the_person_and_its_id() -> None:
    g, uid = linked_graph()
    changes = g.rekey("anonymous_id:k1.a", "anonymous_id:k2.a", unified_id="unused", at=T0)
    assert changes == [NodeRekeyed("anonymous_id:k1.a", "anonymous_id:k2.a", uid, T0)]
    assert "anonymous_id:k1.a" not in g and g.unified_id("anonymous_id:k2.a") == uid
    assert g.component("user_id:k1.u") == {"user_id:k1.u", "anonymous_id:k2.a", "device_id:k1.d"}
    assert g.explain("anonymous_id:k2.a", "device_id:k1.d") is not None
    # the moved node links and unlinks like any other
    assert g.unlink("user_id:k1.u", "anonymous_id:k2.a", at=T0)
    assert g.rekey("anonymous_id:k1.a", "anonymous_id:k2.a", unified_id="x", at=T0) == []


def test_rekey_of_an_unstored_identifier_adds_it_with_the_id_it_had() -> None:
    g = IdentityGraph()
    [change] = g.rekey("anonymous_id:k1.z", "anonymous_id:k2.z", unified_id="p_derived", at=T0)
    assert change.old == "anonymous_id:k1.z" and "anonymous_id:k1.z" not in g
    assert g.unified_id("anonymous_id:k2.z") == "p_derived"


def test_the_log_replays_rekeys_to_the_same_graph() -> None:
    g = IdentityGraph()
    first, log = g.resolve(PERSON, link=True, provenance=prov("e1"))
    for node in list(g.nodes()):
        log += g.rekey(node, node.replace("k1.", "k2."), unified_id="x", at=T0)
    _, more = g.resolve(["user_id:k2.u", "phone:k2.p"], link=True, provenance=prov("e2"))
    _, other = g.resolve(["anonymous_id:k2.b", "phone:k2.p"], link=True, provenance=prov("e3"))
    replayed = IdentityGraph()
    decode = msgspec.json.Decoder(GraphChange).decode
    for change in log + more + other:
        replayed.apply(decode(msgspec.json.encode(change)))
    moved = {n.replace("k1.", "k2.") for n in PERSON}
    assert set(replayed.nodes()) == set(g.nodes()) == moved | {"phone:k2.p", "anonymous_id:k2.b"}
    assert replayed.unified_id("anonymous_id:k2.b") == g.unified_id("phone:k2.p") == first


def test_rekey_notices_name_the_person_and_both_pseudonyms() -> None:
    change = NodeRekeyed("anonymous_id:k1.a", "anonymous_id:k2.a", "p_1", T0)
    [notice] = notices_for_changes("acme", [change])
    assert isinstance(notice, IdentityRekeyed) and notice.subjects() == ("p_1",)
    assert (notice.old_identifier.id, notice.new_identifier.id) == ("k1.a", "k2.a")
    moved = notice.rekeyed(lambda v: "x" + v)
    assert moved.unified_id == "xp_1" and moved.new_identifier.id == "xk2.a"


def test_derivation_2_separates_identifier_pseudonyms_from_internal_derivations() -> None:
    ring = KeyRing.from_json(new_key_document(["acme"]))
    version = ring.versions("acme")[1]
    assert version.derivation == 2
    values = {ring.pseudonymiser("acme")("x")} | {
        version.internal(p)("x") for p in (UNIFIED_ID, DOMAIN, MESSAGE_ID)
    }
    assert len(values) == 4  # one keyed function per purpose
    # and none is the raw key's HMAC (the legacy function)
    key = base64.b64decode(json.loads(new_key_document(["acme"]))["tenants"]["acme"]["keys"]["1"])
    assert Pseudonymiser(key, 1)("x") != KeyRing.from_json(new_key_document(["acme"])).pseudonymiser("acme")(
        "x"
    )


def test_legacy_versions_keep_deriving_as_before() -> None:
    key = b"k" * 32
    legacy = {"tenants": {"acme": {"active": 1, "keys": {"1": base64.b64encode(key).decode()}}}}
    ring = KeyRing.from_json(json.dumps(legacy))
    assert ring.pseudonymiser("acme")("x") == Pseudonymiser(key, 1)("x")
    node = "anonymous_id:" + Pseudonymiser(key, 1)("a")
    assert versioned_unified_id(ring, "acme")(node) == derived_unified_id(Pseudonymiser(key, 1))(node)
    mac = hmac.new(key, b"unified-id\x1f" + node.encode(), hashlib.sha256).digest()[:16]
    assert (
        versioned_unified_id(ring, "acme")(node) == "p_" + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    )


def test_rotation_keeps_every_version_live_and_ids_derive_under_their_own_version() -> None:
    doc = new_key_document(["acme"], new_key_document(["acme"]))
    ring = KeyRing.from_json(doc)
    assert [p.version for p in ring.pseudonymisers("acme")] == [2, 1]
    assert ring.anchor("acme").version == 1
    derive = versioned_unified_id(ring, "acme")
    old = "anonymous_id:" + ring.pseudonymisers("acme")[1]("a")
    new = "anonymous_id:" + ring.pseudonymiser("acme")("a")
    assert derive(old) != derive(new)
    assert ring.for_pseudonym("acme", old.partition(":")[2]) is ring.versions("acme")[1]


def test_retiring_keeps_only_the_anchor_sub_keys_and_never_the_active_version() -> None:
    doc = new_key_document(["acme"], new_key_document(["acme"]))
    before = KeyRing.from_json(doc).anchor("acme")
    with pytest.raises(InvalidKeyMaterial):
        retire_key_version(doc, "acme", 2)
    retired = json.loads(retire_key_version(doc, "acme", 1))["tenants"]["acme"]
    assert set(retired["keys"]) == {"2"} and retired["anchor"] == 1
    after = KeyRing.from_json(json.dumps({"tenants": {"acme": retired}})).anchor("acme")
    for purpose in (DOMAIN, MESSAGE_ID):
        assert after.internal(purpose)("p_x") == before.internal(purpose)("p_x")
    legacy = {
        "tenants": {
            "acme": {
                "active": 2,
                "keys": {
                    "1": base64.b64encode(b"k" * 32).decode(),
                    "2": base64.b64encode(b"j" * 32).decode(),
                },
            }
        }
    }
    with pytest.raises(InvalidKeyMaterial, match="legacy"):
        retire_key_version(json.dumps(legacy), "acme", 1)


def test_sinks_send_rekey_notices_as_their_own_call_never_as_a_deletion() -> None:
    from export.http_sinks import REKEYED_EVENT, segment_notice, sensors_event
    from identity.notices import encode_notice

    notice = notices_for_changes("acme", [NodeRekeyed("anonymous_id:k1.a", "anonymous_id:k2.a", "p_1", T0)])[
        0
    ]
    call = segment_notice(notice, "n-1")
    assert call["event"] == REKEYED_EVENT and call["userId"] == "p_1"
    assert call["properties"]["newIdentifier"] == {"type": "anonymous_id", "id": "k2.a"}
    record = sensors_event(json.loads(encode_notice(notice)), "n-1", notice=notice)
    assert record["event"] == "idgate_identity_rekeyed" and record["distinct_id"] == "p_1"
    assert record["properties"]["idgate_old_identifier"] == "k1.a"
