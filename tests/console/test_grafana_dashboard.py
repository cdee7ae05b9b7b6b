"""deploy/grafana/idgate.json queries only series the gateway's /metrics exports, with
labels those series carry (every ``expr`` of its panels and its template variables)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from gateway.app import create_app
from tests.conftest import MALL_WEB_KEY, ROOT, WEB_KEY, mid
from tests.gateway.conftest import in_process_settings
from tests.waiting import wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "idgate.json"
SERIES = re.compile(r"(idgate_[a-z_]+)(?:\{([^}]*)\})?")


def exported(exposition: str) -> dict[str, set[str]]:
    """Metric family (and sample) names in a /metrics text -> the labels their samples carry."""
    found: dict[str, set[str]] = {}
    for name in re.findall(r"^# TYPE (idgate_[a-z_]+) ", exposition, flags=re.MULTILINE):
        found.setdefault(name, set())
    for name, labels in re.findall(r"^(idgate_[a-z_]+)\{([^}]*)\}", exposition, flags=re.MULTILINE):
        found.setdefault(name, set()).update(re.findall(r"(\w+)=", labels))
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    out = []
    for panel in dashboard["panels"]:
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"${variable['name']}", variable["definition"]))
    return out


def test_every_series_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    settings = dataclasses.replace(in_process_settings(tmp_path), alert_interval_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        order = {"type": "track", "anonymousId": "graf-a1", "event": "Order Completed", "messageId": mid()}
        assert client.post("/v1/track", json=order, auth=(WEB_KEY, "")).status_code == 200
        # no consent on the mall: a drop by reason
        assert client.post("/v1/track", json={**order, "messageId": mid()}, auth=(MALL_WEB_KEY, "")).json()[
            "dropped"
        ]
        exposition = wait_until(
            lambda: t if "idgate_kpi_coverage{" in (t := client.get("/metrics").text) else "",
            what="KPI samples in /metrics",
        )
    series = exported(exposition)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = queries(dashboard)
    assert len(found) >= 20
    names = set()
    for where, expr in found:
        used = SERIES.findall(expr)
        assert used, (where, expr)
        for name, selector in used:
            family = name.removesuffix("_total")
            assert name in series or family in series, (where, name)
            names.add(family)
            known = series.get(name, set()) | series.get(family, set())
            if not known:  # a family without samples yet in this run: its name is enough
                continue
            for label in re.findall(r"(\w+)\s*=~?", selector):
                assert label in known, (where, name, label)
            for grouped in re.findall(r"by \(([^)]*)\)", expr):
                for label in grouped.split(","):
                    assert label.strip() in known, (where, name, label)
    assert {
        "idgate_kpi_value",
        "idgate_kpi_coverage",
        "idgate_alert_firing",
        "idgate_outbox_backlog",
        "idgate_events_dropped",
        "idgate_events_plan_violation",
    } <= names
    # the window variable offers the windows the gauges are labelled with
    window = next(v for v in dashboard["templating"]["list"] if v["name"] == "window")
    assert 'window="60m"' in exposition
    for value in window["query"].split(","):
        assert f'window="{value}"' in exposition, value
