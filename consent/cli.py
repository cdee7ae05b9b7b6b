"""``idgate ledger``: verify an export offline, export the ledger, force a signed checkpoint.

Registered on the main command group by ``gateway.cli`` (``main.add_command(ledger)``);
usable on its own, e.g. by an auditor who only has an export file.

The signing key comes from ``IDGATE_LEDGER_KEY``, else ``--key-file`` /
``IDGATE_LEDGER_KEY_FILE``, else, when the ``idgate`` command runs in dev, the key a dev
gateway generated in its data directory (the group callback names that file in
``ctx.meta[DEV_LEDGER_KEY_META]``; this package does not decide what dev is).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from consent.signing import InvalidLedgerKey, LedgerSigner, load_signer

# The database and ledger modules (SQLAlchemy, Alembic) are imported by the commands that
# use them, so `idgate --version` and the keys commands start in a fraction of a second.

_DATABASE_URL = click.option(
    "--database-url",
    envvar="DATABASE_URL",
    default=None,
    help="postgresql+psycopg://... or sqlite:///path ($DATABASE_URL; default: consent.sqlite3 under "
    "$IDGATE_DATA_DIR or ./var, like the gateway).",
)
_KEY_FILE = click.option(
    "--key-file",
    envvar="IDGATE_LEDGER_KEY_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File with the base64 ledger signing key ($IDGATE_LEDGER_KEY_FILE; $IDGATE_LEDGER_KEY wins; "
    "in dev, the gateway's generated key under $IDGATE_DATA_DIR).",
)


def _database_url(database_url: str | None) -> str:
    from consent.db import default_sqlite_url

    return database_url or default_sqlite_url(Path(os.environ.get("IDGATE_DATA_DIR") or "var"))


def _fail(message: str) -> NoReturn:
    click.echo(f"idgate: {message}", err=True)
    sys.exit(2)


DEV_LEDGER_KEY_META = "idgate.dev_ledger_key_file"


def load_cli_signer(key_file: Path | None) -> tuple[LedgerSigner, str]:
    """The ledger signer and where its key came from (for messages; never the key)."""
    env_value = os.environ.get("IDGATE_LEDGER_KEY") or None
    if env_value:
        return load_signer(env_value=env_value, key_file=None, dev_file=None), "IDGATE_LEDGER_KEY"
    if key_file is not None:
        return load_signer(env_value=None, key_file=key_file, dev_file=None), str(key_file)
    ctx = click.get_current_context(silent=True)
    dev_file: Path | None = ctx.meta.get(DEV_LEDGER_KEY_META) if ctx is not None else None
    if dev_file is not None and dev_file.exists():
        # read only: the CLI never generates a key (a new one would not match the ledger's)
        return load_signer(env_value=None, key_file=dev_file, dev_file=None), f"{dev_file} (dev)"
    hint = f" (dev: none at {dev_file} yet; the gateway creates it on its first start)" if dev_file else ""
    raise InvalidLedgerKey(f"no ledger signing key: set IDGATE_LEDGER_KEY or IDGATE_LEDGER_KEY_FILE{hint}")


def _signer(key_file: Path | None) -> LedgerSigner:
    return load_cli_signer(key_file)[0]


@click.group("ledger")
def ledger() -> None:
    """The consent ledger: verify exports, export, checkpoint."""


@ledger.command("verify")
@click.argument("export_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    help="Trusted signing key (base64), repeatable. Signatures by any other key then fail; "
    "without it the key ids found are printed, to compare with the operator's.",
)
def verify_command(export_path: Path, public_keys: tuple[str, ...]) -> None:
    """Verify a JSONL export offline (- reads stdin): exit 0 when intact, 1 when tampered."""
    from consent.verify import verify_export

    if str(export_path) == "-":
        result = verify_export(sys.stdin.buffer, trusted_keys=public_keys or None)
    else:
        with export_path.open("rb") as fh:
            result = verify_export(fh, trusted_keys=public_keys or None)
    if not result.ok:
        where = f" at seq {result.first_bad_seq}" if result.first_bad_seq is not None else ""
        click.echo(f"TAMPERED: {result.problem}{where}: {result.detail}")
        sys.exit(1)
    click.echo(f"OK: {result.records} records, {result.checkpoints} checkpoints")
    if not result.complete:
        click.echo("PARTIAL: tenant-filtered export; the global hash chain was not verified")
    click.echo(result.detail)


@ledger.command("export")
@_DATABASE_URL
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Export file; - writes JSONL to stdout (messages and progress go to stderr).",
)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--tenant", default=None, help="Only this tenant's records (not chain-verifiable on its own).")
@_KEY_FILE
def export_command(
    database_url: str | None, out_path: Path, fmt: str, tenant: str | None, key_file: Path | None
) -> None:
    """Export the ledger: JSONL (verifiable, sealed with the key when available) or CSV.

    CSV writes the records to OUT and the checkpoints to OUT with ``.checkpoints.csv``."""
    import sqlalchemy as sa

    from consent.ledger import Ledger
    from identity.db import make_engine

    to_stdout = str(out_path) == "-"
    if to_stdout and fmt == "csv":
        _fail("--format csv writes two files: give --out a file name")
    try:
        signer: LedgerSigner | None = _signer(key_file)
    except InvalidLedgerKey:
        signer = None  # the export is still verifiable; only its seal goes unsigned
    url = _database_url(database_url)
    database = sa.make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).exists():
        _fail(f"no consent database at {database}")
    engine = make_engine(url)
    try:
        store = Ledger(engine, signer)
        try:
            total = store.count(tenant=tenant)
        except sa.exc.DBAPIError as exc:
            _fail(f"cannot read the ledger: {exc.orig or exc}")
        if to_stdout:
            stdout = sys.stdout
            with click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
                written = store.export_jsonl(stdout, tenant=tenant, progress=bar.update)
            stdout.flush()
            unsigned = " (seal unsigned: no ledger key)" if signer is None else ""
            click.echo(f"exported {written} records{unsigned}", err=True)
            return
        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(out_path.name + ".partial")
        try:
            with (
                partial.open("w", encoding="utf-8", newline="") as fh,
                click.progressbar(length=total, label="exporting", file=sys.stderr) as bar,
            ):
                if fmt == "jsonl":
                    written = store.export_jsonl(fh, tenant=tenant, progress=bar.update)
                else:
                    written = store.export_csv(fh, tenant=tenant, progress=bar.update)
                fh.flush()
                os.fsync(fh.fileno())
            partial.replace(out_path)  # a reader of OUT never sees half an export
        finally:
            partial.unlink(missing_ok=True)
        message = f"exported {written} records to {out_path}"
        if fmt == "csv":
            cp_path = out_path.with_name(out_path.stem + ".checkpoints.csv")
            with cp_path.open("w", encoding="utf-8", newline="") as fh:
                checkpoints = store.export_checkpoints_csv(fh)
            message += f" and {checkpoints} checkpoints to {cp_path}"
        elif signer is None:
            message += " (seal unsigned: no ledger key)"
        click.echo(message)
    finally:
        engine.dispose()


@ledger.command("checkpoint")
@_DATABASE_URL
@_KEY_FILE
def checkpoint_command(database_url: str | None, key_file: Path | None) -> None:
    """Sign a checkpoint over every record not yet covered by one."""
    from consent.db import migrate_consent
    from consent.ledger import Ledger
    from identity.db import make_engine

    try:
        signer = _signer(key_file)
    except InvalidLedgerKey as exc:
        _fail(str(exc))
    engine = make_engine(_database_url(database_url))
    try:
        migrate_consent(engine)
        checkpoint = Ledger(engine, signer).checkpoint()
    finally:
        engine.dispose()
    if checkpoint is None:
        click.echo("nothing to checkpoint: every record is covered")
        return
    span = f"{checkpoint.from_seq}..{checkpoint.to_seq}"
    click.echo(f"checkpoint {span} root {checkpoint.root} key {checkpoint.key_id}")
