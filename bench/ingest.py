"""Ingest benchmark: the real gateway against a bare Litestar app, and what consent enforcement costs.

Two scenario sets, each run on loopback only with servers it starts itself:

* gateway vs bare (``--scenario single`` / ``batch``): ``idgate serve`` (IDGATE_ENV=dev,
  embedded mode: SQLite outbox + JSONL sink + SQLite consent store in a temporary data dir,
  no Redis) against ``bench/bare_app.py`` (Litestar handlers that only read and decode the
  body). The gateway runs an "unenforced" copy of ``idgate.example.toml``: the same tenants,
  sources and destinations, with ``consent = { enforce = false }`` on tenant ``acme`` (allowed
  only with IDGATE_ENV=dev). With the shipped config every event of a subject without
  consent is dropped (HTTP 200, ``"accepted": 0``), so this comparison measures the ingest
  path (auth, validation, pseudonymisation, dedupe, durable outbox, delivery) with consent
  enforcement off.
* consent (``--scenario consent``): what enforcement costs. Two gateways, one with the
  "unenforced" config and one with the shipped config unchanged ("enforced"). Before the
  load, a pool of K subjects (``--consent-users``, default 2,000) is granted the
  ``analytics`` purpose on the enforced gateway through ``POST /v1/consent``. Both gateways
  then get the same load, every event's userId drawn at random from u-1..u-K (event
  "Product Viewed", which the tracking plan maps to analytics, the purpose the ``warehouse``
  destination needs). After each phase the sink files show whether the events were really
  forwarded; if the enforced gateway dropped them for lack of consent, the script prints a
  loud WARNING and the comparison is void. The phases run ``--rounds`` times (default 3),
  the two gateways' order swapped every round, and the loss is read from the medians: on a
  shared 2-core machine one 30 s pair of phases differed by 5-30 % either way with the same
  code.

Each server runs under uvicorn with uvloop + httptools, one worker, access log off. Each is
driven with single events to ``/v1/track`` and with batches of 100 events to ``/v1/batch``;
every message carries a unique messageId (the gateway dedupes by messageId) and only a
userId. Each phase runs a fixed time with a fixed number of keep-alive connections. The load
generator is ``wrk`` with a generated Lua script when it is on PATH (``apt-get install wrk``),
otherwise a single-process asyncio (uvloop) HTTP/1.1 client built on raw sockets.

After each gateway phase the script waits (up to 60 s) until the sink files
``<data dir>/sinks/warehouse/*.jsonl`` hold every event the gateway acknowledged, reports how
long delivery lagged behind the load, and compares the events that reached the sink with
the events sent in 2xx requests.

    .venv/bin/python bench/ingest.py [--duration 10] [--connections 32] [--scenario all]
                                     [--consent-users 2000] [--rounds 3] [--json]

``--scenario all`` runs gateway vs bare, then the consent set (with fresh gateways).
``--scenario plan`` (not part of ``all``) runs the "unenforced" gateway with the example's
seed tracking plan against the same config without it, same load, phases alternating, and
checks issue 14's target: validation costs at most 15 % of the events/s, single and batches.

Targets checked (issue 17, printed together at the end with this machine's bare ceilings):
batches of 100 reach >= 50,000 events/s end to end (acknowledged events over the load time
plus the delivery lag after it) with the backlog at the end of the load under one second's
worth of ingest, on the full pipeline (the enforced gateway when the consent set runs); the
gateway's single-event rate is >= 70 % of the bare app's; consent writes >= 5,000 grants/s
(the grant phase of the consent set). Also: consent enforcement loses at most 15 % of the
events/s, for single events and for batches of 100.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from tables import Column, print_table

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
CONFIG = REPO / "idgate.example.toml"
# dev_write_key of acme/acme-server in the example config: the load's events carry only a
# userId, as a shop's backend sends them, and its consent grants name that user id, which a
# client source (a public key) may not do without the backend's identity assertion
WRITE_KEY = "acme-server-demo-key-0000000000000001"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
HOST = "127.0.0.1"
BATCH_SIZE = 100
# Issue 17's targets, on this 2-core machine: batches of 100 at >= 50,000 events/s end to end
# (acknowledged events over the load time plus the time delivery then took to drain them),
# sustained (the backlog when the load stops is under one second's worth of ingest); single
# events >= 70 % of the bare app's rate; consent writes >= 5,000 grants/s.
TARGET_BATCH_EVENTS_PER_S = 50_000
TARGET_SINGLE_RATIO = 0.70
TARGET_GRANTS_PER_S = 5_000
DELIVERY_TIMEOUT_S = 60.0
# Consent comparison
TENANT = "acme"  # the tenant of WRITE_KEY
CONSENT_NOTICE = "privacy-2026-11"  # [[tenants.notices]] of the example config
CONSENT_PURPOSES = ["analytics"]  # what "Product Viewed" is collected for, what `warehouse` needs
DEFAULT_CONSENT_USERS = 2_000
CONSENT_CONCURRENCY = 16  # connections used to record the grants
CONSENT_MAX_FAILURES = 20  # stop granting after this many failed requests
TARGET_CONSENT_LOSS = 0.15  # enforcement may cost at most this share of the events/s
TARGET_PLAN_LOSS = 0.15  # issue 14: validation on the seed plan may cost at most this share
MIN_FORWARDED = 0.98  # a gateway phase must get this share of the events sent into the sink
# Environment that would change what is measured (Redis dedupe and consent state, keys,
# another config or consent database).
STRIPPED_ENV = (
    "REDIS_URL",
    "IDGATE_KEYS",
    "IDGATE_KEY_FILE",
    "IDGATE_CONFIG",
    "IDGATE_DATA_DIR",
    "IDGATE_DELIVERY_BATCH",
    "IDGATE_DELIVERY_POLL_MS",
    "IDGATE_LOG_FORMAT",
    "DATABASE_URL",
    "IDGATE_LEDGER_KEY",
    "IDGATE_LEDGER_KEY_FILE",
    "IDGATE_REDIS_PREFIX",
)
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


def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Any = None,
    stderr: Any = None,
) -> subprocess.Popen[bytes]:
    # A new session: a Ctrl-C in the terminal reaches only this script, which then stops
    # the children in order (see stop()).
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
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
    data_dir: Path | None = None

    @property
    def sink_dir(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "sinks" / "warehouse"

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


def start_gateway(
    tmp: Path, config: Path, name: str = "gateway", extra_env: dict[str, str] | None = None
) -> Server:
    """``idgate serve`` with ``config``, its own data dir (outbox, sinks, consent.sqlite3, dev
    keys) and log file under ``tmp``; ``extra_env`` adds or overrides variables (e.g.
    ``IDGATE_ALERT_INTERVAL_MS``, or the secrets an alert channel names)."""
    port = free_port()
    data_dir = tmp / f"{name}-data"
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    # JSON logs (dev defaults to console lines): the report scans them for error lines
    env.update(IDGATE_ENV="dev", IDGATE_LOG_LEVEL="WARNING", IDGATE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = spawn(
            [
                str(_venv_bin("idgate")),
                "serve",
                "--config",
                str(config),
                "--host",
                HOST,
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(name, proc, port, log_path, data_dir)


# -- configs --------------------------------------------------------------------------------
_TABLE_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
CONSENT_OFF = "consent = { enforce = false }  # written by bench/ingest.py (IDGATE_ENV=dev only)"


def _tenant(doc: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    for t in doc.get("tenants", []):
        if t.get("id") == tenant_id:
            return t  # type: ignore[no-any-return]
    raise RuntimeError(f"{CONFIG} has no tenant {tenant_id!r}")


def consent_off_text(text: str, tenant_id: str) -> str:
    """``text`` with ``consent = { enforce = false }`` as a key of that ``[[tenants]]`` table,
    right after its ``name = ...`` line (after its last key if it has no name)."""
    lines = text.splitlines()
    headers = [
        (i, m.group(1), m.group(2)) for i, line in enumerate(lines) if (m := _TABLE_HEADER.match(line))
    ]
    for n, (start, bracket, table) in enumerate(headers):
        if bracket != "[[" or table != "tenants":
            continue
        end = headers[n + 1][0] if n + 1 < len(headers) else len(lines)
        block = tomllib.loads("\n".join(lines[start + 1 : end]))
        if block.get("id") != tenant_id:
            continue
        body = range(start + 1, end)
        existing = [i for i in body if re.match(r"\s*consent\s*=", lines[i])]
        if existing:  # a one-line `consent = {...}`: replace it
            lines[existing[0]] = CONSENT_OFF
        elif "consent" in block:
            raise RuntimeError(f"{CONFIG}: cannot rewrite the consent setting of tenant {tenant_id!r}")
        else:
            names = [i for i in body if re.match(r"\s*name\s*=", lines[i])]
            keys = [i for i in body if re.match(r"\s*[A-Za-z0-9_\"'-]+\s*=", lines[i])]
            at = names[0] if names else (keys[-1] if keys else start)
            lines.insert(at + 1, CONSENT_OFF)
        return "\n".join(lines) + "\n"
    raise RuntimeError(f"{CONFIG} has no [[tenants]] table with id = {tenant_id!r}")


# The load comes from one loopback address, far above the per-IP defaults: the limits stay
# on (their cost per request is part of what is measured) with room for the load.
BENCH_RATE_LIMITS = """
# written by bench/ingest.py: every request comes from one loopback address
[rate_limits]
source_requests_per_second = 10000000
source_events_per_second = 100000000
ip_requests_per_second = 10000000
ip_events_per_second = 100000000
ip_consent_calls_per_hour = 100000000
"""


def without_plan(config_text: str) -> str:
    """The same config without its tracking plan (what validation costs)."""
    return re.sub(r"(?m)^tracking_plan_file = .*\n", "", config_text)


def write_configs(tmp: Path, *, plan: bool = True) -> tuple[Path, Path]:
    """(unenforced, enforced): copies of the example config, one snapshot of it, with every
    tenant, source and destination as shipped, and rate limits with room for the load
    (``BENCH_RATE_LIMITS``); "unenforced" turns consent enforcement off for ``TENANT``.
    Both are checked by parsing them back."""
    text = CONFIG.read_text(encoding="utf-8")
    shipped = tomllib.loads(text)
    if _tenant(shipped, TENANT).get("consent", {}).get("enforce", True) is not True:
        raise RuntimeError(f"{CONFIG} already turns consent enforcement off for {TENANT!r}")
    if "rate_limits" in shipped:
        raise RuntimeError(f"{CONFIG} sets [rate_limits]: bench/ingest.py writes its own")
    text = BENCH_RATE_LIMITS + text
    off_text = consent_off_text(text, TENANT)
    off = tomllib.loads(off_text)
    expected = tomllib.loads(text)
    _tenant(expected, TENANT)["consent"] = {"enforce": False}
    if off != expected:
        raise RuntimeError(
            "bench: the unenforced config differs from the shipped one in more than "
            "tenants.consent (a bug in consent_off_text)"
        )
    unenforced, enforced = tmp / "idgate-unenforced.toml", tmp / "idgate-enforced.toml"
    shutil.copytree(REPO / "plans", tmp / "plans", dirs_exist_ok=True)  # tracking_plan_file, relative
    if not plan:  # --no-plan: the same configs without the tracking plan, to see what it costs
        off_text, text = without_plan(off_text), without_plan(text)
    unenforced.write_text(off_text, encoding="utf-8")
    enforced.write_text(text, encoding="utf-8")
    return unenforced, enforced


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


def _user(n: int, users: int) -> int:
    """users > 0: a random subject of the pool u-1..u-users; 0: u-<n mod 100000>."""
    return random.randint(1, users) if users > 0 else n % 100000


def single_body(prefix: str, n: int, users: int = 0) -> bytes:
    return (
        f'{{"userId":"u-{_user(n, users)}","event":"Product Viewed",'
        f'"properties":{{"product_id":"A1","sku":"A1","price":12.5}},'
        f'"messageId":"{prefix}{n}","timestamp":"{_iso_now()}"}}'
    ).encode()


def batch_body(prefix: str, n: int, size: int = BATCH_SIZE, users: int = 0) -> bytes:
    ts = _iso_now()
    base = n * size
    items = ",".join(
        f'{{"type":"track","userId":"u-{_user(base + i, users)}","event":"Product Viewed",'
        f'"properties":{{"product_id":"A1","sku":"A1","price":12.5}},"messageId":"{prefix}{n}-{i}","timestamp":"{ts}"}}'
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
    users: int = 0  # > 0: userIds drawn from u-1..u-users; 0: u-<counter mod 100000>
    elapsed_s: float = 0.0
    requests: int = 0
    ok: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    events: int = 0  # events acknowledged ("accepted" for the gateway, 2xx x size for bare)
    dropped: int = 0  # events the gateway answered as dropped (sum of "dropped" in the responses)
    sink_events: int | None = None  # events that reached the sink files during the phase
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    host_cpu_pct: float = 0.0
    first_error: str | None = None
    delivery: dict[str, Any] | None = field(default=None)
    server_cpu_at_start: float = 0.0  # the server's CPU seconds when the load started
    # the server's CPU seconds from the start of the load until the sinks held every
    # acknowledged event: ingest and delivery of this phase's events (gateway phases)
    server_cpu_s_e2e: float | None = None
    events_e2e: int = 0  # the phase's events in the sinks at that moment (>= events)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def eps(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def sent_events(self) -> int:
        """Events sent in requests answered 2xx."""
        return self.ok * self.events_per_request

    @property
    def forwarded(self) -> float | None:
        """Share of the events sent in 2xx requests that reached the sink."""
        if self.sink_events is None or not self.sent_events:
            return None
        return self.sink_events / self.sent_events

    @property
    def cpu_us_per_event(self) -> float | None:
        """The server's CPU per acknowledged event end to end (ingest, durable outbox,
        delivery to the sinks), in microseconds; None when delivery never caught up."""
        if self.server_cpu_s_e2e is None or not self.events_e2e:
            return None
        return 1e6 * self.server_cpu_s_e2e / self.events_e2e

    @property
    def cpu_bound_per_s(self) -> float | None:
        """The events/s that CPU per event allows with every core of the machine busy on
        it: a ceiling no spreading of the same work over processes could pass."""
        us = self.cpu_us_per_event
        return None if us is None else NCPU * 1e6 / us

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        us = self.cpu_us_per_event
        d["cpu_us_per_event"] = None if us is None else round(us, 1)
        d["requests_per_s"] = round(self.rps, 1)
        d["events_per_s"] = round(self.eps, 1)
        d["sent_events"] = self.sent_events
        d["forwarded"] = None if self.forwarded is None else round(self.forwarded, 4)
        return d


# -- load generator: wrk --------------------------------------------------------------------
WRK_LUA = r"""
-- generated by bench/ingest.py
local PATH = "@PATH@"
local EVENTS = @EVENTS@          -- 0: one event per request (/v1/track), n: batch of n
local AUTH = "@AUTH@"
local USERS = @USERS@            -- n > 0: userId drawn from u-1..u-n; 0: u-<counter mod 100000>
local headers = {["Content-Type"] = "application/json", ["Authorization"] = AUTH}
local threads = {}
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)     -- a global in that thread's Lua state
  table.insert(threads, thread)
end

-- per-thread state; globals so that done() can read them with thread:get()
ok, bad, accepted, dropped, counter = 0, 0, 0, 0, 0
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
  math.randomseed(os.time() + 7919 * tid)
end

local function user(n)
  if USERS > 0 then return math.random(USERS) end
  return n % 100000
end

function request()
  counter = counter + 1
  local body
  if EVENTS == 0 then
    body = '{"userId":"u-' .. user(counter) ..
      '","event":"Product Viewed","properties":{"product_id":"A1","sku":"A1","price":12.5},"messageId":"' ..
      prefix .. counter .. '","timestamp":"' .. now_iso() .. '"}'
  else
    local ts = now_iso()
    local base = counter * EVENTS
    for i = 1, EVENTS do
      parts[i] = '{"type":"track","userId":"u-' .. user(base + i) ..
        '","event":"Product Viewed","properties":{"product_id":"A1","sku":"A1","price":12.5},"messageId":"' ..
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
    local d = body and string.match(body, '"dropped":{([^}]*)}')
    if d then
      for n in string.gmatch(d, ':(%d+)') do dropped = dropped + tonumber(n) end
    end
  else
    bad = bad + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local t_ok, t_bad, t_acc, t_drop, fb = 0, 0, 0, 0, ""
  for _, t in ipairs(threads) do
    t_ok = t_ok + t:get("ok")
    t_bad = t_bad + t:get("bad")
    t_acc = t_acc + t:get("accepted")
    t_drop = t_drop + t:get("dropped")
    if fb == "" then fb = t:get("first_bad") end
  end
  local e = summary.errors
  fb = string.gsub(fb, '[%c"\\]', " ")
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"ok":%d,"non2xx":%d,"accepted":%d,"dropped":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"first_bad":"%s"}\n',
    summary.requests, summary.duration, t_ok, t_bad, t_acc, t_drop,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, fb))
end
"""


def run_wrk(server: Server, res: PhaseResult, duration: float, threads: int, tmp: Path) -> None:
    path = "/v1/track" if res.kind == "single" else "/v1/batch"
    events = 0 if res.kind == "single" else res.events_per_request
    script = tmp / f"wrk-{res.scenario.replace(' ', '-')}.lua"
    lua = (
        WRK_LUA.replace("@PATH@", path)
        .replace("@EVENTS@", str(events))
        .replace("@AUTH@", AUTH)
        .replace("@USERS@", str(res.users))
    )
    script.write_text(lua)
    token = uuid.uuid4().hex[:12]
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{res.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://{HOST}:{server.port}",
        "--",
        token,
    ]
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
    res.dropped = r["dropped"]
    res.p50_ms, res.p90_ms = r["p50_us"] / 1000, r["p90_us"] / 1000
    res.p99_ms, res.max_ms = r["p99_us"] / 1000, r["max_us"] / 1000
    res.first_error = r["first_bad"] or None


# -- load generator: Python fallback --------------------------------------------------------
_ACCEPTED = re.compile(rb'"accepted":(\d+)')
_DROPPED = re.compile(rb'"dropped":\{([^}]*)\}')
_NUMBER = re.compile(rb":(\d+)")


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
        length = int(head[i + 17 : j if j > 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        w.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("connection closed"))


async def _python_load(server: Server, res: PhaseResult, duration: float) -> list[float]:
    loop = asyncio.get_running_loop()
    path = "/v1/track" if res.kind == "single" else "/v1/batch"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nAuthorization: {AUTH}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    )
    make: Callable[[str, int], bytes] = (
        partial(single_body, users=res.users)
        if res.kind == "single"
        else partial(batch_body, size=res.events_per_request, users=res.users)
    )
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
                d = _DROPPED.search(rbody)
                if d:
                    res.dropped += sum(int(x) for x in _NUMBER.findall(d.group(1)))
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


def wait_delivery(
    counter: SinkCounter,
    expected: int,
    load_ended: float,
    max_extra: int,
    on_reached: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Wait until the sinks hold ``expected`` lines (``on_reached`` is called then, with the
    count), then until they stop growing."""
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
            if on_reached is not None:
                on_reached(n)
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
    res.server_cpu_at_start = cpu0
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


def wait_sink(counter: SinkCounter, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while counter.count() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"a test event did not reach {counter.directory} within {timeout:.0f} s")
        time.sleep(0.05)


def probe(server: Server, user: str) -> tuple[int, int, bytes]:
    """One event of ``user`` to /v1/track: (accepted, dropped, response body); non-200 raises."""
    body = (
        f'{{"userId":"{user}","event":"Product Viewed",'
        f'"properties":{{"product_id":"A1","sku":"A1","price":12.5}},'
        f'"messageId":"probe-{uuid.uuid4().hex}","timestamp":"{_iso_now()}"}}'
    ).encode()
    status, raw = server.post("/v1/track", body)
    if status != 200:
        raise RuntimeError(
            f"{server.name} answered {status} to a test event: {raw[:300]!r}\n{server.log_tail()}"
        )
    doc = json.loads(raw)
    dropped = doc.get("dropped") or {}
    return int(doc.get("accepted", 0)), sum(int(v) for v in dropped.values()), raw


def preflight_gateway(gateway: Server, counter: SinkCounter, user: str = "u-0") -> None:
    """One event through an unenforced (or consented) gateway, into its sink."""
    before = counter.count()
    accepted, _, raw = probe(gateway, user)
    if accepted != 1:
        raise RuntimeError(f"{gateway.name} did not accept a test event: {raw[:300]!r}\n{gateway.log_tail()}")
    wait_sink(counter, before + 1)


def preflight(gateway: Server, bare: Server, counter: SinkCounter) -> None:
    """One event through each server: fail early and clearly on a config or auth problem."""
    status, raw = bare.post("/v1/track", single_body(f"preflight-{uuid.uuid4().hex[:8]}-", 0))
    if status != 200:
        raise RuntimeError(f"bare app answered {status}: {raw[:300]!r}")
    preflight_gateway(gateway, counter)


def warn(warnings: list[str], message: str) -> None:
    """A loud warning now (stderr) and again under the report (stdout)."""
    warnings.append(message)
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr)


def grant_consent(server: Server, users: int, concurrency: int = CONSENT_CONCURRENCY) -> dict[str, Any]:
    """Records consent to CONSENT_PURPOSES under CONSENT_NOTICE for u-1..u-users with
    ``POST /v1/consent``, ``concurrency`` requests in flight; a non-200 raises RuntimeError."""
    import httpx

    failures: list[str] = []
    granted = 0

    async def run() -> None:
        todo = iter(range(1, users + 1))  # shared by the workers
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{server.port}",
            limits=limits,
            timeout=30.0,
            trust_env=False,
            headers={"Authorization": AUTH},
        ) as client:

            async def worker() -> None:
                nonlocal granted
                for i in todo:
                    if len(failures) >= CONSENT_MAX_FAILURES:
                        return
                    body = {"userId": f"u-{i}", "grant": CONSENT_PURPOSES, "noticeId": CONSENT_NOTICE}
                    try:
                        resp = await client.post("/v1/consent", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(f"u-{i}: {type(exc).__name__}: {exc}")
                        continue
                    if resp.status_code == 200:
                        granted += 1
                    else:
                        failures.append(f"u-{i}: HTTP {resp.status_code} {resp.text[:300]}")

            await asyncio.gather(*(worker() for _ in range(min(concurrency, users))))

    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(
            f"POST /v1/consent failed on {server.name}: {len(failures)} failure(s), "
            f"{granted} granted; first: {failures[0]}\n{server.log_tail()}"
        )
    return {
        "users": users,
        "concurrency": min(concurrency, users),
        "seconds": round(elapsed, 3),
        "per_s": round(users / elapsed, 1) if elapsed else None,
    }


def gateway_phase(
    server: Server, counter: SinkCounter, res: PhaseResult, args: argparse.Namespace, tmp: Path
) -> None:
    """A load phase on a gateway, then the delivery check: how many events reached the sink."""
    before = counter.count()
    print(f"running {res.scenario} for {args.duration:g} s ...", file=sys.stderr)
    ended = run_phase(server, res, args, tmp)

    def caught_up(in_sinks: int) -> None:
        res.server_cpu_s_e2e = proc_cpu_seconds(server.proc.pid) - res.server_cpu_at_start
        res.events_e2e = in_sinks - before

    res.delivery = wait_delivery(
        counter,
        before + res.events,
        ended,
        max_extra=args.connections * res.events_per_request,
        on_reached=caught_up,
    )
    res.sink_events = res.delivery["delivered"] - before


def check_forwarded(res: PhaseResult, warnings: list[str], enforced: bool) -> None:
    fwd = res.forwarded
    if fwd is None or fwd >= MIN_FORWARDED:
        return
    what = (
        f"{res.scenario}: only {fwd:.1%} of the {res.sent_events:,} events sent in 2xx requests reached "
        f"the sink ({res.events:,} acknowledged as accepted, {res.dropped:,} answered as dropped)"
    )
    if enforced and (res.dropped or res.events < res.sent_events):
        warn(warnings, f"{what}: events were dropped for lack of consent, the figures are not comparable")
    elif res.dropped:
        warn(warnings, f"{what}: the gateway dropped events, the figures do not measure durable ingest")
    else:
        warn(warnings, f"{what}: delivery did not catch up, see the delivery lines")


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def kind_label(kind: str) -> str:
    """``single`` or ``batch100``: how a kind of load is named in phases and reports."""
    return "single" if kind == "single" else f"batch{BATCH_SIZE}"


def phase_name(prefix: str, kind: str) -> str:
    return f"{prefix} {kind_label(kind)}"


def new_result(name: str, target: str, kind: str, args: argparse.Namespace, users: int = 0) -> PhaseResult:
    return PhaseResult(
        scenario=name,
        target=target,
        kind=kind,
        events_per_request=1 if kind == "single" else BATCH_SIZE,
        loadgen=args.loadgen,
        connections=args.connections,
        users=users,
    )


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("MET" if ok else "NOT MET")


def print_notes(results: list[PhaseResult]) -> None:
    for r in results:
        if r.socket_errors:
            print(f"note: {r.scenario}: {r.socket_errors} socket errors/timeouts (not counted as non-2xx)")
        if r.first_error:
            print(f"note: {r.scenario}: first non-2xx: {r.first_error}")
        other = r.host_cpu_pct - r.server_cpu_pct - r.loadgen_cpu_pct
        if other > 30:
            print(
                f"note: {r.scenario}: {other:.0f} % CPU went to other processes or kernel I/O threads "
                "during the phase; figures may be low"
            )


def print_delivery(results: list[PhaseResult]) -> bool | None:
    delivery_ok: bool | None = None
    for r in results:
        d = r.delivery
        if d is None:
            continue
        good = d["complete"] and d["extra_within_bound"]
        delivery_ok = good if delivery_ok is None else delivery_ok and good
        lag = "never caught up" if d["lag_s"] is None else f"lag {d['lag_s']:.2f} s after the load stopped"
        extra = f", {d['unacknowledged_extra']} more than acknowledged" if d["unacknowledged_extra"] else ""
        print(
            f"delivery {r.scenario}: {d['delivered']:,}/{d['expected']:,} events in the sink files, {lag} "
            f"(backlog at load end {d['backlog_at_load_end']:,}){extra}: {'OK' if good else 'FAILED'}"
        )
        if d["unacknowledged_extra"] and d["extra_within_bound"]:
            print("  (extra: requests in flight when the load generator stopped, stored, not acknowledged)")
        us, bound = r.cpu_us_per_event, r.cpu_bound_per_s
        if us is not None and bound is not None:
            print(
                f"  server CPU {us:,.0f} us per event end to end (from the load's start until the sinks "
                f"held them all): with all {NCPU} cores busy, at most {bound:,.0f} events/s"
            )
    return delivery_ok


# The columns every phase table starts with (after its name), and a phase's values for them.
RATE_COLUMNS = (
    Column("req/s", 10, ",.0f"),
    Column("events/s", 11, ",.0f"),
    Column("p50 ms", 9, ".2f"),
    Column("p99 ms", 9, ".2f"),
    Column("errors", 8),
)


def rates(r: PhaseResult) -> list[object]:
    return [r.rps, r.eps, r.p50_ms, r.p99_ms, r.non2xx]


def print_report(results: list[PhaseResult]) -> dict[str, Any]:
    """Gateway vs bare: the table, the ratios and their targets."""
    by = {r.scenario: r for r in results}
    print()
    print("gateway vs bare (gateway with consent enforcement off: the ingest path itself)")
    print_table(
        [
            Column("scenario", 18, left=True),
            *RATE_COLUMNS,
            Column("server%", 9, ".0f"),
            Column("loadgen%", 10, ".0f"),
            Column("host%", 7, ".0f"),
        ],
        [[r.scenario, *rates(r), r.server_cpu_pct, r.loadgen_cpu_pct, r.host_cpu_pct] for r in results],
    )
    print(f"(server%/loadgen%: CPU of that process, 100 = one core; host%: whole machine, max {NCPU * 100})")
    print_notes(results)

    def ratio(a: str, b: str, attr: str) -> float | None:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None or not getattr(rb, attr):
            return None
        return float(getattr(ra, attr) / getattr(rb, attr))

    single_ratio = ratio("gateway single", "bare single", "eps")
    batch_ratio = ratio("gateway batch100", "bare batch100", "eps")

    print()
    print(f"gateway/bare, single events: {fmt(single_ratio and 100 * single_ratio, '.1f')} %")
    print(f"gateway/bare, batches of {BATCH_SIZE}: {fmt(batch_ratio and 100 * batch_ratio, '.1f')} %")
    delivery_ok = print_delivery(results)
    return {"ratios": {"single": single_ratio, "batch100": batch_ratio}, "targets": {"delivery": delivery_ok}}


def end_to_end(res: PhaseResult) -> tuple[float | None, bool | None]:
    """(events/s end to end: acknowledged events over the load time plus the lag until the
    sink held them all; whether the run was sustained: the backlog when the load stopped
    under one second's worth of ingest). None when delivery never caught up."""
    d = res.delivery
    if d is None or d["lag_s"] is None or not res.elapsed_s:
        return None, None
    # this phase's acknowledged events: the sink count it waited for ("expected") also holds
    # what earlier phases on the same gateway delivered
    return res.events / (res.elapsed_s + d["lag_s"]), d["backlog_at_load_end"] <= res.eps


def cpu_ceiling(res: PhaseResult) -> str:
    """What the phase's CPU per event allows on this machine (``cpu_bound_per_s``)."""
    us, bound = res.cpu_us_per_event, res.cpu_bound_per_s
    if us is None or bound is None:
        return "CPU per event unknown: delivery never caught up"
    return f"{us:,.0f} us of server CPU per event: at most {bound:,.0f}/s on {NCPU} busy cores"


def bare_cpu_per_request(bare: PhaseResult) -> str:
    if not bare.rps:
        return "no request answered"
    return f"{1e4 * bare.server_cpu_pct / bare.rps:,.0f} us of CPU per request"


def print_targets(
    results: list[PhaseResult], consent_results: list[PhaseResult], grants: dict[str, Any] | None
) -> dict[str, Any]:
    """Issue 17's targets in one table, each figure beside this machine's bare ceiling.

    The end-to-end target is read from the full pipeline (the enforced gateway's batch
    phase, the round with the median rate: consent enforced for users who granted it) when
    the consent set ran, else from the gateway with enforcement off."""
    by = {r.scenario: r for r in results + consent_results}
    bare_single, bare_batch = by.get(phase_name("bare", "single")), by.get(phase_name("bare", "batch"))
    # over several rounds, the enforced batch phase with the median end-to-end rate
    enforced = sorted(
        (r for r in consent_results if r.scenario == phase_name("enforced", "batch")),
        key=lambda r: end_to_end(r)[0] or 0.0,
    )
    full = enforced[len(enforced) // 2] if enforced else by.get(phase_name("gateway", "batch"))
    rows: list[tuple[str, str, str, bool | None]] = []
    e2e: float | None = None
    sustained: bool | None = None
    if full is not None:
        e2e, sustained = end_to_end(full)
        backlog = full.delivery["backlog_at_load_end"] if full.delivery else None
        met = (
            None if e2e is None else e2e >= TARGET_BATCH_EVENTS_PER_S and bool(sustained) and not full.non2xx
        )
        rows.append(
            (
                f"batches of {BATCH_SIZE} end to end >= {TARGET_BATCH_EVENTS_PER_S:,} events/s, "
                "backlog at load end < 1 s of ingest",
                f"{fmt(e2e, ',.0f')} events/s ({full.scenario}: ingest {full.eps:,.0f}/s, backlog "
                f"{fmt(backlog, ',')}; {cpu_ceiling(full)})",
                f"{bare_batch.eps:,.0f} events/s" if bare_batch else "not run",
                met,
            )
        )
    gw_single = by.get("gateway single")
    if gw_single is not None and bare_single is not None and bare_single.eps:
        ratio = gw_single.eps / bare_single.eps
        rows.append(
            (
                f"single events >= {TARGET_SINGLE_RATIO:.0%} of bare",
                f"{gw_single.rps:,.0f} req/s = {100 * ratio:.1f} % ({cpu_ceiling(gw_single)})",
                f"{bare_single.rps:,.0f} req/s ({bare_cpu_per_request(bare_single)})",
                ratio >= TARGET_SINGLE_RATIO and not gw_single.non2xx,
            )
        )
    if grants is not None:
        rows.append(
            (
                f"consent writes >= {TARGET_GRANTS_PER_S:,} grants/s",
                f"{fmt(grants['per_s'], ',.0f')} grants/s ({grants['concurrency']} connections, "
                "Python client; bench/consent_writes.py drives wrk)",
                "",
                None if grants["per_s"] is None else grants["per_s"] >= TARGET_GRANTS_PER_S,
            )
        )
    if rows:
        print()
        print(f"issue 17 targets (this machine: {NCPU} CPUs)")
        for name, figure, ceiling, met in rows:
            print(f"  {name}: {verdict(met)}")
            print(f"      {figure}" + (f"; bare ceiling {ceiling}" if ceiling else ""))
    return {
        "end_to_end_events_per_s": e2e,
        "sustained": sustained,
        "met": {name: met for name, _, _, met in rows},
    }


def print_consent_report(
    results: list[PhaseResult], grants: dict[str, Any] | None, warnings: list[str]
) -> dict[str, Any]:
    """Consent enforcement: the phases, the loss per kind (medians over the rounds) and its
    target."""
    users = results[0].users if results else 0
    print()
    print(f"consent enforcement off vs on: userIds drawn from u-1..u-{users:,}")
    if grants is not None:
        print(
            f"(enforced gateway: {grants['users']:,} subjects granted {', '.join(CONSENT_PURPOSES)} under "
            f"{CONSENT_NOTICE} in {grants['seconds']:.2f} s, {fmt(grants['per_s'], ',.0f')} grants/s "
            f"with {grants['concurrency']} connections)"
        )
    print_table(
        [
            Column("phase", 20, left=True),
            *RATE_COLUMNS,
            Column("dropped", 9, ","),
            Column("in sink", 9),
            Column("server%", 9, ".0f"),
        ],
        [
            [
                r.scenario,
                *rates(r),
                r.dropped,
                "n/a" if r.forwarded is None else f"{100 * r.forwarded:.1f}%",
                r.server_cpu_pct,
            ]
            for r in results
        ],
    )
    print(
        "(dropped: events the responses counted as dropped; in sink: events in the sink files / events "
        "sent in 2xx requests,\n above 100 % by what was in flight when the load stopped: stored, "
        "not counted)"
    )
    print_notes(results)

    print()
    losses = print_losses("consent enforcement loss", results, "unenforced", "enforced")
    comparable = bool(results) and all(
        r.forwarded is not None and r.forwarded >= MIN_FORWARDED and r.non2xx == 0 for r in results
    )
    measured = [v for v in losses.values() if v is not None]
    target_ok: bool | None = None
    if comparable and measured:
        target_ok = all(v <= TARGET_CONSENT_LOSS for v in measured)
    if comparable or not results:
        target = verdict(target_ok)
    else:
        target = "NOT COMPARABLE (events were not forwarded, or non-2xx answers; see the warnings)"
    print(f"target consent enforcement loses at most {TARGET_CONSENT_LOSS:.0%}: {target}")
    delivery_ok = print_delivery(results)
    for w in warnings:
        print(f"WARNING: {w}")
    return {
        "users": users,
        "grants": grants,
        "loss": losses,
        "comparable": comparable,
        "target_loss_max": TARGET_CONSENT_LOSS,
        "target_met": target_ok,
        "delivery": delivery_ok,
        "warnings": warnings,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the idgate gateway against a bare Litestar app, "
        "and consent enforcement off against on."
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument(
        "--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)"
    )
    p.add_argument(
        "--scenario",
        choices=("all", "single", "batch", "consent", "plan"),
        default="all",
        help="single/batch: gateway vs bare; consent: enforcement off vs on; all: those three; "
        "plan: the seed tracking plan off vs on (issue 14's 15 %% target)",
    )
    p.add_argument(
        "--consent-users",
        type=int,
        default=DEFAULT_CONSENT_USERS,
        help=f"subjects granted consent before the consent phases (default {DEFAULT_CONSENT_USERS:,})",
    )
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else the Python client",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1: on a small machine the servers need the cores)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="the consent and plan sets: alternating rounds of each phase, medians reported (default 3)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    p.add_argument(
        "--no-plan",
        dest="plan",
        action="store_false",
        help="run the gateways without the example's tracking plan (what validation costs)",
    )
    args = p.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--duration, --connections, --threads and --rounds must be positive")
    if not 1 <= args.consent_users <= 1_000_000:
        p.error("--consent-users must be between 1 and 1,000,000")
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


def run_gateway_vs_bare(
    args: argparse.Namespace,
    tmp: Path,
    config: Path,
    kinds: list[str],
    servers: list[Server],
    warnings: list[str],
) -> list[PhaseResult]:
    gateway, bare = start_gateway(tmp, config), start_bare(tmp)
    servers += [gateway, bare]
    try:
        gateway.wait_healthy()
        bare.wait_healthy()
        counter = SinkCounter(gateway.sink_dir)
        preflight(gateway, bare, counter)
        print(
            f"gateway (consent enforcement off) pid {gateway.proc.pid} on :{gateway.port}, bare app pid "
            f"{bare.proc.pid} on :{bare.port}, data {tmp}",
            file=sys.stderr,
        )
        results: list[PhaseResult] = []
        for kind in kinds:
            for server in (bare, gateway):
                res = new_result(phase_name(server.name, kind), server.name, kind, args)
                if server is gateway:
                    gateway_phase(gateway, counter, res, args, tmp)
                    check_forwarded(res, warnings, enforced=False)
                else:
                    print(f"running {res.scenario} for {args.duration:g} s ...", file=sys.stderr)
                    run_phase(server, res, args, tmp)
                results.append(res)
        return results
    finally:  # free the cores for what runs next
        stop(bare.proc)
        stop(gateway.proc)


def run_consent(
    args: argparse.Namespace,
    tmp: Path,
    configs: tuple[Path, Path],
    kinds: list[str],
    servers: list[Server],
    warnings: list[str],
) -> tuple[list[PhaseResult], dict[str, Any]]:
    off = start_gateway(tmp, configs[0], "unenforced")
    on = start_gateway(tmp, configs[1], "enforced")
    servers += [off, on]
    try:
        off.wait_healthy()
        on.wait_healthy()
        counters = {off.name: SinkCounter(off.sink_dir), on.name: SinkCounter(on.sink_dir)}
        preflight_gateway(off, counters[off.name])
        # Enforcement on: an event of a subject without consent must be dropped ...
        accepted, dropped, raw = probe(on, f"bench-no-consent-{uuid.uuid4().hex[:8]}")
        if accepted or not dropped:
            warn(
                warnings,
                f"the enforced gateway did not drop an event of a subject without consent "
                f"({raw[:200]!r}): is consent enforcement on? The comparison measures nothing",
            )
        print(
            f"unenforced gateway pid {off.proc.pid} on :{off.port}, enforced gateway pid {on.proc.pid} "
            f"on :{on.port}, data {tmp}",
            file=sys.stderr,
        )
        print(
            f"granting consent to {args.consent_users:,} subjects on the enforced gateway ...",
            file=sys.stderr,
        )
        grants = grant_consent(on, args.consent_users)
        print(f"granted in {grants['seconds']:.2f} s ({fmt(grants['per_s'], ',.0f')}/s)", file=sys.stderr)
        # ... and one of a subject with consent forwarded.
        before = counters[on.name].count()
        accepted, dropped, raw = probe(on, "u-1")
        if accepted == 1:
            wait_sink(counters[on.name], before + 1)
        else:
            warn(
                warnings,
                f"the enforced gateway dropped an event of u-1 after the grants ({raw[:200]!r}): "
                "events were dropped for lack of consent, the figures are not comparable",
            )
        results = alternating_rounds(
            (off, on), kinds, counters, args, tmp, warnings, users=args.consent_users, enforced=on
        )
        return results, grants
    finally:
        stop(on.proc)
        stop(off.proc)


def alternating_rounds(
    pair: tuple[Server, Server],
    kinds: list[str],
    counters: dict[str, SinkCounter],
    args: argparse.Namespace,
    tmp: Path,
    warnings: list[str],
    *,
    users: int = 0,
    enforced: Server | None = None,
) -> list[PhaseResult]:
    """``--rounds`` rounds of each kind's phase on both gateways of ``pair``, the order
    swapped every round: a neighbour's burst on a shared machine hits both alike, and the
    medians (``median_losses``) see past one unlucky phase."""
    results: list[PhaseResult] = []
    for round_no in range(args.rounds):
        for kind in kinds:
            for server in pair if round_no % 2 == 0 else pair[::-1]:
                res = new_result(phase_name(server.name, kind), server.name, kind, args, users=users)
                gateway_phase(server, counters[server.name], res, args, tmp)
                check_forwarded(res, warnings, enforced=server is enforced)
                results.append(res)
    return results


def median_losses(
    results: list[PhaseResult], base: str, variant: str
) -> dict[str, tuple[float | None, float, float, float | None]]:
    """Per kind: (loss of ``variant`` against ``base`` in events/s, their median events/s,
    and the loss per gateway CPU-second), medians over the rounds; the loss is None when a
    side did not run."""
    out: dict[str, tuple[float | None, float, float, float | None]] = {}
    for kind in ("single", "batch"):
        key = kind_label(kind)
        runs = {
            name: [r for r in results if r.scenario == phase_name(name, kind)] for name in (base, variant)
        }
        if not runs[base] or not runs[variant]:
            out[key] = (None, 0.0, 0.0, None)
            continue
        eps = {n: statistics.median(r.eps for r in rs) for n, rs in runs.items()}
        per_cpu = {
            n: statistics.median([r.eps / r.server_cpu_pct * 100 for r in rs if r.server_cpu_pct] or [0.0])
            for n, rs in runs.items()
        }
        loss = 1 - eps[variant] / eps[base] if eps[base] else None
        cpu_loss = 1 - per_cpu[variant] / per_cpu[base] if per_cpu[base] else None
        out[key] = (loss, eps[variant], eps[base], cpu_loss)
    return out


def print_losses(title: str, results: list[PhaseResult], base: str, variant: str) -> dict[str, float | None]:
    """Print ``median_losses`` per kind; returns the losses."""
    rounds = sum(r.scenario == phase_name(base, "single") for r in results) or sum(
        r.scenario == phase_name(base, "batch") for r in results
    )
    if rounds > 1:
        print(f"medians of {rounds} alternating rounds per phase:")
    losses: dict[str, float | None] = {}
    for key, (loss, variant_eps, base_eps, cpu_loss) in median_losses(results, base, variant).items():
        losses[key] = loss
        if loss is None:
            continue
        print(
            f"{title}, {key}: {fmt(100 * loss, '.1f')} % ({variant_eps:,.0f} vs {base_eps:,.0f} events/s); "
            f"per gateway CPU-second {fmt(cpu_loss and 100 * cpu_loss, '.1f')} %"
        )
    return losses


def run_plan(
    args: argparse.Namespace,
    tmp: Path,
    config: Path,
    kinds: list[str],
    servers: list[Server],
    warnings: list[str],
) -> list[PhaseResult]:
    """What validation on the seed plan costs: the consent-off gateway with the example's
    tracking plan against the same config without it, the same load, phases alternating."""
    planless_config = tmp / "idgate-unenforced-planless.toml"
    planless_config.write_text(without_plan(config.read_text(encoding="utf-8")), encoding="utf-8")
    planless = start_gateway(tmp, planless_config, "planless")
    planned = start_gateway(tmp, config, "plan")
    servers += [planless, planned]
    try:
        planless.wait_healthy()
        planned.wait_healthy()
        counters = {s.name: SinkCounter(s.sink_dir) for s in (planless, planned)}
        for server in (planless, planned):
            preflight_gateway(server, counters[server.name])
        return alternating_rounds((planless, planned), kinds, counters, args, tmp, warnings)
    finally:
        stop(planned.proc)
        stop(planless.proc)


def print_plan_report(results: list[PhaseResult], warnings: list[str]) -> dict[str, Any]:
    """Tracking plan on vs off: the phases, the loss per kind and its target (issue 14)."""
    print()
    print("tracking plan off vs on (the example's seed plan; consent enforcement off on both)")
    print_table(
        [Column("phase", 20, left=True), *RATE_COLUMNS, Column("server%", 9, ".0f")],
        [[r.scenario, *rates(r), r.server_cpu_pct] for r in results],
    )
    print_notes(results)
    print()
    losses = print_losses("tracking plan loss", results, "planless", "plan")
    measured = [v for v in losses.values() if v is not None]
    clean = all(r.non2xx == 0 for r in results)
    ok = None if not measured or not clean else all(v <= TARGET_PLAN_LOSS for v in measured)
    print(f"target validation on the seed plan loses at most {TARGET_PLAN_LOSS:.0%}: {verdict(ok)}")
    delivery_ok = print_delivery(results)
    for w in warnings:
        print(f"WARNING: {w}")
    return {"loss": losses, "target_loss_max": TARGET_PLAN_LOSS, "target_met": ok, "delivery": delivery_ok}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-"))
    servers: list[Server] = []
    try:
        configs = write_configs(tmp, plan=args.plan)
        vs_bare = {"all": ["single", "batch"], "single": ["single"], "batch": ["batch"]}.get(args.scenario)
        consent = ["single", "batch"] if args.scenario in ("all", "consent") else []
        plan = ["single", "batch"] if args.scenario == "plan" else []
        plan_warnings: list[str] = []
        plan_results: list[PhaseResult] = []
        warnings: list[str] = []  # gateway vs bare
        consent_warnings: list[str] = []
        results: list[PhaseResult] = []
        consent_results: list[PhaseResult] = []
        grants: dict[str, Any] | None = None
        if vs_bare:
            results = run_gateway_vs_bare(args, tmp, configs[0], vs_bare, servers, warnings)
        if consent:
            consent_results, grants = run_consent(args, tmp, configs, consent, servers, consent_warnings)
        if plan:
            if not args.plan:
                raise RuntimeError("--scenario plan compares the plan against none: drop --no-plan")
            plan_results = run_plan(args, tmp, configs[0], plan, servers, plan_warnings)

        loadgen = args.loadgen
        print()
        print(
            f"idgate ingest benchmark: {args.duration:g} s per phase, {args.connections} connections, "
            f"load generator {loadgen}"
            + (f" ({args.threads} thread(s))" if loadgen == "wrk" else "")
            + f", {NCPU} CPUs"
        )
        summary: dict[str, Any] = {
            "duration_s": args.duration,
            "connections": args.connections,
            "loadgen": loadgen,
            "cpus": NCPU,
            "scenarios": {r.scenario: r.summary() for r in results + consent_results + plan_results},
            "ratios": {},
            "targets": {},
        }
        if results:
            summary.update(print_report(results))
            for w in warnings:
                print(f"WARNING: {w}")
            summary["warnings"] = warnings
        if consent_results:
            c = print_consent_report(consent_results, grants, consent_warnings)
            summary["consent"] = c
            summary["ratios"]["consent_loss"] = c["loss"]
            summary["targets"]["consent_loss"] = c["target_met"]
        if plan_results:
            summary["plan"] = print_plan_report(plan_results, plan_warnings)
            summary["ratios"]["plan_loss"] = summary["plan"]["loss"]
            summary["targets"]["plan_loss"] = summary["plan"]["target_met"]
        else:
            summary["issue17"] = print_targets(results, consent_results, grants)
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
