"""``idgate dlq``: inspect, replay and purge the dead-letter store.

Works beside a running gateway: in embedded mode on the outbox database under
``$IDGATE_DATA_DIR`` (SQLite allows the second writer), in distributed mode
(``IDGATE_OUTBOX=redis``, or ``REDIS_URL`` with ``DATABASE_URL``) on the shared Redis.
Replay appends the events back to the outbox for their destination only; the delivery
worker asks consent again before sending them, so a withdrawal since they failed holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from gateway.settings import Settings

from export.deadletter import DeadLetter, DeadLetterStore
from export.outbox import OutboxRecord


def _fail(message: str) -> NoReturn:
    click.echo(f"idgate: {message}", err=True)
    sys.exit(2)


@contextmanager
def _stores() -> Iterator[tuple[Settings, DeadLetterStore, str]]:
    from gateway.delivery_setup import open_dead_letters
    from gateway.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))
    if settings.outbox_kind == "redis":
        where = f"redis prefix {settings.redis_prefix!r}"
    elif settings.outbox_path.exists():
        where = str(settings.outbox_path)
    else:
        _fail(f"no outbox at {settings.outbox_path} (set IDGATE_DATA_DIR)")
    store = open_dead_letters(settings)
    try:
        yield settings, store, where
    finally:
        store.close()


@contextmanager
def _appender(settings: Settings) -> Iterator[Callable[[list[OutboxRecord]], object]]:
    """Appends to the deployment's outbox (dedupe off: these events were stored before),
    opened once for the whole replay."""
    from gateway.delivery_setup import open_outbox

    loop = asyncio.new_event_loop()
    client = None
    if settings.outbox_kind == "redis":
        from identity.redis_client import open_async_redis

        client = open_async_redis(settings.redis_url or "")
    outbox = open_outbox(settings, 24 * 3600, client)
    try:
        yield lambda records: loop.run_until_complete(outbox.append(records, dedupe=False))
    finally:
        outbox.close()
        if client is not None:
            loop.run_until_complete(client.aclose())
        loop.close()


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _select(
    store: DeadLetterStore, ids: tuple[str, ...], destination: str | None, every: bool
) -> list[DeadLetter]:
    if ids:
        found = [store.get(i) for i in ids]
        missing = [i for i, e in zip(ids, found, strict=True) if e is None]
        if missing:
            _fail(f"no dead letter with id {', '.join(missing)}")
        return [e for e in found if e is not None]
    if destination is None and not every:
        _fail("name entry ids, or --destination, or --all")
    return store.list(destination, limit=1_000_000)


@click.group("dlq")
def dlq() -> None:
    """Dead letters: events a destination could not take after its retries."""


@dlq.command("list")
@click.option("--destination", default=None, help="Only this destination.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(destination: str | None, limit: int, as_json: bool) -> None:
    """Entries with their destination, message id, attempts and reason (no payload)."""
    with _stores() as (_, store, where):
        entries = store.list(destination, limit)
        counts = store.counts()
    if as_json:
        for e in entries:
            click.echo(json.dumps(e.summary()))
        return
    click.echo(f"dead letters in {where}: " + (", ".join(f"{d} {n}" for d, n in counts.items()) or "none"))
    for e in entries:
        click.echo(
            f"{e.id:<28} {e.destination:<20} {e.message_id:<40} received {_when(e.received_at_ms)} "
            f"dead {_when(e.dead_at_ms)} attempts {e.attempts}  {e.reason}"
        )


@dlq.command("show")
@click.argument("entry_id")
def dlq_show(entry_id: str) -> None:
    """One entry with its stored event (pseudonymised, as it sat in the outbox)."""
    with _stores() as (_, store, _where):
        entry = store.get(entry_id)
    if entry is None:
        _fail(f"no dead letter with id {entry_id}")
    out = entry.summary()
    out["consentProof"] = list(entry.proof)
    out["event"] = json.loads(entry.payload)
    click.echo(json.dumps(out, indent=2, ensure_ascii=False))


@dlq.command("replay")
@click.argument("entry_ids", nargs=-1)
@click.option("--destination", default=None, help="Every entry of this destination.")
@click.option("--all", "every", is_flag=True, help="Every entry.")
def dlq_replay(entry_ids: tuple[str, ...], destination: str | None, every: bool) -> None:
    """Put entries back in the outbox for their destination; consent is asked again at send."""
    with _stores() as (settings, store, _where):
        entries = _select(store, entry_ids, destination, every)
        if not entries:
            click.echo("nothing to replay")
            return
        with _appender(settings) as append, click.progressbar(length=len(entries), label="replaying") as bar:
            for start in range(0, len(entries), 500):
                chunk = entries[start : start + 500]
                append([e.to_outbox() for e in chunk])  # first into the outbox, then off the store
                store.delete([e.id for e in chunk])
                bar.update(len(chunk))
    click.echo(f"replayed {len(entries)} event(s)")


@dlq.command("purge")
@click.argument("entry_ids", nargs=-1)
@click.option("--destination", default=None, help="Every entry of this destination.")
@click.option("--all", "every", is_flag=True, help="Every entry.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(entry_ids: tuple[str, ...], destination: str | None, every: bool, yes: bool) -> None:
    """Delete entries for good (the events are not delivered)."""
    with _stores() as (_, store, _where):
        entries = _select(store, entry_ids, destination, every)
        if not entries:
            click.echo("nothing to purge")
            return
        if not yes:
            click.confirm(f"delete {len(entries)} dead letter(s) for good?", abort=True)
        removed = store.delete([e.id for e in entries])
    click.echo(f"purged {removed} event(s)")
