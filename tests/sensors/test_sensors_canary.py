"""Privacy invariant for the Sensors protocol: planted raw identifiers (openid, unionid, phone,
login id, ...) appear nowhere the gateway writes: sink files, outbox, databases, logs."""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import MALL_MP_KEY, Gateway, make_gateway
from tests.sensors.conftest import encode, sensors_url, wait_for

pytestmark = pytest.mark.slow

APPID = "wx00c0ffee00c0ffee"


def canaries() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "login": f"CANARY-login-{tag}",
        "cookie": f"CANARY-cookie-{tag}",
        "mp_id": f"CANARY-mpid-{tag}",
        "openid": f"oCANARYopenid{tag}",
        "openid_no_appid": f"oCANARYbareopenid{tag}",
        "unionid": f"oCANARYunionid{tag}",
        "phone": f"139{random.randrange(10**8):08d}",
        "email": f"canary.{tag}@example.com",
        "android_id": f"canaryandroid{tag}",
        "device": f"CANARY-device-{tag}",
        "sharer": f"CANARY-sharer-{tag}",
        "member": f"CANARY-member-{tag}",
        "ip": "203.0.113.77",
    }


def events(c: dict[str, str]) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    identities = {
        "$identity_mp_id": c["mp_id"],
        f"$identity_mp_{APPID}_openid": c["openid"],
        "$identity_mp_unionid": c["unionid"],
        "$identity_mobile": c["phone"],
        "$identity_email": c["email"],
        "$identity_android_id": c["android_id"],
        "$identity_member_id": c["member"],
    }
    properties = {
        "$device_id": c["device"],
        "$share_distinct_id": c["sharer"],
        "$ip": c["ip"],
        "$url": f"pages/pay?mobile={c['phone']}",
        "note": f"ship to {c['phone']}, mail {c['email']}",
    }
    base = {"time": now, "lib": {"$lib": "MiniProgram", "$lib_version": "1.22.7"}, "_flush_time": now}
    return [
        {
            **base,
            "type": "track",
            "event": "AddToCart",
            "distinct_id": c["mp_id"],
            "identities": identities,
            "properties": properties,
            "_track_id": 1,
        },
        {
            **base,
            "type": "track",
            "event": "$MPLaunch",
            "distinct_id": c["mp_id"],
            "identities": {"$identity_mp_openid": c["openid_no_appid"]},
            "properties": {"$app_id": APPID},
            "_track_id": 2,
        },
        {
            **base,
            "type": "track_signup",
            "event": "$SignUp",
            "distinct_id": c["login"],
            "login_id": c["login"],
            "original_id": c["cookie"],
            "anonymous_id": c["cookie"],
            "properties": {},
            "_track_id": 3,
        },
        {
            **base,
            "type": "track_id_bind",
            "event": "$BindID",
            "distinct_id": c["login"],
            "identities": {"$identity_login_id": c["login"], "$identity_mobile": c["phone"]},
            "_track_id": 4,
        },
        {
            **base,
            "type": "track_id_unbind",
            "event": "$UnbindID",
            "distinct_id": c["login"],
            "identities": {"$identity_mobile": c["phone"]},
            "_track_id": 5,
        },
        {
            **base,
            "type": "profile_set",
            "distinct_id": c["login"],
            "login_id": c["login"],
            "properties": {"mobile": c["phone"], "email": c["email"], "$is_login_id": True},
        },
        # rejected ones, whose error path must not leak either
        {**base, "type": "track", "event": "9lives", "distinct_id": c["login"], "_track_id": 6},
        {**base, "type": "track", "event": "Buy", "distinct_id": c["login"], "properties": {c["phone"]: 1}},
        {**base, "type": "track", "event": "Buy", "distinct_id": c["login"] + "x" * 300},
        {**base, "type": "item_set", "item_type": "member", "item_id": c["member"]},
    ]


def assert_nowhere(text: str, where: str, c: dict[str, str]) -> None:
    lowered = text.lower()
    leaked = [k for k, v in c.items() if v.lower() in lowered]
    if "+86" + c["phone"] in text:
        leaked.append("phone_e164")
    assert not leaked, f"raw identifiers {leaked} found in {where}"


def scan(gw: Gateway, c: dict[str, str]) -> None:
    files = [p for p in gw.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files) and any(p.name.startswith("outbox") for p in files)
    for path in files:
        assert_nowhere(path.read_bytes().decode("latin-1"), str(path), c)
    for db_path in gw.data_dir.glob("*.sqlite3"):
        db = sqlite3.connect(db_path)
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite_master
                assert_nowhere(repr(row), f"{Path(db_path).name} table {table}", c)
        db.close()
    log = gw.log_text()
    assert "ingest.rejected" in log
    assert_nowhere(log, "gateway log", c)


def test_canary_identifiers_never_stored_or_logged(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path).start()
    c = canaries()
    try:
        batch = events(c)
        for tenant in ("shop", "mall"):
            if tenant == "mall":
                consent = httpx.post(
                    f"{gw.url}/v1/consent",
                    auth=(MALL_MP_KEY, ""),
                    json={
                        "anonymousId": c["mp_id"],
                        "identifiers": [
                            {"type": "wechat_openid", "id": c["openid"], "appid": APPID},
                            {"type": "wechat_unionid", "id": c["unionid"]},
                            {"type": "phone", "id": c["phone"]},
                        ],
                        "grant": ["analytics", "identity_linking"],
                        "noticeId": "notice-v1",
                    },
                    timeout=10,
                )
                assert consent.status_code == 200, consent.text
            r = httpx.post(
                sensors_url(gw, tenant),
                content=f"data_list={quote(encode(batch))}&gzip=1",
                headers={"Content-Type": "text/plain"},
                timeout=10,
            )
            assert r.status_code == 200 and r.json()["accepted"] >= 1, r.text
            assert len(r.json()["rejected"]) == 4
            # one at a time through the image mode as well (query strings), duplicates now
            for ev in batch[:2]:
                url = sensors_url(gw, tenant, "/sa.gif") + f"&data={quote(encode(ev, compress=False))}"
                assert httpx.get(url, timeout=10).status_code == 200
            bad = sensors_url(gw, tenant, "/sa.gif") + f"&data={quote(encode(batch[-2], compress=False))}"
            assert httpx.get(bad, timeout=10).status_code == 400
        delivered = wait_for(gw, lambda e: "sensors" in e.get("context", {}), 6)
        assert len(delivered) == 6  # shop: the six good events (the image-mode ones are duplicates)
        assert len(wait_for(gw, lambda e: "sensors" in e.get("context", {}), 1, "mall-warehouse")) >= 1
    finally:
        gw.stop()
    scan(gw, c)
