"""Alert rules over the business KPIs, their shared state, the evaluation lease and the
notification channels (DingTalk, Feishu/Lark, WeCom robots, a generic webhook, e-mail).

With several replicas exactly one evaluates at a time: it holds a lease in Redis
(``SET NX PX``, renewed by a compare-and-extend script); when it dies the lease expires
and another takes over. The rule states (firing since, last notified) live beside the
lease, so the new holder neither fires again what already fired nor forgets to resolve.
Alert texts carry config ids and numbers only, never an identifier.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import smtplib
import string
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import structlog

from export.alert_history import AlertHistory, AlertRecord, ChannelDelivery
from export.kpis import COMPARE_OFFSETS, WINDOWS, KpiDefinition, KpiReport, WindowValue
from identity.key_files import key_file_mode_problem

log = structlog.get_logger("idgate.alerts")

Condition = Literal["below", "above", "drop", "rise"]
Compare = Literal["previous", "day_ago", "week_ago"]
# How long a window lasts in config checks, which know no IDGATE_KPI_BUCKET_MS: the default.
CHECK_BUCKET_SECONDS = 60
ChannelKind = Literal["dingtalk", "feishu", "wecom", "webhook", "email", "sms"]
# What an SMS provider template may say: the alert's short text, the numbers, the secret.
SMS_PLACEHOLDERS = frozenset({"message", "recipients", "recipient_list", "secret"})
SMS_MAX_CHARS = 300


class AlertRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[[tenants.alerts]]``: when a KPI over a window crosses a line."""

    id: str
    kpi: str
    # the sliding window, in KPI buckets (1, 5, 10 or 60)
    window: int = 10
    # below / above: the value against ``threshold``; drop / rise: the relative change
    # against ``compare`` (threshold 0.2: by 20 %)
    condition: Condition = "below"
    threshold: float = 0.0
    # drop / rise: the window before, or the same window a day or a week earlier
    compare: Compare = "previous"
    # drop / rise against the window before: compare with this many buckets just before the
    # window instead of a window of its own length (0). A short window against a longer
    # baseline (1 against 10) pages within a minute of a step and has no blind spot.
    baseline: int = 0
    # fewer counted events than this in the window: the rule stays quiet
    min_volume: int = 0
    # how long the condition must hold before the rule fires (pending until then)
    for_seconds: int = 0
    # one source's window instead of the total (a source falling silent); a day or a week
    # back keeps that source's KPI history (export.kpis source_history)
    source: str = ""
    # "coverage": the share of matching events the KPI could count (below / above only):
    # on a KPI of every event ("*") for analytics, the share not dropped for consent
    measure: Literal["value", "coverage"] = "value"
    # after a notification, another firing one waits at least this long (no flapping spam)
    cooldown_seconds: int = 600
    severity: Literal["info", "warning", "critical"] = "warning"
    channels: list[str] = []
    description: str = ""


class AlertChannel(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[[alert_channels]]``: where notifications go. Secrets are named by env variable
    (or, for an SMS provider, a secrets file), never written here."""

    id: str
    kind: ChannelKind
    # dingtalk / feishu / wecom / webhook / sms: the variable holding the URL (robot URLs
    # carry their access token)
    url_env: str = ""
    # dingtalk / feishu: the variable holding the signing secret; sms: the provider's secret
    # ($secret in headers and body)
    secret_env: str = ""
    # sms: a file holding the provider's secret instead (owner-readable only)
    secret_file: str = ""
    # sms: the provider's HTTP request: method, headers and body, whose strings may say
    # $message, $recipients (comma-separated), $secret; a body value "$recipient_list" is
    # the numbers as a list. Sent as JSON or as a form (GET: in the query string).
    method: Literal["POST", "PUT", "GET"] = "POST"
    headers: dict[str, str] = {}
    body: dict[str, Any] = {}
    body_format: Literal["json", "form"] = "json"
    # email
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user_env: str = ""
    smtp_password_env: str = ""
    sender: str = ""
    # email: the To addresses; sms: the phone numbers
    recipients: list[str] = []


def _template_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _template_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _template_strings(v)]
    return []


def _fill(value: Any, values: Mapping[str, str], numbers: Sequence[str]) -> Any:
    """The SMS template with its placeholders replaced (strings only; structure kept)."""
    if isinstance(value, str):
        if value == "$recipient_list":
            return list(numbers)
        return string.Template(value).substitute(values)
    if isinstance(value, dict):
        return {k: _fill(v, values, numbers) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values, numbers) for v in value]
    return value


def check_alerts(
    rules: Sequence[AlertRule],
    kpis: Sequence[KpiDefinition],
    channels: Sequence[AlertChannel],
    where: str,
    history_seconds: float = 0,
    sources: Sequence[str] = (),
) -> list[str]:
    """The problems of a tenant's rules; ``history_seconds``: how long the tenant keeps KPI
    history (``kpi_history_days``), which a day / week comparison must fit in."""
    problems: list[str] = []
    kpi_ids = {k.id for k in kpis}
    channel_ids = {c.id for c in channels}
    seen: set[str] = set()
    for i, r in enumerate(rules):
        w = f"{where}[{i}]"
        if r.id in seen:
            problems.append(f"{w}.id: duplicate alert id {r.id!r}")
        seen.add(r.id)
        if r.kpi not in kpi_ids:
            problems.append(f"{w}.kpi: unknown KPI {r.kpi!r}")
        if r.window not in WINDOWS:
            problems.append(f"{w}.window: must be one of {', '.join(map(str, WINDOWS))} (buckets)")
        if r.condition in ("drop", "rise") and not 0 < r.threshold < 1:
            problems.append(f"{w}.threshold: a relative change is a fraction between 0 and 1")
        if r.min_volume < 0 or r.cooldown_seconds < 0 or r.for_seconds < 0:
            problems.append(f"{w}: min_volume, for_seconds and cooldown_seconds cannot be negative")
        if r.source and r.source not in sources:
            problems.append(f"{w}.source: unknown source {r.source!r}")
        if r.measure == "coverage" and r.condition not in ("below", "above"):
            problems.append(f"{w}.measure: coverage compares with a threshold (below / above)")
        if r.baseline:
            if r.condition not in ("drop", "rise") or r.compare != "previous":
                problems.append(f"{w}.baseline: only a drop or rise against the window before has a baseline")
            if not 0 < r.baseline <= max(WINDOWS):
                problems.append(
                    f"{w}.baseline: must be 1 to {max(WINDOWS)} buckets (0: a window of its own length)"
                )
        if r.compare != "previous":
            if r.condition not in ("drop", "rise"):
                problems.append(f"{w}.compare: only a drop or rise compares with {r.compare}")
            reach = COMPARE_OFFSETS[r.compare] + r.window * CHECK_BUCKET_SECONDS
            if reach > history_seconds:
                problems.append(
                    f"{w}.compare: {r.compare} over a {r.window}-bucket window reaches back "
                    f"{reach / 86400:.2f} days, beyond the tenant's kpi_history_days "
                    f"({history_seconds / 86400:g})"
                )
        for c in r.channels:
            if c not in channel_ids:
                problems.append(f"{w}.channels: unknown channel {c!r}")
    return problems


def check_channels(channels: Sequence[AlertChannel], where: str) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for i, c in enumerate(channels):
        w = f"{where}[{i}]"
        if c.id in seen:
            problems.append(f"{w}.id: duplicate channel id {c.id!r}")
        seen.add(c.id)
        if c.kind == "sms":
            problems.extend(_check_sms(c, w))
        elif c.secret_file or c.headers or c.body:
            problems.append(f"{w}: secret_file, headers and body are for an sms channel")
        if c.kind == "email":
            if not c.smtp_host or not c.sender or not c.recipients:
                problems.append(f"{w}: an email channel needs smtp_host, sender and recipients")
            if bool(c.smtp_user_env) != bool(c.smtp_password_env):
                problems.append(f"{w}: smtp_user_env and smtp_password_env go together")
            continue
        if not c.url_env:
            problems.append(f"{w}.url_env: name the variable holding the {c.kind} URL")
        if c.kind in ("dingtalk", "feishu") and not c.secret_env:
            problems.append(f"{w}.secret_env: a {c.kind} robot needs its signing secret (variable name)")
    return problems


def _check_sms(c: AlertChannel, w: str) -> list[str]:
    problems = []
    if not c.recipients:
        problems.append(f"{w}.recipients: an sms channel needs the numbers to text")
    if c.secret_env and c.secret_file:
        problems.append(f"{w}: secret_env or secret_file, not both")
    if not c.body:
        problems.append(f"{w}.body: an sms channel needs the provider's body template")
    for text in _template_strings(c.body) + _template_strings(c.headers):
        template = string.Template(text)
        if not template.is_valid():
            problems.append(f"{w}: bad placeholder in {text!r} (write $$ for a dollar sign)")
            continue
        unknown = set(template.get_identifiers()) - SMS_PLACEHOLDERS
        if unknown:
            problems.append(
                f"{w}: unknown placeholder(s) {', '.join(sorted(unknown))} in {text!r} "
                f"(known: {', '.join(sorted(SMS_PLACEHOLDERS))})"
            )
        if "secret" in template.get_identifiers() and not (c.secret_env or c.secret_file):
            problems.append(f"{w}: $secret needs secret_env or secret_file")
    return problems


def _read_secret_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip()


def missing_secrets(channels: Sequence[AlertChannel], env: Mapping[str, str]) -> list[str]:
    """The channel secrets absent from the environment or unreadable (the gateway refuses
    to start)."""
    out = []
    for c in channels:
        for name in ("url_env", "secret_env", "smtp_user_env", "smtp_password_env"):
            var = getattr(c, name)
            if var and not env.get(var):
                out.append(f"alert_channels {c.id!r}: {name} {var} is not set")
        if c.secret_file:
            problem = key_file_mode_problem(Path(c.secret_file))
            try:
                if problem is None and not _read_secret_file(c.secret_file):
                    problem = f"secret_file {c.secret_file} is empty"
            except OSError as exc:
                problem = f"secret_file {c.secret_file} cannot be read: {exc.strerror}"
            if problem:
                out.append(f"alert_channels {c.id!r}: {problem}")
    return out


# -- evaluation ------------------------------------------------------------------------------
Verdict = Literal["firing", "ok", "quiet"]


def evaluate(rule: AlertRule, value: WindowValue) -> Verdict:
    """Whether the rule holds over this window: ``quiet`` below the minimum volume or
    without a value (the state stays as it was)."""
    if value.counted < rule.min_volume or value.value is None:
        return "quiet"
    v = value.value
    if rule.condition == "below":
        return "firing" if v < rule.threshold else "ok"
    if rule.condition == "above":
        return "firing" if v > rule.threshold else "ok"
    prev = value.compared(rule.compare, rule.baseline)
    if not prev:  # nothing to compare with: no change can be seen
        return "ok"
    change = (v - prev) / abs(prev)
    if rule.condition == "drop":
        return "firing" if change <= -rule.threshold else "ok"
    return "firing" if change >= rule.threshold else "ok"


class RuleState(msgspec.Struct, rename="camel", omit_defaults=True):
    # pending: the condition holds, for less than the rule's for_seconds yet
    state: Literal["ok", "pending", "firing"] = "ok"
    since: float = 0.0
    last_notified: float = 0.0  # the last firing notification
    announced: bool = False  # this firing was notified (so its resolution is too)
    evaluated_at: float = 0.0
    evaluations: int = 0
    value: float | None = None
    previous: float | None = None  # what the value was compared with (the rule's compare)
    notifications: int = 0
    failures: int = 0


class StateStore(Protocol):
    async def load(self, tenant: str) -> dict[str, RuleState]: ...

    async def save(self, tenant: str, rule: str, state: RuleState) -> None: ...


class MemoryStateStore:
    def __init__(self) -> None:
        self.states: dict[str, dict[str, RuleState]] = {}

    async def load(self, tenant: str) -> dict[str, RuleState]:
        return dict(self.states.get(tenant, {}))

    async def save(self, tenant: str, rule: str, state: RuleState) -> None:
        self.states.setdefault(tenant, {})[rule] = state


class RedisStateStore:
    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:alerts:state"

    async def load(self, tenant: str) -> dict[str, RuleState]:
        raw = await self.redis.hgetall(f"{self.prefix}:{tenant}")
        return {
            (k.decode() if isinstance(k, bytes) else k): msgspec.json.decode(v, type=RuleState)
            for k, v in raw.items()
        }

    async def save(self, tenant: str, rule: str, state: RuleState) -> None:
        await self.redis.hset(f"{self.prefix}:{tenant}", rule, msgspec.json.encode(state))


class Lease(Protocol):
    # how often a holder renews the lease while a round runs; None: it never expires
    renew_seconds: float | None

    async def hold(self) -> bool: ...

    async def holder(self) -> str | None: ...


class LocalLease:
    """One process: it always holds the lease."""

    renew_seconds = None

    def __init__(self, owner: str) -> None:
        self.owner = owner

    async def hold(self) -> bool:
        return True

    async def holder(self) -> str | None:
        return self.owner


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class RedisLease:
    """The evaluator's lease: taken with SET NX PX, extended only by its holder, three
    times per TTL while a round runs (a notification may take longer than the TTL)."""

    def __init__(self, redis: Any, prefix: str, owner: str, ttl_ms: int) -> None:
        self.redis = redis
        self.key = f"{prefix}:alerts:lease"
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.renew_seconds: float | None = ttl_ms / 3000
        self._renew = redis.register_script(_RENEW)

    async def hold(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def holder(self) -> str | None:
        raw = await self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw


# -- notifications ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Notice:
    tenant: str
    rule: AlertRule
    status: Literal["firing", "resolved", "test"]
    value: float | None
    previous: float | None
    volume: int
    window_minutes: float

    def title(self) -> str:
        return f"[{self.status.upper()}] {self.tenant}/{self.rule.id} ({self.rule.severity})"

    def measured(self) -> str:
        """What the rule watches: the KPI, its coverage, of one source."""
        r = self.rule
        what = f"{r.kpi} coverage" if r.measure == "coverage" else r.kpi
        return f"{what} of source {r.source}" if r.source else what

    def compared_with(self) -> str:
        """What the value was compared with, in words."""
        r = self.rule
        if r.baseline:
            return f"the {r.baseline * self.window_minutes / r.window:g} min before"
        return COMPARED_WITH[r.compare]

    def short_text(self) -> str:
        """One line for an SMS: status, rule, the value against what it was compared with."""

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        compared = f"{self.compared_with()}: {fmt(self.previous)}"
        line = (
            f"{self.title()}: {self.measured()} {fmt(self.value)} ({compared}) "
            f"over {self.window_minutes:g} min"
        )
        return line[:SMS_MAX_CHARS]

    def text(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        r = self.rule
        line = f"{self.measured()} {r.condition} {r.threshold:g} over {self.window_minutes:g} min"
        return (
            f"{self.title()}\n{r.description or line}\n"
            f"{self.measured()}: {fmt(self.value)} ({self.compared_with()}: {fmt(self.previous)}), "
            f"{self.volume} events; rule: {line}\n"
            f"dashboard: /admin/kpis?tenant={self.tenant}&kpi={r.kpi}"
        )


COMPARED_WITH: dict[str, str] = {
    "previous": "window before",
    "day_ago": "a day earlier",
    "week_ago": "a week earlier",
}


def dingtalk_signed_url(url: str, secret: str, now_ms: int) -> str:
    """DingTalk custom robot: timestamp and sign = base64(HMAC-SHA256(secret, ts\\nsecret))."""
    digest = hmac.new(secret.encode(), f"{now_ms}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"{url}{'&' if '?' in url else '?'}timestamp={now_ms}&sign={sign}"


def feishu_sign(secret: str, now_s: int) -> str:
    """Feishu/Lark custom bot: base64(HMAC-SHA256 keyed with ts\\nsecret over nothing)."""
    digest = hmac.new(f"{now_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class Notifier:
    """Sends a notice to a channel, retrying with a bounded exponential backoff (``backoff``
    seconds doubling between attempts, at most ``max_backoff``); the outcome says whether it
    arrived, after how many attempts, and the last failure's exception class."""

    def __init__(
        self,
        channels: Sequence[AlertChannel],
        env: Mapping[str, str] | None = None,
        attempts: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 5.0,
    ):
        self.channels = {c.id: c for c in channels}
        self.env = dict(os.environ if env is None else env)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff

    async def send(self, channel_id: str, notice: Notice) -> ChannelDelivery:
        channel = self.channels[channel_id]
        error = None
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                await self._send(channel, notice)
                return ChannelDelivery(channel_id, channel.kind, True, attempt + 1)
            except Exception as exc:
                error = type(exc).__name__
                log.warning(
                    "alerts.notify_failed",
                    channel=channel_id,
                    rule=notice.rule.id,
                    attempt=attempt + 1,
                    error=error,
                )
        log.error("alerts.notify_gave_up", channel=channel_id, rule=notice.rule.id, attempts=self.attempts)
        return ChannelDelivery(channel_id, channel.kind, False, self.attempts, error)

    async def _send(self, c: AlertChannel, notice: Notice) -> None:
        if c.kind == "email":
            await asyncio.to_thread(self._email, c, notice)
            return
        import httpx

        if c.kind == "sms":
            await self._sms(c, notice)
            return

        url = self.env[c.url_env]
        text = notice.text()
        body: dict[str, Any]
        if c.kind == "dingtalk":
            url = dingtalk_signed_url(url, self.env[c.secret_env], int(time.time() * 1000))
            body = {"msgtype": "markdown", "markdown": {"title": notice.title(), "text": text}}
        elif c.kind == "feishu":
            ts = int(time.time())
            body = {
                "timestamp": str(ts),
                "sign": feishu_sign(self.env[c.secret_env], ts),
                "msg_type": "text",
                "content": {"text": text},
            }
        elif c.kind == "wecom":
            body = {"msgtype": "markdown", "markdown": {"content": text}}
        else:
            body = {
                "tenant": notice.tenant,
                "rule": notice.rule.id,
                "kpi": notice.rule.kpi,
                "status": notice.status,
                "severity": notice.rule.severity,
                "value": notice.value,
                "previous": notice.previous,
                "volume": notice.volume,
                "windowMinutes": notice.window_minutes,
                "text": text,
            }
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url, json=body)
            r.raise_for_status()
            if c.kind in ("dingtalk", "feishu", "wecom"):
                # the robots answer 200 with an error code in the body
                reply = r.json() if r.content else {}
                code = reply.get("errcode", reply.get("code", 0)) if isinstance(reply, dict) else 0
                if code:
                    raise RuntimeError(f"{c.kind} refused the message: code {code}")

    async def _sms(self, c: AlertChannel, notice: Notice) -> None:
        """The provider's request from the channel's template; any 2xx is delivered."""
        import httpx

        secret = ""
        if c.secret_env:
            secret = self.env[c.secret_env]
        elif c.secret_file:
            secret = await asyncio.to_thread(_read_secret_file, c.secret_file)
        values = {
            "message": notice.short_text(),
            "recipients": ",".join(c.recipients),
            "recipient_list": ",".join(c.recipients),
            "secret": secret,
        }
        headers = {k: string.Template(v).substitute(values) for k, v in c.headers.items()}
        body = _fill(c.body, values, c.recipients)
        request: dict[str, Any] = {"headers": headers}
        if c.method == "GET":
            request["params"] = {
                k: v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in body.items()
            }
        elif c.body_format == "form":
            request["data"] = body
        else:
            request["json"] = body
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.request(c.method, self.env[c.url_env], **request)
            r.raise_for_status()

    def _email(self, c: AlertChannel, notice: Notice) -> None:
        msg = EmailMessage()
        msg["Subject"] = notice.title()
        msg["From"] = c.sender
        msg["To"] = ", ".join(c.recipients)
        msg.set_content(notice.text())
        with smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=10) as smtp:
            if c.smtp_starttls:
                smtp.starttls()
            if c.smtp_user_env:
                smtp.login(self.env[c.smtp_user_env], self.env[c.smtp_password_env])
            smtp.send_message(msg)


# -- the evaluator ---------------------------------------------------------------------------
class AlertEvaluator:
    """Evaluates every tenant's rules against fresh KPI reports, while holding the lease."""

    def __init__(
        self,
        rules: Mapping[str, Sequence[AlertRule]],
        states: StateStore,
        lease: Lease,
        notifier: Notifier,
        bucket_seconds: float,
        history: AlertHistory | None = None,
    ) -> None:
        self.rules = rules
        self.states = states
        self.lease = lease
        self.notifier = notifier
        self.bucket_seconds = bucket_seconds
        self.history = history
        self.firing: dict[tuple[str, str], bool] = {}

    def baselines(self, tenant: str) -> dict[str, set[tuple[int, int]]]:
        """KPI id -> (window, baseline) pairs the tenant's rules compare with: what the KPI
        report must compute beside its windows."""
        out: dict[str, set[tuple[int, int]]] = {}
        for rule in self.rules.get(tenant, ()):
            if rule.baseline:
                out.setdefault(rule.kpi, set()).add((rule.window, rule.baseline))
        return out

    async def run(self, reports: Mapping[str, Sequence[KpiReport]], now: float | None = None) -> bool:
        """One evaluation round; False when another replica holds the lease (or took it
        while this round ran: the round stops before its next rule)."""
        if not await self.lease.hold():
            return False
        lost = asyncio.Event()
        renew = self.lease.renew_seconds
        # A round can outlive the lease's TTL (a channel timing out and retried for half a
        # minute): renewed meanwhile, another replica cannot take over mid-round and
        # evaluate the same rules from states this round is about to change.
        keeper = asyncio.create_task(self._keep_lease(renew, lost)) if renew else None
        try:
            return await self._round(reports, time.time() if now is None else now, lost)
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    async def _keep_lease(self, every: float, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                held = await self.lease.hold()
            except Exception as exc:  # cannot tell: act as if another replica holds it
                log.warning("alerts.lease_renew_failed", error=type(exc).__name__)
                held = False
            if not held:
                lost.set()
                return

    async def _round(
        self, reports: Mapping[str, Sequence[KpiReport]], now: float, lost: asyncio.Event
    ) -> bool:
        for tenant, rules in self.rules.items():
            if not rules:
                continue
            by_kpi = {r.id: r for r in reports.get(tenant, ())}
            states = await self.states.load(tenant)
            for rule in rules:
                if lost.is_set():
                    log.warning("alerts.lease_lost", tenant=tenant, rule=rule.id)
                    return False
                report = by_kpi.get(rule.kpi)
                window = (
                    next(
                        (
                            w
                            for w in report.windows
                            if round(w.minutes * 60 / self.bucket_seconds) == rule.window
                        ),
                        None,
                    )
                    if report
                    else None
                )
                if window is None:
                    continue
                value = window.by_source.get(rule.source) if rule.source else window.total
                if value is None:  # the source has no value in this report
                    continue
                if rule.measure == "coverage":  # its volume: every matching event
                    value = WindowValue(value.coverage, value.matched, value.matched, value.coverage)
                state = states.get(rule.id) or RuleState()
                await self._step(tenant, rule, value, window.minutes, state, now)
                self.firing[(tenant, rule.id)] = state.state == "firing"
        return True

    async def _step(
        self, tenant: str, rule: AlertRule, value: WindowValue, minutes: float, state: RuleState, now: float
    ) -> None:
        verdict = evaluate(rule, value)
        state.evaluated_at = now
        state.evaluations += 1
        state.value, state.previous = value.value, value.compared(rule.compare, rule.baseline)
        status: Literal["firing", "resolved"] | None = None
        transition: Literal["firing", "resolved"] | None = None
        if verdict == "firing" and state.state == "ok":
            state.state, state.since = "pending", now
        if verdict == "ok" and state.state == "pending":  # did not hold for long enough
            state.state, state.since = "ok", now
        if verdict == "firing" and state.state == "pending" and now - state.since >= rule.for_seconds:
            state.state = "firing"  # since: when the condition started to hold
            transition = "firing"
            # within the cooldown of the last firing notification it fires silently (and
            # resolves silently): a flapping KPI pages once
            state.announced = not state.last_notified or now - state.last_notified >= rule.cooldown_seconds
            if state.announced:
                status = "firing"
                # saved before notifying: a replica taking over mid-send does not repeat it
                state.last_notified = now
        elif verdict == "ok" and state.state == "firing":
            state.state, state.since = "ok", now
            transition = "resolved"
            if state.announced:
                status = "resolved"
            state.announced = False
        await self.states.save(tenant, rule.id, state)
        if transition is None:
            return
        log.info("alerts.transition", tenant=tenant, rule=rule.id, status=transition, notified=bool(status))
        deliveries: list[ChannelDelivery] = []
        if status is not None:
            notice = Notice(tenant, rule, status, value.value, state.previous, value.counted, minutes)
            deliveries = list(await asyncio.gather(*(self.notifier.send(c, notice) for c in rule.channels)))
            sent = sum(d.delivered for d in deliveries)
            state.notifications += sent
            state.failures += len(deliveries) - sent
            await self.states.save(tenant, rule.id, state)
        if self.history is not None:
            record = AlertRecord(
                tenant=tenant,
                rule=rule.id,
                kpi=rule.kpi,
                status=transition,
                severity=rule.severity,
                at=now,
                value=value.value,
                compared=state.previous,
                compare=rule.compare,
                volume=value.counted,
                window_minutes=minutes,
                notified=status is not None,
                deliveries=deliveries,
            )
            try:
                await asyncio.to_thread(self.history.record, record)
            except Exception as exc:  # the notification went out; only its record is lost
                log.warning("alerts.history_failed", tenant=tenant, rule=rule.id, error=type(exc).__name__)
