"""Exposure dedupe (data cleaning): an item shown again to the same person on the same page
view within the tenant's window counts once, whichever SDK reported it.

A tracking plan marks its exposure events (``exposure: {item, page}``, gateway.plan): the
exposed item is one property (``promotion_id``), each value of a list (``product_ids[]``) or
each object's property in a list (``products[].product_id``), and the page view is told by
the first of the ``page`` properties the event has (none: any page within the window). The
person is the event's unified person (gateway.pipeline.resolve_identity), so an App SDK and
a mini-program SDK that both report one banner for a logged-in shopper count it once;
without a unified person (no linking consent) the event's own subject stands in.

After the first sighting within ``[tenants.cleaning] exposure_window_seconds``:

- a single-item exposure is dropped (reason ``exposure_repeat``, counted like every drop);
- a list exposure keeps only the items not seen yet, and is flagged
  (``context.idgate.flags``: ``exposure_repeat_items``); with none left it is dropped.

A sighting is remembered with the message that made it, so a client's retry of that same
message (after a request that failed before its events were stored) is not its own repeat.
What is remembered is a 16-byte digest of (tenant, person, plan event, page, item) and of
the message id: no identifier, and only for the window (a Redis TTL, or expiry in memory).

Stores: ``MemoryExposures`` (embedded; per process, forgotten at restart, at most
``MEMORY_CAPACITY`` sightings) and ``RedisExposures`` (distributed: one ``SET NX GET PX`` per
item, single-key, so any Redis Cluster slot; needs Redis 7; while Redis is unreachable every
sighting counts as new: the dedupe fails open, no exposure is lost).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import msgspec
import structlog
from redis.exceptions import RedisError

from gateway.plan import ExposureSpec

EXPOSURE_REPEAT: Final = "exposure_repeat"
# Sightings one embedded process remembers (about 240 B each in CPython: ~50 MB at most);
# past it the oldest go first, and an item shown again after that counts again.
MEMORY_CAPACITY: Final = 200_000
EXPOSURE_REPEAT_ITEMS: Final = "exposure_repeat_items"
_encode = msgspec.json.Encoder().encode
log = structlog.get_logger(__name__)


class ExposureStore(Protocol):
    async def first_sightings(self, sightings: Sequence[tuple[bytes, bytes]], window_ms: int) -> list[bool]:
        """Per (sighting key, message digest), in order: True when the item is new within the
        window for that person and page (it is remembered from now on), or when it was this
        same message that showed it; False for a repeat."""
        ...


class MemoryExposures:
    """Sightings in this process: insertion-ordered, expired from the oldest end, and at
    most ``capacity`` of them (the oldest go first past it)."""

    def __init__(self, capacity: int = MEMORY_CAPACITY, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    async def first_sightings(self, sightings: Sequence[tuple[bytes, bytes]], window_ms: int) -> list[bool]:
        now = int(self._clock() * 1000)
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest[0] > now:
                break
            seen.popitem(last=False)
        answers = []
        for key, message in sightings:
            found = seen.get(key)
            if found is not None and found[0] > now:
                answers.append(found[1] == message)
                continue
            seen[key] = (now + window_ms, message)
            seen.move_to_end(key)
            answers.append(True)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return answers


class RedisExposures:
    """Sightings shared by every replica: ``SET key message NX GET PX window`` per item in one
    pipeline (one round trip per request)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}:exposure:"

    async def first_sightings(self, sightings: Sequence[tuple[bytes, bytes]], window_ms: int) -> list[bool]:
        """While Redis is unreachable every sighting counts as new (fails open: a repeat
        delivered beats an exposure lost), with one log line per failed request."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, message in sightings:
                pipe.set(self.prefix + key.hex(), message, nx=True, px=window_ms, get=True)
            before = await pipe.execute()
        except RedisError as exc:
            log.warning("exposures.unavailable", error=type(exc).__name__, sightings=len(sightings))
            return [True] * len(sightings)
        return [old is None or old == message for old, (_, message) in zip(before, sightings, strict=True)]


def _digest(*parts: str | bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=b"idgate-exposure")
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x1f")
    return h.digest()


def page_of(spec: ExposureSpec, properties: dict[str, Any]) -> str:
    """The page view the event names: the first of the spec's page properties it has."""
    for name in spec.page:
        value = properties.get(name)
        if value is not None and value != "":
            return f"{name}={_encode(value).decode()}"
    return ""


def sighting_keys(
    spec: ExposureSpec, properties: dict[str, Any], tenant: str, person: str, plan_event: str
) -> list[tuple[int, bytes]]:
    """(position in the list, or -1 for a single item; sighting key) of each item the event
    shows; items without the item property are not deduplicated."""
    page = page_of(spec, properties)
    base = (tenant, person, plan_event, page)
    if spec.list_key is None:
        item = properties.get(spec.item_key)
        return [] if item is None else [(-1, _digest(*base, _encode(item)))]
    items = properties.get(spec.list_key)
    if not isinstance(items, list):
        return []
    keys = []
    key = spec.item_key
    for position, entry in enumerate(items):
        if not key:
            item = entry if isinstance(entry, str | int | float) else None
        else:
            item = entry.get(key) if isinstance(entry, dict) else None
        if item is not None:
            keys.append((position, _digest(*base, _encode(item))))
    return keys


def message_digest(message: str) -> bytes:
    return _digest(message)


def open_exposures(redis_client: Any, prefix: str) -> ExposureStore:
    """Shared by the replicas when Redis is configured; else this process's memory."""
    if redis_client is not None:
        return RedisExposures(redis_client, prefix)
    return MemoryExposures()
