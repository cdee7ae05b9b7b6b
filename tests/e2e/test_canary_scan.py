"""Privacy invariant: planted raw identifiers appear nowhere the gateway writes.

Runs the gateway with Redis dedupe (REDIS_URL) so Redis is part of the scan, sends events
carrying canary identifiers in every identifier field and in free text, then scans every
file under the data dir (including the SQLite database and its WAL, byte for byte), every
SQLite row, every Redis key and value, and every log line.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import ExitStack

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_WEB_KEY,
    WEB_KEY,
    Gateway,
    RedisNamespace,
    assertion,
    backend_env,
    make_gateway,
)

pytestmark = pytest.mark.slow


def canaries() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "user_id": f"CANARY-user-{tag}",
        "anonymous_id": f"CANARY-anon-{tag}",
        "previous_id": f"CANARY-prev-{tag}",
        "device_id": f"CANARY-device-{tag}",
        "idfa": f"CANARY-IDFA-{tag}".upper(),
        "openid": f"oCANARYopenid{tag}",
        "unionid": f"oCANARYunionid{tag}",
        "email": f"canary.{tag}@example.com",
        "phone": "13912345678",
        "phone_e164": "+8613912345678",
        "id_card": "11010519491231002X",
        "ip": "203.0.113.77",
    }


def events(c: dict[str, str]) -> list[dict]:
    context = {
        "ip": c["ip"],
        "device": {"id": c["device_id"], "advertisingId": c["idfa"], "model": "iPhone"},
        "os": {"name": "iOS"},
        "externalIds": [
            {"id": c["openid"], "type": "wx_openid", "appid": "wx123", "collection": "users"},
            {"id": c["unionid"], "type": "wechat_unionid", "collection": "users"},
        ],
        "traits": {"phone": c["phone"], "email": c["email"]},
        "page": {"url": f"https://shop.example/pay?mobile={c['phone']}"},
    }
    return [
        {
            "type": "identify",
            "userId": c["user_id"],
            "anonymousId": c["anonymous_id"],
            "context": context,
            "messageId": f"canary-{uuid.uuid4()}",
            "traits": {"phone": c["phone"], "email": c["email"].upper(), "idCard": c["id_card"]},
        },
        {
            "type": "track",
            "userId": c["user_id"],
            "event": "Order Completed",
            "context": context,
            "messageId": f"canary-{uuid.uuid4()}",
            "properties": {
                "note": f"ship to {c['phone']}, id {c['id_card']}, mail {c['email']}",
                "openid": c["openid"],
                "buyer": {"mobile": c["phone"]},
            },
        },
        {
            "type": "alias",
            "userId": c["user_id"],
            "previousId": c["previous_id"],
            "messageId": f"canary-{uuid.uuid4()}",
        },
    ]


def assert_nowhere(text: str, where: str, c: dict[str, str]) -> None:
    lowered = text.lower()
    leaked = [k for k, v in c.items() if v.lower() in lowered]
    assert not leaked, f"raw identifiers {leaked} found in {where}"


def consent_call(c: dict[str, str]) -> dict:
    return {
        "userId": c["user_id"],
        "anonymousId": c["anonymous_id"],
        "identifiers": [
            {"type": "wechat_openid", "id": c["openid"], "appid": "wx123"},
            {"type": "phone", "id": c["phone"]},
            {"type": "email", "id": c["email"]},
        ],
        "grant": ["analytics", "identity_linking"],
        "noticeId": "notice-v1",
        # the backend's identity assertion: a JWT holding raw identifiers, scanned for too
        "identityAssertion": c["assertion"],
    }


@pytest.mark.parametrize(
    "setup", ["embedded", pytest.param("distributed", marks=[pytest.mark.redis, pytest.mark.postgres])]
)
def test_canary_identifiers_never_stored_logged_or_cached(
    tmp_path, request: pytest.FixtureRequest, setup: str
) -> None:
    """Embedded: SQLite only. Distributed: consent in PostgreSQL, shared state in Redis."""
    stack = ExitStack()
    env: dict[str, str] = {}
    if setup == "distributed":
        redis_ns: RedisNamespace = request.getfixturevalue("redis_ns")
        env = {**redis_ns.env(), **backend_env("postgres", stack)}
    gw: Gateway = make_gateway(tmp_path, extra_env=env).start()
    c = canaries()
    c["assertion"] = assertion(
        c["user_id"], c["anonymous_id"], ids=[("phone", c["phone"]), ("email", c["email"])]
    )
    try:
        with gw.client(WEB_KEY) as client:
            batch = events(c)
            r = client.post("/v1/batch", json={"batch": batch})
            assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
            for e in batch:  # the same events through the single endpoints (duplicates)
                assert client.post(f"/v1/{e['type']}", json=e).status_code == 200
            # and rejected ones, whose error path must not leak either
            client.post("/v1/track", json={"userId": c["user_id"], "event": 5, "messageId": "bad"})
            client.post("/v1/batch", json={"batch": [{"type": "track", "userId": c["user_id"]}]})
        with gw.client(MALL_WEB_KEY) as mall:
            assert mall.post("/v1/consent", json=consent_call(c)).status_code == 200
            assert mall.post("/v1/batch", json={"batch": events(c)}).json()["accepted"] >= 2
            # a refused consent call, whose error path must not leak either
            mall.post("/v1/consent", json={**consent_call(c), "grant": ["telepathy"]})
        # an officer looks the person up by raw identifier: only the pseudonym is kept
        officer = httpx.get(
            gw.url + "/admin/consent/records",
            headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
            params={"tenant": "mall", "identifier": c["user_id"]},
        )
        assert officer.status_code == 200 and len(officer.json()["records"]) == 1
        delivered = gw.wait_for_sink({e["messageId"] for e in batch})
        assert len(delivered) == 3
    finally:
        gw.stop()

    try:
        files = [p for p in gw.data_dir.rglob("*") if p.is_file()]
        assert any(p.suffix == ".jsonl" for p in files)
        # embedded: the outbox is a file here; distributed: a Redis stream (scanned below)
        assert any(p.name.startswith("outbox") for p in files) == (setup == "embedded")
        for path in files:
            assert_nowhere(path.read_bytes().decode("latin-1"), str(path), c)

        for db_path in gw.data_dir.glob("*.sqlite3"):
            db = sqlite3.connect(db_path)
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite_master
                    assert_nowhere(repr(row), f"sqlite {db_path.name} table {table}", c)
            db.close()

        if setup == "distributed":
            engine = sa.create_engine(env["DATABASE_URL"].replace("%3D", "="))
            with engine.connect() as conn:
                tables = conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                )
                names = [t for (t,) in tables]
                assert "consent_ledger" in names
                for table in names:
                    for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                        assert_nowhere(repr(tuple(row)), f"postgres table {table}", c)
            engine.dispose()
            r = redis.Redis.from_url(redis_ns.url)
            assert list(r.scan_iter(match=f"{redis_ns.prefix}:consent:*")), "consent state not in Redis"
            for key in r.scan_iter():  # every key on the database, not only this test's
                assert_nowhere(key.decode(), "redis key", c)
                assert_nowhere(repr(r.dump(key)), f"redis value of {key!r}", c)

        log = gw.log_text()
        assert "ingest.rejected" in log  # the flow was logged at all
        assert_nowhere(log, "gateway log", c)
        # The dev banner prints the demo write keys on purpose; structured log lines never carry them.
        assert not [line for line in log.splitlines() if line.startswith("{") and WEB_KEY in line]
    finally:
        stack.close()
