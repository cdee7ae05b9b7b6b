"""Identifier types, their normalisation and the junk values that are never linked.

An identifier is a (type, value) pair. Normalisation makes equal identifiers compare
equal (``+86 138-0013-8000`` and ``13800138000`` are one phone), and rejects values that
SDKs emit when they have nothing real to send (``null``, ``undefined``, all-zero IDFA, ...).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
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
    """A normalised identifier. After pseudonymisation ``value`` holds the pseudonym.

    Its ``node`` (``"<type>:<pseudonym>"``) is how the identity graph, the consent ledger
    and the identity log name a pseudonymised identifier; ``from_node`` reads one back.
    Nothing else builds or splits that string."""

    type: str
    value: str

    @property
    def node(self) -> str:
        return f"{self.type}:{self.value}"

    @classmethod
    def from_node(cls, node: str) -> Identifier:
        """The identifier a node string names; ValueError when it is not one."""
        kind, sep, value = node.partition(":")
        if not (kind and sep and value):
            raise ValueError("a node is '<type>:<pseudonym>'")
        return cls(kind, value)


def node_type(node: str) -> str:
    """The identifier type of a ``"<type>:<pseudonym>"`` node."""
    return node.partition(":")[0]


def node_value(node: str) -> str:
    """The pseudonym of a ``"<type>:<pseudonym>"`` node."""
    return node.partition(":")[2]


def is_node(value: object) -> bool:
    """Whether ``value`` is a well-formed ``"<type>:<pseudonym>"`` node string."""
    if not isinstance(value, str):
        return False
    kind, sep, rest = value.partition(":")
    return bool(kind and sep and rest)


@dataclass(frozen=True, slots=True)
class IdentifierType:
    name: str
    min_length: int = 1
    max_length: int = 255
    # Names one device or app install (an anonymous id, a device id, the openid one
    # mini-program gets), not the person: a client source may assert consent for these.
    device_like: bool = False


JUNK_VALUES: Final = frozenset(
    {"", "null", "undefined", "none", "nan", "0", "-1", "anonymous", "guest", "[object object]", "nil"}
)
# Identifiers only unique inside a namespace: a WeChat openid belongs to one mini-program.
SCOPED_TYPES: Final = frozenset({"wechat_openid"})
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
        IdentifierType("wechat_openid", min_length=8, device_like=True),
        IdentifierType("oaid", min_length=8, device_like=True),
        IdentifierType("idfv", min_length=8, device_like=True),
        IdentifierType("idfa", min_length=8, device_like=True),
        IdentifierType("android_id", min_length=8, device_like=True),
        IdentifierType("device_id", min_length=4, device_like=True),
        IdentifierType("anonymous_id", min_length=4, device_like=True),
    )
}


# Identifier types naming one device or app install; the others name the person.
DEVICE_TYPES: Final = frozenset(t.name for t in IDENTIFIER_TYPES.values() if t.device_like)

# Property and trait keys that hold someone's identifier (lower case, a leading "$" removed):
# pseudonymised wherever they appear, whatever protocol the event came in.
IDENTIFIER_KEYS: Final = frozenset(
    {
        "phone",
        "mobile",
        "email",
        "openid",
        "unionid",
        "userid",
        "user_id",
        "anonymousid",
        "anonymous_id",
        "distinct_id",
        "idfa",
        "idfv",
        "oaid",
        "imei",
        "android_id",
        "androidid",
        "device_id",
        "deviceid",
        "advertisingid",
        "id_card",
        "idcard",
    }
)
_IDENTIFIER_KEY = re.compile(
    r"(?:^|_)(?:distinct_id|openid|unionid|login_id|anonymous_id|device_id|cookie_id|mp_id"
    r"|android_id|oaid|idfa|idfv|imei|uuid)$"
)


# Glob patterns (over the lower-cased key, a leading "$" removed) of keys that hold an
# identifier under a name nobody can list in advance (``wechat_openid``, ``buyerOpenId``,
# ``union_id``, ``memberId``): extended per tenant by ``[tenants.identity] identifier_keys``.
DEFAULT_IDENTIFIER_KEY_PATTERNS: Final = (
    "*openid*",
    "*open_id*",
    "*unionid*",
    "*union_id*",
    "member_id",
    "memberid",
    "*_member_id",
    "customer_id",
    "customerid",
    "*_customer_id",
    "buyer*id",
    "*_user_id",
    "*_userid",
    "*_phone",
    "*_mobile",
    "*_email",
    "phone_number",
    "phonenumber",
    "mobile_number",
    "mobilenumber",
    "email_address",
    "emailaddress",
    "id_card*",
    "idcard*",
)
# Query-string keys that carry an identifier in URLs, beyond the keys above.
URL_IDENTIFIER_KEY_PATTERNS: Final = ("uid", "user", "u_id", "*token*", "ticket", "*session*", "sid")
_MAX_CACHED_KEYS = 4096


class IdentifierKeys:
    """Recognises keys that name someone's identifier: the exact names of
    ``IDENTIFIER_KEYS``, the ``*_openid``-style suffixes and glob patterns (defaults plus the
    tenant's). Answers are memoised for the keys seen (bounded), so the hot path pays one
    dict look-up per key."""

    __slots__ = ("_cache", "_pattern")

    def __init__(
        self, patterns: Iterable[str] = (), *, defaults: Iterable[str] = DEFAULT_IDENTIFIER_KEY_PATTERNS
    ) -> None:
        globs = [p.lower().lstrip("$") for p in (*defaults, *patterns)]
        self._pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs) or "(?!)")
        self._cache: dict[str, bool] = {}

    def __call__(self, key: str) -> bool:
        found = self._cache.get(key)
        if found is None:
            lowered = key.lower().lstrip("$")
            found = (
                lowered in IDENTIFIER_KEYS
                or _IDENTIFIER_KEY.search(lowered) is not None
                or self._pattern.match(lowered) is not None
            )
            if len(self._cache) < _MAX_CACHED_KEYS:
                self._cache[key] = found
        return found


_DEFAULT_KEYS = IdentifierKeys()


def is_identifier_key(key: str) -> bool:
    """Whether a property or trait key names someone's identifier (default patterns)."""
    return _DEFAULT_KEYS(key)


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
    if id_type in SCOPED_TYPES and not scope:
        raise InvalidIdentifier(id_type, "needs the appid it belongs to")
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
