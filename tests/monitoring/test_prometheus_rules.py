"""deploy/prometheus/idgate-rules.yml only uses series the gateway exports, with their labels."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml
from litestar.testing import TestClient

from gateway.app import create_app
from tests.conftest import ROOT, WEB_KEY, mid
from tests.gateway.conftest import in_process_settings
from tests.waiting import wait_until

RULES = ROOT / "deploy" / "prometheus" / "idgate-rules.yml"


def test_the_rules_use_exported_series_and_labels(tmp_path: Path) -> None:
    settings = dataclasses.replace(in_process_settings(tmp_path), alert_interval_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        event = {"type": "track", "anonymousId": "rules-a1", "event": "Order Completed", "messageId": mid()}
        assert client.post("/v1/track", json=event, auth=(WEB_KEY, "")).status_code == 200
        samples = ("idgate_kpi_coverage{", "idgate_delivery_lag_seconds{")  # once the event is delivered
        exposition = wait_until(
            lambda: t if all(s in (t := client.get("/metrics").text) for s in samples) else None,
            what="KPI and delivery lag samples in /metrics",
        )
    exported: dict[str, set[str]] = {}
    for name in re.findall(r"^# TYPE (idgate_[a-z_]+) ", exposition, flags=re.MULTILINE):
        exported.setdefault(name, set())
    for name, labels in re.findall(r"^(idgate_[a-z_]+)\{([^}]*)\}", exposition, flags=re.MULTILINE):
        exported.setdefault(name, set()).update(re.findall(r"(\w+)=", labels))
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"IdgatePaymentSuccessRateDrop", "IdgateBuiltInAlertFiring"}
    for rule in rules:
        for name, selector in re.findall(r"(idgate_[a-z_]+)(?:\{([^}]*)\})?", rule["expr"]):
            family = name.removesuffix("_total")
            assert name in exported or family in exported, (rule["alert"], name)
            known = exported.get(name, set()) | exported.get(family, set())
            for label in re.findall(r"(\w+)\s*=", selector):
                assert label in known, (rule["alert"], name, label)
            for label in re.findall(r"by \(([^)]*)\)", rule["expr"]):
                for each in label.split(","):
                    assert each.strip() in known | {"tenant", "source", "rule", "kpi"}, (rule["alert"], each)
