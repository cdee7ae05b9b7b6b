"""``idgate serve`` as a newcomer starts it: what the banner shows (dev) and hides
(production), one gateway per data directory, a busy port found before any start-up work,
and logs that read well on a console in dev and are JSON elsewhere."""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from pathlib import Path

import httpx
import pytest

from consent.signing import new_ledger_key_b64
from gateway.cli import tune_runtime
from gateway.config import hash_write_key, load_config
from gateway.settings import Settings
from identity.pseudonym import new_key_document
from tests.cli.conftest import EXAMPLE_CONFIG, ServeFactory, clean_env


def test_dev_banner_shows_every_demo_secret_the_readme_uses(tmp_path: Path, serve: ServeFactory) -> None:
    gw = serve(tmp_path / "var").wait_ready()
    banner = gw.stdout()
    config = load_config(EXAMPLE_CONFIG, dev=True)
    lines = banner.splitlines()

    def line_with(*parts: str) -> str:
        found = [line for line in lines if all(p in line for p in parts)]
        assert found, f"no banner line with {parts}:\n{banner}"
        return found[0]

    for tenant in config.tenants:
        for source in tenant.sources:
            line_with(f"{tenant.id}/{source.id}", source.platform, source.dev_write_key)
            if source.sensors_project:
                line_with(
                    f"{tenant.id}/{source.id}",
                    f"project {source.sensors_project}",
                    f"token {source.sensors_dev_token}",
                )
    assert config.admin_tokens
    for admin in config.admin_tokens:
        line_with(admin.name, admin.role, admin.dev_token)
    line_with(f"{gw.url}/docs")
    line_with(str(tmp_path / "var" / "sinks"))
    # the URLs the banner prints answer
    assert httpx.get(f"{gw.url}/docs/openapi.json", timeout=5).status_code == 200


PRODUCTION_CONFIG = """
[[admin_tokens]]
name = "dpo"
role = "compliance"
token_sha256 = "{admin}"

[[tenants]]
id = "acme"

[[tenants.sources]]
id = "acme-web"
platform = "web"
write_key_sha256 = "{write}"
sensors_project = "acme"
sensors_token_sha256 = "{sensors}"

[[tenants.destinations]]
id = "warehouse"
purposes = ["analytics"]
"""


def production_env(tmp_path: Path) -> tuple[dict[str, str], Path, list[str]]:
    """Production settings, a config holding only hashes, and every secret involved."""
    hashes = {k: hash_write_key(f"{k}-secret-value") for k in ("admin", "write", "sensors")}
    config = tmp_path / "idgate.toml"
    config.write_text(PRODUCTION_CONFIG.format(**hashes))
    keys, ledger_key = new_key_document(["acme"]), new_ledger_key_b64()
    env = clean_env(IDGATE_ENV="production", IDGATE_KEYS=keys, IDGATE_LEDGER_KEY=ledger_key)
    key_material = [v for t in json.loads(keys)["tenants"].values() for v in t["keys"].values()]
    return env, config, [*hashes.values(), ledger_key, *key_material]


def test_production_banner_and_logs_hold_no_secret(tmp_path: Path, serve: ServeFactory) -> None:
    env, config, secrets = production_env(tmp_path)
    gw = serve(tmp_path / "var", env=env, config=config).wait_ready()
    banner = gw.stdout()
    assert banner.startswith(f"idgate production on {gw.url}")
    assert f"{gw.url}/docs" in banner
    assert "key" not in banner.lower() and "token" not in banner.lower()
    gw.stop()
    output = banner + gw.stderr()
    assert not [s for s in secrets if s in output]
    # production logs: one JSON object per line, no Alembic chatter at INFO
    records = [json.loads(line) for line in gw.stderr().splitlines()]
    assert any(r["event"] == "gateway.started" for r in records)
    assert not [r for r in records if r.get("logger", "").startswith(("alembic", "sqlalchemy"))]


def test_dev_logs_are_console_lines_without_alembic_info(tmp_path: Path, serve: ServeFactory) -> None:
    gw = serve(tmp_path / "var").wait_ready()  # a fresh data dir: every migration runs
    gw.stop()
    log = gw.stderr()
    assert "gateway.started" in log
    assert not [line for line in log.splitlines() if line.lstrip().startswith("{")], log
    assert "alembic" not in log and "Running upgrade" not in log, log
    # IDGATE_LOG_FORMAT still chooses
    again = serve(tmp_path / "var2", env=clean_env(IDGATE_ENV="dev", IDGATE_LOG_FORMAT="json")).wait_ready()
    again.stop()
    assert all(json.loads(line) for line in again.stderr().splitlines())


def test_a_second_gateway_on_one_data_directory_is_refused(tmp_path: Path, serve: ServeFactory) -> None:
    first = serve(tmp_path / "var").wait_ready()
    second = serve(tmp_path / "var")
    assert second.wait_exit() == 2
    (message,) = second.stderr().splitlines()
    assert "another idgate" in message and str(tmp_path / "var") in message
    assert f"pid {first.proc.pid}" in message
    assert second.stdout() == ""  # refused before the banner and any start-up work
    assert httpx.get(first.url + "/readyz", timeout=5).status_code == 200
    # the lock goes with the process, even after kill -9
    first.proc.kill()
    first.proc.wait()
    serve(tmp_path / "var").wait_ready()


def test_a_busy_port_is_refused_before_touching_the_data_directory(
    tmp_path: Path, serve: ServeFactory
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = serve(tmp_path / "var", port=port)
        assert gw.wait_exit() == 2
    (message,) = gw.stderr().splitlines()
    assert f"127.0.0.1:{port}" in message and "in use" in message
    assert not (tmp_path / "var").exists()


def test_serve_tunes_the_interpreter_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``IDGATE_GC_GEN0_THRESHOLD`` and ``IDGATE_GIL_SWITCH_US`` reach the interpreter (only
    the collector's young generation changes); 0 leaves CPython's own values."""
    saved_interval, saved_threshold = sys.getswitchinterval(), gc.get_threshold()
    for name in [k for k in os.environ if k.startswith("IDGATE_")] + ["REDIS_URL", "DATABASE_URL"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDGATE_ENV", "dev")

    def tuned(gc_threshold: str, switch_us: str) -> tuple[float, tuple[int, int, int]]:
        monkeypatch.setenv("IDGATE_GC_GEN0_THRESHOLD", gc_threshold)
        monkeypatch.setenv("IDGATE_GIL_SWITCH_US", switch_us)
        tune_runtime(Settings.from_env(config_path=EXAMPLE_CONFIG, data_dir=tmp_path))
        return sys.getswitchinterval(), gc.get_threshold()

    try:
        gc.set_threshold(700, 10, 10)
        sys.setswitchinterval(0.005)
        interval, threshold = tuned("12345", "300")
        assert threshold == (12345, 10, 10)
        assert interval == pytest.approx(0.0003)
        gc.set_threshold(700, 10, 10)
        sys.setswitchinterval(0.005)
        assert tuned("0", "0") == (pytest.approx(0.005), (700, 10, 10))
    finally:
        gc.set_threshold(*saved_threshold)
        sys.setswitchinterval(saved_interval)
    assert Settings.from_env(config_path=EXAMPLE_CONFIG, data_dir=tmp_path).gc_gen0_threshold == 0
    monkeypatch.delenv("IDGATE_GC_GEN0_THRESHOLD")
    assert Settings.from_env(config_path=EXAMPLE_CONFIG, data_dir=tmp_path).gc_gen0_threshold == 50_000
