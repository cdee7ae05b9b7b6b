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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import NoReturn

import click

from export.deadletter import DeadLetter, DeadLetterStore, RedisDeadLetters, SqliteDeadLetters
from export.outbox import OutboxRecord, SqliteOutbox


def _fail(message: str) -> NoReturn:
    click.echo(f"idgate: {message}", err=True)
    sys.exit(2)


@contextmanager
def _stores() -> Iterator[tuple[DeadLetterStore, str]]:
    from gateway.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))
    if settings.outbox_kind == "redis":
        import redis

        assert settings.redis_url
        store: DeadLetterStore = RedisDeadLetters(
            redis.Redis.from_url(settings.redis_url), settings.redis_prefix
        )
        where = f"redis prefix {settings.redis_prefix!r}"
    else:
        if not settings.outbox_path.exists():
            _fail(f"no outbox at {settings.outbox_path} (set IDGATE_DATA_DIR)")
        store = SqliteDeadLetters(settings.dead_letter_path)
        where = str(settings.outbox_path)
    try:
        yield store, where
    finally:
        store.close()


def _append(records: list[OutboxRecord]) -> None:
    """Put records back in the outbox of the deployment mode."""
    from gateway.settings import Settings

    settings = Settings.from_env()
    if settings.outbox_kind == "redis":
        import redis.asyncio as aioredis

        from export.redis_outbox import RedisStreamOutbox

        async def go() -> None:
            client = aioredis.from_url(settings.redis_url or "")
            try:
                box = RedisStreamOutbox(client, prefix=settings.redis_prefix, replica=settings.replica_id)
                await box.append(records, dedupe=False)
            finally:
                await client.aclose()

        asyncio.run(go())
        return
    box = SqliteOutbox(settings.outbox_path)
    box.open()
    try:
        box.append_sync(records, dedupe=False)
    finally:
        box.close()


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
    with _stores() as (store, where):
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
    with _stores() as (store, _):
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
    with _stores() as (store, _):
        entries = _select(store, entry_ids, destination, every)
        if not entries:
            click.echo("nothing to replay")
            return
        with click.progressbar(length=len(entries), label="replaying") as bar:
            for start in range(0, len(entries), 500):
                chunk = entries[start : start + 500]
                _append([e.to_outbox() for e in chunk])  # first into the outbox, then off the store
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
    with _stores() as (store, _):
        entries = _select(store, entry_ids, destination, every)
        if not entries:
            click.echo("nothing to purge")
            return
        if not yes:
            click.confirm(f"delete {len(entries)} dead letter(s) for good?", abort=True)
        removed = store.delete([e.id for e in entries])
    click.echo(f"purged {removed} event(s)")
