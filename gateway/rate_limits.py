"""Rate limits and quotas: how much one source, one client network and one person can make
idgate do and store (design section 5a, issue 11).

- Per source and per client IP (truncated to /24 or /48 first, like every stored IP, so
  no raw address is ever a key): requests per second and events per second.
- Per subject (a pseudonym, never a raw identifier): consent records per day, and new
  identifiers linked to a person per day.

A request over a rate limit is answered 429 with ``Retry-After`` (``RateLimited``, mapped
in gateway.errors) before anything of it is stored. An event over the identifier quota is
still processed but not linked: what the quota bounds is what the graph can grow by.

The per-second limits are paced (GCRA, the generic cell rate algorithm): each key has a
theoretical arrival time that every admitted request moves on by its cost (amount / rate
seconds) and that may run at most ``burst_seconds`` ahead of the clock. A client may send
that much of its budget at once and then no faster than its rate, so a flood held to its
limit is admitted evenly instead of as one burst at the start of every second, which the
other sources' requests would queue behind. The quotas (per hour, per day) are fixed
windows. Both live in memory in the embedded mode and in Redis in the distributed mode, so
N replicas share one budget: one Lua script per request checks every key the request
touches in one round trip (the ``limits`` library would cost one round trip per limit,
four on every ingest request).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from prometheus_client import Counter

from gateway.config import RateLimits
from identity.scrub import truncate_ip

_log = structlog.get_logger("idgate.rate_limits")

RATE_LIMITED = Counter(
    "idgate_rate_limited_total",
    "Requests (or consent calls, or links) refused by a rate limit or quota",
    ["tenant", "source", "limit"],
)

SECOND = 1
HOUR = 3_600
DAY = 86_400

# The client network of the request being handled (set by the rate check at its start), so
# the pipeline's consent events count against the same network as the consent API.
CLIENT_NETWORK: ContextVar[str] = ContextVar("client_network", default="unknown")


class RateLimited(Exception):
    """Over a limit: answered 429 with ``Retry-After`` naming the limit."""

    def __init__(self, limit: str, retry_after: int, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit
        self.retry_after = retry_after
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Hit:
    """One counter a request adds to: ``amount`` within a window of ``window`` seconds."""

    limit: str  # the setting's name, e.g. "ip_requests_per_second"
    key: str
    amount: int
    allowed: int
    window: int


class CounterStore(Protocol):
    async def hit(self, hits: Sequence[Hit]) -> tuple[int, int] | None:
        """Add every hit; the index of the first over its limit and the seconds until its
        window ends, or None."""
        ...

    async def pace(self, hits: Sequence[Hit], burst: float) -> tuple[int, float] | None:
        """Admit the request when every hit has room (``paced``): then move each key's
        arrival time on by its cost; else change nothing and return the index of the first
        hit without room and the seconds until it has."""
        ...

    async def add_members(self, subjects: Sequence[tuple[str, Sequence[str]]], allowed: int) -> list[bool]:
        """Per subject: add the members to its set for the day unless the set would then
        hold more than ``allowed``; True when added (or nothing new)."""
        ...

    async def forget(self, values: Collection[str]) -> int:
        """Drop every counter and identifier set naming one of ``values`` (an erased person's
        pseudonyms: a deletion request); returns how many."""
        ...


def paced(tat: float, now: float, cost: float, burst: float) -> tuple[float, float]:
    """GCRA for one key: (its arrival time after admitting a request of ``cost`` seconds,
    the seconds to wait first: 0 when admitted now). A key may run ``burst`` seconds ahead of
    the clock; a request costing more than that is admitted once the key is at rest."""
    start = max(tat, now)
    return start + cost, max(0.0, start - now + cost - max(burst, cost))


def _closed(hits: Sequence[Hit]) -> tuple[int, float] | None:
    """The first hit whose key allows nothing (refused, retry in a second), or None: every
    hit then has a finite cost, ``amount / allowed`` seconds of its key's budget."""
    return next(((i, 1.0) for i, h in enumerate(hits) if h.allowed <= 0), None)


@dataclass
class MemoryCounters:
    """Counters of one process (embedded mode). Each window's table is replaced when the
    window ends, and paced keys are dropped once at rest, so memory is bounded by what one
    window (or one burst) can see."""

    clock: Callable[[], float] = time.time
    _windows: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)
    _members: tuple[int, dict[str, set[str]]] = (-1, {})
    # paced keys -> arrival time (a key whose time has passed is at rest: it is dropped)
    _arrivals: dict[str, float] = field(default_factory=dict)
    _swept: float = 0.0

    def _table(self, window: int, now: float) -> dict[str, int]:
        wid = int(now // window)
        current = self._windows.get(window)
        if current is None or current[0] != wid:
            current = self._windows[window] = (wid, {})
        return current[1]

    async def hit(self, hits: Sequence[Hit]) -> tuple[int, int] | None:
        now = self.clock()
        over: tuple[int, int] | None = None
        for i, h in enumerate(hits):
            table = self._table(h.window, now)
            n = table.get(h.key, 0) + h.amount
            table[h.key] = n
            if n > h.allowed and over is None:
                over = (i, max(1, math.ceil(h.window - now % h.window)))
        return over

    async def pace(self, hits: Sequence[Hit], burst: float) -> tuple[int, float] | None:
        if (closed := _closed(hits)) is not None:
            return closed
        now = self.clock()
        arrivals = self._arrivals
        if now - self._swept >= 1.0:  # memory: what one second's requests can name
            self._arrivals = arrivals = {k: t for k, t in arrivals.items() if t > now}
            self._swept = now
        admitted = []
        for i, h in enumerate(hits):
            tat, wait = paced(arrivals.get(h.key, now), now, h.amount / h.allowed, burst)
            if wait > 0:
                return i, wait
            admitted.append(tat)
        for h, tat in zip(hits, admitted, strict=True):
            arrivals[h.key] = tat
        return None

    async def forget(self, values: Collection[str]) -> int:
        wanted = set(values)
        gone = 0
        for _, table in self._windows.values():
            for key in [k for k in table if any(v in k for v in wanted)]:
                del table[key]
                gone += 1
        sets = self._members[1]
        for subject in [s for s, m in sets.items() if m & wanted or any(v in s for v in wanted)]:
            del sets[subject]
            gone += 1
        return gone

    async def add_members(self, subjects: Sequence[tuple[str, Sequence[str]]], allowed: int) -> list[bool]:
        day = int(self.clock() // DAY)
        if self._members[0] != day:
            self._members = (day, {})
        sets = self._members[1]
        out = []
        for subject, members in subjects:
            have = sets.setdefault(subject, set())
            new = set(members) - have
            if len(have) + len(new) > allowed:
                out.append(False)
                continue
            have |= new
            out.append(True)
        return out


# KEYS: one counter per hit; ARGV: per hit amount, allowed, window. Returns {index, ttl} of
# the first hit over its limit, or {0, 0}.
_HIT = """
local over, ttl = 0, 0
for i, key in ipairs(KEYS) do
  local amount = tonumber(ARGV[3 * i - 2])
  local n = redis.call('INCRBY', key, amount)
  if n == amount then redis.call('EXPIRE', key, ARGV[3 * i]) end
  if over == 0 and n > tonumber(ARGV[3 * i - 1]) then
    over, ttl = i, redis.call('TTL', key)
  end
end
return {over, ttl}
"""

# KEYS: one arrival time (ms) per hit; ARGV: burst (ms), then per hit its cost (ms). The same
# rule as ``paced``, on Redis's clock (one clock for every replica). Returns {index, wait ms}
# of the first hit without room (nothing changed), or {0, 0} (every key moved on).
_PACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local burst = tonumber(ARGV[1])
local moved = {}
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[i + 1])
  local start = math.max(tonumber(redis.call('GET', key) or 0), now)
  local wait = start - now + cost - math.max(burst, cost)
  if wait > 0 then return {i, math.ceil(wait)} end
  moved[i] = start + cost
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.3f', moved[i]), 'PX', math.ceil(moved[i] - now) + 1000)
end
return {0, 0}
"""

# KEYS: one set per subject; ARGV: allowed, window, then per subject a count and its members.
_MEMBERS = """
local allowed = tonumber(ARGV[1])
local at = 3
local out = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  local members = {}
  for j = 1, n do members[j] = ARGV[at + j] end
  at = at + n + 1
  local new = 0
  for _, m in ipairs(members) do
    if redis.call('SISMEMBER', key, m) == 0 then new = new + 1 end
  end
  if new == 0 then
    out[i] = 1
  elseif redis.call('SCARD', key) + new > allowed then
    out[i] = 0
  else
    redis.call('SADD', key, unpack(members))
    redis.call('EXPIRE', key, ARGV[2])
    out[i] = 1
  end
end
return out
"""


class RedisCounters:
    """Counters shared by every replica (distributed mode). Keys hold truncated IPs, source
    ids and pseudonyms only, and expire with their window."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.prefix = prefix
        self.client = client
        self._hit = client.register_script(_HIT)
        self._pace = client.register_script(_PACE)
        self._members = client.register_script(_MEMBERS)

    async def hit(self, hits: Sequence[Hit]) -> tuple[int, int] | None:
        now = int(time.time())
        keys = [f"{self.prefix}:rl:{h.key}:{now // h.window}" for h in hits]
        args: list[int] = []
        for h in hits:
            args += [h.amount, h.allowed, h.window + 1]
        over, ttl = await self._hit(keys=keys, args=args)
        if not over:
            return None
        return int(over) - 1, max(1, int(ttl))

    async def pace(self, hits: Sequence[Hit], burst: float) -> tuple[int, float] | None:
        if (closed := _closed(hits)) is not None:
            return closed
        keys = [f"{self.prefix}:rl:pace:{h.key}" for h in hits]
        costs = [h.amount * 1000 / h.allowed for h in hits]
        over, wait = await self._pace(keys=keys, args=[burst * 1000, *costs])
        if not over:
            return None
        return int(over) - 1, int(wait) / 1000

    async def forget(self, values: Collection[str]) -> int:
        """A scan of the counters (they expire within a day: a bounded set), the identifier
        sets asked in pipelined chunks."""
        wanted = sorted(set(values))
        doomed: list[bytes] = []
        sets: list[bytes] = []
        async for key in self.client.scan_iter(match=f"{self.prefix}:rl:*", count=1000):
            name = key.decode(errors="replace")
            if any(v in name for v in wanted):
                doomed.append(key)
            elif name.startswith(f"{self.prefix}:rl:ids:"):
                sets.append(key)
        for lo in range(0, len(sets), 500):
            chunk = sets[lo : lo + 500]
            async with self.client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.smismember(key, wanted)
                found = await pipe.execute()
            doomed += [k for k, flags in zip(chunk, found, strict=True) if any(flags)]
        return int(await self.client.delete(*doomed)) if doomed else 0

    async def add_members(self, subjects: Sequence[tuple[str, Sequence[str]]], allowed: int) -> list[bool]:
        if not subjects:
            return []
        day = int(time.time()) // DAY
        keys = [f"{self.prefix}:rl:ids:{s}:{day}" for s, _ in subjects]
        args: list[Any] = [allowed, DAY + 60]
        for _, members in subjects:
            args += [len(members), *members]
        return [bool(x) for x in await self._members(keys=keys, args=args)]


def client_ip(scope: Any, forwarded_hops: int) -> str:
    """The caller's network, truncated: the peer address, or with ``forwarded_hops`` proxies
    in front (each appends one X-Forwarded-For entry) the entry they saw the request from."""
    return _network(client_address(scope, forwarded_hops))


def client_address(scope: Any, forwarded_hops: int) -> str:
    """The caller's full address (see ``client_ip``), for checks only: never stored or logged."""
    raw = ""
    if forwarded_hops:
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                entries = [e.strip() for e in value.decode("latin-1").split(",") if e.strip()]
                if len(entries) >= forwarded_hops:
                    raw = entries[-forwarded_hops]
                break
    if not raw:
        client = scope.get("client")
        raw = client[0] if client else ""
    return raw


@functools.lru_cache(maxsize=4096)
def _network(raw: str) -> str:
    return truncate_ip(raw) or "unknown"


_DETAIL = {
    "source_requests_per_second": "requests per second from this source",
    "source_events_per_second": "events per second from this source",
    "ip_requests_per_second": "requests per second from this client network",
    "ip_events_per_second": "events per second from this client network",
    "consent_records_per_subject_per_day": "consent calls per day for this subject",
    "ip_consent_calls_per_hour": "consent calls per hour from this client network",
}


@dataclass
class RateLimiter:
    """The configured limits over a counter store (memory or Redis)."""

    limits: RateLimits
    store: CounterStore
    # paced budgets known to have no room: (src, net) key -> (monotonic time it has room
    # again, the hit). Until then every request of that source or network is refused
    # without the round trip and before its body is decoded (a flood costs little more than
    # its bytes).
    _spent: dict[str, tuple[float, Hit]] = field(default_factory=dict)
    # The counters' store (Redis) is unreachable: limits fail open (they protect capacity;
    # what must not be lost, a withdrawal above all, must not wait on them), one log line
    # per outage. Dedupe and the outbox still answer 503 where they need the store.
    _store_down: bool = False

    async def _counted(self, call: Any) -> Any:
        try:
            result = await call
        except Exception as exc:
            if not self._store_down:
                self._store_down = True
                _log.warning("rate_limits.store_unavailable", error=type(exc).__name__, effect="limits off")
            return None
        if self._store_down:
            self._store_down = False
            _log.info("rate_limits.store_back")
        return result

    def refuse_early(self, tenant: str, source: str, ip: str) -> None:
        """``RateLimited`` at once while the source's or network's paced budget is known to
        have no room (a refusal said how long until it has)."""
        spent = self._spent
        if not spent:
            return
        now = time.monotonic()
        for key in (f"{{{tenant}}}:src:{source}", f"{{{tenant}}}:ip:{ip}"):
            found = spent.get(key)
            if found is not None:
                until, hit = found
                if now < until:
                    raise self._refuse(tenant, source, hit, max(1, math.ceil(until - now)))
                del spent[key]

    def _remember_spent(self, hit: Hit, wait: float) -> None:
        now = time.monotonic()
        if len(self._spent) >= 10_000:  # a flood from many networks: forget the expired
            self._spent = {k: v for k, v in self._spent.items() if v[0] > now}
        self._spent[hit.key.rsplit(":", 1)[0]] = (now + wait, hit)

    def _refuse(self, tenant: str, source: str, hit: Hit, retry_after: int) -> RateLimited:
        RATE_LIMITED.labels(tenant, source, hit.limit).inc()
        return RateLimited(
            f"rate_limits.{hit.limit}",
            retry_after,
            f"over rate_limits.{hit.limit} = {hit.allowed} ({_DETAIL.get(hit.limit, hit.limit)}); "
            f"retry after {retry_after} s",
        )

    async def check_request(self, tenant: str, source: str, ip: str, events: int) -> None:
        """Count one request of ``events`` events; ``RateLimited`` when over a limit."""
        lim = self.limits
        if not lim.enabled:
            return
        CLIENT_NETWORK.set(ip)
        src = f"{{{tenant}}}:src:{source}"
        net = f"{{{tenant}}}:ip:{ip}"
        hits = (
            Hit("source_requests_per_second", src + ":req", 1, lim.source_requests_per_second, SECOND),
            Hit("source_events_per_second", src + ":ev", events, lim.source_events_per_second, SECOND),
            Hit("ip_requests_per_second", net + ":req", 1, lim.ip_requests_per_second, SECOND),
            Hit("ip_events_per_second", net + ":ev", events, lim.ip_events_per_second, SECOND),
        )
        paced_out = await self._counted(self.store.pace(hits, lim.burst_seconds))
        if paced_out is not None:
            hit, wait = hits[paced_out[0]], paced_out[1]
            self._remember_spent(hit, wait)
            raise self._refuse(tenant, source, hit, max(1, math.ceil(wait)))

    async def check_consent(self, tenant: str, source: str, subjects: Sequence[str]) -> None:
        """Count one consent call for its client network (per hour: what bounds how many
        subjects one network can make the ledger and the consent state hold) and for each
        pseudonym it names (per day)."""
        lim = self.limits
        if not lim.enabled or not subjects:
            return
        network = Hit(
            "ip_consent_calls_per_hour",
            f"{{{tenant}}}:ip:{CLIENT_NETWORK.get()}:consent",
            1,
            lim.ip_consent_calls_per_hour,
            HOUR,
        )
        hits = [network] + [
            Hit(
                "consent_records_per_subject_per_day",
                f"{{{tenant}}}:consent:{s}",
                1,
                lim.consent_records_per_subject_per_day,
                DAY,
            )
            for s in subjects
        ]
        over = await self._counted(self.store.hit(hits))
        if over is not None:
            raise self._refuse(tenant, source, hits[over[0]], over[1])

    async def allow_links(
        self, tenant: str, source: str, subjects: Sequence[tuple[str, Sequence[str]]]
    ) -> list[bool]:
        """Per (subject, identifiers): may they be linked today without the subject passing
        ``new_identifiers_per_person_per_day``? Refusals are counted."""
        lim = self.limits
        if not lim.enabled or not subjects:
            return [True] * len(subjects)
        allowed = await self._counted(
            self.store.add_members(
                [(f"{{{tenant}}}:{s}", m) for s, m in subjects], lim.new_identifiers_per_person_per_day
            )
        )
        if allowed is None:
            return [True] * len(subjects)
        verdicts: list[bool] = allowed
        refused = verdicts.count(False)
        if refused:
            RATE_LIMITED.labels(tenant, source, "new_identifiers_per_person_per_day").inc(refused)
        return verdicts


# Refused admin requests written to the access log per client network and minute: beyond
# this a flood of bad tokens is only counted, so it cannot grow the database.
REFUSALS_LOGGED_PER_MINUTE = 60


async def may_log_refusal(limiter: RateLimiter | None, ip: str) -> bool:
    """Whether this client network's refused admin request still goes to the access log."""
    if limiter is None:
        return True
    hit = Hit(
        "admin_refusals_logged_per_minute", f"{{admin}}:refused:{ip}", 1, REFUSALS_LOGGED_PER_MINUTE, 60
    )
    if await limiter.store.hit((hit,)) is None:
        return True
    RATE_LIMITED.labels("", "admin", hit.limit).inc()
    return False


def open_rate_limiter(limits: RateLimits, redis_client: Any, prefix: str) -> RateLimiter:
    """Shared counters in Redis when the gateway has one (distributed mode), else in memory."""
    store: CounterStore = (
        RedisCounters(redis_client, prefix) if redis_client is not None else MemoryCounters()
    )
    return RateLimiter(limits, store)
