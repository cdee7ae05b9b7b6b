"""The ingest endpoints' short path (gateway.hot_routes) answers exactly what Litestar's path
answers: the same status, body and headers for every kind of answer and refusal, through
the app's own middleware (CORS, request context) and exception handlers. Two in-process
gateways, one with ``hot_routes`` off (every request through Litestar's router), get the
same requests."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.hot_routes import IdgateApp
from tests.conftest import SHOP_SENSORS_TOKEN, WEB_KEY
from tests.gateway.conftest import in_process_settings
from tests.gateway.test_cors import SHOP, with_origins
from tests.security.test_rate_limits import limited_config

# room for the requests below, and a source limit the last case runs into
CONFIG = with_origins(
    limited_config(source_requests_per_second=8, ip_requests_per_second=1000), WEB_KEY, [SHOP]
)
COMPARED_HEADERS = (
    "content-type",
    "retry-after",
    "allow",
    "vary",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
)


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def track(**extra: Any) -> bytes:
    return json.dumps(
        {"anonymousId": "hot-anon", "event": "Viewed", "messageId": uuid.uuid4().hex, **extra}
    ).encode()


JSON = {"Content-Type": "application/json"}
# (what, method, path, headers, body): each is sent to both gateways, in this order
CASES: list[tuple[str, str, str, dict[str, str], bytes]] = [
    ("accepted", "POST", "/v1/track", {**JSON, **basic(WEB_KEY)}, track()),
    ("batch", "POST", "/v1/batch", {**JSON, **basic(WEB_KEY)}, b'{"batch":[' + track(type="track") + b"]}"),
    (
        "an event rejected",
        "POST",
        "/v1/track",
        {**JSON, **basic(WEB_KEY)},
        json.dumps({"event": "x"}).encode(),
    ),
    ("no write key", "POST", "/v1/track", JSON, track()),
    ("unknown write key", "POST", "/v1/track", {**JSON, **basic("no-such-key")}, track()),
    ("bad json", "POST", "/v1/track", {**JSON, **basic(WEB_KEY)}, b'{"event": '),
    ("media type", "POST", "/v1/track", {"Content-Type": "text/xml", **basic(WEB_KEY)}, track()),
    ("not gzip", "POST", "/v1/track", {**JSON, **basic(WEB_KEY), "Content-Encoding": "gzip"}, b"plain"),
    ("too large", "POST", "/v1/batch", {**JSON, **basic(WEB_KEY)}, b" " * 600_000),
    (
        "gzip bomb",
        "POST",
        "/v1/batch",
        {**JSON, **basic(WEB_KEY), "Content-Encoding": "gzip"},
        gzip.compress(b" " * 600_000),
    ),
    ("method", "GET", "/v1/track", basic(WEB_KEY), b""),
    ("allowed origin", "POST", "/v1/track", {**JSON, **basic(WEB_KEY), "Origin": SHOP}, track()),
    (
        "other origin",
        "POST",
        "/v1/track",
        {**JSON, **basic(WEB_KEY), "Origin": "https://evil.example"},
        track(),
    ),
    ("preflight", "OPTIONS", "/v1/track", {"Origin": SHOP, "Access-Control-Request-Method": "POST"}, b""),
    ("refused preflight", "OPTIONS", "/v1/batch", {"Origin": "https://evil.example"}, b""),
    (
        "sensors bad data",
        "POST",
        f"/sa?project=shop&token={SHOP_SENSORS_TOKEN}",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"data=%%%",
    ),
    ("sensors no token", "GET", "/sa.gif?project=shop&data=e30%3D", {}, b""),
    (
        "validate",
        "POST",
        "/v1/validate",
        {**JSON, **basic(WEB_KEY)},
        b'{"batch":[' + track(type="track") + b"]}",
    ),
]

RATE_LIMITED = (
    "POST",
    "/v1/track",
    {**JSON, **basic(WEB_KEY)},
    b'{"anonymousId":"hot-anon","event":"Viewed"}',
)


def answer(
    client: TestClient, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[Any, ...]:
    r = client.request(method, path, headers=headers, content=body)
    try:
        payload: Any = r.json()
    except ValueError:
        payload = r.content
    return r.status_code, payload, {h: r.headers.get(h) for h in COMPARED_HEADERS}


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, TestClient]]:
    apps = [
        create_app(
            dataclasses.replace(in_process_settings(tmp_path_factory.mktemp(name), CONFIG), hot_routes=on)
        )
        for name, on in (("hot", True), ("litestar", False))
    ]
    with TestClient(apps[0]) as hot, TestClient(apps[1]) as litestar:
        yield hot, litestar


def test_the_short_path_answers_what_litestar_answers(clients: tuple[TestClient, TestClient]) -> None:
    hot, litestar = clients
    assert isinstance(hot.app, IdgateApp) and "/v1/track" in hot.app.hot_routes
    assert isinstance(litestar.app, IdgateApp) and not litestar.app.hot_routes
    seen = set()
    for what, method, path, headers, body in CASES:
        expected = answer(litestar, method, path, headers, body)
        got = answer(hot, method, path, headers, body)
        assert got == expected, what
        seen.add(expected[0])
    # the source's paced limit: each gateway's first refusal (when it comes depends on timing)
    limited = [next(a for a in (answer(c, *RATE_LIMITED) for _ in range(50)) if a[0] == 429) for c in clients]
    assert limited[0] == limited[1]
    seen.add(limited[0][0])
    # every kind of answer came up (a case that stopped answering what it was meant to fails here)
    assert seen >= {200, 204, 400, 401, 403, 405, 413, 415, 429}, seen


def test_hot_requests_do_not_go_through_the_router(clients: tuple[TestClient, TestClient]) -> None:
    hot, _ = clients
    app = hot.app
    assert isinstance(app, IdgateApp)
    routed = app.asgi_handler

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        assert scope["path"] not in app.hot_routes, f"{scope['path']} went through the router"
        await routed(scope, receive, send)

    app.asgi_handler = refuse
    try:
        r = hot.post("/v1/track", content=track(), headers={**JSON, **basic(WEB_KEY)})
        assert r.status_code in (200, 429), r.text  # answered on the short path
        assert hot.get("/healthz").status_code == 200  # everything else still routed
        assert hot.post("/v1/track/", content=track(), headers={**JSON, **basic(WEB_KEY)}).status_code in (
            200,
            429,
        )
    finally:
        app.asgi_handler = routed
