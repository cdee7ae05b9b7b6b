"""structlog configuration: JSON in production, console in dev, identifiers always redacted.

Every log line of the process, ours and the libraries', goes through one handler on
stderr: stdout belongs to what a CLI command prints (JSON lines, exports, keys).

The redaction processor is the last line of defence: the code never logs identifiers on
purpose, and this processor replaces identifier-named fields and scrubs phone numbers, ID
card numbers and emails out of every string that reaches a log line anyway.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import structlog

from identity.scrub import scrub_text

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send

_HTTP = "http"

REDACTED_KEYS = frozenset(
    {
        "user_id",
        "userid",
        "anonymous_id",
        "anonymousid",
        "previous_id",
        "previousid",
        "distinct_id",
        "phone",
        "mobile",
        "email",
        "openid",
        "unionid",
        "wechat_openid",
        "wechat_unionid",
        "idfa",
        "idfv",
        "oaid",
        "android_id",
        "device_id",
        "ip",
        "write_key",
        "writekey",
        "authorization",
        "id_card",
        "traits",
        "properties",
        "password",
        "token",
        "key",
    }
)


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if depth > 8:
        return "[redacted:deep]"
    if isinstance(value, dict):
        return {
            k: "[redacted]" if str(k).lower() in REDACTED_KEYS else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_identifiers(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return _redact(event_dict)  # type: ignore[no-any-return]


# Libraries whose INFO lines are noise on the console: Alembic announces every migration
# step at every start, SQLAlchemy can echo statements, httpx logs every request URL of
# the HTTP sinks (which may carry a receiver's token). Their warnings still show.
QUIET_LIBRARIES = ("alembic", "sqlalchemy", "httpx", "httpcore")


def configure_logging(*, fmt: str = "json", level: str = "INFO") -> None:
    """Route structlog and the standard library's logging to stderr, formatted as ``fmt``
    (``json`` or ``console``). Safe to call again (the last call wins)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_identifiers,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would write client IPs and full query strings: we log requests ourselves.
    for name in ("uvicorn", "uvicorn.error", "litestar"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


_REQUEST_HEADER = b"x-request-id"
_request_numbers = itertools.count(1)
_PREFIX = f"{os.getpid():x}"


def request_context(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: every log line of a request carries its ``request_id`` (the caller's
    ``X-Request-ID``, cut to 64 characters, else a process-unique number); handlers add
    ``tenant`` and ``source`` (``bind_source``) once they know them. The context is cleared
    when the request ends, so nothing leaks into the next one."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != _HTTP:
            await app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == _REQUEST_HEADER:
                rid = value.decode("latin-1")[:64]
                break
        token = structlog.contextvars.bind_contextvars(
            request_id=rid or f"{_PREFIX}-{next(_request_numbers)}"
        )
        try:
            await app(scope, receive, send)
        finally:
            structlog.contextvars.reset_contextvars(**token)

    return middleware


def bind_source(tenant: str, source: str) -> None:
    """Name the request's tenant and source in its log lines."""
    structlog.contextvars.bind_contextvars(tenant=tenant, source=source)
