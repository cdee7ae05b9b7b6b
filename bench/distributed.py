"""End-to-end throughput of the distributed mode: N gateway replicas on PostgreSQL + Redis.

Each replica is an ``idgate serve`` process with ``DATABASE_URL`` (a fresh PostgreSQL
schema) and ``REDIS_URL`` (a fresh key prefix), so the outbox is the shared Redis stream
and every replica's delivery workers consume it through the destinations' consumer groups.
One wrk per replica (as a load balancer would split the traffic) posts batches of track
events with unique message ids for ``--duration`` seconds; the benchmark then waits until
the JSONL sinks of all replicas hold every acknowledged event and reports:

* ingest events/s while the load ran (acknowledged, i.e. in the Redis stream);
* end-to-end events/s: acknowledged events / (load start -> last one in a sink);
* the delivery lag after the load stopped, and the duplicates found in the sinks.

Usage: ``.venv/bin/python bench/distributed.py [--replicas 2] [--duration 15]``. Needs
PostgreSQL and Redis on localhost (like the test suite) and wrk. Target: >= 10,000
events/s end to end with 2 replicas on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ingest  # noqa: E402 - the single-gateway benchmark: processes, wrk script, sink counting

TARGET_EVENTS_PER_S = 10_000
PG_URL = os.environ.get("IDGATE_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")


def start_replica(tmp: Path, config: Path, name: str, shared_env: dict[str, str]) -> ingest.Server:
    port = ingest.free_port()
    data_dir = tmp / f"{name}-data"
    env = {k: v for k, v in os.environ.items() if k not in ingest.STRIPPED_ENV}
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", IDGATE_REPLICA_ID=name)
    env.update(IDGATE_LOG_FORMAT="json")  # as in bench/ingest.py
    env.update(shared_env)
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        argv = [
            str(ingest._venv_bin("idgate")),
            "serve",
            "--config",
            str(config),
            "--host",
            ingest.HOST,
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ]
        proc = ingest.spawn(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    return ingest.Server(name, proc, port, log_path, data_dir)


def run_wrk_all(
    replicas: list[ingest.Server], duration: float, connections: int, tmp: Path
) -> dict[str, Any]:
    """One wrk per replica at once; returns the summed counters."""
    lua = (
        ingest.WRK_LUA.replace("@PATH@", "/v1/batch")
        .replace("@EVENTS@", str(ingest.BATCH_SIZE))
        .replace("@AUTH@", ingest.AUTH)
        .replace("@USERS@", "20000")
    )
    script = tmp / "wrk-distributed.lua"
    script.write_text(lua)
    procs = []
    for r in replicas:
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            f"http://{ingest.HOST}:{r.port}",
            "--",
            f"{r.name}-{uuid.uuid4().hex[:8]}",
        ]
        procs.append(ingest.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    total: dict[str, Any] = {
        "requests": 0,
        "ok": 0,
        "non2xx": 0,
        "accepted": 0,
        "p99_ms": 0.0,
        "first_bad": "",
    }
    for p in procs:
        out, _ = p.communicate()
        text = out.decode(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("BENCH_RESULT ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed:\n{text}")
        r = json.loads(line.split(" ", 1)[1])
        for k in ("requests", "ok", "non2xx", "accepted"):
            total[k] += r[k]
        total["p99_ms"] = max(total["p99_ms"], r["p99_us"] / 1000)
        total["first_bad"] = total["first_bad"] or r["first_bad"]
    return total


def count_sinks(replicas: list[ingest.Server]) -> tuple[int, int]:
    """(lines, distinct message ids) across every replica's warehouse sink."""
    ids: set[bytes] = set()
    lines = 0
    for r in replicas:
        for path in r.sink_dir.glob("*.jsonl"):
            for line in path.read_bytes().splitlines():
                start = line.find(b'"messageId":"') + 13
                ids.add(line[start : line.find(b'"', start)])
                lines += 1
    return lines, len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections per replica")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/distributed.py needs wrk (apt-get install wrk), one per replica")

    import redis
    import sqlalchemy as sa

    from consent.signing import new_ledger_key_b64
    from identity.pseudonym import new_key_document

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    prefix = f"idgate-bench-{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    rclient = redis.Redis.from_url(REDIS_URL)
    replicas: list[ingest.Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="idgate-bench-") as tmp_name:
            tmp = Path(tmp_name)
            unenforced, _ = ingest.write_configs(tmp)
            shared = {
                "DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
                "REDIS_URL": REDIS_URL,
                "IDGATE_REDIS_PREFIX": prefix,
                "IDGATE_KEYS": new_key_document([ingest.TENANT]),
                "IDGATE_LEDGER_KEY": new_ledger_key_b64(),
            }
            # one at a time: the first creates the schemas (migrations under an advisory lock)
            for i in range(args.replicas):
                replica = start_replica(tmp, unenforced, f"replica-{i + 1}", shared)
                replicas.append(replica)
                replica.wait_healthy()
            print(
                f"{args.replicas} replicas up (PostgreSQL schema {schema}, Redis prefix {prefix}); "
                f"{args.duration:.0f} s of batches of {ingest.BATCH_SIZE} ...",
                flush=True,
            )
            started = time.monotonic()
            load = run_wrk_all(replicas, args.duration, args.connections, tmp)
            load_ended = time.monotonic()
            acked = load["accepted"]
            deadline = load_ended + 120
            lines, distinct = count_sinks(replicas)
            while distinct < acked and time.monotonic() < deadline:
                time.sleep(0.1)
                lines, distinct = count_sinks(replicas)
            delivered_at = time.monotonic()
            time.sleep(1.0)
            lines, distinct = count_sinks(replicas)
            for r in replicas:
                if r.proc.poll() is not None:
                    raise RuntimeError(f"{r.name} died:\n{r.log_tail()}")
            e2e = acked / (delivered_at - started)
            result = {
                "replicas": args.replicas,
                "load_seconds": round(load_ended - started, 2),
                "requests": load["requests"],
                "non2xx": load["non2xx"],
                "acknowledged_events": acked,
                "ingest_events_per_s": round(acked / (load_ended - started)),
                "p99_ms": load["p99_ms"],
                "delivered_distinct": distinct,
                "sink_lines": lines,
                "duplicates": lines - distinct,
                "delivery_lag_s": round(delivered_at - load_ended, 2),
                "end_to_end_events_per_s": round(e2e),
                "target_events_per_s": TARGET_EVENTS_PER_S,
                "target_met": e2e >= TARGET_EVENTS_PER_S and distinct >= acked,
            }
            if load["first_bad"]:
                result["first_error"] = load["first_bad"]
            print(json.dumps(result, indent=2))
            if distinct < acked:
                print(
                    f"MISSING: {acked - distinct} acknowledged events are not in the sinks", file=sys.stderr
                )
                sys.exit(1)
    finally:
        for r in replicas:
            ingest.stop(r.proc)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        keys = list(rclient.scan_iter(match=f"{prefix}:*"))
        if keys:
            rclient.delete(*keys)
        rclient.close()


if __name__ == "__main__":
    main()
