"""The error contract, and the one place where exceptions become HTTP responses.

Every error is JSON ``{"error", "detail", "field"}`` (design section 11): 400 invalid,
401 bad key or token, 403 role, 404, 405, 413 too large, 415 media type, 429 rate limit,
503 overloaded or unavailable with ``Retry-After``. Domain packages raise their own
exceptions (``ConsentRefused``, ``IdentityResolutionOff``, ``OutboxUnavailable``, ...);
``exception_handlers`` maps each to its status here, so no handler builds an error by hand
and no input can end in a bare 500 page.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from consent.service import ConsentRefused
from export.outbox import OutboxUnavailable
from gateway import metrics
from identity.service import IdentityResolutionOff, NotLinked

log = structlog.get_logger("idgate.gateway")

# Browser SDKs post cross-origin: without this header they cannot read an error and treat
# it as a network failure (and retry).
CORS_ERROR_PATHS = frozenset({"/sa", "/sa.gif"})


class InvalidRequest(Exception):
    """The request as a whole is unusable (maps to a 4xx)."""

    def __init__(self, error: str, detail: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.field = field
        self.status = status


class Overloaded(Exception):
    """The outbox holds more undelivered events than its bound: the client retries later."""

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__("the gateway is holding too many undelivered events; retry later")
        self.retry_after = retry_after


class ErrorBody(msgspec.Struct, omit_defaults=False):
    """What every error answer holds."""

    error: str
    detail: str
    field: str | None = None


def error_body(error: str, detail: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, "field": field, **extra}


def error_response(
    status: int,
    error: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request[Any, Any, Any] | None = None,
) -> Response[Any]:
    metrics.REQUESTS_REFUSED.labels(error).inc()
    if request is not None and request.scope["path"] in CORS_ERROR_PATHS:
        headers = {**(headers or {}), "Access-Control-Allow-Origin": "*"}
    return Response(error_body(error, detail, field), status_code=status, headers=headers)


_STATUS_ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def _invalid_request(request: Request[Any, Any, Any], exc: InvalidRequest) -> Response[Any]:
    return error_response(exc.status, exc.error, exc.detail, exc.field, request=request)


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    error = _STATUS_ERRORS.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "unavailable")
    # Litestar's validation names the offending parameter or body field in ``extra``.
    extra = getattr(exc, "extra", None)
    field = None
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        field = extra[0].get("key")
        if field and extra[0].get("source") == "body":
            field = field.removeprefix("$.")
    detail = str(exc.detail)
    if isinstance(extra, list) and extra and isinstance(extra[0], dict) and extra[0].get("message"):
        detail = f"{detail}: {extra[0]['message']}"
    return error_response(exc.status_code, error, detail, field, headers=exc.headers, request=request)


def _consent_refused(request: Request[Any, Any, Any], exc: ConsentRefused) -> Response[Any]:
    return error_response(400, "invalid_consent", exc.detail, exc.field, request=request)


def _resolution_off(request: Request[Any, Any, Any], exc: IdentityResolutionOff) -> Response[Any]:
    return error_response(400, "invalid_field", str(exc), "tenant", request=request)


def _not_linked(request: Request[Any, Any, Any], exc: NotLinked) -> Response[Any]:
    return error_response(400, "not_linked", "there is no direct link between these identifiers", "b")


def _outbox_unavailable(request: Request[Any, Any, Any], exc: OutboxUnavailable) -> Response[Any]:
    log.error("ingest.outbox_unavailable", detail=str(exc))
    return error_response(
        503,
        "unavailable",
        "events could not be stored durably; retry",
        None,
        headers={"Retry-After": "2"},
        request=request,
    )


def _overloaded(request: Request[Any, Any, Any], exc: Overloaded) -> Response[Any]:
    return error_response(
        503, "overloaded", str(exc), None, headers={"Retry-After": str(exc.retry_after)}, request=request
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected_error", error=type(exc).__name__)
    return error_response(
        500,
        "internal_error",
        "unexpected error; nothing from this request was acknowledged",
        request=request,
    )


def exception_handlers() -> ExceptionHandlersMap:
    return {
        InvalidRequest: _invalid_request,
        OutboxUnavailable: _outbox_unavailable,
        Overloaded: _overloaded,
        ConsentRefused: _consent_refused,
        IdentityResolutionOff: _resolution_off,
        NotLinked: _not_linked,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }
