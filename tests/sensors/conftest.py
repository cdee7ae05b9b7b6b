"""Helpers for the Sensors Data tests: request bodies as the SDKs build them, the mini-program
runner (the real npm SDK under Node), and reading persons back from the sink."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_SENSORS_TOKEN,
    SHOP_SENSORS_TOKEN,
    SHOP_SERVER_SENSORS_TOKEN,
    Gateway,
    missing,
    require_marker,
)
from tests.waiting import wait_until

MINIPROGRAM = Path(__file__).resolve().parent / "miniprogram"


def sensors_url(gw: Gateway, tenant: str = "shop", path: str = "/sa", *, server: bool = False) -> str:
    """Where a Sensors SDK of the tenant sends; ``server``: the shop's backend (the Python
    SDK runs there), whose source may assert identities."""
    if server:
        assert tenant == "shop", "only shop has a server Sensors source"
        token = SHOP_SERVER_SENSORS_TOKEN
    else:
        token = SHOP_SENSORS_TOKEN if tenant == "shop" else MALL_SENSORS_TOKEN
    return f"{gw.url}{path}?project={tenant}&token={token}"


def encode(events: Any, *, compress: bool = True) -> str:
    """base64 of (gzipped) JSON, as the SDKs put it in data= / data_list=."""
    raw = json.dumps(events).encode()
    return base64.b64encode(gzip.compress(raw) if compress else raw).decode()


def sensors_event(distinct_id: str, event: str = "ViewProduct", **fields: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "type": "track",
        "event": event,
        "distinct_id": distinct_id,
        "time": int(time.time() * 1000),
        "lib": {"$lib": "test", "$lib_version": "1.0"},
        "properties": {},
    }
    ev.update(fields)
    return ev


def sensors_events(gw: Gateway, destination: str = "warehouse") -> list[dict[str, Any]]:
    return [e for e in gw.sink_lines(destination) if "sensors" in e.get("context", {})]


def wait_for(
    gw: Gateway,
    predicate: Callable[[dict[str, Any]], bool],
    count: int,
    destination: str = "warehouse",
    timeout: float = 20,
) -> list[dict[str, Any]]:
    """The sink lines matching ``predicate`` once there are at least ``count`` of them; fails
    at the timeout."""

    if count < 1:
        raise ValueError("wait_for needs at least one line to wait for")

    def lines() -> list[dict[str, Any]]:
        found = [e for e in gw.sink_lines(destination) if predicate(e)]
        return found if len(found) >= count else []

    return wait_until(lines, timeout, f"{count} matching line(s) in the {destination!r} sink")


def current_persons(unified: list[str], lines: list[dict[str, Any]]) -> set[str]:
    """The persons downstream knows after applying the merge and split notices it received."""
    alias = {n["merged"]: n["survivor"] for n in lines if n["type"] == "identity.merged"}

    def follow(u: str) -> str:
        while u in alias:
            u = alias[u]
        return u

    return {follow(u) for u in unified}


def explain(gw: Gateway, tenant: str, a: tuple[str, str, str | None], b: tuple[str, str, str | None]) -> dict:
    """The identity graph's answer: are a and b one person, and its unified ID. Each side
    is (type, raw id, appid or None): a look-up of raw identifiers, the compliance role's."""
    params = {"tenant": tenant, "a_type": a[0], "a": a[1], "b_type": b[0], "b": b[1]}
    if a[2]:
        params["a_appid"] = a[2]
    if b[2]:
        params["b_appid"] = b[2]
    import httpx

    r = httpx.get(
        f"{gw.url}/admin/identity/explain",
        params=params,
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},  # raw look-ups: compliance
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def miniprogram() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Run tests/sensors/miniprogram/run.js (the npm SDK under Node) with a scenario.

    Installs the locked SDK with `npm ci` the first time, so a fresh checkout gets there.
    Without Node.js and npm the tests fail (marker ``node``; see tests/conftest.py)."""
    require_marker("node", "Node.js")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node", "Node.js and npm are needed for the mini-program SDK tests: not found on PATH")
    if not (MINIPROGRAM / "node_modules" / "sa-sdk-miniprogram").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=MINIPROGRAM,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"

    def run(scenario: dict[str, Any]) -> dict[str, Any]:
        done = subprocess.run(
            [node, "run.js", json.dumps(scenario)],
            cwd=MINIPROGRAM,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"mini-program run failed:\n{done.stdout}\n{done.stderr}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
