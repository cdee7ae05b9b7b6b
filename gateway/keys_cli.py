"""``idgate keys rotate`` and ``idgate keys retire``: moving stored state to the active key
version, and dropping an old version once nothing refers to it (docs/key-rotation.md).

A pseudonym cannot be reversed, so nothing can be re-keyed from the stores alone: the
mapping old pseudonym -> new pseudonym is learned when an event carries the raw identifier
(the ingest pipeline then moves the identity node at once, and remembers the consent
subject's pair). ``rotate`` applies the remembered consent pairs to the projection behind a
persisted cursor (a killed run resumes) and reports, per older live version, what still
refers to it; ``retire`` refuses while anything does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from consent.db import migrate_consent
from consent.rotation import (
    SubjectAliases,
    advance_cursor,
    redis_subjects_under,
    rekey_redis_state,
    rekey_sql_state,
    sql_subjects_under,
)
from gateway.cli_support import fail, settings_and_config
from gateway.config import Config
from gateway.settings import Settings
from identity.db import make_engine
from identity.identifiers import node_value
from identity.pseudonym import (
    InvalidKeyMaterial,
    KeyRing,
    MissingKey,
    key_version_of,
    retire_key_version,
)


def _replace_key_file(path: Path, text: str) -> None:
    """Replace the key file atomically (mode 0600): a crash leaves the old or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class _Stores:
    settings: Settings
    config: Config
    keyring: KeyRing
    consent: Any  # sa.Engine
    redis: Any  # redis.Redis or None

    def close(self) -> None:
        self.consent.dispose()
        if self.redis is not None:
            self.redis.close()


def _open() -> _Stores:
    from gateway.app import load_keyring

    settings, config = settings_and_config(None)
    try:
        keyring = load_keyring(settings, config)
    except (InvalidKeyMaterial, MissingKey) as exc:
        fail(str(exc))
    engine = make_engine(settings.consent_database_url)
    migrate_consent(engine)
    client = None
    if settings.redis_url:
        from identity.redis_client import open_redis

        client = open_redis(settings.redis_url)
    return _Stores(settings, config, keyring, engine, client)


def _identity_nodes_by_version(settings: Settings, tenant: str) -> dict[int, int]:
    """Key version -> identifiers of the tenant's identity graph under it (the log replayed)."""
    from gateway.identity_setup import identity_database_url
    from identity.rebuild import replay
    from identity.store import IdentityLogStore

    url = identity_database_url(settings)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return {}
    engine = make_engine(url)
    try:
        graphs, _ = replay(IdentityLogStore(engine).all_rows())
    finally:
        engine.dispose()
    counts: dict[int, int] = {}
    rebuilt = graphs.get(tenant)
    if rebuilt is None:
        return counts
    for node in rebuilt.graph.nodes():
        version = key_version_of(node_value(node))
        if version is not None:
            counts[version] = counts.get(version, 0) + 1
    return counts


def _consent_subjects_under(stores: _Stores, tenant: str, version: int) -> int:
    if stores.redis is not None:
        return redis_subjects_under(stores.redis, stores.settings.redis_prefix, tenant, version)
    return sql_subjects_under(stores.consent, tenant, version)


def references(stores: _Stores, tenant: str) -> dict[int, dict[str, int]]:
    """Per older live key version: what still refers to it (consent subjects, identity nodes)."""
    active = stores.keyring.active_version(tenant)
    nodes = _identity_nodes_by_version(stores.settings, tenant)
    out = {}
    for version in sorted(stores.keyring.versions(tenant)):
        if version == active:
            continue
        out[version] = {
            "consent_subjects": _consent_subjects_under(stores, tenant, version),
            "identity_nodes": nodes.get(version, 0),
        }
    return out


def _tenants(stores: _Stores, chosen: tuple[str, ...]) -> list[str]:
    known = sorted(stores.keyring.tenants)
    for tenant in chosen:
        if tenant not in known:
            fail(f"no key for tenant {tenant!r} (tenants with keys: {', '.join(known)})")
    return list(chosen) or known


@click.command("rotate")
@click.option("--tenant", "tenants", multiple=True, help="Tenant id (repeatable; default: every tenant).")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--throttle-ms",
    default=0,
    show_default=True,
    type=click.IntRange(0, 60_000),
    help="Pause between batches, to spare a busy production database.",
)
def keys_rotate(tenants: tuple[str, ...], batch_size: int, throttle_ms: int) -> None:
    """Move stored consent state to the active key version, and report what still refers
    to older versions.

    Subjects are moved as their identifiers are seen in events after `keys generate` (a
    pseudonym cannot be reversed); identity nodes move on sight by themselves. Resumable:
    a persisted cursor makes a killed run continue where it stopped."""
    stores = _open()
    try:
        aliases = SubjectAliases(stores.consent)
        for tenant in _tenants(stores, tenants):
            cursor = aliases.cursor(tenant)
            total = aliases.count_after(tenant, cursor)
            moved = 0
            label = f"{tenant}: re-keying consent subjects"
            with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
                while True:
                    batch = aliases.after(tenant, cursor, batch_size)
                    if not batch:
                        break
                    if stores.redis is not None:
                        moved += rekey_redis_state(stores.redis, stores.settings.redis_prefix, tenant, batch)
                        advance_cursor(stores.consent, tenant, batch[-1].id)
                    else:
                        moved += rekey_sql_state(stores.consent, tenant, batch)
                    cursor = batch[-1].id
                    bar.update(len(batch))
                    if throttle_ms:
                        time.sleep(throttle_ms / 1000)
            click.echo(
                f"{tenant}: {total} subject(s) re-keyed ({moved} state entries) "
                f"to v{stores.keyring.active_version(tenant)}"
            )
            for version, left in references(stores, tenant).items():
                if any(left.values()):
                    click.echo(
                        f"{tenant}: v{version} still referred to by {left['consent_subjects']} consent "
                        f"subject(s), {left['identity_nodes']} identity node(s) (not seen since the rotation)"
                    )
                else:
                    click.echo(
                        f"{tenant}: v{version} no longer referred to "
                        f"(idgate keys retire --tenant {tenant} --version {version})"
                    )
    finally:
        stores.close()


@click.command("retire")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--version", "version", required=True, type=int, help="The key version to drop.")
def keys_retire(tenant: str, version: int) -> None:
    """Drop an old key version from the key file ($IDGATE_KEY_FILE), refused while any
    consent subject or identity node still refers to it. Restart the gateways after."""
    stores = _open()
    try:
        if tenant not in stores.keyring.tenants:
            fail(f"no key for tenant {tenant!r}")
        if version not in stores.keyring.versions(tenant):
            fail(f"tenant {tenant!r} has no live key version {version}")
        if version == stores.keyring.active_version(tenant):
            fail(f"v{version} is the active version of {tenant!r}: generate a new one first")
        left = references(stores, tenant).get(version, {})
        if any(left.values()):
            fail(
                f"refusing to retire {tenant} v{version}: still referred to by "
                f"{left['consent_subjects']} consent subject(s) and {left['identity_nodes']} identity "
                "node(s); run `idgate keys rotate` after their identifiers are seen again",
                code=1,
            )
        key_file = stores.settings.key_file
        if key_file is None:
            fail("retire edits the key file: set IDGATE_KEY_FILE (keys from IDGATE_KEYS cannot be edited)")
        try:
            document = retire_key_version(key_file.read_text(encoding="utf-8"), tenant, version)
        except InvalidKeyMaterial as exc:
            fail(str(exc), code=1)
        _replace_key_file(key_file, document)
        remaining = sorted(int(v) for v in json.loads(document)["tenants"][tenant]["keys"])
        click.echo(f"retired {tenant} v{version}; live versions {remaining}; restart the gateways", err=True)
    finally:
        stores.close()
