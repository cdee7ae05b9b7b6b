"""New vs returning persons and top SKUs by sales over real HTTP, with the gateway's clock
under the test's control (a day back and forth), embedded and on Redis: a person seen
yesterday is returning today, a stranger is new; the top SKUs rank order lines by price x
quantity, and a "SKU" that is personal data is never stored."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from identity.pseudonym import pseudonymise_identifier
from tests.conftest import OPERATOR_TOKEN, WEB_KEY, Gateway, RedisNamespace, make_gateway, mid
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
PHONE_SKU = "13912340020"  # a client put a phone number where the SKU goes


def kpis(gw: Gateway) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{gw.url}/admin/kpis", params={"tenant": "shop"}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return {k["id"]: k["windows"][-1]["total"] for k in r.json()["kpis"]}


def send(gw: Gateway, batch: list[dict[str, Any]]) -> None:
    with gw.client(WEB_KEY) as c:
        r = c.post("/v1/batch", json={"batch": batch})
    assert r.status_code == 200 and r.json()["accepted"] == len(batch), r.text


def home(anon: str) -> dict[str, Any]:
    return {"type": "page", "anonymousId": anon, "name": "Home", "messageId": mid()}


def order(anon: str, *products: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "track",
        "anonymousId": anon,
        "event": "Order Completed",
        "properties": {"products": list(products)},
        "messageId": mid(),
    }


@pytest.mark.parametrize("mode", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def test_new_and_returning_persons_and_top_skus(
    tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    clock = tmp_path / "clock"
    env = {"IDGATE_KPI_BUCKET_MS": "1000", "IDGATE_DEV_CLOCK_FILE": str(clock)}
    ns: RedisNamespace | None = None
    if mode == "redis":
        ns = request.getfixturevalue("redis_ns")
        env.update(ns.env())
    gw = make_gateway(tmp_path / "gw", extra_env=env).start()
    a, b, c = (f"nr-{n}-{uuid.uuid4().hex[:8]}" for n in "abc")
    try:
        now = int(time.time()) + 0.5
        clock.write_text(str(now - 86_400))  # yesterday: a and b visit, both new then
        send(gw, [home(a), home(b)])
        wait_until(lambda: kpis(gw)["new_persons"]["value"] == 2, what="yesterday's new persons")
        assert kpis(gw)["returning_persons"]["value"] == 0

        clock.write_text(str(now))  # today: a comes back, c is new
        send(gw, [home(a), home(c), home(a)])
        got = wait_until(
            lambda: k if (k := kpis(gw))["new_persons"]["counted"] == 3 else None, what="today's visits"
        )
        got = wait_until(
            lambda: k if (k := kpis(gw))["returning_persons"]["value"] == 1 else None, what="a returning"
        )
        assert got["new_persons"]["value"] == 1 and got["uv_home"]["value"] == 2

        send(
            gw,
            [
                order(
                    a,
                    {"sku": "SKU-1", "price": 10, "quantity": 3},
                    {"sku": "SKU-2", "price": 50, "quantity": 1},
                    {"product_id": "p-3", "price": 5},
                    {"sku": PHONE_SKU, "price": 7},
                ),
                order(c, {"sku": "SKU-1", "price": "10", "quantity": 1}),
            ],
        )
        top = wait_until(
            lambda: t if (t := kpis(gw)["top_skus"])["value"] == 102 else None, what="the top SKUs"
        )
        # price x quantity per SKU, largest first; the phone number counts in the total only
        assert top["top"] == [
            {"name": "SKU-2", "amount": 50},
            {"name": "SKU-1", "amount": 40},
            {"name": "p-3", "amount": 5},
        ]

        # no identifier, pseudonym or phone in the answer or (Redis) any KPI key or value
        pseudonymiser = gw.keyring().pseudonymiser("shop")
        canaries = {a, b, c, PHONE_SKU} | {
            pseudonymise_identifier(pseudonymiser, "anonymous_id", x).value for x in (a, b, c)
        }
        seen = httpx.get(f"{gw.url}/admin/kpis", params={"tenant": "shop"}, headers=ADMIN).text
        seen += httpx.get(f"{gw.url}/metrics").text
        if ns is not None:
            import redis

            client = redis.Redis.from_url(ns.url)
            try:
                keys = list(client.scan_iter(match=f"{ns.prefix}:kpi*"))
                assert any(b":seen:" in k for k in keys) and any(b":top:" in k for k in keys)
                seen += str(keys)
                for k in keys:
                    if client.type(k) == b"zset":
                        seen += str(client.zrange(k, 0, -1))
                    elif client.type(k) == b"hash":
                        seen += str(client.hgetall(k))
            finally:
                client.close()
        assert not [x for x in canaries if x in seen]
    finally:
        gw.stop()
