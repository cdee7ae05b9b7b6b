"""The tenant configuration file (TOML): tenants, sources, purposes, tracking plan, destinations.

Secrets are not in this file: write keys are stored as SHA-256 hashes, pseudonymisation
keys come from the environment or a key file. ``check_config`` reports every problem with
its location instead of stopping at the first one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import msgspec

from export.alerts import AlertChannel, AlertRule, check_alerts, check_channels
from export.kpis import DAY_SECONDS, DEFAULT_KPIS, KpiDefinition, check_kpis
from identity.identifiers import InvalidIdentifier
from identity.pseudonym import Pseudonymiser, pseudonymise_identifier

Platform = Literal["app", "web", "miniprogram", "server"]
LegalBasis = Literal["consent", "contract"]
ConsentKind = Literal["general", "separate", "guardian"]
Region = Literal["mainland", "overseas"]
SinkKind = Literal["jsonl", "parquet", "webhook", "segment", "sensors", "redis_stream", "nats"]

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_APPID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a WeChat appid as wechat_appids lists it
_SENSORS_PROJECT = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]{0,99}$")
# A browser's Origin header: scheme://host[:port], lowercase, nothing after (gateway.cors).
_ORIGIN = re.compile(
    r"^https?://(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[1-9][0-9]{0,4})?$"
)


class Purpose(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    legal_basis: LegalBasis = "consent"
    kind: ConsentKind = "general"
    description: str = ""


DEFAULT_PURPOSES: dict[str, Purpose] = {
    "necessary_service": Purpose(legal_basis="contract", description="Providing the requested service"),
    "analytics": Purpose(description="Product and usage analytics"),
    "personalisation": Purpose(description="Personalised content and recommendations"),
    "marketing": Purpose(description="Marketing communication"),
    "ad_measurement": Purpose(description="Advertising measurement and attribution"),
    "identity_linking": Purpose(description="Linking identifiers across App, Web and mini-programs"),
    "third_party_sharing": Purpose(kind="separate", description="Sharing with third-party recipients"),
    "cross_border": Purpose(kind="separate", description="Transfer outside mainland China"),
    "sensitive_pi": Purpose(kind="separate", description="Processing sensitive personal information"),
}


class Recipient(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    contact: str = ""
    third_party: bool = False


Trust = Literal["client", "server"]
SERVER_KEY_MIN_LENGTH = 32


class AssertionKeys(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a source's signed identity assertions are checked (identity.assertions): a JWT
    the shop's own backend issues after login, binding the person's identifiers to one
    device. HS256 with a shared secret read from an environment variable or a file (never
    from this file), or EdDSA (Ed25519) with the backend's public key."""

    hs256_secret_env: str = ""
    hs256_secret_file: str = ""
    ed25519_public_key: str = ""  # PEM
    audience: str = "idgate"
    issuer: str = ""
    # The longest lifetime (exp - iat) accepted: assertions are short-lived.
    max_lifetime_seconds: int = 3600


class Source(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    platform: Platform
    # client: the key ships inside an App, a web page or a mini-program (anyone can read
    # it); server: a secret key held by the shop's backend. Empty: "server" for the server
    # platform, "client" for the others (a client platform can never be "server").
    trust: Trust | Literal[""] = ""
    # Signed identity assertions from the shop's backend (client sources).
    assertions: AssertionKeys | None = None
    # The WeChat appids (mini-program, or the official account of a web page in WeChat)
    # whose openids this client source's users hold. Listed, an openid of another appid is
    # another app's user: a claim it cannot back (no consent, no link, no unbind). Empty:
    # an openid of any appid counts as the device's own.
    wechat_appids: list[str] = []
    write_key_sha256: str = ""
    # Accepted only when IDGATE_ENV=dev, so the shipped example runs with known demo keys.
    dev_write_key: str = ""
    name: str = ""
    # Sensors Data SDKs send to ``/sa?project=<sensors_project>&token=<token>``; the token
    # is stored as its SHA-256 (`idgate keys write-key` makes one), the plain
    # ``sensors_dev_token`` is accepted only with IDGATE_ENV=dev.
    sensors_project: str = ""
    sensors_token_sha256: str = ""
    sensors_dev_token: str = ""
    # Web pages (origins: scheme://host[:port]) allowed to call the Segment endpoints and
    # /v1/consent from a browser (CORS); never "*": the write key is a credential.
    allowed_origins: list[str] = []
    # The tracking plan for this source (gateway.plan): "block", "omit" or "flag" an event
    # that breaks its plan entry; "block", "allow" or "flag" one the plan does not list.
    # Empty: the tenant's plan_mode (observe: flag and flag; enforce: block and block).
    plan_validation: Literal["", "block", "omit", "flag"] = ""
    plan_unplanned: Literal["", "block", "allow", "flag"] = ""

    @property
    def is_server(self) -> bool:
        """May assert anything for its tenant (its key is a secret)."""
        return (self.trust or ("server" if self.platform == "server" else "client")) == "server"

    @property
    def own_appids(self) -> frozenset[str] | None:
        """The appids whose openids are this client source's own; None: any (a server
        source, or none listed)."""
        if self.is_server or not self.wechat_appids:
            return None
        return frozenset(self.wechat_appids)


class RetryPolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a destination's failed writes are retried before they go to the dead-letter store."""

    max_attempts: int = 8
    max_age_seconds: int = 24 * 3600
    initial_backoff_ms: int = 200
    max_backoff_ms: int = 60_000


class Destination(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    sink: SinkKind = "jsonl"
    purposes: list[str] = []
    region: Region = "mainland"
    recipient: Recipient | None = None
    # Sink-specific settings (url, stream, subject, timeout_seconds, ...): export.sinks.
    options: dict[str, Any] = {}
    # Identifiers leave re-keyed for this domain; destinations sharing a domain can join
    # their data, others cannot. Empty: the destination's own id.
    pseudonym_domain: str = ""
    batch_size: int = 1000
    retry: RetryPolicy = RetryPolicy()
    # Minimisation: when either is set, the destination receives only these event properties
    # (names or globs such as "utm_*") and those the tenant's tracking plan gives one of
    # these data classes; the rest are removed before delivery. Both empty: every property.
    properties: list[str] = []
    data_classes: list[str] = []


class NoticeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A privacy-notice version published at start (later versions come through the admin API)."""

    id: str
    content_sha256: str
    url: str = ""


# What a person-wide withdrawal that leaves no consent-based purpose granted (in one call or
# the last of several: consent.withdraw_all) does beyond stopping the forwarding (PIPL Art.
# 15, 47): nothing more (``keep``: what was received stays, within retention), ``lock``
# (the same effect, stated: nothing needing consent is processed until a new grant), or
# ``delete`` (a ``delete`` rights request is opened for the person).
WithdrawAllAction = Literal["keep", "lock", "delete"]


class ConsentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # false routes every event without consent checks: allowed only with IDGATE_ENV=dev
    # (benchmarks, local experiments), never in production.
    enforce: bool = True
    on_withdraw_all: WithdrawAllAction = "keep"


class IdentityConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Identity resolution rules of a tenant (design section 6)."""

    enabled: bool = True
    # identifier type -> how many one person may have (defaults: user_id 1, phone 1,
    # wechat_unionid 1, email 3, device-like types 10)
    max_per_type: dict[str, int] = {}
    max_component: int = 50
    breaker_max_merges: int = 5
    breaker_window_seconds: int = 3600
    # Where identifiers come from in a Segment event, beyond userId / anonymousId /
    # previousId and context.externalIds (external_id_types): trait or property key ->
    # type (defaults phone, mobile -> phone; email -> email) and context.device field ->
    # type (defaults id -> device_id; advertisingId -> "advertising", IDFA or OAID by OS).
    trait_types: dict[str, str] = {}
    device_fields: dict[str, str] = {}
    # Glob patterns of keys (properties, traits, URL query parameters) whose values are
    # identifiers, pseudonymised wherever they appear; added to the defaults
    # (identity.identifiers.DEFAULT_IDENTIFIER_KEY_PATTERNS: *openid*, *unionid*, member_id...).
    identifier_keys: list[str] = []
    # What a client source (public key) may link without a signed identity assertion:
    # "verified" links person-level identifiers (user id, phone, email, unionid) only when
    # asserted; "unowned" also links those that no other person holds yet (never one that
    # belongs to another person).
    client_links: Literal["verified", "unowned"] = "verified"


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[tenants.retention]``: how long idgate keeps what it holds for delivery (outbox, dead
    letters, file sinks, delivery proofs, person index), in days (export.retention). A
    destination keeps data for the shortest of its own period and its purposes'; ``days``
    applies when neither is set; 0 keeps data until delivered and pruned. The floors are
    the law's (consent.retention): lower values are refused."""

    days: int = 0
    purposes: dict[str, int] = {}
    destinations: dict[str, int] = {}
    # The consent ledger and the rights-request records in it (never removed by idgate: the
    # hash chain proves it); at least 3 years.
    ledger_days: int = 3 * 365
    rights_requests_days: int = 3 * 365
    # The officers' access log: entries older than this are removed; 0 keeps them for good;
    # otherwise at least 183 days (6 months).
    access_log_days: int = 0
    # Aliases in the identity graph (unified IDs merged into another person): older than
    # this, they leave the change log and the graph (identity.redaction); 0 keeps them for good.
    aliases_days: int = 0

    @property
    def limits_data(self) -> bool:
        return bool(
            self.days or self.purposes or self.destinations or self.access_log_days or self.aliases_days
        )


class InternalId(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A QA or staff account's identifier, as the team chose it (e.g. ``qa-001``): never
    personal data of a customer, and pseudonymised at load; events naming it are dropped."""

    type: str
    value: str
    # a WeChat openid's mini-program appid
    scope: str = ""


class CleaningConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[tenants.cleaning]``: traffic dropped or flagged before anything is stored
    (gateway.cleaning, docs/configuration.md)."""

    # Events whose user agent is a known bot or crawler (crawlerdetect) are dropped ("bot").
    drop_bots: bool = True
    # Extra user-agent regular expressions (case-insensitive) that count as bots.
    bot_patterns: list[str] = []
    # Internal / QA traffic, dropped ("internal"): events naming one of these identifiers,
    # or sent from one of these networks (CIDR, IPv4 or IPv6).
    internal_ids: list[InternalId] = []
    internal_networks: list[str] = []
    # Identifier values (exact, case-insensitive) and regular expressions (full match on
    # the normalised value) never linked, beside the fixed junk list
    # (identity.identifiers.JUNK_VALUES).
    blocked_identifiers: list[str] = []
    blocked_identifier_patterns: list[str] = []
    # Event timestamps further ahead of / behind the receipt time are flagged
    # (context.idgate.flags: timestamp_skew); 0 turns a bound off.
    max_future_seconds: int = 24 * 3600
    max_past_seconds: int = 30 * 24 * 3600
    # An exposure event's item (the plan's ``exposure``) shown again to the same person on
    # the same page view within this many seconds counts once (gateway.exposures); 0: off.
    exposure_window_seconds: int = 1800


class Tenant(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    name: str = ""
    consent: ConsentConfig = ConsentConfig()
    identity: IdentityConfig = IdentityConfig()
    notices: list[NoticeConfig] = []
    # Segment context.consent.categoryPreferences category -> purposes.
    consent_categories: dict[str, list[str]] = {}
    # Event properties that are sensitive personal information (PIPL Art 28): they pass
    # only with sensitive_pi consent and are removed otherwise.
    sensitive_properties: list[str] = []
    # An identify trait holding the person's age: a value under 14 flags the subject as a
    # minor (PIPL Art 31), who then needs guardian consent.
    minor_age_trait: str = ""
    sources: list[Source] = []
    destinations: list[Destination] = []
    purposes: dict[str, Purpose] = {}
    # Event name -> purposes; "*" is the default for events not listed.
    tracking_plan: dict[str, list[str]] = {}
    # A tracking plan file (YAML, gateway.plan; relative to this config file): events,
    # their purposes, property schemas and data classes. Its purposes win over the table above.
    tracking_plan_file: str = ""
    # What a plan violation does: "observe" delivers the event and counts the violation,
    # "enforce" keeps the event as a violation record (replayable) instead of delivering it.
    plan_mode: Literal["observe", "enforce"] = "observe"
    # Segment context.externalIds[].type -> idgate identifier type.
    external_id_types: dict[str, str] = {}
    # Business KPIs (export.kpis): the seed's set unless default_kpis = false, plus these
    # (one with a default's id replaces it).
    default_kpis: bool = True
    kpis: list[KpiDefinition] = []
    # Alert rules over the KPIs (export.alerts), notifying [[alert_channels]].
    alerts: list[AlertRule] = []
    retention: RetentionConfig = RetentionConfig()
    cleaning: CleaningConfig = CleaningConfig()
    # How long the KPIs that rules compare with a day or a week earlier are kept (days):
    # a week and a day of margin.
    kpi_history_days: int = 8

    def all_kpis(self) -> list[KpiDefinition]:
        own = {k.id for k in self.kpis}
        defaults = [k for k in DEFAULT_KPIS if k.id not in own] if self.default_kpis else []
        return [*defaults, *self.kpis]

    def all_purposes(self) -> dict[str, Purpose]:
        return {**DEFAULT_PURPOSES, **self.purposes}

    def purposes_for(self, event_name: str) -> tuple[str, ...]:
        plan = self.tracking_plan
        return tuple(plan.get(event_name) or plan.get("*") or ("analytics",))


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_message_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_messages: int = 2500
    max_property_depth: int = 32
    dedupe_window_seconds: int = 24 * 3600


class RateLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[rate_limits]``: what one source, one client network (IP truncated to /24 or /48)
    and one person may make idgate do. Shared by all replicas through Redis when it is
    configured. Per-IP defaults leave room for many people behind one carrier NAT."""

    enabled: bool = True
    source_requests_per_second: int = 5_000
    source_events_per_second: int = 50_000
    ip_requests_per_second: int = 200
    ip_events_per_second: int = 2_000
    # the per-second limits are paced: a client may send this many seconds' worth of its
    # budget at once, then no faster than the rate (a flood is admitted evenly, not as one
    # burst at the start of every second)
    burst_seconds: float = 1.0
    # identifiers one person (by its event's user id or anonymous id pseudonym) may link per day
    new_identifiers_per_person_per_day: int = 30
    # consent calls (API or consent events) naming one identifier per day
    consent_records_per_subject_per_day: int = 50
    # consent calls (API or consent events) from one client network per hour: what bounds
    # how many subjects one network can make the ledger and the consent state hold
    ip_consent_calls_per_hour: int = 3_600
    # proxies in front of idgate that append to X-Forwarded-For (0: use the peer address)
    forwarded_hops: int = 0


class AdminToken(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A compliance officer's or operator's API token (stored as a hash)."""

    name: str
    role: Literal["compliance", "operator", "auditor"]
    token_sha256: str = ""
    dev_token: str = ""  # accepted only with IDGATE_ENV=dev
    tenants: list[str] = []  # empty: every tenant


class ConsoleUser(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An officer who signs in to the compliance console with a name and a password
    (stored as an Argon2id hash: ``idgate console hash-password``)."""

    name: str
    role: Literal["compliance", "operator", "auditor"]
    password_argon2: str
    tenants: list[str] = []  # empty: every tenant


class RightsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The clock of data-subject rights requests (consent.rights_clock)."""

    due_working_days: int = 15
    nearly_due_working_days: int = 3
    official_calendar: bool = True  # the chinese-calendar package's holidays and make-up days
    holidays: list[date] = []  # extra public holidays (ISO dates)
    workdays: list[date] = []  # extra make-up working days (ISO dates)


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tenants: list[Tenant]
    limits: Limits = Limits()
    admin_tokens: list[AdminToken] = []
    console_users: list[ConsoleUser] = []
    rate_limits: RateLimits = RateLimits()
    rights: RightsConfig = RightsConfig()
    alert_channels: list[AlertChannel] = []


@dataclass(frozen=True)
class ResolvedSource:
    """A source with its tenant, as found from a write key."""

    tenant: Tenant
    source: Source
    destinations: tuple[Destination, ...]


@dataclass
class ConfigProblems(Exception):
    path: str
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.path}: {len(self.problems)} problem(s)\n{lines}"


def hash_write_key(write_key: str) -> str:
    return hashlib.sha256(write_key.encode("utf-8")).hexdigest()


# The demo secrets idgate publishes (idgate.example.toml, the README, deploy/): accepted in
# plain with IDGATE_ENV=dev. Outside dev their hashes are refused too: a production config
# that stored the hash of one (copied from the README) would take a key anyone can read.
PUBLISHED_DEMO_SECRETS = frozenset(
    {
        "acme-app-demo-key",
        "acme-web-demo-key",
        "acme-server-demo-key-0000000000000001",
        "acme-mp-demo-key",
        "acme-sensors-demo-token",
        "compliance-demo-token",
        "operator-demo-token",
        "auditor-demo-token",
    }
)
_PUBLISHED_DEMO_HASHES = frozenset(hash_write_key(s) for s in PUBLISHED_DEMO_SECRETS)


def _published_demo(where: str, hashed: str, dev: bool, problems: list[str]) -> None:
    """Outside dev: refuse the hash of a secret idgate's own docs publish."""
    if not dev and hashed in _PUBLISHED_DEMO_HASHES:
        problems.append(
            f"{where}: the hash of a demo secret published with idgate (accepted only with "
            "IDGATE_ENV=dev); create a secret one with `idgate keys write-key`"
        )


def _decode_part(data: Any, type_: type, where: str, problems: list[str]) -> Any:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        # msgspec appends " - at `$.x.y`"; turn that into our dotted location.
        text, _, at = msg.partition(" - at `$")
        loc = where + at.rstrip("`") if at else where
        problems.append(f"{loc}: {text}")
        return None


def _secret_hashes(
    where: str, hashed: tuple[str, str], plain: tuple[str, str], dev: bool, problems: list[str]
) -> list[str]:
    """The SHA-256 hashes a source accepts for one secret (write key or Sensors token): the
    stored hash, and in dev only the demo value given in plain. Problems are reported."""
    (hashed_name, hashed_value), (plain_name, plain_value) = hashed, plain
    hashes = []
    if hashed_value:
        if not _SHA256_HEX.match(hashed_value):
            problems.append(f"{where}.{hashed_name}: must be 64 lowercase hex characters")
        _published_demo(f"{where}.{hashed_name}", hashed_value, dev, problems)
        hashes.append(hashed_value)
    if plain_value:
        if not dev:
            problems.append(
                f"{where}.{plain_name}: plain secrets are only allowed with IDGATE_ENV=dev; "
                f"use {hashed_name} (see `idgate keys write-key`)"
            )
        elif len(plain_value) < 8:
            problems.append(f"{where}.{plain_name}: must be at least 8 characters")
        hashes.append(hash_write_key(plain_value))
    return hashes


def _check_sensors_source(s: Source, sw: str, dev: bool, problems: list[str], seen: dict[str, str]) -> None:
    tokens = _secret_hashes(
        sw,
        ("sensors_token_sha256", s.sensors_token_sha256),
        ("sensors_dev_token", s.sensors_dev_token),
        dev,
        problems,
    )
    if s.sensors_project and not _SENSORS_PROJECT.match(s.sensors_project):
        problems.append(f"{sw}.sensors_project: {s.sensors_project!r} must match {_SENSORS_PROJECT.pattern}")
    if s.sensors_project and not tokens:
        problems.append(f"{sw}: sensors_project needs sensors_token_sha256")
    if tokens and not s.sensors_project:
        problems.append(f"{sw}: a Sensors token needs sensors_project")
    for h in tokens:
        if "sensors:" + h in seen:
            problems.append(f"{sw}: Sensors token already used by {seen['sensors:' + h]}")
        seen["sensors:" + h] = sw


def _check_trust(s: Source, sw: str, problems: list[str]) -> None:
    """A client platform's key is public: it can never be trusted; a server source's key
    must be a real secret."""
    if s.trust == "server" and s.platform != "server":
        problems.append(
            f"{sw}.trust: a {s.platform} source's key ships to every device and cannot be trusted "
            'as server; use a separate source with platform = "server"'
        )
    if s.is_server:
        if s.dev_write_key and len(s.dev_write_key) < SERVER_KEY_MIN_LENGTH:
            problems.append(
                f"{sw}.dev_write_key: a server source needs a secret of at least "
                f"{SERVER_KEY_MIN_LENGTH} characters (`idgate keys write-key`)"
            )
        if s.sensors_dev_token and len(s.sensors_dev_token) < SERVER_KEY_MIN_LENGTH:
            problems.append(
                f"{sw}.sensors_dev_token: a server source needs a token of at least "
                f"{SERVER_KEY_MIN_LENGTH} characters"
            )
        if s.assertions is not None:
            problems.append(f"{sw}.assertions: a server source asserts identities itself")
        if s.wechat_appids:
            problems.append(f"{sw}.wechat_appids: a server source asserts every openid itself")
    for k, appid in enumerate(s.wechat_appids):
        if not _APPID.match(appid):
            problems.append(f"{sw}.wechat_appids[{k}]: {appid[:80]!r} must match {_APPID.pattern}")
    a = s.assertions
    if a is not None:
        keys = [k for k in (a.hs256_secret_env, a.hs256_secret_file, a.ed25519_public_key) if k]
        if len(keys) != 1:
            problems.append(
                f"{sw}.assertions: needs exactly one of hs256_secret_env, hs256_secret_file, "
                "ed25519_public_key"
            )
        if not 1 <= a.max_lifetime_seconds <= 24 * 3600:
            problems.append(f"{sw}.assertions.max_lifetime_seconds: must be between 1 and 86400")
        if not a.audience:
            problems.append(f"{sw}.assertions.audience: must not be empty")


def _check_origins(s: Source, sw: str, has_write_key: bool, problems: list[str]) -> None:
    """``allowed_origins``: exact origins as browsers send them; no wildcard (the browser sends
    the write key, a credential: a page of any site could send as this source)."""
    if s.allowed_origins and not has_write_key:
        problems.append(f"{sw}.allowed_origins: needs a write key (browsers send it to the Segment API)")
    for k, origin in enumerate(s.allowed_origins):
        where = f"{sw}.allowed_origins[{k}]"
        if "*" in origin:
            problems.append(
                f"{where}: {origin[:80]!r}: no wildcard: the source takes a write key, list each "
                "origin (https://shop.example.cn)"
            )
        elif not _ORIGIN.match(origin):
            problems.append(
                f"{where}: {origin[:80]!r} is not an origin: scheme://host[:port] in lowercase, "
                "http or https, no path, query or trailing slash (https://shop.example.cn)"
            )
        elif (origin.startswith("http://") and origin.endswith(":80")) or (
            origin.startswith("https://") and origin.endswith(":443")
        ):
            problems.append(f"{where}: {origin!r}: browsers omit the default port: drop it")
        if origin in s.allowed_origins[:k]:
            problems.append(f"{where}: {origin!r} is listed twice")


def _check_tenant(t: Tenant, where: str, dev: bool, problems: list[str], seen_keys: dict[str, str]) -> None:
    if not _ID.match(t.id):
        problems.append(f"{where}.id: {t.id!r} must match {_ID.pattern}")
    purposes = t.all_purposes()
    if not t.sources:
        problems.append(f"{where}.sources: a tenant needs at least one source")
    source_ids: set[str] = set()
    for j, s in enumerate(t.sources):
        sw = f"{where}.sources[{j}]"
        if not _ID.match(s.id):
            problems.append(f"{sw}.id: {s.id!r} must match {_ID.pattern}")
        if s.id in source_ids:
            problems.append(f"{sw}.id: duplicate source id {s.id!r}")
        source_ids.add(s.id)
        hashes = _secret_hashes(
            sw, ("write_key_sha256", s.write_key_sha256), ("dev_write_key", s.dev_write_key), dev, problems
        )
        if not hashes and not s.sensors_project:
            problems.append(f"{sw}: needs write_key_sha256")
        for h in hashes:
            if h in seen_keys:
                problems.append(f"{sw}: write key already used by {seen_keys[h]}")
            seen_keys[h] = sw
        _check_sensors_source(s, sw, dev, problems, seen_keys)
        _check_trust(s, sw, problems)
        _check_origins(s, sw, bool(hashes), problems)
        if (s.plan_validation or s.plan_unplanned) and not t.tracking_plan_file:
            problems.append(f"{sw}: plan_validation / plan_unplanned need the tenant's tracking_plan_file")
    dest_ids: set[str] = set()
    for j, d in enumerate(t.destinations):
        dw = f"{where}.destinations[{j}]"
        if not _ID.match(d.id):
            problems.append(f"{dw}.id: {d.id!r} must match {_ID.pattern}")
        if d.id in dest_ids:
            problems.append(f"{dw}.id: duplicate destination id {d.id!r}")
        dest_ids.add(d.id)
        for p in d.purposes:
            if p not in purposes:
                problems.append(f"{dw}.purposes: unknown purpose {p!r}")
        from export.sinks import validate_options

        problems.extend(
            f"{dw}.options.{name}: {problem}" for name, problem in validate_options(d.sink, d.options)
        )
        if not 1 <= d.batch_size <= 10_000:
            problems.append(f"{dw}.batch_size: must be between 1 and 10000")
        if d.retry.max_attempts < 1:
            problems.append(f"{dw}.retry.max_attempts: must be at least 1")
        if d.retry.initial_backoff_ms < 1 or d.retry.max_backoff_ms < d.retry.initial_backoff_ms:
            problems.append(f"{dw}.retry: need 1 <= initial_backoff_ms <= max_backoff_ms")
        from gateway.plan import DATA_CLASSES

        for c in d.data_classes:
            if c not in DATA_CLASSES:
                problems.append(f"{dw}.data_classes: {c!r} is not one of {', '.join(DATA_CLASSES)}")
        if d.data_classes and not t.tracking_plan_file:
            problems.append(f"{dw}.data_classes: needs the tenant's tracking_plan_file")
        if d.pseudonym_domain and not _ID.match(d.pseudonym_domain):
            problems.append(f"{dw}.pseudonym_domain: {d.pseudonym_domain!r} must match {_ID.pattern}")
    problems.extend(f"{where}.cleaning.{problem}" for problem in cleaning_problems(t.cleaning))
    for event_name, event_purposes in t.tracking_plan.items():
        for p in event_purposes:
            if p not in purposes:
                problems.append(f"{where}.tracking_plan.{event_name!r}: unknown purpose {p!r}")
    for category, category_purposes in t.consent_categories.items():
        for p in category_purposes:
            if p not in purposes:
                problems.append(f"{where}.consent_categories.{category!r}: unknown purpose {p!r}")
    notice_ids: set[str] = set()
    for j, n in enumerate(t.notices):
        if not _SHA256_HEX.match(n.content_sha256):
            problems.append(f"{where}.notices[{j}].content_sha256: must be 64 lowercase hex characters")
        if n.id in notice_ids:
            problems.append(f"{where}.notices[{j}].id: duplicate notice id {n.id!r}")
        notice_ids.add(n.id)
    problems.extend(check_kpis(t.kpis, purposes, f"{where}.kpis", t.all_kpis()))
    _check_retention(t, f"{where}.retention", purposes, dest_ids, problems)
    if not t.consent.enforce and not dev:
        problems.append(f"{where}.consent.enforce: false is only allowed with IDGATE_ENV=dev")
    from identity.identifiers import IDENTIFIER_TYPES

    for ext, id_type in t.external_id_types.items():
        if id_type not in IDENTIFIER_TYPES:
            problems.append(f"{where}.external_id_types.{ext}: unknown identifier type {id_type!r}")
    for section, mapping in (
        ("trait_types", t.identity.trait_types),
        ("device_fields", t.identity.device_fields),
    ):
        for key, id_type in mapping.items():
            if id_type not in IDENTIFIER_TYPES and not (
                section == "device_fields" and id_type == "advertising"
            ):
                problems.append(f"{where}.identity.{section}.{key}: unknown identifier type {id_type!r}")


def _check_retention(
    t: Tenant, where: str, purposes: Mapping[str, Purpose], destinations: set[str], problems: list[str]
) -> None:
    from consent.retention import floor_problems

    r = t.retention
    if r.days < 0:
        problems.append(f"{where}.days: must be 0 (no limit) or a number of days")
    if r.aliases_days < 0:
        problems.append(f"{where}.aliases_days: must be 0 (kept for good) or at least 1 day")
    for section, periods, known in (
        ("purposes", r.purposes, set(purposes)),
        ("destinations", r.destinations, destinations),
    ):
        for name, days in periods.items():
            if name not in known:
                problems.append(f"{where}.{section}.{name}: unknown {section[:-1]} {name!r}")
            if days < 1:
                problems.append(f"{where}.{section}.{name}: must be at least 1 day")
    problems.extend(
        floor_problems(
            ledger_days=r.ledger_days,
            rights_requests_days=r.rights_requests_days,
            access_log_days=r.access_log_days,
            where=where,
        )
    )


def _load_tenant_plan(tenant: Tenant, where: str, path: str, problems: list[str]) -> Tenant:
    """Check and compile the tenant's plan file; the tenant keeps its resolved path."""
    from gateway.plan import PlanProblems, load_plan, use_plan

    plan_path = Path(tenant.tracking_plan_file)
    if not plan_path.is_absolute() and not path.startswith("<"):
        plan_path = Path(path).resolve().parent / plan_path
    resolved = msgspec.structs.replace(tenant, tracking_plan_file=str(plan_path))
    try:
        # the plan checked now is the one the tenant runs (a later edit needs a restart)
        use_plan(resolved, load_plan(plan_path, purposes=tenant.all_purposes()))
    except PlanProblems as exc:
        problems.extend(f"{where}.tracking_plan_file: {exc.path}: {p}" for p in exc.problems)
    return resolved


def parse_config(text: str, *, path: str = "<config>", dev: bool = False) -> Config:
    """Parse and validate a config document; raise ConfigProblems listing every problem."""
    problems: list[str] = []
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblems(path, [f"TOML syntax: {exc}"]) from None
    raw_tenants = raw.pop("tenants", None)
    if not isinstance(raw_tenants, list) or not raw_tenants:
        problems.append("tenants: at least one [[tenants]] table is required")
        raw_tenants = []
    limits = _decode_part(raw.pop("limits", {}), Limits, "limits", problems)
    rate_limits = _decode_part(raw.pop("rate_limits", {}), RateLimits, "rate_limits", problems)
    if rate_limits is not None:
        for name in RateLimits.__struct_fields__:
            value = getattr(rate_limits, name)
            if name == "forwarded_hops":
                if not 0 <= value <= 10:
                    problems.append("rate_limits.forwarded_hops: must be between 0 and 10")
            elif name == "burst_seconds":
                if not 0.01 <= value <= 60:
                    problems.append("rate_limits.burst_seconds: must be between 0.01 and 60")
            elif name != "enabled" and value < 1:
                problems.append(f"rate_limits.{name}: must be at least 1")
    rights = _decode_part(raw.pop("rights", {}), RightsConfig, "rights", problems)
    if rights is not None:
        if not 1 <= rights.due_working_days <= 60:
            problems.append("rights.due_working_days: must be between 1 and 60")
        if not 0 <= rights.nearly_due_working_days < rights.due_working_days:
            problems.append("rights.nearly_due_working_days: must be at least 0 and below due_working_days")
        both = set(rights.holidays) & set(rights.workdays)
        if both:
            problems.append(f"rights: days both holidays and workdays: {sorted(d.isoformat() for d in both)}")
    admin_tokens: list[AdminToken] = []
    for i, rt in enumerate(raw.pop("admin_tokens", [])):
        token = _decode_part(rt, AdminToken, f"admin_tokens[{i}]", problems)
        if token is None:
            continue
        where = f"admin_tokens[{i}]"
        if token.token_sha256 and not _SHA256_HEX.match(token.token_sha256):
            problems.append(f"{where}.token_sha256: must be 64 lowercase hex characters")
        _published_demo(f"{where}.token_sha256", token.token_sha256, dev, problems)
        if token.dev_token and not dev:
            problems.append(f"{where}.dev_token: plain tokens are only allowed with IDGATE_ENV=dev")
        if token.dev_token and len(token.dev_token) < 12:
            problems.append(f"{where}.dev_token: must be at least 12 characters")
        if not token.token_sha256 and not token.dev_token:
            problems.append(f"{where}: needs token_sha256")
        admin_tokens.append(token)
    console_users = _console_users(raw.pop("console_users", []), {t.name for t in admin_tokens}, problems)
    channels: list[AlertChannel] = []
    for i, rc in enumerate(raw.pop("alert_channels", [])):
        channel = _decode_part(rc, AlertChannel, f"alert_channels[{i}]", problems)
        if channel is not None:
            channels.append(channel)
    problems.extend(check_channels(channels, "alert_channels"))
    for key in raw:
        problems.append(f"{key}: unknown top-level key")
    tenants: list[Tenant] = []
    seen_keys: dict[str, str] = {}
    tenant_ids: set[str] = set()
    for i, rt in enumerate(raw_tenants):
        where = f"tenants[{i}]"
        tenant = _decode_part(rt, Tenant, where, problems)
        if tenant is None:
            continue
        if tenant.id in tenant_ids:
            problems.append(f"{where}.id: duplicate tenant id {tenant.id!r}")
        tenant_ids.add(tenant.id)
        _check_tenant(tenant, where, dev, problems, seen_keys)
        if tenant.tracking_plan_file:
            tenant = _load_tenant_plan(tenant, where, path, problems)
        if not 0 <= tenant.kpi_history_days <= 35:
            problems.append(f"{where}.kpi_history_days: must be between 0 and 35")
        problems.extend(
            check_alerts(
                tenant.alerts,
                tenant.all_kpis(),
                channels,
                f"{where}.alerts",
                history_seconds=tenant.kpi_history_days * DAY_SECONDS,
                sources=[s.id for s in tenant.sources],
            )
        )
        tenants.append(tenant)
    # Destinations name sink directories, outbox consumer groups and dead-letter streams:
    # unique across tenants, not only within one.
    owners: dict[str, str] = {}
    for t in tenants:
        for d in t.destinations:
            if d.id in owners and owners[d.id] != t.id:
                problems.append(f"destination {d.id!r}: used by tenants {owners[d.id]!r} and {t.id!r}")
            owners.setdefault(d.id, t.id)
    known_tenants = {t.id for t in tenants}
    holders_of: tuple[tuple[str, Sequence[AdminToken | ConsoleUser]], ...] = (
        ("admin_tokens", admin_tokens),
        ("console_users", console_users),
    )
    for part, holders in holders_of:
        for i, holder in enumerate(holders):
            for tid in holder.tenants:
                if tid not in known_tenants:
                    problems.append(f"{part}[{i}].tenants: unknown tenant {tid!r}")
    if problems:
        raise ConfigProblems(path, problems)
    return Config(
        tenants=tenants,
        limits=limits or Limits(),
        admin_tokens=admin_tokens,
        console_users=console_users,
        rate_limits=rate_limits or RateLimits(),
        rights=rights or RightsConfig(),
        alert_channels=channels,
    )


def _console_users(raw: Any, token_names: set[str], problems: list[str]) -> list[ConsoleUser]:
    """The console's users: unique names (also against admin token names: the access log
    names officers), an Argon2 hash each."""
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

    users: list[ConsoleUser] = []
    seen: set[str] = set()
    for i, ru in enumerate(raw):
        where = f"console_users[{i}]"
        user = _decode_part(ru, ConsoleUser, where, problems)
        if user is None:
            continue
        if not user.name.strip() or len(user.name) > 64:
            problems.append(f"{where}.name: 1 to 64 characters")
        if user.name in seen or user.name in token_names:
            problems.append(f"{where}.name: {user.name!r} names another console user or admin token")
        seen.add(user.name)
        try:
            extract_parameters(user.password_argon2)
        except InvalidHashError:
            problems.append(f"{where}.password_argon2: not an Argon2 hash (idgate console hash-password)")
        users.append(user)
    return users


def load_config(path: Path, *, dev: bool) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigProblems(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse_config(text, path=str(path), dev=dev)


def _index_sources(config: Config, hashes: Callable[[Source], list[str]]) -> dict[str, ResolvedSource]:
    index: dict[str, ResolvedSource] = {}
    for tenant in config.tenants:
        dests = tuple(tenant.destinations)
        for source in tenant.sources:
            keys = hashes(source)
            if keys:
                resolved = ResolvedSource(tenant=tenant, source=source, destinations=dests)
                index.update(dict.fromkeys(keys, resolved))
    return index


def _accepted(hashed: str, plain: str, dev: bool) -> list[str]:
    """The hashes a secret is accepted under: the stored one, and the demo value in dev."""
    return [h for h in (hashed, hash_write_key(plain) if dev and plain else "") if h]


def index_write_keys(config: Config, *, dev: bool) -> dict[str, ResolvedSource]:
    """Map write-key hash -> source, for authentication."""
    return _index_sources(config, lambda s: _accepted(s.write_key_sha256, s.dev_write_key, dev))


def allowed_origins(config: Config) -> frozenset[str]:
    """Every origin some source allows (a preflight carries no write key: gateway.cors)."""
    return frozenset(o for t in config.tenants for s in t.sources for o in s.allowed_origins)


def index_sensors_tokens(config: Config, *, dev: bool) -> dict[str, ResolvedSource]:
    """Map Sensors token hash -> source (the request's project must be the source's)."""
    return _index_sources(
        config,
        lambda s: _accepted(s.sensors_token_sha256, s.sensors_dev_token, dev) if s.sensors_project else [],
    )


def cleaning_problems(c: CleaningConfig) -> list[str]:
    """What ``idgate config check`` reports about one tenant's cleaning config (field named)."""
    problems = []
    for name, patterns in (
        ("bot_patterns", c.bot_patterns),
        ("blocked_identifier_patterns", c.blocked_identifier_patterns),
    ):
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{name}[{i}]: not a regular expression ({exc})")
    for i, net in enumerate(c.internal_networks):
        try:
            ipaddress.ip_network(net.strip(), strict=False)
        except ValueError:
            problems.append(f"internal_networks[{i}]: {net[:60]!r} is not a CIDR network")
    for i, ident in enumerate(c.internal_ids):
        try:
            pseudonymise_identifier(_PROBE, ident.type, ident.value, scope=ident.scope or None)
        except InvalidIdentifier as exc:  # the reason never holds the value
            problems.append(f"internal_ids[{i}]: {exc.reason}")
    if c.max_future_seconds < 0 or c.max_past_seconds < 0:
        problems.append("max_future_seconds / max_past_seconds: must be 0 (off) or more")
    if not 0 <= c.exposure_window_seconds <= 7 * 24 * 3600:
        problems.append("exposure_window_seconds: must be 0 (off) to 604800 (a week)")
    return problems


_PROBE = Pseudonymiser(b"\0" * 32, 0)  # validates identifiers; its pseudonyms are thrown away
