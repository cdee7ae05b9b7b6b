"""Shared fixtures: gateway processes on free ports, real Redis, helpers to read the sink."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from consent.signing import new_ledger_key_b64
from identity.pseudonym import new_key_document

ROOT = Path(__file__).resolve().parent.parent
IDGATE = Path(sys.executable).with_name("idgate")
REDIS_URL = os.environ.get("IDGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

TEST_CONFIG = """
[limits]
max_message_bytes = 32768
max_batch_bytes = 512000
dedupe_window_seconds = 86400

[[admin_tokens]]
name = "dpo"
role = "compliance"
dev_token = "compliance-test-token"

[[admin_tokens]]
name = "ops"
role = "operator"
dev_token = "operator-test-token"

[[admin_tokens]]
name = "other-dpo"
role = "compliance"
dev_token = "other-compliance-token"
tenants = ["shop"]

# "shop" tests the ingest mechanics with consent enforcement off (allowed in dev only);
# "mall" enforces PIPL consent like every production tenant.
[[tenants]]
id = "shop"
consent = { enforce = false }

[[tenants.sources]]
id = "shop-web"
platform = "web"
dev_write_key = "web-test-key-0001"

[[tenants.sources]]
id = "shop-app"
platform = "app"
dev_write_key = "app-test-key-0001"
sensors_project = "shop"
sensors_dev_token = "shop-sensors-token-01"

[tenants.tracking_plan]
"*" = ["analytics"]

[tenants.external_id_types]
wx_openid = "wechat_openid"

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]

[[tenants.destinations]]
id = "stream"
sink = "jsonl"
purposes = ["analytics"]

[[tenants]]
id = "mall"
sensitive_properties = ["health_condition"]
minor_age_trait = "age"

[[tenants.sources]]
id = "mall-web"
platform = "web"
dev_write_key = "mall-web-key-0001"

[[tenants.sources]]
id = "mall-app"
platform = "app"
dev_write_key = "mall-app-key-0001"

[[tenants.sources]]
id = "mall-mp"
platform = "miniprogram"
dev_write_key = "mall-mp-key-00001"
sensors_project = "mall"
sensors_dev_token = "mall-sensors-token-01"

[[tenants.notices]]
id = "notice-v1"
content_sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

[tenants.tracking_plan]
"*" = ["analytics"]
"Payment Requested" = ["necessary_service"]
"Ad Clicked" = ["ad_measurement"]

[tenants.consent_categories]
Analytics = ["analytics"]
Advertising = ["ad_measurement", "marketing"]

[tenants.external_id_types]
wx_openid = "wechat_openid"
wx_unionid = "wechat_unionid"

[tenants.identity.trait_types]
unionid = "wechat_unionid"

[[tenants.destinations]]
id = "mall-warehouse"
purposes = ["analytics"]

[[tenants.destinations]]
id = "mall-orders"
purposes = ["necessary_service"]

[[tenants.destinations]]
id = "mall-overseas"
purposes = ["analytics"]
region = "overseas"
recipient = { name = "Global BI", contact = "bi@example.com" }

[[tenants.destinations]]
id = "mall-ads"
purposes = ["ad_measurement"]
recipient = { name = "Ad network", contact = "ads@example.com", third_party = true }
"""

WEB_KEY = "web-test-key-0001"
APP_KEY = "app-test-key-0001"
MALL_WEB_KEY = "mall-web-key-0001"
MALL_APP_KEY = "mall-app-key-0001"
MALL_MP_KEY = "mall-mp-key-00001"
SHOP_SENSORS_TOKEN = "shop-sensors-token-01"
MALL_SENSORS_TOKEN = "mall-sensors-token-01"
COMPLIANCE_TOKEN = "compliance-test-token"
OPERATOR_TOKEN = "operator-test-token"


# Keys for gateways that share Redis/PostgreSQL in tests (fixed, test-only material).
SHARED_KEYS = {
    "IDGATE_KEYS": new_key_document(["shop", "mall"]),
    "IDGATE_LEDGER_KEY": new_ledger_key_b64(),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    """A real `idgate serve` process with its own data directory and captured log."""

    data_dir: Path
    config_path: Path
    log_path: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gateway:
        self.port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                str(IDGATE),
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def client(self, write_key: str = WEB_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(write_key, ""), timeout=10)

    def send_tracks(self, message_ids: list[str], user: str = "u-1", event: str = "Order Completed") -> dict:
        """POST one /v1/batch of track calls with these message ids; assert the 200."""
        batch = [{"type": "track", "userId": user, "event": event, "messageId": m} for m in message_ids]
        with self.client() as c:
            r = c.post("/v1/batch", json={"batch": batch})
        assert r.status_code == 200, r.text
        return r.json()

    def sink_lines(self, destination: str = "warehouse") -> list[dict]:
        out = []
        for path in sorted((self.data_dir / "sinks" / destination).glob("*.jsonl")):
            out.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return out

    def wait_for_sink(
        self, message_ids: set[str], destination: str = "warehouse", timeout: float = 20
    ) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            lines = [e for e in self.sink_lines(destination) if e["messageId"] in message_ids]
            if {e["messageId"] for e in lines} >= message_ids or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_gateway(tmp: Path, *, config: str = TEST_CONFIG, extra_env: dict[str, str] | None = None) -> Gateway:
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / "idgate.toml"
    config_path.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_") and k != "REDIS_URL"}
    # JSON logs (dev defaults to console lines): the log scans tell log lines from the banner.
    env.update(
        {
            "IDGATE_ENV": "dev",
            "IDGATE_LOG_LEVEL": "DEBUG",
            "IDGATE_LOG_FORMAT": "json",
            "IDGATE_DELIVERY_POLL_MS": "50",
        }
    )
    env.update(extra_env or {})
    return Gateway(data_dir=tmp / "var", config_path=config_path, log_path=tmp / "gateway.log", env=env)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One shared gateway for tests that only need isolation by unique message ids."""
    gw = make_gateway(tmp_path_factory.mktemp("gateway")).start()
    yield gw
    gw.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of the test's own (clean data dir and log), started by the test."""
    gw = make_gateway(tmp_path)
    yield gw
    gw.stop()


@dataclass(frozen=True)
class RedisNamespace:
    """A key prefix of the test's own on the shared Redis server (db 9)."""

    url: str
    prefix: str

    def env(self) -> dict[str, str]:
        # Replicas sharing state must share keys: pseudonyms have to agree.
        return {"REDIS_URL": self.url, "IDGATE_REDIS_PREFIX": self.prefix, **SHARED_KEYS}


@pytest.fixture
def redis_ns() -> Iterator[RedisNamespace]:
    """A Redis namespace for the test, removed afterwards; a loud failure when Redis is down.

    Tests never flush the database: another suite (CI, a colleague) may share the server."""
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is required at {url}: {exc}")
    ns = RedisNamespace(url, f"idgate-test-{uuid.uuid4().hex[:12]}")
    yield ns
    keys = list(client.scan_iter(match=f"{ns.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


PG_URL = os.environ.get("IDGATE_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_schema(prefix: str = "t") -> Iterator[str]:
    """A fresh PostgreSQL schema for one test (dropped after); the URL selects it by
    search_path. A loud failure when PostgreSQL is down."""
    import sqlalchemy as sa

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {PG_URL}: {exc}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def backend_env(backend: str, stack: ExitStack) -> dict[str, str]:
    """Environment for a gateway on ``sqlite`` (embedded) or ``postgres`` (shared keys)."""
    if backend == "sqlite":
        return {}
    return {"DATABASE_URL": stack.enter_context(postgres_schema(backend)), **SHARED_KEYS}


def mid() -> str:
    return f"m-{uuid.uuid4()}"
