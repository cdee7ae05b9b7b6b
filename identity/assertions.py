"""Signed identity assertions: what lets a client source (public key) speak for a person.

A client source's write key ships inside every App, web page and mini-program, so it
proves nothing about who is sending. A client may assert things about its own device
(the anonymous id, device ids, the openid its mini-program got). Person-level identifiers
(user id, phone, email, WeChat unionid) are asserted by the shop's own backend after the
person logged in: it issues a short-lived JWT that the client passes along, binding those
identifiers to the device. The claims:

    {"aud": "idgate", "iat": ..., "exp": ...,       # short-lived (max_lifetime_seconds)
     "sub": "<the user id>",                         # and/or "ids"
     "device": "<the anonymousId (or device id) the SDK sends>",
     "ids": [{"type": "phone", "id": "13912345678"}, ...],   # person-level: phone, email,
                                                     # wechat_unionid (or user_id)
     "guardian": true}                               # optional: guardian consent verified

Signed with HS256 (a per-source secret) or EdDSA (Ed25519, the backend's public key
registered in the config); verified with PyJWT. The token carries raw identifiers: it is
read, pseudonymised and dropped, never stored or logged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

from identity.identifiers import DEVICE_TYPES, Identifier, InvalidIdentifier
from identity.key_files import key_file_mode_problem
from identity.pseudonym import Pseudonymiser, pseudonymise_identifier

_CACHE_SIZE: Final = 10_000
# Person-level identifier types an assertion may carry in "ids" (the user id is "sub").
PERSON_TYPES: Final = frozenset({"user_id", "phone", "email", "wechat_unionid"})


class AssertionRefused(Exception):
    """An assertion that cannot be trusted; ``reason`` is a short, countable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Assertion:
    """A verified assertion, pseudonymised: the person's identifiers, the device it binds."""

    person: frozenset[Identifier]
    device: str  # pseudonym of the device value
    guardian: bool
    expires: float

    def covers(self, identifier: Identifier) -> bool:
        return identifier in self.person

    def binds(self, identifiers: Iterable[Identifier]) -> bool:
        """Whether the device it was issued for is among ``identifiers``."""
        return any(i.type in DEVICE_TYPES and i.value == self.device for i in identifiers)


@dataclass(frozen=True, slots=True)
class _Claims:
    person: tuple[tuple[str, str], ...]
    device: str
    guardian: bool
    expires: float


@dataclass(frozen=True)
class AssertionKey:
    """One source's verification key and rules."""

    key: Any  # HS256 secret bytes or an Ed25519 public key (PEM)
    algorithm: str
    audience: str
    issuer: str
    max_lifetime: int


def load_key(
    *,
    hs256_secret_env: str = "",
    hs256_secret_file: str = "",
    ed25519_public_key: str = "",
    audience: str = "idgate",
    issuer: str = "",
    max_lifetime_seconds: int = 3600,
) -> AssertionKey:
    """The key a source's assertions are checked with; ValueError names what is missing."""
    if ed25519_public_key:
        key: Any = ed25519_public_key.encode("ascii")
        algorithm = "EdDSA"
    else:
        if hs256_secret_env:
            secret = os.environ.get(hs256_secret_env, "")
            if not secret:
                raise ValueError(f"environment variable {hs256_secret_env} (assertion secret) is not set")
        else:
            path = Path(hs256_secret_file)
            problem = key_file_mode_problem(path)  # anyone who reads it can forge assertions
            if problem is not None:
                raise ValueError(problem)
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"assertion secret file {path}: {exc.strerror}") from None
        if len(secret) < 32:
            raise ValueError("an HS256 assertion secret needs at least 32 characters")
        key, algorithm = secret.encode("utf-8"), "HS256"
    return AssertionKey(key, algorithm, audience, issuer, max_lifetime_seconds)


class AssertionVerifier:
    """Checks one source's assertions, remembering verified tokens until they expire (an
    SDK sends the same token on every event of a session)."""

    def __init__(self, key: AssertionKey) -> None:
        self.key = key
        self._cache: dict[str, _Claims] = {}

    def verify(self, token: object, pseudonymiser: Pseudonymiser, *, now: float) -> Assertion:
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise AssertionRefused("assertion_malformed", "the identity assertion must be a JWT string")
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[token] = claims
        if claims.expires <= now:
            raise AssertionRefused("assertion_expired", "the identity assertion has expired")
        person = []
        try:
            for id_type, raw in claims.person:
                person.append(pseudonymise_identifier(pseudonymiser, id_type, raw))
        except InvalidIdentifier as exc:
            raise AssertionRefused("assertion_invalid", f"identity assertion: {exc.reason}") from None
        return Assertion(frozenset(person), pseudonymiser(claims.device), claims.guardian, claims.expires)

    def _decode(self, token: str) -> _Claims:
        k = self.key
        try:
            payload = jwt.decode(
                token,
                k.key,
                algorithms=[k.algorithm],
                audience=k.audience,
                issuer=k.issuer or None,
                options={"require": ["exp", "iat", "aud"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise AssertionRefused("assertion_expired", "the identity assertion has expired") from None
        except jwt.InvalidSignatureError:
            raise AssertionRefused(
                "assertion_signature", "the identity assertion's signature is wrong"
            ) from None
        except jwt.PyJWTError as exc:
            raise AssertionRefused("assertion_invalid", f"identity assertion: {exc}") from None
        exp, iat = payload["exp"], payload["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float) or exp - iat > k.max_lifetime:
            raise AssertionRefused(
                "assertion_lifetime", f"an identity assertion may live at most {k.max_lifetime} s"
            )
        device = payload.get("device")
        if not isinstance(device, str) or not device.strip():
            raise AssertionRefused("assertion_invalid", "identity assertion: 'device' is required")
        sub = payload.get("sub")
        person: list[tuple[str, str]] = []
        if sub is not None:
            if not isinstance(sub, str) or not sub.strip():
                raise AssertionRefused("assertion_invalid", "identity assertion: 'sub' must be the user id")
            person.append(("user_id", sub))
        ids = payload.get("ids", [])
        if not isinstance(ids, list) or len(ids) > 10:
            raise AssertionRefused(
                "assertion_invalid", "identity assertion: 'ids' must be a list (at most 10)"
            )
        for item in ids:
            if not isinstance(item, dict) or item.get("type") not in PERSON_TYPES:
                raise AssertionRefused(
                    "assertion_invalid",
                    f"identity assertion: each of 'ids' needs a type among {sorted(PERSON_TYPES)}",
                )
            value = item.get("id")
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise AssertionRefused("assertion_invalid", "identity assertion: each of 'ids' needs an id")
            person.append((str(item["type"]), str(value)))
        if not person:
            raise AssertionRefused(
                "assertion_invalid", "identity assertion: names no one ('sub' or 'ids' is required)"
            )
        return _Claims(tuple(person), device.strip(), payload.get("guardian") is True, float(exp))


@dataclass(frozen=True, slots=True)
class Standing:
    """What the sender of one event (or consent call) has proven about its identifiers.

    A server source proves everything for its tenant. A client source proves its own
    device identifiers (anonymous id, device ids, an openid of its own appid), and the
    person-level ones a valid assertion bound to that device names. ``foreign``: pseudonyms
    of openids of an appid the source does not hold (another app's users): never its own."""

    server: bool
    assertion: Assertion | None = None
    refused: AssertionRefused | None = None
    foreign: frozenset[str] = frozenset()

    def proves(self, identifier: Identifier) -> bool:
        if self.server:
            return True
        if identifier.type in DEVICE_TYPES:
            return not self.foreign or identifier.value not in self.foreign
        return self.assertion is not None and identifier in self.assertion.person

    def is_foreign(self, identifier: Identifier) -> bool:
        """An openid of an appid the client source does not hold."""
        return bool(self.foreign) and identifier.value in self.foreign

    @property
    def guardian(self) -> bool:
        """May clear an under-14 flag or give guardian consent."""
        return self.server or (self.assertion is not None and self.assertion.guardian)

    def split(self, identifiers: Iterable[Identifier]) -> tuple[list[Identifier], list[Identifier]]:
        """(proven, unproven)"""
        proven: list[Identifier] = []
        unproven: list[Identifier] = []
        for i in identifiers:
            (proven if self.proves(i) else unproven).append(i)
        return proven, unproven


SERVER: Final = Standing(server=True)
CLIENT: Final = Standing(server=False)


def standing(
    *,
    server: bool,
    verifier: AssertionVerifier | None,
    token: object,
    identifiers: Iterable[Identifier],
    pseudonymiser: Pseudonymiser,
    now: float,
    foreign: frozenset[str] = frozenset(),
) -> Standing:
    """The standing of a sender: server, or client with or without a valid assertion bound
    to one of ``identifiers`` (the device it sends from). ``foreign``: pseudonyms of the
    openids it names of an appid it does not hold (see Standing)."""
    if server:
        return SERVER
    if token is None or token == "":
        return Standing(False, foreign=foreign) if foreign else CLIENT
    if verifier is None:
        return Standing(
            False,
            refused=AssertionRefused("assertion_not_configured", "this source takes no identity assertions"),
            foreign=foreign,
        )
    try:
        assertion = verifier.verify(token, pseudonymiser, now=now)
    except AssertionRefused as exc:
        return Standing(False, refused=exc, foreign=foreign)
    own = [i for i in identifiers if i.value not in foreign] if foreign else identifiers
    if not assertion.binds(own):
        return Standing(
            False,
            refused=AssertionRefused(
                "assertion_device_mismatch", "the identity assertion was issued for another device"
            ),
            foreign=foreign,
        )
    return Standing(False, assertion=assertion, foreign=foreign)


__all__ = [
    "CLIENT",
    "PERSON_TYPES",
    "SERVER",
    "Assertion",
    "AssertionKey",
    "AssertionRefused",
    "AssertionVerifier",
    "Standing",
    "load_key",
    "standing",
]
