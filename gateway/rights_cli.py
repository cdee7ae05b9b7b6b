"""``idgate rights``: data-subject rights requests from the command line (read-only).

``idgate rights list`` reads the ``rights_request`` records of the consent ledger (the
gateway's database: ``DATABASE_URL``, else the embedded SQLite under the data directory) and
shows each request with its due date and clock, counted with the config's ``[rights]``
calendar. It needs no signing key and changes nothing.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec

from gateway.cli_support import settings_and_config


@click.group()
def rights() -> None:
    """Data-subject rights requests (PIPL Art. 44-50)."""


@rights.command("list")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--status", type=click.Choice(["open", "refused", "completed"]), default=None)
@click.option(
    "--clock",
    type=click.Choice(["on_time", "nearly_due", "overdue", "paused", "closed"]),
    default=None,
    help="Only requests in this state of their clock.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Config TOML ([rights])."
)
def rights_list(
    tenant: str | None, status: str | None, clock: str | None, as_json: bool, config_path: Path | None
) -> None:
    """Rights requests with their due dates; overdue ones first. Exits 1 when any is overdue
    (a request whose clock is paused is not)."""
    import sqlalchemy as sa

    from consent.ledger import Ledger
    from consent.rights import fold_requests
    from gateway.rights_setup import rights_clock
    from identity.db import make_engine

    settings, cfg = settings_and_config(config_path)
    ledger = Ledger(make_engine(settings.consent_database_url), None)
    records = []
    after = 0
    try:
        while True:
            page = ledger.records(tenant=tenant, record_type="rights_request", after_seq=after, limit=5000)
            records.extend(page)
            if len(page) < 5000:
                break
            after = page[-1].seq
    except sa.exc.DBAPIError as exc:
        click.echo(f"idgate: cannot read the consent ledger: {exc.orig or exc}", err=True)
        sys.exit(2)
    found = fold_requests(records, rights_clock(cfg.rights), datetime.now(UTC))
    if status:
        found = [r for r in found if r.status == status]
    if clock:
        found = [r for r in found if r.clock == clock]
    order = {"overdue": 0, "nearly_due": 1, "on_time": 2, "paused": 3, "closed": 4}
    found.sort(key=lambda r: (order.get(r.clock, 9), r.due_at))
    if as_json:
        for r in found:
            click.echo(msgspec.json.encode(r).decode())
    else:
        click.echo(f"{'request':<40} {'tenant':<10} {'kind':<12} {'status':<9} {'due (UTC)':<16} clock")
        for r in found:
            left = "" if r.working_days_left is None else f" ({r.working_days_left} working days left)"
            if r.paused_at is not None and r.status == "open":  # stopped: the days left do not count down
                left += f" since {r.paused_at.strftime('%Y-%m-%d %H:%M')} UTC, {r.pause_reason}"
            click.echo(
                f"{r.request_id:<40} {r.tenant:<10} {r.kind:<12} {r.status:<9} "
                f"{r.due_at.strftime('%Y-%m-%d %H:%M'):<16} {r.clock}{left}"
            )
        overdue = sum(1 for r in found if r.clock == "overdue")
        nearly = sum(1 for r in found if r.clock == "nearly_due")
        paused = sum(1 for r in found if r.clock == "paused")
        click.echo(
            f"{len(found)} request(s): {overdue} overdue, {nearly} nearly due, {paused} paused", err=True
        )
    if any(r.clock == "overdue" for r in found):
        sys.exit(1)


@rights.command("verify-bundle")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    help="Trusted ledger public key (base64; `idgate keys ledger-public-key`); repeatable. "
    "Without it, the key the bundle names is used and printed.",
)
def rights_verify_bundle(path: Path, public_keys: tuple[str, ...]) -> None:
    """Check an access bundle's signature offline (no database, no gateway). Exits 1 when it fails."""
    import json

    from consent.rights_bundle import verify_bundle

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        click.echo(f"idgate: cannot read {path}: {exc}", err=True)
        sys.exit(2)
    ok = verify_bundle(document, set(public_keys) if public_keys else None)
    signature = document.get("signature", {}) if isinstance(document, dict) else {}
    key = signature.get("keyId") if isinstance(signature, dict) else None
    if not ok:
        click.echo(
            f"FAILED: {path} is not a bundle signed by {'a trusted key' if public_keys else 'its key'}"
        )
        sys.exit(1)
    bundle = document["bundle"]
    click.echo(
        f"OK: {path}: request {bundle.get('requestId')} ({bundle.get('kind')}), signed by key {key}; "
        f"{len(bundle.get('identifiers', []))} identifier(s), {len(bundle.get('consentHistory', []))} "
        f"ledger record(s), {len(bundle.get('deliveries', []))} deliveries, "
        f"{len(bundle.get('heldEvents', []))} held event(s)"
    )
