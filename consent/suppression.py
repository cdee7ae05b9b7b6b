"""The suppression list: identifiers a deletion request erased, whose later events are
dropped before anything is stored (counted as ``dropped.erased``).

It is part of the consent state, a projection of the ledger (consent.state), so it is
shared by every replica, survives restarts and is rebuilt with the rest of the state:

- a deletion's ``suppressed`` step (a ``rights_request`` record naming every identifier the
  person had, pseudonymised) sets the ``__erased__`` flag on each of them;
- a later consent grant recorded with person-level proof (a record naming a user id,
  phone, email or unionid, which only a server source or a signed identity assertion can
  record: consent.trust) lifts the flag for every identifier that grant names. That is how
  an erased person comes back: they register again and the shop's backend records their
  consent. A grant a client source records for its own device identifiers alone does not
  lift it (a client re-sending old events cannot bring an erased person back).

Independent of consent enforcement: suppression holds whatever the purposes' state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from consent.decisions import StateEntry
from identity.identifiers import DEVICE_TYPES, node_type

ERASED_FLAG = "__erased__"
SUPPRESSED_STEP = "suppressed"


def is_erased(entries: Mapping[str, StateEntry] | None) -> bool:
    """Whether an identifier's consent state entries put it on the suppression list."""
    if not entries:
        return False
    flag = entries.get(ERASED_FLAG)
    return flag is not None and flag.state == "flagged"


def suppression_entries(
    record_type: str, state: str, detail: Mapping[str, object], identifiers: Sequence[str], seq: int
) -> list[tuple[str, StateEntry]]:
    """(node, flag entry) pairs a ledger record sets: flagged by a deletion's ``suppressed``
    step, cleared by a grant that names a person-level identifier."""
    if record_type == "rights_request" and detail.get("step") == SUPPRESSED_STEP:
        return [(n, StateEntry("flagged", seq)) for n in identifiers]
    if (
        record_type == "consent"
        and state == "given"
        and any(node_type(n) not in DEVICE_TYPES for n in identifiers)
    ):
        return [(n, StateEntry("cleared", seq)) for n in identifiers]
    return []


__all__ = ["ERASED_FLAG", "SUPPRESSED_STEP", "is_erased", "suppression_entries"]
