"""Unified IDs: the opaque, stable person IDs downstream receives.

A person's ID is born with its first identifier: a keyed PRF of that identifier's node
under the tenant's key, so every replica gives a new identifier the same ID without
coordinating, and without the key it cannot be computed from the identifier or its
pseudonym. A part that splits off a person and loses the old ID gets a random one
(``identity.graph.new_unified_id``). When persons merge, the older ID survives.

The PRF is that of the key version the node's pseudonym was made with: a derivation-2
version has a sub-key of its own for unified IDs (domain separation); a derivation-1
(legacy) version keeps its original derivation, so every ID already handed out is derived
again the same way while its version is live. After a rotation an identifier seen under the
new version is stored with the ID of its old-version node (``NodeRekeyed``), so it keeps it
once the old version is retired.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from identity.pseudonym import UNIFIED_ID, KeyRing, Pseudonymiser

# Domain label of the legacy derivation (derivation 1, one keyed function for everything).
_LABEL = "unified-id\x1f"


def derived_unified_id(pseudonymiser: Pseudonymiser) -> Callable[[str], str]:
    """node -> its first unified ID (``p_`` + 22 base64url characters), legacy derivation."""

    # Derived again for every event of a never-linked identifier (it is not stored): cached.
    @functools.lru_cache(maxsize=100_000)
    def node_id(node: str) -> str:
        return "p_" + pseudonymiser(_LABEL + node).split(".", 1)[1]

    return node_id


def versioned_unified_id(keyring: KeyRing, tenant: str) -> Callable[[str], str]:
    """node -> its first unified ID under the key version of its own pseudonym (the active
    version for a node without one)."""
    fallback = keyring.versions(tenant)[keyring.active_version(tenant)]

    @functools.lru_cache(maxsize=100_000)
    def node_id(node: str) -> str:
        version = keyring.for_pseudonym(tenant, node.partition(":")[2]) or fallback
        if version.derivation == 1:
            return "p_" + version.internal(UNIFIED_ID)(_LABEL + node).split(".", 1)[1]
        return "p_" + version.internal(UNIFIED_ID)(node).split(".", 1)[1]

    return node_id
