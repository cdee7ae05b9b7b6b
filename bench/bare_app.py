"""The baseline for bench/ingest.py: a bare Litestar app served exactly like the gateway.

POST /v1/batch and POST /v1/track read the body, decode it with ``msgspec.json.decode`` and
answer 200 ``{"success": true}``; nothing else (no auth, no pipeline, no storage). It runs
under uvicorn with the same options as ``idgate serve`` (uvloop, httptools, one worker,
access log off), so the gap between the two is what the gateway's own work costs.

    python bench/bare_app.py --port 8081
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
from litestar import Litestar, Request, get, post

OK: dict[str, bool] = {"success": True}


@post("/v1/batch", status_code=200)
async def batch(request: Request[Any, Any, Any]) -> dict[str, bool]:
    msgspec.json.decode(await request.body())
    return OK


@post("/v1/track", status_code=200)
async def track(request: Request[Any, Any, Any]) -> dict[str, bool]:
    msgspec.json.decode(await request.body())
    return OK


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app() -> Litestar:
    return Litestar(
        route_handlers=[batch, track, healthz],
        request_max_body_size=512_000 + 1024,  # as the gateway with the example limits
        debug=False,
        logging_config=None,
        openapi_config=None,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
