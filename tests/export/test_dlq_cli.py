"""``idgate dlq`` on the distributed mode's stores: dead letters in Redis streams, replay into
the shared Redis outbox (the embedded mode is covered through a gateway in
tests/e2e/test_delivery_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import msgspec
import redis

from export.deadletter import RedisDeadLetters
from export.outbox import StoredRecord
from tests.conftest import IDGATE, RedisNamespace


def run(ns: RedisNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_") and k != "REDIS_URL"}
    env.update(REDIS_URL=ns.url, IDGATE_REDIS_PREFIX=ns.prefix, IDGATE_OUTBOX="redis", IDGATE_ENV="dev")
    return subprocess.run([str(IDGATE), "dlq", *args], env=env, capture_output=True, text=True, timeout=60)


def record(i: int) -> StoredRecord:
    payload = {
        "type": "track",
        "messageId": f"m{i}",
        "context": {"idgate": {"tenant": "shop", "source": "web"}},
    }
    return StoredRecord(
        i, int(time.time() * 1000), ("hook",), msgspec.json.encode(payload), b"", f"m{i}", (7,)
    )


def test_dlq_cli_on_redis(redis_ns: RedisNamespace) -> None:
    client = redis.Redis.from_url(redis_ns.url)
    store = RedisDeadLetters(redis.Redis.from_url(redis_ns.url), redis_ns.prefix)
    store.add("hook", [record(i) for i in range(3)], "max_attempts: RetryableSinkError: HTTP 503", 8)
    store.add("other", [record(9)], "refused: HTTP 400", 1)

    listed = run(redis_ns, "list", "--json", "--destination", "hook")
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["messageId"] for e in entries] == ["m0", "m1", "m2"]
    assert all(e["attempts"] == 8 and e["reason"].startswith("max_attempts") for e in entries)
    human = run(redis_ns, "list")
    assert "hook 3" in human.stdout and "other 1" in human.stdout

    shown = json.loads(run(redis_ns, "show", entries[0]["id"]).stdout)
    assert shown["event"]["messageId"] == "m0" and shown["consentProof"] == [7]

    replayed = run(redis_ns, "replay", "--destination", "hook")
    assert replayed.returncode == 0 and "replayed 3" in replayed.stdout, replayed.stderr
    stream = client.xrange(f"{redis_ns.prefix}:outbox")
    assert len(stream) == 3  # back in the shared outbox, for their destination only
    assert run(redis_ns, "list", "--json", "--destination", "hook").stdout == ""

    nothing = run(redis_ns, "replay")
    assert nothing.returncode == 2 and "--destination, or --all" in nothing.stderr
    assert "purged 1" in run(redis_ns, "purge", "--all", "--yes").stdout
    assert store.counts() == {}
    missing = run(redis_ns, "show", "hook/1-1")
    assert missing.returncode == 2 and "no dead letter" in missing.stderr
    client.close()
    store.close()
