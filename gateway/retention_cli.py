"""``idgate retention run`` and ``idgate breach``: retention on demand and the breach query
(PIPL Art. 19, 57) from the command line.

Both work beside a running gateway, on the deployment's stores (like ``idgate dlq``): the
outbox and dead letters under ``$IDGATE_DATA_DIR`` or on the shared Redis, the consent
store and the identity change log (``DATABASE_URL``, else the embedded SQLite files).
``retention run --apply`` needs the ledger signing key: each tenant's run is a
``retention_run`` ledger record. Aliases it expires leave the log at once; a gateway running
beside it keeps them in memory until its own retention job next runs (docs/configuration.md).

Like a gateway at start, both create or upgrade the consent and identity schemas they read
(``idgate migrate``; safe beside running gateways), so they also work on a PostgreSQL
database no gateway has used yet. A dry run changes no data, but may create those tables.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
import msgspec

from gateway.cli_support import fail, settings_and_config, tenant_of
from gateway.config import Config
from gateway.retention_setup import RUN_STEPS, RetentionStores, limited_tenants, run_retention
from gateway.settings import Settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from consent.retention import RetentionRun
    from identity.service import IdentityService

_CONFIG = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Tenant config TOML."
)


def _consent_engine(settings: Settings) -> sa.Engine:
    """The consent store, its schema created or upgraded as a gateway does at start."""
    from consent.db import migrate_consent
    from identity.db import make_engine

    embedded = settings.data_dir / "consent.sqlite3"
    if settings.database_url is None and not embedded.exists():
        fail(f"no consent store at {embedded} (set IDGATE_DATA_DIR or DATABASE_URL)")
    engine = make_engine(settings.consent_database_url)
    migrate_consent(engine)
    return engine


def _identity(settings: Settings, config: Config) -> tuple[IdentityService, sa.Engine] | None:
    """The identity change log, when a tenant with a graph expires its aliases (None: no
    tenant does, or the embedded log was never made). Not started: an applied expiry
    catches up with the log under its lock, then rewrites it (identity.resolver). The log's
    tables are created or upgraded first, as a gateway does at start: on a PostgreSQL database
    no gateway has used yet, the run finds an empty log rather than no table."""
    from gateway.identity_setup import identity_database_url, identity_rules
    from identity.db import make_engine
    from identity.resolver import GraphResolver
    from identity.service import IdentityService
    from identity.store import IdentityLogStore, migrate_identity

    tenants = [t for t in config.tenants if t.identity.enabled and t.retention.aliases_days]
    embedded = settings.data_dir / "identity.sqlite3"
    if not tenants or (settings.database_url is None and not embedded.exists()):
        return None
    engine = make_engine(identity_database_url(settings))
    migrate_identity(engine)
    resolver = GraphResolver(IdentityLogStore(engine), {t.id: identity_rules(t) for t in tenants})

    async def no_notices(tenant: str, notices: object) -> None:  # an expiry sends none
        return None

    return IdentityService(resolver, no_notices), engine


@asynccontextmanager
async def _stores(settings: Settings, config: Config, *, signing: bool) -> AsyncIterator[RetentionStores]:
    from consent.access_log import AccessLog
    from consent.cli import load_cli_signer
    from consent.ledger import Ledger
    from consent.proofs import DeliveryProofs
    from consent.signing import InvalidLedgerKey
    from gateway.delivery_setup import open_dead_letters, open_outbox, open_violations, redis_options

    if settings.outbox_kind == "sqlite" and not settings.outbox_path.exists():
        fail(f"no outbox at {settings.outbox_path} (set IDGATE_DATA_DIR)")
    signer = None
    if signing:
        try:
            signer = load_cli_signer(settings.ledger_key_file)[0]
        except InvalidLedgerKey as exc:
            fail(str(exc))
    engine = _consent_engine(settings)
    redis_client = None
    if settings.redis_url:
        from identity.redis_client import open_async_redis

        redis_client = open_async_redis(settings.redis_url, **redis_options())
    outbox = open_outbox(settings, config.limits.dedupe_window_seconds, redis_client)
    dead_letters = open_dead_letters(settings)
    proofs = DeliveryProofs(engine)
    # the tracking plan's (gateway.app): shared in Redis, else this data dir's file if any
    has_store = settings.redis_url or (settings.data_dir / "violations.sqlite3").exists()
    violations = open_violations(settings) if has_store else None
    identity = _identity(settings, config)
    try:
        if settings.outbox_kind == "redis":
            # the backlog counters of every destination move with what is deleted
            await outbox.register_destinations(d.id for t in config.tenants for d in t.destinations)
        yield RetentionStores(
            outbox=outbox,
            dead_letters=dead_letters,
            proofs=proofs,
            access_log=AccessLog(engine),
            ledger=Ledger(engine, signer),
            sink_dir=settings.sink_dir,
            violations=violations,
            identity=identity[0] if identity is not None else None,
        )
    finally:
        if identity is not None:
            await identity[0].resolver.stop()
            identity[1].dispose()
        if violations is not None:
            violations.close()
        proofs.close()
        dead_letters.close()
        outbox.close()
        if redis_client is not None:
            await redis_client.aclose()


@click.group()
def retention() -> None:
    """Retention periods ([tenants.retention]; PIPL Art. 19)."""


@retention.command("run")
@click.option("--dry-run/--apply", "dry_run", required=True, help="Count only, or remove (and record it).")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tenant instead of a table.")
@_CONFIG
def retention_run(dry_run: bool, tenant: str | None, as_json: bool, config_path: Path | None) -> None:
    """Remove what is past its retention period from every store (--apply), or count it
    (--dry-run). Each tenant's applied run is recorded in the consent ledger."""
    settings, cfg = settings_and_config(config_path)
    if tenant is not None:
        tenant_of(cfg, tenant)
    tenants = limited_tenants(cfg, tenant)
    if not tenants:
        fail("no tenant sets a retention period ([tenants.retention]); nothing to do", code=1)
    by = f"cli:{getpass.getuser()}"

    async def run() -> list[RetentionRun]:
        async with _stores(settings, cfg, signing=not dry_run) as stores:
            with click.progressbar(
                length=len(tenants) * len(RUN_STEPS),
                label="dry run" if dry_run else "removing",
                file=sys.stderr,
            ) as bar:
                return await run_retention(
                    cfg, stores, apply=not dry_run, by=by, only=tenant, step=lambda _: bar.update(1)
                )

    runs = asyncio.run(run())
    for r in runs:
        if as_json:
            click.echo(msgspec.json.encode(r).decode())
            continue
        data = msgspec.to_builtins(r)
        removed = ", ".join(f"{store} {n}" for store, n in data["removed"].items())
        cutoffs = ", ".join(f"{d} before {at}" for d, at in data["cutoffs"].items()) or "none"
        verb = "would remove" if dry_run else "removed"
        recorded = f"; ledger record {data['ledgerSeq']}" if data.get("ledgerSeq") else ""
        click.echo(f"{data['tenant']}: {verb} {removed} (cutoffs: {cutoffs}){recorded}")
    if dry_run and not as_json:
        click.echo("dry run: nothing was removed (--apply removes and records it in the ledger)")


@click.command("breach")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--destination", required=True, help="The destination the breach concerns.")
@click.option("--from", "start", required=True, help="Window start, ISO 8601 (no offset: UTC).")
@click.option("--to", "end", required=True, help="Window end (exclusive), ISO 8601.")
@click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
@_CONFIG
def breach(
    tenant: str, destination: str, start: str, end: str, as_json: bool, config_path: Path | None
) -> None:
    """Breach query (PIPL Art. 57): the subjects (pseudonyms), purposes and number of events
    sent to a destination in a window, to notify the people concerned. Access-logged."""
    from consent.access_log import AccessLog
    from consent.proofs import DeliveryProofs
    from gateway.admin.breach import access_params, breach_query
    from gateway.errors import InvalidRequest

    settings, cfg = settings_and_config(config_path)
    tenant_of(cfg, tenant)
    engine = _consent_engine(settings)
    proofs = DeliveryProofs(engine)
    try:
        report = breach_query(cfg, proofs, tenant=tenant, destination=destination, start=start, end=end)
    except InvalidRequest as exc:
        fail(f"--{exc.field}: {exc.detail}")
    finally:
        proofs.close()
    AccessLog(engine).write(
        officer=f"cli:{getpass.getuser()}",
        role="cli",
        action="breach.query",
        tenant=tenant,
        params=access_params(report),
        count=len(report.subjects),
    )
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    purposes = ", ".join(f"{p} {n}" for p, n in report.purposes.items()) or "none"
    click.echo(
        f"{destination} from {report.start.isoformat()} to {report.end.isoformat()}: {report.events} events, "
        f"{len(report.subjects)} subjects; purposes: {purposes}"
        + (" (truncated: narrow the window)" if report.truncated else "")
    )
    for s in report.subjects:
        click.echo(
            f"  {s.subject}  {s.events} events  {','.join(s.purposes)}  "
            f"last {s.last_delivered_at.isoformat()}"
        )
