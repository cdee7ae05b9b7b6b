"""What every `idgate` command that reads the deployment needs: its settings and tenant
config, or a one-line error and exit code 2 (never a traceback); and aligned text tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from gateway.config import Config, ConfigProblems, Tenant, load_config
from gateway.settings import Settings, SettingsError


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"idgate: {message}", err=True)
    sys.exit(code)


def settings_and_config(config_path: Path | None) -> tuple[Settings, Config]:
    """The settings from the environment (``--config`` wins) and the config they name."""
    try:
        settings = Settings.from_env(config_path=config_path)
        return settings, load_config(settings.config_path, dev=settings.dev)
    except (SettingsError, ConfigProblems) as exc:
        fail(str(exc))


def tenant_of(config: Config, tenant: str) -> Tenant:
    found = next((t for t in config.tenants if t.id == tenant), None)
    if found is None:
        fail(f"unknown tenant {tenant!r}")
    return found


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Lines of ``rows`` with every column but the last padded to its widest cell."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        indent + "  ".join([*(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    ]
