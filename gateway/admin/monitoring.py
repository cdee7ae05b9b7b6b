"""Admin API over the business KPIs: current values per window, with consent coverage, and
the alert history."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, QueryParameter

from export.alert_history import AlertRecord
from export.kpis import KpiReport
from gateway.admin.deps import ADMIN_DEPENDENCIES, READ_ERRORS, AdminServices, log_access
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


class AlertHistoryPage(msgspec.Struct, rename="camel"):
    """Firings and resolutions of a tenant's alert rules, newest first: the values, whether
    it was notified (not within a cooldown), and per channel whether it arrived after its
    retries (the failure's exception class when not)."""

    tenant: str
    records: list[AlertRecord]


HistoryLimit = Annotated[int, QueryParameter(ge=1, le=1000, description="at most this many records")]


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
        # with the baselines the tenant's rules compare with (what a page was measured against)
        reports = await monitoring.engine.report(tenant, baselines=monitoring.alerts.baselines(tenant))
        if kpi is not None:
            reports = [r for r in reports if r.id == kpi]
            if not reports:
                raise InvalidRequest("invalid_field", f"unknown KPI {kpi!r}", "kpi")
        await log_access(
            services, officer, "monitoring.kpis", tenant, {"kpi": kpi} if kpi else {}, len(reports)
        )
        return KpiValues(
            tenant=tenant,
            bucket_seconds=monitoring.engine.bucket_seconds,
            kpis=reports,
            alerts=await monitoring.alert_states(tenant),
            replica=monitoring.replica,
            evaluator=await monitoring.alerts.lease.holder(),
        )

    @get(
        "/alerts/history",
        responses=READ_ERRORS,
        summary="Alert history: firings and resolutions, where they were notified, failures",
        opt=roles("operator", "compliance"),
    )
    async def alert_history(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        monitoring: NamedDependency[Monitoring],
        tenant: FromQuery[str],
        rule: FromQuery[str | None] = None,
        limit: HistoryLimit = 100,
    ) -> AlertHistoryPage:
        """Operator and compliance roles. ``rule`` narrows the answer to one alert rule."""
        services.tokens.check_tenant(officer, tenant)
        if rule is not None and rule not in {
            a.id for t in services.config.tenants if t.id == tenant for a in t.alerts
        }:
            raise InvalidRequest("invalid_field", f"unknown alert rule {rule!r}", "rule")
        history = monitoring.history
        records = (
            await asyncio.to_thread(history.list, tenant, rule=rule, limit=limit)
            if history is not None
            else []
        )
        params: dict[str, str | int] = {"limit": limit, **({"rule": rule} if rule else {})}
        await log_access(services, officer, "monitoring.alert_history", tenant, params, len(records))
        return AlertHistoryPage(tenant=tenant, records=records)
