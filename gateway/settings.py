"""Process settings from the environment, typed and failing fast.

Everything about tenants lives in the TOML config (gateway.config); this module holds what
differs per deployment: where data goes, which services to use, where secrets come from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from identity.redis_client import RedisUrlError, cluster_seed, is_cluster_url

Environment = Literal["dev", "production"]
LogFormat = Literal["json", "console"]


class SettingsError(Exception):
    pass


def environment_from_env() -> Environment:
    """``IDGATE_ENV``: ``dev`` or ``production`` (the one place that reads it and its default).

    Production unless dev is asked for explicitly: a deployment that forgets the variable
    refuses the demo secrets and generated keys instead of accepting them (fail closed);
    ``make run`` and the tests opt in with ``IDGATE_ENV=dev``."""
    env = os.environ.get("IDGATE_ENV") or "production"
    if env not in ("dev", "production"):
        raise SettingsError(f"IDGATE_ENV must be 'dev' or 'production', got {env!r}")
    return env  # type: ignore[return-value]


def data_dir_from_env(override: Path | None = None) -> Path:
    """The data directory: ``--data-dir``, else ``$IDGATE_DATA_DIR``, else ``./var``."""
    return override or Path(os.environ.get("IDGATE_DATA_DIR") or "var")


# The ledger key a dev gateway generates in its data directory when none is configured.
DEV_LEDGER_KEY_FILE = "dev-ledger-key"


@dataclass(frozen=True)
class LogSettings:
    """How to log: read on its own (before and without the rest of the settings), so every
    CLI command logs the same way, including the ones that need no keys."""

    format: LogFormat
    level: str

    @classmethod
    def from_env(cls, env: Environment | None = None) -> LogSettings:
        env = env or environment_from_env()
        # dev: readable lines on a terminal; anything else: one JSON object per line.
        fmt = os.environ.get("IDGATE_LOG_FORMAT") or ("console" if env == "dev" else "json")
        if fmt not in ("json", "console"):
            raise SettingsError(f"IDGATE_LOG_FORMAT must be 'json' or 'console', got {fmt!r}")
        level = (os.environ.get("IDGATE_LOG_LEVEL") or "INFO").upper()
        if level not in logging.getLevelNamesMapping():
            raise SettingsError(f"IDGATE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        return cls(format=fmt, level=level)  # type: ignore[arg-type]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the HTTP front end (gateway.front_end)."""

    # Header lines, in bytes (431 past it), and the number of headers (431).
    max_header_bytes: int = 16_384
    max_headers: int = 100
    # The request line's URL (414 past it): room for a Sensors GET /sa.gif?data=... carrying
    # a whole event (limits.max_message_bytes, base64 and URL-encoded).
    max_request_line_bytes: int = 65_536
    # From the connection (or a request's first byte) to the end of its headers, and from
    # there to the end of its body: 408 and the connection closed past either.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # An idle keep-alive connection is closed after this many seconds.
    keep_alive_seconds: int = 5
    # Open connections; past it the oldest idle or slow one is closed (else 503).
    max_connections: int = 4_096

    @classmethod
    def from_env(cls) -> HttpLimits:
        return cls(
            max_header_bytes=max(1024, _env_int("IDGATE_HTTP_MAX_HEADER_BYTES", 16_384)),
            max_headers=max(8, _env_int("IDGATE_HTTP_MAX_HEADERS", 100)),
            max_request_line_bytes=max(256, _env_int("IDGATE_HTTP_MAX_REQUEST_LINE_BYTES", 65_536)),
            header_timeout=max(0.5, _env_int("IDGATE_HTTP_HEADER_TIMEOUT_MS", 10_000) / 1000),
            body_timeout=max(0.5, _env_int("IDGATE_HTTP_BODY_TIMEOUT_MS", 30_000) / 1000),
            keep_alive_seconds=max(1, _env_int("IDGATE_HTTP_KEEPALIVE_SECONDS", 5)),
            max_connections=max(16, _env_int("IDGATE_HTTP_MAX_CONNECTIONS", 4_096)),
        )


@dataclass(frozen=True)
class Settings:
    env: Environment
    config_path: Path
    data_dir: Path
    key_file: Path | None
    keys_json: str | None
    redis_url: str | None
    # Consent ledger and state: PostgreSQL in distributed mode, SQLite under data_dir otherwise.
    database_url: str | None
    ledger_key: str | None
    ledger_key_file: Path | None
    # Namespace of every Redis key, so several deployments (or test runs) can share a server.
    redis_prefix: str
    log_format: LogFormat
    log_level: str
    delivery_batch_size: int
    delivery_poll_seconds: float
    # How long a thread may hold the GIL while another waits (CPython default 5 ms). The
    # loop shares the GIL with the outbox commit thread and the delivery threads; a short
    # interval lets a finished fsync hand its result back without waiting 5 ms.
    gil_switch_interval_seconds: float
    # Allocations between two young-generation collections of CPython's cycle collector
    # (CPython default 700). A batch of 100 events keeps a few thousand containers alive at
    # once, so at 700 the collector runs several times per batch and traverses them all;
    # almost none of them are cyclic garbage (reference counting frees them).
    gc_gen0_threshold: int
    # How often to sign a checkpoint over new consent-ledger records.
    checkpoint_seconds: float
    # Backpressure: past this many undelivered events ingest answers 503 with Retry-After.
    outbox_max_pending: int = 1_000_000
    # With Redis: the tracking plan's violation records one tenant may keep there (past it a
    # blocked event is rejected to its client instead of kept).
    violations_max_records: int = 100_000
    # "sqlite" (embedded) or "redis" (a Redis stream shared by every replica).
    outbox_kind: Literal["sqlite", "redis"] = "sqlite"
    # This process's consumer name on the shared outbox: unique and stable per replica.
    replica_id: str = "local"
    # How long another replica's read-but-unacknowledged outbox entries wait before this
    # one takes them over (the other replica is presumed dead).
    claim_idle_ms: int = 30_000
    # How long a message id claimed in Redis by a request stays "in flight" (retry later)
    # before another request may take it over (the first replica died mid-append).
    dedupe_claim_seconds: int = 30
    # Business KPIs: the tumbling bucket (sliding windows are 1/5/10/60 buckets) and how
    # often KPIs are re-read for /metrics and alert rules evaluated. A page comes at most one
    # interval after its condition holds (issue 15: within 15 s of the drop's minute; 15 s
    # missed it, bench/alert_latency.py); a round costs about 5 ms of CPU per tenant of 25
    # KPIs in memory, 15-20 ms in Redis, on every replica.
    kpi_bucket_seconds: float = 60.0
    alert_interval_seconds: float = 2.0
    # dev only: the KPIs' and alert rules' clock read from this file (tests move it a week)
    dev_clock_file: Path | None = None
    # dev only, a fault for the crash tests: a withdrawal's deletion under on_withdraw_all =
    # "delete" is held just before it opens (the call and the sweep wait there for ever)
    dev_withdraw_all_hold: bool = False
    # How often each replica heals the consent state from the ledger: a withdrawal whose
    # immediate apply failed (Redis down), or that a restored Redis lost, takes effect on
    # every replica within this period.
    consent_reconcile_seconds: float = 1.0
    # How often the gateway enforces the tenants' retention periods (0: never; the CLI can).
    retention_interval_seconds: float = 3600.0
    http: HttpLimits = HttpLimits()
    # The compliance console: a session ends after this many minutes without a request; its
    # cookies are Secure over HTTPS, and always with console_secure_cookie (TLS ends at a
    # proxy that does not say so).
    console_session_minutes: int = 30
    console_secure_cookie: bool = False
    # Small ingest requests (under 20 events) of one source arriving together run as one
    # batch through the pipeline, each answered with its own counts (gateway.pipeline.Ingestor).
    ingest_coalesce: bool = True
    # The ingest endpoints' requests go straight to their handlers, in the app's middleware
    # and exception handling, instead of through Litestar's router (gateway.hot_routes).
    hot_routes: bool = True

    @property
    def dev(self) -> bool:
        return self.env == "dev"

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox.sqlite3"

    @property
    def dead_letter_path(self) -> Path:
        return self.data_dir / "outbox.sqlite3"

    @property
    def sink_dir(self) -> Path:
        return self.data_dir / "sinks"

    @property
    def dev_key_file(self) -> Path:
        return self.data_dir / "dev-keys.json"

    @property
    def dev_ledger_key_file(self) -> Path:
        return self.data_dir / DEV_LEDGER_KEY_FILE

    @property
    def consent_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'consent.sqlite3'}"

    @classmethod
    def from_env(cls, *, config_path: Path | None = None, data_dir: Path | None = None) -> Settings:
        env = environment_from_env()
        logs = LogSettings.from_env(env)
        key_file = os.environ.get("IDGATE_KEY_FILE")
        keys_json = os.environ.get("IDGATE_KEYS") or None
        if env == "production" and not (key_file or keys_json):
            raise SettingsError(
                "IDGATE_ENV=production (the default) needs IDGATE_KEYS or IDGATE_KEY_FILE; "
                "for a local trial with demo keys set IDGATE_ENV=dev (make run does)"
            )
        ledger_key = os.environ.get("IDGATE_LEDGER_KEY") or None
        ledger_key_file = os.environ.get("IDGATE_LEDGER_KEY_FILE") or None
        if env == "production" and not (ledger_key or ledger_key_file):
            raise SettingsError(
                "IDGATE_ENV=production (the default) needs IDGATE_LEDGER_KEY or IDGATE_LEDGER_KEY_FILE; "
                "for a local trial set IDGATE_ENV=dev (make run does)"
            )
        config = config_path or Path(os.environ.get("IDGATE_CONFIG", "idgate.example.toml"))
        data = data_dir_from_env(data_dir)
        redis_url = os.environ.get("REDIS_URL") or None
        if redis_url and is_cluster_url(redis_url):
            try:
                cluster_seed(redis_url)
            except RedisUrlError as exc:
                raise SettingsError(f"REDIS_URL: {exc}") from None
        dev_clock_file = os.environ.get("IDGATE_DEV_CLOCK_FILE") or None
        if dev_clock_file and env != "dev":
            raise SettingsError("IDGATE_DEV_CLOCK_FILE is for tests: it needs IDGATE_ENV=dev")
        withdraw_all_hold = os.environ.get("IDGATE_DEV_WITHDRAW_ALL_HOLD", "") not in ("", "0")
        if withdraw_all_hold and env != "dev":
            raise SettingsError("IDGATE_DEV_WITHDRAW_ALL_HOLD is for tests: it needs IDGATE_ENV=dev")
        database_url = os.environ.get("DATABASE_URL") or None
        outbox_kind = os.environ.get("IDGATE_OUTBOX") or ("redis" if redis_url and database_url else "sqlite")
        if outbox_kind not in ("sqlite", "redis"):
            raise SettingsError(f"IDGATE_OUTBOX must be 'sqlite' or 'redis', got {outbox_kind!r}")
        if outbox_kind == "redis" and not redis_url:
            raise SettingsError("IDGATE_OUTBOX=redis needs REDIS_URL")
        # default: host name plus the data directory, stable across restarts of one replica
        where = hashlib.blake2b(str(data.resolve()).encode(), digest_size=4).hexdigest()
        replica_id = os.environ.get("IDGATE_REPLICA_ID") or f"{socket.gethostname()}-{where}"
        return cls(
            env=env,
            config_path=config,
            data_dir=data,
            key_file=Path(key_file) if key_file else None,
            keys_json=keys_json,
            redis_url=redis_url,
            database_url=database_url,
            ledger_key=ledger_key,
            ledger_key_file=Path(ledger_key_file) if ledger_key_file else None,
            redis_prefix=os.environ.get("IDGATE_REDIS_PREFIX", "idgate"),
            log_format=logs.format,
            log_level=logs.level,
            delivery_batch_size=_env_int("IDGATE_DELIVERY_BATCH", 2000),
            delivery_poll_seconds=_env_int("IDGATE_DELIVERY_POLL_MS", 200) / 1000,
            gil_switch_interval_seconds=_env_int("IDGATE_GIL_SWITCH_US", 200) / 1_000_000,
            gc_gen0_threshold=max(0, _env_int("IDGATE_GC_GEN0_THRESHOLD", 50_000)),
            checkpoint_seconds=max(1, _env_int("IDGATE_CHECKPOINT_SECONDS", 300)),
            outbox_max_pending=max(1, _env_int("IDGATE_OUTBOX_MAX_PENDING", 1_000_000)),
            violations_max_records=max(1, _env_int("IDGATE_VIOLATIONS_MAX_RECORDS", 100_000)),
            outbox_kind=outbox_kind,  # type: ignore[arg-type]
            replica_id=replica_id,
            claim_idle_ms=max(100, _env_int("IDGATE_CLAIM_IDLE_MS", 30_000)),
            dedupe_claim_seconds=max(1, _env_int("IDGATE_DEDUPE_CLAIM_SECONDS", 30)),
            kpi_bucket_seconds=max(0.1, _env_int("IDGATE_KPI_BUCKET_MS", 60_000) / 1000),
            alert_interval_seconds=max(0.05, _env_int("IDGATE_ALERT_INTERVAL_MS", 2_000) / 1000),
            dev_clock_file=Path(dev_clock_file) if dev_clock_file else None,
            dev_withdraw_all_hold=withdraw_all_hold,
            consent_reconcile_seconds=min(
                4.0, max(0.1, _env_int("IDGATE_CONSENT_RECONCILE_MS", 1000) / 1000)
            ),
            retention_interval_seconds=max(0, _env_int("IDGATE_RETENTION_INTERVAL_SECONDS", 3600)),
            http=HttpLimits.from_env(),
            console_session_minutes=max(1, _env_int("IDGATE_CONSOLE_SESSION_MINUTES", 30)),
            console_secure_cookie=_env_int("IDGATE_CONSOLE_SECURE_COOKIE", 0) == 1,
            ingest_coalesce=_env_int("IDGATE_INGEST_COALESCE", 1) == 1,
            hot_routes=_env_int("IDGATE_HOT_ROUTES", 1) == 1,
        )
