"""Consent decisions under PIPL: which destinations may receive an event, and on what basis.

``decide`` is a pure function of the event's subject, the purposes involved, the
destinations and the subject's current consent state. The rules (design section 5):

- A purpose whose legal basis is ``contract`` (``necessary_service``) needs no consent.
- Default deny: any other purpose needs a current grant; before any record exists only
  ``necessary_service`` passes.
- Most restrictive wins: a withdrawal on any identifier of the subject (the event's own
  identifiers and those linked to the same person) denies the purpose; a grant counts only
  when it was given for this event's own device (its device identifiers, or its user id
  when the event carries no device identifier), so a grant on one device never spreads to
  another.
- A grant bound to a notice older than the last material change of that purpose needs
  re-consent.
- A subject flagged under 14 needs grants of kind ``guardian``.
- Overseas destinations also need ``cross_border``, third-party recipients
  ``third_party_sharing``; both are separate consents.
- A consent claim carried in the event itself can only narrow what the ledger allows.

Each allowed destination's decision carries the ledger sequence numbers of the grants it
relied on (the proof), so every forward can be justified later.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

CONTRACT_PURPOSES_DEFAULT = frozenset({"necessary_service"})
MINOR_FLAG = "__minor__"
# The purpose whose absence idgate flags on every forwarded event (PIPL Art. 24).
PERSONALISATION = "personalisation"


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    id: str
    purposes: tuple[str, ...]
    overseas: bool
    third_party: bool
    # purposes + cross_border (overseas) + third_party_sharing (third party), computed once
    required_purposes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        extra = (("cross_border",) if self.overseas else ()) + (
            ("third_party_sharing",) if self.third_party else ()
        )
        object.__setattr__(
            self, "required_purposes", self.purposes + tuple(p for p in extra if p not in self.purposes)
        )

    def required(self) -> tuple[str, ...]:
        return self.required_purposes


class StateEntry(msgspec.Struct, frozen=True, array_like=True):
    """The latest ledger record of one purpose for one identifier."""

    state: str  # given | withdrawn | flagged | cleared
    seq: int
    notice_seq: int = 0  # ledger seq of the notice the grant was bound to
    kind: str = "general"  # general | separate | guardian


SubjectState = Mapping[str, Mapping[str, StateEntry]]  # identifier -> purpose -> entry


class ConsentQuery(msgspec.Struct, frozen=True, array_like=True):
    tenant: str
    device_ids: tuple[str, ...]  # pseudonyms of this event's device (anonymousId, device ids)
    user_ids: tuple[str, ...]  # pseudonyms of the logged-in user (userId)
    purposes: tuple[str, ...]  # what the event is collected for (tracking plan)
    narrowed: tuple[str, ...] = ()  # purposes the event's own consent claim refuses
    linked_ids: tuple[str, ...] = ()  # other identifiers of the same person (identity graph)
    has_sensitive: bool = False
    # key rotation: (pseudonym under an older live key version, the same identifier's
    # pseudonym in this query); their state counts as one identifier's (latest record wins)
    aliases: tuple[tuple[str, str], ...] = ()

    def all_ids(self) -> tuple[str, ...]:
        """Every pseudonym whose state the decision reads (aliases included)."""
        ids = self.device_ids + self.user_ids + self.linked_ids
        return ids + tuple(old for old, _ in self.aliases) if self.aliases else ids


class ConsentTicket(msgspec.Struct, frozen=True, array_like=True):
    """What travels with an event in the outbox so delivery can ask again."""

    epoch: int
    query: ConsentQuery
    # Whether the event is forwarded as personalised (``context.idgate.personalisation``):
    # delivery turns it to false when the basis is gone by then, never back to true (a
    # later grant does not reach events received without one). True for a ticket written
    # before the field existed, so such an event is asked too.
    personalised: bool = True


class DeliveryVerdict(enum.IntEnum):
    """Consent asked again at send time, for one event and one destination."""

    WITHHOLD = 0
    SEND = 1
    # still allowed, but the subject lost the ``personalisation`` basis since the event
    # was accepted: it goes with ``context.idgate.personalisation = false`` (PIPL Art. 24)
    SEND_NON_PERSONALISED = 2


class ConsentDecision(msgspec.Struct, frozen=True):
    destinations: tuple[str, ...]
    proof: tuple[int, ...] = ()
    dropped_reason: str | None = None
    # Whether the subject's identifiers may be linked into one person (identity_linking).
    linking_allowed: bool = False
    # Sensitive properties must be removed (no sensitive_pi consent).
    strip_sensitive: bool = False
    # The store's restrictive epoch when the state was read: delivery asks again only if a
    # restricting record has been applied since.
    epoch: int = 0
    # Whether the subject has a basis for ``personalisation`` (PIPL Art. 24): forwarded as
    # ``context.idgate.personalisation`` so recipients know not to personalise.
    personalised: bool = False


@dataclass(frozen=True, slots=True)
class Basis:
    ok: bool
    proof: int | None = None  # ledger seq of the grant; None for contract necessity
    reason: str | None = None


_DENY_REASON = {
    "cross_border": "cross_border_without_consent",
    "third_party_sharing": "third_party_without_consent",
}


class _Subject:
    """The state entries of one event's subject, gathered once per decision."""

    __slots__ = ("everyone", "own", "_minor", "narrowed")

    def __init__(self, query: ConsentQuery, state: SubjectState) -> None:
        get = state.get
        if query.aliases:
            folded = fold_aliases(state, query.aliases)
            if folded:
                overlay = folded.get

                def get(i: str, /) -> Mapping[str, StateEntry] | None:  # type: ignore[misc]
                    return overlay(i) or state.get(i)

        # every identifier of the person (withdrawals and flags count from any of them)
        ids = query.device_ids + query.user_ids + query.linked_ids
        self.everyone = [e for i in ids if (e := get(i))]
        # this event's own device (or user, for device-less events): only its grants count
        self.own = [e for i in (query.device_ids or query.user_ids) if (e := get(i))]
        self._minor: bool | None = None
        self.narrowed = query.narrowed

    @property
    def minor(self) -> bool:
        if self._minor is None:
            self._minor = any(
                (f := e.get(MINOR_FLAG)) is not None and f.state == "flagged" for e in self.everyone
            )
        return self._minor

    def basis(
        self, purpose: str, contract_purposes: frozenset[str], notice_floor: Mapping[str, int]
    ) -> Basis:
        if purpose in contract_purposes:
            return _CONTRACT
        if purpose in self.narrowed:
            return _REFUSED_IN_EVENT
        for entries in self.everyone:
            entry = entries.get(purpose)
            if entry is not None and entry.state == "withdrawn":
                return _WITHDRAWN
        grant: StateEntry | None = None
        for entries in self.own:
            entry = entries.get(purpose)
            if entry is not None and entry.state == "given" and (grant is None or entry.seq > grant.seq):
                grant = entry
        if grant is None:
            return Basis(False, reason=_DENY_REASON.get(purpose, "no_consent"))
        if self.minor and grant.kind != "guardian":
            return _MINOR
        if grant.notice_seq < notice_floor.get(purpose, 0):
            return _RECONSENT
        return Basis(True, proof=grant.seq)


def fold_aliases(
    state: SubjectState, aliases: Sequence[tuple[str, str]]
) -> dict[str, Mapping[str, StateEntry]]:
    """The entries of the query's identifiers that aliases change: each alias's entries
    merged into its identifier's, per purpose the later record winning (a grant under the
    old key version counts until a later withdrawal under either version, and an old
    withdrawal until a later grant). Read over ``state``."""
    # only the query's own identifiers change: a small overlay on the (batch-wide) state
    folded: dict[str, Mapping[str, StateEntry]] = {}
    for old, new in aliases:
        entries = state.get(old)
        if not entries:
            continue
        merged = dict(folded.get(new) or state.get(new) or {})
        for purpose, entry in entries.items():
            current = merged.get(purpose)
            if current is None or entry.seq > current.seq:
                merged[purpose] = entry
        folded[new] = merged
    return folded


_CONTRACT = Basis(True)
_REFUSED_IN_EVENT = Basis(False, reason="refused_in_event")
_WITHDRAWN = Basis(False, reason="withdrawn")
_MINOR = Basis(False, reason="minor_without_guardian")
_RECONSENT = Basis(False, reason="needs_reconsent")


def purpose_basis(
    purpose: str,
    query: ConsentQuery,
    state: SubjectState,
    *,
    contract_purposes: frozenset[str] = CONTRACT_PURPOSES_DEFAULT,
    notice_floor: Mapping[str, int] | None = None,
) -> Basis:
    """Whether ``purpose`` has a lawful basis for the event's subject right now."""
    return _Subject(query, state).basis(purpose, contract_purposes, notice_floor or {})


def decide(
    query: ConsentQuery,
    destinations: Sequence[DestinationSpec],
    state: SubjectState,
    *,
    contract_purposes: frozenset[str] = CONTRACT_PURPOSES_DEFAULT,
    notice_floor: Mapping[str, int] | None = None,
    epoch: int = 0,
    want_linking: bool = True,
) -> ConsentDecision:
    """Route one event: the destinations allowed, their proof, or why it goes nowhere.

    ``want_linking`` False skips the identity_linking question when nobody will link."""
    floor = notice_floor or {}
    subject = _Subject(query, state)
    cache: dict[str, Basis] = {}
    allowed: list[str] = []
    proof: set[int] = set()
    first_reason: str | None = None
    event_purposes = query.purposes
    for dest in destinations:
        if not any(p in dest.purposes for p in event_purposes):
            continue  # the event is not collected for anything this destination does
        failing: Basis | None = None
        relied: list[int] = []
        for p in dest.required_purposes:
            b = cache.get(p)
            if b is None:
                b = cache[p] = subject.basis(p, contract_purposes, floor)
            if not b.ok:
                failing = b
                break
            if b.proof is not None:
                relied.append(b.proof)
        if failing is not None:
            first_reason = first_reason or failing.reason
            continue
        allowed.append(dest.id)
        proof.update(relied)
    linking = want_linking and subject.basis("identity_linking", contract_purposes, floor).ok
    strip = False
    if query.has_sensitive:
        sensitive = subject.basis("sensitive_pi", contract_purposes, floor)
        strip = not sensitive.ok
        if sensitive.proof is not None and allowed:
            proof.add(sensitive.proof)
    if not allowed:
        reason = first_reason or "no_destination"
        return ConsentDecision((), dropped_reason=reason, linking_allowed=linking, epoch=epoch)
    personalised = cache.get(PERSONALISATION) or subject.basis(PERSONALISATION, contract_purposes, floor)
    return ConsentDecision(
        tuple(allowed),
        tuple(sorted(proof)) if len(proof) > 1 else tuple(proof),
        linking_allowed=linking,
        strip_sensitive=strip,
        epoch=epoch,
        personalised=personalised.ok,
    )


class ConsentPolicy(Protocol):
    enforced: bool

    async def decide_batch(
        self,
        queries: Sequence[ConsentQuery],
        destinations: Sequence[DestinationSpec],
        *,
        want_linking: bool = True,
    ) -> list[ConsentDecision]: ...

    async def erased(self, tenant: str, identifiers: Sequence[str]) -> set[str]:
        """Which of these pseudonyms are on the suppression list (consent.suppression)."""
        ...
