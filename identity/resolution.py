"""Identity resolution interface: the pipeline asks for the unified person of each event.

``IdentityResolver.resolve_batch`` takes, per event, its pseudonymised identifiers and
whether linking them is allowed (``identity_linking`` consent), and returns the unified ID
(or None when no resolver is configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from identity.identifiers import Identifier


class IdentityResolver(Protocol):
    # Whether the resolver links identifiers (and so needs identity_linking decisions).
    links: bool

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]]
    ) -> list[tuple[str, ...]]: ...

    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
        notices: list[Any] | None = None,
    ) -> list[str | None]:
        """``notices``, when given, receives the merges and splits this call caused (for
        the caller to send after its events) instead of the resolver's change hook."""
        ...


class NoResolution:
    """No identity graph: events keep their own identifiers and carry no unified ID."""

    links = False

    def linked_identifiers(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]]
    ) -> list[tuple[str, ...]]:
        return [()] * len(identifier_sets)

    async def resolve_batch(
        self,
        tenant: str,
        identifier_sets: Sequence[Sequence[Identifier]],
        linking_allowed: Sequence[bool],
        provenance: Sequence[tuple[str, str]] | None = None,
        notices: list[Any] | None = None,
    ) -> list[str | None]:
        return [None] * len(identifier_sets)
