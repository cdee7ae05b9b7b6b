"""Front-end benchmark: what the HTTP limits of ``idgate serve`` cost, side by side.

Runs the same gateway (embedded mode, the example config with consent enforcement off for
``acme``, as bench/ingest.py's "gateway" phases) under several HTTP front ends, one at a time,
with the same load:

* ``old``: the server config before the limits (uvicorn, uvloop + httptools, no header-size
  limit, no header or body timeout, no connection cap), started by this script;
* ``new``: ``idgate serve`` itself (gateway/front_end.py: httptools with header size and
  count, request line, header and body timeouts, idle keep-alive and a connection cap);
* ``h11`` (``--variants old,new,h11``): uvicorn's h11 parser with its own limits
  (``h11_max_incomplete_event_size``, ``limit_concurrency``, ``timeout_keep_alive``), the
  other way to bound headers, which has no header or body timeout.

Each variant gets single events on ``/v1/track`` and batches of 100 on ``/v1/batch``, in
``--rounds`` rounds that alternate the variants (so a noisy neighbour hits them alike); the
report gives the median events/s per variant and kind, the p99 latency, and new/old.
Target: ``new`` loses at most 5 % of ``old``'s events/s, for single events and for batches.
The load generator is bench/ingest.py's (``wrk`` when on PATH, else its Python client).

``--attack`` measures instead what slow clients do to a normal one, per variant: a client
that posts single events one after another, each on a new connection, gives its p50/p99
alone, then while tests/gateway/slow_clients.py holds 2,000 slowloris connections, 20 slow
bodies and (``--bombs``) connections streaming a header without end; with the server's
memory (RSS) before and after. Target: ``new``'s p99 under attack within 100 ms of alone.

    .venv/bin/python bench/front_end.py [--duration 8] [--rounds 3] [--connections 32]
                                        [--variants old,new] [--json]
    .venv/bin/python bench/front_end.py --attack [--requests 500] [--bombs 1]
    .venv/bin/python bench/front_end.py --protocol [--requests 200000]

``--protocol`` isolates what the limits add per request, in process, without sockets or the
gateway: a keep-alive connection's protocol object is fed one typical SDK request after
another (a /v1/track POST with nine headers) answered by a trivial ASGI app, under
uvicorn's httptools protocol and under idgate's; it prints microseconds per request of
each, alternating five times, and the difference.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ingest  # bench/ingest.py: servers, load generators, delivery check
from ingest import HOST, PhaseResult, Server, SinkCounter, spawn, stop

TARGET_RATIO = 0.95
VARIANTS = ("old", "new", "h11")
SLOW_CLIENTS = ingest.REPO / "tests" / "gateway" / "slow_clients.py"
TARGET_ATTACK_P99_MS = 100.0


def serve_variant(variant: str, config: Path, port: int, data_dir: Path) -> None:
    """Run the gateway the way ``variant`` serves it (in this process, until SIGTERM)."""
    # bench/identity.py would shadow the identity package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import uvicorn

    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.settings import LogSettings, Settings

    logs = LogSettings.from_env()
    configure_logging(fmt=logs.format, level=logs.level)
    os.umask(0o077)
    settings = Settings.from_env(config_path=config, data_dir=data_dir)
    app = create_app(settings)
    if settings.gil_switch_interval_seconds > 0:
        sys.setswitchinterval(settings.gil_switch_interval_seconds)
    common: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "loop": "uvloop",
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    if variant == "old":  # idgate serve before gateway/front_end.py
        config_ = uvicorn.Config(app, http="httptools", **common)
    elif variant == "h11":
        limits = settings.http
        config_ = uvicorn.Config(
            app,
            http="h11",
            h11_max_incomplete_event_size=limits.max_header_bytes,
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=limits.keep_alive_seconds,
            **common,
        )
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    uvicorn.Server(config_).run()


def start_variant(variant: str, tmp: Path, config: Path) -> Server:
    if variant == "new":
        return ingest.start_gateway(tmp, config, name="new")
    port = ingest.free_port()
    data_dir = tmp / f"{variant}-data"
    env = {k: v for k, v in os.environ.items() if k not in ingest.STRIPPED_ENV}
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", IDGATE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ingest.REPO), env.get("PYTHONPATH", "")) if p)
    log_path = tmp / f"{variant}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", variant, "--config", str(config)]
    argv += ["--port", str(port), "--data-dir", str(data_dir)]
    with open(log_path, "wb") as log:
        proc = spawn(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    return Server(variant, proc, port, log_path, data_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="HTTP front ends of idgate serve, side by side")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per phase (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the variants (default 3)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    p.add_argument("--variants", default="old,new", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--kinds", default="single,batch", help="single, batch or both (default both)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dirs and logs")
    p.add_argument("--attack", action="store_true", help="a normal client's latency under slow clients")
    p.add_argument("--protocol", action="store_true", help="the protocol's cost per request, in process")
    p.add_argument("--requests", type=int, default=500, help="--attack: requests per measurement")
    p.add_argument("--slowloris", type=int, default=2000, help="--attack: slowloris connections")
    p.add_argument("--bombs", type=int, default=1, help="--attack: header-bomb connections")
    # internal: run one server variant (started by this script)
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.kind_list = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not set(args.variant_list) <= set(VARIANTS) or not set(args.kind_list) <= {"single", "batch"}:
        p.error("unknown variant or kind")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_variant(args.serve, args.config, args.port, args.data_dir)
        return 0
    if args.attack:
        return run_attack(args)
    if args.protocol:
        return run_protocol(args.requests if args.requests != 500 else 200_000)
    load_args = ingest.parse_args(
        ["--duration", str(args.duration), "--connections", str(args.connections), "--loadgen", args.loadgen]
    )
    signal.signal(signal.SIGTERM, ingest._on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-front-end-"))
    results: dict[tuple[str, str], list[PhaseResult]] = {}
    warnings: list[str] = []
    try:
        config, _ = ingest.write_configs(tmp)
        servers = {v: start_variant(v, tmp, config) for v in args.variant_list}
        counters = {}
        for variant, server in servers.items():
            server.wait_healthy()
            counters[variant] = SinkCounter(server.sink_dir)
            ingest.preflight_gateway(server, counters[variant])
        for round_no in range(args.rounds):
            order = args.variant_list if round_no % 2 == 0 else list(reversed(args.variant_list))
            for kind in args.kind_list:
                for variant in order:
                    res = ingest.new_result(f"{variant} {kind} r{round_no + 1}", variant, kind, load_args)
                    ingest.gateway_phase(servers[variant], counters[variant], res, load_args, tmp)
                    ingest.check_forwarded(res, warnings, enforced=False)
                    results.setdefault((variant, kind), []).append(res)
        for server in servers.values():
            stop(server.proc)
        return report(args, load_args, results, warnings)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in list(reversed(ingest._children)):
            stop(proc)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- the protocol alone -------------------------------------------------------------------------
def run_protocol(n: int) -> int:
    here = Path(__file__).resolve().parent  # bench/identity.py would shadow the identity package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import asyncio

    import uvloop
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from gateway.front_end import protocol_class
    from gateway.settings import HttpLimits

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    body = json.dumps({"userId": "u-1", "event": "Product Viewed", "messageId": "m-" + "0" * 36}).encode()
    request = (
        b"POST /v1/track HTTP/1.1\r\nHost: idgate.example.com\r\n"
        b"Authorization: Basic YWNtZS13ZWItZGVtby1rZXk6\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nUser-Agent: analytics-python/2.3.3\r\nAccept: */*\r\n"
        b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nX-Request-ID: 42\r\n\r\n" % len(body)
    ) + body

    async def per_request_us(cls: type[asyncio.Protocol]) -> float:
        config = Config(app, lifespan="off", log_config=None, access_log=False, proxy_headers=False)
        config.load()
        proto: Any = cls(config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
        proto.connection_made(Transport())
        for _ in range(1000):  # warm up
            proto.data_received(request)
            await asyncio.sleep(0)
        started = time.perf_counter()
        for _ in range(n):
            proto.data_received(request)
            await asyncio.sleep(0)  # the request's task runs to its end
        return (time.perf_counter() - started) / n * 1e6

    guarded = protocol_class(HttpLimits())
    plain: list[float] = []
    ours: list[float] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for _ in range(5):
            plain.append(runner.run(per_request_us(HttpToolsProtocol)))
            ours.append(runner.run(per_request_us(guarded)))
    p, o = statistics.median(plain), statistics.median(ours)
    print(
        f"per request, {n:,} requests x 5 (median): uvicorn httptools {p:.2f} us, idgate front end {o:.2f} us"
    )
    print(f"  runs httptools: {', '.join(f'{v:.2f}' for v in plain)}")
    print(f"  runs idgate:    {', '.join(f'{v:.2f}' for v in ours)}")
    print(f"  the limits add {o - p:+.2f} us per request ({(o - p) / p:+.1%} of the protocol's own work)")
    return 0


# -- slow clients against a normal one ---------------------------------------------------------
def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def normal_client(port: int, n: int, budget_s: float = 90.0) -> tuple[list[float], int]:
    """``n`` single events one after another, each on a new connection: (latencies of the
    answered ones in seconds, failures). What ``budget_s`` leaves unsent counts as failed."""
    latencies, failures = [], 0
    deadline = time.monotonic() + budget_s
    for sent in range(n):
        if time.monotonic() > deadline:
            failures += n - sent
            break
        body = json.dumps({"userId": "u-normal", "event": "Product Viewed", "messageId": uuid.uuid4().hex})
        started = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            headers = {"Content-Type": "application/json", "Authorization": ingest.AUTH}
            conn.request("POST", "/v1/track", body, headers)
            ok = conn.getresponse().status == 200
        except OSError:
            ok = False
        finally:
            conn.close()
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
    return latencies, failures


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run_attack(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-front-end-"))
    rows: dict[str, dict[str, Any]] = {}
    try:
        config, _ = ingest.write_configs(tmp)
        for variant in args.variant_list:
            server = start_variant(variant, tmp, config)
            server.wait_healthy()
            normal_client(server.port, 50)  # warm up
            rss0 = rss_mb(server.proc.pid)
            alone, failed_alone = normal_client(server.port, args.requests)
            print(f"{variant}: attacking ...", file=sys.stderr)
            attack = spawn(
                [
                    sys.executable,
                    str(SLOW_CLIENTS),
                    "--port",
                    str(server.port),
                    "--slowloris",
                    str(args.slowloris),
                    "--slow-bodies",
                    "20",
                    "--bombs",
                    str(args.bombs),
                    "--duration",
                    "600",
                    "--write-key",
                    ingest.WRITE_KEY,
                ],
                stdout=subprocess.PIPE,
            )
            assert attack.stdout is not None
            attack.stdout.readline()  # {"ready": n}
            under, failed_under = normal_client(server.port, args.requests)
            rss1 = rss_mb(server.proc.pid)
            stop(attack)
            stop(server.proc)
            rows[variant] = {
                "alone_p50_ms": round(pct(alone, 0.50), 2),
                "alone_p99_ms": round(pct(alone, 0.99), 2),
                "attack_p50_ms": round(pct(under, 0.50), 2),
                "attack_p99_ms": round(pct(under, 0.99), 2),
                "failed_alone": failed_alone,
                "failed_under_attack": failed_under,
                "rss_mb_before": round(rss0, 1),
                "rss_mb_under_attack": round(rss1, 1),
            }
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in list(reversed(ingest._children)):
            stop(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"a normal client ({args.requests} single events, one connection each) alone and under "
        f"{args.slowloris:,} slowloris + 20 slow bodies + {args.bombs} header bomb(s), {ingest.NCPU} CPUs"
    )
    print(
        f"{'variant':<8}{'alone p50':>11}{'alone p99':>11}{'attack p50':>12}{'attack p99':>12}"
        f"{'failed':>8}{'RSS MB':>16}"
    )
    met = None
    for variant, r in rows.items():
        print(
            f"{variant:<8}{r['alone_p50_ms']:>11.1f}{r['alone_p99_ms']:>11.1f}{r['attack_p50_ms']:>12.1f}"
            f"{r['attack_p99_ms']:>12.1f}{r['failed_under_attack']:>8}"
            f"{r['rss_mb_before']:>8.0f}->{r['rss_mb_under_attack']:.0f}"
        )
        if variant == "new":
            met = (
                r["failed_under_attack"] == 0
                and r["attack_p99_ms"] - r["alone_p99_ms"] <= TARGET_ATTACK_P99_MS
            )
    if met is not None:
        verdict = "MET" if met else "NOT MET"
        print(f"new: p99 under attack within {TARGET_ATTACK_P99_MS:.0f} ms of alone: {verdict}")
    if args.json:
        print(json.dumps({"attack": rows, "target_met": met}, separators=(",", ":")))
    return 0


def report(
    args: argparse.Namespace,
    load_args: argparse.Namespace,
    results: dict[tuple[str, str], list[PhaseResult]],
    warnings: list[str],
) -> int:
    print()
    print(
        f"idgate front-end benchmark: {args.rounds} round(s) x {args.duration:g} s per phase, "
        f"{args.connections} connections, load generator {load_args.loadgen}, {ingest.NCPU} CPUs"
    )
    header = f"{'kind':<8}" + "".join(
        f"{v + ' events/s':>18}{v + ' p99 ms':>14}{v + ' CPU us/ev':>14}" for v in args.variant_list
    )
    print(header)
    summary: dict[str, Any] = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "medians": {},
        "ratios": {},
    }
    met = True
    for kind in args.kind_list:
        row = f"{kind:<8}"
        medians: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for variant in args.variant_list:
            runs = results[(variant, kind)]
            eps = statistics.median(r.eps for r in runs)
            p99 = statistics.median(r.p99_ms for r in runs)
            # server CPU per event: what the front end costs, less sensitive than events/s to
            # neighbours taking the cores
            cpu_us = statistics.median(
                r.server_cpu_pct / 100 * r.elapsed_s / r.events * 1e6 for r in runs if r.events
            )
            medians[variant] = eps
            cpu[variant] = cpu_us
            summary["medians"][f"{variant} {kind}"] = {
                "events_per_s": round(eps, 1),
                "p99_ms": round(p99, 2),
                "server_cpu_us_per_event": round(cpu_us, 1),
                "runs_events_per_s": [round(r.eps, 1) for r in runs],
            }
            row += f"{eps:>18,.0f}{p99:>14.1f}{cpu_us:>14.1f}"
        print(row)
        for variant in args.variant_list:
            if variant != "old" and "old" in medians and medians["old"]:
                ratio = medians[variant] / medians["old"]
                summary["ratios"][f"{variant}/old {kind}"] = round(ratio, 4)
                ok = ratio >= TARGET_RATIO
                if variant == "new":
                    met = met and ok
                cpu_ratio = cpu[variant] / cpu["old"] if cpu.get("old") else float("nan")
                summary["ratios"][f"{variant}/old {kind} server CPU per event"] = round(cpu_ratio, 4)
                verdict = "MET" if ok else "NOT MET"
                print(
                    f"  {variant}/old {kind}: events/s {ratio:.3f} ({verdict}: >= {TARGET_RATIO}), "
                    f"server CPU per event {cpu_ratio:.3f}"
                )
    for kind in args.kind_list:
        for variant in args.variant_list:
            runs = ", ".join(f"{r.eps:,.0f}" for r in results[(variant, kind)])
            print(f"  runs {variant} {kind}: {runs} events/s")
    for w in warnings:
        print(f"WARNING: {w}")
    summary["target_met"] = met
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
