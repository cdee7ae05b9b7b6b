"""Ingest benchmark: the real gateway against a bare Litestar app, same server, same load.

Starts, in one run and on loopback only:

* the gateway: ``idgate serve`` with the shipped ``idgate.example.toml`` (IDGATE_ENV=dev,
  embedded mode: SQLite outbox + JSONL sink in a temporary data dir, no Redis);
* ``bench/bare_app.py``: Litestar handlers that only read and decode the body.

Both run under uvicorn with uvloop + httptools, one worker, access log off. Each is driven
with single events to ``/v1/track`` and with batches of 100 events to ``/v1/batch``; every
message carries a unique messageId (the gateway dedupes by messageId). Each phase runs a
fixed time with a fixed number of keep-alive connections. The load generator is ``wrk``
with a generated Lua script when it is on PATH (``apt-get install wrk``), otherwise a
single-process asyncio (uvloop) HTTP/1.1 client built on raw sockets.

After each gateway phase the script waits (up to 60 s) until the sink files
``<data dir>/sinks/warehouse/*.jsonl`` hold every event the gateway acknowledged, and
reports how long delivery lagged behind the load.

    .venv/bin/python bench/ingest.py [--duration 10] [--connections 32] [--scenario all] [--json]

Targets checked: batches of 100 reach >= 20,000 events/s end to end on the gateway; the
gateway's single-event rate is >= 60 % of the bare app's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CONFIG = REPO / "idgate.example.toml"
WRITE_KEY = "acme-web-demo-key"  # dev_write_key of acme/acme-web in the example config
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
HOST = "127.0.0.1"
BATCH_SIZE = 100
TARGET_BATCH_EVENTS_PER_S = 20_000
TARGET_SINGLE_RATIO = 0.60
DELIVERY_TIMEOUT_S = 60.0
# Environment that would change what is measured (Redis dedupe, keys, another config).
STRIPPED_ENV = ("REDIS_URL", "IDGATE_KEYS", "IDGATE_KEY_FILE", "IDGATE_CONFIG", "IDGATE_DATA_DIR",
                "IDGATE_DELIVERY_BATCH", "IDGATE_DELIVERY_POLL_MS", "IDGATE_LOG_FORMAT")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

_children: list[subprocess.Popen[bytes]] = []


# -- processes ------------------------------------------------------------------------------
def _venv_bin(name: str) -> Path:
    for d in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if (d / name).exists():
            return d / name
    found = shutil.which(name)
    if found is None:
        sys.exit(f"bench: cannot find {name!r} (expected in {REPO / '.venv' / 'bin'})")
    return Path(found)


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM if the benchmark itself is killed."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
          stdout: Any = None, stderr: Any = None) -> subprocess.Popen[bytes]:
    # A new session: a Ctrl-C in the terminal reaches only this script, which then stops
    # the children in order (see stop()).
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat", encoding="ascii") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json", "Authorization": AUTH})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def start_gateway(tmp: Path) -> Server:
    port = free_port()
    data_dir = tmp / "gateway-data"
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    log_path = tmp / "gateway.log"
    with open(log_path, "wb") as log:
        proc = spawn([str(_venv_bin("idgate")), "serve", "--config", str(CONFIG), "--host", HOST,
                      "--port", str(port), "--data-dir", str(data_dir)],
                     env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    return Server("gateway", proc, port, log_path)


def start_bare(tmp: Path) -> Server:
    port = free_port()
    log_path = tmp / "bare.log"
    with open(log_path, "wb") as log:
        argv = [str(_venv_bin("python")), str(BENCH / "bare_app.py"), "--host", HOST, "--port", str(port)]
        proc = spawn(argv, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    return Server("bare", proc, port, log_path)


# -- payloads -------------------------------------------------------------------------------
def _iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def single_body(prefix: str, n: int) -> bytes:
    return (
        f'{{"userId":"u-{n % 100000}","event":"Product Viewed","properties":{{"sku":"A1","price":12.5}},'
        f'"messageId":"{prefix}{n}","timestamp":"{_iso_now()}"}}'
    ).encode()


def batch_body(prefix: str, n: int, size: int = BATCH_SIZE) -> bytes:
    ts = _iso_now()
    base = n * size
    items = ",".join(
        f'{{"type":"track","userId":"u-{(base + i) % 100000}","event":"Product Viewed",'
        f'"properties":{{"sku":"A1","price":12.5}},"messageId":"{prefix}{n}-{i}","timestamp":"{ts}"}}'
        for i in range(1, size + 1)
    )
    return f'{{"batch":[{items}]}}'.encode()


# -- results --------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    scenario: str
    target: str
    kind: str  # "single" or "batch"
    events_per_request: int
    loadgen: str
    connections: int
    elapsed_s: float = 0.0
    requests: int = 0
    ok: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    events: int = 0  # events acknowledged ("accepted" for the gateway, 2xx x size for bare)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    host_cpu_pct: float = 0.0
    first_error: str | None = None
    delivery: dict[str, Any] | None = field(default=None)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def eps(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["requests_per_s"] = round(self.rps, 1)
        d["events_per_s"] = round(self.eps, 1)
        return d


# -- load generator: wrk --------------------------------------------------------------------
WRK_LUA = r"""
-- generated by bench/ingest.py
local PATH = "@PATH@"
local EVENTS = @EVENTS@          -- 0: one event per request (/v1/track), n: batch of n
local AUTH = "@AUTH@"
local headers = {["Content-Type"] = "application/json", ["Authorization"] = AUTH}
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)     -- a global in that thread's Lua state
  table.insert(threads, thread)
end

-- per-thread state; globals so that done() can read them with thread:get()
ok, bad, accepted, counter = 0, 0, 0, 0
first_bad = ""
local prefix = ""
local parts = {}
local ts_sec, ts_str = -1, ""

local function now_iso()
  local t = os.time()
  if t ~= ts_sec then
    ts_sec = t
    ts_str = os.date("!%Y-%m-%dT%H:%M:%S.000Z", t)
  end
  return ts_str
end

function init(args)
  -- args[1]: a token unique to this run and phase; with the thread id and a counter every
  -- messageId is unique.
  prefix = (args[1] or tostring(os.time())) .. "-" .. tostring(tid) .. "-"
end

function request()
  counter = counter + 1
  local body
  if EVENTS == 0 then
    body = '{"userId":"u-' .. (counter % 100000) ..
      '","event":"Product Viewed","properties":{"sku":"A1","price":12.5},"messageId":"' ..
      prefix .. counter .. '","timestamp":"' .. now_iso() .. '"}'
  else
    local ts = now_iso()
    local base = counter * EVENTS
    for i = 1, EVENTS do
      parts[i] = '{"type":"track","userId":"u-' .. ((base + i) % 100000) ..
        '","event":"Product Viewed","properties":{"sku":"A1","price":12.5},"messageId":"' ..
        prefix .. counter .. '-' .. i .. '","timestamp":"' .. ts .. '"}'
    end
    body = '{"batch":[' .. table.concat(parts, ",", 1, EVENTS) .. ']}'
  end
  return wrk.format("POST", PATH, headers, body)
end

function response(status, hdrs, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    local a = body and string.match(body, '"accepted":(%d+)')
    if a then
      accepted = accepted + tonumber(a)
    else
      accepted = accepted + math.max(EVENTS, 1)
    end
  else
    bad = bad + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local t_ok, t_bad, t_acc, fb = 0, 0, 0, ""
  for _, t in ipairs(threads) do
    t_ok = t_ok + t:get("ok")
    t_bad = t_bad + t:get("bad")
    t_acc = t_acc + t:get("accepted")
    if fb == "" then fb = t:get("first_bad") end
  end
  local e = summary.errors
  fb = string.gsub(fb, '[%c"\\]', " ")
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"ok":%d,"non2xx":%d,"accepted":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"first_bad":"%s"}\n',
    summary.requests, summary.duration, t_ok, t_bad, t_acc,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, fb))
end
"""


def run_wrk(server: Server, res: PhaseResult, duration: float, threads: int, tmp: Path) -> None:
    path = "/v1/track" if res.kind == "single" else "/v1/batch"
    events = 0 if res.kind == "single" else res.events_per_request
    script = tmp / f"wrk-{res.scenario.replace(' ', '-')}.lua"
    lua = WRK_LUA.replace("@PATH@", path).replace("@EVENTS@", str(events)).replace("@AUTH@", AUTH)
    script.write_text(lua)
    token = uuid.uuid4().hex[:12]
    argv = ["wrk", f"-t{threads}", f"-c{res.connections}", f"-d{max(1, round(duration))}s",
            "--timeout", "30s", "-s", str(script), f"http://{HOST}:{server.port}", "--", token]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    _children.remove(proc)
    text = out.decode(errors="replace")
    m = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{text}")
    r = json.loads(m.group(1))
    res.elapsed_s = r["duration_us"] / 1e6
    res.requests = r["requests"]
    res.ok = r["ok"]
    res.non2xx = r["non2xx"]
    res.socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    res.events = r["accepted"]
    res.p50_ms, res.p90_ms = r["p50_us"] / 1000, r["p90_us"] / 1000
    res.p99_ms, res.max_ms = r["p99_us"] / 1000, r["max_us"] / 1000
    res.first_error = r["first_bad"] or None


# -- load generator: Python fallback --------------------------------------------------------
_ACCEPTED = re.compile(rb'"accepted":(\d+)')


class _HttpConn(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 client connection: one request in flight at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        if i < 0:
            w.set_exception(ConnectionError("response without Content-Length"))
            return
        j = head.find(b"\r\n", i + 2)
        length = int(head[i + 17: j if j > 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4: total])
        del self.buf[:total]
        w.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("connection closed"))


async def _python_load(server: Server, res: PhaseResult, duration: float) -> list[float]:
    loop = asyncio.get_running_loop()
    path = "/v1/track" if res.kind == "single" else "/v1/batch"
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nAuthorization: {AUTH}\r\n"
            "Content-Type: application/json\r\nContent-Length: ")
    make: Callable[[str, int], bytes] = single_body if res.kind == "single" else batch_body
    token = uuid.uuid4().hex[:12]
    latencies: list[float] = []
    deadline = loop.time() + duration

    async def worker(wid: int) -> None:
        prefix = f"{token}-{wid}-"
        n = 0
        conn: _HttpConn | None = None
        while loop.time() < deadline:
            if conn is None or conn.transport is None or conn.transport.is_closing():
                try:
                    _, conn = await loop.create_connection(_HttpConn, HOST, server.port)
                except OSError:
                    res.socket_errors += 1
                    await asyncio.sleep(0.05)
                    continue
            n += 1
            body = make(prefix, n)
            data = f"{head}{len(body)}\r\n\r\n".encode() + body
            started = time.perf_counter()
            try:
                status, rbody = await conn.request(data)
            except (OSError, ConnectionError, ValueError):
                res.socket_errors += 1
                if conn.transport is not None:
                    conn.transport.close()
                conn = None
                continue
            latencies.append(time.perf_counter() - started)
            res.requests += 1
            if 200 <= status < 300:
                res.ok += 1
                m = _ACCEPTED.search(rbody)
                res.events += int(m.group(1)) if m else res.events_per_request
            else:
                res.non2xx += 1
                if res.first_error is None:
                    res.first_error = f"{status} {rbody[:300].decode(errors='replace')}"
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    started = loop.time()
    tasks = [asyncio.create_task(worker(i)) for i in range(res.connections)]
    _, pending = await asyncio.wait(tasks, timeout=duration + 30)
    for t in pending:  # requests stuck more than 30 s past the end
        t.cancel()
        res.socket_errors += 1
    res.elapsed_s = loop.time() - started
    return latencies


def run_python(server: Server, res: PhaseResult, duration: float) -> None:
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        latencies = runner.run(_python_load(server, res, duration))
    latencies.sort()
    if latencies:
        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

        res.p50_ms, res.p90_ms, res.p99_ms, res.max_ms = pct(0.50), pct(0.90), pct(0.99), latencies[-1] * 1000


# -- delivery check -------------------------------------------------------------------------
class SinkCounter:
    """Counts complete lines in the sink files, reading only what was appended since last time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.lines = 0

    def count(self) -> int:
        for path in sorted(self.directory.glob("*.jsonl")):
            offset = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # a half-written last line is counted next time
            self.lines += chunk.count(b"\n", 0, end)
            self.offsets[path] = offset + end
        return self.lines


def wait_delivery(counter: SinkCounter, expected: int, load_ended: float, max_extra: int) -> dict[str, Any]:
    """Wait until the sinks hold ``expected`` lines, then until they stop growing."""
    at_end = counter.count()
    deadline = load_ended + DELIVERY_TIMEOUT_S
    reached: float | None = None
    last, last_change = at_end, time.monotonic()
    while True:
        now = time.monotonic()
        n = counter.count()
        if n != last:
            last, last_change = n, now
        if reached is None and n >= expected:
            reached = now
        # Requests still in flight when the load generator stopped may be stored after it
        # stopped counting: wait for the count to settle before the next phase.
        if reached is not None and now - last_change >= 1.0:
            break
        if now >= deadline:
            break
        time.sleep(0.05)
    return {
        "expected": expected,
        "delivered": last,
        "backlog_at_load_end": max(0, expected - at_end),
        "lag_s": None if reached is None else round(max(0.0, reached - load_ended), 3),
        "complete": last >= expected,
        "unacknowledged_extra": max(0, last - expected),
        "extra_within_bound": last - expected <= max_extra,
    }


# -- orchestration --------------------------------------------------------------------------
def run_phase(server: Server, res: PhaseResult, args: argparse.Namespace, tmp: Path) -> float:
    """Runs one phase; returns the monotonic time the load ended."""
    cpu0, busy0 = proc_cpu_seconds(server.proc.pid), host_cpu()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.monotonic()
    if res.loadgen == "wrk":
        run_wrk(server, res, args.duration, args.threads, tmp)
    else:
        run_python(server, res, args.duration)
    ended = time.monotonic()
    wall = ended - wall0
    cpu1, busy1 = proc_cpu_seconds(server.proc.pid), host_cpu()
    if res.loadgen == "wrk":
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    else:
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        gen = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    res.server_cpu_pct = 100 * (cpu1 - cpu0) / wall
    res.loadgen_cpu_pct = 100 * gen / wall
    dt = busy1[1] - busy0[1]
    res.host_cpu_pct = 100 * NCPU * (busy1[0] - busy0[0]) / dt if dt else 0.0
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} died during {res.scenario}:\n{server.log_tail()}")
    return ended


def preflight(gateway: Server, bare: Server, counter: SinkCounter) -> None:
    """One event through each server: fail early and clearly on a config or auth problem."""
    body = single_body(f"preflight-{uuid.uuid4().hex[:8]}-", 0)
    status, raw = bare.post("/v1/track", body)
    if status != 200:
        raise RuntimeError(f"bare app answered {status}: {raw[:300]!r}")
    status, raw = gateway.post("/v1/track", body)
    if status != 200 or json.loads(raw).get("accepted") != 1:
        raise RuntimeError(
            f"gateway did not accept a test event ({status}): {raw[:300]!r}\n{gateway.log_tail()}"
        )
    deadline = time.monotonic() + 10
    while counter.count() < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test event did not reach {counter.directory} within 10 s")
        time.sleep(0.05)


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_report(results: list[PhaseResult], args: argparse.Namespace) -> dict[str, Any]:
    by = {r.scenario: r for r in results}
    loadgen = results[0].loadgen if results else "-"
    print()
    print(f"idgate ingest benchmark: {args.duration:g} s per phase, {args.connections} connections, "
          f"load generator {loadgen}" + (f" ({args.threads} thread(s))" if loadgen == "wrk" else "")
          + f", {NCPU} CPUs")
    header = (f"{'scenario':<18}{'req/s':>10}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
              f"{'server%':>9}{'loadgen%':>10}{'host%':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.scenario:<18}{r.rps:>10,.0f}{r.eps:>11,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.non2xx:>8}"
              f"{r.server_cpu_pct:>9.0f}{r.loadgen_cpu_pct:>10.0f}{r.host_cpu_pct:>7.0f}")
    print(f"(server%/loadgen%: CPU of that process, 100 = one core; host%: whole machine, max {NCPU * 100})")
    for r in results:
        if r.socket_errors:
            print(f"note: {r.scenario}: {r.socket_errors} socket errors/timeouts (not counted as non-2xx)")
        if r.first_error:
            print(f"note: {r.scenario}: first non-2xx: {r.first_error}")
        other = r.host_cpu_pct - r.server_cpu_pct - r.loadgen_cpu_pct
        if other > 30:
            print(f"note: {r.scenario}: {other:.0f} % CPU went to other processes or kernel I/O threads "
                  "during the phase; figures may be low")

    def ratio(a: str, b: str, attr: str) -> float | None:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None or not getattr(rb, attr):
            return None
        return float(getattr(ra, attr) / getattr(rb, attr))

    single_ratio = ratio("gateway single", "bare single", "eps")
    batch_ratio = ratio("gateway batch100", "bare batch100", "eps")
    gw_batch = by.get("gateway batch100")
    batch_ok = None
    if gw_batch is not None:
        batch_ok = gw_batch.eps >= TARGET_BATCH_EVENTS_PER_S and gw_batch.non2xx == 0
    single_ok = None if single_ratio is None else single_ratio >= TARGET_SINGLE_RATIO

    def verdict(ok: bool | None) -> str:
        return "not run" if ok is None else ("MET" if ok else "NOT MET")

    print()
    print(f"gateway/bare, single events: {fmt(single_ratio and 100 * single_ratio, '.1f')} %")
    print(f"gateway/bare, batches of {BATCH_SIZE}: {fmt(batch_ratio and 100 * batch_ratio, '.1f')} %")
    print(f"target batches of {BATCH_SIZE} >= {TARGET_BATCH_EVENTS_PER_S:,} events/s on the gateway: "
          f"{verdict(batch_ok)}" + (f" ({gw_batch.eps:,.0f} events/s)" if gw_batch else ""))
    print(f"target gateway single-event rate >= {TARGET_SINGLE_RATIO:.0%} of bare: {verdict(single_ok)}"
          + (f" ({100 * single_ratio:.1f} %)" if single_ratio is not None else ""))

    delivery_ok: bool | None = None
    for r in results:
        d = r.delivery
        if d is None:
            continue
        good = d["complete"] and d["extra_within_bound"]
        delivery_ok = good if delivery_ok is None else delivery_ok and good
        lag = "never caught up" if d["lag_s"] is None else f"lag {d['lag_s']:.2f} s after the load stopped"
        extra = f", {d['unacknowledged_extra']} more than acknowledged" if d["unacknowledged_extra"] else ""
        print(f"delivery {r.scenario}: {d['delivered']:,}/{d['expected']:,} events in the sink files, {lag} "
              f"(backlog at load end {d['backlog_at_load_end']:,}){extra}: {'OK' if good else 'FAILED'}")
        if d["unacknowledged_extra"] and d["extra_within_bound"]:
            print("  (extra: requests in flight when the load generator stopped, stored, not acknowledged)")
    return {
        "duration_s": args.duration,
        "connections": args.connections,
        "loadgen": loadgen,
        "cpus": NCPU,
        "scenarios": {r.scenario: r.summary() for r in results},
        "ratios": {"single": single_ratio, "batch100": batch_ratio},
        "targets": {"batch100_events_per_s": batch_ok, "single_ratio": single_ok, "delivery": delivery_ok},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the idgate gateway against a bare Litestar app.")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--connections", type=int, default=32,
                   help="concurrent keep-alive connections (default 32)")
    p.add_argument("--scenario", choices=("all", "single", "batch"), default="all")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="auto: wrk when on PATH, else the Python client")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (default 1: on a small machine the servers need the cores)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.threads < 1:
        p.error("--duration, --connections and --threads must be positive")
    if args.loadgen == "auto":
        args.loadgen = "wrk" if shutil.which("wrk") else "python"
    elif args.loadgen == "wrk" and not shutil.which("wrk"):
        p.error("wrk is not on PATH")
    if args.loadgen == "wrk":
        args.duration = float(max(1, round(args.duration)))  # wrk takes whole seconds
        args.threads = min(args.threads, args.connections)
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-"))
    servers: list[Server] = []
    try:
        gateway, bare = start_gateway(tmp), start_bare(tmp)
        servers += [gateway, bare]
        gateway.wait_healthy()
        bare.wait_healthy()
        counter = SinkCounter(tmp / "gateway-data" / "sinks" / "warehouse")
        preflight(gateway, bare, counter)
        print(f"gateway pid {gateway.proc.pid} on :{gateway.port}, bare app pid {bare.proc.pid} "
              f"on :{bare.port}, data {tmp}", file=sys.stderr)

        kinds = ["single", "batch"] if args.scenario == "all" else [args.scenario]
        results: list[PhaseResult] = []
        for kind in kinds:
            for server in (bare, gateway):
                name = f"{server.name} {'single' if kind == 'single' else f'batch{BATCH_SIZE}'}"
                res = PhaseResult(scenario=name, target=server.name, kind=kind,
                                  events_per_request=1 if kind == "single" else BATCH_SIZE,
                                  loadgen=args.loadgen, connections=args.connections)
                before = counter.count()
                print(f"running {name} for {args.duration:g} s ...", file=sys.stderr)
                ended = run_phase(server, res, args, tmp)
                if server is gateway:
                    res.delivery = wait_delivery(counter, before + res.events, ended,
                                                 max_extra=args.connections * res.events_per_request)
                results.append(res)
        summary = print_report(results, args)
        for s in servers:
            log = s.log_path.read_text(errors="replace").splitlines()
            bad = [line for line in log if '"level":"error"' in line or '"level":"critical"' in line]
            if bad:
                print(f"{s.name} logged {len(bad)} error line(s), first: {bad[0][:300]}")
        if args.json:
            print(json.dumps(summary, separators=(",", ":")))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        for proc in list(reversed(_children)):
            stop(proc)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
