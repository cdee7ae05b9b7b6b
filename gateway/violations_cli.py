"""``idgate violations``: the events a tenant's tracking plan blocked or trimmed, its
violation records (``list``, ``show``), and their ``replay`` after a fix.

``list`` and ``show`` read the store beside a running gateway: its data directory's
``violations.sqlite3``, or with ``REDIS_URL`` the records every replica shares. ``replay``
asks the running gateway (``POST /admin/plan/violations/replay``): only it holds the identity
graph, the plan it runs now and the consent pipeline, and it claims each message id in its
dedupe window, so a record replayed twice is delivered once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from export.violations import RedisViolations, SqliteViolations, ViolationStore
from gateway.cli_support import fail, table

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_VARIABLE = "IDGATE_ADMIN_TOKEN"
# the per-record outcomes of POST /admin/plan/violations/replay, as a person reads them
OUTCOMES = {
    "replayed": "replayed",
    "duplicates": "duplicate",
    "dropped": "dropped for consent",
    "stillViolating": "still violating",
    "rejected": "rejected",
    "unknownSource": "unknown source",
}
# outcomes that leave the record in the store: the event did not go through
NOT_THROUGH = ("stillViolating", "rejected", "unknownSource")


def _shared_violations() -> RedisViolations | None:
    """With REDIS_URL (distributed mode): the violation records every replica shares."""
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        return None
    from identity.redis_client import open_redis

    return RedisViolations(open_redis(redis_url), os.environ.get("IDGATE_REDIS_PREFIX", "idgate"))


def violation_file(data_dir: Path | None) -> SqliteViolations:
    """The data directory's own store (embedded mode); exit 2 when there is none."""
    from gateway.settings import data_dir_from_env

    path = data_dir_from_env(data_dir) / "violations.sqlite3"
    if not path.exists():
        fail(f"no violation store at {path} (set IDGATE_DATA_DIR)")
    return SqliteViolations(path)


def open_store(data_dir: Path | None) -> ViolationStore:
    return _shared_violations() or violation_file(data_dir)


DATA_DIR = click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Default: $IDGATE_DATA_DIR, else ./var."
)


@click.group("violations")
def violations() -> None:
    """Events the tracking plan blocked or omitted properties of: list, show, replay."""


@violations.command("list")
@DATA_DIR
@click.option("--tenant", default=None)
@click.option("--event", default=None, help="A plan event id, or unplanned.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: counts and records.")
def violations_list(
    data_dir: Path | None, tenant: str | None, event: str | None, limit: int, as_json: bool
) -> None:
    """List the events the plan blocked (replay them with `idgate violations replay` after a
    fix) or omitted properties of: from the data directory, or with REDIS_URL those every
    replica shares."""
    store = open_store(data_dir)
    try:
        counts = store.counts(tenant)
        records = [r.summary() for r in store.list(tenant, limit, event)]
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"counts": counts, "violations": records}, sort_keys=True))
        return
    click.echo(f"{sum(counts.values())} records: " + ", ".join(f"{e} {n}" for e, n in sorted(counts.items())))
    rows = [
        (
            r["id"],
            f"{r['tenant']}/{r['source']}",
            r["event"],
            r["action"],
            r["messageId"],
            "; ".join(f"{v['rule']} {v['path']}" for v in r["violations"]),
        )
        for r in records
    ]
    click.echo("\n".join(table(rows)), nl=bool(rows))


@violations.command("show")
@click.argument("record_id")
@DATA_DIR
def violations_show(record_id: str, data_dir: Path | None) -> None:
    """One record (rules, property paths, plan version, action) with its event as stored:
    identifiers pseudonymised, properties and context scrubbed. Exit 2 for an unknown id."""
    store = open_store(data_dir)
    try:
        record = store.get(record_id)
    finally:
        store.close()
    if record is None:
        fail(f"no violation record with id {record_id!r} (`idgate violations list` shows the ids)")
    out = {**record.summary(), "event": json.loads(record.payload)}
    click.echo(json.dumps(out, indent=2, ensure_ascii=False, sort_keys=True))


def _error(response: httpx.Response) -> dict[str, Any]:
    """The gateway's JSON error ``{error, detail, field}``, or ``{}``."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _refused(response: httpx.Response, url: str) -> NoReturn:
    """Exit 1 (2 for a bad request) with what the gateway said: its JSON error's detail."""
    detail = _error(response).get("detail") or response.reason_phrase
    if response.status_code == 401:
        fail(f"{url} refused the admin token (401: {detail}); set {TOKEN_VARIABLE} to a valid token", 1)
    if response.status_code == 403:
        fail(f"{url} refused the admin token's request (403: {detail})", 1)
    fail(f"{url} answered {response.status_code}: {detail}", 2 if response.status_code == 400 else 1)


class _Gateway:
    """The running gateway's admin API, with the token from the environment."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(timeout)
        )

    def __enter__(self) -> _Gateway:
        return self

    def __exit__(self, *_: object) -> None:
        self._client.close()

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the gateway at {self.url} ({exc}); check --url or $IDGATE_URL", 1)

    def tenant_of(self, record_id: str) -> str:
        from urllib.parse import quote

        response = self.call("GET", f"/admin/plan/violations/{quote(record_id, safe='')}")
        if response.status_code == 404:
            fail(f"no violation record with id {record_id!r} (`idgate violations list` shows the ids)")
        if response.status_code != 200:
            _refused(response, self.url)
        tenant: str = response.json()["tenant"]
        return tenant

    def replay(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.call("POST", "/admin/plan/violations/replay", json=body)
        error = _error(response)
        if response.status_code == 400 and error.get("field") == "ids":
            named = ", ".join(map(repr, body["ids"]))
            fail(f"{error.get('detail')} {body['tenant']!r}: one of {named}")
        if response.status_code != 200:
            _refused(response, self.url)
        outcome: dict[str, Any] = response.json()
        return outcome


@violations.command("replay")
@click.argument("record_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every kept record of --tenant.")
@click.option("--tenant", default=None, help="Whose records (default: each named record's own).")
@click.option(
    "--url",
    envvar="IDGATE_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The running gateway (or $IDGATE_URL).",
)
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True, help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="The gateway's answer as JSON: counts and records.")
def violations_replay(
    record_ids: tuple[str, ...], every: bool, tenant: str | None, url: str, timeout: float, as_json: bool
) -> None:
    """Put kept events back through the running gateway's pipeline after a plan or client
    fix: each is checked against the plan it runs now, deduplicated by message id (an event
    already delivered is a duplicate, not sent again) and asked consent again. Prints each record's outcome:
    replayed, duplicate, dropped for consent (deleted, not delivered), still violating (kept).

    The admin token (operator role) is read from $IDGATE_ADMIN_TOKEN only, never from an
    argument, so that it stays out of shell history and process lists.

    Exit 1 when a record did not go through (still violating, rejected, unknown source) or
    the gateway refused the token or could not be reached; exit 2 for an unknown id."""
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        fail(f"set {TOKEN_VARIABLE} to an admin token with the operator role")
    if every == bool(record_ids):
        fail("name record ids, or --all with --tenant")
    with _Gateway(url, token, timeout) as gateway:
        batches: dict[str, list[str]] = {}  # tenant -> ids (none: --all)
        if every:
            if tenant is None:
                fail("--all needs --tenant")
            batches[tenant] = []
        else:
            for rid in dict.fromkeys(record_ids):
                batches.setdefault(tenant or gateway.tenant_of(rid), []).append(rid)
        answers = [
            gateway.replay({"tenant": t, "ids": ids} if ids else {"tenant": t, "all": True})
            for t, ids in batches.items()
        ]
    records = [r for a in answers for r in a["records"]]
    counts = {k: sum(a[k] for a in answers) for k in OUTCOMES}
    if as_json:
        click.echo(json.dumps({**counts, "records": records}, sort_keys=True))
    else:
        rows = [("id", "event", "message id", "outcome")]
        rows += [(r["id"], r["event"], r["messageId"], OUTCOMES[r["outcome"]]) for r in records]
        click.echo("\n".join(table(rows)))
        click.echo(", ".join(f"{n} {OUTCOMES[k]}" for k, n in counts.items() if n) or "nothing to replay")
    sys.exit(1 if any(counts[k] for k in NOT_THROUGH) else 0)
