"""KPI definitions in the config: the defaults are valid, bad ones are named by check_config."""

from __future__ import annotations

import pytest

from export.kpis import DEFAULT_KPIS, check_kpis
from gateway.config import DEFAULT_PURPOSES, ConfigProblems, parse_config
from tests.conftest import TEST_CONFIG


def test_the_default_kpis_are_valid() -> None:
    assert check_kpis(DEFAULT_KPIS, DEFAULT_PURPOSES, "kpis") == []


def test_bad_kpis_are_named_with_their_place() -> None:
    bad = TEST_CONFIG.replace(
        '[[tenants.destinations]]\nid = "warehouse"',
        """[[tenants.kpis]]
id = "refunds"
events = ["Order Refunded"]
purpose = "gossip"

[[tenants.kpis]]
id = "refund_rate"
kind = "ratio"
numerator = "refunds"
denominator = "nope"

[[tenants.kpis]]
id = "revenue"
kind = "sum"
events = ["Order Completed"]

[[tenants.destinations]]
id = "warehouse\"""",
        1,
    )
    with pytest.raises(ConfigProblems) as err:
        parse_config(bad, dev=True)
    problems = err.value.problems
    assert "tenants[0].kpis[0].purpose: unknown purpose 'gossip'" in problems
    assert "tenants[0].kpis[1].denominator: unknown KPI 'nope'" in problems
    assert "tenants[0].kpis[2].fields: a sum needs the properties holding the amount" in problems


def test_a_tenant_kpi_replaces_the_default_of_its_id() -> None:
    text = TEST_CONFIG.replace(
        '[[tenants.destinations]]\nid = "warehouse"',
        """[[tenants.kpis]]
id = "orders"
events = ["Order Paid"]
purpose = "necessary_service"

[[tenants.destinations]]
id = "warehouse\"""",
        1,
    )
    shop = parse_config(text, dev=True).tenants[0]
    orders = [k for k in shop.all_kpis() if k.id == "orders"]
    assert [k.events for k in orders] == [["Order Paid"]]
    assert len(shop.all_kpis()) == len(DEFAULT_KPIS)
