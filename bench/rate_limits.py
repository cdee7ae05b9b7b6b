"""Rate-limit benchmark: what the limiter costs per request, and that a flood from one source
does not slow another source's events.

1. **Cost**: ``RateLimiter.check_request`` (four counters: source and client network,
   requests and events) called N times in a row, on the memory store (embedded mode) and
   on Redis (one Lua script per request, distributed mode): microseconds per request.
2. **Isolation**: one ``idgate serve`` (embedded, dev) with two sources of one tenant,
   ``flood-web`` and ``quiet-app``, behind a pretend proxy (``forwarded_hops = 1``: the
   client networks come from ``X-Forwarded-For``). The quiet source sends batches of 10
   events at a steady rate from its network; the flood source sends batches of 100 as fast
   as ``--flood-connections`` connections can from another. Five phases: quiet alone;
   quiet beside a process that only burns the CPU the flood's client would (no request:
   what the load generator's own CPU costs the gateway on this machine); quiet beside the
   flood source sending only its allowed share (its ``source_events_per_second``, 2,000,
   as 20 batches of 100 a second, evenly: the work the limits let any flood make); quiet +
   flood with the limits on; quiet + flood with ``enabled = false`` (what the flood does
   without them). What the flood itself costs the quiet source is its latency under the
   flood against its latency beside the allowed share. Printed: the quiet source's
   p50/p99/max latency and errors, the flood's answers (2xx, 429) and accepted events/s,
   and the gateway's durable outbox commits in the phase (``idgate_outbox_commit_seconds``:
   how many, their mean, and how many took over 25 ms): every acknowledged request, the
   quiet source's too, waits for one.

    .venv/bin/python bench/rate_limits.py [--seconds 10] [--quiet-rate 50] [--flood-connections 8]
                                          [--calls 20000] [--json]

The flood's client runs in a process of its own and the quiet client in this one, beside
the gateway, on the same machine: on two cores they compete with it for CPU, so compare
the phases with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx  # noqa: E402

from gateway.config import RateLimits  # noqa: E402
from gateway.rate_limits import MemoryCounters, RateLimiter, RedisCounters  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("IDGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
FLOOD_KEY, QUIET_KEY = "flood-key-0001", "quiet-key-0001"
SOURCE_EVENTS_PER_SECOND = 2000  # the flood source's limit; its allowed share

CONFIG = """
[rate_limits]
enabled = {enabled}
forwarded_hops = 1
source_requests_per_second = 200
source_events_per_second = {source_events}
ip_requests_per_second = 100
ip_events_per_second = 2000

[[tenants]]
id = "acme"
consent = {{ enforce = false }}

[[tenants.sources]]
id = "flood-web"
platform = "web"
dev_write_key = "{flood}"

[[tenants.sources]]
id = "quiet-app"
platform = "app"
dev_write_key = "{quiet}"

[tenants.tracking_plan]
"*" = ["analytics"]

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]
"""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- 1. cost -------------------------------------------------------------------------------------
async def limiter_cost(calls: int) -> dict[str, float]:
    import redis.asyncio as aioredis

    limits = RateLimits(
        source_requests_per_second=10**9,
        source_events_per_second=10**9,
        ip_requests_per_second=10**9,
        ip_events_per_second=10**9,
    )
    out: dict[str, float] = {}
    client = aioredis.from_url(REDIS_URL)
    prefix = f"idgate-bench-rl-{uuid.uuid4().hex[:8]}"
    try:
        for name, store in (("memory", MemoryCounters()), ("redis", RedisCounters(client, prefix))):
            limiter = RateLimiter(limits, store)
            for _ in range(200):  # warm up (script load, connection)
                await limiter.check_request("acme", "web", "203.0.113.0", 1)
            start = time.perf_counter()
            for i in range(calls):
                await limiter.check_request("acme", "web", f"203.0.{i % 250}.0", 10)
            out[name] = (time.perf_counter() - start) / calls * 1e6
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return out


# -- 2. isolation --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(tmp: Path, enabled: bool) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / f"idgate-{enabled}.toml"
    config.write_text(
        CONFIG.format(
            enabled=str(enabled).lower(),
            flood=FLOOD_KEY,
            quiet=QUIET_KEY,
            source_events=SOURCE_EVENTS_PER_SECOND,
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_") and k != "REDIS_URL"}
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", IDGATE_LOG_FORMAT="json")
    log = open(tmp / f"gateway-{enabled}.log", "wb")  # noqa: SIM115 - owned by the process
    idgate = Path(sys.executable).with_name("idgate")
    argv = [str(idgate), "serve", "--config", str(config), "--port", str(port)]
    argv += ["--data-dir", str(tmp / f"data-{enabled}")]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the gateway exited: {(tmp / f'gateway-{enabled}.log').read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit("the gateway did not become ready")


def batch(n: int) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "anonymousId": f"anonymous-device-{i % 50:04d}",
                "event": "Viewed",
                "messageId": uuid.uuid4().hex,
            }
            for i in range(n)
        ]
    }


async def at_rate(seconds: float, rate: float) -> AsyncIterator[None]:
    """Yields ``rate`` times a second, evenly, for ``seconds``."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        due = start + n / rate
        if due > now:
            await asyncio.sleep(due - now)
        n += 1
        yield


def count(r: httpx.Response, counts: dict[str, int]) -> None:
    """One answer to the flood source: accepted (with its events), limited, or other."""
    if r.status_code == 200:
        counts["ok"] += 1
        counts["events"] += r.json().get("accepted", 0)
    else:
        counts["limited" if r.status_code == 429 else "other"] += 1


async def quiet_client(url: str, seconds: float, rate: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    headers = {"X-Forwarded-For": "198.51.100.10"}
    async with httpx.AsyncClient(base_url=url, auth=(QUIET_KEY, ""), timeout=30) as client:
        async for _ in at_rate(seconds, rate):
            t0 = time.perf_counter()
            r = await client.post("/v1/batch", json=batch(10), headers=headers)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors += 1
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }


async def flood_client(url: str, seconds: float, connections: int) -> dict[str, Any]:
    counts = {"ok": 0, "limited": 0, "other": 0, "events": 0}
    body = json.dumps(batch(100)).encode()  # the same ids each time: the work is the decode and checks

    async def one(i: int) -> None:
        headers = {"X-Forwarded-For": f"203.0.113.{i + 1}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=url, auth=(FLOOD_KEY, ""), timeout=30) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                fresh = body.replace(b'"messageId": "', f'"messageId": "{uuid.uuid4().hex[:6]}'.encode())
                count(await client.post("/v1/batch", content=fresh, headers=headers), counts)

    await asyncio.gather(*(one(i) for i in range(connections)))
    return {**counts, "accepted_events_per_s": counts["events"] / seconds}


async def polite_client(url: str, seconds: float, rate: float) -> dict[str, Any]:
    """The flood source sending only what its limit admits: batches of 100 at ``rate`` a
    second, evenly (one connection, from the flood's first network)."""
    counts = {"ok": 0, "limited": 0, "other": 0, "events": 0}
    body = json.dumps(batch(100)).encode()
    headers = {"X-Forwarded-For": "203.0.113.1", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, auth=(FLOOD_KEY, ""), timeout=30) as client:
        async for _ in at_rate(seconds, rate):
            fresh = body.replace(b'"messageId": "', f'"messageId": "{uuid.uuid4().hex[:6]}'.encode())
            count(await client.post("/v1/batch", content=fresh, headers=headers), counts)
    return {**counts, "accepted_events_per_s": counts["events"] / seconds}


def run_polite(url: str, seconds: float, rate: float, out: Any) -> None:
    out.put(asyncio.run(polite_client(url, seconds, rate)))


def burn(seconds: float, out: Any) -> None:
    """The control: a process as busy as the flood's client, sending nothing."""
    end = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < end:
        spins += 1
    out.put(None)


def run_flood(url: str, seconds: float, connections: int, out: Any) -> None:
    """In a process of its own, so the flood's client work does not delay the quiet
    client's event loop (its latencies would then measure this script, not the gateway)."""
    out.put(asyncio.run(flood_client(url, seconds, connections)))


def commits(url: str) -> tuple[float, float, float]:
    """The gateway's outbox commits so far: (count, seconds in all, count over 25 ms)."""
    from prometheus_client.parser import text_string_to_metric_families

    count = total = fast = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name != "idgate_outbox_commit_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket") and sample.labels.get("le") == "0.025":
                fast = sample.value
    return count, total, count - fast


def phase(url: str, args: argparse.Namespace, flood: bool | str | None) -> dict[str, Any]:
    """``flood``: True, the flood; "share", the flood source sending only its allowed share;
    None, the CPU burner instead; False, the quiet source alone."""
    import multiprocessing

    flooder = None
    if flood is not False:
        results: Any = multiprocessing.get_context("spawn").Queue()
        share = SOURCE_EVENTS_PER_SECOND / 100  # batches of 100 a second
        work: tuple[Any, tuple[Any, ...]] = (
            (run_flood, (url, args.seconds + 1, args.flood_connections, results))
            if flood is True
            else (run_polite, (url, args.seconds + 1, share, results))
            if flood == "share"
            else (burn, (args.seconds + 1, results))
        )
        flooder = multiprocessing.get_context("spawn").Process(target=work[0], args=work[1])
        flooder.start()
        time.sleep(1)  # the flood is under way when the quiet source starts
    before = commits(url)
    quiet = asyncio.run(quiet_client(url, args.seconds, args.quiet_rate))
    after = commits(url)
    flooded = None
    if flooder is not None:
        flooded = results.get(timeout=120)
        flooder.join()
    n, seconds, slow = (a - b for a, b in zip(after, before, strict=True))
    outbox = {"commits": n, "mean_ms": seconds / n * 1000 if n else 0.0, "over_25ms": slow}
    return {"quiet": quiet, "flood": flooded, "commits": outbox}


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--quiet-rate", type=float, default=50.0, help="quiet source requests per second")
    parser.add_argument("--flood-connections", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20_000, help="limiter calls for the cost figures")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cost = asyncio.run(limiter_cost(args.calls))
    print(f"limiter cost per request (4 counters), {args.calls:,} calls in a row:")
    for name, us in cost.items():
        print(f"  {name:<7} {us:8.1f} us")

    results: dict[str, Any] = {"cost_us": cost}
    with tempfile.TemporaryDirectory(prefix="idgate-bench-rl-") as tmp_name:
        tmp = Path(tmp_name)
        kinds_by_limits: tuple[tuple[bool, tuple[bool | str | None, ...]], ...] = (
            (True, (False, None, "share", True)),
            (False, (True,)),
        )
        names = {
            False: "quiet alone",
            None: "quiet + CPU burner",
            "share": "quiet + allowed share",
            True: "quiet + flood",
        }
        for enabled, kinds in kinds_by_limits:
            proc, url = start_gateway(tmp, enabled)
            try:
                for flood in kinds:
                    name = names[flood] + (" (limits on)" if enabled else " (limits off)")
                    print(f"running {name} for {args.seconds:g} s ...", flush=True)
                    results[name] = phase(url, args, flood)
            finally:
                stop(proc)

    print()
    print(
        f"quiet source: {args.quiet_rate:g} req/s of 10 events; "
        f"flood: {args.flood_connections} connections of 100-event batches"
    )
    columns = (
        "quiet p50",
        "quiet p99",
        "quiet max",
        "q.errors",
        "flood 2xx",
        "flood 429",
        "flood ev/s",
        "commits",
        "commit ms",
        "> 25 ms",
    )
    print(f"{'phase':<34} " + " ".join(f"{c:>10}" for c in columns))
    for name, r in results.items():
        if name == "cost_us":
            continue
        q, f, c = r["quiet"], r["flood"] or {}, r["commits"]
        print(
            f"{name:<34} {q['p50_ms']:>8.1f}ms {q['p99_ms']:>8.1f}ms {q['max_ms']:>8.1f}ms {q['errors']:>10} "
            f"{f.get('ok', '-'):>10} {f.get('limited', '-'):>10} {f.get('accepted_events_per_s', 0):>11,.0f}"
            f" {c['commits']:>10,.0f} {c['mean_ms']:>8.1f}ms {c['over_25ms']:>10,.0f}"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
