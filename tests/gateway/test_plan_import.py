"""``idgate plan import``: a Segment Protocols tracking plan (Public API rules export) and a
RudderStack tracking plan (Data Catalog API) become idgate plans that load, and validate
events as the source tool would have."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gateway.config import DEFAULT_PURPOSES
from gateway.plan import load_plan
from tests.conftest import IDGATE, ROOT

FIXTURES = Path(__file__).parent / "plan_imports"


def run_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IDGATE, "plan", "import", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def imported(tmp_path: Path, source: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path / f"{source}.yaml"
    done = run_import("--from", source, str(FIXTURES / f"{source}.json"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done


def rules(found: list) -> list[tuple[str, str]]:
    return sorted((v.rule, v.path) for v in found)


def test_a_segment_protocols_export(tmp_path: Path) -> None:
    path, done = imported(tmp_path, "segment-protocols")
    plan = load_plan(path, purposes=DEFAULT_PURPOSES)
    assert sorted(plan.events) == ["home", "order_completed", "product_added"]
    order = plan.events["order_completed"]
    # the newest version of a rule wins; its description, required list and closed properties
    assert order.spec.description == "An order was paid."
    assert order.spec.required == ["order_id", "total", "currency"]
    assert order.spec.additional_properties is False
    assert order.classes["buyer_phone"] == "contact"
    assert plan.events["product_added"].classes["wx_openid"] == "identifier"
    ok = {
        "order_id": "o-1",
        "total": 25.5,
        "currency": "CNY",
        "products": [{"product_id": "p", "quantity": 2}],
    }
    assert plan.check("Order Completed", ok)[1] == []
    bad = {"order_id": "o-1", "total": -1, "currency": "EUR", "products": [{"quantity": 0}], "gift": True}
    assert rules(plan.check("Order Completed", bad)[1]) == [
        ("additionalProperties", "properties.gift"),
        ("enum", "properties.currency"),
        ("minimum", "properties.products.0.quantity"),
        ("minimum", "properties.total"),
        ("required", "properties.products.0.product_id"),
    ]
    assert plan.check("page:Home", {"dwell_time": -1})[0] is plan.events["home"]
    # what was left out or changed is said
    assert "skipped a rule of type common" in done.stderr and "skipped a rule of type identify" in done.stderr
    assert "buyer_phone: class contact: checked after pseudonymisation: dropped pattern" in done.stderr


def test_a_rudderstack_tracking_plan(tmp_path: Path) -> None:
    path, done = imported(tmp_path, "rudderstack")
    plan = load_plan(path, purposes=DEFAULT_PURPOSES)
    assert plan.name == "mini_program_shop"
    assert sorted(plan.events) == ["coupon_claimed", "product_viewed"]
    viewed = plan.events["product_viewed"]
    assert viewed.spec.segment == ["Product Viewed"] and viewed.spec.additional_properties is False
    assert rules(plan.check("Product Viewed", {"price": "12"})[1]) == [
        ("required", "properties.product_id"),
        ("type", "properties.price"),
    ]
    coupon = plan.events["coupon_claimed"]
    assert (
        coupon.classes["member_id"] == "identifier"
        and "format" not in coupon.schema["properties"]["member_id"]
    )
    assert rules(
        plan.check("Coupon Claimed", {"coupon_id": "c", "activity_id": "a", "channel": "sms"})[1]
    ) == [("enum", "properties.channel")]
    assert "skipped a rule of type identify" in done.stderr


def test_the_output_passes_config_check(tmp_path: Path) -> None:
    path, _ = imported(tmp_path, "segment-protocols")
    config = tmp_path / "idgate.toml"
    example = (ROOT / "idgate.example.toml").read_text()
    config.write_text(
        example.replace('tracking_plan_file = "plans/ecommerce.yaml"', f'tracking_plan_file = "{path}"')
    )
    assert str(path) in config.read_text()
    done = subprocess.run(
        [IDGATE, "config", "check", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("source", "content", "message"),
    [
        ("segment-protocols", "{", "not JSON"),
        ("segment-protocols", json.dumps({"events": []}), "not a segment-protocols tracking plan"),
        ("rudderstack", json.dumps({"data": {"rules": []}}), "not a rudderstack tracking plan"),
        ("rudderstack", json.dumps({"name": "x", "events": []}), "no track, page or screen rule"),
    ],
)
def test_what_is_not_a_plan_is_refused_in_one_line(
    tmp_path: Path, source: str, content: str, message: str
) -> None:
    export = tmp_path / "export.json"
    export.write_text(content)
    done = run_import("--from", source, str(export))
    assert done.returncode == 2 and message in done.stderr and done.stdout == "", done.stderr
