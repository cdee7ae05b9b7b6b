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

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.violations import SqliteViolations
from gateway.config import Limits, ResolvedSource, Source, Tenant
from gateway.pipeline import IngestBatch, IngestResult, check_plan, pseudonymise_identifiers
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
        batch = IngestBatch(src, list(envs), IngestResult(1), KEY)
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
        assert len(batch.envelopes) == 1 and not kept and not batch.result.plan_violations
        assert msgspec.json.encode(batch.envelopes[0].event) == before
        return
    required_ok = fits({k: v for k, v in props.items() if k not in ("sku", "name", "currency")})
    (record,) = kept
    if not required_ok:  # removing cannot fix a required property: blocked
        assert batch.envelopes == [] and record.action == "kept"
        assert batch.result.plan_violations[0].action == "kept"
        return
    bad = bad_optional(props)
    (env,) = batch.envelopes
    assert env.event.properties == {k: v for k, v in props.items() if k not in bad}
    assert record.action == "omitted"
    assert {f.path.removeprefix("properties.") for f in record.findings} == bad
    assert msgspec.json.decode(record.payload)["properties"] == props  # the record keeps them
    assert batch.result.plan_violations[0].action == "omitted"


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
        assert len(batch.envelopes) == 1 and not kept and not batch.result.plan_violations
        assert msgspec.json.encode(batch.envelopes[0].event) == before  # unchanged
    else:
        assert batch.envelopes == []
        assert [r.message_id for r in kept] == [batch.result.plan_violations[0].message_id]
        assert kept[0].findings and all(f.path.startswith("properties") for f in kept[0].findings)
        assert kept[0].action == "kept"
        assert batch.result.plan_violations[0].action == "kept"


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
