"""Sink throughput: records/s each sink kind delivers, one batch after another as the delivery
worker writes them (no outbox, no consent re-check: the sink alone).

For each kind, N cleaned track events (about 750 bytes of JSON each, shaped like the
gateway's) go through ``write`` in batches, against the real thing on this machine:

* jsonl, parquet: files in a temp dir (fsync per batch; Parquet with zstd);
* webhook, segment, sensors: the test receiver (tests/receivers.py) in its own process, so
  it does not share the GIL with the sink; it decodes every request (gunzip, JSON, and the
  Sensors SDK's checks) and its count is checked after the run;
* redis_stream: Redis db 9 (REDIS_URL's server), a fresh stream and key prefix, removed after;
* nats: a fresh JetStream stream on NATS_URL, deleted after.

    .venv/bin/python bench/sinks.py [--records 50000] [--batch 500] [--kinds jsonl,parquet,...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import structlog  # noqa: E402

from export.outbox import StoredRecord  # noqa: E402
from export.sink import Sink  # noqa: E402
from export.sinks import build_sink  # noqa: E402

KINDS = ("jsonl", "parquet", "webhook", "segment", "sensors", "redis_stream", "nats")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/9"
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
T0 = 1_763_700_000_000


def records(count: int) -> list[StoredRecord]:
    out = []
    for seq in range(1, count + 1):
        person = seq // 7
        at_ms = T0 + seq * 10
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms // 1000)) + f".{at_ms % 1000:03d}Z"
        message_id = str(uuid.UUID(int=seq))
        event = {
            "type": "track",
            "messageId": message_id,
            "timestamp": at,
            "receivedAt": at,
            "userId": f"u1.{person:022d}",
            "anonymousId": f"a1.{person:022d}",
            "event": "Order Completed",
            "properties": {
                "order_id": f"o-{seq}",
                "total": seq * 1.5,
                "currency": "CNY",
                "products": [{"sku": "sku-1", "price": 9.9, "quantity": 2}],
            },
            "context": {
                "ip": "203.0.113.0",
                "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
                "os": {"name": "iOS", "version": "17.2"},
                "app": {"name": "shop", "version": "5.1.0"},
                "library": {"name": "analytics-ios", "version": "4.1.8"},
                "unified_id": f"p_{person:022d}",
                "idgate": {
                    "tenant": "shop",
                    "source": "shop-app",
                    "platform": "app",
                    "keyVersion": 1,
                    "purposes": ["analytics"],
                    "consentProof": [seq],
                },
            },
        }
        payload = json.dumps(event, separators=(",", ":")).encode()
        out.append(StoredRecord(seq, at_ms, ("bench",), payload, b"", message_id, (seq,)))
    return out


async def deliver(sink: Sink, recs: list[StoredRecord], batch: int) -> float:
    await sink.recover({})
    started = time.perf_counter()
    for i in range(0, len(recs), batch):
        await sink.write(recs[i : i + batch])
    elapsed = time.perf_counter() - started
    await sink.close()
    return elapsed


class ReceiverProcess:
    """tests/receivers.py serving in a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.receivers", "--port", "0", "--write-key", "bench-key"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening "):
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.url = line.split(" ", 1)[1]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as response:
            return dict(json.loads(response.read()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def run_http(kind: str, recs: list[StoredRecord], batch: int) -> tuple[float, str]:
    rx = ReceiverProcess()
    try:
        options: dict[str, Any] = {
            "webhook": {"url": f"{rx.url}/webhook"},
            "segment": {"url": rx.url, "write_key": "bench-key"},
            "sensors": {"url": f"{rx.url}/sa?project=default"},
        }[kind]
        sink = build_sink(kind, root=Path(), destination="bench", options=options)
        elapsed = await deliver(sink, recs, batch)
        stats = rx.stats()
    finally:
        rx.stop()
    if stats["received"] != len(recs) or stats["duplicates"]:
        raise RuntimeError(f"{kind}: the receiver counted {stats}")
    return elapsed, f"{stats['requests']} requests, receiver counted {stats['received']}"


async def run_files(kind: str, recs: list[StoredRecord], batch: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="idgate-bench-") as tmp:
        sink = build_sink(kind, root=Path(tmp), destination="bench")
        elapsed = await deliver(sink, recs, batch)
        files = [p for p in Path(tmp, "bench").rglob("*") if p.is_file() and not p.name.startswith(".")]
        size = sum(p.stat().st_size for p in files)
    return elapsed, f"{len(files)} files, {size / 1e6:.1f} MB"


async def run_redis(recs: list[StoredRecord], batch: int) -> tuple[float, str]:
    import redis.asyncio as aioredis

    prefix = f"idgate-bench-{uuid.uuid4().hex[:8]}"
    stream = f"{prefix}:events"
    options = {"url": REDIS_URL, "stream": stream, "key_prefix": f"{prefix}:sink"}
    sink = build_sink("redis_stream", root=Path(), destination="bench", options=options)
    client = aioredis.from_url(REDIS_URL)
    try:
        elapsed = await deliver(sink, recs, batch)
        length = await client.xlen(stream)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=10_000)]
        for i in range(0, len(keys), 10_000):
            await client.delete(*keys[i : i + 10_000])
        await client.aclose()
    if length != len(recs):
        raise RuntimeError(f"redis_stream: {length} entries")
    return elapsed, f"XLEN {length}"


async def run_nats(recs: list[StoredRecord], batch: int) -> tuple[float, str]:
    import nats

    token = uuid.uuid4().hex[:8]
    stream, subject = f"IDGATE_BENCH_{token}", f"idgate.bench.{token}"
    options = {"url": NATS_URL, "subject": subject, "stream": stream}
    sink = build_sink("nats", root=Path(), destination="bench", options=options)
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    try:
        elapsed = await deliver(sink, recs, batch)
        messages = (await js.stream_info(stream)).state.messages
    finally:
        await js.delete_stream(stream)
        await nc.close()
    if messages != len(recs):
        raise RuntimeError(f"nats: {messages} messages")
    return elapsed, f"{messages} messages in the stream"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    recs = records(args.records)
    average = sum(len(r.payload) for r in recs) / len(recs)
    runners: dict[str, Callable[[], Awaitable[tuple[float, str]]]] = {
        "jsonl": lambda: run_files("jsonl", recs, args.batch),
        "parquet": lambda: run_files("parquet", recs, args.batch),
        "webhook": lambda: run_http("webhook", recs, args.batch),
        "segment": lambda: run_http("segment", recs, args.batch),
        "sensors": lambda: run_http("sensors", recs, args.batch),
        "redis_stream": lambda: run_redis(recs, args.batch),
        "nats": lambda: run_nats(recs, args.batch),
    }
    results: dict[str, dict[str, Any]] = {}
    if not args.json:
        print(f"{args.records} records ({average:.0f} bytes of JSON each), batches of {args.batch}")
        print(f"{'sink':<14}{'records/s':>12}{'seconds':>10}  check")
    for kind in args.kinds.split(","):
        elapsed, check = asyncio.run(runners[kind]())
        rate = args.records / elapsed
        results[kind] = {"records_per_s": round(rate), "seconds": round(elapsed, 3), "check": check}
        if not args.json:
            print(f"{kind:<14}{rate:>12,.0f}{elapsed:>10.2f}  {check}", flush=True)
    if args.json:
        print(json.dumps({"records": args.records, "batch": args.batch, "results": results}))


if __name__ == "__main__":
    main()
