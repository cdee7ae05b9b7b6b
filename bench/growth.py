"""Growth benchmark: how much one client can make idgate store, with and without the limits.

The scenario of issue 11: N fake persons (default 1,500), each one consent call naming 9
identifiers with 5 purposes, then one ``identify`` carrying 45 external ids, sent with the
public write key of a web source from one address, as fast as ``--concurrency`` connections
go. It runs twice on a fresh distributed gateway (PostgreSQL schema and Redis prefix of its
own, one replica): ``[rate_limits] enabled = false`` (before) and the default limits
(after). Printed per run: answers (2xx, 429), seconds, and the growth of the gateway's RSS,
of Redis (MEMORY USAGE summed over the run's keys), of the identity log and of the consent
ledger.

The bound the default limits hold one client network to (README "Limits"):
``ip_consent_calls_per_hour`` (3,600) fresh subjects an hour, whatever the rate; each
``new_identifiers_per_person_per_day`` (30) linked identifiers a day (an identify with 45
is stored but not linked); requests and events per second as configured.

    .venv/bin/python bench/growth.py [--persons 1500] [--concurrency 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("IDGATE_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
WRITE_KEY = "growth-web-key-0001"
PURPOSES = ["analytics", "identity_linking", "personalisation", "marketing", "ad_measurement"]

CONFIG = """
[rate_limits]
enabled = {enabled}

[[tenants]]
id = "acme"

[[tenants.sources]]
id = "acme-web"
platform = "web"
dev_write_key = "{key}"

[[tenants.notices]]
id = "notice-v1"
content_sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

[tenants.tracking_plan]
"*" = ["analytics"]

[tenants.external_id_types]
wx_openid = "wechat_openid"

[[tenants.destinations]]
id = "warehouse"
sink = "jsonl"
purposes = ["analytics"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def consent_body(n: int, tag: str) -> dict[str, Any]:
    """9 identifiers: userId, anonymousId and 7 more."""
    p = f"{tag}{n:06d}"
    return {
        "userId": f"user-{p}",
        "anonymousId": f"anon-{p}",
        "identifiers": [
            {"type": "device_id", "id": f"device-{p}"},
            {"type": "oaid", "id": f"oaid-{p}-0000"},
            {"type": "idfv", "id": f"idfv-{p}-0000"},
            {"type": "android_id", "id": f"a{n:015d}"},
            {"type": "email", "id": f"{p}@example.com"},
            {"type": "phone", "id": f"+86138{n:08d}"},
            {"type": "wechat_openid", "id": f"openid-{p}", "appid": "wx-shop"},
        ],
        "grant": PURPOSES,
        "noticeId": "notice-v1",
    }


def identify_body(n: int, tag: str) -> dict[str, Any]:
    """45 external ids on the person's anonymous id."""
    p = f"{tag}{n:06d}"
    return {
        "anonymousId": f"anon-{p}",
        "messageId": uuid.uuid4().hex,
        "context": {
            "externalIds": [
                {"type": "wx_openid", "id": f"openid-{p}-{i:02d}", "appid": f"wx-app-{i:02d}"}
                for i in range(45)
            ]
        },
    }


async def attack(url: str, persons: int, concurrency: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    tag = uuid.uuid4().hex[:6]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(persons):
        queue.put_nowait(n)

    def count(what: str, status: int) -> None:
        key = f"{what} {status}"
        counts[key] = counts.get(key, 0) + 1

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, auth=(WRITE_KEY, ""), timeout=60) as client:
            while not queue.empty():
                n = queue.get_nowait()
                r = await client.post("/v1/consent", json=consent_body(n, tag))
                count("consent", r.status_code)
                r = await client.post("/v1/identify", json=identify_body(n, tag))
                count("identify", r.status_code)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"seconds": round(time.monotonic() - start, 1), "answers": dict(sorted(counts.items()))}


def redis_usage(client: Any, prefix: str) -> tuple[int, int]:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    total = 0
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k)
    for used in pipe.execute():
        total += int(used or 0)
    return len(keys), total


def run(enabled: bool, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import redis
    import sqlalchemy as sa

    from consent.signing import new_ledger_key_b64
    from identity.pseudonym import new_key_document

    schema = f"growth_{uuid.uuid4().hex[:10]}"
    prefix = f"idgate-growth-{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    rclient = redis.Redis.from_url(REDIS_URL)
    config = tmp / f"growth-{enabled}.toml"
    config.write_text(CONFIG.format(enabled=str(enabled).lower(), key=WRITE_KEY))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_") and k != "REDIS_URL"}
    env.update(
        IDGATE_ENV="dev",
        IDGATE_LOG_LEVEL="WARNING",
        IDGATE_LOG_FORMAT="json",
        DATABASE_URL=f"{PG_URL}?options=-csearch_path%3D{schema}",
        REDIS_URL=REDIS_URL,
        IDGATE_REDIS_PREFIX=prefix,
        IDGATE_KEYS=new_key_document(["acme"]),
        IDGATE_LEDGER_KEY=new_ledger_key_b64(),
    )
    log = open(tmp / f"gateway-{enabled}.log", "wb")  # noqa: SIM115 - owned by the process
    argv = [str(Path(sys.executable).with_name("idgate")), "serve", "--config", str(config)]
    argv += ["--port", str(port), "--data-dir", str(tmp / f"data-{enabled}")]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def rows(table: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".{table}')).scalar() or 0)

    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                sys.exit(f"the gateway exited: {(tmp / f'gateway-{enabled}.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the gateway did not become ready")
            time.sleep(0.2)
        asyncio.run(attack(url, 20, 2))  # warm up: first-use allocations are not growth
        rss0, (keys0, redis0) = rss_bytes(proc.pid), redis_usage(rclient, prefix)
        log0, ledger0 = rows("identity_log"), rows("consent_ledger")
        result = asyncio.run(attack(url, args.persons, args.concurrency))
        # the identity log is appended in the background: wait until it stops growing
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 2 and time.monotonic() < stable_since + 60:
            now = rows("identity_log")
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.5)
        keys1, redis1 = redis_usage(rclient, prefix)
        result.update(
            limits="on (defaults)" if enabled else "off",
            rss_growth_mb=round((rss_bytes(proc.pid) - rss0) / 2**20, 1),
            redis_growth_mb=round((redis1 - redis0) / 2**20, 1),
            redis_new_keys=keys1 - keys0,
            identity_log_rows=rows("identity_log") - log0,
            consent_ledger_rows=rows("consent_ledger") - ledger0,
        )
        return result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        keys = list(rclient.scan_iter(match=f"{prefix}:*"))
        if keys:
            rclient.delete(*keys)
        rclient.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--persons", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="idgate-growth-") as tmp_name:
        for enabled in (False, True):
            print(f"{args.persons:,} fake persons, limits {'on' if enabled else 'off'} ...", flush=True)
            results.append(run(enabled, args, Path(tmp_name)))
    print()
    columns = ("seconds", "rss_growth_mb", "redis_growth_mb", "redis_new_keys", "identity_log_rows")
    columns += ("consent_ledger_rows",)
    print(f"{'limits':<15} " + " ".join(f"{c:>20}" for c in columns))
    for r in results:
        print(f"{r['limits']:<15} " + " ".join(f"{r[c]:>20}" for c in columns))
    for r in results:
        print(f"answers, limits {r['limits']}: {r['answers']}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
