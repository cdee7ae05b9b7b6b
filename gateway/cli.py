"""The ``idgate`` command line: serve, keys, config check, ledger, dlq, identity, migrate.

Every command logs through one configuration (``gateway.logging``: redacting, on stderr),
set up in the group callback before the command runs, so what a command prints on stdout
(JSON lines, exports, keys) is never mixed with log lines.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import secrets
import socket
import stat
import sys
from pathlib import Path
from typing import IO

import click
import structlog

from consent.cli import DEV_LEDGER_KEY_META, ledger, load_cli_signer
from consent.signing import InvalidLedgerKey, new_ledger_key_b64
from gateway.alerts_cli import alerts
from gateway.cli_support import fail, settings_and_config, table, tenant_of
from gateway.config import Config, ConfigProblems, hash_write_key, load_config
from gateway.dlq_cli import dlq
from gateway.keys_cli import keys_retire, keys_rotate
from gateway.logging import configure_logging
from gateway.plan_cli import plan
from gateway.retention_cli import breach, retention
from gateway.rights_cli import rights
from gateway.settings import (
    DEV_LEDGER_KEY_FILE,
    LogSettings,
    Settings,
    SettingsError,
    data_dir_from_env,
    environment_from_env,
)
from gateway.violations_cli import violations
from identity.pseudonym import InvalidKeyMaterial, KeyRing, MissingKey, new_key_document

LOCK_FILE = "idgate.lock"
PRIVATE_UMASK = 0o077


@click.group()
@click.version_option(package_name="idgate", prog_name="idgate", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context) -> None:
    """idgate: PIPL consent, pseudonymisation and identity resolution in front of your analytics."""
    try:
        env = environment_from_env()
        logs = LogSettings.from_env(env)
    except SettingsError as exc:
        fail(str(exc))
    configure_logging(fmt=logs.format, level=logs.level)
    # Every file a command creates (SQLite databases and their journals, the outbox, sink
    # files, dev keys, exports) is readable by its owner only: they hold personal data or keys.
    os.umask(PRIVATE_UMASK)
    if env == "dev":
        # The ledger commands sign with the key a dev gateway generated in its data
        # directory when no key is given (never outside dev).
        ctx.meta[DEV_LEDGER_KEY_META] = data_dir_from_env() / DEV_LEDGER_KEY_FILE


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data directory for the life of the process: one
    gateway per data directory (its SQLite outbox, sink files and cursors have one writer).
    The lock goes with the process, however it ends."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until exit
    except OSError as exc:
        fail(f"cannot start: data directory {data_dir}: {exc.strerror}")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        fail(
            f"cannot start: another idgate (pid {holder}) is serving data directory {data_dir} "
            f"(lock {data_dir / LOCK_FILE}); stop it or use another --data-dir"
        )
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _make_private(data_dir)
    return fh


def _make_private(data_dir: Path) -> None:
    """Take group and other permissions off what an earlier version (or a copy) left readable
    in the data directory: new files are private by the umask, old ones are made so here."""
    tightened = 0
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            path = Path(root) / name
            try:
                st = path.lstat()
                if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
                    tightened += 1
            except OSError:
                continue
    try:
        if stat.S_IMODE(data_dir.stat().st_mode) & 0o077:
            data_dir.chmod(stat.S_IMODE(data_dir.stat().st_mode) & 0o700)
            tightened += 1
    except OSError:
        pass
    if tightened:
        structlog.get_logger("idgate.gateway").warning(
            "data_dir.permissions_tightened", path=str(data_dir), files=tightened
        )


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port before any start-up work, so a busy port is reported
    first and no second process can take it between the check and the start. Connections
    that arrive while the gateway starts wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        fail(f"cannot start: {host}:{port}: {reason} (another process listens there? use --port)")
    sock.set_inheritable(False)
    return sock


def _banner(settings: Settings, config: Config, base: str) -> list[str]:
    """What a newcomer needs to follow the README: in dev the demo secrets of the config,
    in production none (its config holds only hashes)."""
    lines = [
        f"idgate {settings.env} on {base}  (config {settings.config_path}, data {settings.data_dir})",
        f"  API docs      {base}/docs   (OpenAPI JSON: {base}/docs/openapi.json)",
        f"  console       {base}/console   (the compliance console for officers)",
        f"  sink files    {settings.sink_dir}/<destination>/<date>.jsonl",
    ]
    if not settings.dev:
        return lines
    lines.insert(
        1,
        "  DEV MODE (IDGATE_ENV=dev, set explicitly): demo keys and tokens accepted, keys generated "
        "under the data directory. Not for production: without IDGATE_ENV the gateway runs as production.",
    )
    write_keys = [
        (f"{t.id}/{s.id}", s.platform, s.dev_write_key)
        for t in config.tenants
        for s in t.sources
        if s.dev_write_key
    ]
    sensors = [
        (f"{t.id}/{s.id}", s.sensors_project, s.sensors_dev_token)
        for t in config.tenants
        for s in t.sources
        if s.sensors_project and s.sensors_dev_token
    ]
    admins = [
        (a.name, a.role + (f" ({', '.join(a.tenants)})" if a.tenants else ""), a.dev_token)
        for a in config.admin_tokens
        if a.dev_token
    ]

    if write_keys:
        lines.append("  write keys (HTTP Basic user, e.g. curl -u KEY: ...):")
        lines += table(write_keys, "    ")
    if sensors:
        lines.append(f"  Sensors SDKs ({base}/sa?project=PROJECT&token=TOKEN):")
        rows = [(src, f"project {project}", f"token {token}") for src, project, token in sensors]
        lines += table(rows, "    ")
    if admins:
        lines.append("  admin tokens (Authorization: Bearer TOKEN):")
        lines += table(admins, "    ")
    if write_keys or sensors or admins:
        lines.append("  (demo keys and tokens from the config: accepted with IDGATE_ENV=dev only)")
    return lines


def tune_runtime(settings: Settings) -> None:
    """The interpreter settings ``serve`` runs with: the GIL switch interval and the cycle
    collector's young-generation threshold (each left at CPython's default when 0)."""
    if settings.gil_switch_interval_seconds > 0:
        sys.setswitchinterval(settings.gil_switch_interval_seconds)
    if settings.gc_gen0_threshold > 0:
        gc.set_threshold(settings.gc_gen0_threshold, *gc.get_threshold()[1:])


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Tenant config TOML (default: $IDGATE_CONFIG or idgate.example.toml).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Outbox, sinks and dev keys (default: $IDGATE_DATA_DIR or ./var).",
)
def serve(config_path: Path | None, host: str, port: int, data_dir: Path | None) -> None:
    """Run the gateway."""
    from uvicorn.config import STARTUP_FAILURE

    from gateway import front_end
    from gateway.app import create_app

    try:
        settings = Settings.from_env(config_path=config_path, data_dir=data_dir)
    except SettingsError as exc:
        fail(f"cannot start: {exc}")
    # Before any start-up work: the port (nothing on disk yet), then the data directory's lock.
    listener = _listen(host, port)
    lock = _lock_data_dir(settings.data_dir)
    try:
        app = create_app(settings)
        config = load_config(settings.config_path, dev=settings.dev)
    except (SettingsError, ConfigProblems, InvalidKeyMaterial, MissingKey, InvalidLedgerKey) as exc:
        fail(f"cannot start: {exc}")
    tune_runtime(settings)
    shown_host = f"[{host}]" if ":" in host else host
    for line in _banner(settings, config, f"http://{shown_host}:{port}"):
        click.echo(line)
    server = front_end.server(app, host, port, settings.http)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        lock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # the lifespan failed (logged), as uvicorn.run would exit


@main.group()
def keys() -> None:
    """Pseudonymisation keys and write keys."""


def _write_secret_file(path: Path, text: str, *, replace: bool) -> None:
    """Write a key file (mode 0600) atomically: a crash leaves the old file or the new one,
    never half of either. Without ``replace`` an existing file is left alone
    (FileExistsError), even one created a moment ago by someone else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _key_versions(document: str) -> dict[str, set[int]]:
    """Tenant -> key versions of a key document (InvalidKeyMaterial when it is not one)."""
    KeyRing.from_json(document)  # checks the structure and every key
    tenants = json.loads(document)["tenants"]
    return {tenant: {int(v) for v in entry["keys"]} for tenant, entry in tenants.items()}


@keys.command("generate")
@click.option("--tenant", "tenants", multiple=True, required=True, help="Tenant id (repeatable).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Key file to create or rotate (mode 0600). Without it the document goes to stdout.",
)
def keys_generate(tenants: tuple[str, ...], out: Path | None) -> None:
    """Add a new active key version per tenant (use for first keys and for rotation).

    An existing --out file keeps every key version it has: pseudonyms made with them stay
    readable. A file that is not a key document is refused, never overwritten."""
    existing = None
    before: dict[str, set[int]] = {}
    if out is not None and out.exists():
        try:
            existing = out.read_text(encoding="utf-8")
            before = _key_versions(existing) if existing.strip() else {}
        except (OSError, UnicodeDecodeError, InvalidKeyMaterial) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not a key document"
            fail(f"{out}: {reason}; refusing to overwrite it (choose another --out)")
        existing = existing if existing.strip() else None
    doc = new_key_document(list(tenants), existing)
    if out is None:
        click.echo(doc, nl=False)
        return
    after = _key_versions(doc)
    lost = [f"{t} v{v}" for t, versions in before.items() for v in versions if v not in after.get(t, ())]
    if lost:  # new_key_document only adds versions; this guards the file against any change to that
        fail(f"{out}: rotation would drop key versions {', '.join(lost)}; file left unchanged")
    _write_secret_file(out, doc, replace=True)
    rotated = ", ".join(f"{t} v{max(after[t])}" for t in tenants)
    click.echo(f"wrote {out} (active: {rotated}); set IDGATE_KEY_FILE={out}", err=True)


@keys.command("ledger-key")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Key file to create (mode 0600).",
)
@click.option("--force", is_flag=True, help="Replace an existing --out file (its key is lost for good).")
def keys_ledger_key(out: Path | None, force: bool) -> None:
    """Generate the Ed25519 key that signs consent-ledger checkpoints (IDGATE_LEDGER_KEY[_FILE]).

    An existing --out file is never overwritten without --force: losing the ledger key
    breaks the chain of signed checkpoints."""
    key = new_ledger_key_b64()
    if out is None:
        click.echo(key)
        return
    try:
        _write_secret_file(out, key + "\n", replace=force)
    except FileExistsError:
        fail(f"{out} exists; refusing to overwrite a ledger key (--force replaces it, and its key is lost)")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}")
    click.echo(f"wrote {out}; set IDGATE_LEDGER_KEY_FILE={out}", err=True)


@keys.command("ledger-public-key")
@click.option(
    "--key-file",
    envvar="IDGATE_LEDGER_KEY_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ledger key file ($IDGATE_LEDGER_KEY_FILE; $IDGATE_LEDGER_KEY wins; in dev the gateway's "
    f"generated $IDGATE_DATA_DIR/{DEV_LEDGER_KEY_FILE}).",
)
def keys_ledger_public_key(key_file: Path | None) -> None:
    """Print the ledger's public key (base64), for `idgate ledger verify --public-key`.

    Only the public key goes to stdout; its key id and where it came from go to stderr."""
    try:
        signer, where = load_cli_signer(key_file)
    except InvalidLedgerKey as exc:
        fail(str(exc))
    click.echo(signer.public_key_b64)
    click.echo(f"key id {signer.key_id} (from {where})", err=True)


@keys.command("write-key")
def keys_write_key() -> None:
    """Generate a write key for a source and the hash that goes into the config."""
    key = secrets.token_urlsafe(24)
    click.echo(f"write key (give to the SDK): {key}")
    click.echo(f'write_key_sha256 = "{hash_write_key(key)}"')


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--production", is_flag=True, help="Check as IDGATE_ENV=production would (no dev keys).")
def config_check(path: Path, production: bool) -> None:
    """Report every problem in a config file, with its location."""
    try:
        cfg = load_config(path, dev=not production)
    except ConfigProblems as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    from gateway.delivery_setup import minimisation_warnings

    for warning in minimisation_warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    sources = sum(len(t.sources) for t in cfg.tenants)
    dests = sum(len(t.destinations) for t in cfg.tenants)
    click.echo(f"{path}: OK ({len(cfg.tenants)} tenant(s), {sources} source(s), {dests} destination(s))")


main.add_command(ledger)
main.add_command(dlq)
keys.add_command(keys_rotate)
keys.add_command(keys_retire)
main.add_command(rights)
main.add_command(plan)
main.add_command(violations)
main.add_command(alerts)
main.add_command(retention)
main.add_command(breach)


@main.group()
def console() -> None:
    """The compliance console (/console)."""


@console.command("hash-password")
def console_hash_password() -> None:
    """Print the Argon2id hash of a console user's password (asked twice, never echoed),
    for ``password_argon2`` of ``[[console_users]]``."""
    from argon2 import PasswordHasher

    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        fail("a console password needs at least 12 characters")
    click.echo(PasswordHasher().hash(password))


@main.group()
def identity() -> None:
    """The identity graph."""


@identity.command("rebuild")
@click.option(
    "--database-url", default=None, help="Identity store (default: $DATABASE_URL or var/identity.sqlite3)."
)
def identity_rebuild(database_url: str | None) -> None:
    """Recompute every person from the change log and report differences."""
    import sqlalchemy as sa

    from identity.db import make_engine
    from identity.rebuild import rebuild
    from identity.store import LOG, IdentityLogStore

    path = data_dir_from_env() / "identity.sqlite3"
    url = database_url or os.environ.get("DATABASE_URL") or f"sqlite:///{path}"
    if url == f"sqlite:///{path}" and not path.exists():
        fail(f"no identity log at {path} (set IDGATE_DATA_DIR, or --database-url)")
    engine = make_engine(url)
    store = IdentityLogStore(engine)
    try:
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(LOG)).scalar() or 0
    except sa.exc.DBAPIError as exc:
        fail(f"cannot read the identity log: {exc.orig or exc}")

    with click.progressbar(length=total, label="replaying the identity log", file=sys.stderr) as bar:
        report = rebuild(store.all_rows(), progress=bar.update)
    for tenant, figures in report.tenants.items():
        click.echo(
            f"{tenant}: {figures['identifiers']} identifiers, {figures['persons']} persons, "
            f"{figures['links']} links"
        )
    if report.consistent:
        click.echo(f"OK: {report.changes} changes; the replayed graph matches the components of its links")
    else:
        for line in report.differences[:50]:
            click.echo(f"DIFFERENCE: {line}", err=True)
        sys.exit(1)


@identity.command("export-map")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--destination", required=True, help="Destination whose pseudonym domain the map uses.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet file.")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Tenant config TOML."
)
def identity_export_map(tenant: str, destination: str, out: Path, config_path: Path | None) -> None:
    """Write the identity_map (pseudonym -> unified ID, valid from/to) as Parquet for a destination."""
    from export.identity_map import write_identity_map
    from gateway.app import load_keyring
    from gateway.delivery_setup import rekeyer
    from gateway.identity_setup import identity_rules
    from identity.db import make_engine
    from identity.identity_map import identity_map
    from identity.store import IdentityLogStore

    settings, cfg = settings_and_config(config_path)
    try:
        keyring = load_keyring(settings, cfg)
    except (InvalidKeyMaterial, MissingKey) as exc:
        fail(str(exc))
    found = tenant_of(cfg, tenant)
    dest = next((d for d in found.destinations if d.id == destination), None)
    if dest is None:
        click.echo(f"idgate: tenant {tenant!r} has no destination {destination!r}", err=True)
        sys.exit(2)
    url = settings.database_url or f"sqlite:///{settings.data_dir / 'identity.sqlite3'}"
    store = IdentityLogStore(make_engine(url))

    intervals = identity_map(store.all_rows(), tenant, identity_rules(found))
    count = write_identity_map(intervals, rekeyer(keyring, tenant, dest), out)
    click.echo(f"wrote {count} rows to {out} (domain {dest.pseudonym_domain or dest.id})")


@main.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the consent and identity schemas (DATABASE_URL, else the embedded SQLite)."""
    from consent.db import migrate_consent
    from identity.db import make_engine, migrate
    from identity.store import MIGRATIONS_DIR

    settings = Settings.from_env()
    engine = make_engine(settings.consent_database_url)
    migrate_consent(engine)
    click.echo(f"consent schema up to date ({engine.dialect.name})")
    identity_url = settings.database_url or f"sqlite:///{settings.data_dir / 'identity.sqlite3'}"
    identity_engine = make_engine(identity_url)
    migrate(identity_engine, script_location=MIGRATIONS_DIR)
    click.echo(f"identity schema up to date ({identity_engine.dialect.name})")


if __name__ == "__main__":
    main()
