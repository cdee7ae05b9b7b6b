"""The asyncio Redis client packs commands with hiredis: the same bytes redis-py's own Python
packer writes, the same errors for what Redis cannot take, the URL's transport kept, and
real commands, pipelines and scripts answered as before."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from identity.redis_client import open_async_redis, packed_connection_class
from tests.conftest import RedisNamespace

COMMANDS: list[tuple[object, ...]] = [
    ("GET", "k"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"CLIENT SETNAME", b"idgate"),
    ("SET", "k\u00e9\u4e2d", "v\u00e9\u4e2d\U0001f600"),
    ("SET", b"k", memoryview(b"mv"), "EX", 10),
    ("SET", "k", bytearray(b"ba")),
    ("ZADD", "z", 1.5, "a", 0.1, "b", 1e20, "c", float("inf"), "d", -3, "e", 10**20, "f"),
    ("XACK", "idgate:outbox", "warehouse", *(f"1733100000000-{i}" for i in range(2_000))),
    ("HSET", "h", "big", "x" * 100_000),  # past redis-py's buffer cutoff
]


def python_packed(*args: object) -> bytes:
    return b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_packs_the_bytes_redis_py_packs(args: tuple[object, ...]) -> None:
    conn = packed_connection_class(Connection)()
    assert b"".join(conn.pack_command(*args)) == python_packed(*args)


def test_a_pipeline_packs_as_its_commands_one_after_the_other() -> None:
    conn = packed_connection_class(Connection)()
    packed = b"".join(conn.pack_commands(COMMANDS))
    assert packed == b"".join(python_packed(*c) for c in COMMANDS)


@pytest.mark.parametrize("bad", [None, True, object()])
def test_what_redis_cannot_take_is_refused_as_redis_py_refuses_it(bad: object) -> None:
    conn = packed_connection_class(Connection)()
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        conn.pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/9", Connection),
        ("rediss://127.0.0.1:6380/0", SSLConnection),
        ("unix:///run/redis.sock?db=2", UnixDomainSocketConnection),
    ],
)
def test_the_url_still_chooses_the_transport(url: str, transport: type) -> None:
    client = open_async_redis(url)
    cls = client.connection_pool.connection_class
    assert issubclass(cls, transport)
    assert cls.pack_command is not transport.pack_command
    assert packed_connection_class(transport) is cls  # one subclass per transport


def test_real_commands_pipelines_and_scripts(redis_ns: RedisNamespace) -> None:
    async def run() -> None:
        client = open_async_redis(redis_ns.url)
        key = f"{redis_ns.prefix}:packing"
        try:
            await client.set(f"{key}:s", "v\u00e9\u4e2d")
            assert await client.get(f"{key}:s") == "v\u00e9\u4e2d".encode()
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(f"{key}:h", mapping={f"f{i}": i for i in range(1_000)})
                pipe.zadd(f"{key}:z", {"a": 1.5, "b": 1e20})
                pipe.hget(f"{key}:h", "f999")
                *_, last = await pipe.execute()
            assert last == b"999"
            assert await client.zscore(f"{key}:z", "b") == 1e20
            script = client.register_script("return redis.call('HLEN', KEYS[1]) + tonumber(ARGV[1])")
            assert await script(keys=[f"{key}:h"], args=[5]) == 1_005
        finally:
            await client.aclose()

    asyncio.run(run())
