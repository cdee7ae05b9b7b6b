"""Tracking plans from other tools, converted to idgate's YAML plan (``idgate plan import``).

Both tools keep, per event, a JSON Schema of the whole call whose ``properties.properties``
describes the event's properties (types, required, enums, ranges, ``additionalProperties``);
they differ in the envelope:

- **Segment Protocols**: the Public API's rules (``{"data": {"rules": [...]}}`` or a bare
  list, each ``{"type": "TRACK"|"PAGE"|"SCREEN"|..., "key": name, "version", "jsonSchema"}``;
  the highest version of a key wins) or the older Config API export
  (``{"display_name", "rules": {"events": [{"name", "description", "rules", "version"}]}}``).
- **RudderStack**: the Data Catalog API's tracking plan (``{"name", "description", "events":
  [{"name", "eventType", "description", "rules"}]}``) or the legacy Tracking Plan API's
  (``{"name", "rules": {"events": [...]}}``, Segment's shape).

What idgate does not check (identify, group, common/global rules, alias) is left out and
reported. Each event gets its name as a Segment name (``page:<name>`` for a named page
rule); each property a data class guessed from its key (``contact`` for phone and email
keys, ``identifier`` for identifier keys such as ``*openid*`` or ``member_id``, else
``none``); keywords idgate refuses on identifier/contact properties (``pattern``,
``format``, ``enum``, ``const``: they would be matched against a pseudonym) are dropped and
reported. The result is checked by ``gateway.plan.parse_plan`` before it is written: review
the owners, purposes and classes, then raise ``version`` with every change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import yaml

from gateway.plan import parse_plan
from identity.identifiers import is_identifier_key

ImportFormat = Literal["segment-protocols", "rudderstack"]
FORMATS: Final = ("segment-protocols", "rudderstack")
_CONTACT_KEY: Final = re.compile(r"phone|mobile|e_?mail", re.IGNORECASE)
_VALUE_KEYWORDS: Final = ("pattern", "format", "enum", "const")
# JSON Schema keywords that only belong at a document's root.
_ROOT_ONLY: Final = ("$schema", "$id", "labels")


class ImportProblem(Exception):
    """The file is not a tracking plan of the format named."""


@dataclass
class ImportedPlan:
    plan: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return yaml.safe_dump(self.plan, sort_keys=False, allow_unicode=True, width=100)


@dataclass(frozen=True)
class _Rule:
    kind: str  # track, page, screen (others are skipped)
    name: str
    description: str
    schema: Mapping[str, Any]


def _event_id(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or "event"
    if base[0].isdigit():
        base = f"event_{base}"
    found, n = base, 2
    while found in taken:
        found, n = f"{base}_{n}", n + 1
    taken.add(found)
    return found


def data_class(key: str) -> str:
    if _CONTACT_KEY.search(key):
        return "contact"
    return "identifier" if is_identifier_key(key) else "none"


def _properties_schema(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event properties' part of a whole-call schema."""
    outer = schema.get("properties")
    inner = outer.get("properties") if isinstance(outer, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


def _skipped(kind: str, name: Any) -> str:
    named = f" ({name})" if name else ""
    return f"skipped a rule of type {kind}{named}: idgate checks track, page and screen calls"


def _segment_rules(raw: Any) -> tuple[str, str, list[_Rule], list[str]]:
    notes: list[str] = []
    if isinstance(raw, Mapping) and isinstance(raw.get("data"), Mapping):
        raw = raw["data"]
    if isinstance(raw, Mapping) and isinstance(raw.get("rules"), list):
        name = str(raw.get("name") or raw.get("displayName") or "segment")
        listed: Any = raw["rules"]
    elif isinstance(raw, list):
        name, listed = "segment", raw
    elif isinstance(raw, Mapping) and isinstance(raw.get("rules"), Mapping):
        return _legacy_rules(raw, "segment")
    else:
        raise ImportProblem(
            'expected the Public API rules ({"data": {"rules": [...]}}) or a Config API export'
        )
    newest: dict[tuple[str, str], tuple[float, _Rule]] = {}
    for item in listed:
        if not isinstance(item, Mapping) or not isinstance(
            item.get("jsonSchema", item.get("json_schema")), Mapping
        ):
            raise ImportProblem("each rule needs a type, a key and a jsonSchema")
        kind = str(item.get("type", "")).lower()
        key = item.get("key")
        if kind not in ("track", "page", "screen") or (kind == "track" and not key):
            notes.append(_skipped(kind or "untyped", key))
            continue
        schema = item.get("jsonSchema", item.get("json_schema"))
        rule = _Rule(kind, str(key or ""), str(schema.get("description", "")), schema)
        version = float(item.get("version", 1) or 1)
        held = newest.get((kind, rule.name))
        if held is None or version > held[0]:
            newest[(kind, rule.name)] = (version, rule)
    return name, "", [rule for _, rule in newest.values()], notes


def _legacy_rules(raw: Mapping[str, Any], default_name: str) -> tuple[str, str, list[_Rule], list[str]]:
    """``{"name"/"display_name", "rules": {"events": [{"name", "description", "rules"}], ...}}``."""
    rules = raw["rules"]
    notes = [
        f"skipped the {k} rules: idgate checks track, page and screen calls" for k in rules if k != "events"
    ]
    events = rules.get("events", [])
    if not isinstance(events, list):
        raise ImportProblem("rules.events must be a list")
    found = []
    for item in events:
        if (
            not isinstance(item, Mapping)
            or not item.get("name")
            or not isinstance(item.get("rules"), Mapping)
        ):
            raise ImportProblem("each of rules.events needs a name and rules (a JSON Schema)")
        found.append(_Rule("track", str(item["name"]), str(item.get("description", "")), item["rules"]))
    name = str(raw.get("display_name") or raw.get("name") or default_name)
    return name, str(raw.get("description", "")), found, notes


def _rudderstack_rules(raw: Any) -> tuple[str, str, list[_Rule], list[str]]:
    if isinstance(raw, Mapping) and isinstance(raw.get("data"), Mapping):
        raw = raw["data"]
    if isinstance(raw, Mapping) and isinstance(raw.get("rules"), Mapping):
        return _legacy_rules(raw, "rudderstack")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("events"), list):
        raise ImportProblem('expected a Data Catalog tracking plan ({"name", "events": [...]})')
    notes: list[str] = []
    found = []
    for item in raw["events"]:
        if not isinstance(item, Mapping) or not isinstance(item.get("rules", {}), Mapping):
            raise ImportProblem("each event needs an eventType, a name and rules (a JSON Schema)")
        kind = str(item.get("eventType", "track")).lower()
        name = str(item.get("name") or "")
        if kind not in ("track", "page", "screen") or (kind == "track" and not name):
            notes.append(_skipped(kind, name))
            continue
        found.append(_Rule(kind, name, str(item.get("description", "")), item.get("rules") or {}))
    return str(raw.get("name") or "rudderstack"), str(raw.get("description", "")), found, notes


def _property(key: str, fragment: Any, where: str, notes: list[str]) -> dict[str, Any]:
    schema = {
        k: v for k, v in (fragment if isinstance(fragment, Mapping) else {}).items() if k not in _ROOT_ONLY
    }
    kind = data_class(key)
    if kind in ("identifier", "contact"):
        dropped = [k for k in _VALUE_KEYWORDS if k in schema]
        for k in dropped:
            del schema[k]
        if dropped:
            why = f"class {kind}: checked after pseudonymisation"
            notes.append(f"{where}.{key}: {why}: dropped {', '.join(dropped)}")
    return {"class": kind, **schema}


def convert(
    raw: Any,
    source: ImportFormat,
    *,
    name: str | None = None,
    owner: str = "imported",
    purposes: Iterable[str] = ("analytics",),
    legal_basis: str = "consent",
) -> ImportedPlan:
    """The idgate plan for an export; ImportProblem when it is not one, PlanProblems (from
    ``parse_plan``) when the result is not a valid plan."""
    plan_name, description, rules, notes = (
        _segment_rules if source == "segment-protocols" else _rudderstack_rules
    )(raw)
    taken: set[str] = set()
    events: dict[str, Any] = {}
    for rule in sorted(rules, key=lambda r: (r.kind != "track", r.name)):
        segment_name = (
            rule.name if rule.kind == "track" else (f"{rule.kind}:{rule.name}" if rule.name else rule.kind)
        )
        event_id = _event_id(rule.name or rule.kind, taken)
        props_schema = _properties_schema(rule.schema)
        fragments = props_schema.get("properties", {})
        properties = {
            str(k): _property(str(k), v, f"events.{event_id}.properties", notes)
            for k, v in (fragments.items() if isinstance(fragments, Mapping) else ())
        }
        required = [str(r) for r in props_schema.get("required", []) if isinstance(r, str)]
        for r in required:
            properties.setdefault(r, {"class": data_class(r)})
        event: dict[str, Any] = {
            "description": rule.description or f"Imported from {source}: {segment_name}",
            "owner": owner,
            "purposes": list(purposes),
            "legal_basis": legal_basis,
            "segment": [segment_name],
        }
        if required:
            event["required"] = required
        if props_schema.get("additionalProperties") is False:
            event["additional_properties"] = False
        if properties:
            event["properties"] = properties
        events[event_id] = event
    if not events:
        raise ImportProblem("no track, page or screen rule to import")
    plan: dict[str, Any] = {
        "plan": _event_id(name or plan_name, set()),
        "version": 1,
        "description": description or f"Imported from {source}",
        "events": events,
    }
    imported = ImportedPlan(plan, notes)
    parse_plan(imported.yaml(), path=f"<imported {source} plan>")
    return imported
