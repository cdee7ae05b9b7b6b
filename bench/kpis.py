"""Business KPI benchmark: what counting the KPIs costs per event.

Two measurements, side by side in one run:

* engine: ``KpiEngine.observe`` alone on the seed's default KPIs (23 KPIs), for batches of
  100 events and single events, with the in-memory store and, when ``--redis URL`` is given,
  the Redis store (one pipeline per batch: HINCRBY + PFADD) unbuffered and as the gateway
  runs it (write-behind, flushed every 0.5 s); microseconds per event;
* gateway: two real apps (``gateway.app.create_app``, embedded: SQLite outbox, JSONL sinks)
  in process through Litestar's ASGI test client, one with the default KPIs and one with
  ``default_kpis = false``, the load alternating between them in short rounds: events/s
  for ``/v1/batch`` of 100 and single events,
  and the share of throughput the KPIs cost. The in-process client has no socket or HTTP
  parsing, so the share is an upper bound of what a served gateway loses.

The events are the seed's: page Home, Product Viewed, Product Added, Payment Requested /
Succeeded, Order Completed with revenue, over 1,000 anonymous persons.

    .venv/bin/python bench/kpis.py [--seconds 5] [--redis redis://127.0.0.1:6379/9] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# bench/identity.py would shadow the identity package with bench/ first on sys.path
sys.path[0] = str(Path(__file__).resolve().parent.parent)

SEED = [
    ("page", "Home", {}),
    ("track", "Product Viewed", {"product_id": "sku-1"}),
    ("track", "Product Added", {"product_id": "sku-1"}),
    ("track", "Payment Requested", {"amount": 100}),
    ("track", "Payment Succeeded", {"amount": 100}),
    (
        "track",
        "Order Completed",
        {"revenue": 99.5, "products": [{"sku": "sku-1", "price": 49.75, "quantity": 2}]},
    ),
]

# rate limits off: one client sends everything (the limits have a benchmark of their own)
CONFIG = """
[rate_limits]
enabled = false

[[tenants]]
id = "bench"
consent = {{ enforce = false }}
default_kpis = {kpis}

[[tenants.sources]]
id = "bench-web"
platform = "web"
dev_write_key = "bench-web-key-0001"

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]
"""


PERSONS = [str(uuid.UUID(int=random.Random(3).getrandbits(128))) + f"-{i}" for i in range(1000)]


def message(rng: random.Random) -> dict[str, Any]:
    kind, name, props = rng.choice(SEED)
    body: dict[str, Any] = {"type": kind, "anonymousId": rng.choice(PERSONS), "messageId": str(uuid.uuid4())}
    if kind == "page":
        body["name"] = name
    else:
        body["event"] = name
        body["properties"] = props
    return body


# -- engine ----------------------------------------------------------------------------------
async def engine_phase(store_kind: str, redis_url: str | None, batch: int, seconds: float) -> dict[str, Any]:
    from export.kpis import DEFAULT_KPIS, BufferedKpiStore, KpiEngine, KpiEvent, MemoryKpiStore, RedisKpiStore

    client = None
    shared: Any = None
    if store_kind.startswith("redis"):
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url)
        shared = store = RedisKpiStore(client, f"bench-{uuid.uuid4().hex[:8]}", 122, 60)
        if store_kind == "redis-buffered":  # what the gateway runs: flushed every 0.5 s
            store = BufferedKpiStore(shared)
    else:
        store = MemoryKpiStore(122)
    engine = KpiEngine(store, {"bench": DEFAULT_KPIS}, {"bench": {"bench-web": "web"}})
    rng = random.Random(1)
    everything = frozenset({"analytics", "necessary_service"})
    pool = []
    for _ in range(2000):
        kind, name, props = rng.choice(SEED)
        pool.append(
            KpiEvent(
                name if kind == "track" else "$page",
                name if kind == "page" else None,
                props,
                everything,
                f"person-{rng.randrange(1000)}",
            )
        )
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    next_flush = start + 0.5
    while (now := time.perf_counter()) < deadline:
        i = (n // batch) % (len(pool) // batch)
        await engine.observe("bench", "bench-web", pool[i * batch : (i + 1) * batch])
        n += batch
        if isinstance(store, BufferedKpiStore) and now >= next_flush:
            await store.flush()
            next_flush = now + 0.5
    if isinstance(store, BufferedKpiStore):
        await store.flush()
    elapsed = time.perf_counter() - start
    if client is not None:
        keys = [k async for k in client.scan_iter(match=f"{shared.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return {"store": store_kind, "batch": batch, "events": n, "us_per_event": elapsed / n * 1e6}


# -- gateway ---------------------------------------------------------------------------------
def gateway_app(kpis: bool) -> Any:
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.settings import Settings

    configure_logging(fmt="json", level="WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="bench-kpis-"))
    config = tmp / "idgate.toml"
    config.write_text(CONFIG.format(kpis=str(kpis).lower()))
    for name in [n for n in os.environ if n.startswith("IDGATE_")] + ["REDIS_URL", "DATABASE_URL"]:
        os.environ.pop(name, None)
    os.environ["IDGATE_ENV"] = "dev"
    return create_app(Settings.from_env(config_path=config, data_dir=tmp / "var"))


def gateway_rounds(batch: int, seconds: float, rounds: int = 10) -> dict[str, Any]:
    """Both gateways open at once, the load alternating between them in short rounds, so a
    drift of the shared machine's load hits both alike."""
    from litestar.testing import TestClient

    rng = random.Random(2)
    counts = {True: 0, False: 0}
    spent = {True: 0.0, False: 0.0}
    with (
        TestClient(gateway_app(True), base_url="http://bench.local") as on,
        TestClient(gateway_app(False), base_url="http://bench.local") as off,
    ):
        clients = {True: on, False: off}
        for c in clients.values():
            c.auth = ("bench-web-key-0001", "")  # type: ignore[assignment]
            for _ in range(20):  # warm up
                c.post("/v1/track", json={**message(rng), "type": "track", "event": "Warm Up"})
        for i in range(rounds * 2):
            kpis = i % 2 == 0 if (i // 2) % 2 == 0 else i % 2 == 1
            client = clients[kpis]
            start = time.perf_counter()
            deadline = start + seconds / rounds
            while time.perf_counter() < deadline:
                if batch == 1:
                    r = client.post(f"/v1/{(m := message(rng))['type']}", json=m)
                else:
                    r = client.post("/v1/batch", json={"batch": [message(rng) for _ in range(batch)]})
                assert r.status_code == 200, r.text
                counts[kpis] += batch
            spent[kpis] += time.perf_counter() - start
    with_kpis, without = counts[True] / spent[True], counts[False] / spent[False]
    return {
        "batch": batch,
        "with_kpis_events_per_s": with_kpis,
        "without_kpis_events_per_s": without,
        "cost_share": 1 - with_kpis / without,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"engine": [], "gateway": []}
    stores = ["memory", *(["redis", "redis-buffered"] if args.redis else [])]
    for store in stores:
        for batch in (100, 1):
            out["engine"].append(asyncio.run(engine_phase(store, args.redis, batch, args.seconds)))
    for batch in (100, 1):
        out["gateway"].append(gateway_rounds(batch, args.seconds))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    from export.kpis import DEFAULT_KPIS

    print(f"KPI engine ({len(DEFAULT_KPIS)} default KPIs), microseconds per event:")
    for r in out["engine"]:
        us, n = r["us_per_event"], r["events"]
        print(f"  {r['store']:14} batch {r['batch']:>3}: {us:8.2f} us/event ({n} events)")
    print("Gateway in process (ASGI test client), events/s with and without the default KPIs:")
    for r in out["gateway"]:
        print(
            f"  batch {r['batch']:>3}: {r['with_kpis_events_per_s']:9.0f} with, "
            f"{r['without_kpis_events_per_s']:9.0f} without: KPIs cost {r['cost_share'] * 100:5.1f} %"
        )


if __name__ == "__main__":
    main()
