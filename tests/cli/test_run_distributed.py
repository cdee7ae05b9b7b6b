"""`make run-distributed` (deploy/run_distributed.py): two replicas on the local PostgreSQL
and Redis that share consent, dedupe and the outbox, started and stopped by one command."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.cli.conftest import clean_env
from tests.conftest import DATABASE_URL, ROOT, RedisNamespace, free_port, jsonl_records
from tests.waiting import wait_until

SCRIPT = ROOT / "deploy" / "run_distributed.py"
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"run_distributed ended ({proc.wait()}):\n{''.join(lines)}")
        lines.append(line)
        if line.startswith(marker):
            return lines
    raise AssertionError("".join(lines))


def test_two_local_replicas_share_consent_dedupe_and_delivery(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    schema = f"t_rd_{uuid.uuid4().hex[:10]}"
    ports = [free_port(), free_port()]
    data = tmp_path / "distributed"
    argv = [sys.executable, str(SCRIPT), "--data-dir", str(data), "--database-url", DATABASE_URL]
    argv += ["--schema", schema, "--redis-url", redis_ns.url, "--redis-prefix", redis_ns.prefix]
    argv += [a for p in ports for a in ("--port", str(p))]
    proc = subprocess.Popen(
        argv, env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        printed = "".join(read_until(proc, "Stop:"))
        one, two = (f"http://127.0.0.1:{p}" for p in ports)
        assert one in printed and two in printed and "Ctrl-C" in printed
        assert (data / "keys.json").stat().st_mode & 0o077 == 0 and (data / "ledger.key").exists()

        auth = ("acme-app-demo-key", "")
        grant = {"anonymousId": "anon-d", "grant": ["analytics"], "noticeId": "privacy-2026-11"}
        assert httpx.post(f"{one}/v1/consent", auth=auth, json=grant, timeout=10).status_code == 200
        event = {"anonymousId": "anon-d", "event": "Product Viewed", "messageId": "d-1"}
        first = httpx.post(f"{two}/v1/track", auth=auth, json=event, timeout=10).json()
        assert first["accepted"] == 1, first  # consent recorded on one replica holds on the other
        again = httpx.post(f"{one}/v1/track", auth=auth, json=event, timeout=10).json()
        assert (again["accepted"], again["duplicates"]) == (0, 1)  # one dedupe window

        delivered = wait_until(
            lambda: jsonl_records(sorted(data.glob("replica-*/sinks/warehouse/*.jsonl"))),
            timeout=30,
            what="the event in a replica's sink",
        )
        assert [e["messageId"] for e in delivered] == ["d-1"]

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        for url in (one, two):
            try:
                httpx.get(url + "/healthz", timeout=2)
                raise AssertionError(f"{url} still answers after the stop")
            except httpx.TransportError:
                pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        engine = sa.create_engine(DATABASE_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
