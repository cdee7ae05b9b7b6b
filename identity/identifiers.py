"""Identifier types, their normalisation and the junk values that are never linked.

An identifier is a (type, value) pair. Normalisation makes equal identifiers compare
equal (``+86 138-0013-8000`` and ``13800138000`` are one phone), and rejects values that
SDKs emit when they have nothing real to send (``null``, ``undefined``, all-zero IDFA, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import msgspec


class InvalidIdentifier(ValueError):
    """A value that is not a usable identifier of its type; it is never linked."""

    def __init__(self, id_type: str, reason: str) -> None:
        super().__init__(f"{id_type}: {reason}")
        self.id_type = id_type
        self.reason = reason


class Identifier(msgspec.Struct, frozen=True, array_like=True):
    """A normalised identifier. After pseudonymisation ``value`` holds the pseudonym."""

    type: str
    value: str


@dataclass(frozen=True, slots=True)
class IdentifierType:
    name: str
    min_length: int = 1
    max_length: int = 255
    device_like: bool = False


JUNK_VALUES: Final = frozenset(
    {"", "null", "undefined", "none", "nan", "0", "-1", "anonymous", "guest", "[object object]", "nil"}
)
_ALL_ZERO = re.compile(r"^[0-]*$")
_PHONE_PUNCTUATION = re.compile(r"[\s\-().]")
_CN_MOBILE = re.compile(r"^1[3-9]\d{9}$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

IDENTIFIER_TYPES: Final[dict[str, IdentifierType]] = {
    t.name: t
    for t in (
        IdentifierType("user_id"),
        IdentifierType("phone", min_length=7, max_length=32),
        IdentifierType("email", min_length=5),
        IdentifierType("wechat_unionid", min_length=8),
        IdentifierType("wechat_openid", min_length=8),
        IdentifierType("oaid", min_length=8, device_like=True),
        IdentifierType("idfv", min_length=8, device_like=True),
        IdentifierType("idfa", min_length=8, device_like=True),
        IdentifierType("android_id", min_length=8, device_like=True),
        IdentifierType("device_id", min_length=4, device_like=True),
        IdentifierType("anonymous_id", min_length=4, device_like=True),
    )
}


def normalise_phone(value: str) -> str:
    """Return a phone number in E.164; bare 11-digit CN mobiles get +86."""
    digits = _PHONE_PUNCTUATION.sub("", value)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    if digits.startswith("+86"):
        national = digits[3:]
    elif digits.startswith("86") and len(digits) == 13:
        national = digits[2:]
    elif not digits.startswith("+"):
        national = digits
    else:
        if _E164.match(digits):
            return digits
        raise InvalidIdentifier("phone", "not an E.164 number")
    if _CN_MOBILE.match(national):
        return "+86" + national
    raise InvalidIdentifier("phone", "not a CN mobile or E.164 number")


def normalise(id_type: str, raw: object, *, scope: str | None = None) -> Identifier:
    """Normalise and validate one identifier; raise InvalidIdentifier for junk.

    ``scope`` qualifies identifiers that are only unique inside a namespace: a WeChat
    openid is scoped by its mini-program appid, so one openid string under two appids
    is two identifiers.
    """
    spec = IDENTIFIER_TYPES.get(id_type)
    if spec is None:
        raise InvalidIdentifier(id_type, "unknown identifier type")
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise InvalidIdentifier(id_type, "must be a string or an integer")
    value = str(raw).strip()
    if value.lower() in JUNK_VALUES:
        raise InvalidIdentifier(id_type, "placeholder value")
    if len(value) > spec.max_length:
        raise InvalidIdentifier(id_type, f"longer than {spec.max_length} characters")
    if id_type == "phone":
        value = normalise_phone(value)
    elif id_type == "email":
        value = value.lower()
        if not _EMAIL.match(value):
            raise InvalidIdentifier(id_type, "not an email address")
    elif id_type in ("idfa", "oaid", "idfv"):
        value = value.upper() if id_type != "oaid" else value.lower()
        if _ALL_ZERO.match(value):
            raise InvalidIdentifier(id_type, "all-zero advertising id")
    if len(value) < spec.min_length:
        raise InvalidIdentifier(id_type, f"shorter than {spec.min_length} characters")
    if scope is not None:
        value = f"{scope}:{value}"
    return Identifier(id_type, value)
