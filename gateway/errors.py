"""The error contract, and the one place where exceptions become HTTP responses.

Every error is JSON ``{"error", "detail", "field"}`` (design section 11): 400 invalid,
401 bad key or token, 403 role, 404, 405, 413 too large, 415 media type, 429 rate limit,
503 overloaded or unavailable with ``Retry-After``. Domain packages raise their own
exceptions (``ConsentRefused``, ``IdentityResolutionOff``, ``OutboxUnavailable``, ...);
``exception_handlers`` maps each to its status here, so no handler builds an error by hand
and no input can end in a bare 500 page.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import redis.exceptions
import sqlalchemy.exc
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap
from prometheus_client import Counter

from consent.group_commit import GroupCommitFailed
from consent.service import ConsentRefused, ConsentStateUnavailable
from consent.trust import ConsentForbidden
from export.outbox import OutboxFull, OutboxUnavailable
from gateway import metrics
from gateway.rate_limits import RateLimited
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


DEPENDENCY_REFUSALS = Counter(
    "idgate_dependency_refusals_total",
    "Requests answered 503 because a dependency was unavailable",
    ["dependency"],
)


class Outages:
    """One log line when a dependency (Redis, the database, the outbox) becomes unavailable
    and one when it is back, not one per refused request; refusals are counted meanwhile."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}

    def down(self, dependency: str, exc: BaseException, *, refused: bool = True) -> None:
        """The dependency failed (``refused``: and a request was answered 503 for it)."""
        if refused:
            DEPENDENCY_REFUSALS.labels(dependency).inc()
        if dependency not in self.refused:
            log.error("dependency.unavailable", dependency=dependency, error=type(exc).__name__)
            self.refused[dependency] = 0
        self.refused[dependency] += int(refused)

    def up(self, dependency: str) -> None:
        refused = self.refused.pop(dependency, None)
        if refused is not None:
            log.info("dependency.recovered", dependency=dependency, refused_requests=refused)

    def is_down(self, dependency: str) -> bool:
        return dependency in self.refused


OUTAGES = Outages()


def dependency_of(exc: BaseException) -> str | None:
    """Which dependency an exception says is unavailable, if any."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "redis"
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return "database"
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return "database"
    if isinstance(exc, OutboxUnavailable):
        return "outbox"
    if isinstance(exc, ConsentStateUnavailable):
        return "consent-state"
    if isinstance(exc, GroupCommitFailed):
        return "database"
    return None


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


_MISSING_PARAMETER = re.compile(r"^Missing required \w+ parameter '([^']{1,100})'")
# msgspec names a missing or unknown body field only in the text (Litestar's key is then the body, "data")
_MISSING_FIELD = re.compile(
    r"Object (?:missing required|contains unknown) field `([^`]{1,100})`(?: - at `\$\.?([^`]{0,200})`)?"
)


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
    missing = _MISSING_PARAMETER.match(detail)
    if field is None and missing is not None:  # Litestar names it only in the text
        field = missing.group(1)
    absent = _MISSING_FIELD.search(detail if extra is None else f"{detail} {extra}")
    if absent is not None and field in (None, "data", "$"):
        field = f"{absent.group(2)}.{absent.group(1)}" if absent.group(2) else absent.group(1)
    if isinstance(extra, list) and extra and isinstance(extra[0], dict) and extra[0].get("message"):
        detail = f"{detail}: {extra[0]['message']}"
    return error_response(exc.status_code, error, detail, field, headers=exc.headers, request=request)


def _consent_refused(request: Request[Any, Any, Any], exc: ConsentRefused) -> Response[Any]:
    return error_response(400, "invalid_consent", exc.detail, exc.field, request=request)


def _consent_forbidden(request: Request[Any, Any, Any], exc: ConsentForbidden) -> Response[Any]:
    return error_response(403, exc.error, exc.detail, exc.field, request=request)


def _resolution_off(request: Request[Any, Any, Any], exc: IdentityResolutionOff) -> Response[Any]:
    return error_response(400, "invalid_field", str(exc), "tenant", request=request)


def _not_linked(request: Request[Any, Any, Any], exc: NotLinked) -> Response[Any]:
    return error_response(400, "not_linked", "there is no direct link between these identifiers", "b")


_UNAVAILABLE_DETAIL = {
    "outbox": "events could not be stored durably; nothing from this request was acknowledged; retry",
    "redis": "Redis is unavailable; nothing from this request was acknowledged; retry",
    "database": "the database is unavailable; nothing from this request was acknowledged; retry",
    "consent-state": "the consent state is being rebuilt from the ledger; retry",
}


def unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """503 with Retry-After for an unavailable dependency (one log line per outage)."""
    dependency = dependency_of(exc) or "outbox"
    OUTAGES.down(dependency, exc)
    return error_response(
        503,
        "unavailable",
        _UNAVAILABLE_DETAIL[dependency],
        None,
        headers={"Retry-After": "2"},
        request=request,
    )


def _overloaded(request: Request[Any, Any, Any], exc: OutboxFull) -> Response[Any]:
    return error_response(
        503, "overloaded", str(exc), None, headers={"Retry-After": str(exc.retry_after)}, request=request
    )


def rate_limited_answer(exc: RateLimited, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The 429 of ``_rate_limited`` as the raw ASGI ingest handlers send it themselves:
    status, JSON body and headers (a flood is answered without Litestar's exception layers)."""
    metrics.REQUESTS_REFUSED.labels("rate_limited").inc()
    headers = [(b"retry-after", str(exc.retry_after).encode())]
    if path in CORS_ERROR_PATHS:
        headers.append((b"access-control-allow-origin", b"*"))
    return 429, msgspec.json.encode(error_body("rate_limited", exc.detail, exc.limit)), headers


def _rate_limited(request: Request[Any, Any, Any], exc: RateLimited) -> Response[Any]:
    status, body, headers = rate_limited_answer(exc, request.scope["path"])
    return Response(
        body,
        status_code=status,
        headers={k.decode(): v.decode() for k, v in headers},
        media_type="application/json",
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if dependency_of(exc) is not None:  # wrapped by a library on its way up
        return unavailable(request, exc)
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
        OutboxUnavailable: unavailable,
        ConsentStateUnavailable: unavailable,
        GroupCommitFailed: unavailable,
        redis.exceptions.ConnectionError: unavailable,
        redis.exceptions.TimeoutError: unavailable,
        sqlalchemy.exc.OperationalError: unavailable,
        sqlalchemy.exc.InterfaceError: unavailable,
        OutboxFull: _overloaded,
        RateLimited: _rate_limited,
        ConsentRefused: _consent_refused,
        ConsentForbidden: _consent_forbidden,
        IdentityResolutionOff: _resolution_off,
        NotLinked: _not_linked,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }
