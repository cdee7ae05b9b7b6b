"""Pseudonym domains: identifiers leave re-keyed for the destination that receives them.

Inside idgate an identifier has one pseudonym per tenant (``k<version>.<22 chars>``) and a
person one unified ID (``p_<22 chars>``, or 20 hex digits for a part split off a person).
A destination gets neither as stored: each value is mapped through a keyed PRF of the
tenant key and the destination's pseudonym domain, so two recipients in different domains
hold unrelated values and cannot join their data; destinations configured with the same
domain get the same values and can. The mapping is deterministic, so a recipient's data
stays joinable with itself across deliveries.

What to re-key is never guessed from the payload: each outbox record lists the pseudonyms
and unified IDs its payload holds (the ingest pipeline records every value it wrote), and
exactly those JSON strings are replaced; notices are typed and re-keyed field by field.
"""

from __future__ import annotations

from collections.abc import Callable

from export.outbox import StoredRecord
from identity.notices import decode_notice, encode_notice

_CACHE_LIMIT = 200_000


class DomainRekeyer:
    """Re-keys the pseudonyms and unified IDs of outbox records for one pseudonym domain."""

    def __init__(self, prf: Callable[[str], str], domain: str) -> None:
        # prf: the tenant's "domain" derivation under its anchor key version ("k<v>." + 22
        # base64url chars of HMAC): not the active version, so a key rotation does not
        # change the values destinations hold (identity.pseudonym, docs/key-rotation.md)
        self.domain = domain
        self._prf = prf
        self._label = f"domain\x1f{domain}\x1f"
        self._cache: dict[str, str] = {}

    def value(self, stored: str) -> str:
        """The destination's value for one stored pseudonym or unified ID."""
        out = self._cache.get(stored)
        if out is None:
            digest = self._prf(self._label + stored).split(".", 1)[1]
            # a pseudonym keeps its key version: rotation stays visible downstream
            prefix = "p_" if stored.startswith("p_") else stored.split(".", 1)[0] + "."
            out = prefix + digest
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[stored] = out
        return out

    def payload(self, record: StoredRecord) -> bytes:
        """The record's payload as this domain sees it."""
        if record.kind == "notice":
            return encode_notice(decode_notice(record.payload).rekeyed(self.value))
        payload = record.payload
        for stored in record.pseudonyms:
            # a whole JSON string only: a pseudonym is never part of a longer value
            payload = payload.replace(f'"{stored}"'.encode(), f'"{self.value(stored)}"'.encode())
        return payload
