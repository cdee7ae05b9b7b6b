"""Identity resolution interface: the pipeline asks for the unified person of each event.

``IdentityResolver.resolve_batch`` takes, per event, its pseudonymised identifiers and
whether linking them is allowed (``identity_linking`` consent), and returns the unified ID
(or None when no resolver is configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from identity.identifiers import Identifier


class IdentityResolver(Protocol):
    # Whether the resolver links identifiers (and so needs identity_linking decisions).
    links: bool

    async def resolve_batch(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]], linking_allowed: Sequence[bool]
    ) -> list[str | None]: ...


class NoResolution:
    """No identity graph: events keep their own identifiers and carry no unified ID."""

    links = False

    async def resolve_batch(
        self, tenant: str, identifier_sets: Sequence[Sequence[Identifier]], linking_allowed: Sequence[bool]
    ) -> list[str | None]:
        return [None] * len(identifier_sets)
