"""Unified IDs: the opaque, stable person IDs downstream receives.

A person's ID is born with its first identifier: a keyed PRF of that identifier's node
under the tenant's key, so every replica gives a new identifier the same ID without
coordinating, and without the key it cannot be computed from the identifier or its
pseudonym. A part that splits off a person and loses the old ID gets a random one
(``identity.graph.new_unified_id``). When persons merge, the older ID survives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from identity.pseudonym import Pseudonymiser

# Domain label of the derivation, so a unified ID is never a pseudonym of some identifier.
_LABEL = "unified-id\x1f"


def derived_unified_id(pseudonymiser: Pseudonymiser) -> Callable[[str], str]:
    """node -> its first unified ID (``p_`` + 22 base64url characters)."""

    # Derived again for every event of a never-linked identifier (it is not stored): cached.
    @functools.lru_cache(maxsize=100_000)
    def node_id(node: str) -> str:
        return "p_" + pseudonymiser(_LABEL + node).split(".", 1)[1]

    return node_id
