"""The compliance console: server-rendered pages under ``/console`` for compliance
officers, operators and auditors, over the domain services of the admin API.

``console_routes`` are the pages and their static files, ``console_templates`` the Jinja
environment, ``console_lifespan`` opens the session store (after the gateway's lifespan:
it uses the gateway's Redis when there is one, so every replica shares the sessions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Litestar, Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.stores.redis import RedisStore
from litestar.template import TemplateConfig

from gateway.console.access import CONSOLE_EXCEPTION_HANDLERS, Console
from gateway.console.accounts import ConsoleAccounts
from gateway.console.monitoring import MonitoringPagesController
from gateway.console.pages import ConsoleController, RightsPagesController, SignInController
from gateway.console.sessions import ConsoleSessions

HERE = Path(__file__).resolve().parent
STATIC_PATH = "/static/console"
# Every console answer: not cached (personal data), not framed, no script or style but our own.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


def console_routes() -> list[Router]:
    pages = Router(
        path="/",
        route_handlers=[
            SignInController,
            ConsoleController,
            RightsPagesController,
            MonitoringPagesController,
        ],
        exception_handlers=CONSOLE_EXCEPTION_HANDLERS,
        response_headers=SECURITY_HEADERS,
        include_in_schema=False,
    )
    static = create_static_files_router(
        path=STATIC_PATH, directories=[HERE / "static"], name="console_static", include_in_schema=False
    )
    return [pages, static]


def console_templates() -> TemplateConfig[JinjaTemplateEngine]:
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined
    )
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment))


def console_lifespan(*, idle_minutes: int, secure_cookie: bool) -> Any:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = app.state.gateway.redis
        store: Store = (
            RedisStore(redis, namespace=f"{app.state.gateway.settings.redis_prefix}:console")
            if redis
            else MemoryStore()
        )
        app.state.console = Console(
            sessions=ConsoleSessions(store, idle_seconds=idle_minutes * 60, absolute_seconds=12 * 3600),
            accounts=ConsoleAccounts(app.state.gateway.config.console_users),
            secure_cookie=secure_cookie,
        )
        yield

    return lifespan
