"""What the CORS middleware (gateway.cors) costs per request, in process: the ASGI call of a
do-nothing app with and without the middleware, for a server SDK's request (no Origin), a
browser's request from an allowed origin, and a path CORS does not cover.

    .venv/bin/python bench/cors.py [--requests 200000]

Prints microseconds per request; compare with the gateway's ~250 µs per single event.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

# bench/ first on sys.path would shadow the identity package (bench/identity.py)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from gateway.config import parse_config  # noqa: E402
from gateway.cors import cors  # noqa: E402

CONFIG = f"""
[[tenants]]
id = "shop"

[[tenants.sources]]
id = "web"
platform = "web"
write_key_sha256 = "{"a" * 64}"
allowed_origins = ["https://shop.example.cn"]
"""

HEADERS = [
    (b"host", b"idgate.example.cn"),
    (b"user-agent", b"analytics-python/2.3.3"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept", b"*/*"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Basic d2ViLXRlc3Qta2V5LTAwMDE6"),
    (b"content-length", b"123"),
]


def scope(path: str, origin: str | None) -> dict[str, Any]:
    headers = HEADERS + ([(b"origin", origin.encode())] if origin else [])
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "state": {}}


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def send(message: Any) -> None:
    return None


async def receive() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}


async def per_request(asgi: Any, s: dict[str, Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await asgi(s, receive, send)
    return (time.perf_counter() - start) / n * 1e6


async def main(n: int) -> None:
    wrapped = cors(parse_config(CONFIG))(app)
    cases = [
        ("server SDK, /v1/track, no Origin", "/v1/track", None),
        ("browser, /v1/t, allowed Origin", "/v1/t", "https://shop.example.cn"),
        ("other path, /admin/audit", "/admin/audit", None),
    ]
    for name, path, origin in cases:
        s = scope(path, origin)
        await per_request(app, s, n // 10)  # warm up
        bare = min([await per_request(app, s, n) for _ in range(3)])
        with_cors = min([await per_request(wrapped, s, n) for _ in range(3)])
        print(f"{name:40s} bare {bare:6.2f} µs  with CORS {with_cors:6.2f} µs  (+{with_cors - bare:.2f} µs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200_000)
    asyncio.run(main(parser.parse_args().requests))
