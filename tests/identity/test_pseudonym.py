from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from identity.pseudonym import InvalidKeyMaterial, KeyRing, MissingKey, Pseudonymiser, new_key_document


def test_pseudonyms_are_stable_keyed_and_versioned() -> None:
    key = b"k" * 32
    p = Pseudonymiser(key, 3)
    assert p("user-1") == p("user-1") == Pseudonymiser(key, 3)("user-1")
    assert p("user-1").startswith("k3.") and len(p("user-1")) == 3 + 22
    assert p("user-1") != p("user-2")
    assert Pseudonymiser(b"j" * 32, 3)("user-1") != p("user-1")  # another tenant's key


def test_pseudonyms_are_the_documented_hmac() -> None:
    """What stored data and every replica depend on: ``k<v>.`` + the first 16 bytes of
    HMAC-SHA-256(key, the value's UTF-8) in unpadded base64url, whichever way it is computed."""
    key = b"k" * 32
    p = Pseudonymiser(key, 3)
    values = ["user-1", "13800138000", "微信用户", "\udcff-lone-surrogate", "x" * 5000] + [
        f"u-{n}" for n in range(200)
    ]
    outputs = []
    for value in values:
        mac = hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:16]
        expected = "k3." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
        assert p(value) == expected
        outputs.append(expected)
    # the URL-safe alphabet's own two characters were among them
    assert any("-" in o for o in outputs) and any("_" in o for o in outputs)


def test_short_keys_refused_and_keys_never_in_repr() -> None:
    with pytest.raises(InvalidKeyMaterial):
        Pseudonymiser(b"short", 1)
    doc = new_key_document(["acme"])
    ring = KeyRing.from_json(doc)
    raw_key = json.loads(doc)["tenants"]["acme"]["keys"]["1"]
    assert raw_key not in repr(ring) and raw_key not in repr(ring.pseudonymiser("acme"))


def test_rotation_adds_a_version_and_keeps_old_ones() -> None:
    doc = new_key_document(["acme", "beta"])
    rotated = json.loads(new_key_document(["acme"], doc))
    assert rotated["tenants"]["acme"]["active"] == 2
    assert set(rotated["tenants"]["acme"]["keys"]) == {"1", "2"}
    assert rotated["tenants"]["beta"]["active"] == 1
    ring = KeyRing.from_json(json.dumps(rotated))
    assert ring.pseudonymiser("acme")("x").startswith("k2.")
    assert ring.pseudonymiser("beta")("x").startswith("k1.")
    assert all(len(base64.b64decode(k)) == 32 for k in rotated["tenants"]["acme"]["keys"].values())


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"tenants": {"a": {"active": 1, "keys": {"1": "!!!"}}}}',
        '{"tenants": {"a": {"active": 2, "keys": {"1": "' + base64.b64encode(b"x" * 32).decode() + '"}}}}',
    ],
)
def test_malformed_key_documents_fail_without_echoing_material(text: str) -> None:
    with pytest.raises(InvalidKeyMaterial) as info:
        KeyRing.from_json(text)
    assert "!!!" not in str(info.value)


def test_unknown_tenant() -> None:
    with pytest.raises(MissingKey):
        KeyRing.from_json(new_key_document(["acme"])).pseudonymiser("other")
