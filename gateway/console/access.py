"""Who may open a console page: the session cookie, the role each route declares, the
CSRF token of every form, and what a refused request gets (a sign-in redirect or a page).

Like ``gateway.auth.admin_guard``, a route declares its roles in ``opt``
(``gateway.auth.roles``); a route that declares none is refused to everyone. Every POST
must carry the session's CSRF token in the form field ``csrf_token``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Redirect, Template
from litestar.types import ExceptionHandlersMap

from gateway.auth import AdminTokens, Officer
from gateway.console.accounts import ConsoleAccounts
from gateway.console.i18n import labels_for
from gateway.console.sessions import (
    LANGUAGE_COOKIE,
    SESSION_COOKIE,
    ConsoleSession,
    ConsoleSessions,
    same_token,
)
from gateway.errors import InvalidRequest

CONSOLE_PATH = "/console"
SIGN_IN_PATH = f"{CONSOLE_PATH}/sign-in"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class Console:
    """What the console keeps on ``app.state.console``."""

    sessions: ConsoleSessions
    accounts: ConsoleAccounts
    # Secure cookies always (a TLS proxy in front that does not say so); else when the
    # request came over HTTPS.
    secure_cookie: bool


def console_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Console:
    console: Console = connection.app.state.console
    return console


class CsrfRefused(PermissionDeniedException):
    """A form without the session's CSRF token."""


async def console_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The signed-in officer (``state.officer``, ``state.console_session``), the route's role,
    and for a POST the CSRF token."""
    allowed = tuple(handler.opt.get("roles", ()))
    if not allowed:
        raise PermissionDeniedException(detail="this page declares no role: refused to everyone")
    console = console_of(connection)
    session = await console.sessions.get(connection.cookies.get(SESSION_COOKIE, ""))
    tokens: AdminTokens = connection.app.state.admin_tokens
    officer = console.accounts.officer(session.principal, tokens) if session is not None else None
    if session is None or officer is None:
        raise NotAuthorizedException(detail="sign in to the console")
    connection.state.officer = officer
    connection.state.console_session = session
    if officer.role not in allowed:
        raise PermissionDeniedException(
            detail=f"this page needs the {' or '.join(allowed)} role; {officer.name} has {officer.role}"
        )
    if connection.scope.get("method", "GET") not in ("GET", "HEAD"):
        form = await Request[Any, Any, Any](connection.scope, connection.receive).form()
        if not same_token(session.csrf, form.get(CSRF_FIELD)):
            raise CsrfRefused(detail="the form's CSRF token is missing or wrong: reload the page")
    structlog.contextvars.bind_contextvars(officer=officer.name, role=officer.role)


def language(request: Request[Any, Any, Any]) -> str:
    return "en" if request.cookies.get(LANGUAGE_COOKIE) == "en" else "zh"


def officer_of(request: Request[Any, Any, Any]) -> Officer:
    officer: Officer = request.state.officer
    return officer


def session_of(request: Request[Any, Any, Any]) -> ConsoleSession | None:
    session: ConsoleSession | None = request.state.get("console_session")
    return session


def page(request: Request[Any, Any, Any], name: str, *, status: int = 200, **context: Any) -> Template:
    """A console page in the officer's language, with what every page shows."""
    lang = language(request)
    session = session_of(request)
    return Template(
        template_name=name,
        context={
            "t": labels_for(lang),
            "lang": lang,
            "officer": request.state.get("officer"),
            "csrf": session.csrf if session is not None else "",
            "here": request.url.path,
            **context,
        },
        status_code=status,
    )


def _refused(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, NotAuthorizedException):
        if request.method == "GET":
            return Redirect(SIGN_IN_PATH, status_code=303)
        return page(request, "error.html", status=401, problem="sign_in_needed")
    if isinstance(exc, CsrfRefused):
        return page(request, "error.html", status=403, problem="csrf")
    if isinstance(exc, TooManyRequestsException):
        return page(request, "error.html", status=429, problem="too_many_attempts")
    if isinstance(exc, PermissionDeniedException):
        return page(request, "error.html", status=403, problem="forbidden")
    status = exc.status_code if 400 <= exc.status_code < 500 else 400
    return page(request, "error.html", status=status, problem="not_found" if status == 404 else "bad_request")


def _invalid(request: Request[Any, Any, Any], exc: InvalidRequest) -> Response[Any]:
    return page(
        request, "error.html", status=exc.status, problem="bad_request", field=exc.field, detail=exc.detail
    )


CONSOLE_EXCEPTION_HANDLERS: ExceptionHandlersMap = {HTTPException: _refused, InvalidRequest: _invalid}
