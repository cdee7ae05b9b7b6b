"""Stream sinks: Redis Streams and NATS JetStream, deduplicated by message id on the server.

What they guarantee:

* ``redis_stream``: every record is appended once to ``stream`` as the fields
  ``message_id`` and ``payload`` (``XADD ... MAXLEN ~ maxlen``): a Lua script checks a
  per-message-id key (``<key_prefix>:{<stream>}:<destination>:<hash of the message id>``),
  adds the entry and sets the key for ``dedupe_seconds``, atomically per record, so a
  redelivered record within that window is not added again; a batch is one pipeline of
  script calls (100 records each), one round trip. The window (default an hour) should
  outlast redeliveries: a retried write (minutes), a replica that crashed before its commit
  and restarts. Each key takes about 120 bytes of Redis memory: at 1,000 events/s an hour
  is 3.6 M keys, about 0.45 GB; size it to the event rate. The length bound is approximate
  (Redis trims whole nodes): the stream keeps at least ``maxlen`` entries, and drops the
  oldest beyond it by design.
* ``nats``: every record is published to ``subject`` with the header ``Nats-Msg-Id`` = its
  message id, and a write returns only when JetStream acknowledged every message (they are
  published concurrently, then awaited together). JetStream drops a message id it has
  seen within the stream's duplicate window, so redeliveries within it are stored once.
  With ``stream`` set, the sink creates that stream (subjects = [subject], the duplicate
  window ``duplicate_window_seconds``) if it does not exist.

Both connect on first write and reconnect after a failure; a server that is down, a timeout
or an overloaded server is a retryable error. A record larger than the server accepts is
permanent (the worker isolates it into the dead-letter store).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from export.outbox import StoredRecord
from export.sink import (
    Option,
    PermanentSinkError,
    RetryableSinkError,
    check_options,
    message_id_of,
    non_empty,
    number_check,
    safe_location,
    url_check,
    with_defaults,
)
from identity.redis_client import URL_SCHEMES, is_cluster, open_async_redis

log = structlog.get_logger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

_NATS_SUBJECT = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")
_NATS_STREAM = re.compile(r"^[^\s.*>/\\]+$")


def _nats_subject(value: Any) -> str | None:
    return None if _NATS_SUBJECT.match(value) else "must be a NATS subject without wildcards (a.b.c)"


def _nats_stream(value: Any) -> str | None:
    return (
        None
        if _NATS_STREAM.match(value)
        else "must be a stream name without spaces, '.', '*', '>' or slashes"
    )


_TIMEOUT = Option((int, float), "seconds per operation", default=10, check=number_check(0.05, 300))

STREAM_OPTIONS: dict[str, dict[str, Option]] = {
    "redis_stream": {
        "url": Option(
            (str,),
            "Redis server or cluster (redis+cluster://; default: $REDIS_URL, else redis://127.0.0.1:6379/0)",
            check=url_check(*URL_SCHEMES),
        ),
        "stream": Option((str,), "stream key", required=True, check=non_empty),
        "maxlen": Option(
            (int,), "approximate length bound", default=1_000_000, check=number_check(1, 10**12)
        ),
        "key_prefix": Option(
            (str,), "prefix of the per-message-id keys", default="idgate:sink", check=non_empty
        ),
        "dedupe_seconds": Option(
            (int,), "how long a message id is remembered", default=3600, check=number_check(1, 90 * 86_400)
        ),
        "timeout_seconds": _TIMEOUT,
    },
    "nats": {
        "url": Option(
            (str,), "NATS server", default=DEFAULT_NATS_URL, check=url_check("nats", "tls", "ws", "wss")
        ),
        "subject": Option((str,), "subject published to", required=True, check=_nats_subject),
        "stream": Option((str,), "stream to create when missing", check=_nats_stream),
        "duplicate_window_seconds": Option(
            (int, float),
            "duplicate window of a stream the sink creates",
            default=3600,
            check=number_check(1, 7 * 86_400),
        ),
        "timeout_seconds": _TIMEOUT,
    },
}


def validate_stream_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    return check_options(kind, options, STREAM_OPTIONS[kind])


def build_stream_sink(
    kind: str, *, destination: str, options: Mapping[str, Any]
) -> RedisStreamSink | NatsSink:
    opts = with_defaults(options, STREAM_OPTIONS[kind])
    if kind == "redis_stream":
        return RedisStreamSink(
            destination,
            url=opts["url"] or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
            stream=opts["stream"],
            maxlen=opts["maxlen"],
            key_prefix=opts["key_prefix"],
            dedupe_seconds=opts["dedupe_seconds"],
            timeout_seconds=float(opts["timeout_seconds"]),
        )
    if kind == "nats":
        return NatsSink(
            destination,
            url=opts["url"],
            subject=opts["subject"],
            stream=opts["stream"],
            duplicate_window_seconds=float(opts["duplicate_window_seconds"]),
            timeout_seconds=float(opts["timeout_seconds"]),
        )
    raise ValueError(f"not a stream sink kind: {kind!r}")


# -- Redis Streams ---------------------------------------------------------------------------
# KEYS: the stream, then one dedupe key per record; ARGV: ttl, maxlen, then message id and
# payload per record. XADD before SET: if XADD fails (wrong key type, ...) no key is left
# behind to swallow the retry.
_XADD_ONCE = """
local added = {}
for i = 2, #KEYS do
  local at = 2 * i - 1
  if redis.call('EXISTS', KEYS[i]) == 1 then
    added[i - 1] = 0
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'message_id', ARGV[at], 'payload', ARGV[at + 1])
    redis.call('SET', KEYS[i], '1', 'EX', ARGV[1])
    added[i - 1] = 1
  end
end
return added
"""
# records per script call: measured twice the throughput of one call per record; the
# call keeps Redis busy for well under a millisecond
_SCRIPT_RECORDS = 100


class RedisStreamSink:
    def __init__(
        self,
        destination: str,
        *,
        url: str,
        stream: str,
        maxlen: int = 1_000_000,
        key_prefix: str = "idgate:sink",
        dedupe_seconds: int = 3600,
        timeout_seconds: float = 10,
    ) -> None:
        self.destination = destination
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.key_prefix = key_prefix
        self.dedupe_seconds = dedupe_seconds
        self.timeout_seconds = timeout_seconds
        self.added = 0
        self.duplicates = 0
        self._where = safe_location(url)
        self._client: Any = None
        self._sha: str | None = None

    def dedupe_key(self, message_id: str) -> str:
        # The hash tag puts the key in the stream's cluster slot (for a stream name without
        # braces), so the script may touch both. The message id itself is not stored.
        digest = base64.urlsafe_b64encode(hashlib.blake2b(message_id.encode(), digest_size=16).digest())
        return f"{self.key_prefix}:{{{self.stream}}}:{self.destination}:{digest.rstrip(b'=').decode()}"

    async def recover(self, committed: Mapping[str, int]) -> int:
        return 0

    def _redis(self) -> Any:
        if self._client is None:
            self._client = open_async_redis(
                self.url, socket_timeout=self.timeout_seconds, socket_connect_timeout=self.timeout_seconds
            )
        return self._client

    async def _append(self, client: Any, records: Sequence[StoredRecord]) -> list[Any]:
        import redis.exceptions

        for attempt in (1, 2):
            if self._sha is None:
                self._sha = await client.script_load(_XADD_ONCE)
            calls: list[list[Any]] = []
            for start in range(0, len(records), _SCRIPT_RECORDS):
                keys: list[Any] = [self.stream]
                args: list[Any] = [self.dedupe_seconds, self.maxlen]
                for r in records[start : start + _SCRIPT_RECORDS]:
                    message_id = message_id_of(r)
                    keys.append(self.dedupe_key(message_id))
                    args += (message_id, r.payload)
                calls.append([self._sha, len(keys), *keys, *args])
            try:
                if is_cluster(client):
                    # a cluster pipeline refuses EVALSHA: one call per chunk, in order
                    return [flag for call in calls for flag in await client.evalsha(*call)]
                pipe = client.pipeline(transaction=False)
                for call in calls:
                    pipe.evalsha(*call)
                return [flag for chunk in await pipe.execute() for flag in chunk]
            except redis.exceptions.NoScriptError:
                # the server lost its scripts (restart, SCRIPT FLUSH): load it again; the
                # script is idempotent, so running the batch again is safe
                self._sha = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        import redis.exceptions

        if not records:
            return {}
        try:
            added = await self._append(self._redis(), records)
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise RetryableSinkError(
                f"redis_stream sink {self.destination}: {type(exc).__name__} from {self._where}: {detail}"
            ) from exc
        new = sum(1 for a in added if a == 1)
        self.added += new
        self.duplicates += len(records) - new
        return {}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# -- NATS JetStream --------------------------------------------------------------------------
class NatsSink:
    def __init__(
        self,
        destination: str,
        *,
        url: str = DEFAULT_NATS_URL,
        subject: str,
        stream: str | None = None,
        duplicate_window_seconds: float = 3600,
        timeout_seconds: float = 10,
    ) -> None:
        self.destination = destination
        self.url = url
        self.subject = subject
        self.stream = stream
        self.duplicate_window_seconds = duplicate_window_seconds
        self.timeout_seconds = timeout_seconds
        self.added = 0
        self.duplicates = 0
        self._where = safe_location(url)
        self._nc: Any = None
        self._js: Any = None
        self._refusal: asyncio.Future[Exception] | None = None

    async def recover(self, committed: Mapping[str, int]) -> int:
        return 0

    async def _on_error(self, exc: Exception) -> None:
        import nats.js.errors

        refusal = self._refusal
        if isinstance(exc, nats.js.errors.APIError) and refusal is not None and not refusal.done():
            # nats-py 2.16 reports JetStream's refusal of an async publish here instead of on
            # the publish's future (which then never completes): fail the write in flight.
            refusal.set_result(exc)
            return
        log.warning("sink.nats.connection_error", destination=self.destination, error=type(exc).__name__)

    async def _connect(self) -> Any:
        import nats
        import nats.js.errors

        if self._js is not None and not self._nc.is_closed:
            return self._js
        self._nc = await nats.connect(
            self.url,
            connect_timeout=max(1, int(self.timeout_seconds)),
            # a few quick attempts, then the connection closes and the next write reconnects
            max_reconnect_attempts=2,
            reconnect_time_wait=1,
            allow_reconnect=True,
            error_cb=self._on_error,
            name=f"idgate-sink-{self.destination}",
        )
        js = self._nc.jetstream(timeout=self.timeout_seconds)
        if self.stream:
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(
                        name=self.stream,
                        subjects=[self.subject],
                        duplicate_window=self.duplicate_window_seconds,
                    )
                except nats.js.errors.BadRequestError as exc:
                    # another replica created it first (or the subject belongs to another stream)
                    log.info(
                        "sink.nats.add_stream_refused", destination=self.destination, error=exc.description
                    )
        self._js = js
        return js

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        import nats.errors
        import nats.js.errors

        if not records:
            return {}
        refusal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._refusal = refusal
        futures: list[asyncio.Future[Any]] = []
        acks_wait: asyncio.Future[list[Any]] | None = None
        waiters: set[asyncio.Future[Any]]
        try:
            async with asyncio.timeout(self.timeout_seconds):
                js = await self._connect()
                for r in records:
                    headers = {"Nats-Msg-Id": message_id_of(r)}
                    futures.append(await js.publish_async(self.subject, r.payload, headers=headers))
                acks_wait = asyncio.gather(*futures)
                waiters = {acks_wait, refusal}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if refusal.done():
                    raise refusal.result()
                acks = acks_wait.result()
        except nats.errors.MaxPayloadError as exc:
            raise PermanentSinkError(
                f"nats sink {self.destination}: a record is larger than {self._where} accepts"
            ) from exc
        except nats.js.errors.BadRequestError as exc:  # JetStream refused a message itself
            raise PermanentSinkError(
                f"nats sink {self.destination}: JetStream refused a record (err_code={exc.err_code})"
            ) from exc
        except nats.js.errors.NoStreamResponseError as exc:
            raise RetryableSinkError(
                f"nats sink {self.destination}: no JetStream stream takes subject {self.subject}"
            ) from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            await self._reset()
            raise RetryableSinkError(
                f"nats sink {self.destination}: {type(exc).__name__} from {self._where}"
            ) from exc
        finally:
            self._refusal = None
            for future in futures:
                future.cancel()  # no-op for the acknowledged ones; releases the pending slots
            if acks_wait is not None and acks_wait.done() and not acks_wait.cancelled():
                acks_wait.exception()  # retrieved: the error was raised above
        duplicates = sum(1 for ack in acks if ack.duplicate)
        self.duplicates += duplicates
        self.added += len(records) - duplicates
        return {}

    async def _reset(self) -> None:
        """Drop a connection that failed: the next write connects again."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:  # closing a broken connection may fail; it is dropped anyway
                log.debug("sink.nats.close_failed", error=type(exc).__name__)

    async def close(self) -> None:
        await self._reset()
