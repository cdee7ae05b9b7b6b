"""Stream sinks against the real servers on localhost: Redis Streams (db 9, a key prefix of
the test's own) and NATS JetStream (a stream and subject of the test's own, deleted after)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from export.outbox import StoredRecord
from export.sink import PermanentSinkError, RetryableSinkError
from export.sinks import build_sink
from export.stream_sinks import NatsSink, RedisStreamSink
from tests.conftest import NATS_URL, RedisNamespace, free_port
from tests.receivers import sample_records

NO_ROOT = Path("/nonexistent")  # stream sinks write no files


# -- Redis Streams ---------------------------------------------------------------------------
def _redis_sink(ns: RedisNamespace, **options: Any) -> RedisStreamSink:
    sink = build_sink(
        "redis_stream",
        root=NO_ROOT,
        destination="stream-dest",
        options={
            "url": ns.url,
            "stream": f"{ns.prefix}:events",
            "key_prefix": f"{ns.prefix}:sink",
            **options,
        },
    )
    assert isinstance(sink, RedisStreamSink)
    return sink


def test_redis_stream_adds_each_message_once(redis_ns: RedisNamespace) -> None:
    sink = _redis_sink(redis_ns)
    records = sample_records(300)

    async def main() -> None:
        assert await sink.recover({}) == 0
        assert await sink.write(records[:200]) == {}
        assert (sink.added, sink.duplicates) == (200, 0)
        # the same batch redelivered, then one overlapping it
        await sink.write(records[:200])
        await sink.write(records[150:])
        assert (sink.added, sink.duplicates) == (300, 250)
        await sink.close()

    asyncio.run(main())
    client = redis.Redis.from_url(redis_ns.url)
    entries = client.xrange(f"{redis_ns.prefix}:events")
    assert [e[b"message_id"].decode() for _, e in entries] == [r.message_id for r in records]
    assert [e[b"payload"] for _, e in entries] == [r.payload for r in records]
    # the dedupe keys hold no message id and expire after dedupe_seconds (default an hour)
    key = sink.dedupe_key("m-1")
    assert "m-1" not in key and key.startswith(
        f"{redis_ns.prefix}:sink:{{{redis_ns.prefix}:events}}:stream-dest:"
    )
    assert 3_500 < client.ttl(key) <= 3_600
    client.close()


def test_redis_stream_length_is_bounded(redis_ns: RedisNamespace) -> None:
    sink = _redis_sink(redis_ns, maxlen=100, dedupe_seconds=60)
    records = sample_records(2_000)

    async def main() -> None:
        for i in range(0, len(records), 250):
            await sink.write(records[i : i + 250])
        await sink.close()

    asyncio.run(main())
    client = redis.Redis.from_url(redis_ns.url)
    length = client.xlen(f"{redis_ns.prefix}:events")
    node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    # MAXLEN ~ trims whole nodes: at least maxlen stay, at most one node more
    assert 100 <= length <= 100 + node
    last = client.xrevrange(f"{redis_ns.prefix}:events", count=1)[0][1]
    assert last[b"message_id"] == b"m-2000"  # the newest are kept
    client.close()


def test_redis_stream_failures_are_retryable_and_leave_no_dedupe_key(redis_ns: RedisNamespace) -> None:
    records = sample_records(3)

    async def main() -> None:
        down = build_sink("redis_stream", root=NO_ROOT, destination="d", options={
            "url": f"redis://127.0.0.1:{free_port()}/9", "stream": "s", "timeout_seconds": 1,
        })  # fmt: skip
        with pytest.raises(RetryableSinkError, match="redis_stream sink d: ConnectionError"):
            await down.write(records)
        await down.close()
        # the stream key holds another type: XADD fails, and the retry is not swallowed
        client = redis.Redis.from_url(redis_ns.url)
        client.set(f"{redis_ns.prefix}:events", "not a stream")
        sink = _redis_sink(redis_ns)
        with pytest.raises(RetryableSinkError, match="WRONGTYPE"):
            await sink.write(records)
        client.delete(f"{redis_ns.prefix}:events")
        await sink.write(records)
        assert sink.added == 3
        await sink.close()
        client.close()

    asyncio.run(main())


def test_redis_stream_url_defaults_to_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.9:6380/2")
    sink = build_sink("redis_stream", root=NO_ROOT, destination="d", options={"stream": "s"})
    assert isinstance(sink, RedisStreamSink) and sink.url == "redis://10.0.0.9:6380/2"
    assert (sink.maxlen, sink.key_prefix, sink.dedupe_seconds) == (1_000_000, "idgate:sink", 3600)
    monkeypatch.delenv("REDIS_URL")
    sink = build_sink("redis_stream", root=NO_ROOT, destination="d", options={"stream": "s"})
    assert isinstance(sink, RedisStreamSink) and sink.url == "redis://127.0.0.1:6379/0"


# -- NATS JetStream --------------------------------------------------------------------------
async def _nats_manager() -> Any:
    import nats

    nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    return nc, nc.jetstream()


@pytest.fixture
def jetstream_names(nats_url: str) -> Iterator[tuple[str, str]]:
    """A stream and subject of the test's own on NATS_URL; the stream is deleted afterwards."""
    token = uuid.uuid4().hex[:12]
    stream, subject = f"IDGATE_TEST_{token}", f"idgate.test.{token}"
    yield stream, subject

    async def cleanup() -> None:
        import nats.js.errors

        nc, js = await _nats_manager()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await nc.close()

    asyncio.run(cleanup())


async def _read_stream(stream: str, subject: str) -> list[Any]:
    nc, js = await _nats_manager()
    info = await js.stream_info(stream)
    messages = [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    await nc.close()
    return messages


def test_nats_dedupes_by_message_id_and_creates_the_stream(jetstream_names: tuple[str, str]) -> None:
    stream, subject = jetstream_names
    sink = build_sink("nats", root=NO_ROOT, destination="bus", options={
        "url": NATS_URL, "subject": subject, "stream": stream, "duplicate_window_seconds": 600,
    })  # fmt: skip
    assert isinstance(sink, NatsSink)
    records = sample_records(500)

    async def main() -> list[Any]:
        assert await sink.recover({}) == 0
        assert await sink.write(records[:300]) == {}
        await sink.write(records[:300])  # the same batch again
        await sink.write(records[200:])
        await sink.close()
        nc, js = await _nats_manager()
        info = await js.stream_info(stream)
        await nc.close()
        assert info.config.subjects == [subject]
        assert info.config.duplicate_window == 600
        return await _read_stream(stream, subject)

    messages = asyncio.run(main())
    assert (sink.added, sink.duplicates) == (500, 400)
    assert [m.headers["Nats-Msg-Id"] for m in messages] == [r.message_id for r in records]
    assert [m.data for m in messages] == [r.payload for r in records]
    assert json.loads(messages[0].data)["messageId"] == "m-1"


def test_nats_uses_an_existing_stream(jetstream_names: tuple[str, str]) -> None:
    stream, subject = jetstream_names

    async def main() -> list[Any]:
        nc, js = await _nats_manager()
        await js.add_stream(name=stream, subjects=[f"{subject}.>", subject], duplicate_window=120)
        await nc.close()
        sink = build_sink(
            "nats", root=NO_ROOT, destination="bus", options={"url": NATS_URL, "subject": subject}
        )
        await sink.write(sample_records(10))
        await sink.write(sample_records(10))
        await sink.close()
        return await _read_stream(stream, subject)

    assert len(asyncio.run(main())) == 10


def test_nats_failures(jetstream_names: tuple[str, str]) -> None:
    stream, subject = jetstream_names

    async def main() -> None:
        # nothing listens there
        down = NatsSink("bus", url=f"nats://127.0.0.1:{free_port()}", subject=subject, timeout_seconds=3)
        with pytest.raises(RetryableSinkError, match="nats sink bus: "):
            await down.write(sample_records(2))
        await down.close()
        # no stream takes the subject
        sink = NatsSink("bus", url=NATS_URL, subject=subject, timeout_seconds=3)
        with pytest.raises(RetryableSinkError, match="no JetStream stream takes subject"):
            await sink.write(sample_records(2))
        await sink.close()
        # a record larger than the stream takes is refused, the others go through
        nc, js = await _nats_manager()
        await js.add_stream(name=stream, subjects=[subject], max_msg_size=4096)
        await nc.close()
        big = StoredRecord(99, 1, ("bus",), b'{"messageId":"big","pad":"' + b"x" * 5000 + b'"}', b"", "big")
        with pytest.raises(PermanentSinkError, match="refused a record"):
            await sink.write([big])
        await sink.write(sample_records(2))
        assert sink.added == 2
        await sink.close()

    asyncio.run(main())
