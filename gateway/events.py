"""The internal event model every protocol adapter decodes into, and the per-batch envelope.

``Event`` is what leaves the gateway (Segment spec field names, camelCase) after its
identifiers were pseudonymised and its properties scrubbed. ``Envelope`` carries what the
pipeline learns about an event on its way (identifiers, purposes, destinations, proof) and
is never serialised as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from consent.decisions import ConsentTicket
from identity.assertions import CLIENT, Standing
from identity.identifiers import Identifier


class Event(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    type: str
    message_id: str
    timestamp: datetime
    received_at: datetime
    original_timestamp: datetime | None = None
    sent_at: datetime | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    previous_id: str | None = None
    group_id: str | None = None
    event: str | None = None
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: dict[str, Any] = {}
    integrations: dict[str, Any] | None = None


class RawIdentifier(NamedTuple):
    """An identifier as a protocol adapter found it, before pseudonymisation."""

    type: str
    value: str | int
    scope: str | None = None


@dataclass(slots=True)
class Envelope:
    event: Event
    index: int
    # Pseudonymised identifiers found in the event (filled by pseudonymise_identifiers).
    identifiers: list[Identifier] = field(default_factory=list)
    # Every pseudonym written into the event (what delivery re-keys per destination).
    pseudonyms: set[str] = field(default_factory=set)
    # Key rotation: pseudonym of a linkable identifier under the active key -> its
    # pseudonyms under the older live versions, newest first (empty with one live version).
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Identifiers the event asks to detach from their person (a Sensors track_id_unbind):
    # raw from the adapter, pseudonymised by pseudonymise_identifiers into ``detach``.
    unbind: list[RawIdentifier] = field(default_factory=list)
    detach: list[Identifier] = field(default_factory=list)
    purposes: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    # Ledger sequence numbers of the consent records that allowed the forward.
    consent_proof: tuple[int, ...] = ()
    # Whether the subject may be personalised for (PIPL Art. 24): None where consent is not
    # enforced (a dev tenant), else written to context.idgate.personalisation.
    personalised: bool | None = None
    unified_id: str | None = None
    # Whether consent let the identity graph link the event's identifiers (identity_linking):
    # without it the event's person is its own device or account alone (the KPIs say so).
    linkable: bool = False
    # What the consent decision was asked (and when), kept so delivery can ask again.
    consent_ticket: ConsentTicket | None = None
    # What the sender proved (server source, or a client with a signed identity assertion),
    # and the identifiers it named without proof (person-level ones from a client source):
    # those never carry consent, never set flags, and never link (by default).
    standing: Standing = CLIENT
    unproven: list[Identifier] = field(default_factory=list)
    # Pseudonyms of the openids the event names of an appid its client source does not hold
    # (Source.wechat_appids): another app's users, never the sender's own device.
    foreign: set[str] = field(default_factory=set)
    # The raw identity assertion (a JWT), taken out of the event before anything is stored.
    assertion_token: object = None
    # What the tracking plan found in a flagged event: delivered in context.idgate.violations
    # (gateway.plan.Violation items; idgate writes context.idgate, a client's is replaced).
    plan_violations: list[Any] = field(default_factory=list)
    # What data cleaning (gateway.cleaning) found in a kept event: delivered in
    # context.idgate.flags (e.g. timestamp_skew).
    flags: list[str] = field(default_factory=list)
    # How many identifiers the tenant's blocked values and patterns left out.
    blocked: int = 0
    # The tracking plan's event id it matched ("" when unplanned or without a plan): one name
    # across protocols, delivered in context.idgate.event.
    plan_event: str = ""
    # Which request of a coalesced batch the event came in (IngestBatch.results): 0 for a
    # batch of one request. ``index`` is its position within that request.
    request: int = 0


class Rejection(msgspec.Struct, omit_defaults=True):
    """One message of a request that was not accepted, and why."""

    index: int
    error: str
    detail: str
    field: str | None = None
    message_id: str | None = msgspec.field(default=None, name="messageId")


class RejectMessage(Exception):
    """Raised by a pipeline stage for one message; the rest of the batch goes on."""

    def __init__(self, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.field = field
