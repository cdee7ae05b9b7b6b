"""Keyed pseudonymisation of identifiers (HMAC-SHA-256), one versioned key per tenant.

Keys come from the environment (``IDGATE_KEYS``) or a key file, never from the database,
and are never logged. A pseudonym carries the key version (``k1.<22 chars>``) so keys can
be rotated without ambiguity.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from identity.identifiers import Identifier, normalise

MIN_KEY_BYTES = 32


class KeyError_(Exception):
    """Base for key material problems."""


class MissingKey(KeyError_):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"no pseudonymisation key for tenant {tenant!r}")
        self.tenant = tenant


class InvalidKeyMaterial(KeyError_):
    pass


class Pseudonymiser:
    """Maps a normalised identifier value to an opaque, stable pseudonym."""

    __slots__ = ("_base", "_prefix", "version")

    def __init__(self, key: bytes, version: int) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise InvalidKeyMaterial(f"pseudonymisation keys need at least {MIN_KEY_BYTES} bytes")
        # Keying the HMAC once and copying it per value skips the key schedule on the hot path.
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        self._prefix = f"k{version}."
        self.version = version

    def __call__(self, value: str) -> str:
        mac = self._base.copy()
        mac.update(value.encode("utf-8", "surrogatepass"))
        return self._prefix + base64.urlsafe_b64encode(mac.digest()[:16]).rstrip(b"=").decode("ascii")

    def __repr__(self) -> str:  # never show key material
        return f"Pseudonymiser(version={self.version})"


def pseudonymise_identifier(
    pseudonymiser: Pseudonymiser, id_type: str, raw: object, *, scope: str | None = None
) -> Identifier:
    """Normalise one raw identifier and replace its value by the pseudonym: the one way a
    raw identifier becomes what idgate stores (ingest adapters, the consent API and the
    admin API all come through here). Raises ``InvalidIdentifier`` (unknown type, junk
    value, a WeChat openid without its appid, ...) with the reason; the raw value never
    appears in it."""
    ident = normalise(id_type, raw, scope=scope)
    return Identifier(id_type, pseudonymiser(ident.value))


@dataclass(frozen=True)
class TenantKeys:
    active: int
    keys: dict[int, bytes]

    def __repr__(self) -> str:
        return f"TenantKeys(active={self.active}, versions={sorted(self.keys)})"


class KeyRing:
    """Per-tenant key versions; ``pseudonymiser(tenant)`` uses the active version."""

    def __init__(self, tenants: dict[str, TenantKeys]) -> None:
        self._tenants = tenants
        self._active: dict[str, Pseudonymiser] = {}
        for tenant, tk in tenants.items():
            if tk.active not in tk.keys:
                raise InvalidKeyMaterial(f"tenant {tenant!r}: active key version {tk.active} is missing")
            self._active[tenant] = Pseudonymiser(tk.keys[tk.active], tk.active)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self._tenants)

    def pseudonymiser(self, tenant: str) -> Pseudonymiser:
        try:
            return self._active[tenant]
        except KeyError:
            raise MissingKey(tenant) from None

    def __repr__(self) -> str:
        return f"KeyRing(tenants={sorted(self._tenants)})"

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        """Parse ``{"tenants": {"acme": {"active": 1, "keys": {"1": "<base64>"}}}}``."""
        try:
            doc = json.loads(text)
            tenants: dict[str, TenantKeys] = {}
            for tenant, entry in doc["tenants"].items():
                keys = {int(v): base64.b64decode(k, validate=True) for v, k in entry["keys"].items()}
                tenants[tenant] = TenantKeys(active=int(entry["active"]), keys=keys)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The message names the structure problem only, never the key material.
            raise InvalidKeyMaterial(f"malformed key document ({type(exc).__name__})") from None
        return cls(tenants)

    @classmethod
    def load(cls, *, env_value: str | None, key_file: Path | None) -> KeyRing:
        if env_value:
            return cls.from_json(env_value)
        if key_file is not None:
            return cls.from_json(key_file.read_text(encoding="utf-8"))
        raise InvalidKeyMaterial("no keys: set IDGATE_KEYS or IDGATE_KEY_FILE")


def new_key_document(tenants: list[str], existing: str | None = None) -> str:
    """Add a fresh key version for each tenant (rotation) and make it active."""
    doc: dict[str, dict[str, dict[str, object]]] = {"tenants": {}}
    if existing:
        doc = json.loads(existing)
    for tenant in tenants:
        entry = doc["tenants"].setdefault(tenant, {"active": 0, "keys": {}})
        keys = entry["keys"]
        assert isinstance(keys, dict)
        version = max((int(v) for v in keys), default=0) + 1
        keys[str(version)] = base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode("ascii")
        entry["active"] = version
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_private_file(path: Path, text: str) -> None:
    """Write a secret file readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
