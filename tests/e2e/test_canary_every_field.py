"""Personal data cannot leave in any field, end to end (issue 12, item 2).

A real ``idgate serve`` gets Segment and Sensors events carrying canary phones (separators,
+86/0086, full-width digits), ID cards and bank cards (grouped), emails and WeChat ids in
every field the privacy rules cover (property keys, the event name, the message id, page
name and category, context.device/location/app/library/os/network, integrations,
externalIds collection/encoding, identifier-like keys by pattern, URL query strings, the
Sensors lib), and consent calls with free text in ``sdk``, ``evidenceHash`` and a withdrawal's
``noticeId``. Then every place idgate writes is scanned: the JSONL sink, the webhook
receiver, the Redis Streams sink, dead letters, the outbox, the consent ledger and delivery
proofs, the identity store, every Redis key and value, every PostgreSQL row, every SQLite
row, every file byte and the log.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.canaries import Canaries
from tests.conftest import (
    MALL_WEB_KEY,
    TEST_CONFIG,
    WEB_KEY,
    Gateway,
    RedisNamespace,
    backend_env,
    make_gateway,
)
from tests.receivers import Receiver
from tests.sensors.conftest import encode, sensors_url
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

_SHOP_LAST_DESTINATION = 'id = "stream"\nsink = "jsonl"\npurposes = ["analytics"]\n'


def config(hook_url: str, doomed_url: str, redis_ns: RedisNamespace | None) -> str:
    extra = f"""
[[tenants.destinations]]
id = "hook"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{hook_url}", timeout_seconds = 2 }}

[[tenants.destinations]]
id = "doomed"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{doomed_url}", timeout_seconds = 1 }}
retry = {{ max_attempts = 1, initial_backoff_ms = 10, max_backoff_ms = 10 }}
"""
    if redis_ns is not None:
        prefix = redis_ns.prefix
        extra += f"""
[[tenants.destinations]]
id = "redis-out"
sink = "redis_stream"
purposes = ["analytics"]
options = {{ url = "{redis_ns.url}", stream = "{redis_ns.prefix}:events", key_prefix = "{prefix}:sink" }}
"""
    assert _SHOP_LAST_DESTINATION in TEST_CONFIG
    return TEST_CONFIG.replace(_SHOP_LAST_DESTINATION, _SHOP_LAST_DESTINATION + extra, 1)


def markers(lines: list[dict]) -> set[str]:
    found = set()
    for e in lines:
        for part in (e.get("properties") or {}, e.get("traits") or {}):
            if isinstance(part.get("marker"), str):
                found.add(part["marker"])
    return found


def send_everything(gw: Gateway, c: Canaries, marker: str) -> None:
    f = c.forms
    with gw.client(WEB_KEY) as shop:
        batch = c.segment_batch(marker)
        r = shop.post("/v1/batch", json={"batch": batch})
        assert r.status_code == 200 and r.json()["accepted"] == 4, r.text
        for e in batch:  # the single endpoints (duplicates of the batch's messages)
            assert shop.post(f"/v1/{e['type']}", json=e).status_code == 200
        # rejected ones, whose error path must not leak
        shop.post(
            "/v1/track", json={"userId": c.ids["user_id"], "event": 5, "messageId": c.ids["message_id"]}
        )
        bad = {"type": "track", "userId": c.ids["user_id"], "messageId": c.ids["message_id"]}  # no event
        assert shop.post("/v1/batch", json={"batch": [bad]}).json()["rejected"]
    r = httpx.post(
        sensors_url(gw, "shop"),
        content=f"data_list={quote(encode(c.sensors_batch(1)))}&gzip=1",
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text

    with gw.client(MALL_WEB_KEY) as mall:
        subject = {"userId": c.ids["user_id"], "anonymousId": c.ids["anonymous_id"]}
        granted = mall.post(
            "/v1/consent",
            json={
                **subject,
                "grant": ["analytics"],
                "noticeId": "notice-v1",
                "sdk": f"analytics.js {f['phone_cc']}",
                "evidenceHash": "sha256:" + hashlib.sha256(b"evidence").hexdigest(),
            },
        )
        assert granted.status_code == 200, granted.text
        refused = mall.post(
            "/v1/consent",
            json={**subject, "grant": ["analytics"], "noticeId": "notice-v1", "evidenceHash": f["email"]},
        )
        assert refused.status_code == 400 and refused.json()["field"] == "evidenceHash", refused.text
        # Segment's consent event names the library: a free-text name must not reach the ledger
        preference = {
            "type": "track",
            "event": "Segment Consent Preference Updated",
            **subject,
            "messageId": f"consent-{uuid.uuid4()}",
            "context": {
                "library": {"name": f"lib {f['email']}", "version": "1.0"},
                "consent": {"categoryPreferences": {"Analytics": True}, "noticeId": "notice-v1"},
            },
        }
        assert mall.post("/v1/batch", json={"batch": [preference]}).status_code == 200
        # consented events go out with proofs (the delivery table keeps their message ids)
        r = mall.post("/v1/batch", json={"batch": c.segment_batch(marker + "-mall")})
        assert r.status_code == 200 and r.json()["accepted"] >= 1, r.text
        wait_until(
            lambda: markers(gw.sink_lines("mall-warehouse")) >= {marker + "-mall-track"},
            timeout=30,
            what="the consented events at mall-warehouse",
        )
        withdrawn = mall.post(
            "/v1/consent", json={**subject, "withdraw": ["marketing"], "noticeId": f["phone_dash"]}
        )
        assert withdrawn.status_code == 200, withdrawn.text


def scan_files(gw: Gateway, c: Canaries) -> None:
    files = [p for p in gw.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files)
    for path in files:
        c.assert_nowhere(path.read_bytes().decode("latin-1"), str(path))
    for db_path in gw.data_dir.glob("*.sqlite3"):
        db = sqlite3.connect(db_path)
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite_master
                c.assert_nowhere(repr(row), f"sqlite {Path(db_path).name} table {table}")
                c.assert_nowhere(str(row), f"sqlite {Path(db_path).name} table {table}")
        db.close()


def redis_value(r: redis.Redis, key: bytes) -> str:
    """A key's value read by type (a DUMP may be compressed)."""
    kind = r.type(key)
    parts: list[bytes] = []
    if kind == b"string":
        parts = [r.get(key) or b""]
    elif kind == b"hash":
        parts = [x for kv in r.hgetall(key).items() for x in kv]
    elif kind == b"set":
        parts = list(r.smembers(key))
    elif kind == b"zset":
        parts = list(r.zrange(key, 0, -1))
    elif kind == b"list":
        parts = list(r.lrange(key, 0, -1))
    elif kind == b"stream":
        parts = [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
    return " ".join(p.decode("utf-8", "replace") for p in parts)


@pytest.mark.parametrize(
    "setup", ["embedded", pytest.param("distributed", marks=[pytest.mark.redis, pytest.mark.postgres])]
)
def test_no_personal_data_in_any_field_reaches_any_store_or_sink(
    tmp_path: Path, request: pytest.FixtureRequest, setup: str
) -> None:
    stack = ExitStack()
    env: dict[str, str] = {}
    redis_ns: RedisNamespace | None = None
    if setup == "distributed":
        redis_ns = request.getfixturevalue("redis_ns")
        env = {**redis_ns.env(), **backend_env("postgres", stack)}
    c = Canaries()
    marker = f"m-{c.tag}"
    try:
        with Receiver() as hook, Receiver() as doomed:
            doomed.down = True
            gw: Gateway = make_gateway(
                tmp_path, config=config(hook.webhook_url, doomed.webhook_url, redis_ns), extra_env=env
            ).start()
            try:
                send_everything(gw, c, marker)
                expected = {f"{marker}-{k}" for k in ("track", "page", "identify", "group")}
                wait_until(lambda: markers(gw.sink_lines()) >= expected, timeout=30, what="the JSONL sink")
                wait_until(lambda: markers(hook.events) >= expected, timeout=30, what="the webhook")
                wait_until(
                    lambda: "delivery.dead_lettered" in gw.log_text(), timeout=30, what="the dead letters"
                )
                if redis_ns is not None:
                    r = redis.Redis.from_url(redis_ns.url)
                    wait_until(
                        lambda: r.xlen(f"{redis_ns.prefix}:events") >= 6, timeout=30, what="the Redis stream"
                    )
                    r.close()

                def sensors_lines() -> list[dict[str, Any]] | None:
                    found = [e for e in gw.sink_lines() if "sensors" in e.get("context", {})]
                    return found if len(found) >= 2 else None

                # sent after the Segment batch, they may reach the sink in a later delivery
                sensors = wait_until(sensors_lines, timeout=30, what="both Sensors events in the JSONL sink")
                assert len(sensors) == 2
            finally:
                gw.stop()
            # what the webhook received, as received
            c.assert_nowhere(json.dumps(hook.events, ensure_ascii=False), "the webhook receiver")
            c.assert_nowhere(json.dumps(hook.events), "the webhook receiver (ASCII JSON)")
            assert len(hook.events) >= 6

        scan_files(gw, c)
        if setup == "distributed":
            assert env["DATABASE_URL"]
            engine = sa.create_engine(env["DATABASE_URL"].replace("%3D", "="))
            with engine.connect() as conn:
                names = [
                    t
                    for (t,) in conn.execute(
                        sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                    )
                ]
                assert {"consent_ledger", "consent_delivery"} <= set(names)
                for table in names:
                    for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                        c.assert_nowhere(str(tuple(row)), f"postgres table {table}")
                ledger_sdks = {s for (s,) in conn.execute(sa.text("SELECT sdk FROM consent_ledger"))}
                proofs = [m for (m,) in conn.execute(sa.text("SELECT message_id FROM consent_delivery"))]
            engine.dispose()
            assert ledger_sdks <= {None, "other", "analytics.js/1.0"}, ledger_sdks
            assert proofs and all(m.startswith("mid-") for m in proofs), proofs
            assert redis_ns is not None
            r = redis.Redis.from_url(redis_ns.url)
            assert r.xlen(f"{redis_ns.prefix}:events") >= 6  # the Redis Streams sink
            dead = list(r.scan_iter(match=f"{redis_ns.prefix}:dlq:*"))
            assert dead, "no dead letters in Redis"
            for key in r.scan_iter():  # every key on the database, not only this test's
                c.assert_nowhere(key.decode("latin-1"), "redis key")
                c.assert_nowhere(repr(r.dump(key)), f"redis value of {key!r}")
                c.assert_nowhere(redis_value(r, key), f"redis value of {key!r} (decoded)")
            r.close()
        log = gw.log_text()
        assert "ingest.rejected" in log
        c.assert_nowhere(log, "gateway log")
    finally:
        stack.close()
