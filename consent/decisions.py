"""Consent decisions: which destinations may receive an event, and on what basis.

The pipeline asks a ``ConsentPolicy`` once per batch. A decision lists the destinations
allowed, the ledger sequence numbers that prove it, and, for an event that goes nowhere,
the reason it was dropped (counted, never stored).

The only policy today is ``LedgerlessPolicy``: routing by configuration without a consent
ledger. The ledger-backed PIPL policy (default deny, withdrawal, minors) replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import msgspec


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    id: str
    purposes: tuple[str, ...]
    overseas: bool
    third_party: bool


class ConsentQuery(msgspec.Struct, frozen=True):
    tenant: str
    subject: tuple[str, ...]  # pseudonymised identifiers of the event's subject
    purposes: tuple[str, ...]  # what the event itself is collected for (tracking plan)
    at: datetime


class ConsentDecision(msgspec.Struct, frozen=True):
    destinations: tuple[str, ...]
    proof: tuple[int, ...] = ()
    dropped_reason: str | None = None
    # Whether the subject's identifiers may be linked into one person (identity_linking).
    linking_allowed: bool = False


class ConsentPolicy(Protocol):
    enforced: bool

    async def decide_batch(
        self, queries: Sequence[ConsentQuery], destinations: Sequence[DestinationSpec]
    ) -> list[ConsentDecision]: ...


class LedgerlessPolicy:
    """Routes every event to every configured destination; consent is not enforced."""

    enforced = False

    async def decide_batch(
        self, queries: Sequence[ConsentQuery], destinations: Sequence[DestinationSpec]
    ) -> list[ConsentDecision]:
        ids = tuple(d.id for d in destinations)
        decision = ConsentDecision(ids) if ids else ConsentDecision((), dropped_reason="no_destination")
        return [decision] * len(queries)
