"""Signed identity assertions (identity.assertions): HS256 and EdDSA, lifetime, device binding,
and what a verified one proves."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from identity.assertions import AssertionRefused, AssertionVerifier, Standing, load_key, standing
from identity.identifiers import Identifier
from identity.pseudonym import Pseudonymiser, pseudonymise_identifier

SECRET = "s" * 40
P = Pseudonymiser(b"k" * 32, 1)


def token(claims: dict, key: object = SECRET, alg: str = "HS256") -> str:
    now = int(time.time())
    return jwt.encode({"aud": "idgate", "iat": now, "exp": now + 300, **claims}, key, algorithm=alg)


def ident(id_type: str, raw: str) -> Identifier:
    return pseudonymise_identifier(P, id_type, raw)


def hs256() -> AssertionVerifier:
    import os

    os.environ["TEST_ASSERTION_SECRET"] = SECRET
    return AssertionVerifier(load_key(hs256_secret_env="TEST_ASSERTION_SECRET"))


def test_a_valid_assertion_proves_the_person_on_its_device() -> None:
    device = ident("anonymous_id", "dev-1")
    t = token({"sub": "u-1", "device": "dev-1", "ids": [{"type": "phone", "id": "13912345678"}]})
    s = standing(
        server=False, verifier=hs256(), token=t, identifiers=[device], pseudonymiser=P, now=time.time()
    )
    assert s.refused is None and s.assertion is not None
    assert s.proves(ident("user_id", "u-1")) and s.proves(ident("phone", "+86 139 1234 5678"))
    assert not s.proves(ident("user_id", "u-2")) and not s.guardian


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "u-1", "device": "dev-2"}, "assertion_device_mismatch"),
        ({"sub": "u-1"}, "assertion_invalid"),
        ({"device": "dev-1"}, "assertion_invalid"),
        (
            {"sub": "u-1", "device": "dev-1", "ids": [{"type": "anonymous_id", "id": "x"}]},
            "assertion_invalid",
        ),
        ({"sub": "u-1", "device": "dev-1", "exp": 1}, "assertion_expired"),
        ({"sub": "u-1", "device": "dev-1", "exp": int(time.time()) + 7200}, "assertion_lifetime"),
        ({"sub": "u-1", "device": "dev-1", "aud": "someone-else"}, "assertion_invalid"),
    ],
)
def test_refusals_name_their_reason(claims: dict, reason: str) -> None:
    device = ident("anonymous_id", "dev-1")
    s = standing(
        server=False,
        verifier=hs256(),
        token=token(claims),
        identifiers=[device],
        pseudonymiser=P,
        now=time.time(),
    )
    assert s.assertion is None and s.refused is not None and s.refused.reason == reason
    assert not s.proves(ident("user_id", "u-1")) and s.proves(device)


def test_a_wrong_signature_and_a_none_algorithm_are_refused() -> None:
    v = hs256()
    with pytest.raises(AssertionRefused) as bad:
        v.verify(token({"sub": "u", "device": "d"}, key="x" * 40), P, now=time.time())
    assert bad.value.reason == "assertion_signature"
    unsigned = jwt.encode(
        {"aud": "idgate", "sub": "u", "device": "d", "iat": 1, "exp": 2**31}, None, algorithm="none"
    )
    with pytest.raises(AssertionRefused):
        v.verify(unsigned, P, now=time.time())


def test_eddsa_with_the_backends_public_key() -> None:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    v = AssertionVerifier(load_key(ed25519_public_key=public.decode()))
    a = v.verify(
        token({"sub": "u-9", "device": "d-9", "guardian": True}, key=private, alg="EdDSA"), P, now=time.time()
    )
    assert a.guardian and ident("user_id", "u-9") in a.person
    with pytest.raises(AssertionRefused):  # an HS256 token against an EdDSA key
        v.verify(token({"sub": "u-9", "device": "d-9"}), P, now=time.time())


def test_short_secrets_and_missing_variables_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_SECRET", "short")
    with pytest.raises(ValueError, match="32 characters"):
        load_key(hs256_secret_env="SHORT_SECRET")
    monkeypatch.delenv("NOT_SET", raising=False)
    with pytest.raises(ValueError, match="NOT_SET"):
        load_key(hs256_secret_env="NOT_SET")


def test_server_sources_prove_everything() -> None:
    s = standing(server=True, verifier=None, token=None, identifiers=[], pseudonymiser=P, now=0)
    assert s == Standing(server=True) and s.proves(ident("phone", "13912345678")) and s.guardian


def test_a_secret_file_others_can_read_is_refused(tmp_path) -> None:
    secret = tmp_path / "assertion.secret"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key(hs256_secret_file=str(secret))
    secret.chmod(0o600)
    assert load_key(hs256_secret_file=str(secret)).algorithm == "HS256"


def test_an_openid_of_an_appid_the_source_does_not_hold_is_never_its_own() -> None:
    mine = pseudonymise_identifier(P, "wechat_openid", "o-mine-0001", scope="wxmine")
    theirs = pseudonymise_identifier(P, "wechat_openid", "o-theirs-01", scope="wxtheirs")
    device = ident("anonymous_id", "dev-1")
    s = standing(
        server=False,
        verifier=None,
        token=None,
        identifiers=[device, mine, theirs],
        pseudonymiser=P,
        now=time.time(),
        foreign=frozenset({theirs.value}),
    )
    assert s.proves(device) and s.proves(mine) and not s.proves(theirs)
    assert s.is_foreign(theirs) and not s.is_foreign(mine)
    assert s.split([device, theirs]) == ([device], [theirs])
    # an assertion cannot be bound to another app's openid either
    t = token({"sub": "u-1", "device": "o-theirs-01"})
    bound = standing(
        server=False,
        verifier=hs256(),
        token=t,
        identifiers=[theirs],
        pseudonymiser=P,
        now=time.time(),
        foreign=frozenset({theirs.value}),
    )
    assert bound.refused is not None and bound.refused.reason == "assertion_device_mismatch"
    # a server source proves every openid
    assert standing(
        server=True,
        verifier=None,
        token=None,
        identifiers=[],
        pseudonymiser=P,
        now=0,
        foreign=frozenset({theirs.value}),
    ).proves(theirs)
