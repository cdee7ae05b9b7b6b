"""Identity resolution interface: what the gateway asks of the identity domain.

``IdentityResolver.resolve_batch`` takes, per event, its pseudonymised identifiers and
whether linking them is allowed (``identity_linking`` consent), and returns the unified ID
(or None when no resolver is configured). The operator actions (unlink, remove) and the
reads (unified IDs, the graph of a tenant for explain and review) are part of the same
contract, so callers never reach past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from identity.graph import GraphChange, IdentityGraph
from identity.identifiers import Identifier
from identity.redaction import RedactionPlan


class IdentityResolver(Protocol):
    # Whether the resolver links identifiers (and so needs identity_linking decisions).
    links: bool

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def graph(self, tenant: str) -> IdentityGraph | None:
        """The tenant's graph (read it between awaits only), None when resolution is off."""
        ...

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]], *, person_level: bool = False
    ) -> list[tuple[str, ...]]:
        """Per set: the pseudonyms of the other identifiers its person already has (with
        ``person_level``, only the person-level ones: user id, phone, email, unionid)."""
        ...

    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
        notices: list[GraphChange] | None = None,
        guarded: Sequence[frozenset[str]] | None = None,
    ) -> list[str | None]:
        """``guarded``, per set, holds the nodes a client asserted without proof: they are
        linked only when no other person holds them, never chosen as the anchor, and their
        proposals never count against another person's breaker.
        ``notices``, when given, receives the merges and splits this call caused (for
        the caller to send after its events) instead of the resolver's change hook."""
        ...

    def unified_id(self, tenant: str, node: str) -> str:
        """The node's unified ID: its person's, or the derived one of a never-linked node."""
        ...

    async def unlink(self, tenant: str, a: str, b: str) -> list[GraphChange]: ...

    async def review(self, tenant: str, a: str, b: str, *, approve: bool, officer: str) -> list[GraphChange]:
        """An officer's decision on a quarantined link; ``[]`` when none is held."""
        ...

    async def remove(
        self, tenant: str, node: str, collect: list[GraphChange] | None = None
    ) -> list[GraphChange]:
        """Erase a node; its person's splits go to ``collect`` when given, else downstream."""
        ...

    async def rekey(self, tenant: str, moves: Sequence[tuple[str, str]]) -> list[GraphChange]:
        """Key rotation: (old node, new node) pairs, the same identifier under two versions."""
        ...

    async def redact(self, tenant: str, nodes: Sequence[str]) -> RedactionPlan:
        """Rename erased nodes and their person's unified IDs in the past log records."""
        ...

    async def expire_aliases(self, tenant: str, before: datetime, *, apply: bool = True) -> int:
        """Rename the unified IDs merged into others before ``before`` to tombstones in the
        log (retention); returns how many expired (or would, without ``apply``)."""
        ...


class NoResolution:
    """No identity graph: events keep their own identifiers and carry no unified ID."""

    links = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def graph(self, tenant: str) -> IdentityGraph | None:
        return None

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]], *, person_level: bool = False
    ) -> list[tuple[str, ...]]:
        return [()] * len(identifier_sets)

    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
        notices: list[GraphChange] | None = None,
        guarded: Sequence[frozenset[str]] | None = None,
    ) -> list[str | None]:
        return [None] * len(identifier_sets)

    def unified_id(self, tenant: str, node: str) -> str:
        return node

    async def unlink(self, tenant: str, a: str, b: str) -> list[GraphChange]:
        return []

    async def review(self, tenant: str, a: str, b: str, *, approve: bool, officer: str) -> list[GraphChange]:
        return []

    async def remove(
        self, tenant: str, node: str, collect: list[GraphChange] | None = None
    ) -> list[GraphChange]:
        return []

    async def rekey(self, tenant: str, moves: Sequence[tuple[str, str]]) -> list[GraphChange]:
        return []

    async def redact(self, tenant: str, nodes: Sequence[str]) -> RedactionPlan:
        return RedactionPlan()

    async def expire_aliases(self, tenant: str, before: datetime, *, apply: bool = True) -> int:
        return 0
