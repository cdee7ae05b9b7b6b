"""Distributed mode on this machine, without Docker: N gateway replicas on the local
PostgreSQL and Redis (``make run-distributed``).

What it does, each step skipped when already done (so a second run continues where the
first stopped):

1. creates the PostgreSQL schema (default ``idgate_distributed``) in the database of
   ``--database-url`` and checks that Redis answers;
2. creates the keys every replica must share in the data directory (default
   ``var/distributed``): ``keys.json`` (pseudonymisation, one key per tenant of the config)
   and ``ledger.key`` (signs the consent ledger), both mode 0600;
3. runs ``idgate migrate`` once;
4. starts the replicas (``idgate serve``) on their own ports (default 8081, 8082, ...),
   each with its own data directory and log (``replica-N/``, ``replica-N.log``), sharing the
   schema, the Redis key prefix (default ``idgate-distributed``) and the keys: the outbox is
   the shared Redis stream;
5. waits until every replica answers ``/readyz``, prints how to send to each and how to
   stop, and stays in the foreground until Ctrl-C (or SIGTERM), which stops every replica.

``--reset`` first drops the schema, deletes the prefix's Redis keys and the replicas' data
directories (the keys are kept). Environment: ``IDGATE_ENV`` defaults to ``dev`` (the example
config's demo write keys are accepted only there); other ``IDGATE_*`` settings of the
caller (e.g. ``IDGATE_LOG_LEVEL``) reach the replicas.

    .venv/bin/python deploy/run_distributed.py [--replicas 2] [--port 8081 --port 8082]
        [--data-dir var/distributed] [--config idgate.example.toml]
        [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
        [--schema idgate_distributed] [--redis-url redis://127.0.0.1:6379/0]
        [--redis-prefix idgate-distributed] [--reset]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
IDGATE = Path(sys.executable).with_name("idgate")
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Settings this script decides; the caller's values of these would break the sharing.
OWN_SETTINGS = (
    "DATABASE_URL",
    "REDIS_URL",
    "IDGATE_REDIS_PREFIX",
    "IDGATE_KEYS",
    "IDGATE_KEY_FILE",
    "IDGATE_LEDGER_KEY",
    "IDGATE_LEDGER_KEY_FILE",
    "IDGATE_OUTBOX",
    "IDGATE_REPLICA_ID",
    "IDGATE_CONFIG",
    "IDGATE_DATA_DIR",
)


class Failed(Exception):
    """A step failed; the message says which and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--port", dest="ports", type=int, action="append", help="repeat once per replica")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", type=Path, default=Path("var/distributed"))
    p.add_argument("--config", type=Path, default=ROOT / "idgate.example.toml")
    p.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--schema", default="idgate_distributed")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--redis-prefix", default="idgate-distributed")
    p.add_argument("--reset", action="store_true", help="drop the schema, the Redis keys and replica data")
    args = p.parse_args(argv)
    args.ports = args.ports or [8081 + i for i in range(args.replicas)]
    if len(args.ports) != args.replicas:
        p.error(f"--port given {len(args.ports)} times for {args.replicas} replicas")
    if not SCHEMA_NAME.match(args.schema):
        p.error(f"--schema must match {SCHEMA_NAME.pattern}")
    return args


def say(message: str) -> None:
    print(message, flush=True)


def schema_url(database_url: str, schema: str) -> str:
    import sqlalchemy as sa

    url = sa.make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def prepare_postgres(database_url: str, schema: str, reset: bool) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            if reset:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    except sa.exc.OperationalError as exc:
        raise Failed(f"PostgreSQL at {database_url}: {exc.orig} (start it, or give --database-url)") from None
    finally:
        engine.dispose()


def prepare_redis(redis_url: str, prefix: str, reset: bool) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
        if reset:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
    except redis.RedisError as exc:
        raise Failed(f"Redis at {redis_url}: {exc} (start it, or give --redis-url)") from None
    finally:
        client.close()


def idgate(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([str(IDGATE), *args], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise Failed(f"idgate {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def shared_keys(data_dir: Path, config: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """The pseudonymisation keys (a version for every tenant of the config) and the ledger key."""
    keys, ledger_key = data_dir / "keys.json", data_dir / "ledger.key"
    tenants = [t["id"] for t in tomllib.loads(config.read_text(encoding="utf-8")).get("tenants", [])]
    known: set[str] = set()
    if keys.exists():
        import json

        known = set(json.loads(keys.read_text(encoding="utf-8")).get("tenants", {}))
    missing = [t for t in tenants if t not in known]
    if missing:
        idgate(
            "keys", "generate", *(a for t in missing for a in ("--tenant", t)), "--out", str(keys), env=env
        )
        say(f"created pseudonymisation keys for {', '.join(missing)} in {keys}")
    if not ledger_key.exists():
        idgate("keys", "ledger-key", "--out", str(ledger_key), env=env)
        say(f"created the ledger key {ledger_key}")
    return keys, ledger_key


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join("    " + line for line in text[-lines:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir: Path = args.data_dir.resolve()
    base_env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    base_env.setdefault("IDGATE_ENV", "dev")
    procs: list[tuple[str, str, subprocess.Popen[bytes], Path, Path]] = []

    def stop_all() -> None:
        for _, _, proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, _, proc, _, _ in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        database_url = schema_url(args.database_url, args.schema)
        prepare_postgres(args.database_url, args.schema, args.reset)
        prepare_redis(args.redis_url, args.redis_prefix, args.reset)
        data_dir.mkdir(parents=True, exist_ok=True)
        if args.reset:
            for i in range(1, args.replicas + 1):
                shutil.rmtree(data_dir / f"replica-{i}", ignore_errors=True)
        keys, ledger_key = shared_keys(data_dir, args.config, base_env)
        env = {
            **base_env,
            "DATABASE_URL": database_url,
            "REDIS_URL": args.redis_url,
            "IDGATE_REDIS_PREFIX": args.redis_prefix,
            "IDGATE_KEY_FILE": str(keys),
            "IDGATE_LEDGER_KEY_FILE": str(ledger_key),
            "IDGATE_OUTBOX": "redis",
        }
        idgate("migrate", env=env)
        say(f"schema {args.schema!r} migrated")
        for i, port in enumerate(args.ports, start=1):
            name = f"replica-{i}"
            log = data_dir / f"{name}.log"
            with open(log, "ab") as fh:
                proc = subprocess.Popen(
                    [
                        str(IDGATE),
                        "serve",
                        "--config",
                        str(args.config),
                        "--host",
                        args.host,
                        "--port",
                        str(port),
                        "--data-dir",
                        str(data_dir / name),
                    ],
                    env={**env, "IDGATE_REPLICA_ID": name},
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches this script, which stops them in order
                )
            procs.append((name, f"http://{args.host}:{port}", proc, data_dir / name, log))
        deadline = time.monotonic() + 90
        waiting = list(procs)
        while waiting and not stopping:
            for entry in list(waiting):
                name, url, proc, _, log = entry
                if proc.poll() is not None:
                    raise Failed(f"{name} exited ({proc.returncode}); its log {log}:\n{tail(log)}")
                if ready(url):
                    waiting.remove(entry)
            if time.monotonic() > deadline:
                raise Failed(f"not ready after 90 s: {', '.join(w[0] for w in waiting)}")
            time.sleep(0.2)
        if stopping:
            return 0
        print_instructions(args, procs)
        while not stopping:
            for name, _, proc, _, log in procs:
                if proc.poll() is not None:
                    raise Failed(f"{name} exited ({proc.returncode}); its log {log}:\n{tail(log)}")
            time.sleep(0.5)
        say("stopping the replicas ...")
        return 0
    except Failed as exc:
        print(f"run_distributed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_all()
        if procs:
            say("stopped")


def print_instructions(
    args: argparse.Namespace, procs: list[tuple[str, str, subprocess.Popen[bytes], Path, Path]]
) -> None:
    first, last = procs[0][1], procs[-1][1]
    where = (
        f"PostgreSQL schema {args.schema!r} ({args.database_url}), "
        f"Redis prefix {args.redis_prefix!r} ({args.redis_url})"
    )
    lines = [
        f"{len(procs)} replicas ready on {where}:",
        *(f"  {name}  {url}  pid {proc.pid}  data {data}  log {log}" for name, url, proc, data, log in procs),
        "Send to any of them: they share consent, identities, dedupe and the outbox (a Redis stream). E.g.",
        f"  curl -s -u acme-app-demo-key: -H 'Content-Type: application/json' {first}/v1/consent \\",
        """    -d '{"anonymousId": "anon-1", "grant": ["analytics", "identity_linking"],"""
        """ "noticeId": "privacy-2026-11"}'""",
        f"  curl -s -u acme-app-demo-key: -H 'Content-Type: application/json' {last}/v1/track \\",
        """    -d '{"anonymousId": "anon-1", "event": "Product Viewed", "messageId": "d-1"}'""",
        "Every replica delivers a share of the events: the warehouse's files are "
        + ", ".join(f"{data}/sinks/warehouse/" for _, _, _, data, _ in procs),
        "Stop: Ctrl-C here (or kill "
        + str(os.getpid())
        + "). The data stays: run again to go on, with --reset to start afresh.",
    ]
    say("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
