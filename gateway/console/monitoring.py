"""The console's monitoring page: a tenant's business KPIs per sliding window with their
consent coverage, the core funnel, top SKUs, new vs returning persons and the alert history,
read from the same ``Monitoring`` (``app.state.monitoring``) as ``GET /admin/kpis``; how much
of each distinct-person KPI was counted by linked person rather than by device alone; and the
identity and pipeline health (gateway.health: the figures ``/metrics`` exports).

Charts are inline SVG built here on the server (no script, no CDN). KPIs hold aggregates
only, so the page shows no identifier; SKU names are client strings and go through the
templates' autoescape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Template

from export.alert_history import AlertRecord
from export.kpis import WINDOWS, KpiDefinition, KpiReport, WindowValue
from gateway.admin.deps import AdminServices, log_access
from gateway.auth import Officer
from gateway.console.access import CONSOLE_PATH, console_guard, page
from gateway.console.pages import DEPENDENCIES, EVERYONE, chosen_tenant, visible_tenants
from gateway.health import health_report
from gateway.monitoring import Monitoring

# The core funnel, home -> product detail -> cart -> payment success: persons per step
# (the seed's distinct-person KPIs); a tenant without one of them sees the step as missing.
FUNNEL: tuple[tuple[str, str], ...] = (
    ("funnel_home", "uv_home"),
    ("funnel_product", "uv_product"),
    ("funnel_cart", "cart_persons"),
    ("funnel_paid", "paying_persons"),
)
TOP_SKUS = "top_skus"
HISTORY_SHOWN = 50
Window = Literal[1, 5, 10, 60]
assert set(WINDOWS) == {1, 5, 10, 60}


@dataclass(frozen=True)
class Bar:
    """One bar of a server-side SVG chart: its label, the value shown and its length (0-1)."""

    label: str
    shown: str
    share: float


@dataclass(frozen=True)
class KpiRow:
    id: str
    kind: str
    purpose: str
    description: str
    values: list[str]  # per window, shortest first
    coverage: list[float | None]
    spark: list[float]  # per window, oldest-reaching first, scaled to 0-1: the rate per minute
    # a distinct-person KPI: the share of its counted events keyed by a device or account
    # alone (no identity_linking consent), per window; None elsewhere or nothing counted
    by_device: list[float | None]


@dataclass(frozen=True)
class FunnelStep:
    label: str
    kpi: str
    persons: float | None
    conversion: float | None  # from the step before
    share: float  # of the first step


def shown(unit: str, value: float | None) -> str:
    """A KPI value as the page shows it: shares in percent, amounts with two decimals."""
    if value is None:
        return "—"
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "amount":
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def units(definitions: Sequence[KpiDefinition]) -> dict[str, str]:
    """KPI id -> how its value reads: an amount (a sum, a top KPI's sales, a ratio of an
    amount such as the average order value), a share (a ratio of counts) or a count."""
    kinds = {k.id: k.kind for k in definitions}
    out = {}
    for k in definitions:
        if k.kind in ("sum", "top") or (k.kind == "ratio" and kinds.get(k.numerator) == "sum"):
            out[k.id] = "amount"
        elif k.kind == "ratio":
            out[k.id] = "share"
        else:
            out[k.id] = "count"
    return out


def _scaled(values: Sequence[float]) -> list[float]:
    top = max(values, default=0.0)
    return [v / top if top > 0 else 0.0 for v in values]


def kpi_rows(reports: Sequence[KpiReport], unit: dict[str, str]) -> list[KpiRow]:
    rows = []
    for r in reports:
        windows = r.windows
        # the sparkline: the rate per minute over the longest window down to the last minute
        # (a ratio is its value); a rising line is a busier recent minute
        rates = [
            (w.total.value or 0.0) / (1.0 if r.kind == "ratio" else max(w.minutes, 1e-9))
            for w in reversed(windows)
        ]
        rows.append(
            KpiRow(
                id=r.id,
                kind=r.kind,
                purpose=r.purpose,
                description=r.description,
                values=[shown(unit.get(r.id, "count"), w.total.value) for w in windows],
                coverage=[w.total.coverage for w in windows],
                spark=_scaled(rates) if r.kind != "top" else [],
                by_device=[_device_share(w.total) for w in windows],
            )
        )
    return rows


def _device_share(value: WindowValue) -> float | None:
    if value.by_device is None or not value.counted:
        return None
    return value.by_device / value.counted


def uv_basis(reports: Sequence[KpiReport], index: int) -> float | None:
    """Over the chosen window, the share of the distinct-person KPIs' counted events keyed
    by a device or account alone (None: none counted)."""
    counted = by_device = 0
    for r in reports:
        total = r.windows[index].total if len(r.windows) > index else None
        if total is not None and total.by_device is not None:
            counted += total.counted
            by_device += total.by_device
    return by_device / counted if counted else None


def _total(reports: dict[str, KpiReport], kpi: str, index: int) -> WindowValue | None:
    report = reports.get(kpi)
    return report.windows[index].total if report is not None and len(report.windows) > index else None


def funnel(reports: dict[str, KpiReport], index: int) -> list[FunnelStep]:
    steps: list[FunnelStep] = []
    first: float | None = None
    before: float | None = None
    for label, kpi in FUNNEL:
        total = _total(reports, kpi, index)
        persons = total.value if total is not None else None
        if first is None and persons is not None:
            first = persons
        conversion = persons / before if persons is not None and before else None
        share = persons / first if persons is not None and first else 0.0
        steps.append(FunnelStep(label, kpi, persons, conversion if steps else None, min(share, 1.0)))
        before = persons
    return steps


def top_bars(reports: dict[str, KpiReport], index: int) -> list[Bar]:
    total = _total(reports, TOP_SKUS, index)
    top = (total.top or []) if total is not None else []
    scaled = _scaled([t.amount for t in top])
    return [Bar(t.name, shown("amount", t.amount), s) for t, s in zip(top, scaled, strict=True)]


def persons_split(reports: dict[str, KpiReport], index: int) -> list[Bar]:
    values = {
        k: (v.value if (v := _total(reports, k, index)) else None)
        for k in ("new_persons", "returning_persons")
    }
    if all(v is None for v in values.values()):
        return []
    whole = sum(v or 0.0 for v in values.values())
    return [Bar(k, shown("count", v), (v or 0.0) / whole if whole else 0.0) for k, v in values.items()]


def history_rows(records: Sequence[AlertRecord], unit: dict[str, str]) -> list[dict[str, Any]]:
    """Alert firings and resolutions, newest first, their values shown like the KPI's."""
    return [
        {
            "record": r,
            "at": datetime.fromtimestamp(r.at, UTC),
            "value": shown(unit.get(r.kpi, "amount"), r.value),
            "compared": shown(unit.get(r.kpi, "amount"), r.compared),
            "failures": [d for d in r.deliveries if not d.delivered],
        }
        for r in records
    ]


def _monitoring(request: Request[Any, Any, Any]) -> Monitoring:
    monitoring: Monitoring = request.app.state.monitoring
    return monitoring


class MonitoringPagesController(Controller):
    path = CONSOLE_PATH
    guards = [console_guard]
    dependencies = DEPENDENCIES
    include_in_schema = False

    @get("/monitoring", opt=EVERYONE)
    async def monitoring(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        window: FromQuery[Window] = 60,
    ) -> Template:
        """Aggregates only (no personal data): every role. ``window`` (1, 5, 10, 60 buckets,
        a minute each by default) is the one the funnel, top SKUs and persons are over."""
        chosen = chosen_tenant(services, officer, tenant)
        monitoring = _monitoring(request)
        reports = await monitoring.engine.report(chosen)
        by_id = {r.id: r for r in reports}
        index = WINDOWS.index(window)
        history = monitoring.history
        records = (
            await asyncio.to_thread(history.list, chosen, limit=HISTORY_SHOWN) if history is not None else []
        )
        config = next(t for t in services.config.tenants if t.id == chosen)
        unit = units(config.all_kpis())
        rows = kpi_rows(reports, unit)
        destinations = [d.id for d in config.destinations]
        workers = request.app.state.gateway.delivery.workers
        health = health_report(chosen, monitoring.health, destinations, workers)
        await log_access(services, officer, "console.monitoring", chosen, {"window": window}, len(reports))
        return page(
            request,
            "monitoring.html",
            tenants=visible_tenants(services, officer),
            tenant=chosen,
            window=window,
            windows=WINDOWS,
            minutes=[w.minutes for w in reports[0].windows] if reports else [],
            rows=rows,
            undercounted=[r for r in rows if any(c is not None and c < 1 for c in r.coverage)],
            funnel=funnel(by_id, index),
            top=top_bars(by_id, index),
            persons=persons_split(by_id, index),
            alerts=await monitoring.alert_states(chosen),
            history=history_rows(records, unit),
            by_device=uv_basis(reports, index),
            health=health,
            sizes=[
                Bar(label, f"{n:,}", share)
                for (label, n), share in zip(
                    health.person_sizes, _scaled([n for _, n in health.person_sizes]), strict=True
                )
                if n
            ],
            distributed=monitoring.distributed,
            replica=monitoring.replica,
        )
