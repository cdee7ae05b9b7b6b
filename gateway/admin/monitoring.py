"""Operator API over the business KPIs: current values per window, with consent coverage."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery

from export.kpis import KpiReport
from gateway.admin.deps import ADMIN_DEPENDENCIES, READ_ERRORS, AdminServices
from gateway.auth import Officer, admin_guard, roles
from gateway.errors import InvalidRequest
from gateway.monitoring import AlertStatus, Monitoring


class KpiValues(msgspec.Struct, rename="camel"):
    """Every KPI of a tenant over sliding windows ending now (totals, per platform, per
    source), each with its consent coverage (counted / matched events); and the alert rules."""

    tenant: str
    bucket_seconds: float
    kpis: list[KpiReport]
    alerts: list[AlertStatus]
    replica: str  # the replica that answered
    evaluator: str | None  # the replica evaluating the alert rules (holding the lease)


def _monitoring(request: Request[Any, Any, Any]) -> Monitoring:
    monitoring: Monitoring = request.app.state.monitoring
    return monitoring


class MonitoringController(Controller):
    path = "/admin"
    tags = ["monitoring"]
    guards = [admin_guard]
    dependencies = {**ADMIN_DEPENDENCIES, "monitoring": Provide(_monitoring, sync_to_thread=False)}
    security = [{"AdminToken": []}]

    @get(
        "/kpis",
        responses=READ_ERRORS,
        summary="Business KPIs per sliding window, with consent coverage, and alert states",
        opt=roles("operator"),
    )
    async def kpis(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        monitoring: NamedDependency[Monitoring],
        tenant: FromQuery[str],
        kpi: FromQuery[str | None] = None,
    ) -> KpiValues:
        """Operator role. ``kpi`` narrows the answer to one KPI."""
        services.tokens.check_tenant(officer, tenant)
        reports = await monitoring.engine.report(tenant)
        if kpi is not None:
            reports = [r for r in reports if r.id == kpi]
            if not reports:
                raise InvalidRequest("invalid_field", f"unknown KPI {kpi!r}", "kpi")
        return KpiValues(
            tenant=tenant,
            bucket_seconds=monitoring.engine.bucket_seconds,
            kpis=reports,
            alerts=await monitoring.alert_states(tenant),
            replica=monitoring.replica,
            evaluator=await monitoring.alerts.lease.holder(),
        )
