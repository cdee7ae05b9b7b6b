"""GET /admin/kpis in process: the operator's, with errors naming the field."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from tests.conftest import COMPLIANCE_TOKEN, OPERATOR_TOKEN
from tests.gateway.conftest import in_process_app


def test_operator_only_and_bad_parameters_are_named(tmp_path: Path) -> None:
    with TestClient(in_process_app(tmp_path)) as client:
        ops = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        r = client.get("/admin/kpis", params={"tenant": "mall"}, headers=ops)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["bucketSeconds"] == 60 and body["alerts"] == [] and body["evaluator"] == body["replica"]
        orders = next(k for k in body["kpis"] if k["id"] == "orders")
        assert orders["purpose"] == "necessary_service"
        assert [w["minutes"] for w in orders["windows"]] == [1, 5, 10, 60]
        assert orders["windows"][0]["total"] == {
            "value": 0,
            "matched": 0,
            "counted": 0,
            "coverage": None,
            "previous": 0,
            # kept only for KPIs a rule compares with a day or a week earlier
            "dayAgo": None,
            "weekAgo": None,
            "top": None,  # a top KPI's largest values
            # distinct-person KPIs: counted events keyed by a device alone
            "byDevice": None,
            # buckets -> value just before the window, for KPIs a rule compares with a baseline
            "baselines": None,
        }
        r = client.get(
            "/admin/kpis", params={"tenant": "mall"}, headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
        )
        assert r.status_code == 403
        assert client.get("/admin/kpis", params={"tenant": "mall"}).status_code == 401
        r = client.get("/admin/kpis", params={"tenant": "nope"}, headers=ops)
        assert r.status_code == 400 and r.json()["field"] == "tenant"
        r = client.get("/admin/kpis", params={"tenant": "mall", "kpi": "nope"}, headers=ops)
        assert r.status_code == 400 and r.json()["field"] == "kpi"
