"""The seed e-commerce plan (plans/ecommerce.yaml) holds what issue 14 lists, each event
named for both SDK families, and the reference document's table of it says what the file
says (every plan event with every Segment and Sensors name)."""

from __future__ import annotations

import re

from gateway.plan import load_plan
from tests.conftest import ROOT

SEED = load_plan(ROOT / "plans" / "ecommerce.yaml")
DOC = (ROOT / "docs" / "tracking-plan.md").read_text()

# The issue's seed list, as plan event ids.
PAGE_VIEWS = ["home_viewed", "category_viewed", "product_viewed", "cart_viewed", "pay_success_viewed"]
CLICKS = [
    "banner_clicked",
    "recommended_product_clicked",
    "activity_entry_clicked",
    "product_added",
    "buy_now_clicked",
    "carousel_switched",
    "customer_service_clicked",
    "checkout_started",
    "cart_quantity_changed",
    "product_removed",
]
EXPOSURES = ["first_screen_products_exposed", "activity_exposed"]
TRANSACTIONS = ["payment_requested", "payment_succeeded", "payment_failed", "order_completed"]


def test_the_seed_plan_holds_the_issues_events_named_for_both_sdk_families() -> None:
    for event_id in PAGE_VIEWS + CLICKS + EXPOSURES + TRANSACTIONS:
        event = SEED.events[event_id]
        spec = event.spec
        assert spec.description and spec.owner and spec.purposes and spec.legal_basis, event_id
        assert spec.segment and spec.sensors, f"{event_id}: a Segment and a Sensors name"
        assert all(SEED.find(name) is event for name in [*spec.segment, *spec.sensors]), event_id
    for event_id in PAGE_VIEWS:
        assert "dwell_time" in SEED.events[event_id].spec.properties, event_id
    for event_id in TRANSACTIONS:
        assert {"order_id", "total", "currency", "products"} <= set(SEED.events[event_id].spec.properties)
    for event_id in EXPOSURES:
        assert SEED.events[event_id].spec.exposure is not None, event_id


def names_after(table: str, event_id: str) -> str | None:
    """What the table says in parentheses after the event's id (names may hold parentheses
    inside their backticks)."""
    start = table.find(f"`{event_id}` (")
    if start < 0:
        return None
    i = start + len(event_id) + 4
    in_code = False
    for j in range(i, len(table)):
        if table[j] == "`":
            in_code = not in_code
        elif table[j] == ")" and not in_code:
            return table[i:j]
    return None


def test_the_reference_documents_table_names_every_seed_event_as_the_file_does() -> None:
    table = DOC.split("## The seed e-commerce plan", 1)[1].split("\n\n", 2)[1]
    for event_id, event in SEED.events.items():
        names = names_after(table, event_id)
        assert names is not None, f"{event_id} is not in the document's seed table"
        segment, _, sensors = names.partition(" / ")
        assert re.findall(r"`([^`]+)`", segment) == list(event.spec.segment), (event_id, names)
        assert re.findall(r"`([^`]+)`", sensors) == list(event.spec.sensors), (event_id, names)
