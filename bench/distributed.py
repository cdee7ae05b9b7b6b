"""Distributed mode on PostgreSQL + Redis: a scaling curve over replica counts, and how fast a
withdrawal through one replica takes effect on another under load.

For each count of ``--replicas`` (default ``1,2,4``), on fresh state (a new PostgreSQL schema,
Redis key prefix and data directories), N ``idgate serve`` replicas share ``DATABASE_URL`` and
``REDIS_URL``, so the outbox is the shared Redis stream and every replica's delivery workers
consume it through the destinations' consumer groups. One wrk per replica (as a load balancer
would split the traffic) posts batches of 100 track events with unique message ids; the
benchmark then waits until the JSONL sinks of all replicas hold every acknowledged event.
Per count:

* ingest events/s while the load ran (acknowledged, i.e. in the Redis stream), and the p50 /
  p99 of the batch requests' latency (the wrks' latency distributions, merged);
* end-to-end events/s: acknowledged events / (load start -> last one in a sink);
* the delivery lag after the load stopped, acknowledged events missing from the sinks, and
  duplicates (lines in the sinks past the distinct message ids);
* where the CPU went (the replicas, the wrks, PostgreSQL + Redis, the rest) and ingest events
  per CPU-second of the replicas: on a shared machine the replicas get what other work
  leaves them, and this figure says whether more replicas cost more per event;
* each figure relative to the first count (1 replica).

With 2 replicas or more, while the load runs, the withdrawal probe (bench/withdrawal_probe.py)
grants ``analytics`` to a fresh subject through replica A, checks that replica B accepts the
subject's event, withdraws through A and posts the subject's events to B until B drops one,
``--probes`` times, ``--probe-workers`` rounds at once (A and B move round the replicas):
the time from the withdrawal's 2xx to B's dropping answer, p50 / p99 / max, and the events B
still accepted after the 2xx. The load goes on past ``--duration`` until the probe is done (at
most ``--max-extra`` seconds more), so the probe always runs under load. ``--idle-probes``
rounds, one at a time before the load, give the floor.

Targets: 2 replicas >= 30,000 events/s end to end (none missing); a withdrawal effective on
another replica < 100 ms at p99. The replicas, wrk, PostgreSQL and Redis share this machine's
cores: past as many replicas as cores, the replicas share cores, so the curve there says how
the mode degrades, not how it scales.

    .venv/bin/python bench/distributed.py [--replicas 1,2,4] [--duration 15] [--connections 8]
                                          [--probes 200] [--probe-workers 8] [--idle-probes 50]
                                          [--max-extra 300] [--json]

Needs PostgreSQL and Redis on localhost (like the test suite) and wrk.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ingest  # noqa: E402 - the single-gateway benchmark: processes, wrk script, sink counting
import withdrawal_probe as probe  # noqa: E402
from tables import Column, print_table  # noqa: E402

TARGET_REPLICAS = 2
TARGET_EVENTS_PER_S = 30_000  # end to end, with TARGET_REPLICAS replicas
DELIVERY_TIMEOUT_S = 120.0
PG_URL = os.environ.get("IDGATE_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
NCPU = len(os.sched_getaffinity(0))

# Percentiles each wrk reports of its latency distribution; merge_percentile interpolates
# between them to get the percentiles of all the replicas' requests together.
LATENCY_GRID = [float(p) for p in range(1, 100)] + [99.1 + i / 10 for i in range(9)] + [99.99]
LATENCY_LUA = """
-- appended by bench/distributed.py: the latency distribution, for merging across the wrks
local bench_done = done
function done(summary, latency, requests)
  bench_done(summary, latency, requests)
  local grid = {@GRID@}
  local out = {}
  for i, p in ipairs(grid) do out[i] = tostring(latency:percentile(p)) end
  io.write("BENCH_LATENCY " .. latency.min .. " " .. latency.max .. " " .. table.concat(out, ",") .. "\\n")
end
"""


@dataclass
class LoadPart:
    """What one wrk reported."""

    requests: int
    ok: int
    non2xx: int
    accepted: int
    socket_errors: int
    first_bad: str
    # latency in microseconds: min, LATENCY_GRID's percentiles, max
    min_us: float
    points_us: list[float]
    max_us: float

    def cdf(self, x: float) -> float:
        """Share of this wrk's requests at or below ``x`` us (linear between its percentiles)."""
        xs = [self.min_us, *self.points_us, self.max_us]
        ps = [0.0, *LATENCY_GRID, 100.0]
        if x < xs[0]:
            return 0.0
        if x >= xs[-1]:
            return 1.0
        i = bisect.bisect_right(xs, x)  # xs[i-1] <= x < xs[i]
        lo, hi = xs[i - 1], xs[i]
        frac = 0.0 if hi == lo else (x - lo) / (hi - lo)
        return (ps[i - 1] + frac * (ps[i] - ps[i - 1])) / 100


def merge_percentile(parts: list[LoadPart], q: float) -> float:
    """The ``q`` quantile (0..1) of every wrk's requests together, in ms: the x where the
    request-weighted sum of the wrks' distributions reaches q."""
    weighted = [(p, p.requests) for p in parts if p.requests]
    total = sum(n for _, n in weighted)
    if not total:
        return 0.0
    lo = min(p.min_us for p, _ in weighted)
    hi = max(p.max_us for p, _ in weighted)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(n * p.cdf(mid) for p, n in weighted) / total >= q:
            hi = mid
        else:
            lo = mid
    return hi / 1000


def replica_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--replicas wants counts like 1,2,4, not {text!r}") from None
    if not counts or any(c < 1 or c > 16 for c in counts):
        raise argparse.ArgumentTypeError("--replicas: counts between 1 and 16")
    return counts


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


def start_load(
    replicas: list[ingest.Server], seconds: float, connections: int, tmp: Path, rate: float = 0
) -> list[subprocess.Popen[bytes]]:
    """One wrk per replica, at once, for at most ``seconds`` (stop_load ends them earlier).
    ``rate`` > 0: paced at about that many events/s in all (each connection waits between
    its requests, wrk's ``delay``), instead of as fast as the replicas answer."""
    grid = ",".join(f"{p:g}" for p in LATENCY_GRID)
    lua = (
        ingest.WRK_LUA.replace("@PATH@", "/v1/batch")
        .replace("@EVENTS@", str(ingest.BATCH_SIZE))
        .replace("@AUTH@", ingest.AUTH)
        .replace("@USERS@", "20000")
    ) + LATENCY_LUA.replace("@GRID@", grid)
    if rate > 0:
        pause_ms = 1000 * connections * len(replicas) * ingest.BATCH_SIZE / rate
        lua += f"\nfunction delay()\n  return {pause_ms:.0f}\nend\n"
    script = tmp / "wrk-distributed.lua"
    script.write_text(lua)
    procs = []
    for r in replicas:
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            f"http://{ingest.HOST}:{r.port}",
            "--",
            f"{r.name}-{uuid.uuid4().hex[:8]}",
        ]
        procs.append(ingest.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def stop_load(procs: list[subprocess.Popen[bytes]]) -> list[LoadPart]:
    """SIGINT ends a wrk early, as at the end of its duration (it still prints its report)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    parts = []
    for p in procs:
        out, _ = p.communicate()
        text = out.decode(errors="replace")
        result = next((x for x in text.splitlines() if x.startswith("BENCH_RESULT ")), None)
        latency = next((x for x in text.splitlines() if x.startswith("BENCH_LATENCY ")), None)
        if p.returncode != 0 or result is None or latency is None:
            raise RuntimeError(f"wrk failed:\n{text}")
        r = json.loads(result.split(" ", 1)[1])
        _, lo, hi, points = latency.split(" ")
        parts.append(
            LoadPart(
                requests=r["requests"],
                ok=r["ok"],
                non2xx=r["non2xx"],
                accepted=r["accepted"],
                socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
                first_bad=r["first_bad"],
                min_us=float(lo),
                points_us=[float(x) for x in points.split(",")],
                max_us=float(hi),
            )
        )
    return parts


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


def service_cpu_seconds() -> float:
    """CPU seconds of the PostgreSQL and Redis processes running now (anyone's: the services
    are the machine's, and other work may use them too)."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in ("postgres", "redis-server"):
            total += ingest.proc_cpu_seconds(int(comm.parent.name))
    return total


@dataclass
class CpuSnapshot:
    replicas: float
    wrk: float
    services: float
    host: tuple[int, int]  # busy, total jiffies

    @classmethod
    def take(cls, replicas: list[ingest.Server], load: list[subprocess.Popen[bytes]]) -> CpuSnapshot:
        return cls(
            sum(ingest.proc_cpu_seconds(r.proc.pid) for r in replicas),
            sum(ingest.proc_cpu_seconds(p.pid) for p in load),
            service_cpu_seconds(),
            ingest.host_cpu(),
        )

    def shares(self, before: CpuSnapshot, seconds: float) -> dict[str, int]:
        """Percent of one core each got between ``before`` and this snapshot; other: the rest
        of the machine's busy time (the benchmark itself, the kernel, other work)."""
        busy, total = self.host[0] - before.host[0], self.host[1] - before.host[1]
        host = 100 * NCPU * busy / total if total else 0.0
        replicas = 100 * (self.replicas - before.replicas) / seconds
        wrk = 100 * (self.wrk - before.wrk) / seconds
        services = 100 * (self.services - before.services) / seconds
        return {
            "replicas": round(replicas),
            "wrk": round(wrk),
            "postgres_redis": round(services),
            "other": round(max(0.0, host - replicas - wrk - services)),
            "host": round(host),
        }


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_count(n: int, args: argparse.Namespace, load_config: str) -> dict[str, Any]:
    """One run with ``n`` replicas on fresh state; the figures of that point of the curve."""
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
    load: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="idgate-bench-") as tmp_name:
            tmp = Path(tmp_name)
            config = tmp / "idgate-distributed.toml"
            config.write_text(probe.probe_config_text(load_config), encoding="utf-8")
            shutil.copytree(ingest.REPO / "plans", tmp / "plans")  # tracking_plan_file, relative
            shared = {
                "DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
                "REDIS_URL": REDIS_URL,
                "IDGATE_REDIS_PREFIX": prefix,
                "IDGATE_KEYS": new_key_document([ingest.TENANT, probe.PROBE_TENANT]),
                "IDGATE_LEDGER_KEY": new_ledger_key_b64(),
            }
            # one at a time: the first creates the schemas (migrations under an advisory lock)
            for i in range(n):
                replica = start_replica(tmp, config, f"replica-{i + 1}", shared)
                replicas.append(replica)
                replica.wait_healthy()
            pairs = [(r.name, ingest.HOST, r.port) for r in replicas]
            idle: probe.WithdrawalProbe | None = None
            if n >= 2 and args.idle_probes > 0:
                # the floor: the same rounds before the load, one at a time
                idle = probe.WithdrawalProbe(pairs, args.idle_probes, threading.Event(), f"{schema}-idle")
                idle.start()
                idle.join()
            with_probe = n >= 2 and args.probes > 0
            print(
                f"\n{n} replica(s) up (PostgreSQL schema {schema}, Redis prefix {prefix}); "
                f"{args.duration:g} s of batches of {ingest.BATCH_SIZE}"
                + (f", withdrawal probe of {args.probes} rounds" if with_probe else "")
                + f"; load average {loadavg()}",
                file=sys.stderr,
                flush=True,
            )
            load_avg_before = os.getloadavg()
            started = time.monotonic()
            load = start_load(
                replicas, args.duration + args.max_extra + 5, args.connections, tmp, args.load_rate
            )
            cpu_before = CpuSnapshot.take(replicas, load)
            prober: probe.WithdrawalProbe | None = None
            stop_probe = threading.Event()
            if with_probe:
                # a warm-up second first: the rounds are about replicas under load
                stop_probe.wait(min(1.0, args.duration / 10))
                prober = probe.WithdrawalProbe(pairs, args.probes, stop_probe, schema, args.probe_workers)
                prober.start()
            # the load runs --duration, and on while the probe has rounds to do (bounded)
            end_at = started + args.duration
            hard_end = end_at + args.max_extra
            while True:
                now = time.monotonic()
                if any(p.poll() is not None for p in load):
                    break  # a wrk stopped on its own (its own duration, or it failed)
                probing = prober is not None and prober.is_alive()
                if now >= hard_end or (now >= end_at and not probing):
                    break
                if prober is not None and probing and now >= end_at:
                    prober.join(timeout=min(0.2, hard_end - now))
                else:
                    time.sleep(min(0.2, max(0.0, end_at - now)))
            cpu_after = CpuSnapshot.take(replicas, load)
            cpu_seconds = time.monotonic() - started
            stop_probe.set()  # rounds left when the load ends are not under load
            parts = stop_load(load)
            load_ended = time.monotonic()
            load = []
            if prober is not None:
                prober.join()
            acked = sum(p.accepted for p in parts)
            deadline = load_ended + DELIVERY_TIMEOUT_S
            lines, distinct = count_sinks(replicas)
            while distinct < acked and time.monotonic() < deadline:
                time.sleep(0.1)
                lines, distinct = count_sinks(replicas)
            delivered_at = time.monotonic()
            # events in flight when wrk stopped are stored but not counted as acknowledged:
            # wait until the sinks stop growing (1 s unchanged) before counting duplicates
            last, last_change = (lines, distinct), time.monotonic()
            while time.monotonic() - last_change < 1.0 and time.monotonic() < deadline:
                time.sleep(0.1)
                lines, distinct = count_sinks(replicas)
                if (lines, distinct) != last:
                    last, last_change = (lines, distinct), time.monotonic()
            for r in replicas:
                if r.proc.poll() is not None:
                    raise RuntimeError(f"{r.name} died:\n{r.log_tail()}")
            load_seconds = load_ended - started
            e2e = acked / (delivered_at - started)
            cpu = cpu_after.shares(cpu_before, cpu_seconds)
            result: dict[str, Any] = {
                "replicas": n,
                "load_rate": args.load_rate,  # 0: as fast as the replicas answer
                "load_seconds": round(load_seconds, 2),
                "requests": sum(p.requests for p in parts),
                "non2xx": sum(p.non2xx for p in parts),
                "socket_errors": sum(p.socket_errors for p in parts),
                "acknowledged_events": acked,
                "ingest_events_per_s": round(acked / load_seconds),
                "p50_ms": round(merge_percentile(parts, 0.50), 1),
                "p99_ms": round(merge_percentile(parts, 0.99), 1),
                "delivered_distinct": distinct,
                "sink_lines": lines,
                "missing": max(0, acked - distinct),
                "duplicates": lines - distinct,
                "delivery_lag_s": round(delivered_at - load_ended, 2),
                "end_to_end_events_per_s": round(e2e),
                "cpu_pct": cpu,
                # on a shared machine the replicas get what the other work leaves them: their
                # events per CPU-second says whether more replicas cost more per event
                "ingest_events_per_replica_cpu_s": round(100 * acked / load_seconds / cpu["replicas"])
                if cpu["replicas"]
                else 0,
                "load_average_before": [round(v, 2) for v in load_avg_before],
                "load_average_after": [round(v, 2) for v in os.getloadavg()],
            }
            first_bad = next((p.first_bad for p in parts if p.first_bad), "")
            if first_bad:
                result["first_error"] = first_bad
            for key, run in (("withdrawal", prober), ("withdrawal_without_load", idle)):
                if run is not None:
                    result[key] = run.result.summary()
                    result[key]["void"] = run.result.void[:5]
                    result[key]["error_samples"] = run.result.errors[:5]
                    if run.failure is not None:
                        result[key]["failure"] = repr(run.failure)
            errors = []
            for r in replicas:
                log = r.log_path.read_text(errors="replace").splitlines()
                bad = [x for x in log if '"level":"error"' in x or '"level":"critical"' in x]
                if bad:
                    errors.append(f"{r.name}: {len(bad)} error line(s), first: {bad[0][:300]}")
            if errors:
                result["log_errors"] = errors
            return result
    finally:
        for p in load:
            ingest.stop(p)
        for r in replicas:
            ingest.stop(r.proc)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        keys = list(rclient.scan_iter(match=f"{prefix}:*"))
        if keys:
            rclient.delete(*keys)
        rclient.close()


def _relative(value: float, base: float | None) -> str:
    return "n/a" if not base else f"{value / base:.2f}x"


def print_curve(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The table, the figures relative to the first count, the targets."""
    base = runs[0]
    print()
    print(
        f"idgate distributed mode, PostgreSQL + Redis on localhost, batches of {ingest.BATCH_SIZE}, "
        f"one wrk per replica: this machine has {NCPU} cores"
    )
    print(
        f"(the replicas, the wrks, PostgreSQL and Redis share those {NCPU} cores: past {NCPU} replicas "
        "the replicas share cores, so those points show crowding, not scaling)"
    )
    cpu = ("replicas", "wrk", "postgres_redis", "other", "host")
    print_table(
        [
            Column("replicas", 8),
            Column("load s", 8, ".1f"),
            Column("ingest ev/s", 13, ","),
            Column("e2e ev/s", 11, ","),
            Column("ev/CPU-s", 10, ","),
            Column("p50 ms", 9, ".1f"),
            Column("p99 ms", 9, ".1f"),
            Column("lag s", 8, ".2f"),
            Column("missing", 9, ","),
            Column("dups", 7, ","),
            Column("non2xx", 8, ","),
            Column("loadavg", 9, ".2f"),
            Column("  CPU% replicas/wrk/pg+redis/other/host", 0, left=True),
        ],
        [
            [
                r["replicas"],
                r["load_seconds"],
                r["ingest_events_per_s"],
                r["end_to_end_events_per_s"],
                r["ingest_events_per_replica_cpu_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["delivery_lag_s"],
                r["missing"],
                r["duplicates"],
                r["non2xx"],
                r["load_average_after"][0],
                "  " + "/".join(str(r["cpu_pct"][k]) for k in cpu),
            ]
            for r in runs
        ],
    )
    print(
        "(ev/CPU-s: ingest events per CPU-second of the replicas; p50/p99: the batch requests' latency, "
        "all wrks together;\n lag: from the end of the load to the last acknowledged event in a sink; "
        "loadavg: 1 min, after the load; CPU% while the load ran, "
        f"100 = one core: the replicas, the wrks, every postgres and redis-server process, the rest "
        f"(the probe, the kernel, other work), the machine (max {NCPU * 100}))"
    )
    print(
        f"relative to {base['replicas']} replica(s) (ideal scaling: the ratio of the counts for "
        "events/s, 1.00x for ev/CPU-s)"
    )
    relative = [
        ("ingest", 9, "ingest_events_per_s"),
        ("e2e", 9, "end_to_end_events_per_s"),
        ("ev/CPU-s", 10, "ingest_events_per_replica_cpu_s"),
        ("p50", 9, "p50_ms"),
        ("p99", 9, "p99_ms"),
        ("lag", 9, "delivery_lag_s"),
        ("missing", 9, "missing"),
        ("dups", 7, "duplicates"),
    ]
    print_table(
        [Column("replicas", 8), *(Column(title, width) for title, width, _ in relative)],
        [[r["replicas"], *(_relative(r[key], base[key]) for _, _, key in relative)] for r in runs],
    )
    for r in runs:
        for note in r.get("log_errors", []):
            print(f"note: {r['replicas']} replica(s): {note}")
        if r.get("first_error"):
            print(f"note: {r['replicas']} replica(s): first non-2xx: {r['first_error']}")
        if r["socket_errors"]:
            print(f"note: {r['replicas']} replica(s): {r['socket_errors']} socket errors/timeouts")

    targets: dict[str, Any] = {}
    at_target = next((r for r in runs if r["replicas"] == TARGET_REPLICAS), None)
    if at_target is None:
        line = "not run"
        targets["end_to_end"] = None
    else:
        ok = at_target["end_to_end_events_per_s"] >= TARGET_EVENTS_PER_S and not at_target["missing"]
        targets["end_to_end"] = ok
        line = (
            f"{'MET' if ok else 'NOT MET'} ({at_target['end_to_end_events_per_s']:,} events/s, "
            f"{at_target['missing']:,} missing; {NCPU} cores)"
        )
    print()
    print(f"target {TARGET_REPLICAS} replicas >= {TARGET_EVENTS_PER_S:,} events/s end to end: {line}")
    targets["withdrawal"] = print_withdrawal(runs)
    return targets


def _probe_problems(w: dict[str, Any], under_load: bool) -> list[str]:
    """What makes a probe's figures void or worth a loud note."""
    problems = []
    if w["void_rounds"]:
        problems.append(
            f"{w['void_rounds']} round(s) VOID: replica B did not accept the subject's event after the "
            f"grant, so its drop could not be told from a grant it never saw; first: {w['void'][0]}"
        )
    if w["rounds"] == 0:
        problems.append("no round measured: the withdrawal figure is VOID")
    if w["never_effective"]:
        problems.append(
            f"{w['never_effective']} withdrawal(s) not effective on B within "
            f"{probe.EFFECT_DEADLINE_S:.0f} s (counted as infinitely slow)"
        )
    if w["events_accepted_after_withdrawal"]:
        problems.append(
            f"replica B accepted {w['events_accepted_after_withdrawal']} event(s) after a "
            "withdrawal's 2xx (the design: none after T, on every replica)"
        )
    if set(w["drop_reasons"]) - {"withdrawn"}:
        problems.append(f"drops for other reasons than withdrawn: {w['drop_reasons']}")
    if w["errors"]:
        problems.append(f"{w['errors']} probe request(s) failed; first: {w['error_samples'][0]}")
    if w.get("failure"):
        problems.append(f"the probe stopped: {w['failure']}")
    if under_load and 0 < w["rounds"] < 100:
        problems.append(f"only {w['rounds']} rounds under load: p99 is (almost) the slowest round")
    return problems


def print_withdrawal(runs: list[dict[str, Any]]) -> bool | None:
    probed = [r for r in runs if "withdrawal" in r or "withdrawal_without_load" in r]
    target = f"withdrawal effective on another replica < {probe.TARGET_P99_MS:.0f} ms at p99"
    if not probed:
        print(f"target {target}: not run (needs a count of 2 replicas or more)")
        return None
    print()
    print(
        "withdrawal through replica A, then events of the subject to replica B until B drops one "
        "(A and B move round the replicas)"
    )
    columns = [
        Column("replicas", 8),
        Column("load", 7),
        Column("rounds", 8),
        Column("void", 6),
        Column("p50 ms", 9),
        Column("p99 ms", 9),
        Column("max ms", 9),
        Column("B accepted after", 18),
        Column("B request ms", 14),
        Column("  reasons", 0, left=True),
    ]
    rows: list[list[object]] = []
    verdicts: list[bool] = []
    loud: list[str] = []
    for r in probed:
        paced = r.get("load_rate") or 0
        for key, label in (
            ("withdrawal_without_load", "none"),
            ("withdrawal", f"{paced:g}/s" if paced else "full"),
        ):
            w = r.get(key)
            if w is None:
                continue
            t = w["to_drop_response_ms"]
            after = f"{w['events_accepted_after_withdrawal']} in {w['rounds_with_accepts_after_withdrawal']}"
            reasons = ",".join(f"{k}:{v}" for k, v in sorted(w["drop_reasons"].items())) or "-"
            latency = w["drop_request_latency_ms_median"]
            rows.append(
                [
                    r["replicas"],
                    label,
                    w["rounds"],
                    w["void_rounds"],
                    _ms(t["p50"]),
                    _ms(t["p99"]),
                    _ms(t["max"]),
                    after,
                    _ms(latency),
                    f"  {reasons}",
                ]
            )
            if key == "withdrawal" and w["target_met"] is not None:
                verdicts.append(bool(w["target_met"]))
            loud += [
                f"{r['replicas']} replicas, {'under' if key == 'withdrawal' else 'without'} load: {m}"
                for m in _probe_problems(w, key == "withdrawal")
            ]
    print_table(columns, rows)
    print(
        "(ms: from the withdrawal's 2xx on A to B's answer that dropped the event; B request ms: how long "
        "that request took on B, median;\n B accepted after: events B accepted after the withdrawal's 2xx, "
        "in how many rounds: 0 means the withdrawal held for the first event B got after the 2xx)"
    )
    bar = "!" * 78
    for message in loud:
        print(f"{bar}\n{message}\n{bar}")
    under_load = [r for r in probed if "withdrawal" in r]
    figures = "; ".join(
        f"{r['replicas']} replicas: p99 {_ms(r['withdrawal']['to_drop_response_ms']['p99'])} ms "
        f"({r['withdrawal']['rounds']} rounds)"
        for r in under_load
    )
    ok = None if not verdicts else all(verdicts)
    if not under_load:
        verdict = "not run under load (--probes 0)"
    elif ok is None:
        verdict = "VOID (no round measured)"
    else:
        verdict = "MET" if ok else "NOT MET"
    print(f"target {target} under load: {verdict} ({figures})")
    return ok


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "never" if v == float("inf") else f"{v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--replicas",
        type=replica_counts,
        default=[1, 2, 4],
        help="replica counts, one run each on fresh state (default 1,2,4)",
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per count")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections per replica")
    parser.add_argument(
        "--probes", type=int, default=200, help="withdrawal probe rounds per count of >= 2 (0: none)"
    )
    parser.add_argument(
        "--probe-workers", type=int, default=8, help="withdrawal probe rounds in flight at once under load"
    )
    parser.add_argument(
        "--idle-probes",
        type=int,
        default=50,
        help="probe rounds before the load, one at a time: the floor without load (0: none)",
    )
    parser.add_argument(
        "--max-extra",
        type=float,
        default=300.0,
        help="seconds the load may go on past --duration while the probe finishes its rounds",
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        default=0,
        help="pace the load at about this many events/s in all (0: as fast as the replicas answer); "
        "the withdrawal probe then runs under a load the replicas can carry",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    if args.load_rate < 0:
        parser.error("--load-rate must be >= 0")
    if shutil.which("wrk") is None:
        sys.exit("bench/distributed.py needs wrk (apt-get install wrk), one per replica")
    if args.duration <= 0 or args.connections < 1 or args.probe_workers < 1:
        parser.error("--duration, --connections and --probe-workers must be positive")
    if args.probes < 0 or args.idle_probes < 0 or args.max_extra < 0:
        parser.error("--probes, --idle-probes and --max-extra must be >= 0")

    # the load's config (bench/ingest.py's: consent enforcement off for the load's tenant,
    # rate limits with room for one loopback address), written once and reused per count
    with tempfile.TemporaryDirectory(prefix="idgate-bench-config-") as tmp_name:
        unenforced, _ = ingest.write_configs(Path(tmp_name))
        load_config = unenforced.read_text(encoding="utf-8")
    print(
        f"bench/distributed.py: replicas {','.join(map(str, args.replicas))}, {NCPU} cores, "
        f"load average {loadavg()}",
        file=sys.stderr,
    )
    runs = [run_count(n, args, load_config) for n in args.replicas]
    targets = print_curve(runs)
    print(f"load average now {loadavg()} ({NCPU} cores)")
    if args.json:
        summary = {
            "cores": NCPU,
            "duration_s": args.duration,
            "connections_per_replica": args.connections,
            "batch_size": ingest.BATCH_SIZE,
            "runs": runs,
            "target_end_to_end_events_per_s": TARGET_EVENTS_PER_S,
            "target_replicas": TARGET_REPLICAS,
            "target_met": targets["end_to_end"],
            "target_withdrawal_p99_ms": probe.TARGET_P99_MS,
            "withdrawal_target_met": targets["withdrawal"],
        }
        print(json.dumps(summary, indent=2))
    missing = [r for r in runs if r["missing"]]
    for r in missing:
        print(
            f"MISSING: {r['replicas']} replica(s): {r['missing']} acknowledged events are not in the sinks",
            file=sys.stderr,
        )
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
