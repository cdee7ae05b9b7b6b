"""``idgate alerts test RULE``: a test notification to every channel of an alert rule, so
on-call can check a robot or mailbox before the night it matters."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from export.alerts import Notice, Notifier, missing_secrets
from gateway.cli_support import settings_and_config, tenant_of


@click.group()
def alerts() -> None:
    """Alert rules over the business KPIs."""


@alerts.command("test")
@click.argument("rule")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Tenant config TOML."
)
def alerts_test(rule: str, tenant: str, config_path: Path | None) -> None:
    """Send a test notification of RULE to each of its channels; exit 1 if one failed."""
    _, cfg = settings_and_config(config_path)
    found = tenant_of(cfg, tenant)
    alert = next((a for a in found.alerts if a.id == rule), None)
    if alert is None:
        click.echo(f"idgate: tenant {tenant!r} has no alert rule {rule!r}", err=True)
        sys.exit(2)
    channels = [c for c in cfg.alert_channels if c.id in alert.channels]
    problems = missing_secrets(channels, os.environ)
    if problems:
        click.echo("idgate: " + "; ".join(problems), err=True)
        sys.exit(2)
    notifier = Notifier(channels)
    notice = Notice(tenant, alert, "test", None, None, 0, 0)

    async def send_all() -> list[bool]:
        return list(await asyncio.gather(*(notifier.send(c.id, notice) for c in channels)))

    results = asyncio.run(send_all()) if channels else []
    for channel, ok in zip(channels, results, strict=True):
        click.echo(f"{channel.id} ({channel.kind}): {'sent' if ok else 'FAILED'}")
    if not channels:
        click.echo(f"{rule}: no channels")
    sys.exit(0 if all(results) else 1)
