"""Answers that tell the truth when a dependency fails, and consent state that heals itself.

Redis and PostgreSQL are reached through a TCP proxy the test can cut (tests/proxy.py), so
the shared servers other tests use are never touched. The embedded outbox runs on a small
tmpfs the test fills, to show a full disk as it is.

- A withdrawal posted while Redis is down is recorded in the ledger and answered as such
  (never "nothing acknowledged"); once Redis is back, the person's events are dropped within
  the reconcile period on every replica, not accepted on the stale state.
- A Redis restored from a snapshot taken before a withdrawal does not let the person through
  for longer than the reconcile period either.
- While Redis or PostgreSQL is down, requests get 503 with Retry-After, and the log has one
  line for the outage and one for its end, not one per request.
- With the outbox on a full disk, /readyz says not ready, and ready again once there is room.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from tests.conftest import (
    MALL_WEB_KEY,
    SHARED_KEYS,
    Gateway,
    RedisNamespace,
    make_gateway,
    mid,
    postgres_schema,
)
from tests.proxy import TcpProxy
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
RECONCILE_SECONDS = 0.5
# scheduling slack on a loaded two-core machine, on top of the reconcile period
SLACK_SECONDS = 1.5


def _through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Proxied:
    def __init__(self, gw: Gateway, redis_proxy: TcpProxy, pg_proxy: TcpProxy, ns: RedisNamespace) -> None:
        self.gw, self.redis_proxy, self.pg_proxy, self.ns = gw, redis_proxy, pg_proxy, ns
        self.web = httpx.Client(base_url=gw.url, auth=(MALL_WEB_KEY, ""), timeout=10)

    def consent(self, anon: str, **body: object) -> httpx.Response:
        return self.web.post("/v1/consent", json={"anonymousId": anon, "noticeId": "notice-v1", **body})

    def track(self, anon: str) -> httpx.Response:
        return self.web.post("/v1/track", json={"anonymousId": anon, "event": "Viewed", "messageId": mid()})

    def log_events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.gw.log_text().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                out.append(json.loads(line))
        return out


@pytest.fixture
def proxied(tmp_path: Path, redis_ns: RedisNamespace) -> Iterator[Proxied]:
    with ExitStack() as stack:
        schema = stack.enter_context(postgres_schema("heal"))
        pg = urlsplit(schema.server_url)
        pg_proxy = stack.enter_context(TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432))
        redis_url = urlsplit(redis_ns.url)
        redis_proxy = stack.enter_context(TcpProxy(redis_url.hostname or "127.0.0.1", redis_url.port or 6379))
        env = {
            **SHARED_KEYS,
            "DATABASE_URL": _through(pg_proxy, schema.url),
            "REDIS_URL": _through(redis_proxy, redis_ns.url),
            "IDGATE_REDIS_PREFIX": redis_ns.prefix,
            "IDGATE_CONSENT_RECONCILE_MS": str(int(RECONCILE_SECONDS * 1000)),
        }
        gw = make_gateway(tmp_path, extra_env=env).start()
        stack.callback(gw.stop)
        yield Proxied(gw, redis_proxy, pg_proxy, redis_ns)


def _accepted_after(p: Proxied, anon: str, since: float, until_dropped: float = 20) -> list[float]:
    """Send the person's events until one is dropped as withdrawn; return how long after
    ``since`` each accepted one was sent. 503s (state being rebuilt) are answers too."""
    accepted: list[float] = []
    deadline = time.monotonic() + until_dropped
    while time.monotonic() < deadline:
        sent_at = time.monotonic() - since
        r = p.track(anon)
        if r.status_code == 200 and r.json()["accepted"]:
            accepted.append(sent_at)
        elif r.status_code == 200 and r.json()["dropped"].get("withdrawn"):
            return accepted
        else:
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        time.sleep(0.05)  # the pace of a client sending events, not a synchronisation
    raise AssertionError(f"the withdrawal never took effect; accepted at {accepted}")


@pytest.mark.postgres
@pytest.mark.redis
def test_a_withdrawal_while_redis_is_down_takes_effect_when_it_is_back(proxied: Proxied) -> None:
    p = proxied
    anon = f"anon-heal-{uuid.uuid4().hex[:8]}"
    assert p.consent(anon, grant=["analytics"]).status_code == 200
    assert p.track(anon).json()["accepted"] == 1

    p.redis_proxy.cut()
    r = p.consent(anon, withdraw=["analytics"])
    # in the ledger (PostgreSQL): acknowledged, and said to be pending until Redis is back
    assert r.status_code == 200, r.text
    assert [x["state"] for x in r.json()["recorded"]] == ["withdrawn"]
    assert r.json()["recorded"][0]["pending"] is True
    refused = [p.track(anon) for _ in range(20)]
    assert {x.status_code for x in refused} == {503}
    assert all(int(x.headers["Retry-After"]) > 0 for x in refused)
    assert {x.json()["error"] for x in refused} == {"unavailable"}

    p.redis_proxy.restore()
    restored = time.monotonic()
    late = [t for t in _accepted_after(p, anon, restored) if t > RECONCILE_SECONDS + SLACK_SECONDS]
    assert late == [], f"accepted {late} s after Redis was back"

    # one log line for the outage and one for its end, not one per refused request
    wait_until(lambda: p.log_events("dependency.recovered"), what="the recovery to be logged")
    down = [e for e in p.log_events("dependency.unavailable") if e.get("dependency") == "redis"]
    up = [e for e in p.log_events("dependency.recovered") if e.get("dependency") == "redis"]
    assert len(down) == 1 and len(up) == 1
    assert int(str(up[0]["refused_requests"])) >= 20
    assert "Traceback" not in p.gw.log_text()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_redis_restored_to_before_a_withdrawal_heals_within_the_period(proxied: Proxied) -> None:
    p = proxied
    anon = f"anon-restore-{uuid.uuid4().hex[:8]}"
    assert p.consent(anon, grant=["analytics"]).status_code == 200
    assert p.track(anon).json()["accepted"] == 1
    client = redis.Redis.from_url(p.ns.url)
    # the consent projection as a snapshot would hold it (the outbox stream is left alone)
    snapshot = {
        key: client.dump(key)
        for pattern in (f"{p.ns.prefix}:consent:*", f"{p.ns.prefix}:notices:*")
        for key in client.scan_iter(match=pattern)
    }
    assert snapshot
    assert p.consent(anon, withdraw=["analytics"]).status_code == 200
    assert p.track(anon).json()["dropped"] == {"withdrawn": 1}

    for key, value in snapshot.items():  # the restore
        client.restore(key, 0, value, replace=True)
    restored = time.monotonic()
    late = [t for t in _accepted_after(p, anon, restored) if t > RECONCILE_SECONDS + SLACK_SECONDS]
    assert late == [], f"accepted {late} s after the restore"
    client.close()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_postgresql_cut_answers_503_not_500(proxied: Proxied) -> None:
    p = proxied
    anon = f"anon-pg-{uuid.uuid4().hex[:8]}"
    assert p.consent(anon, grant=["analytics", "identity_linking"]).status_code == 200
    p.pg_proxy.cut()
    consent = p.consent(f"{anon}-2", grant=["analytics"])
    assert consent.status_code == 503 and int(consent.headers["Retry-After"]) > 0, consent.text
    # a new link needs the identity log (PostgreSQL)
    link = p.web.post(
        "/v1/identify",
        json={"anonymousId": anon, "context": {"device": {"id": f"dev-{anon}"}}, "messageId": mid()},
    )
    assert link.status_code == 503 and int(link.headers["Retry-After"]) > 0, link.text
    p.pg_proxy.restore()

    def consent_again() -> bool:
        return p.consent(f"{anon}-3", grant=["analytics"]).status_code == 200

    wait_until(consent_again, timeout=30, what="consent calls to be accepted again")
    assert "unexpected_error" not in p.gw.log_text()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs the test can fill (the machine's root may mount; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs and could not: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_readiness_is_false_while_the_outbox_cannot_accept(tmp_path: Path, small_disk: Path) -> None:
    gw = make_gateway(tmp_path / "gw")
    gw.data_dir = small_disk / "var"
    gw.start()
    try:
        with gw.client() as c:
            assert (
                c.post("/v1/track", json={"userId": "u-disk", "event": "E", "messageId": mid()}).status_code
                == 200
            )
            filler = small_disk / "filler"
            with open(filler, "wb") as fh:  # fill the disk to the last block
                try:
                    while True:
                        fh.write(b"\0" * (1 << 20))
                        fh.flush()
                except OSError:
                    pass

            def refused() -> bool:
                r = c.post(
                    "/v1/batch",
                    json={
                        "batch": [
                            {"type": "track", "userId": "u-disk", "event": "E" * 500, "messageId": mid()}
                            for _ in range(50)
                        ]
                    },
                )
                return r.status_code == 503

            wait_until(refused, what="ingest to refuse on the full disk")
            wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 503, what="not ready")
            ready = httpx.get(gw.url + "/readyz").json()
            assert ready["status"] == "not_ready" and ready["checks"]["outbox"] is False
            filler.unlink()
            wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 200, what="ready again")
            ok = c.post("/v1/track", json={"userId": "u-disk", "event": "E", "messageId": mid()})
            assert ok.status_code == 200 and ok.json()["accepted"] == 1
    finally:
        gw.stop()
