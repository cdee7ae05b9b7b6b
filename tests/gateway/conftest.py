"""In-process gateways for the tests under tests/gateway: ``gateway.app.create_app`` on the
tests' TOML config and a data directory of their own, with none of the developer's
``IDGATE_*`` environment (no ``idgate serve`` process, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import TEST_CONFIG

# What a gateway process takes from its environment; the tests' own values replace it all.
ENVIRONMENT = ("REDIS_URL", "DATABASE_URL")


def in_process_settings(tmp: Path, config: str = TEST_CONFIG) -> Settings:
    """Dev settings for an embedded gateway (SQLite, file sinks) under ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / "idgate.toml"
    config_path.write_text(config)
    with pytest.MonkeyPatch.context() as env:
        for name in [*ENVIRONMENT, *(n for n in os.environ if n.startswith("IDGATE_"))]:
            env.delenv(name, raising=False)
        env.setenv("IDGATE_ENV", "dev")
        return Settings.from_env(config_path=config_path, data_dir=tmp / "var")


def in_process_app(tmp: Path, config: str = TEST_CONFIG) -> Litestar:
    """The gateway's ASGI app; its lifespan starts with the first client that enters it."""
    return create_app(in_process_settings(tmp, config))
