"""The ingest pipeline: one plain function per stage, each over a batch of envelopes.

decode (protocol adapter) -> pseudonymise_identifiers -> decide_consent -> resolve_identity
-> scrub_personal_data -> encode_for_outbox -> durable append (the ack point).

``Ingestor`` runs the stages for one request and appends the survivors to the outbox. Raw
identifiers exist only between decode and ``pseudonymise_identifiers``; every later stage,
and everything stored, sees pseudonyms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from consent.decisions import ConsentDecision, ConsentPolicy, ConsentQuery, ConsentTicket, DestinationSpec
from consent.service import ConsentRefused, ConsentService
from export.dedupe import ClaimStatus, RedisDedupe
from export.outbox import OutboxRecord, SqliteOutbox
from gateway import metrics
from gateway.config import Destination, ResolvedSource, Tenant
from gateway.events import Envelope, Rejection, RejectMessage
from gateway.identity_setup import notices_for
from identity.identifiers import IDENTIFIER_TYPES, Identifier, InvalidIdentifier, normalise
from identity.pseudonym import KeyRing, Pseudonymiser
from identity.resolution import IdentityResolver
from identity.scrub import KEEP, scrub_text, scrub_value, truncate_ip

# Keys that hold an identifier wherever they appear in traits, properties or context.
TRAIT_IDENTIFIER_TYPES = {"phone": "phone", "mobile": "phone", "email": "email"}
DEVICE_FIELD_TYPES = {"id": "device_id", "advertisingId": "advertising"}  # advertising: IDFA or OAID by OS
_field_maps: dict[int, tuple[dict[str, str], dict[str, str], frozenset[str]]] = {}


def field_maps(tenant: Tenant) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    """Where identifiers come from for this tenant: trait/property keys and context.device
    fields (defaults above, extended by ``[tenants.identity]`` in the config)."""
    maps = _field_maps.get(id(tenant))
    if maps is None:
        traits = {**TRAIT_IDENTIFIER_TYPES, **{k.lower(): v for k, v in tenant.identity.trait_types.items()}}
        device = {**DEVICE_FIELD_TYPES, **tenant.identity.device_fields}
        maps = _field_maps[id(tenant)] = (traits, device, IDENTIFIER_LIKE_KEYS | frozenset(traits))
    return maps


IDENTIFIER_LIKE_KEYS = frozenset(
    {
        "phone",
        "mobile",
        "email",
        "openid",
        "unionid",
        "userid",
        "user_id",
        "anonymousid",
        "anonymous_id",
        "distinct_id",
        "idfa",
        "idfv",
        "oaid",
        "imei",
        "android_id",
        "androidid",
        "device_id",
        "deviceid",
        "advertisingid",
        "id_card",
        "idcard",
    }
)


# -- stage: pseudonymise_identifiers -------------------------------------------------------
def pseudonymise_identifiers(env: Envelope, tenant: Tenant, pseudonym: Pseudonymiser) -> None:
    """Normalise every identifier field, replace it by its pseudonym, collect the linkable ones.

    Junk values (``null``, all-zero IDFA, ...) in the id fields are removed; a value that
    is personal but not a valid identifier (a malformed phone) is pseudonymised and not
    linked. Raises RejectMessage when no usable userId/anonymousId is left.
    """
    ev = env.event
    found = env.identifiers

    def link(id_type: str, raw: Any, scope: str | None = None) -> str | None:
        try:
            ident = normalise(id_type, raw, scope=scope)
        except InvalidIdentifier:
            return None
        value = pseudonym(ident.value)
        found.append(Identifier(id_type, value))
        return value

    def opaque(raw: Any) -> str:
        return pseudonym(str(raw).strip())

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
            ev.previous_id = pseudonym(normalise("user_id", ev.previous_id).value)
        except InvalidIdentifier as exc:
            raise RejectMessage("invalid_identifier", f"previousId: {exc.reason}", "previousId") from None

    trait_types, device_types, identifier_keys = field_maps(tenant)

    def on_identifier_key(key: str, value: Any) -> Any:
        lowered = key.lower()
        if lowered not in identifier_keys:
            return KEEP
        if isinstance(value, str | int) and not isinstance(value, bool):
            id_type = trait_types.get(lowered)
            return (link(id_type, value) if id_type else None) or opaque(value)
        return scrub_value(value, on_identifier_key)

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
                value = link(id_type, device[key])
                if value is None:
                    del device[key]
                else:
                    device[key] = value
        ctx["device"] = device
    external = ctx.get("externalIds")
    if isinstance(external, list):
        cleaned = []
        for item in external:
            if not isinstance(item, dict) or "id" not in item:
                continue
            ext_type = str(item.get("type", ""))
            id_type = tenant.external_id_types.get(ext_type) or (
                ext_type if ext_type in IDENTIFIER_TYPES else None
            )
            scope = str(item["appid"]) if id_type == "wechat_openid" and item.get("appid") else None
            value = link(id_type, item["id"], scope) if id_type else opaque(item["id"])
            if value is not None:
                cleaned.append({**item, "id": value})
        ctx["externalIds"] = cleaned
    if ev.traits is not None:
        ev.traits = scrub_value(ev.traits, on_identifier_key)
    if isinstance(ctx.get("traits"), dict):
        ctx["traits"] = scrub_value(ctx["traits"], on_identifier_key)
    if ev.properties is not None:
        ev.properties = scrub_value(ev.properties, on_identifier_key)
    for key in ("page", "campaign", "referrer"):
        if isinstance(ctx.get(key), dict):
            ctx[key] = scrub_value(ctx[key], on_identifier_key)


# -- stage: scrub_personal_data ------------------------------------------------------------
def scrub_personal_data(env: Envelope) -> None:
    """Truncate the IP, scrub free text in the context fields not yet cleaned."""
    ctx = env.event.context
    ip = ctx.get("ip")
    if ip is not None:
        truncated = truncate_ip(str(ip))
        if truncated is None:
            del ctx["ip"]
        else:
            ctx["ip"] = truncated
    for key in ("userAgent", "locale", "timezone", "groupId"):
        value = ctx.get(key)
        if isinstance(value, str):
            ctx[key] = scrub_text(value)
    env.event.name = scrub_text(env.event.name) if env.event.name else env.event.name
    if env.event.group_id is not None:
        env.event.group_id = scrub_text(env.event.group_id)


# -- stage: decide_consent -----------------------------------------------------------------
# Identifier types that belong to one device or app install; the rest name the person.
DEVICE_ID_TYPES = frozenset(
    {"anonymous_id", "device_id", "idfa", "idfv", "oaid", "android_id", "wechat_openid"}
)
CONSENT_PREFERENCE_EVENT = "Segment Consent Preference Updated"


def category_preferences(ev_context: dict[str, Any]) -> dict[str, bool]:
    """Segment's consent convention: ``context.consent.categoryPreferences``."""
    consent = ev_context.get("consent")
    prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(prefs, dict):
        return {}
    return {str(k): v for k, v in prefs.items() if isinstance(v, bool)}


def purposes_of(env: Envelope, tenant: Tenant) -> tuple[str, ...]:
    """What the tracking plan says this event is collected for."""
    ev = env.event
    return tenant.purposes_for(ev.event if ev.type == "track" and ev.event else f"${ev.type}")


def consent_query(env: Envelope, tenant: Tenant, linked: tuple[str, ...] = ()) -> ConsentQuery:
    ev = env.event
    env.purposes = purposes_of(env, tenant)
    device: list[str] = []
    person: list[str] = []
    for ident in env.identifiers:
        (device if ident.type in DEVICE_ID_TYPES else person).append(ident.value)
    # A claim in the event can only narrow: a refused category removes its purposes.
    narrowed: tuple[str, ...] = ()
    if "consent" in ev.context:
        narrowed = tuple(
            p
            for category, allowed in category_preferences(ev.context).items()
            if not allowed
            for p in tenant.consent_categories.get(category, ())
        )
    sensitive = False
    if tenant.sensitive_properties:
        keys = tenant.sensitive_properties
        sensitive = any(fields and any(k in fields for k in keys) for fields in (ev.properties, ev.traits))
    return ConsentQuery(
        tenant=tenant.id,
        device_ids=tuple(device),
        user_ids=tuple(person),
        purposes=env.purposes,
        narrowed=narrowed,
        linked_ids=linked,
        has_sensitive=sensitive,
    )


def strip_sensitive(env: Envelope, tenant: Tenant) -> None:
    """Remove properties classified sensitive (no sensitive_pi consent)."""
    ev = env.event
    for fields in (ev.properties, ev.traits):
        if fields:
            for key in tenant.sensitive_properties:
                fields.pop(key, None)


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


# -- stage: encode_for_outbox --------------------------------------------------------------
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
    if env.unified_id is not None:
        ctx["unified_id"] = env.unified_id
    return OutboxRecord(
        tenant=src.tenant.id,
        source=src.source.id,
        message_id=ev.message_id,
        received_at_ms=int(ev.received_at.timestamp() * 1000),
        destinations=env.destinations,
        payload=encoder.encode(ev),
        consent=encoder.encode(env.consent_ticket) if env.consent_ticket is not None else b"",
        proof=env.consent_proof,
    )


# -- orchestration -------------------------------------------------------------------------
class Overloaded(Exception):
    """The outbox holds more undelivered events than its bound: the client retries later."""

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__("the gateway is holding too many undelivered events; retry later")
        self.retry_after = retry_after


@dataclass
class IngestResult:
    received: int
    accepted: int = 0
    duplicates: int = 0
    in_flight: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

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
        return out


class Ingestor:
    """Runs the stages for one request and appends the result durably."""

    def __init__(
        self,
        *,
        keyring: KeyRing,
        outbox: SqliteOutbox,
        consent: ConsentPolicy,
        resolver: IdentityResolver,
        redis_dedupe: RedisDedupe | None = None,
        on_appended: Callable[[], None] | None = None,
        consent_service: ConsentService | None = None,
        overloaded: Callable[[], bool] | None = None,
    ) -> None:
        self.keyring = keyring
        self.overloaded = overloaded
        self.outbox = outbox
        self.consent = consent
        self.resolver = resolver
        self.redis_dedupe = redis_dedupe
        self.on_appended = on_appended
        self.consent_service = consent_service
        self._encoder = msgspec.json.Encoder()
        self._specs: dict[str, list[DestinationSpec]] = {}

    async def ingest(self, src: ResolvedSource, envs: list[Envelope], result: IngestResult) -> IngestResult:
        if self.overloaded is not None and self.overloaded():
            raise Overloaded()  # before anything is recorded: the whole request is retried
        tenant, source = src.tenant, src.source
        counts = metrics.INGEST
        labels = (tenant.id, source.id)
        counts.add("received", labels, result.received)
        pseudonym = self.keyring.pseudonymiser(tenant.id)

        kept: list[Envelope] = []
        for env in envs:
            try:
                pseudonymise_identifiers(env, tenant, pseudonym)
            except RejectMessage as exc:
                result.rejected.append(
                    Rejection(env.index, exc.error, exc.detail, exc.field, env.event.message_id)
                )
                continue
            kept.append(env)
        if self.consent_service is not None:
            kept = await self._record_consent_events(src, kept, result)
        for r in result.rejected:
            counts.add("rejected", (*labels, r.error))
        if not kept:
            return result

        specs = self._specs.get(tenant.id)
        if specs is None:
            specs = self._specs[tenant.id] = destination_specs(src.destinations)
        if tenant.consent.enforce:
            # the person's other identifiers: a withdrawal on any of them counts
            linked = (
                self.resolver.linked_identifiers(tenant.id, [e.identifiers for e in kept])
                if self.resolver.links
                else [()] * len(kept)
            )
            queries: list[ConsentQuery | None] = [
                consent_query(env, tenant, other) for env, other in zip(kept, linked, strict=True)
            ]
            decisions = await self.consent.decide_batch(
                queries,  # type: ignore[arg-type]
                specs,
                want_linking=self.resolver.links,
            )
        else:  # dev-only configuration (config check refuses it in production)
            for env in kept:
                env.purposes = purposes_of(env, tenant)
            queries = [None] * len(kept)
            everywhere = ConsentDecision(tuple(s.id for s in specs), linking_allowed=True)
            decisions = [everywhere] * len(kept)
        allowed: list[Envelope] = []
        linking: list[bool] = []
        for env, query, decision in zip(kept, queries, decisions, strict=True):
            if decision.dropped_reason is not None or not decision.destinations:
                reason = decision.dropped_reason or "no_destination"
                result.dropped[reason] += 1
                counts.add("dropped", (tenant.id, reason))
                continue
            env.destinations = decision.destinations
            env.consent_proof = decision.proof
            if query is not None:
                env.consent_ticket = ConsentTicket(decision.epoch, query)
            if decision.strip_sensitive:
                strip_sensitive(env, tenant)
            allowed.append(env)
            linking.append(decision.linking_allowed)
        if not allowed:
            return result

        changes: list[Any] = []  # merges and splits: their notices follow the events
        unified = await self.resolver.resolve_batch(
            tenant.id,
            [e.identifiers for e in allowed],
            linking,
            [(source.id, e.event.message_id) for e in allowed],
            notices=changes,
        )
        for env, uid in zip(allowed, unified, strict=True):
            env.unified_id = uid
            scrub_personal_data(env)

        records = [encode_for_outbox(env, src, pseudonym.version, self._encoder) for env in allowed]
        # after the events that may carry a pre-merge ID, in the same durable append, so a
        # destination has received the person by the time it reads the notice
        notices = notices_for(tenant, changes) if changes else []
        await self._append(source.id, records, result, notices)
        counts.add("accepted", labels, result.accepted)
        if result.duplicates:
            counts.add("duplicate", labels, result.duplicates)
        if result.accepted and self.on_appended is not None:
            self.on_appended()
        return result

    async def detach_identifiers(self, tenant: str, identifiers: Sequence[Identifier]) -> int:
        """Remove every link of these (pseudonymised) identifiers, as a Sensors
        ``track_id_unbind`` asks: each leaves its person, which splits where those links
        were the only path (split notices go downstream). Needs no consent: it only ever
        separates. Returns the number of links removed."""
        graph = getattr(self.resolver, "graphs", {}).get(tenant)
        unlink = getattr(self.resolver, "unlink", None)
        if graph is None or unlink is None:
            return 0
        removed = 0
        for ident in identifiers:
            node = f"{ident.type}:{ident.value}"
            for other in sorted(graph.component(node) - {node}):
                path = graph.explain(node, other)
                if path is not None and len(path) == 1:  # a direct link
                    changes = await unlink(tenant, node, other)
                    removed += sum(1 for c in changes if type(c).__name__ == "EdgeRemoved")
        return removed

    async def _record_consent_events(
        self, src: ResolvedSource, envs: list[Envelope], result: IngestResult
    ) -> list[Envelope]:
        """Segment's "Segment Consent Preference Updated" track call records consent."""
        assert self.consent_service is not None
        kept = []
        trait = src.tenant.minor_age_trait
        for env in envs:
            ev = env.event
            if trait and ev.type == "identify" and ev.traits and env.identifiers:
                age = ev.traits.get(trait)
                if isinstance(age, int | float) and not isinstance(age, bool) and 0 <= age < 14:
                    await self.consent_service.flag_minor(
                        tenant=src.tenant.id,
                        identifiers=[(i.type, i.value) for i in env.identifiers],
                        source=src.source.id,
                        platform=src.source.platform,
                    )
            prefs = category_preferences(ev.context) if ev.event == CONSENT_PREFERENCE_EVENT else {}
            if not prefs:
                kept.append(env)
                continue
            categories = src.tenant.consent_categories
            granted = {p for c, ok in prefs.items() if ok for p in categories.get(c, ())}
            refused = {p for c, ok in prefs.items() if not ok for p in categories.get(c, ())} - granted
            consent = ev.context.get("consent")
            notice_id = consent.get("noticeId") if isinstance(consent, dict) else None
            library = ev.context.get("library")
            sdk = str(library.get("name")) if isinstance(library, dict) and library.get("name") else None
            try:
                await self.consent_service.record(
                    tenant=src.tenant.id,
                    identifiers=[(i.type, i.value) for i in env.identifiers],
                    grant=sorted(granted),
                    withdraw=sorted(refused),
                    notice_id=str(notice_id)
                    if notice_id
                    else await self.consent_service.current_notice(src.tenant.id),
                    source=src.source.id,
                    platform=src.source.platform,
                    sdk=sdk,
                )
            except ConsentRefused as exc:
                field = f"context.consent.{exc.field}" if exc.field else "context.consent"
                result.rejected.append(
                    Rejection(env.index, "invalid_consent", exc.detail, field, ev.message_id)
                )
                continue
            kept.append(env)
        return kept

    async def _append(
        self,
        source_id: str,
        records: list[OutboxRecord],
        result: IngestResult,
        notices: Sequence[OutboxRecord] = (),
    ) -> None:
        """Append the events, then the identity notices they caused, in one durable write."""
        if self.redis_dedupe is None:
            stored = (await self.outbox.append([*records, *notices], dedupe=True))[: len(records)]
            result.accepted += sum(stored)
            result.duplicates += len(stored) - sum(stored)
            return
        keys = [self.redis_dedupe.key(source_id, r.message_id) for r in records]
        statuses = await self.redis_dedupe.claim(keys)
        new = [(k, r) for k, r, s in zip(keys, records, statuses, strict=True) if s is ClaimStatus.NEW]
        result.duplicates += sum(1 for s in statuses if s is ClaimStatus.DUPLICATE)
        result.in_flight += sum(1 for s in statuses if s is ClaimStatus.IN_FLIGHT)
        new_keys = [k for k, _ in new]
        fresh = [*(r for _, r in new), *notices]
        confirm_inside = getattr(self.outbox, "confirms_dedupe", False)
        try:
            if confirm_inside:  # the Redis outbox: appended and confirmed in one atomic script
                await self.outbox.append(  # type: ignore[call-arg]
                    fresh, dedupe=False, confirm=new_keys, confirm_seconds=self.redis_dedupe.window_seconds
                )
            else:
                await self.outbox.append(fresh, dedupe=False)
        except BaseException:
            await self.redis_dedupe.release(new_keys)
            raise
        if not confirm_inside:
            await self.redis_dedupe.confirm(new_keys)
        result.accepted += len(new)
