"""Property-based, in process on a real SQLite violation store, under the seed plan: an event
that fits its plan entry passes the ``check_plan`` stage unchanged; one that breaks it is, in
``block`` (``plan_mode = "enforce"``), removed from the batch and kept as exactly one
violation record; in ``omit``, forwarded with exactly its bad properties removed and those
recorded, or, when removing cannot fix it (a required property), kept like in ``block``."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from export.violations import SqliteViolations
from gateway.config import Limits, ResolvedSource, Source, Tenant
from gateway.pipeline import IngestBatch, IngestResult, check_plan, pseudonymise_identifiers
from gateway.plan import load_plan
from gateway.segment import decode_batch
from identity.pseudonym import Pseudonymiser

SEED = Path(__file__).resolve().parents[2] / "plans" / "ecommerce.yaml"
TENANT = Tenant(id="prop", tracking_plan_file=str(SEED), plan_mode="enforce")
SOURCE = ResolvedSource(tenant=TENANT, source=Source(id="prop-web", platform="web"), destinations=())
OMITTING = ResolvedSource(
    tenant=TENANT, source=Source(id="prop-omit", platform="web", plan_validation="omit"), destinations=()
)
KEY = Pseudonymiser(b"plan-property-key" * 2, 1)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2000),
    st.floats(-10, 1e6, allow_nan=False),
    st.text(alphabet="abc01.", max_size=6),
)
maybe = st.one_of(st.just(msgspec.UNSET), scalars)


def number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fits(props: dict[str, Any]) -> bool:
    """The seed plan's product_added rules, written out as the oracle."""
    product_id, price, quantity = props.get("product_id"), props.get("price"), props.get("quantity")
    return (
        isinstance(product_id, str)
        and len(product_id) >= 1
        and number(price)
        and price >= 0
        and number(quantity)
        and float(quantity).is_integer()
        and 1 <= quantity <= 999
        and not bad_optional(props)
    )


def bad_optional(props: dict[str, Any]) -> set[str]:
    """product_added's optional properties that break their rule."""
    bad = {k for k in ("sku", "name") if k in props and not isinstance(props[k], str)}
    currency = props.get("currency", "CNY")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isascii() and currency.isupper()):
        bad.add("currency")
    return bad


def run_check(src: ResolvedSource, props: dict[str, Any], tmp_path: Path) -> tuple[Any, bytes, list[Any]]:
    """check_plan over one Product Added event: (the batch after it, the event before, records)."""
    message_id = f"prop-{uuid.uuid4()}"
    body = msgspec.json.encode(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "Product Added",
                    "anonymousId": "anon-prop",
                    "messageId": message_id,
                    "properties": props,
                }
            ]
        }
    )
    envs, _, _ = decode_batch(body, limits=Limits(), received_at=datetime.now(UTC))
    for env in envs:
        pseudonymise_identifiers(env, TENANT, KEY)
    before = msgspec.json.encode(envs[0].event)
    store = SqliteViolations(tmp_path / f"{uuid.uuid4().hex}.sqlite3")
    try:
        services: Any = SimpleNamespace(encoder=msgspec.json.Encoder(), violations=store, plan_monitor=None)
        batch = IngestBatch(src, list(envs), [IngestResult(1)], KEY)
        asyncio.run(check_plan(services, batch))
        return batch, before, store.list("prop")
    finally:
        store.close()


optional = st.one_of(st.just(msgspec.UNSET), scalars, st.sampled_from(["CNY", "USD", "cny", "EURO"]))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    product_id=maybe,
    price=maybe,
    quantity=maybe,
    sku=optional,
    name=optional,
    currency=optional,
)
def test_omit_forwards_with_exactly_the_bad_properties_removed(
    tmp_path: Path, product_id: Any, price: Any, quantity: Any, sku: Any, name: Any, currency: Any
) -> None:
    sent = {"product_id": product_id, "price": price, "quantity": quantity, "sku": sku, "name": name}
    sent["currency"] = currency
    props = {k: v for k, v in sent.items() if v is not msgspec.UNSET}
    if any(isinstance(v, float) and not math.isfinite(v) for v in props.values()):
        return
    batch, before, kept = run_check(OMITTING, props, tmp_path)
    if fits(props):
        assert len(batch.envelopes) == 1 and not kept and not batch.results[0].plan_violations
        assert msgspec.json.encode(batch.envelopes[0].event) == before
        return
    required_ok = fits({k: v for k, v in props.items() if k not in ("sku", "name", "currency")})
    (record,) = kept
    if not required_ok:  # removing cannot fix a required property: blocked
        assert batch.envelopes == [] and record.action == "kept"
        assert batch.results[0].plan_violations[0].action == "kept"
        return
    bad = bad_optional(props)
    (env,) = batch.envelopes
    assert env.event.properties == {k: v for k, v in props.items() if k not in bad}
    assert record.action == "omitted"
    assert {f.path.removeprefix("properties.") for f in record.findings} == bad
    assert msgspec.json.decode(record.payload)["properties"] == props  # the record keeps them
    assert batch.results[0].plan_violations[0].action == "omitted"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(product_id=maybe, price=maybe, quantity=maybe)
def test_valid_events_pass_unchanged_and_violating_ones_are_kept(
    tmp_path: Path, product_id: Any, price: Any, quantity: Any
) -> None:
    props = {
        k: v
        for k, v in {"product_id": product_id, "price": price, "quantity": quantity}.items()
        if v is not msgspec.UNSET
    }
    if any(isinstance(v, float) and not math.isfinite(v) for v in props.values()):
        return
    batch, before, kept = run_check(SOURCE, props, tmp_path)
    if fits(props):
        assert len(batch.envelopes) == 1 and not kept and not batch.results[0].plan_violations
        assert msgspec.json.encode(batch.envelopes[0].event) == before  # unchanged
    else:
        assert batch.envelopes == []
        assert [r.message_id for r in kept] == [batch.results[0].plan_violations[0].message_id]
        assert kept[0].findings and all(f.path.startswith("properties") for f in kept[0].findings)
        assert kept[0].action == "kept"
        assert batch.results[0].plan_violations[0].action == "kept"


def test_a_closed_event_refuses_unplanned_properties_but_not_sdk_presets() -> None:
    from gateway.plan import parse_plan

    plan = parse_plan(
        "plan: closed\nversion: 1\nevents:\n  a:\n    description: d\n    owner: o\n"
        "    purposes: [analytics]\n    legal_basis: consent\n    additional_properties: false\n"
        "    properties:\n      x: {class: none, type: integer}\n"
    )
    assert plan.check("a", {"x": 1, "$lib": "MiniProgram", "$device_id": "d"})[1] == []
    (found,) = plan.check("a", {"x": 1, "$lib": "MiniProgram", "colour": "red"})[1]
    assert (found.rule, found.path) == ("additionalProperties", "properties.colour")


# -- every event of the seed plan --------------------------------------------------------
# Events drawn from the plan's own schemas (a small generator for the keywords the seed plan
# uses; another keyword fails the test, so the generator grows with the plan), sent under
# one of the event's Segment names, with extra properties the open events allow.
SEED_PLAN = load_plan(SEED)
PLAN_EVENTS = sorted(SEED_PLAN.events.values(), key=lambda e: e.id)
KNOWN_KEYWORDS = {"type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum"}
KNOWN_KEYWORDS |= {"items", "maxItems", "properties", "required"}


def fits_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under one property's JSON Schema."""
    unknown = set(schema) - KNOWN_KEYWORDS
    assert not unknown, f"teach fits_schema {unknown}"
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(
            alphabet="abcXYZ-_ 01", min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 12)
        )
    if kind == "integer":
        return st.integers(schema.get("minimum", -(10**6)), schema.get("maximum", 10**6))
    if kind == "number":
        low, high = schema.get("minimum", -1e6), schema.get("maximum", 1e6)
        return st.one_of(st.integers(int(low), int(high)), st.floats(low, high, allow_nan=False))
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(
            fits_schema(schema.get("items", {"type": "string"})), max_size=min(schema.get("maxItems", 3), 3)
        )
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: fits_schema(v) for k, v in props.items() if k in required},
            optional={k: fits_schema(v) for k, v in props.items() if k not in required},
        )
    raise AssertionError(f"teach fits_schema the type {kind!r}")


# what breaks a property: a value of another JSON type, or out of any range
any_value = st.one_of(
    scalars,
    st.floats(-1e9, 1e9, allow_nan=False),
    st.text(alphabet="abcXYZ-_ 01", max_size=8),
    st.lists(scalars, max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), scalars, max_size=2),
)


@st.composite
def planned_events(draw: st.DrawFn) -> tuple[Any, str, dict[str, Any]]:
    """(plan event, a Segment name of it, properties valid under it)."""
    event = draw(st.sampled_from(PLAN_EVENTS))
    name = draw(st.sampled_from(event.spec.segment))
    schema = event.schema
    props = draw(fits_schema({k: v for k, v in schema.items() if k not in ("additionalProperties",)}))
    if schema["additionalProperties"] is True:  # open: a client's own properties too
        props.update(
            draw(st.dictionaries(st.sampled_from(["colour", "ab_test", "$lib"]), scalars, max_size=2))
        )
    assert jsonschema.Draft202012Validator(schema).is_valid(props), (event.id, props)  # the generator
    return event, name, props


def segment_message(name: str, props: dict[str, Any]) -> dict[str, Any]:
    """The Segment call the name stands for (gateway.plan.lookup_key's inverse)."""
    if name in ("page", "screen"):
        return {"type": name, "properties": props}
    kind, _, page = name.partition(":")
    if page and kind in ("page", "screen"):
        return {"type": kind, "name": page, "properties": props}
    return {"type": "track", "event": name, "properties": props}


def run_message(
    src: ResolvedSource, message: dict[str, Any], tmp_path: Path
) -> tuple[Any, Any, bytes, list[Any]]:
    """check_plan over one message: (the batch after it, the event before it as a copy, its
    bytes, the records kept)."""
    message = {**message, "anonymousId": "anon-prop", "messageId": f"prop-{uuid.uuid4()}"}
    envs, _, _ = decode_batch(
        msgspec.json.encode({"batch": [message]}), limits=Limits(), received_at=datetime.now(UTC)
    )
    (env,) = envs
    pseudonymise_identifiers(env, TENANT, KEY)
    before = msgspec.json.encode(env.event)
    event_before = msgspec.json.decode(before)
    store = SqliteViolations(tmp_path / f"{uuid.uuid4().hex}.sqlite3")
    try:
        services: Any = SimpleNamespace(encoder=msgspec.json.Encoder(), violations=store, plan_monitor=None)
        batch = IngestBatch(src, [env], [IngestResult(1)], KEY)
        asyncio.run(check_plan(services, batch))
        return batch, event_before, before, store.list("prop")
    finally:
        store.close()


def top_names(record: Any) -> set[str]:
    """The top-level properties a record's findings name."""
    return {f.path.removeprefix("properties.").split(".")[0] for f in record.findings}


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(drawn=planned_events())
def test_any_event_valid_under_the_seed_plan_passes_block_unchanged(tmp_path: Path, drawn: Any) -> None:
    event, name, props = drawn
    batch, before, encoded, kept = run_message(SOURCE, segment_message(name, props), tmp_path)
    assert not kept and not batch.results[0].plan_violations, [r.findings for r in kept]
    (env,) = batch.envelopes
    assert msgspec.json.encode(env.event) == encoded  # unchanged
    assert env.plan_event == event.id
    assert before["properties"] == props  # nothing in it was personal data


@st.composite
def violating_events(draw: st.DrawFn) -> tuple[Any, dict[str, Any], str, str | None]:
    """(plan event, the message, how it was broken, the property broken or None)."""
    event, name, props = draw(planned_events())
    schema = event.schema
    how = draw(
        st.sampled_from(["required", "value", "unplanned"] if schema["required"] else ["value", "unplanned"])
    )
    if how == "unplanned":
        return event, {"type": "track", "event": f"Unplanned {name}", "properties": props}, how, None
    if how == "required":
        key = draw(st.sampled_from(schema["required"]))
        props.pop(key, None)
        return event, segment_message(name, props), how, key
    key = draw(st.sampled_from(sorted(schema["properties"])))
    value = draw(any_value)
    assume(not jsonschema.Draft202012Validator(schema["properties"][key]).is_valid(value))
    props[key] = value
    return event, segment_message(name, props), how, key


@PROPERTY_SETTINGS
@given(drawn=violating_events(), omitting=st.booleans())
def test_any_event_breaking_the_seed_plan_is_kept_or_trimmed_of_exactly_its_bad_property(
    tmp_path: Path, drawn: Any, omitting: bool
) -> None:
    """``block``: refused and kept as one violation record naming what broke. ``omit``: the
    broken property removed and the event forwarded, recorded as omitted; kept like in
    ``block`` when removing cannot fix it (a required property) or the event is unplanned
    (plan_unplanned is ``block`` under ``enforce``)."""
    event, message, how, key = drawn
    batch, before, _, kept = run_message(OMITTING if omitting else SOURCE, message, tmp_path)
    (record,) = kept
    [report] = batch.results[0].plan_violations
    assert report.message_id == record.message_id
    if how == "unplanned":
        assert [(f.rule, f.path) for f in record.findings] == [("unplanned", "event")]
    else:
        assert top_names(record) == {key}, record.findings
        assert record.event == event.id
    trimmed = omitting and how == "value" and key not in event.spec.required
    if not trimmed:
        assert batch.envelopes == [] and record.action == "kept" and report.action == "kept"
        return
    (env,) = batch.envelopes
    assert env.event.properties == {k: v for k, v in before["properties"].items() if k != key}
    assert record.action == "omitted" and report.action == "omitted"
    assert msgspec.json.decode(record.payload)["properties"] == before["properties"]  # the record keeps it
