"""Alert latency benchmark: how long after the drop's one-minute window the page arrives.

Issue 15's target: "the alert fires within 15 s of the window in which the drop happened".

One gateway per evaluation interval (``--intervals 15000,2000``: ``IDGATE_ALERT_INTERVAL_MS``,
the old default and the current one), each ``idgate serve`` in embedded mode (in-memory
KPIs, SQLite outbox and alert history) with the default KPIs and one alert rule: the seed's
payment-success-rate drop rule ("falls by 20 %", ``min_volume = 50``) over a one-minute
window (``window = 1``) against the ten minutes before it (``--baseline 10``, the seed's
rule; ``--baseline 0``: against the minute before, which is blind to a step in the middle of
a minute, see below), ``cooldown_seconds = 0``, notifying a
generic webhook: a small HTTP receiver in this script that notes when each notification
arrives. The gateways get the same load side by side, so they see the same drops at the
same moments: every 100 ms a batch of ``--per-tick`` payment requests (40/s by default) and
their successes, exactly 95 % of them, then, at a chosen offset into a minute
(``--offsets``), exactly 70 % until every gateway paged (or the window's end plus
``--timeout``), then 95 % again until every gateway resolved and a full minute at 95 % has
passed, before the next drop.

``--phases`` gateways per interval (3), started an interval / 3 apart: the drops are
minute-aligned and a 15 s round period divides the minute, so one gateway would meet every
drop at the same moment of its cycle, lucky or not; three sample the cycle.

Per drop and gateway the script reports, against W, the end of the KPI minute (bucket) in
which the drop happened:

* ``holds``: when the rule's condition first held on the acknowledged events (the same
  arithmetic replayed on what was sent: the current minute so far against the whole minute
  before); the earliest any evaluator could page. The window includes the open minute, so
  this can be before W;
* ``paged``: when the firing notification reached the receiver, and ``paged - holds``,
  what the evaluation interval adds (one interval at most, plus the round and the POST).

Target: ``paged - W <= 15 s`` for every drop the rule can see. With ``--baseline 0``, a drop
mid-minute that the one-minute comparison cannot see at all (95 % -> 70 % between about 14 s
and 42 s into the minute: neither that minute nor the next falls 20 % below the one before)
is reported as ``blind`` and not counted; the replay tells which. A drop whose condition
held (for a few seconds only, near that band's edges, before the minute turned) but that no
evaluation caught is ``MISSED`` and fails the target. Also printed: each gateway's CPU
(share of one core) idle and under the load, the load average, and what one refresh +
evaluation round costs in process on the example config (the KPIs of every tenant re-read,
the rules evaluated), in memory and, with ``--redis URL``, in Redis.

    .venv/bin/python bench/alert_latency.py [--intervals 15000,2000] [--offsets 5,12,30,50,55]
        [--baseline 10] [--phases 3] [--bucket-ms 60000] [--per-tick 4] [--idle-seconds 10]
        [--redis URL] [--json]

About 3 minutes per drop (the gateways run side by side, so more intervals cost no time).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the repository first: bench/identity.py must not shadow the identity package
sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "bench"))

import ingest  # noqa: E402 - processes: spawn, stop, free ports, CPU seconds
from tables import Column, print_table  # noqa: E402

TARGET_SECONDS = 15.0
WRITE_KEY = "bench-alert-server-key-000000000001"
TICK_SECONDS = 0.1
HIGH, LOW = 0.95, 0.70
THRESHOLD, MIN_VOLUME = 0.2, 50

CONFIG = f"""
[rate_limits]
enabled = false

[[tenants]]
id = "bench"
consent = {{ enforce = false }}

[[tenants.sources]]
id = "bench-server"
platform = "server"
dev_write_key = "{WRITE_KEY}"

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]

# the seed's rule (idgate.example.toml) over a one-minute window, no cooldown between drops
[[tenants.alerts]]
id = "payment-success-drop"
kpi = "payment_success_rate"
window = 1
baseline = @BASELINE@
condition = "drop"
threshold = {THRESHOLD}
min_volume = {MIN_VOLUME}
cooldown_seconds = 0
severity = "critical"
channels = ["bench-webhook"]

[[alert_channels]]
id = "bench-webhook"
kind = "webhook"
url_env = "BENCH_WEBHOOK_URL"
"""


# -- the webhook receiver ---------------------------------------------------------------------
@dataclass
class Received:
    at: float
    gateway: str
    status: str
    value: float | None
    previous: float | None


class Receiver:
    """Every notification POSTed to /<gateway>, with its arrival time."""

    def __init__(self) -> None:
        self.notices: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at = time.time()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                with receiver.lock:
                    receiver.notices.append(
                        Received(at, self.path.strip("/"), body["status"], body["value"], body["previous"])
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((ingest.HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, gateway: str) -> str:
        return f"http://{ingest.HOST}:{self.server.server_address[1]}/{gateway}"

    def first(self, gateway: str, status: str, after: float) -> Received | None:
        with self.lock:
            return next(
                (n for n in self.notices if n.gateway == gateway and n.status == status and n.at >= after),
                None,
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the load --------------------------------------------------------------------------------
@dataclass
class Ack:
    at: float
    requested: int
    succeeded: int


class Load(threading.Thread):
    """Every TICK_SECONDS one batch to each gateway: ``per_tick`` payment requests, and of
    them exactly ``rate`` succeeding on average (a running remainder, no randomness)."""

    def __init__(self, gateways: list[ingest.Server], per_tick: int) -> None:
        super().__init__(daemon=True)
        self.gateways = gateways
        self.per_tick = per_tick
        self.rate = HIGH
        self.acks: dict[str, list[Ack]] = {g.name: [] for g in gateways}
        self.failures = 0
        self.stopping = threading.Event()
        self._owed = 0.0

    def _batch(self) -> tuple[bytes, int]:
        self._owed += self.per_tick * self.rate
        succeeded = min(self.per_tick, int(self._owed))
        self._owed -= succeeded
        batch = []
        for i in range(self.per_tick):
            anon = f"buyer-{uuid.uuid4().hex[:12]}"
            batch.append(
                {
                    "type": "track",
                    "anonymousId": anon,
                    "event": "Payment Requested",
                    "messageId": str(uuid.uuid4()),
                }
            )
            if i < succeeded:
                batch.append(
                    {
                        "type": "track",
                        "anonymousId": anon,
                        "event": "Payment Succeeded",
                        "messageId": str(uuid.uuid4()),
                    }
                )
        return json.dumps({"batch": batch}).encode(), succeeded

    def run(self) -> None:
        auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        conns = {g.name: http.client.HTTPConnection(ingest.HOST, g.port, timeout=10) for g in self.gateways}
        next_tick = time.monotonic()
        while not self.stopping.is_set():
            body, succeeded = self._batch()
            for g in self.gateways:
                try:
                    conn = conns[g.name]
                    conn.request(
                        "POST", "/v1/batch", body, {"Content-Type": "application/json", "Authorization": auth}
                    )
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    self.acks[g.name].append(Ack(time.time(), self.per_tick, succeeded))
                except (OSError, RuntimeError, http.client.HTTPException):
                    self.failures += 1
                    conns[g.name].close()
                    conns[g.name] = http.client.HTTPConnection(ingest.HOST, g.port, timeout=10)
            next_tick += TICK_SECONDS
            self.stopping.wait(max(0.0, next_tick - time.monotonic()))
        for c in conns.values():
            c.close()


class Loads:
    """One Load thread per gateway (a slow answer from one delays no other), one rate."""

    def __init__(self, gateways: list[ingest.Server], per_tick: int) -> None:
        self.threads = [Load([g], per_tick) for g in gateways]
        self.acks = {g.name: t.acks[g.name] for g, t in zip(gateways, self.threads, strict=True)}

    @property
    def rate(self) -> float:
        return self.threads[0].rate

    @rate.setter
    def rate(self, value: float) -> None:
        for t in self.threads:
            t.rate = value

    @property
    def failures(self) -> int:
        return sum(t.failures for t in self.threads)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        for t in self.threads:
            t.stopping.set()
        for t in self.threads:
            t.join(timeout=15)


def condition_span(
    acks: list[Ack], after: float, bucket_s: float, until: float, baseline: int = 0
) -> tuple[float, float, bool] | None:
    """When the rule's condition first held after ``after`` (before ``until``) on the
    acknowledged events, and when it stopped holding (the first acknowledgement at which it
    no longer did, or ``until``): the current bucket so far at least MIN_VOLUME requests and
    its success rate at least THRESHOLD below the whole bucket before's (with ``baseline``:
    the ``baseline`` buckets before's, those that hold events). None: it never did."""
    per_bucket: dict[int, list[int]] = {}
    first = None
    for a in acks:
        if a.at > until:
            break
        b = int(a.at // bucket_s)
        cur = per_bucket.setdefault(b, [0, 0])
        cur[0] += a.requested
        cur[1] += a.succeeded
        if a.at < after:
            continue
        before = [per_bucket.get(b - k) for k in range(1, max(1, baseline) + 1)]
        prev = [sum(x[0] for x in before if x), sum(x[1] for x in before if x)]
        holds = False
        if prev and prev[0] and prev[1] and cur[0] >= MIN_VOLUME:
            holds = (cur[1] / cur[0]) / (prev[1] / prev[0]) - 1 <= -THRESHOLD
        if holds and first is None:
            first = a.at
        elif not holds and first is not None and cur[0] >= MIN_VOLUME:
            return first, a.at, True  # (below the minimum volume the rule keeps its state)
    return None if first is None else (first, until, False)


# -- the runs --------------------------------------------------------------------------------
@dataclass
class Outcome:
    gateway: str
    offset: float
    dropped_at: float
    window_end: float
    holds: float | None = None  # seconds after window_end
    held_for: float | None = None  # how long the condition then held (a page must come within it)
    stopped: bool = False  # it stopped holding by itself (else: the load recovered first)
    paged: float | None = None  # seconds after window_end

    @property
    def blind(self) -> bool:
        return self.holds is None

    @property
    def delay(self) -> float | None:
        return None if self.holds is None or self.paged is None else self.paged - self.holds


@dataclass
class GatewayRun:
    server: ingest.Server
    interval_ms: int
    phase: int = 0
    idle_cpu: float = 0.0
    load_cpu: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)


def wait_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


def next_drop(offset: float, bucket_s: float, calm_since: float) -> float:
    """The first moment ``offset`` into a bucket whose whole previous bucket came after
    ``calm_since`` (at 95 %), at least a second from now."""
    b = int(calm_since // bucket_s) + 2
    while b * bucket_s + offset < time.time() + 1:
        b += 1
    return b * bucket_s + offset


def run_drops(
    runs: list[GatewayRun], load: Loads, receiver: Receiver, args: argparse.Namespace, bucket_s: float
) -> None:
    calm_since = time.time()
    for n, offset in enumerate(args.offsets, 1):
        drop = next_drop(offset, bucket_s, calm_since)
        window_end = (int(drop // bucket_s) + 1) * bucket_s
        print(
            f"drop {n}/{len(args.offsets)}: {offset:g} s into a bucket, in {drop - time.time():.0f} s "
            f"(load average {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        wait_until(drop)
        load.rate = LOW
        deadline = window_end + args.timeout
        while time.time() < deadline:
            if all(receiver.first(r.server.name, "firing", drop) for r in runs):
                break
            time.sleep(0.1)
        recovered = time.time()
        load.rate = HIGH
        for r in runs:
            o = Outcome(r.server.name, offset, drop, window_end)
            span = condition_span(load.acks[r.server.name], drop, bucket_s, recovered, args.baseline)
            if span is not None:
                o.holds, o.held_for, o.stopped = span[0] - window_end, span[1] - span[0], span[2]
            fired = receiver.first(r.server.name, "firing", drop)
            o.paged = None if fired is None else fired.at - window_end
            r.outcomes.append(o)
            print(
                f"  {r.server.name}: condition held {fmt(o.holds)} s after the window (for "
                f"{held(o)} s), paged {fmt(o.paged)} s",
                flush=True,
            )
        # back to normal: every gateway that paged resolves before the next drop
        deadline = recovered + 2 * bucket_s + args.timeout
        while time.time() < deadline:
            if all(
                receiver.first(r.server.name, "resolved", drop)
                or not receiver.first(r.server.name, "firing", drop)
                for r in runs
            ):
                break
            time.sleep(0.2)
        calm_since = recovered


def fmt(v: float | None, spec: str = "+.1f") -> str:
    return "-" if v is None else format(v, spec)


def held(o: Outcome) -> str:
    """How long the condition held; ">=": until the load recovered (after the pages)."""
    return "-" if o.held_for is None else f"{'' if o.stopped else '>='}{o.held_for:.1f}"


# -- evaluation cost in process ----------------------------------------------------------------
async def evaluation_cost(redis_url: str | None, rounds: int = 30) -> dict[str, Any]:
    """One Monitoring.refresh() (every tenant's KPI report over 1/5/10/60 buckets, the rules
    evaluated) on the example config, after a few thousand events: milliseconds per round."""
    import random

    from export.kpis import KpiEvent
    from gateway.config import load_config
    from gateway.monitoring import build_monitoring

    config = load_config(ingest.CONFIG, dev=True)
    client = None
    prefix = f"bench-alerts-{uuid.uuid4().hex[:8]}"
    if redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url)
    monitoring = build_monitoring(
        config, client, prefix=prefix, bucket_seconds=60.0, interval_seconds=1.0, replica="bench"
    )
    rng = random.Random(5)
    names = ["Payment Requested", "Payment Succeeded", "Product Viewed", "Product Added", "Order Completed"]
    everything = frozenset(p for t in config.tenants for p in t.all_purposes())
    for t in config.tenants:
        for s in t.sources:
            events = [
                KpiEvent(rng.choice(names), None, {"revenue": 10.0}, everything, f"p-{rng.randrange(500)}")
                for _ in range(500)
            ]
            await monitoring.engine.observe(t.id, s.id, events)
    if monitoring.buffer is not None:
        await monitoring.buffer.flush()
    await monitoring.refresh()  # warm
    start = time.perf_counter()
    cpu = time.process_time()
    for _ in range(rounds):
        await monitoring.refresh()
    wall = (time.perf_counter() - start) / rounds
    cpu_per_round = (time.process_time() - cpu) / rounds
    if client is not None:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return {
        "store": "redis" if redis_url else "memory",
        "tenants": len(config.tenants),
        "kpis": sum(len(t.all_kpis()) for t in config.tenants),
        "rules": sum(len(t.alerts) for t in config.tenants),
        "ms_per_round": wall * 1000,
        "cpu_ms_per_round": cpu_per_round * 1000,
    }


# -- report ----------------------------------------------------------------------------------
def summarise(interval_ms: int, runs: list[GatewayRun]) -> dict[str, Any]:
    """The drops of every gateway (phase) of one interval."""
    outcomes = [o for r in runs for o in r.outcomes]
    seen = [o for o in outcomes if not o.blind]
    paged = [o.paged for o in seen if o.paged is not None]
    delays = [o.delay for o in seen if o.delay is not None]
    missed = [o for o in seen if o.paged is None]
    met = bool(seen) and not missed and max(paged) <= TARGET_SECONDS
    return {
        "interval_ms": interval_ms,
        "gateways": len(runs),
        "drops": [
            {
                "gateway": o.gateway,
                "offset_s": o.offset,
                "holds_s": o.holds,
                "held_for_s": o.held_for,
                "stopped_holding": o.stopped,
                "paged_s": o.paged,
                "delay_s": o.delay,
            }
            for o in outcomes
        ],
        "blind": sum(o.blind for o in outcomes),
        "missed": len(missed),
        "paged_max_s": max(paged) if paged else None,
        "paged_p50_s": statistics.median(paged) if paged else None,
        "delay_max_s": max(delays) if delays else None,
        "delay_p50_s": statistics.median(delays) if delays else None,
        "idle_cpu_pct": statistics.mean(r.idle_cpu for r in runs),
        "load_cpu_pct": statistics.mean(r.load_cpu for r in runs),
        "target_met": met,
    }


def report(
    runs: list[GatewayRun], costs: list[dict[str, Any]], args: argparse.Namespace, loads: list[float]
) -> dict[str, Any]:
    against = f"the {args.baseline} buckets before" if args.baseline else "the bucket before"
    print()
    print(
        f"Alert latency: rule payment-success-drop (window 1 bucket of {args.bucket_ms / 1000:g} s, "
        f"drop {THRESHOLD:.0%} vs {against}, "
        f"min_volume {MIN_VOLUME}), "
        f"{args.per_tick / TICK_SECONDS:g} payment requests/s, {HIGH:.0%} -> {LOW:.0%}; "
        f"load average {min(loads):.2f}-{max(loads):.2f} on {ingest.NCPU} CPUs"
    )
    print("Seconds after W, the end of the bucket in which the drop happened (negative: before it ended):")
    rows = []
    for r in sorted(runs, key=lambda r: (-r.interval_ms, r.phase)):
        for o in r.outcomes:
            rows.append(
                [
                    f"{r.interval_ms / 1000:g} s #{r.phase}",
                    o.offset,
                    "blind" if o.blind else fmt(o.holds),
                    held(o),
                    "blind" if o.blind else fmt(o.paged) if o.paged is not None else "MISSED",
                    fmt(o.delay, ".2f"),
                ]
            )
    print_table(
        [
            Column("interval", 12, left=True),
            Column("offset s", 9, "g"),
            Column("holds", 8),
            Column("held for", 9),
            Column("paged", 8),
            Column("paged-holds", 12),
        ],
        rows,
    )
    intervals = sorted({r.interval_ms for r in runs}, reverse=True)
    out = {
        "runs": [summarise(ms, [r for r in runs if r.interval_ms == ms]) for ms in intervals],
        "evaluation_cost": costs,
        "loadavg": loads,
    }
    print()
    print_table(
        [
            Column("interval", 10, left=True),
            Column("paged max", 10),
            Column("p50", 7),
            Column("paged-holds max", 16),
            Column("p50", 7),
            Column("CPU idle %", 11),
            Column("CPU load %", 11),
            Column("drops", 6),
            Column("target", 9),
        ],
        [
            [
                f"{s['interval_ms'] / 1000:g} s",
                fmt(s["paged_max_s"]),
                fmt(s["paged_p50_s"]),
                fmt(s["delay_max_s"], ".2f"),
                fmt(s["delay_p50_s"], ".2f"),
                f"{s['idle_cpu_pct']:.2f}",
                f"{s['load_cpu_pct']:.2f}",
                len(s["drops"]) - s["blind"],
                "MET" if s["target_met"] else "NOT MET",
            ]
            for s in out["runs"]
        ],
    )
    for s in out["runs"]:
        if s["blind"]:
            print(
                f"note ({s['interval_ms'] / 1000:g} s): {s['blind']} drop(s) the one-bucket rule cannot see "
                "(the condition never held on the events sent): not counted, see the README"
            )
        if s["missed"]:
            print(f"WARNING ({s['interval_ms'] / 1000:g} s): {s['missed']} drop(s) held but never paged")
    print(f"target: paged <= {TARGET_SECONDS:g} s after the drop's window, every drop the rule can see")
    for c in costs:
        print(
            f"one refresh + evaluation round in process ({c['store']}, example config: {c['tenants']} "
            f"tenant(s), {c['kpis']} KPIs, {c['rules']} rules): {c['ms_per_round']:.2f} ms "
            f"({c['cpu_ms_per_round']:.2f} ms CPU): {c['cpu_ms_per_round'] / 10:.2f} % of a core at 1 s, "
            f"{c['cpu_ms_per_round'] / 50:.2f} % at 5 s, {c['cpu_ms_per_round'] / 150:.3f} % at 15 s"
        )
    if load_failures := getattr(args, "load_failures", 0):
        print(f"WARNING: {load_failures} batch request(s) failed")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--intervals", default="15000,2000", help="IDGATE_ALERT_INTERVAL_MS values, one gateway each"
    )
    p.add_argument(
        "--offsets", default="5,12,30,50,55", help="seconds into a bucket at which each drop starts"
    )
    p.add_argument(
        "--baseline",
        type=int,
        default=10,
        help="the rule's baseline in buckets (0: the bucket before; 10: the seed rule's ten before)",
    )
    p.add_argument("--phases", type=int, default=3, help="gateways per interval, started interval/N apart")
    p.add_argument("--bucket-ms", type=int, default=60_000, help="IDGATE_KPI_BUCKET_MS")
    p.add_argument("--per-tick", type=int, default=4, help="payment requests per 100 ms")
    p.add_argument("--timeout", type=float, default=45.0, help="after the window's end, a drop gives up")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL"), help="also time a round in Redis")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the gateways' data and logs")
    args = p.parse_args(argv)
    args.intervals = [int(v) for v in args.intervals.split(",")]
    args.offsets = [float(v) for v in args.offsets.split(",")]
    bucket_s = args.bucket_ms / 1000
    if any(not 0 <= o < bucket_s for o in args.offsets):
        p.error("every offset must be within a bucket")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, ingest._on_sigterm)
    bucket_s = args.bucket_ms / 1000
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-alerts-"))
    receiver = Receiver()
    load: Loads | None = None
    try:
        costs = [asyncio.run(evaluation_cost(None))]
        if args.redis:
            costs.append(asyncio.run(evaluation_cost(args.redis)))
        config = tmp / "idgate.toml"
        config.write_text(CONFIG.replace("@BASELINE@", str(args.baseline)))
        runs = []
        # --phases gateways per interval, started interval/phases apart: the evaluation
        # rounds of each fall at another moment of the minute, so the drops (minute-aligned)
        # meet the rounds at different phases
        starts = sorted(
            (ms * k / args.phases / 1000, ms, k) for ms in args.intervals for k in range(args.phases)
        )
        t0 = time.monotonic()
        for delay, ms, k in starts:
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            name = f"interval-{ms}ms-{k}"
            env = {
                "IDGATE_ALERT_INTERVAL_MS": str(ms),
                "IDGATE_KPI_BUCKET_MS": str(args.bucket_ms),
                "BENCH_WEBHOOK_URL": receiver.url(name),
            }
            runs.append(GatewayRun(ingest.start_gateway(tmp, config, name=name, extra_env=env), ms, k))
        for r in runs:
            r.server.wait_healthy()
        loads = [os.getloadavg()[0]]
        cpu0 = {r.server.name: ingest.proc_cpu_seconds(r.server.proc.pid) for r in runs}
        time.sleep(args.idle_seconds)
        for r in runs:
            used = ingest.proc_cpu_seconds(r.server.proc.pid) - cpu0[r.server.name]
            r.idle_cpu = used / args.idle_seconds * 100
        load = Loads([r.server for r in runs], args.per_tick)
        started = time.time()
        cpu0 = {r.server.name: ingest.proc_cpu_seconds(r.server.proc.pid) for r in runs}
        load.start()
        run_drops(runs, load, receiver, args, bucket_s)
        elapsed = time.time() - started
        for r in runs:
            r.load_cpu = (ingest.proc_cpu_seconds(r.server.proc.pid) - cpu0[r.server.name]) / elapsed * 100
        loads.append(os.getloadavg()[0])
        args.load_failures = load.failures
        out = report(runs, costs, args, loads)
        for r in runs:
            bad = [
                line
                for line in r.server.log_path.read_text(errors="replace").splitlines()
                if '"level":"error"' in line or '"level":"critical"' in line
            ]
            if bad:
                print(f"WARNING: {r.server.name} logged {len(bad)} error line(s), first: {bad[0][:300]}")
        if args.json:
            print(json.dumps(out, separators=(",", ":")))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if load is not None:
            load.stop()
        for proc in list(reversed(ingest._children)):
            ingest.stop(proc)
        receiver.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
