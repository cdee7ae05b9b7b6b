"""``idgate alerts test RULE``: a test notification to every channel of an alert rule, so
on-call can check a robot or mailbox before the night it matters; ``idgate alerts history``:
what fired and resolved, and where it was notified."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec

from export.alert_history import ChannelDelivery
from export.alerts import Notice, Notifier, missing_secrets
from gateway.cli_support import fail, settings_and_config, tenant_of
from gateway.monitoring import open_alert_history


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

    async def send_all() -> list[ChannelDelivery]:
        return list(await asyncio.gather(*(notifier.send(c.id, notice) for c in channels)))

    results = asyncio.run(send_all()) if channels else []
    for d in results:
        outcome = "sent" if d.delivered else f"FAILED after {d.attempts} attempts ({d.error})"
        click.echo(f"{d.channel} ({d.kind}): {outcome}")
    if not channels:
        click.echo(f"{rule}: no channels")
    sys.exit(0 if all(d.delivered for d in results) else 1)


@alerts.command("history")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--rule", default=None, help="Only this alert rule.")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Newest records."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Tenant config TOML."
)
def alerts_history(
    tenant: str, rule: str | None, limit: int, as_json: bool, config_path: Path | None
) -> None:
    """List the firings and resolutions of a tenant's alert rules, newest first, with the
    channels each was notified on and those that failed after their retries. Reads the
    deployment's store: Redis with REDIS_URL, else alerts.sqlite3 in the data directory."""
    settings, cfg = settings_and_config(config_path)
    found = tenant_of(cfg, tenant)
    if rule is not None and rule not in {a.id for a in found.alerts}:
        fail(f"tenant {tenant!r} has no alert rule {rule!r}")
    history = open_alert_history(settings)
    try:
        records = history.list(tenant, rule=rule, limit=limit)
    finally:
        history.close()
    for r in records:
        if as_json:
            click.echo(msgspec.json.encode(r))
            continue
        when = datetime.fromtimestamp(r.at, UTC).isoformat(timespec="seconds")
        where = " ".join(
            f"{d.channel}:{'ok' if d.delivered else f'FAILED({d.error}, {d.attempts} attempts)'}"
            for d in r.deliveries
        )
        notified = where if r.notified else "not notified (cooldown)"
        click.echo(
            f"{when}  {r.rule}  {r.status.upper()}  {r.kpi}={_number(r.value)} "
            f"({r.compare}: {_number(r.compared)}, {r.volume} events)  {notified or 'no channels'}"
        )
    if not records and not as_json:
        click.echo("no alerts recorded")


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
