"""The ingest pipeline: an explicit, ordered list of named stages over one batch.

    clean_traffic -> pseudonymise -> drop_erased -> check_plan -> claim_message_ids -> rekey_on_sight
    -> record_consent_signals -> decide_consent -> limit_new_identifiers -> resolve_identity
    -> collapse_exposures -> transform -> encode -> append -> detach_identifiers -> observe_kpis

Protocol adapters (gateway.segment, gateway.sensors) decode a request into envelopes of the
one internal ``Event``; ``Ingestor.ingest`` then runs ``STAGES`` in order over the batch.
Each stage is a named function of (dependencies, batch) that can be run alone in a test.

- Raw identifiers exist only between decode and ``pseudonymise``; every later stage, and
  everything stored, sees pseudonyms.
- Dedupe (``claim_message_ids``) comes before any side effect: a retried batch records no
  consent, links nothing and appends nothing twice. Claimed ids are confirmed by the
  append; if the request fails before it, they are released so the retry is accepted.
- ``append`` is the ack point: the request is answered after the outbox holds the records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, overload

import msgspec
import structlog

from consent.decisions import ConsentDecision, ConsentPolicy, ConsentQuery, ConsentTicket, DestinationSpec
from consent.service import ConsentRefused, ConsentService
from consent.signals import (
    CONSENT_PREFERENCE_EVENT,
    choice_from_categories,
    is_minor_age,
    narrowed_purposes,
    signalled,
)
from export.outbox import Claim, ClaimStatus, Outbox, OutboxRecord, notice_record, scoped_message_id
from export.violations import PlanFinding, ViolationRecord, ViolationStore
from gateway import metrics
from gateway.cleaning import TIMESTAMP_SKEW, RequestOrigin, cleaner_for, drop_reason
from gateway.config import Destination, ResolvedSource, Tenant
from gateway.events import Envelope, Event, Rejection, RejectMessage
from gateway.exposures import EXPOSURE_REPEAT, EXPOSURE_REPEAT_ITEMS, ExposureStore, sighting_keys
from gateway.exposures import message_digest as exposure_message
from gateway.plan import (
    UNPLANNED,
    PlanReport,
    PlanVerdict,
    judge,
    lookup_key,
    plan_for,
    planned_purposes,
    policy_for,
    sensitive_keys,
)
from gateway.plan_monitor import PlanMonitor, TailEntry
from gateway.privacy import (
    SAFE_CONTEXT,
    EventScrubber,
    clean_message_id,
    message_id_digest,
    scrubber_for,
    url_pseudonymiser,
)
from gateway.rate_limits import RateLimited, RateLimiter
from identity.assertions import AssertionVerifier, standing
from identity.graph import GraphChange
from identity.identifiers import DEVICE_TYPES, IDENTIFIER_TYPES, SCOPED_TYPES, Identifier, InvalidIdentifier
from identity.notices import notices_for_changes
from identity.pseudonym import (
    MESSAGE_ID,
    KeyRing,
    Pseudonymiser,
    pseudonymise_identifier,
    pseudonymise_identifier_aliases,
)
from identity.resolution import IdentityResolver
from identity.scrub import truncate_ip
from identity.service import IdentityService

log = structlog.get_logger("idgate.ingest")

# Where identifiers come from in an event beyond userId / anonymousId / previousId and
# context.externalIds: trait and property keys, and context.device fields.
TRAIT_IDENTIFIER_TYPES = {"phone": "phone", "mobile": "phone", "email": "email"}
DEVICE_FIELD_TYPES = {"id": "device_id", "advertisingId": "advertising"}  # advertising: IDFA or OAID by OS
_field_maps: dict[int, tuple[dict[str, str], dict[str, str]]] = {}


def field_maps(tenant: Tenant) -> tuple[dict[str, str], dict[str, str]]:
    """Where identifiers come from for this tenant: trait/property keys and context.device
    fields (defaults above, extended by ``[tenants.identity]`` in the config)."""
    maps = _field_maps.get(id(tenant))
    if maps is None:
        traits = {**TRAIT_IDENTIFIER_TYPES, **{k.lower(): v for k, v in tenant.identity.trait_types.items()}}
        device = {**DEVICE_FIELD_TYPES, **tenant.identity.device_fields}
        maps = _field_maps[id(tenant)] = (traits, device)
    return maps


# -- stage: pseudonymise ---------------------------------------------------------------------
def pseudonymise_identifiers(
    env: Envelope,
    tenant: Tenant,
    pseudonymiser: Pseudonymiser,
    older: tuple[Pseudonymiser, ...] = (),
    alias_cache: dict[str, tuple[str, ...]] | None = None,
    message_ids: Pseudonymiser | None = None,
    blocked: Callable[[object], bool] | None = None,
    own_appids: frozenset[str] | None = None,
) -> None:
    """Normalise every identifier field, replace it by its pseudonym, collect the linkable ones.

    Junk values (``null``, all-zero IDFA, ...) in the id fields are removed; a value that
    is personal but not a valid identifier (a malformed phone) is pseudonymised and not
    linked. Every pseudonym written is recorded in ``env.pseudonyms``. Raises
    RejectMessage when no usable userId/anonymousId is left.

    While older key versions are live (``older``), each linkable identifier's pseudonyms
    under them are recorded in ``env.aliases`` (consent and identity look-ups use them; they
    are never written into the event).

    ``blocked`` (the tenant's blocked identifier values and patterns, gateway.cleaning):
    such an identifier is left out like junk, and counted in ``env.blocked``.

    ``own_appids`` (a client source's ``wechat_appids``): an openid of another appid is
    recorded in ``env.foreign`` (another app's user, not the sender's device).
    """
    ev = env.event
    found = env.identifiers
    written = env.pseudonyms
    foreign = env.foreign
    # before dedupe claims it: a message id is stored (claims, proofs) and forwarded
    ev.message_id = clean_message_id(ev.message_id, message_ids or pseudonymiser)

    def link(id_type: str, raw: Any, scope: str | None = None) -> str | None:
        if blocked is not None and blocked(raw):
            env.blocked += 1
            return None
        try:
            if older:
                ident, aliases = pseudonymise_identifier_aliases(
                    pseudonymiser, older, id_type, raw, scope=scope, cache=alias_cache
                )
                env.aliases[ident.value] = aliases
            else:
                ident = pseudonymise_identifier(pseudonymiser, id_type, raw, scope=scope)
        except InvalidIdentifier:
            return None
        found.append(ident)
        written.add(ident.value)
        if own_appids is not None and scope is not None and scope not in own_appids:
            foreign.add(ident.value)
        return ident.value

    def opaque(raw: Any) -> str:
        value = pseudonymiser(str(raw).strip())
        written.add(value)
        return value

    if ev.user_id is not None:
        ev.user_id = link("user_id", ev.user_id)
    if ev.anonymous_id is not None:
        ev.anonymous_id = link("anonymous_id", ev.anonymous_id)
    if ev.user_id is None and ev.anonymous_id is None:
        raise RejectMessage("missing_identity", "userId/anonymousId hold no usable identifier", "userId")
    if ev.previous_id is not None:
        # The previous id may have been a userId or an anonymousId; pseudonyms do not carry
        # the type, so it matches either.
        try:
            previous = pseudonymise_identifier(pseudonymiser, "user_id", ev.previous_id)
        except InvalidIdentifier as exc:
            raise RejectMessage("invalid_identifier", f"previousId: {exc.reason}", "previousId") from None
        ev.previous_id = previous.value
        written.add(previous.value)

    trait_types, device_types = field_maps(tenant)

    def link_trait(id_type: str, value: str | int) -> str:
        """Trait and property keys that name an identifier type (``trait_types``): linked
        (or, when not a valid identifier of that type, pseudonymised)."""
        return link(id_type, value) or opaque(value)

    ctx = ev.context
    device = ctx.get("device")
    if isinstance(device, dict):
        device = dict(device)
        os_name = str(
            (ctx.get("os") or {}).get("name", "") if isinstance(ctx.get("os"), dict) else ""
        ).lower()
        for key, id_type in device_types.items():
            if id_type == "advertising":
                id_type = "idfa" if "ios" in os_name else "oaid"
            if key in device:
                linked = link(id_type, device[key])
                if linked is None:
                    del device[key]
                else:
                    device[key] = linked
        ctx["device"] = device
    external = ctx.get("externalIds")
    if isinstance(external, list):
        cleaned = []
        for item in external:
            if not isinstance(item, dict) or "id" not in item:
                continue
            ext_type = str(item.get("type", ""))
            ext_id_type: str | None = tenant.external_id_types.get(ext_type) or (
                ext_type if ext_type in IDENTIFIER_TYPES else None
            )
            scope = str(item["appid"]) if item.get("appid") else None
            value: str | None
            if ext_id_type is None or (ext_id_type in SCOPED_TYPES and scope is None):
                # an unknown type, or an openid without its appid: kept pseudonymised, never linked
                value = opaque(item["id"])
            else:
                value = link(ext_id_type, item["id"], scope)  # junk (``null``, all-zero ids) is dropped
            if value is not None:
                cleaned.append({**item, "id": value})
        ctx["externalIds"] = cleaned
    # Every key and string of traits and properties (any depth): identifier-like keys
    # pseudonymised, URLs' identifier parameters pseudonymised, the rest scrubbed. The
    # rest of the context is cleaned by scrub_personal_data.
    clean = scrubber_for(tenant).clean
    in_url = url_pseudonymiser(pseudonymiser)
    if ev.traits is not None:
        ev.traits = clean(ev.traits, None, written, opaque, in_url, trait_types, link_trait)
    if isinstance(ctx.get("traits"), dict):
        ctx["traits"] = clean(ctx["traits"], None, written, opaque, in_url, trait_types, link_trait)
    if ev.properties is not None:
        ev.properties = clean(ev.properties, None, written, opaque, in_url, trait_types, link_trait)
    if env.unbind:
        detached = []
        for raw in env.unbind:
            try:
                ident = pseudonymise_identifier(pseudonymiser, raw.type, raw.value, scope=raw.scope)
            except InvalidIdentifier:
                continue
            detached.append(ident)
            written.add(ident.value)
            if own_appids is not None and raw.scope is not None and raw.scope not in own_appids:
                foreign.add(ident.value)
        env.detach = detached
        sensors = ctx.get("sensors")
        if isinstance(sensors, dict):
            sensors["unbind"] = [{"type": i.type, "id": i.value} for i in detached]


# -- what the sender proved ------------------------------------------------------------------
# Where an identity assertion (a JWT from the shop's backend) travels in an event: Segment
# context.identityAssertion; Sensors (and any SDK with super properties) the
# $identity_assertion property. Taken out before anything is stored: it holds raw identifiers.
ASSERTION_CONTEXT_KEY = "identityAssertion"
ASSERTION_PROPERTY_KEYS = ("$identity_assertion", "identity_assertion")
# Events whose identifiers are assertions in themselves: a refusal is answered per message.
_ASSERTING_TYPES = frozenset({"identify", "alias"})


def take_assertion(env: Envelope) -> None:
    ev = env.event
    token = ev.context.pop(ASSERTION_CONTEXT_KEY, None)
    for fields in (ev.properties, ev.traits):  # Sensors profile calls carry it as a trait
        if fields:
            for key in ASSERTION_PROPERTY_KEYS:
                found = fields.pop(key, None)
                if token is None:
                    token = found
    env.assertion_token = token


def establish_standing(
    env: Envelope,
    src: ResolvedSource,
    verifier: AssertionVerifier | None,
    pseudonymiser: Pseudonymiser,
    now: float,
) -> None:
    """What this event's sender proved; a client may only detach its own device's identifiers."""
    env.standing = standing(
        server=src.source.is_server,
        verifier=verifier,
        token=env.assertion_token,
        identifiers=env.identifiers,
        pseudonymiser=pseudonymiser,
        now=now,
        foreign=frozenset(env.foreign),
    )
    env.assertion_token = None
    if env.standing.server:
        return
    _, env.unproven = env.standing.split(env.identifiers)
    if env.detach:
        own = set(env.identifiers)
        proves = env.standing.proves
        kept = [i for i in env.detach if proves(i) and (i.type not in DEVICE_TYPES or i in own)]
        if len(kept) != len(env.detach):
            env.unproven.extend(i for i in env.detach if i not in kept)
            env.detach = kept
            sensors = env.event.context.get("sensors")
            if isinstance(sensors, dict):
                sensors["unbind"] = [{"type": i.type, "id": i.value} for i in kept]


def proven_identifiers(env: Envelope) -> list[tuple[str, str]]:
    """(type, pseudonym) of the identifiers the sender proved: what consent may be recorded on."""
    proves = env.standing.proves
    return [(i.type, i.value) for i in env.identifiers if proves(i)]


# -- stage: transform ---------------------------------------------------------------------
def scrub_personal_data(env: Envelope, tenant: Tenant, pseudonymiser: Pseudonymiser) -> None:
    """What ``pseudonymise_identifiers`` left: truncate the IP; clean every key and string
    of the context (but its traits, already cleaned) and integrations, the event name, the
    page/screen name and category and the group id. Only pseudonyms and the values
    ``gateway.privacy.SAFE_CONTEXT`` allows pass unscrubbed."""
    ev = env.event
    ctx = ev.context
    ip = ctx.get("ip")
    if ip is not None:
        truncated = truncate_ip(str(ip))
        if truncated is None:
            del ctx["ip"]
        else:
            ctx["ip"] = truncated
    scrubber = scrubber_for(tenant)
    written = env.pseudonyms
    in_url = url_pseudonymiser(pseudonymiser)

    def opaque(raw: Any) -> str:
        value = pseudonymiser(str(raw).strip())
        written.add(value)
        return value

    clean = scrubber.clean
    traits = ctx.pop("traits", None)
    ev.context = clean(ctx, SAFE_CONTEXT, written, opaque, in_url)
    if traits is not None:
        ev.context["traits"] = traits
    if ev.integrations:
        ev.integrations = clean(ev.integrations, None, written, opaque, in_url)
    if ev.event:
        ev.event = scrubber.name(ev.event)
    if ev.name:
        ev.name = scrubber.text(ev.name, in_url)
    if ev.category:
        ev.category = scrubber.text(ev.category, in_url)
    if ev.group_id is not None:
        ev.group_id = scrubber.text(ev.group_id, in_url)


def strip_sensitive(env: Envelope, tenant: Tenant) -> None:
    """Remove properties classified sensitive (no sensitive_pi consent)."""
    ev = env.event
    for fields in (ev.properties, ev.traits):
        if fields:
            for key in sensitive_keys(tenant):
                fields.pop(key, None)


# -- stage: decide_consent -------------------------------------------------------------------
def purposes_of(env: Envelope, tenant: Tenant) -> tuple[str, ...]:
    """What the tracking plan says this event is collected for."""
    ev = env.event
    planned = planned_purposes(tenant, lookup_key(ev.type, ev.event, ev.name))
    if planned is not None:
        return planned
    return tenant.purposes_for(ev.event if ev.type == "track" and ev.event else f"${ev.type}")


def consent_query(env: Envelope, tenant: Tenant, linked: tuple[str, ...] = ()) -> ConsentQuery:
    ev = env.event
    env.purposes = purposes_of(env, tenant)
    device: list[str] = []
    person: list[str] = []
    unproven = env.unproven
    for ident in env.identifiers:
        if unproven and ident in unproven:
            continue
        if ident.type in DEVICE_TYPES:
            device.append(ident.value)
        else:
            person.append(ident.value)
    if unproven:  # named without proof: their withdrawals count, their grants do not
        linked = linked + tuple(i.value for i in unproven)
    # key rotation: each identifier's older-version pseudonyms fold into it (same standing)
    aliases = tuple((old, new) for new, olds in env.aliases.items() for old in olds) if env.aliases else ()
    sensitive = False
    keys = sensitive_keys(tenant)
    if keys:
        sensitive = any(fields and any(k in fields for k in keys) for fields in (ev.properties, ev.traits))
    return ConsentQuery(
        tenant=tenant.id,
        device_ids=tuple(device),
        user_ids=tuple(person),
        purposes=env.purposes,
        narrowed=narrowed_purposes(ev.context, tenant.consent_categories),
        linked_ids=linked,
        has_sensitive=sensitive,
        aliases=aliases,
    )


def destination_specs(destinations: Sequence[Destination]) -> list[DestinationSpec]:
    return [
        DestinationSpec(
            id=d.id,
            purposes=tuple(d.purposes),
            overseas=d.region == "overseas",
            third_party=bool(d.recipient and d.recipient.third_party),
        )
        for d in destinations
    ]


# -- stage: encode ---------------------------------------------------------------------------
def encode_for_outbox(
    env: Envelope, src: ResolvedSource, key_version: int, encoder: msgspec.json.Encoder
) -> OutboxRecord:
    ev = env.event
    ctx = ev.context
    ctx["idgate"] = {
        "tenant": src.tenant.id,
        "source": src.source.id,
        "platform": src.source.platform,
        "keyVersion": key_version,
        "purposes": list(env.purposes),
        "consentProof": list(env.consent_proof),
    }
    if env.personalised is not None:  # decide_consent: PIPL Art. 24
        ctx["idgate"]["personalisation"] = env.personalised
    if env.plan_violations:  # flagged by check_plan
        ctx["idgate"]["violations"] = env.plan_violations
    if env.flags:  # flagged by clean_traffic, collapse_exposures
        ctx["idgate"]["flags"] = env.flags
    if env.plan_event:  # the tracking plan's name for it, whichever SDK sent it (check_plan)
        ctx["idgate"]["event"] = env.plan_event
    pseudonyms = env.pseudonyms
    if env.unified_id is not None:
        ctx["unified_id"] = env.unified_id
        pseudonyms.add(env.unified_id)
    return OutboxRecord(
        tenant=src.tenant.id,
        source=src.source.id,
        message_id=ev.message_id,
        received_at_ms=int(ev.received_at.timestamp() * 1000),
        destinations=env.destinations,
        payload=encoder.encode(ev),
        consent=encoder.encode(env.consent_ticket) if env.consent_ticket is not None else b"",
        proof=env.consent_proof,
        person=env.unified_id or "",
        pseudonyms=tuple(sorted(pseudonyms)),
    )


# -- the batch and its stages ------------------------------------------------------------------
@dataclass
class IngestResult:
    received: int
    accepted: int = 0
    duplicates: int = 0
    in_flight: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    # Assertions the sender could not back (unproven identifiers, a bad identity assertion):
    # the events went on without them.
    refused: list[Rejection] = field(default_factory=list)
    # Messages that broke the tenant's tracking plan (gateway.plan), delivered or kept.
    plan_violations: list[PlanReport] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "success": self.accepted > 0 or not self.rejected,
            "received": self.received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "dropped": dict(self.dropped),
        }
        if self.in_flight:
            out["inFlight"] = self.in_flight
        if self.refused:
            out["refusedAssertions"] = self.refused
        if self.plan_violations:
            out["planViolations"] = self.plan_violations
        return out

    def merge(self, other: IngestResult) -> None:
        """Add the counts of a part of the same request."""
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.in_flight += other.in_flight
        self.rejected.extend(other.rejected)
        self.dropped.update(other.dropped)
        self.refused.extend(other.refused)
        self.plan_violations.extend(other.plan_violations)


@dataclass
class IngestBatch:
    """One request's events on their way through the stages, or several small requests' of
    one source run as one batch (``Ingestor``): each event's ``request`` names whose result
    and origin are its own."""

    src: ResolvedSource
    envelopes: list[Envelope]
    # per request (by Envelope.request; one request: [its result]): what it is answered
    results: list[IngestResult]
    pseudonymiser: Pseudonymiser
    # the older live key versions, newest first (empty: one version, no alias look-ups)
    older: tuple[Pseudonymiser, ...] = ()
    # message-id digests: the anchor version's own derivation, stable across rotations
    message_ids: Pseudonymiser | None = None
    # set by claim_message_ids: the claim to confirm with the append (or release)
    claim: Claim | None = None
    # the envelopes past the claim, whatever happened to them later (detach works on these)
    claimed: list[Envelope] = field(default_factory=list)
    linking: list[bool] = field(default_factory=list)
    # merges and splits this batch caused: their notices follow its events
    changes: list[GraphChange] = field(default_factory=list)
    records: list[OutboxRecord] = field(default_factory=list)
    appended: bool = False
    # per request: its User-Agent and client address (gateway.cleaning: checked, never stored)
    origins: list[RequestOrigin | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = [None] * len(self.results)

    def reject(self, env: Envelope, error: str, detail: str, field_name: str | None) -> None:
        self.results[env.request].rejected.append(
            Rejection(env.index, error, detail, field_name, env.event.message_id)
        )

    def refuse_assertion(self, env: Envelope, reason: str, detail: str, field_name: str | None) -> None:
        """An assertion the sender could not back (the event itself goes on)."""
        self.results[env.request].refused.append(
            Rejection(env.index, reason, detail, field_name, env.event.message_id)
        )
        metrics.INGEST.add("refused_assertion", (self.src.tenant.id, reason))

    def drop(self, env: Envelope, reason: str) -> None:
        self.results[env.request].dropped[reason] += 1
        metrics.INGEST.add("dropped", (self.src.tenant.id, reason))


@dataclass
class IngestServices:
    """What the stages use, wired once by the app."""

    keyring: KeyRing
    outbox: Outbox
    consent: ConsentPolicy
    resolver: IdentityResolver
    consent_service: ConsentService | None = None
    identity: IdentityService | None = None
    # quotas per person (gateway.rate_limits); None: unlimited
    rate_limiter: RateLimiter | None = None
    encoder: msgspec.json.Encoder = field(default_factory=msgspec.json.Encoder)
    specs: dict[str, list[DestinationSpec]] = field(default_factory=dict)
    # (tenant, source) -> how its identity assertions are checked (client sources with keys)
    assertions: Mapping[tuple[str, str], AssertionVerifier] = field(default_factory=dict)
    # key rotation: active pseudonym -> its pseudonyms under the older live versions
    alias_cache: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # where the tracking plan's blocked and omitted events are recorded
    violations: ViolationStore | None = None
    # the tracking plan's live tail and coverage counts (gateway.plan_monitor)
    plan_monitor: PlanMonitor | None = None
    # business KPIs over the batch once appended (gateway.monitoring.KpiFeed)
    kpis: Callable[[IngestBatch], Awaitable[None]] | None = None
    # exposure sightings (gateway.exposures); None: exposures are not deduplicated
    exposures: ExposureStore | None = None


Stage = Callable[[IngestServices, IngestBatch], Awaitable[None]]


async def clean_traffic(s: IngestServices, batch: IngestBatch) -> None:
    """Data cleaning before anything else (gateway.cleaning): bots and crawlers (``bot``) and
    events from internal networks (``internal``) dropped and counted; timestamps far from
    the receipt time flagged (``timestamp_skew``)."""
    tenant = batch.src.tenant
    cleaner = cleaner_for(tenant)
    kept = []
    for env in batch.envelopes:
        reason = drop_reason(env.event, batch.src, batch.origins[env.request], cleaner)
        if reason is not None:
            batch.drop(env, reason)
            continue
        if cleaner.has_skewed_timestamp(env.event):
            env.flags.append(TIMESTAMP_SKEW)
            metrics.INGEST.add("flagged", (tenant.id, TIMESTAMP_SKEW))
        kept.append(env)
    batch.envelopes = kept


def refuse_unproven(batch: IngestBatch, env: Envelope) -> None:
    """Answer (and count) what the event asked for identifiers its client source cannot
    back: person-level ones without an assertion, openids of an appid it does not hold."""
    foreign = [i for i in env.unproven if env.standing.is_foreign(i)]
    if foreign:
        batch.refuse_assertion(
            env,
            "foreign_appid",
            "wechat_openid: an openid of an appid this source does not list in wechat_appids is "
            "another app's user: this client cannot link, unbind or record consent for it",
            "context.externalIds",
        )
    if len(foreign) < len(env.unproven):
        types = sorted({i.type for i in env.unproven if not env.standing.is_foreign(i)})
        batch.refuse_assertion(
            env,
            "unproven_identifier",
            f"{', '.join(types)}: a client source needs a signed identity assertion to link, "
            "unbind or record consent for a person-level identifier",
            "userId",
        )


async def pseudonymise(s: IngestServices, batch: IngestBatch) -> None:
    """Identifiers replaced by pseudonyms, and what the sender proved about them."""
    kept = []
    src = batch.src
    verifier = s.assertions.get((src.tenant.id, src.source.id))
    # with the tenant's "unowned" rule, an unproven claim may still link (the graph decides)
    unowned = src.tenant.identity.client_links == "unowned"
    now = time.time()
    cleaner = cleaner_for(src.tenant)
    blocked = cleaner.is_blocked_identifier if cleaner.blocks_identifiers else None
    internal = cleaner.internal_pseudonyms(batch.pseudonymiser) if cleaner.config.internal_ids else None
    own_appids = src.source.own_appids
    for env in batch.envelopes:
        take_assertion(env)
        try:
            pseudonymise_identifiers(
                env,
                src.tenant,
                batch.pseudonymiser,
                batch.older,
                s.alias_cache,
                batch.message_ids,
                blocked,
                own_appids=own_appids,
            )
        except RejectMessage as exc:
            if env.blocked:
                metrics.INGEST.add("identifier_blocked", (src.tenant.id,), env.blocked)
            batch.reject(env, exc.error, exc.detail, exc.field)
            continue
        if env.blocked:
            metrics.INGEST.add("identifier_blocked", (src.tenant.id,), env.blocked)
        if internal and any(i.value in internal for i in env.identifiers):
            batch.drop(env, "internal")  # a QA account's event (gateway.cleaning)
            continue
        establish_standing(env, src, verifier, batch.pseudonymiser, now)
        refused = env.standing.refused
        if refused is not None:
            batch.refuse_assertion(env, refused.reason, refused.detail, f"context.{ASSERTION_CONTEXT_KEY}")
        if env.unproven and (
            (env.event.type in _ASSERTING_TYPES and not unowned) or env.unbind or _is_consent_event(env)
        ):
            refuse_unproven(batch, env)
        kept.append(env)
    batch.envelopes = kept


async def drop_erased(s: IngestServices, batch: IngestBatch) -> None:
    """The suppression list (consent.suppression): an event naming an identifier a deletion
    request erased is dropped (``erased``) before anything of it is stored, whatever the
    consent state of its purposes."""
    envs = batch.envelopes
    if not envs:
        return

    def named(env: Envelope) -> list[str]:
        # while older key versions are live, an identifier erased under one of them counts
        values = [i.value for i in env.identifiers]
        return values + [old for v in values for old in env.aliases.get(v, ())] if env.aliases else values

    erased = await s.consent.erased(
        batch.src.tenant.id, list(dict.fromkeys(v for e in envs for v in named(e)))
    )
    if not erased:
        return
    kept = []
    for env in envs:
        if any(v in erased for v in named(env)):
            batch.drop(env, "erased")
        else:
            kept.append(env)
    batch.envelopes = kept


def _proven(env: Envelope) -> list[Identifier]:
    if not env.unproven:
        return env.identifiers
    return [i for i in env.identifiers if i not in env.unproven]


def _is_consent_event(env: Envelope) -> bool:
    ctx = env.event.context
    return env.event.event == CONSENT_PREFERENCE_EVENT or "consent" in ctx or "consentManagement" in ctx


_decode_event = msgspec.json.Decoder(Event).decode
_REPORTED: Final[dict[str, Literal["delivered", "omitted", "kept"]]] = {
    "flag": "delivered",
    "omit": "omitted",
    "block": "kept",
}


async def check_plan(s: IngestServices, batch: IngestBatch) -> None:
    """The tenant's tracking plan (gateway.plan) under the source's policy: each event counted
    (seen, valid, violations by event and rule) and each violation reported per message.
    ``flag`` forwards the event with ``context.idgate.violations``; ``omit`` removes the bad
    properties and forwards it; ``block`` keeps it as a violation record instead. Omitted and
    blocked events are recorded (scrubbed like a stored event). Before the dedupe claim, so a
    replay after a fix is not taken for a duplicate."""
    src = batch.src
    tenant = src.tenant
    plan = plan_for(tenant)
    if plan is None or not batch.envelopes:
        return
    policy = policy_for(tenant, src.source)
    add = metrics.INGEST.add
    labels = (tenant.id, src.source.id)
    monitor = s.plan_monitor
    now_ms = int(time.time() * 1000)
    scrubber = scrubber_for(tenant)
    kept: list[Envelope] = []
    held: list[ViolationRecord] = []
    # each held record's event (whose request is told when no store keeps it)
    held_from: dict[int, Envelope] = {}
    # (plan event or unplanned, unplanned name) -> [seen, valid]: counted once per batch
    counts: dict[tuple[str, str], list[int]] = {}
    for env in batch.envelopes:
        ev = env.event
        key = lookup_key(ev.type, ev.event, ev.name)
        if key is None:
            kept.append(env)
            continue
        verdict = judge(plan, key, ev.properties, env.pseudonyms, policy)
        if verdict.event != UNPLANNED:
            env.plan_event = verdict.event  # "" for an ignored name
        name = _unplanned_name(ev, key, scrubber, batch.pseudonymiser) if verdict.event == UNPLANNED else ""
        if verdict.event:
            cell = counts.get((verdict.event, name))
            if cell is None:
                cell = counts[(verdict.event, name)] = [0, 0]
            cell[0] += 1
            cell[1] += verdict.action == "pass" and not name
        if verdict.action == "pass":
            kept.append(env)
            continue
        found = verdict.violations
        for v in found:
            add("plan_violation", (*labels, verdict.event, v.rule))
        action = _REPORTED[verdict.action]
        batch.results[env.request].plan_violations.append(
            PlanReport(env.index, verdict.event, action, found, ev.message_id)
        )
        if monitor is not None:
            tail = TailEntry(now_ms, src.source.id, verdict.event, action, found, name, ev.message_id)
            monitor.note(tenant.id, tail)
        if verdict.action == "flag":
            env.plan_violations = found  # context.idgate.violations (encode_for_outbox)
            kept.append(env)
            continue
        if verdict.action == "block":
            scrub_personal_data(env, tenant, batch.pseudonymiser)
            held.append(record := _violation_record(s, batch, env, verdict, plan.version))
            held_from[id(record)] = env
            continue
        # omit: the record keeps the event as it came (scrubbed on a copy: the event goes on
        # to the transform stage, which scrubs it once)
        as_sent = dataclasses.replace(
            env, event=_decode_event(s.encoder.encode(ev)), pseudonyms=set(env.pseudonyms)
        )
        scrub_personal_data(as_sent, tenant, batch.pseudonymiser)
        held.append(record := _violation_record(s, batch, as_sent, verdict, plan.version))
        held_from[id(record)] = env
        props = ev.properties or {}
        for prop in verdict.omit:
            props.pop(prop, None)
        kept.append(env)
    for (event, name), (seen, valid) in counts.items():
        add("plan_seen", (*labels, event), seen)
        if valid:
            add("plan_valid", (*labels, event), valid)
        if monitor is not None:
            monitor.count(tenant.id, src.source.id, event, name, seen=seen, valid=valid, at_ms=now_ms)
    if held and s.violations is None:  # nowhere to keep them (a bare pipeline): refused, the client knows
        _refuse_unkept(batch, held, held_from, "breaks the tracking plan")
    elif held and s.violations is not None:
        unkept = await asyncio.to_thread(s.violations.keep, held)
        if unkept:  # the store is at its bound: the client is told, nothing is lost silently
            log.warning("plan.violation_store_full", tenant=tenant.id, records=len(unkept))
            _refuse_unkept(batch, unkept, held_from, "breaks the tracking plan; the violation store is full")
            held = [r for r in held if r not in unkept]
        blocked = sum(1 for r in held if r.action == "kept")
        if blocked:
            add("plan_kept", labels, blocked)
        if len(held) > blocked:
            add("plan_omitted", labels, len(held) - blocked)
    batch.envelopes = kept
    if monitor is not None:
        await monitor.flush_if_due()


def _refuse_unkept(
    batch: IngestBatch, records: Sequence[ViolationRecord], held_from: Mapping[int, Envelope], detail: str
) -> None:
    """Blocked events no store kept: rejected to the client (which may send them again)."""
    for record in records:
        if record.action == "kept":
            batch.reject(held_from[id(record)], "plan_violation", detail, "properties")


def _unplanned_name(ev: Event, key: str, scrubber: EventScrubber, pseudonymiser: Pseudonymiser) -> str:
    """An unplanned event's name as counted and tailed, cleaned like the stored event's: a
    track's name like a key, a page or screen name like free text (URLs included)."""
    if ev.type == "track" or not ev.name:
        return scrubber.name(key)
    return f"{ev.type}:{scrubber.text(ev.name, url_pseudonymiser(pseudonymiser))}"


def _violation_record(
    s: IngestServices, batch: IngestBatch, env: Envelope, verdict: PlanVerdict, version: int
) -> ViolationRecord:
    """The event as it arrived (pseudonymised, scrubbed) and what the plan said about it."""
    ev = env.event
    return ViolationRecord(
        tenant=batch.src.tenant.id,
        source=batch.src.source.id,
        message_id=ev.message_id,
        event=verdict.event,
        plan_version=version,
        received_at_ms=int(ev.received_at.timestamp() * 1000),
        findings=tuple(PlanFinding(v.rule, v.path, v.detail) for v in verdict.violations),
        payload=s.encoder.encode(ev),
        identifiers=tuple(env.identifiers),
        unproven=tuple(env.unproven),
        pseudonyms=tuple(sorted(env.pseudonyms)),
        server=env.standing.server,
        action="omitted" if verdict.action == "omit" else "kept",
    )


async def claim_message_ids(s: IngestServices, batch: IngestBatch) -> None:
    """Dedupe before any side effect: only events whose message id is new for their sender
    (source, anonymous id and user id pseudonyms) go on."""
    envs = batch.envelopes
    if not envs:
        return
    # Scoped by the sender's pseudonyms: one device cannot pre-claim another's message ids.
    scoped = [scoped_message_id(e.event.message_id, e.event.anonymous_id, e.event.user_id) for e in envs]
    claim = await s.outbox.claim(batch.src.source.id, scoped)
    batch.claim = claim
    kept = []
    for env, status in zip(envs, claim.statuses, strict=True):
        if status is ClaimStatus.NEW:
            kept.append(env)
        elif status is ClaimStatus.DUPLICATE:
            batch.results[env.request].duplicates += 1
        else:  # another request is storing this message id right now: the client retries
            batch.results[env.request].in_flight += 1
    batch.envelopes = kept
    batch.claimed = list(kept)


async def rekey_on_sight(s: IngestServices, batch: IngestBatch) -> None:
    """Key rotation, lazily: an event carries the raw identifier, so both its old-version
    and its active-version pseudonyms are known. An identifier the graph holds under an
    older live version moves to the active one (``NodeRekeyed``: same person, same unified
    ID; an ``identity.rekeyed`` notice follows the batch's events). A never-linked one (not
    stored) is stored under the active version with the unified ID derived from its oldest
    live pseudonym, so it keeps that ID after the old version is retired. Only runs while
    more than one key version is live, once per identifier (then it is in the graph);
    before consent, so the person's other identifiers are found."""
    if not batch.older or not batch.envelopes:
        return
    tenant = batch.src.tenant.id
    graph = s.resolver.graph(tenant)
    if graph is None:
        return
    moves: dict[str, str] = {}
    moved: set[str] = set()
    for env in batch.envelopes:
        for ident in env.identifiers:
            olds = env.aliases.get(ident.value)
            new = ident.node
            if not olds or new in graph or new in moved:
                continue
            held = next((f"{ident.type}:{o}" for o in olds if f"{ident.type}:{o}" in graph), None)
            # never linked: its ID is derived from its oldest live pseudonym
            moves[held or f"{ident.type}:{olds[-1]}"] = new
            moved.add(new)
    if moves:
        batch.changes += await s.resolver.rekey(tenant, list(moves.items()))


async def record_consent_signals(s: IngestServices, batch: IngestBatch) -> None:
    """Consent carried by events: an under-14 age trait flags the subject, and Segment's
    "Segment Consent Preference Updated" event records the categories it names."""
    service = s.consent_service
    if service is None or not batch.envelopes:
        return
    src = batch.src
    tenant = src.tenant
    kept = []
    for env in batch.envelopes:
        ev = env.event
        identifiers = proven_identifiers(env)
        if ev.type == "identify" and identifiers and is_minor_age(ev.traits, tenant.minor_age_trait):
            await service.flag_minor(
                tenant=tenant.id, identifiers=identifiers, source=src.source.id, platform=src.source.platform
            )
        prefs = signalled(ev.context)
        if not prefs or not identifiers:
            kept.append(env)
            continue
        if s.rate_limiter is not None:
            try:
                await s.rate_limiter.check_consent(tenant.id, src.source.id, [v for _, v in identifiers])
            except RateLimited as exc:
                batch.reject(env, "rate_limited", exc.detail, exc.limit)
                continue
        choice = choice_from_categories(prefs, tenant.consent_categories)
        consent = ev.context.get("consent")
        notice_id = consent.get("noticeId") if isinstance(consent, dict) else None
        library = ev.context.get("library")
        sdk = str(library.get("name")) if isinstance(library, dict) and library.get("name") else None
        try:
            if ev.event == CONSENT_PREFERENCE_EVENT:  # the choice itself, recorded as made
                await service.record(
                    tenant=tenant.id,
                    identifiers=identifiers,
                    grant=choice.granted,
                    withdraw=choice.refused,
                    notice_id=str(notice_id) if notice_id else await service.current_notice(tenant.id),
                    source=src.source.id,
                    platform=src.source.platform,
                    sdk=sdk,
                )
            elif choice.granted or choice.refused:  # repeated on every event: what changed
                await service.record_changes(
                    tenant=tenant.id,
                    identifiers=identifiers,
                    device=[i.value for i in env.identifiers if i.type in DEVICE_TYPES],
                    grant=choice.granted,
                    withdraw=choice.refused,
                    notice_id=str(notice_id) if notice_id else None,
                    source=src.source.id,
                    platform=src.source.platform,
                    sdk=sdk,
                )
        except ConsentRefused as exc:
            field_name = f"context.consent.{exc.field}" if exc.field else "context.consent"
            batch.reject(env, "invalid_consent", exc.detail, field_name)
            continue
        kept.append(env)
    batch.envelopes = kept


async def decide_consent(s: IngestServices, batch: IngestBatch) -> None:
    """Per event and destination: is there a lawful basis right now? Events with none are
    dropped (counted by reason, never stored)."""
    envs = batch.envelopes
    if not envs:
        return
    tenant = batch.src.tenant
    specs = s.specs.get(tenant.id)
    if specs is None:
        specs = s.specs[tenant.id] = destination_specs(batch.src.destinations)
    queries: list[ConsentQuery | None]
    if tenant.consent.enforce:
        # the person's other identifiers: a withdrawal on any of them counts
        # the person's other person-level identifiers: a withdrawal or a flag recorded on
        # them (which takes proof) counts for every device of the person
        linked = (
            s.resolver.linked_identifiers(tenant.id, [_proven(e) for e in envs], person_level=True)
            if s.resolver.links
            else [()] * len(envs)
        )
        asked = [consent_query(env, tenant, other) for env, other in zip(envs, linked, strict=True)]
        decisions = await s.consent.decide_batch(asked, specs, want_linking=s.resolver.links)
        queries = list(asked)
    else:  # dev-only configuration (config check refuses it in production)
        for env in envs:
            env.purposes = purposes_of(env, tenant)
        queries = [None] * len(envs)
        everywhere = ConsentDecision(tuple(sp.id for sp in specs), linking_allowed=True)
        decisions = [everywhere] * len(envs)
    allowed: list[Envelope] = []
    batch.linking = []
    for env, query, decision in zip(envs, queries, decisions, strict=True):
        if decision.dropped_reason is not None or not decision.destinations:
            batch.drop(env, decision.dropped_reason or "no_destination")
            continue
        env.destinations = decision.destinations
        env.consent_proof = decision.proof
        if query is not None:
            env.consent_ticket = ConsentTicket(decision.epoch, query, decision.personalised)
            env.personalised = decision.personalised
        if decision.strip_sensitive:
            strip_sensitive(env, tenant)
        env.linkable = decision.linking_allowed and s.resolver.links
        allowed.append(env)
        batch.linking.append(decision.linking_allowed)
    batch.envelopes = allowed


async def limit_new_identifiers(s: IngestServices, batch: IngestBatch) -> None:
    """The per-person quota of new identifiers a day: an event that would take its subject
    (user id, else anonymous id pseudonym) past it is still processed, but not linked."""
    limiter = s.rate_limiter
    if limiter is None or not s.resolver.links:
        return
    asking = [
        i
        for i, (env, linking) in enumerate(zip(batch.envelopes, batch.linking, strict=True))
        if linking and len(env.identifiers) > 1
    ]
    if not asking:
        return
    subjects = []
    for i in asking:
        ev = batch.envelopes[i].event
        subjects.append(
            (ev.user_id or ev.anonymous_id or "", [x.value for x in batch.envelopes[i].identifiers])
        )
    allowed = await limiter.allow_links(batch.src.tenant.id, batch.src.source.id, subjects)
    for i, ok in zip(asking, allowed, strict=True):
        if not ok:
            batch.linking[i] = False


class LinkProvenance(Sequence[tuple[str, str]]):
    """(source, message id) of each event, for the links the resolver records. Provenance
    outlives the outbox: the message id only as a keyed hash, made when the resolver asks
    for it (the common event, whose person is known, links nothing and needs none)."""

    __slots__ = ("_envs", "_key", "_source")

    def __init__(self, source: str, envs: Sequence[Envelope], key: Pseudonymiser) -> None:
        self._source = source
        self._envs = envs
        self._key = key

    def __len__(self) -> int:
        return len(self._envs)

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, str]]: ...
    def __getitem__(self, index: int | slice) -> tuple[str, str] | list[tuple[str, str]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return (self._source, message_id_digest(self._envs[index].event.message_id, self._key))


async def resolve_identity(s: IngestServices, batch: IngestBatch) -> None:
    """The unified person of each event; links its identifiers where consent allows."""
    envs = batch.envelopes
    if not envs:
        return
    tenant = batch.src.tenant
    sets: list[Sequence[Identifier]] = []
    linking = list(batch.linking)
    guarded: list[frozenset[str]] | None = None
    if any(e.unproven for e in envs):
        # unproven person-level identifiers: never the anchor; linked only with the tenant's
        # "unowned" rule and only while no other person holds them
        unowned = tenant.identity.client_links == "unowned"
        guarded = []
        for i, env in enumerate(envs):
            if not env.unproven:
                sets.append(env.identifiers)
                guarded.append(frozenset())
            elif unowned:
                sets.append(env.identifiers)
                guarded.append(frozenset(u.node for u in env.unproven))
            else:
                proven = _proven(env)
                sets.append(proven or env.identifiers)
                linking[i] = linking[i] and bool(proven)
                guarded.append(frozenset() if proven else frozenset(u.node for u in env.unproven))
    else:
        sets = [e.identifiers for e in envs]
    unified = await s.resolver.resolve_batch(
        tenant.id,
        sets,
        linking,
        LinkProvenance(batch.src.source.id, envs, batch.message_ids or batch.pseudonymiser),
        notices=batch.changes,
        guarded=guarded,
    )
    for env, uid in zip(envs, unified, strict=True):
        env.unified_id = uid


async def collapse_exposures(s: IngestServices, batch: IngestBatch) -> None:
    """Exposure dedupe (gateway.exposures): an item the same person already saw on the same
    page view within the tenant's window is taken out; an exposure with nothing left is
    dropped (``exposure_repeat``). After resolve_identity: the person is the unified one."""
    store = s.exposures
    tenant = batch.src.tenant
    window_ms = tenant.cleaning.exposure_window_seconds * 1000
    if store is None or not window_ms or not batch.envelopes:
        return
    plan = plan_for(tenant)
    if plan is None:
        return
    asked: list[tuple[Envelope, int]] = []
    sightings: list[tuple[bytes, bytes]] = []
    for env in batch.envelopes:
        entry = plan.events.get(env.plan_event) if env.plan_event else None
        spec = entry.spec.exposure if entry is not None else None
        ev = env.event
        props = ev.properties
        if spec is None or not props:
            continue
        person = env.unified_id or ev.user_id or ev.anonymous_id or ""
        message = exposure_message(message_id_digest(ev.message_id, batch.message_ids or batch.pseudonymiser))
        for position, key in sighting_keys(spec, props, tenant.id, person, env.plan_event):
            asked.append((env, position))
            sightings.append((key, message))
    if not sightings:
        return
    first = await store.first_sightings(sightings, window_ms)
    repeats: dict[int, list[int]] = {}  # id(envelope) -> positions seen before
    for (env, position), new in zip(asked, first, strict=True):
        if not new:
            repeats.setdefault(id(env), []).append(position)
    if not repeats:
        return
    kept: list[Envelope] = []
    linking: list[bool] = []
    for env, links in zip(batch.envelopes, batch.linking, strict=True):
        seen = repeats.get(id(env))
        if seen is not None:
            entry = plan.events[env.plan_event]
            spec = entry.spec.exposure
            assert spec is not None
            props = env.event.properties or {}
            if spec.list_key is None:
                batch.drop(env, EXPOSURE_REPEAT)
                continue
            items = props[spec.list_key]
            gone = set(seen)
            props[spec.list_key] = [item for i, item in enumerate(items) if i not in gone]
            if not props[spec.list_key]:
                batch.drop(env, EXPOSURE_REPEAT)
                continue
            env.flags.append(EXPOSURE_REPEAT_ITEMS)
        kept.append(env)
        linking.append(links)
    batch.envelopes = kept
    batch.linking = linking


async def transform(s: IngestServices, batch: IngestBatch) -> None:
    """PII scrubbing and IP truncation on what is about to be stored."""
    tenant, pseudonymiser = batch.src.tenant, batch.pseudonymiser
    for env in batch.envelopes:
        scrub_personal_data(env, tenant, pseudonymiser)


async def encode(s: IngestServices, batch: IngestBatch) -> None:
    """The outbox records: the events, then the notices of the merges and splits they
    caused (a destination has received the person by the time it reads the notice)."""
    version = batch.pseudonymiser.version
    batch.records = [encode_for_outbox(env, batch.src, version, s.encoder) for env in batch.envelopes]
    if batch.changes:
        destinations = tuple(d.id for d in batch.src.destinations)
        batch.records += [
            notice_record(n, destinations) for n in notices_for_changes(batch.src.tenant.id, batch.changes)
        ]


async def append(s: IngestServices, batch: IngestBatch) -> None:
    """The ack point: records and confirmed message ids in one durable write."""
    if batch.claim is None:
        return
    await s.outbox.append(batch.records, claim=batch.claim)
    batch.appended = True
    for env in batch.envelopes:
        batch.results[env.request].accepted += 1


async def detach_identifiers(s: IngestServices, batch: IngestBatch) -> None:
    """What a Sensors ``track_id_unbind`` asks: its identifiers leave their person."""
    if s.identity is None:
        return
    for env in batch.claimed:
        if env.detach:
            await s.identity.detach(batch.src.tenant.id, env.detach)


async def observe_kpis(s: IngestServices, batch: IngestBatch) -> None:
    """Business KPIs over the events past dedupe, stored or dropped (consent coverage)."""
    if s.kpis is not None and batch.appended:
        await s.kpis(batch)


STAGES: tuple[Stage, ...] = (
    clean_traffic,
    pseudonymise,
    drop_erased,
    check_plan,
    claim_message_ids,
    rekey_on_sight,
    record_consent_signals,
    decide_consent,
    limit_new_identifiers,
    resolve_identity,
    collapse_exposures,
    transform,
    encode,
    append,
    detach_identifiers,
    observe_kpis,
)


# A batch of at least this many events gives the event loop back between its stages, so
# the requests of other sources wait behind one stage of a large batch, not the whole of it
# (bench/rate_limits.py); a small request runs its stages in one go (each turn of the loop
# costs about as much as a stage does on one event).
YIELD_FROM_EVENTS = 20

# Requests of fewer events than this, of one source, that reach the pipeline in the same
# turn of the event loop run as one batch (Ingestor): each stage's fixed cost, the dedupe
# claim and the identity and KPI round trips are paid once for the lot.
COALESCE_BELOW_EVENTS = YIELD_FROM_EVENTS
# ... up to this many events in one coalesced batch
COALESCE_MAX_EVENTS = 500


@dataclass
class IngestRequest:
    """One request's part of a batch: its events, the result it answers, its origin."""

    envelopes: list[Envelope]
    result: IngestResult
    origin: RequestOrigin | None = None


@dataclass(eq=False)
class _Coalesced:
    """Small requests of one source gathered for one run (``Ingestor._join``)."""

    src: ResolvedSource
    requests: list[IngestRequest]
    events: int
    run: asyncio.Task[None] | None = None


def _coalescable(envs: Sequence[Envelope]) -> bool:
    """Consent events are recorded with their request's client network (the per-network
    consent limit reads it from the request's context): they run in their own batch."""
    return not any(_is_consent_event(e) for e in envs)


class Ingestor:
    """Runs ``STAGES`` over one request's events; with ``coalesce``, small requests of one
    source that arrive in the same turn of the event loop run as one batch, each request
    answered with exactly its own counts, rejections and findings."""

    def __init__(
        self,
        services: IngestServices,
        *,
        stages: Sequence[Stage] = STAGES,
        on_appended: Callable[[], None] | None = None,
        coalesce: bool = False,
    ) -> None:
        self.services = services
        self.stages = tuple(stages)
        self.on_appended = on_appended
        self.coalesce = coalesce
        # (tenant, source) -> the batch still taking requests (its run has not started)
        self._open: dict[tuple[str, str], _Coalesced] = {}
        # runs in progress, held until done (the loop keeps only weak references to tasks)
        self._runs: set[asyncio.Task[None]] = set()

    async def ingest(
        self,
        src: ResolvedSource,
        envs: list[Envelope],
        result: IngestResult,
        *,
        origin: RequestOrigin | None = None,
    ) -> IngestResult:
        request = IngestRequest(envs, result, origin)
        if self.coalesce and 0 < len(envs) < COALESCE_BELOW_EVENTS and _coalescable(envs):
            await self._join(src, request)
        else:
            await self._run(src, [request])
        return result

    async def _join(self, src: ResolvedSource, request: IngestRequest) -> None:
        """Join the source's open batch, or open one: its run is a task that starts once the
        requests already waiting for the event loop have had their turn (each joins it when
        it gets here). Every member awaits the run shielded, so a client that goes away
        cancels its own wait, never the others' events."""
        key = (src.tenant.id, src.source.id)
        group = self._open.get(key)
        size = len(request.envelopes)
        if group is not None and group.src is src and group.events + size <= COALESCE_MAX_EVENTS:
            group.requests.append(request)
            group.events += size
        else:
            group = _Coalesced(src, [request], size)
            self._open[key] = group
            group.run = asyncio.create_task(self._run_group(key, group))
            self._runs.add(group.run)
            group.run.add_done_callback(self._ran)
        assert group.run is not None
        await asyncio.shield(group.run)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        # the error is its members' to answer; when every one of them went away first, it
        # is read here, so asyncio does not report it as never retrieved
        if not task.cancelled():
            task.exception()

    async def _run_group(self, key: tuple[str, str], group: _Coalesced) -> None:
        if self._open.get(key) is group:
            del self._open[key]  # later requests open the next batch
        if len(group.requests) > 1:
            metrics.INGEST.add("coalesced", key, len(group.requests))
            # the lines this run logs are every member's: no one request's id
            structlog.contextvars.bind_contextvars(request_id=f"coalesced-{len(group.requests)}")
        await self._run(group.src, group.requests)

    async def _run(self, src: ResolvedSource, requests: list[IngestRequest]) -> None:
        counts = metrics.INGEST
        labels = (src.tenant.id, src.source.id)
        keyring = self.services.keyring
        tenant = src.tenant.id
        if len(requests) == 1:
            envs = requests[0].envelopes
        else:
            envs = []
            for i, request in enumerate(requests):
                for env in request.envelopes:
                    env.request = i
                envs += request.envelopes
        for request in requests:
            counts.add("received", labels, request.result.received)
        batch = IngestBatch(
            src,
            envs,
            [r.result for r in requests],
            keyring.pseudonymiser(tenant),
            keyring.older_pseudonymisers(tenant),
            keyring.anchor(tenant).internal(MESSAGE_ID),
            origins=[r.origin for r in requests],
        )
        try:
            yielding = len(envs) >= YIELD_FROM_EVENTS
            for stage in self.stages:
                await stage(self.services, batch)
                if yielding:
                    await asyncio.sleep(0)
        finally:
            if batch.claim is not None and not batch.appended:
                # nothing acknowledged: the client's retry must not be taken for a duplicate
                await self._release(batch.claim)
        appended = False
        for request in requests:
            result = request.result
            for r in result.rejected:
                counts.add("rejected", (*labels, r.error))
            if result.accepted:
                counts.add("accepted", labels, result.accepted)
                appended = True
            if result.duplicates:
                counts.add("duplicate", labels, result.duplicates)
        if appended and self.on_appended is not None:
            self.on_appended()

    async def _release(self, claim: Claim) -> None:
        """Best effort: when the store that holds the claims is down, they expire on their
        own (IDGATE_DEDUPE_CLAIM_SECONDS), and the request's own error is what is answered."""
        try:
            await self.services.outbox.release(claim)
        except Exception as exc:
            log.warning("ingest.claim_release_failed", error=type(exc).__name__)
