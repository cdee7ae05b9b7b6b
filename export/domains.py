"""Pseudonym domains: identifiers leave re-keyed for the destination that receives them.

Inside idgate an identifier has one pseudonym per tenant (``k<version>.<22 chars>``) and a
person one unified ID (``p_<22 chars>``). A destination gets neither as stored: each value
is mapped through a keyed PRF of the tenant key and the destination's pseudonym domain,
so two recipients in different domains hold unrelated values and cannot join their data;
destinations configured with the same domain get the same values and can. The mapping is
deterministic, so a recipient's data stays joinable with itself across deliveries.

Values are found by their shape in the event JSON (both forms are produced only by idgate),
which covers identifiers wherever the pipeline put them: userId, anonymousId, traits,
properties, context.externalIds, the unified ID and the IDs inside identity notices.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec

# A JSON string that is exactly one pseudonym or unified ID (derived IDs carry 22
# base64url characters, the random ones given to split-off parts 20 hex digits).
_VALUE = re.compile(rb'"(k\d{1,4}\.[A-Za-z0-9_-]{22}|p_[A-Za-z0-9_-]{20,22})"')
_CACHE_LIMIT = 200_000


class DomainRekeyer:
    """Re-keys the pseudonyms and unified IDs in event payloads for one pseudonym domain."""

    def __init__(self, prf: Callable[[str], str], domain: str) -> None:
        # prf: the tenant's keyed pseudonymiser ("k<v>." + 22 base64url chars of HMAC)
        self.domain = domain
        self._prf = prf
        self._label = f"domain\x1f{domain}\x1f"
        self._cache: dict[bytes, bytes] = {}

    def value(self, stored: str) -> str:
        """The destination's value for one stored pseudonym or unified ID."""
        return self._map(stored.encode()).decode()

    def _map(self, stored: bytes) -> bytes:
        out = self._cache.get(stored)
        if out is None:
            digest = self._prf(self._label + stored.decode()).split(".", 1)[1]
            if stored.startswith(b"p_"):
                out = f"p_{digest}".encode()
            else:  # keep the key version: rotation stays visible downstream
                out = stored.split(b".", 1)[0] + b"." + digest.encode()
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[stored] = out
        return out

    def payload(self, payload: bytes) -> bytes:
        return _VALUE.sub(lambda m: b'"' + self._map(m.group(1)) + b'"', payload)


class _NoticeView(msgspec.Struct):
    type: str = ""
    survivor: str | None = None
    merged: str | None = None
    previous: str | None = None
    parts: list[str] = []
    unifiedId: str | None = None  # noqa: N815 - the notice's wire name


_decode_notice = msgspec.json.Decoder(_NoticeView).decode


def notice_persons(payload: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """For an identity notice: (the unified IDs a destination must have received data of
    for the notice to concern it, every unified ID the notice names)."""
    view = _decode_notice(payload)
    subjects: tuple[str | None, ...]
    if view.type == "identity.merged":
        subjects = (view.survivor, view.merged)
    elif view.type == "identity.split":
        subjects = (view.previous,)
    else:
        subjects = (view.unifiedId,)
    named = (view.survivor, view.merged, view.previous, view.unifiedId, *view.parts)
    return tuple(i for i in subjects if i), tuple(i for i in named if i)
