"""Tracking plans: what a tenant may collect, why, and in what shape (issue 14).

A plan is a YAML file of its own, referenced from the tenant config
(``tracking_plan_file = "plans/ecommerce.yaml"``, relative to the config file). For each
event it names a description, an owner, the purposes and legal basis it serves, the
Segment and Sensors event names it answers to (both SDK families validate against one
entry), the properties it requires, and for each property a JSON Schema fragment and a
data class:

- ``sensitive``: sensitive personal information (PIPL Art. 28), passes only with
  ``sensitive_pi`` consent (like ``tenants.sensitive_properties``);
- ``identifier`` / ``contact``: pseudonymised wherever the key appears (fed into the
  tenant's identifier key patterns, ``gateway.privacy.scrubber_for``);
- ``financial``, ``behavioural``, ``device``, ``none``: recorded; a destination may ask for
  properties by class (``data_classes``, per-destination minimisation).

Each event's schema is compiled once per plan version with ``fastjsonschema`` (the
per-event check); the error paths of a failing event come from ``jsonschema``. Validation
runs on the event after pseudonymisation, so ``identifier``/``contact`` properties may
only be checked for presence and type (a pattern would be matched against a pseudonym):
the loader refuses ``pattern``, ``format``, ``enum`` and ``const`` on them.

How an event finds its plan entry (``lookup_key``): a ``track`` by its event name, a
Segment ``page``/``screen`` call by ``page:<name>`` / ``screen:<name>``. Names matching
the plan's ``ignore`` globs (SDK housekeeping such as ``$AppStart``) are not checked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import fastjsonschema
import jsonschema
import msgspec
import yaml

from identity.scrub import REDACTION_MARK

DATA_CLASSES: Final = ("identifier", "contact", "sensitive", "financial", "behavioural", "device", "none")
# PIPL Art. 13: the lawful bases for processing personal information.
LEGAL_BASES: Final = (
    "consent",
    "contract",
    "hr_management",
    "legal_obligation",
    "public_health",
    "news_reporting",
    "public_information",
    "other_law",
)
PlanMode = Literal["observe", "enforce"]
# What a source does with an event that breaks its plan entry (``plan_validation``):
# refuse it (kept as a violation record), remove the bad properties (recorded) and forward
# it, or forward it with the violations in ``context.idgate.violations``.
Validation = Literal["block", "omit", "flag"]
# What a source does with an event its plan does not list (``plan_unplanned``).
UnplannedPolicy = Literal["block", "allow", "flag"]
# Keywords that would be matched against a pseudonym for identifier/contact properties.
_VALUE_KEYWORDS: Final = ("pattern", "format", "enum", "const")
UNPLANNED: Final = "unplanned"
# The rule of an identifier or other personal data in a property whose class is not
# ``identifier`` or ``contact`` (found pseudonymised or redacted by the ingest scrubber).
IDENTIFIER_RULE: Final = "identifier"
_CARRIES_IDENTIFIERS: Final = frozenset({"identifier", "contact"})
_REDACTION_MARK: Final = REDACTION_MARK.encode()
_encode_json = msgspec.json.Encoder().encode


class ExposureSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An exposure event's repeat rule (gateway.exposures): the item it shows, a property
    (``promotion_id``), each value of a list (``product_ids[]``, as Sensors SDKs send lists)
    or each item's property in a list of objects (``products[].product_id``); and the
    properties that tell one page view from another, first present wins (none: any page)."""

    item: str
    page: list[str] = []

    @property
    def list_key(self) -> str | None:
        """``products`` for ``products[].product_id`` or ``products[]``; None for one item."""
        head, sep, _ = self.item.partition("[]")
        return head if sep else None

    @property
    def item_key(self) -> str:
        """The property of the item (a list's entry itself: "")."""
        head, sep, tail = self.item.partition("[]")
        return tail.removeprefix(".") if sep else head


class PlanEventSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    description: str
    owner: str
    purposes: list[str]
    legal_basis: str
    segment: list[str] = []
    sensors: list[str] = []
    required: list[str] = []
    # property -> JSON Schema fragment plus its data class under "class"
    properties: dict[str, dict[str, Any]] = {}
    # false: a property the plan does not list is a violation ("additionalProperties")
    additional_properties: bool = True
    # an exposure: the same item shown to the same person on the same page counts once
    # within the tenant's cleaning.exposure_window_seconds
    exposure: ExposureSpec | None = None


class PlanSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    plan: str
    version: int
    events: dict[str, PlanEventSpec]
    description: str = ""
    ignore: list[str] = []


class PlanProblems(Exception):
    """Every problem of a plan file, each with its location in the file."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


class Violation(msgspec.Struct, frozen=True, omit_defaults=True):
    """One way an event broke its plan. ``rule`` is a JSON Schema keyword (``type``,
    ``required``, ``minimum``, ``enum``, ``pattern``, ``additionalProperties``...) or
    ``unplanned``; ``path`` names the property (``properties.price``). No value is quoted:
    the detail says what the plan wanted, never what was sent."""

    rule: str
    path: str
    detail: str


@dataclass(frozen=True)
class PlanEvent:
    id: str
    spec: PlanEventSpec
    schema: dict[str, Any]
    check: Callable[[Any], Any]
    explain: jsonschema.protocols.Validator
    classes: Mapping[str, str]

    def violations(self, properties: Mapping[str, Any] | None) -> list[Violation]:
        """Nothing when the properties fit (the compiled check); else every error."""
        data = properties or {}
        try:
            self.check(data)
            return []
        except fastjsonschema.JsonSchemaValueException:
            pass
        found: list[Violation] = []
        for err in sorted(self.explain.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
            rule = str(err.validator)
            instance: Any = err.instance
            wanted: Any = err.validator_value
            where = ".".join(["properties", *map(str, err.absolute_path)])
            if rule == "required":
                missing = [r for r in wanted if isinstance(instance, dict) and r not in instance]
                found.extend(
                    Violation("required", f"{where}.{name}", "required property missing") for name in missing
                )
            elif rule == "additionalProperties":
                schema: Any = err.schema
                known = schema.get("properties", {}) if isinstance(schema, dict) else {}
                presets = "patternProperties" in schema  # "$" keys pass (_compile_event)
                extra = (
                    sorted(k for k in instance if k not in known and not (presets and k.startswith("$")))
                    if isinstance(instance, dict)
                    else []
                )
                found.extend(
                    Violation("additionalProperties", f"{where}.{name}", "property not in the plan")
                    for name in extra
                )
            else:
                found.append(Violation(rule, where, f"must satisfy {rule}: {wanted!r}"[:200]))
        return found or [Violation("schema", "properties", "does not fit the plan")]

    def identifier_violations(
        self, properties: Mapping[str, Any] | None, pseudonyms: Set[str]
    ) -> list[Violation]:
        """Properties not classed ``identifier``/``contact`` that hold one anyway: a value the
        ingest scrubber pseudonymised (an identifier key) or redacted (a phone, ID card, bank
        card or email in free text), at any depth. SDK presets (``$...``) are the SDK's."""
        if not properties:
            return []
        # the common case, found in C: nothing pseudonymised or redacted anywhere in them
        blob = _encode_json(properties)
        if _REDACTION_MARK not in blob and not any(p.encode() in blob for p in pseudonyms):
            return []
        classes = self.classes
        return [
            Violation(
                IDENTIFIER_RULE,
                f"properties.{name}",
                "identifier or personal data in a property not of class identifier or contact",
            )
            for name, value in properties.items()
            if not name.startswith("$")
            and classes.get(name) not in _CARRIES_IDENTIFIERS
            and _holds_identifier(value, pseudonyms)
        ]

    def omittable(
        self, found: Sequence[Violation], properties: Mapping[str, Any] | None
    ) -> tuple[str, ...] | None:
        """The top-level properties whose removal leaves an event that fits, or None when
        removal cannot fix it (a required property missing or broken, a violation not tied
        to one property)."""
        names: dict[str, None] = {}
        required = self.spec.required
        present = properties or {}
        for v in found:
            if v.rule == "required" or not v.path.startswith("properties."):
                return None
            rest = v.path[len("properties.") :]
            # the property the path starts with (a key may itself hold a ".")
            name = next(
                (k for k in present if rest == k or rest.startswith(f"{k}.")),
                None,
            )
            if name is None or name in required:
                return None
            names[name] = None
        return tuple(names)


@dataclass(frozen=True)
class TrackingPlan:
    """A loaded, compiled plan: look-up by name, per-event checks, data classes."""

    name: str
    version: int
    digest: str
    events: dict[str, PlanEvent]
    by_name: dict[str, PlanEvent]
    ignore: re.Pattern[str] | None
    keys_of_class: dict[str, frozenset[str]] = field(default_factory=dict)

    def find(self, key: str) -> PlanEvent | None:
        return self.by_name.get(key)

    def ignored(self, key: str) -> bool:
        return self.ignore is not None and self.ignore.match(key) is not None

    def check(
        self, key: str, properties: Mapping[str, Any] | None
    ) -> tuple[PlanEvent | None, list[Violation]]:
        """The event's plan entry and what it broke; (None, []) for an ignored name."""
        event = self.by_name.get(key)
        if event is None:
            if self.ignored(key):
                return None, []
            return None, [Violation(UNPLANNED, "event", "event not in the tracking plan")]
        return event, event.violations(properties)


def _holds_identifier(value: Any, pseudonyms: Set[str]) -> bool:
    if isinstance(value, str):
        return value in pseudonyms or REDACTION_MARK in value
    if isinstance(value, dict):
        return any(_holds_identifier(v, pseudonyms) for v in value.values())
    if isinstance(value, list):
        return any(_holds_identifier(v, pseudonyms) for v in value)
    return False


@dataclass(frozen=True, slots=True)
class PlanPolicy:
    """What one source does with events that break the plan, or that it does not list."""

    validation: Validation
    unplanned: UnplannedPolicy


# The tenant-level plan_mode, where a source sets nothing: observe flags, enforce blocks.
_MODE_POLICIES: Final[dict[str, PlanPolicy]] = {
    "observe": PlanPolicy("flag", "flag"),
    "enforce": PlanPolicy("block", "block"),
}


def policy_for(tenant: Any, source: Any) -> PlanPolicy:
    """The source's ``plan_validation`` / ``plan_unplanned``, else its tenant's ``plan_mode``."""
    default = _MODE_POLICIES[tenant.plan_mode]
    validation = source.plan_validation or default.validation
    unplanned = source.plan_unplanned or default.unplanned
    if validation == default.validation and unplanned == default.unplanned:
        return default
    return PlanPolicy(validation, unplanned)


class PlanVerdict(NamedTuple):
    """What the plan does to one event: ``pass`` (fits, an ignored name, or an unplanned
    event a source allows), ``flag``, ``omit`` (``omit`` names the properties removed) or
    ``block``. ``event`` is the plan event id, ``unplanned``, or "" for an ignored name."""

    event: str
    action: Literal["pass", "flag", "omit", "block"]
    violations: list[Violation]
    omit: tuple[str, ...] = ()


_IGNORED: Final = PlanVerdict("", "pass", [])


def judge(
    plan: TrackingPlan,
    key: str,
    properties: Mapping[str, Any] | None,
    pseudonyms: Set[str],
    policy: PlanPolicy,
) -> PlanVerdict:
    """The plan's verdict on one (pseudonymised) event under a source's policy. In ``omit``,
    an event that removing properties cannot fix is blocked."""
    entry = plan.by_name.get(key)
    if entry is None:
        if plan.ignored(key):
            return _IGNORED
        if policy.unplanned == "allow":
            return PlanVerdict(UNPLANNED, "pass", [])
        return PlanVerdict(
            UNPLANNED, policy.unplanned, [Violation(UNPLANNED, "event", "event not in the tracking plan")]
        )
    found = entry.violations(properties)
    found += entry.identifier_violations(properties, pseudonyms)
    if not found:
        return PlanVerdict(entry.id, "pass", found)
    if policy.validation == "omit":
        names = entry.omittable(found, properties)
        if names is not None:
            return PlanVerdict(entry.id, "omit", found, names)
        return PlanVerdict(entry.id, "block", found)
    return PlanVerdict(entry.id, policy.validation, found)


def lookup_key(event_type: str, event_name: str | None, page_name: str | None) -> str | None:
    """The name an event is found under in a plan; None for calls a plan does not cover
    (identify, alias, group)."""
    if event_type == "track":
        return event_name or ""
    if event_type in ("page", "screen"):
        return f"{event_type}:{page_name}" if page_name else event_type
    return None


def _where(*parts: object) -> str:
    return ".".join(str(p) for p in parts)


def _compile_event(
    event_id: str, spec: PlanEventSpec, purposes: Iterable[str] | None, problems: list[str]
) -> PlanEvent | None:
    here = _where("events", event_id)
    before = len(problems)
    if not spec.purposes:
        problems.append(f"{here}.purposes: at least one purpose")
    if purposes is not None:
        known = set(purposes)
        problems.extend(f"{here}.purposes: unknown purpose {p!r}" for p in spec.purposes if p not in known)
    if spec.legal_basis not in LEGAL_BASES:
        problems.append(f"{here}.legal_basis: {spec.legal_basis!r} is not one of {', '.join(LEGAL_BASES)}")
    if not spec.owner.strip():
        problems.append(f"{here}.owner: name who owns this event")
    classes: dict[str, str] = {}
    properties: dict[str, Any] = {}
    for name, fragment in spec.properties.items():
        pw = f"{here}.properties.{name}"
        if not isinstance(fragment, dict):
            problems.append(f"{pw}: must be a mapping (a JSON Schema and its class)")
            continue
        fragment_schema = dict(fragment)
        data_class = fragment_schema.pop("class", None)
        if data_class not in DATA_CLASSES:
            problems.append(f"{pw}.class: {data_class!r} is not one of {', '.join(DATA_CLASSES)}")
            continue
        if data_class in ("identifier", "contact"):
            for keyword in _VALUE_KEYWORDS:
                if keyword in fragment_schema:
                    problems.append(
                        f"{pw}.{keyword}: a {data_class} property is checked after pseudonymisation: "
                        "only its presence and type can be checked"
                    )
        classes[name] = data_class
        properties[name] = fragment_schema
    for name in spec.required:
        if name not in spec.properties:
            problems.append(f"{here}.required: {name!r} is not among the event's properties")
    if spec.exposure is not None:
        problems.extend(_exposure_problems(f"{here}.exposure", spec.exposure, spec.properties))
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(spec.required),
        "additionalProperties": spec.additional_properties,
    }
    if not spec.additional_properties:
        # SDK preset properties ($lib, $os, $device_id...: Sensors adds them to every event)
        # are never "not in the plan"
        schema["patternProperties"] = {"^\\$": {}}
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        location = _where(here, *exc.absolute_path)
        problems.append(f"{location}: not a valid JSON Schema: {exc.message}")
    if len(problems) > before:
        return None
    return PlanEvent(
        id=event_id,
        spec=spec,
        schema=schema,
        check=fastjsonschema.compile(schema),
        explain=jsonschema.Draft202012Validator(schema),
        classes=classes,
    )


_EXPOSURE_ITEM = re.compile(r"[^\[\].]+(\[\](\.[^\[\].]+)?)?")


def _exposure_problems(here: str, exposure: ExposureSpec, properties: Mapping[str, Any]) -> list[str]:
    problems = []
    head = exposure.list_key or exposure.item_key
    if not _EXPOSURE_ITEM.fullmatch(exposure.item):
        problems.append(
            f"{here}.item: a property (promotion_id), a list (product_ids[]) or a list's item "
            "property (products[].product_id)"
        )
    elif head not in properties:
        problems.append(f"{here}.item: {head!r} is not among the event's properties")
    elif exposure.list_key is not None and properties[head].get("type") != "array":
        problems.append(f"{here}.item: {head!r} must be declared type: array")
    problems.extend(
        f"{here}.page: {name!r} is not among the event's properties"
        for name in exposure.page
        if name not in properties
    )
    return problems


def parse_plan(text: str, *, path: str = "<plan>", purposes: Iterable[str] | None = None) -> TrackingPlan:
    """Parse, check and compile a plan; PlanProblems lists every problem with its location."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise PlanProblems(path, [f"YAML syntax{line}: {getattr(exc, 'problem', None) or exc}"]) from None
    try:
        spec = msgspec.convert(raw, PlanSpec)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.events.x.owner`": the location in the file
        raise PlanProblems(path, [str(exc).replace("`$.", "`")]) from None
    problems: list[str] = []
    if spec.version < 1:
        problems.append("version: must be a positive integer (raise it with every change)")
    purpose_list = list(purposes) if purposes is not None else None
    events: dict[str, PlanEvent] = {}
    by_name: dict[str, PlanEvent] = {}
    owners: dict[str, str] = {}
    for event_id, event_spec in spec.events.items():
        compiled = _compile_event(event_id, event_spec, purpose_list, problems)
        names = [*event_spec.segment, *event_spec.sensors] or [event_id]
        for name in names:
            if name in owners and owners[name] != event_id:
                problems.append(f"events.{event_id}: name {name!r} already belongs to events.{owners[name]}")
            owners[name] = event_id
        if compiled is not None:
            events[event_id] = compiled
            by_name.update(dict.fromkeys(names, compiled))
    if problems:
        raise PlanProblems(path, problems)
    keys: dict[str, set[str]] = {c: set() for c in DATA_CLASSES}
    for event in events.values():
        for name, data_class in event.classes.items():
            keys[data_class].add(name)
    ignore = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in spec.ignore)) if spec.ignore else None
    return TrackingPlan(
        name=spec.plan,
        version=spec.version,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        events=events,
        by_name=by_name,
        ignore=ignore,
        keys_of_class={c: frozenset(v) for c, v in keys.items()},
    )


# Compiled once per plan file version: (path, digest of its text) -> plan.
_compiled: dict[tuple[str, str], TrackingPlan] = {}


def load_plan(path: Path, *, purposes: Iterable[str] | None = None) -> TrackingPlan:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanProblems(str(path), [f"cannot read: {exc.strerror}"]) from None
    key = (str(path), hashlib.sha256(text.encode()).hexdigest())
    found = _compiled.get(key)
    if found is None:
        found = _compiled[key] = parse_plan(text, path=str(path), purposes=purposes)
    return found


# -- a tenant's plan -------------------------------------------------------------------------
_tenant_plans: dict[int, tuple[Any, TrackingPlan | None]] = {}


def plan_for(tenant: Any) -> TrackingPlan | None:
    """The tenant's plan (``tracking_plan_file``, resolved by ``parse_config``), or None."""
    found = _tenant_plans.get(id(tenant))
    if found is None or found[0] is not tenant:
        plan = load_plan(Path(tenant.tracking_plan_file)) if tenant.tracking_plan_file else None
        found = _tenant_plans[id(tenant)] = (tenant, plan)
    return found[1]


def use_plan(tenant: Any, plan: TrackingPlan) -> None:
    """The plan this tenant runs (set when its config is parsed)."""
    _tenant_plans[id(tenant)] = (tenant, plan)


def keys_of_class(tenant: Any, *classes: str) -> tuple[str, ...]:
    """The plan's property names of these data classes (empty without a plan)."""
    plan = plan_for(tenant)
    if plan is None:
        return ()
    return tuple(sorted({k for c in classes for k in plan.keys_of_class.get(c, ())}))


_sensitive: dict[int, tuple[Any, tuple[str, ...]]] = {}


def sensitive_keys(tenant: Any) -> tuple[str, ...]:
    """Properties that pass only with ``sensitive_pi`` consent: the tenant's
    ``sensitive_properties`` and the plan's ``sensitive`` class."""
    found = _sensitive.get(id(tenant))
    if found is None or found[0] is not tenant:
        keys = tuple(dict.fromkeys((*tenant.sensitive_properties, *keys_of_class(tenant, "sensitive"))))
        found = _sensitive[id(tenant)] = (tenant, keys)
    return found[1]


def planned_purposes(tenant: Any, key: str | None) -> tuple[str, ...] | None:
    """The purposes the tenant's plan gives an event, or None (not in a plan)."""
    if key is None:
        return None
    plan = plan_for(tenant)
    entry = plan.find(key) if plan is not None else None
    return tuple(entry.spec.purposes) if entry is not None else None


class PlanReport(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """What the ingest response says about one message that broke the plan (like ``rejected``):
    ``action`` is ``delivered`` (flag: with ``context.idgate.violations``), ``omitted`` (the
    bad properties removed, then delivered; a violation record keeps them), ``kept`` (block:
    a violation record, replayable, instead of a delivery) or ``rejected`` (block with
    nowhere to keep it)."""

    index: int
    event: str
    action: Literal["delivered", "omitted", "kept", "rejected"]
    violations: list[Violation]
    message_id: str | None = None


# -- launch checks -----------------------------------------------------------------------------
@dataclass
class SampleReport:
    """What a plan says about a sample of events (``idgate plan check``)."""

    plan: TrackingPlan
    checked: int = 0
    valid: int = 0
    unreadable: int = 0
    # plan event (or "unplanned") -> "rule path" (or the unplanned name) -> events
    violations: dict[str, dict[str, int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def add(self, raw: Any) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("type", "track"), str):
            self.unreadable += 1
            return
        key = lookup_key(str(raw.get("type", "track")), raw.get("event"), raw.get("name"))
        if key is None:
            return
        self.checked += 1
        props = raw.get("properties")
        entry, found = self.plan.check(key, props if isinstance(props, dict) else None)
        label = entry.id if entry is not None else (UNPLANNED if found else "ignored")
        self.seen[label] = self.seen.get(label, 0) + 1
        if not found:
            self.valid += 1
            return
        bucket = self.violations.setdefault(label, {})
        for v in found:
            what = key if v.rule == UNPLANNED else f"{v.rule} {v.path}"
            bucket[what] = bucket.get(what, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "plan": self.plan.name,
            "version": self.plan.version,
            "checked": self.checked,
            "valid": self.valid,
            "unreadable": self.unreadable,
            "seen": self.seen,
            "violations": self.violations,
            "neverSeen": sorted(set(self.plan.events) - set(self.seen)),
        }

    def lines(self) -> list[str]:
        bad = self.checked - self.valid
        unreadable = f", {self.unreadable} line{'s' if self.unreadable != 1 else ''} unreadable"
        out = [
            f"plan {self.plan.name} v{self.plan.version}: {self.checked} events checked: "
            f"{self.valid} valid, {bad} with violations{unreadable if self.unreadable else ''}"
        ]
        for label in sorted(self.violations):
            out.append(f"  {label} ({self.seen.get(label, 0)} seen):")
            for what, n in sorted(self.violations[label].items()):
                out.append(f"    {n:>6}  {'not in the plan: ' + what if label == UNPLANNED else what}")
        never = sorted(set(self.plan.events) - set(self.seen))
        if never:
            out.append(f"  planned, never seen in the sample: {', '.join(never)}")
        return out
