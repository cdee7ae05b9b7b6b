"""Property-based: under the seed plan in ``enforce`` mode, an event that fits its plan entry
passes the ``check_plan`` stage unchanged; one that breaks it is removed from the batch and
kept as exactly one violation record (in process, on a real SQLite violation store)."""

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
KEY = Pseudonymiser(b"plan-property-key" * 2, 1)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2000),
    st.floats(-10, 1e6, allow_nan=False),
    st.text(alphabet="abc01.", max_size=6),
)
maybe = st.one_of(st.just(msgspec.UNSET), scalars)


def fits(props: dict[str, Any]) -> bool:
    """The seed plan's product_added rules, written out as the oracle."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    product_id, price, quantity = props.get("product_id"), props.get("price"), props.get("quantity")
    return (
        isinstance(product_id, str)
        and len(product_id) >= 1
        and number(price)
        and price >= 0
        and number(quantity)
        and float(quantity).is_integer()
        and 1 <= quantity <= 999
    )


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
        services: Any = SimpleNamespace(encoder=msgspec.json.Encoder(), violations=store)
        batch = IngestBatch(SOURCE, list(envs), IngestResult(1), KEY)
        asyncio.run(check_plan(services, batch))
        kept = store.list("prop")
        if fits(props):
            assert len(batch.envelopes) == 1 and not kept and not batch.result.plan_violations
            assert msgspec.json.encode(batch.envelopes[0].event) == before  # unchanged
        else:
            assert batch.envelopes == []
            assert [r.message_id for r in kept] == [message_id]
            assert kept[0].findings and all(f.path.startswith("properties") for f in kept[0].findings)
            assert batch.result.plan_violations[0].action == "kept"
    finally:
        store.close()


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
