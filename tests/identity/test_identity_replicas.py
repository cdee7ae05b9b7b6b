"""Two replicas merging concurrently on PostgreSQL converge to one partition, the same as an
offline rebuild of the log."""

from __future__ import annotations

import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    MALL_APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    PostgresSchema,
    RedisNamespace,
    assertion,
    make_gateway,
    mid,
)
from tests.waiting import wait_until

IDGATE = str(Path(sys.executable).with_name("idgate"))
OPS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

pytestmark = pytest.mark.slow


def test_concurrent_conflicting_merges_converge(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    db = pg_schema.url
    env = {**redis_ns.env(), "DATABASE_URL": db}
    a = make_gateway(tmp_path / "a", extra_env=env).start()
    b = make_gateway(tmp_path / "b", extra_env=env).start()
    try:
        tag = uuid.uuid4().hex[:6]
        cases = [(f"dev-{tag}-{i:03d}", f"alice-{tag}-{i}", f"bob-{tag}-{i}") for i in range(20)]
        for device, alice, bob in cases:
            for user in (alice, bob):
                r = httpx.post(
                    a.url + "/v1/consent",
                    auth=(MALL_APP_KEY, ""),
                    json={
                        "userId": user,
                        "identifiers": [{"type": "device_id", "id": device}],
                        "grant": ["analytics", "identity_linking"],
                        "noticeId": "notice-v1",
                        "identityAssertion": assertion(user, device),
                    },
                )
                assert r.status_code == 200, r.text

        def claim(gw_url: str, device: str, user: str) -> None:
            r = httpx.post(
                gw_url + "/v1/track",
                auth=(MALL_APP_KEY, ""),
                timeout=30,
                json={
                    "userId": user,
                    "event": "Product Viewed",
                    "messageId": mid(),
                    "context": {"device": {"id": device}, "identityAssertion": assertion(user, device)},
                },
            )
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text

        # both replicas bind the same device to a different user at the same moment: a person
        # may hold one user_id, so exactly one bind per device can win
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [
                pool.submit(claim, gw.url, device, user)
                for device, alice, bob in cases
                for gw, user in ((a, alice), (b, bob))
            ]
            for f in futures:
                f.result()

        def view(gw_url: str, device: str, user: str) -> tuple[bool, str | None]:
            r = httpx.get(
                gw_url + "/admin/identity/explain",
                headers=OPS,
                params={
                    "tenant": "mall",
                    "a": device,
                    "a_type": "device_id",
                    "b": user,
                    "b_type": "user_id",
                },
            )
            assert r.status_code == 200, r.text
            return r.json()["linked"], r.json()["unifiedId"]

        def replicas_agree() -> bool:
            return all(
                view(a.url, device, user) == view(b.url, device, user)
                for device, alice, bob in cases
                for user in (alice, bob)
            )

        # Each replica applies the other's log entries when it next follows the log (every
        # second): wait until they answer alike, then check what they agree on.
        wait_until(replicas_agree, timeout=20, what="replicas a and b to follow each other's binds")
        for device, alice, bob in cases:
            seen_a = [view(a.url, device, alice), view(a.url, device, bob)]
            seen_b = [view(b.url, device, alice), view(b.url, device, bob)]
            assert seen_a == seen_b, f"replicas disagree about {device}"
            assert [linked for linked, _ in seen_a].count(True) == 1, f"{device}: exactly one bind wins"
    finally:
        a.stop()
        b.stop()
    rebuilt = subprocess.run(
        [IDGATE, "identity", "rebuild", "--database-url", db], capture_output=True, text=True, timeout=120
    )
    assert rebuilt.returncode == 0, rebuilt.stderr + rebuilt.stdout
    assert "OK:" in rebuilt.stdout and "mall:" in rebuilt.stdout


def test_web_events_alone_need_no_lock_after_first_sight(tmp_path) -> None:
    """Known identifiers are answered from memory: the same visitor's next events are fast."""
    gw = make_gateway(tmp_path).start()
    try:
        anon = f"anon-{uuid.uuid4().hex[:8]}"
        httpx.post(
            gw.url + "/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={"anonymousId": anon, "grant": ["analytics"], "noticeId": "notice-v1"},
        )
        first = [mid() for _ in range(3)]
        for m in first:
            httpx.post(
                gw.url + "/v1/track",
                auth=(MALL_WEB_KEY, ""),
                json={"anonymousId": anon, "event": "Product Viewed", "messageId": m},
            )
        events = gw.wait_for_sink(set(first), "mall-warehouse")
        assert len({e["context"]["unified_id"] for e in events}) == 1
    finally:
        gw.stop()
