"""Consent writes through real HTTP: grants/s of ``POST /v1/consent`` on one gateway.

wrk posts grants of ``analytics`` for a fresh ``anonymousId`` per request (one ledger record
each) to an ``idgate serve`` on fresh state, for ``--duration`` seconds after a short warm-up.
Afterwards the ledger is verified (chain, checkpoints) and must hold at least every
acknowledged grant. Backends: ``sqlite`` (embedded: SQLite ledger and state) and
``postgres`` (distributed: PostgreSQL ledger, Redis state; a fresh schema and key prefix).

``--baseline PATH`` runs the same load against the code of another checkout (e.g. a worktree
at main) with this venv, and prints both side by side. Target: 5,000 grants/s (MET / NOT MET).

    .venv/bin/python bench/consent_writes.py [--backend sqlite,postgres] [--duration 15]
                                             [--connections 64] [--baseline /path/to/main]

Needs wrk; the postgres backend needs PostgreSQL and Redis on localhost (like the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import ingest  # noqa: E402 - processes (spawn, stop, free ports, CPU seconds)

TARGET_GRANTS_PER_S = 5_000
WARMUP_S = 2
PG_URL = os.environ.get("IDGATE_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
WRITE_KEY = "bench-consent-key-0001"
NOTICE = "notice-v1"

CONFIG = f"""
[rate_limits]
ip_requests_per_second = 100000000
ip_events_per_second = 100000000
new_identifiers_per_person_per_day = 1000
consent_records_per_subject_per_day = 1000
ip_consent_calls_per_hour = 1000000000

[[tenants]]
id = "shop"

[[tenants.sources]]
id = "shop-web"
platform = "web"
dev_write_key = "{WRITE_KEY}"

[[tenants.notices]]
id = "{NOTICE}"
content_sha256 = "{"1" * 64}"

[tenants.tracking_plan]
"*" = ["analytics"]

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]
"""

# One grant per request, each for a subject of its own (thread, counter, run token).
WRK_LUA = r"""
local counter = 0
local token = "x"
local tid = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  token = args[1] or "x"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "@AUTH@"
end
function request()
  counter = counter + 1
  local body = '{"anonymousId":"bench-' .. token .. '-' .. tid .. '-' .. counter ..
    '","grant":["analytics"],"noticeId":"@NOTICE@","sdk":"analytics.js/5"}'
  return wrk.format(nil, "/v1/consent", nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

# Runs the gateway from another checkout's source with this venv's dependencies.
LAUNCHER = "import sys; sys.path.insert(0, sys.argv.pop(1)); from gateway.cli import main; sys.exit(main())"


@dataclass
class Result:
    code: str
    backend: str
    grants_per_s: float
    acknowledged: int
    failed: int
    p50_ms: float
    p99_ms: float
    ledger_records: int
    ledger_ok: bool
    gateway_cpu_s: float

    def line(self) -> str:
        verdict = "MET" if self.grants_per_s >= TARGET_GRANTS_PER_S else "NOT MET"
        return (
            f"{self.code:<10} {self.backend:<9} {self.grants_per_s:>9,.0f} {self.p50_ms:>8.1f} "
            f"{self.p99_ms:>8.1f} {self.acknowledged / max(self.gateway_cpu_s, 1e-9):>11,.0f} "
            f"{self.failed:>7} {self.ledger_records:>9,} "
            f"{'ok' if self.ledger_ok else 'BROKEN':>7}  {verdict}"
        )


@contextmanager
def postgres_env() -> Any:
    """A fresh PostgreSQL schema and Redis prefix, with the keys replicas share."""
    import psycopg
    import sqlalchemy as sa

    from consent.signing import new_ledger_key_b64
    from identity.pseudonym import new_key_document

    schema = f"bench_consent_{uuid.uuid4().hex[:10]}"
    conninfo = sa.make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options={quote(f'-csearch_path={schema}')}"
    prefix = f"bench-consent-{uuid.uuid4().hex[:10]}"
    try:
        yield {
            "DATABASE_URL": url,
            "REDIS_URL": REDIS_URL,
            "IDGATE_REDIS_PREFIX": prefix,
            "IDGATE_KEYS": new_key_document(["shop"]),
            "IDGATE_LEDGER_KEY": new_ledger_key_b64(),
        }
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def start(tmp: Path, code: Path, extra_env: dict[str, str]) -> ingest.Server:
    port = ingest.free_port()
    config = tmp / "idgate.toml"
    config.write_text(CONFIG)
    data_dir = tmp / "data"
    env = {k: v for k, v in os.environ.items() if k not in ingest.STRIPPED_ENV}
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", IDGATE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update(extra_env)
    log_path = tmp / "gateway.log"
    argv = [sys.executable, "-c", LAUNCHER, str(code), "serve", "--config", str(config)]
    argv += ["--host", ingest.HOST, "--port", str(port), "--data-dir", str(data_dir)]
    with open(log_path, "wb") as log:
        proc = ingest.spawn(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    server = ingest.Server("gateway", proc, port, log_path, data_dir)
    server.wait_healthy()
    return server


def wrk(server: ingest.Server, seconds: float, connections: int, tmp: Path) -> dict[str, Any]:
    import base64

    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    script = tmp / "consent.lua"
    script.write_text(WRK_LUA.replace("@AUTH@", auth).replace("@NOTICE@", NOTICE))
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    argv += ["-s", str(script), f"http://{ingest.HOST}:{server.port}", "--", uuid.uuid4().hex[:10]]
    out = subprocess.run(argv, capture_output=True, check=False).stdout.decode(errors="replace")
    m = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
    if m is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    return json.loads(m.group(1))  # type: ignore[no-any-return]


def profile(server: ingest.Server, args: argparse.Namespace, name: str) -> subprocess.Popen[bytes] | None:
    """py-spy over the measured load (``--profile DIR``): collapsed stacks, the top costs printed."""
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{name}.folded"
    argv = [str(ingest._venv_bin("py-spy")), "record", "--pid", str(server.proc.pid), "--format", "raw"]
    argv += ["--duration", str(max(1, round(args.duration) - 1)), "--output", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_costs(folded: Path, count: int = 15) -> list[str]:
    """The functions with the most samples anywhere on the stack (inclusive), in per cent."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        samples = int(n)
        total += samples
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:count]
    return [f"{100 * n / max(1, total):5.1f}%  {frame[:150]}" for frame, n in ranked]


def ledger_check(env: dict[str, str], data_dir: Path) -> tuple[int, bool]:
    """Records in the ledger and whether the whole chain and its checkpoints verify."""
    from consent.ledger import Ledger, verify_database
    from identity.db import make_engine

    url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'consent.sqlite3'}"
    engine = make_engine(url)
    try:
        ledger = Ledger(engine, None)
        return ledger.count(), verify_database(ledger).ok
    finally:
        engine.dispose()


def run(code: Path, label: str, backend: str, args: argparse.Namespace) -> Result:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-consent-")))
        env = stack.enter_context(postgres_env()) if backend == "postgres" else {}
        server = start(tmp, code, env)
        try:
            wrk(server, WARMUP_S, args.connections, tmp)
            cpu0 = ingest.proc_cpu_seconds(server.proc.pid)
            spy = profile(server, args, f"{label}-{backend}")
            r = wrk(server, args.duration, args.connections, tmp)
            if spy is not None:
                spy.wait()
            cpu = ingest.proc_cpu_seconds(server.proc.pid) - cpu0
        finally:
            ingest.stop(server.proc)
        failed = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
        acknowledged = r["requests"] - r["status"] - r["read"] - r["timeout"]
        records, ok = ledger_check(env, server.data_dir or tmp)
        errors = [line for line in server.log_tail(2000).splitlines() if '"level":"error"' in line]
        if errors:
            print(f"[{label} {backend}] {len(errors)} error lines in the gateway log, e.g. {errors[0][:300]}")
        return Result(
            code=label,
            backend=backend,
            grants_per_s=acknowledged / (r["duration_us"] / 1e6),
            acknowledged=acknowledged,
            failed=failed,
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            ledger_records=records,
            ledger_ok=ok and records >= acknowledged,
            gateway_cpu_s=cpu,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="sqlite", help="comma-separated: sqlite, postgres")
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--baseline", type=Path, help="a checkout of main to measure side by side")
    parser.add_argument("--profile", type=Path, help="py-spy each measured run into this directory")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/consent_writes.py needs wrk (apt-get install wrk)")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if set(backends) - {"sqlite", "postgres"}:
        sys.exit("--backend: sqlite and/or postgres")
    codes = [(REPO, "this")] + ([(args.baseline.resolve(), "baseline")] if args.baseline else [])
    results = []
    for backend in backends:
        for code, label in codes:
            results.append(run(code, label, backend, args))
            time.sleep(1)  # let the machine settle between runs
    print(
        f"\nPOST /v1/consent, one grant per request, wrk -c{args.connections}, {args.duration:.0f} s "
        f"after {WARMUP_S} s warm-up, {ingest.NCPU} cores; target {TARGET_GRANTS_PER_S:,} grants/s"
    )
    print("per CPU-s: grants per CPU-second of the gateway process (the machine is shared: the")
    print("rate says what it got, this what it costs)")
    print(
        f"{'code':<10} {'backend':<9} {'grants/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'per CPU-s':>11} "
        f"{'failed':>7} {'ledger':>9} {'chain':>7}  target"
    )
    for r in results:
        print(r.line())
    for backend in backends:
        pair = [r for r in results if r.backend == backend]
        if len(pair) == 2 and pair[1].grants_per_s:
            print(f"{backend}: {pair[0].grants_per_s / pair[1].grants_per_s:.1f}x the baseline")
    if args.profile is not None:
        for r in results:
            folded = args.profile / f"{r.code}-{r.backend}.folded"
            if folded.exists():
                print(f"\ntop costs, {r.code} {r.backend} (py-spy, inclusive share of samples):")
                print("\n".join(top_costs(folded)))
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    if not all(r.ledger_ok for r in results):
        sys.exit("the ledger does not hold every acknowledged grant, or does not verify")


if __name__ == "__main__":
    main()
