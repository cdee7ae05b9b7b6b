"""Shared fixtures: gateway processes on free ports, real Redis, PostgreSQL and NATS, helpers
to read the sink; the test markers and the rule that a test never skips silently.

Markers (registered in pyproject.toml) select the tests by what they need:

    redis     the Redis server (IDGATE_TEST_REDIS_URL; db 9, a key prefix per test)
    postgres  the PostgreSQL server (IDGATE_TEST_DATABASE_URL; a fresh schema per test)
    nats      the NATS JetStream server (IDGATE_TEST_NATS_URL)
    node      Node.js and npm (the WeChat mini-program SDK tests under tests/sensors)
    browser   Chromium driven by Playwright (analytics.js in tests/browser)
    slow      starts `idgate serve` processes (deselect for the quick in-process suite)
    nginx     nginx (deploy/nginx.conf in front of a gateway, tests/gateway/test_nginx.py)

e.g. ``pytest -m "not postgres"``, ``pytest -m redis``, ``pytest -m "not slow"``. They are
applied at collection from the fixtures a test uses (MARKERS_BY_FIXTURE), by parameters
(``pytest.param("postgres", marks=pytest.mark.postgres)``) or by ``pytestmark``; whatever
opens the resource (``redis_ns``, ``postgres_schema``, ``nats_url``, ``miniprogram``,
``Gateway.start``) fails a test that uses it without the marker, so a selection never
misses one.

A missing tool or service FAILS the tests that need it, with a message naming it. A
developer without one deselects its group (``-m "not node"``), or opts out by name with
``IDGATE_TEST_ALLOW_MISSING=node`` (comma-separated), which turns those failures into skips
that say so. Any other skip is reported as an error: CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import httpx
import pytest

from consent.signing import new_ledger_key_b64
from identity.pseudonym import KeyRing, new_key_document
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
IDGATE = Path(sys.executable).with_name("idgate")
REDIS_URL = os.environ.get("IDGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("IDGATE_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("IDGATE_TEST_NATS_URL", "nats://127.0.0.1:4222")
ALLOW_MISSING = frozenset(re.split(r"[\s,]+", os.environ.get("IDGATE_TEST_ALLOW_MISSING", "").strip())) - {""}
OPTED_OUT = "opted out with IDGATE_TEST_ALLOW_MISSING"

# A test that uses one of these fixtures (directly or through another fixture) gets the markers.
MARKERS_BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "redis_ns": ("redis",),
    "redis_cluster": ("redis",),
    "cluster_ns": ("redis",),
    "any_redis_ns": ("redis",),
    "pg_schema": ("postgres",),
    "nats_url": ("nats",),
    "miniprogram": ("node",),
    "analytics_js": ("node",),
    "chromium": ("browser",),
    "gateway": ("slow",),
    "fresh_gateway": ("slow",),
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            for marker in MARKERS_BY_FIXTURE.get(name, ()):
                if item.get_closest_marker(marker) is None:
                    item.add_marker(marker)


_running: pytest.Item | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _running
    _running = item  # before its fixtures, so a session fixture knows who asked first


def require_marker(marker: str, what: str) -> None:
    """Fail the running test if it uses ``what`` without the marker that selects it."""
    item = _running
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(
            f"{item.nodeid} uses {what} but is not marked {marker!r}: mark it "
            f"(@pytest.mark.{marker}, pytest.param(..., marks=...) or a fixture in "
            "MARKERS_BY_FIXTURE) so that -m selects it",
            pytrace=False,
        )


def missing(group: str, problem: str) -> NoReturn:
    """A tool or service the test needs is not there: fail, unless the developer opted out."""
    if group in ALLOW_MISSING:
        pytest.skip(f"{OPTED_OUT}={group}: {problem}")
    pytest.fail(
        f"{problem}\nThe {group!r} tests need it: start or install it, or deselect them with "
        f"-m 'not {group}' (IDGATE_TEST_ALLOW_MISSING={group} turns this failure into a skip).",
        pytrace=False,
    )


def _unexplained_skip(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    return None if OPTED_OUT in reason else reason


def _refuse_skip(report: pytest.TestReport | pytest.CollectReport, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"skipped without an opt-out ({reason}). A test that cannot run fails here: fix what it "
        "needs, deselect it with -m, or opt out with IDGATE_TEST_ALLOW_MISSING (see tests/conftest.py)."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    reason = _unexplained_skip(report)
    if reason is not None:
        _refuse_skip(report, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    reason = _unexplained_skip(report)
    if reason is not None:
        _refuse_skip(report, reason)


TEST_CONFIG = """
[limits]
max_message_bytes = 32768
max_batch_bytes = 512000
dedupe_window_seconds = 86400

# Every test sends from one loopback address, many per second: room for that. The limits
# themselves are tested with configs of their own (tests/security/test_rate_limits.py).
[rate_limits]
ip_requests_per_second = 100000
ip_events_per_second = 1000000
new_identifiers_per_person_per_day = 1000
consent_records_per_subject_per_day = 1000
ip_consent_calls_per_hour = 1000000

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
# "shop" also lets its client sources link person-level identifiers nobody holds yet
# without an identity assertion (client_links = "unowned"); "mall" needs the assertion.
[[tenants]]
id = "shop"
consent = { enforce = false }
identity = { client_links = "unowned" }

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

# The shop's backend: the server-side SDKs (analytics-python, the Sensors Python SDK).
[[tenants.sources]]
id = "shop-server"
platform = "server"
dev_write_key = "shop-server-secret-key-000000000000001"
sensors_project = "shop"
sensors_dev_token = "shop-server-sensors-token-0000000001"

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

# The mall's client sources take the identity assertions its backend signs after login
# (tests.conftest.assertion); "mall-server" is the backend itself.
[[tenants.sources]]
id = "mall-web"
platform = "web"
dev_write_key = "mall-web-key-0001"
assertions = { hs256_secret_env = "MALL_ASSERTION_SECRET" }

[[tenants.sources]]
id = "mall-app"
platform = "app"
dev_write_key = "mall-app-key-0001"
assertions = { hs256_secret_env = "MALL_ASSERTION_SECRET" }

[[tenants.sources]]
id = "mall-mp"
platform = "miniprogram"
dev_write_key = "mall-mp-key-00001"
sensors_project = "mall"
sensors_dev_token = "mall-sensors-token-01"
assertions = { hs256_secret_env = "MALL_ASSERTION_SECRET" }

[[tenants.sources]]
id = "mall-server"
platform = "server"
dev_write_key = "mall-server-secret-key-0000000000000001"

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
C0002 = ["analytics"]  # OneTrust's performance cookies, as RudderStack's consentManagement sends them

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
SHOP_SERVER_KEY = "shop-server-secret-key-000000000000001"
SHOP_SERVER_SENSORS_TOKEN = "shop-server-sensors-token-0000000001"
MALL_APP_KEY = "mall-app-key-0001"
MALL_MP_KEY = "mall-mp-key-00001"
MALL_SERVER_KEY = "mall-server-secret-key-0000000000000001"
# The secret the mall's backend signs identity assertions with (HS256; test-only material).
MALL_ASSERTION_SECRET = "mall-assertion-secret-for-tests-only-0001"
# In-process apps (create_app in the test process) read it from here too.
os.environ.setdefault("MALL_ASSERTION_SECRET", MALL_ASSERTION_SECRET)
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


def jsonl_records(paths: Iterable[Path]) -> list[dict]:
    """The complete records of JSONL files that a running gateway may be appending to:
    a last line without its newline is still being written and is left for the next read."""
    out: list[dict] = []
    for path in paths:
        text = path.read_text()
        out.extend(json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line)
    return out


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, exited: Callable[[], str]) -> None:
    """Poll ``url``'s /readyz until it answers 200; fail at once, with ``exited()``, when
    ``proc`` ends first, and at the deadline otherwise."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(exited())
        try:
            return httpx.get(url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, f"{url}/readyz to answer 200", interval=0.1)


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
        require_marker("slow", "an idgate serve process")
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
        wait_ready(self.proc, self.url, 30, lambda: f"gateway exited: {self.log_path.read_text()}")
        return self

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
        return jsonl_records(sorted((self.data_dir / "sinks" / destination).glob("*.jsonl")))

    def wait_for_sink(
        self, message_ids: set[str], destination: str = "warehouse", timeout: float = 20
    ) -> list[dict]:
        """The sink lines of ``message_ids`` once every one of them is there; fails at the
        timeout naming how many are missing."""
        if not message_ids:
            raise ValueError("wait_for_sink needs the message ids to wait for")

        def lines() -> list[dict]:
            found = [e for e in self.sink_lines(destination) if e["messageId"] in message_ids]
            return found if {e["messageId"] for e in found} >= message_ids else []

        return wait_until(lines, timeout, f"{len(message_ids)} message id(s) in the {destination!r} sink")

    def wait_past(
        self,
        destination: str = "warehouse",
        *,
        write_key: str = WEB_KEY,
        grant: Sequence[str] = (),
        timeout: float = 20,
    ) -> dict:
        """Send a sentinel event after everything sent so far and wait until ``destination``
        has it; returns the sentinel as delivered.

        The outbox delivers to each destination in order, so once the sentinel is there,
        whatever was accepted for that destination before it has been written too: wait
        with this before asserting that something was NOT delivered. ``grant`` records
        consent for the sentinel's subject first (tenants that enforce consent)."""
        anonymous_id = f"sentinel-{uuid.uuid4().hex[:12]}"
        message_id = mid()
        with self.client(write_key) as c:
            if grant:
                body = {"anonymousId": anonymous_id, "grant": list(grant), "noticeId": "notice-v1"}
                r = c.post("/v1/consent", json=body)
                assert r.status_code == 200, r.text
            r = c.post(
                "/v1/track", json={"anonymousId": anonymous_id, "event": "Sentinel", "messageId": message_id}
            )
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        (sentinel,) = wait_until(
            lambda: [e for e in self.sink_lines(destination) if e.get("messageId") == message_id],
            timeout,
            what=f"the sentinel event at {destination}",
        )
        return sentinel

    def keyring(self) -> KeyRing:
        """The pseudonymisation keys this gateway uses (IDGATE_KEYS, else its dev key file)."""
        return KeyRing.load(env_value=self.env.get("IDGATE_KEYS"), key_file=self.data_dir / "dev-keys.json")

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
            "MALL_ASSERTION_SECRET": MALL_ASSERTION_SECRET,
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

    require_marker("redis", "Redis")
    url = REDIS_URL.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        client.close()
        missing("redis", f"Redis is required at {url} (IDGATE_TEST_REDIS_URL): {exc}")
    ns = RedisNamespace(url, f"idgate-test-{uuid.uuid4().hex[:12]}")
    yield ns
    keys = list(client.scan_iter(match=f"{ns.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


REDIS_SERVER = os.environ.get("IDGATE_TEST_REDIS_SERVER", "/usr/bin/redis-server")
REDIS_CLI = os.environ.get("IDGATE_TEST_REDIS_CLI", "/usr/bin/redis-cli")


@dataclass(frozen=True)
class RedisCluster:
    """A Redis Cluster of three masters started for the session (``redis_cluster``)."""

    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"


def _cluster_ok(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_timeout=1)
    try:
        info = client.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return False
    finally:
        client.close()
    # redis-py parses the reply into a dict
    return bool(info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == 3)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three ``redis-server`` masters (no persistence) joined with ``redis-cli --cluster
    create``, for the whole session; stopped at its end."""
    require_marker("redis", "Redis")
    if not (Path(REDIS_SERVER).exists() and Path(REDIS_CLI).exists()):
        missing("redis", f"a Redis Cluster needs {REDIS_SERVER} and {REDIS_CLI} (IDGATE_TEST_REDIS_SERVER)")
    root = tmp_path_factory.mktemp("redis-cluster")
    ports = tuple(free_port() for _ in range(3))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = root / str(port)
            node.mkdir()
            processes.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER,
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes",
                        "--cluster-port", str(free_port()),
                        "--cluster-config-file", str(node / "nodes.conf"),
                        "--dir", str(node),
                        "--appendonly", "no",
                        "--save", "",
                    ],
                    stdout=(node / "log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        wait_until(
            lambda: all(_ping(p) for p in ports), timeout=20, what="the cluster's redis-server processes"
        )
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        wait_until(lambda: all(_cluster_ok(p) for p in ports), timeout=30, what="cluster_state:ok")
        yield RedisCluster(ports)
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ping(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(params=["redis_ns", "cluster_ns"], ids=["server", "cluster"])
def any_redis_ns(request: pytest.FixtureRequest) -> RedisNamespace:
    """The test once on one Redis server and once on the Redis Cluster, for stores whose
    calls differ between the two (a script per call on one server, per slot on a cluster)."""
    ns: RedisNamespace = request.getfixturevalue(request.param)
    return ns


@pytest.fixture
def cluster_ns(redis_cluster: RedisCluster) -> Iterator[RedisNamespace]:
    """A key prefix of the test's own on the session's Redis Cluster, its keys removed
    afterwards (from every master)."""
    from identity.redis_client import open_redis

    ns = RedisNamespace(redis_cluster.url, f"idgate-test-{uuid.uuid4().hex[:12]}")
    yield ns
    client = open_redis(ns.url)
    try:
        for key in list(client.scan_iter(match=f"*{ns.prefix}*")):
            client.delete(key)
    finally:
        client.close()


@dataclass(frozen=True)
class PostgresSchema:
    """A schema of one test's own on the local PostgreSQL. Connections opened with ``url`` (or
    ``server_url`` and ``connect_args``) have it as their search path, so the tables, the
    triggers and the Alembic version table all live in it."""

    name: str
    server_url: str = DATABASE_URL

    @property
    def connect_args(self) -> dict[str, str]:
        return {"options": f"-csearch_path={self.name}"}

    @property
    def url(self) -> str:
        """One URL that carries the search path: a gateway's DATABASE_URL, the CLI's --database-url."""
        separator = "&" if urlsplit(self.server_url).query else "?"
        return f"{self.server_url}{separator}options={quote(f'-csearch_path={self.name}')}"


def _postgres_admin() -> Any:
    import psycopg
    import sqlalchemy as sa

    conninfo = sa.make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        problem = str(exc).strip()
    # Outside the except block, so the report is this one line rather than psycopg's traceback.
    missing("postgres", f"PostgreSQL is required at {DATABASE_URL} (IDGATE_TEST_DATABASE_URL): {problem}")


@contextmanager
def postgres_schema(prefix: str = "t") -> Iterator[PostgresSchema]:
    """A fresh, empty schema on the local PostgreSQL, dropped with everything in it afterwards;
    a loud failure when PostgreSQL is down. For a test that needs more than one, or one
    that lives as long as a module-scoped fixture; otherwise use the ``pg_schema`` fixture."""
    require_marker("postgres", "PostgreSQL")
    schema = PostgresSchema(f"{prefix}_{uuid.uuid4().hex[:12]}")
    with _postgres_admin() as admin:
        admin.execute(f'CREATE SCHEMA "{schema.name}"')
    try:
        yield schema
    finally:
        with _postgres_admin() as admin:
            admin.execute(f'DROP SCHEMA "{schema.name}" CASCADE')


@pytest.fixture
def pg_schema(request: pytest.FixtureRequest) -> Iterator[PostgresSchema]:
    """A fresh schema on the local PostgreSQL for the test (see ``postgres_schema``)."""
    prefix = re.sub(r"[^a-z0-9]+", "_", request.node.originalname.lower().removeprefix("test_"))[:20]
    with postgres_schema(prefix or "t") as schema:
        yield schema


@pytest.fixture
def nats_url() -> str:
    """The NATS JetStream server's URL; a loud failure when nothing answers there."""
    require_marker("nats", "NATS JetStream")
    where = urlsplit(NATS_URL)
    try:
        socket.create_connection((where.hostname or "127.0.0.1", where.port or 4222), timeout=3).close()
    except OSError as exc:
        problem = str(exc)
    else:
        return NATS_URL
    missing("nats", f"NATS JetStream is required at {NATS_URL} (IDGATE_TEST_NATS_URL): {problem}")


def backend_env(backend: str, stack: ExitStack) -> dict[str, str]:
    """Environment for a gateway on ``sqlite`` (embedded) or ``postgres`` (shared keys)."""
    if backend == "sqlite":
        return {}
    return {"DATABASE_URL": stack.enter_context(postgres_schema(backend)).url, **SHARED_KEYS}


def mid() -> str:
    return f"m-{uuid.uuid4()}"


def assertion(
    user: str,
    device: str,
    *,
    ids: Sequence[tuple[str, str]] = (),
    guardian: bool = False,
    lifetime: int = 600,
    secret: str = MALL_ASSERTION_SECRET,
    now: float | None = None,
) -> str:
    """An identity assertion as the shop's backend issues it after login: binds the user id
    (and ``ids``, e.g. ("phone", "13912345678")) to the device the SDK sends from."""
    import jwt

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "aud": "idgate",
        "iat": issued,
        "exp": issued + lifetime,
        "sub": user,
        "device": device,
    }
    if ids:
        claims["ids"] = [{"type": t, "id": v} for t, v in ids]
    if guardian:
        claims["guardian"] = True
    return jwt.encode(claims, secret, algorithm="HS256")
