"""CORS for the Segment endpoints and ``/v1/consent``: web pages send to idgate from their origin.

A browser SDK (Segment's analytics.js) posts from the shop's page, another origin, with the
write key in ``Authorization``: the browser asks first (a preflight ``OPTIONS`` naming the
method and headers) and lets the page read the answer only when it carries
``Access-Control-Allow-Origin`` for the page's origin. Each source lists the origins of its
pages in the tenant configuration (``allowed_origins``; exact origins, no wildcard: the
write key is a credential).

A preflight carries no write key, so it cannot name the source. Two steps:

1. the preflight is granted when *some* source of the gateway allows the origin (the grant
   only lets the browser send the request; it reveals nothing about the sources), and
   refused (403, no CORS headers) otherwise;
2. the request itself is checked against the source of its write key (``check_origin``):
   a page whose origin that source does not list is refused with 403 ``origin_not_allowed``
   before anything is read from the body, and that answer carries no CORS grant either.
   This also covers requests a browser sends without a preflight (a ``text/plain`` body
   with ``writeKey`` in it).

Other answers to a request from a listed origin (200, 400, 401, 413, 503...) carry the
grant, so the page's SDK can read them. Requests without ``Origin`` (server SDKs, curl) are
not affected. No ``Access-Control-Allow-Credentials``: the SDKs send the write key in a
header they set themselves, never cookies.

The Sensors endpoints allow every origin (their token is in the URL): ``gateway.sensors_http``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.openapi.spec import OpenAPI, OpenAPIResponse, Operation
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.config import Config, ResolvedSource, allowed_origins
from gateway.errors import InvalidRequest, error_body
from gateway.openapi import error_response

# The short paths are analytics.js's (``/v1/t`` for track...): Segment's API answers both.
SEGMENT_PATHS = (
    "/v1/batch",
    "/v1/b",
    *(f"/v1/{name}" for name in ("track", "identify", "page", "screen", "group", "alias")),
    *(f"/v1/{letter}" for letter in "tipsga"),
)
CORS_PATHS = frozenset((*SEGMENT_PATHS, "/v1/consent"))
ALLOW_METHODS = b"POST, OPTIONS"
# What the SDKs set: the write key, the body's type and gzip, and analytics.js' retry count.
ALLOW_HEADERS = b"Authorization, Content-Type, Content-Encoding, X-Retry-Count, X-Request-ID"
MAX_AGE = 600  # seconds; browsers cap it (Chromium at 7200, Firefox at 86400)
_REFUSED = "idgate.cors_refused"
_VARY = (b"vary", b"Origin")
_encode_error = msgspec.json.Encoder().encode


def request_origin(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"origin":
            return value.decode("latin-1")
    return None


def check_origin(scope: Scope, src: ResolvedSource) -> None:
    """Refuse a browser request from a page whose origin the write key's source does not
    list (403, and the answer carries no CORS grant). Requests without ``Origin`` pass."""
    origin = request_origin(scope)
    if origin is not None and origin not in src.source.allowed_origins:
        scope.setdefault("state", {})[_REFUSED] = True
        raise InvalidRequest(
            "origin_not_allowed",
            "this source does not allow requests from the page's origin (allowed_origins)",
            "Origin",
            403,
        )


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    if body:
        headers = [(b"content-type", b"application/json"), *headers]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def cors(config: Config) -> Any:
    """Litestar middleware: answers ``OPTIONS`` on the CORS paths and adds the grant to the
    answers of requests from an allowed origin (see the module's docstring)."""
    origins = allowed_origins(config)

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or scope["path"].rstrip("/") not in CORS_PATHS:
                await app(scope, receive, send)
                return
            origin = request_origin(scope)
            if scope["method"] == "OPTIONS":
                allow = [(b"allow", ALLOW_METHODS)]
                if origin is None:  # not a browser's preflight: what the path answers
                    await _answer(send, 204, allow)
                elif origin in origins:
                    grant = [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        _VARY,
                        (b"access-control-allow-methods", ALLOW_METHODS),
                        (b"access-control-allow-headers", ALLOW_HEADERS),
                        (b"access-control-max-age", str(MAX_AGE).encode()),
                    ]
                    await _answer(send, 204, [*allow, *grant])
                else:
                    detail = "no source of this gateway allows requests from the page's origin"
                    metrics.REQUESTS_REFUSED.labels("origin_not_allowed").inc()
                    body = _encode_error(error_body("origin_not_allowed", detail, "Origin"))
                    await _answer(send, 403, [*allow, _VARY], body)
                return
            if origin is None or origin not in origins:
                await app(scope, receive, send)
                return
            grant_header = (b"access-control-allow-origin", origin.encode("latin-1"))

            async def send_granted(message: Message) -> None:
                if message["type"] == "http.response.start" and not scope.get("state", {}).get(_REFUSED):
                    message["headers"] = [*message.get("headers", ()), grant_header, _VARY]
                await send(message)

            await app(scope, receive, send_granted)

        return handle

    return middleware


def document_cors(openapi: OpenAPI) -> None:
    """The preflight (``OPTIONS``) of every CORS path, in the document."""
    for path in sorted(CORS_PATHS):
        item = (openapi.paths or {}).get(path)
        if item is None:
            continue
        item.options = Operation(
            tags=["consent" if path == "/v1/consent" else "ingest"],
            summary="CORS preflight",
            description="Browsers ask before they post from another origin (headers `Origin`, "
            "`Access-Control-Request-Method`, `Access-Control-Request-Headers`). Granted (204 with "
            "Access-Control-Allow-Origin, -Methods, -Headers: Authorization, Content-Type, "
            f"Content-Encoding; Max-Age {MAX_AGE}) when some source lists the page's origin in its "
            "allowed_origins; the request itself is then checked against its write key's source "
            "(403 origin_not_allowed, without the grant, when that source does not list it).",
            operation_id="cors" + path.replace("/", "_"),
            responses={
                "204": OpenAPIResponse(description="Granted, or (without Origin) the allowed methods"),
                "403": error_response(403, "No source of this gateway allows the origin (no CORS grant)"),
            },
        )
