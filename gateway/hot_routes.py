"""The ingest endpoints dispatched straight to their ASGI handlers.

Litestar hands a request to a raw ASGI handler (``gateway.ingest_http``,
``gateway.sensors_http``, ``gateway.plan_validate``) through its router and two exception
layers, the app's and the route's, each wrapping ``send``: for a single event that is about
a fifth of the gateway's own CPU (``bench/ingest.py``). ``IdgateApp`` is the Litestar app
with those handlers on a short path: a request for exactly one of their paths goes to the
handler wrapped in the app's own middleware (request context, CORS, in the configured
order) and one exception layer that answers with the app's exception handlers and runs its
``after_exception`` hooks: the same code as Litestar's path, so the same answers
(``tests/gateway/test_hot_routes.py`` compares the two for every kind of refusal). Anything
else, a hot path spelled another way (a trailing slash) included, goes through Litestar.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from litestar import Litestar
from litestar.exceptions import HTTPException
from litestar.handlers import ASGIRouteHandler
from litestar.types import ASGIApp, ExceptionHandler, ExceptionHandlersMap, Receive, Scope, Send


def exception_handler_for(handlers: ExceptionHandlersMap, exc: Exception) -> ExceptionHandler[Any]:
    """What Litestar picks for ``exc``: a handler for its status code (HTTP exceptions), else
    the one for the nearest class of its MRO (the gateway's map ends with ``Exception``)."""
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    raise LookupError(f"no exception handler for {type(exc).__name__}")  # the map has Exception


class IdgateApp(Litestar):
    """Litestar with the raw ingest handlers on a short path (the module's docstring)."""

    hot_routes: Mapping[str, ASGIApp] = {}

    def route_hot(self, handlers: Iterable[ASGIRouteHandler]) -> None:
        """Serve ``handlers`` (registered on this app, so documented and routed as usual too)
        on the short path for their exact paths."""
        if self.before_send:
            raise RuntimeError("before_send hooks would not run on the hot routes: wrap them there first")
        if Exception not in self.exception_handlers:
            raise RuntimeError("the hot routes answer every error with the app's handlers: map Exception")
        chains: dict[str, ASGIApp] = {}
        for handler in handlers:
            chain = self._answering_errors(handler.fn)
            for middleware in reversed(self.middleware):
                if not callable(middleware) or isinstance(middleware, type):
                    raise RuntimeError(
                        f"hot routes take middleware factories (app -> app), got {middleware!r}"
                    )
                chain = middleware(chain)
            chains.update(dict.fromkeys(handler.paths, chain))
        self.hot_routes = chains

    def _answering_errors(self, handler: Any) -> ASGIApp:
        """Litestar's exception layer for one handler: the app's ``after_exception`` hooks,
        then its exception handler's response. A raw handler sends its answer last, so no
        error comes after its response started."""
        handlers = self.exception_handlers

        async def answered(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await handler(scope, receive, send)
            except Exception as exc:
                for hook in self.after_exception:
                    await hook(exc, scope)
                request = self.request_class(scope=scope, receive=receive, send=send)
                response = exception_handler_for(handlers, exc)(request, exc)
                asgi = response.to_asgi_response(app=None, request=request, type_encoders=self.type_encoders)
                await asgi(scope, receive, send)

        return answered

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hot = self.hot_routes.get(scope["path"])
            if hot is not None:
                scope["app"] = scope["litestar_app"] = self  # as Litestar.__call__ sets them
                scope.setdefault("state", {})
                await hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
