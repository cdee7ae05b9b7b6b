"""The one way idgate opens Redis: a single server or a Redis Cluster, chosen by the URL.

``redis://`` / ``rediss://`` (and ``unix://``) open one server (redis.Redis); the schemes
``redis+cluster://host:port`` and ``rediss+cluster://`` open a Redis Cluster
(redis.cluster.RedisCluster, or its asyncio twin) from that seed node, which discovers the
others. A cluster has only database 0.

In a cluster every Lua script and MULTI must touch keys of one hash slot. The stores keep
their single-server key names and only wrap the part that groups keys in braces when the
client is a cluster (``hash_tag``), so a single server's keys stay exactly as they were;
where the keys of one script cannot share a slot (one per pseudonym, say) the store runs the
script once per slot (``slot_groups``), which is fine wherever each key's change stands on
its own.

The asyncio client packs commands with hiredis (``packed_connection_class``), as redis-py's
synchronous client already does: redis-py's asyncio connections pack each argument in
Python (about 1.7 us each), which put a sixth of a distributed replica's CPU into packing
the delivery commits' and the erasure checks' arguments. The bytes are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.exceptions import DataError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
URL_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)


class RedisUrlError(ValueError):
    pass


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_seed(url: str) -> str:
    """The seed node's plain URL; refuses a database other than 0 (a cluster has no other)."""
    parts = urlsplit(url)
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise RedisUrlError(f"a Redis Cluster has only database 0, the URL names /{db}")
    return urlunsplit((CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))


def open_redis(url: str, **options: Any) -> Any:
    """A synchronous client: redis.Redis, or redis.cluster.RedisCluster for a cluster URL."""
    if is_cluster_url(url):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(cluster_seed(url), **options)
    import redis

    return redis.Redis.from_url(url, **options)


def open_async_redis(url: str, **options: Any) -> Any:
    """An asyncio client: redis.asyncio.Redis, or redis.asyncio.cluster.RedisCluster.

    A single server's connections pack commands with hiredis (the URL still chooses TCP,
    TLS or a Unix socket); a cluster's keep redis-py's packing (its nodes' connection class
    is fixed by redis-py)."""
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(cluster_seed(url), **options)
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, **options)
    pool = client.connection_pool
    pool.connection_class = packed_connection_class(pool.connection_class)
    return client


def _hiredis_pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol, as redis-py's synchronous hiredis serializer packs
    it: a command name with spaces (``"CONFIG GET"``) split into words, buffers as bytes."""
    head = args[0]
    if isinstance(head, str):
        args = (*head.encode().split(), *args[1:])
    elif b" " in head:
        args = (*head.split(), *args[1:])
    items: Any = args
    try:
        packed: bytes = hiredis.pack_command(items)
    except TypeError:  # buffers go as bytes; anything else (None, bool) is refused
        items = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            packed = hiredis.pack_command(items)
        except TypeError as exc:
            raise DataError(str(exc)) from exc
    return packed


_PACKED: dict[type, type] = {}


def packed_connection_class(base: type) -> type:
    """``base`` (a redis.asyncio connection class) packing its commands with hiredis, one
    subclass per base, made once."""
    if base not in _PACKED:

        def pack_command(self: Any, *args: Any) -> list[bytes]:
            return [_hiredis_pack(args)]

        def pack_commands(self: Any, commands: Any) -> list[bytes]:
            return [b"".join(_hiredis_pack(tuple(cmd)) for cmd in commands)]

        methods = {"pack_command": pack_command, "pack_commands": pack_commands}
        _PACKED[base] = type(f"Hiredis{base.__name__}", (base,), methods)
    return _PACKED[base]


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (sync or asyncio) talks to a Redis Cluster."""
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncCluster)


def hash_tag(cluster: bool, part: str) -> str:
    """``part`` as a hash tag (``{part}``) on a cluster, unchanged on one server: keys built
    around the same tag share a slot; single-server key names do not change."""
    return f"{{{part}}}" if cluster else part


def key_slot(key: str | bytes) -> int:
    from redis.crc import key_slot as slot

    return int(slot(key.encode() if isinstance(key, str) else key))


def slot_groups(cluster: bool, keys: Sequence[str]) -> list[list[int]]:
    """Indexes of ``keys`` grouped by hash slot (in first-seen order); one group on a single
    server, where a script may take them all at once."""
    if not cluster:
        return [list(range(len(keys)))] if keys else []
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(key_slot(k), []).append(i)
    return list(groups.values())
