"""Withdrawal propagation between replicas under load, for bench/distributed.py.

The load of bench/distributed.py runs on tenant ``acme`` with consent enforcement off (so
its figures measure the ingest and delivery path, as before). The probe therefore has its
own tenant, ``bench-probe``, appended to the benchmark's config with enforcement on, a
server source (its key is a secret, so it may record consent for a user id, as the shop's
backend does) and its own destination and sink directory. Same processes, same PostgreSQL
ledger and Redis consent state, same load on them.

One round, on a fresh subject, replica A recording consent and replica B ingesting:

1. A: ``POST /v1/consent`` grants ``analytics``;
2. B: one event of the subject must be accepted (else the round is void: a drop after the
   withdrawal could not be told from a grant B never saw);
3. A: ``POST /v1/consent`` withdraws ``analytics``; the clock starts at its 2xx;
4. B: events of the subject, back to back, until one is dropped (the ingest response's
   ``dropped`` counts it by reason: ``withdrawn``), or a deadline passes.

Recorded per round: the time from the withdrawal's 2xx to the response that dropped the
event (what the target is about), the time that dropped request was sent (its own latency
on the loaded replica is the difference) and how many events B still accepted after the
2xx (the design says none: a withdrawal acknowledged at T stops every event received
after T, on every replica).
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

PROBE_TENANT = "bench-probe"
PROBE_WRITE_KEY = "bench-probe-server-key-00000000000000001"
PROBE_AUTH = "Basic " + base64.b64encode(f"{PROBE_WRITE_KEY}:".encode()).decode()
PROBE_NOTICE = "probe-notice-1"
PROBE_PURPOSE = "analytics"
PROBE_DESTINATION = "probe-warehouse"
# How long B may keep accepting after the withdrawal's 2xx before the round counts as
# "never effective" (an infinite time for the percentiles).
EFFECT_DEADLINE_S = 10.0
TARGET_P99_MS = 100.0

PROBE_TENANT_TOML = f"""

# written by bench/distributed.py (bench/withdrawal_probe.py): the withdrawal probe's own
# tenant, consent enforced, while the load's tenant runs with enforcement off
[[tenants]]
id = "{PROBE_TENANT}"
name = "Withdrawal probe"
default_kpis = false

[[tenants.sources]]
id = "bench-probe-server"
platform = "server"
dev_write_key = "{PROBE_WRITE_KEY}"

[[tenants.notices]]
id = "{PROBE_NOTICE}"
content_sha256 = "{"0" * 63}1"

[tenants.tracking_plan]
"*" = ["{PROBE_PURPOSE}"]

[[tenants.destinations]]
id = "{PROBE_DESTINATION}"
sink = "jsonl"
purposes = ["{PROBE_PURPOSE}"]
region = "mainland"
recipient = {{ name = "bench probe" }}
"""


def probe_config_text(load_config: str) -> str:
    """The load's config with the probe's tenant appended (a ``[[tenants]]`` element after
    the last table of the file)."""
    return load_config.rstrip("\n") + "\n" + PROBE_TENANT_TOML


class _Replica:
    """One keep-alive connection to a replica (reopened when the server closed it)."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Authorization": PROBE_AUTH}
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request("POST", path, data, headers)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # an idle keep-alive connection the server closed: once more on a new one
                self.close()
                if attempt == 2:
                    raise
                continue
            try:
                doc = json.loads(raw) if raw else {}
            except ValueError:
                doc = {"raw": raw[:300].decode(errors="replace")}
            return resp.status, doc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Round:
    a: str
    b: str
    # seconds from the withdrawal's 2xx: to the response that dropped B's event, and to
    # the moment that request was sent; None when B never dropped it within the deadline
    to_drop_response_s: float | None = None
    to_drop_request_s: float | None = None
    accepted_after: int = 0  # events B accepted after the withdrawal's 2xx
    reason: str = ""  # the drop reason of B's answer
    withdrawal_pending: bool = False  # the receipt said "pending" (state not yet updated)


@dataclass
class ProbeResult:
    rounds: list[Round] = field(default_factory=list)
    # rounds where B did not accept the subject's event after the grant: no measurement
    void: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        measured = [r for r in self.rounds if r.to_drop_response_s is not None]
        never = len(self.rounds) - len(measured)
        resp_ms = sorted(1000 * r.to_drop_response_s for r in measured if r.to_drop_response_s is not None)
        sent_ms = sorted(1000 * r.to_drop_request_s for r in measured if r.to_drop_request_s is not None)
        # a round that never took effect counts as infinitely slow
        with_never = resp_ms + [float("inf")] * never
        reasons: dict[str, int] = {}
        for r in measured:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        p99 = percentile(with_never, 0.99)
        return {
            "rounds": len(self.rounds),
            "void_rounds": len(self.void),
            "errors": len(self.errors),
            "never_effective": never,
            "rounds_with_accepts_after_withdrawal": sum(1 for r in self.rounds if r.accepted_after),
            "events_accepted_after_withdrawal": sum(r.accepted_after for r in self.rounds),
            "pending_receipts": sum(1 for r in self.rounds if r.withdrawal_pending),
            "drop_reasons": reasons,
            "to_drop_response_ms": {
                "p50": _round(percentile(with_never, 0.50)),
                "p99": _round(p99),
                "max": _round(with_never[-1] if with_never else None),
            },
            "to_drop_request_ms": {
                "p50": _round(percentile(sent_ms, 0.50)),
                "p99": _round(percentile(sent_ms, 0.99)),
                "max": _round(sent_ms[-1] if sent_ms else None),
            },
            "drop_request_latency_ms_median": _round(
                statistics.median(
                    1000 * (r.to_drop_response_s - r.to_drop_request_s)
                    for r in measured
                    if r.to_drop_response_s is not None and r.to_drop_request_s is not None
                )
                if measured
                else None
            ),
            "seconds": round(self.seconds, 2),
            "target_p99_ms": TARGET_P99_MS,
            "target_met": None if not self.rounds else (p99 is not None and p99 < TARGET_P99_MS),
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n q), at least 1
    return sorted_values[int(rank) - 1]


def _round(v: float | None) -> float | None:
    return None if v is None else (v if v == float("inf") else round(v, 1))


class WithdrawalProbe:
    """Rounds of grant / check / withdraw / poll over pairs of replicas until ``rounds`` are
    done or ``stop`` is set, ``workers`` rounds at a time (each worker its own connections).
    The pair moves on each round (A = replica k, B = replica k+1)."""

    def __init__(
        self,
        replicas: list[tuple[str, str, int]],
        rounds: int,
        stop: threading.Event,
        tag: str,
        workers: int = 1,
    ) -> None:
        if len(replicas) < 2:
            raise ValueError("the withdrawal probe needs two replicas")
        self.replicas = replicas
        self.wanted = rounds
        self.stop = stop
        self.tag = tag
        self.result = ProbeResult()
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"withdrawal-probe-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()
        for t in self._threads:
            t.start()

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not self.is_alive():
            self.result.seconds = time.perf_counter() - self._started

    def _take(self) -> int | None:
        """The next round's number, or None when enough rounds are started or done."""
        with self._lock:
            if self._next >= self.wanted or self.stop.is_set() or len(self.result.errors) >= 20:
                return None
            self._next += 1
            return self._next - 1

    def _work(self) -> None:
        conns = [_Replica(*r) for r in self.replicas]
        try:
            while (k := self._take()) is not None:
                n = len(conns)
                self._round(conns[k % n], conns[(k + 1) % n], k)
        except BaseException as exc:  # reported by the benchmark, which goes on
            with self._lock:
                self.failure = self.failure or exc
        finally:
            for c in conns:
                c.close()

    def _event(self, user: str) -> dict[str, Any]:
        return {
            "userId": user,
            "event": "Product Viewed",
            "properties": {"product_id": "A1"},
            "messageId": f"probe-{uuid.uuid4().hex}",
        }

    def _round(self, a: _Replica, b: _Replica, k: int) -> None:
        user = f"probe-{self.tag}-{k}-{uuid.uuid4().hex[:8]}"
        grant = {"userId": user, "grant": [PROBE_PURPOSE], "noticeId": PROBE_NOTICE}
        status, doc = a.post("/v1/consent", grant)
        if status != 200:
            self._error(f"grant on {a.name}: HTTP {status} {str(doc)[:200]}")
            return
        status, doc = b.post("/v1/track", self._event(user))
        if status != 200 or doc.get("accepted") != 1:
            with self._lock:
                self.result.void.append(
                    f"{b.name} did not accept {user}'s event after the grant on {a.name}: HTTP {status} "
                    f"{str(doc)[:200]}"
                )
            return
        status, doc = a.post("/v1/consent", {"userId": user, "withdraw": [PROBE_PURPOSE]})
        acked = time.perf_counter()
        if status != 200:
            self._error(f"withdrawal on {a.name}: HTTP {status} {str(doc)[:200]}")
            return
        result = Round(a.name, b.name)
        result.withdrawal_pending = any(r.get("pending") for r in doc.get("recorded", []))
        deadline = acked + EFFECT_DEADLINE_S
        while True:
            sent = time.perf_counter()
            status, doc = b.post("/v1/track", self._event(user))
            answered = time.perf_counter()
            if status != 200:
                self._error(f"event on {b.name}: HTTP {status} {str(doc)[:200]}")
                return
            dropped = {k: v for k, v in (doc.get("dropped") or {}).items() if v}
            if doc.get("accepted") == 0 and dropped:
                result.to_drop_response_s = answered - acked
                result.to_drop_request_s = sent - acked
                result.reason = ",".join(sorted(dropped))
                break
            result.accepted_after += 1
            if answered >= deadline:
                break
        with self._lock:
            if not self.stop.is_set():  # a round still going when the load stopped is not kept
                self.result.rounds.append(result)

    def _error(self, message: str) -> None:
        with self._lock:
            self.result.errors.append(message)
