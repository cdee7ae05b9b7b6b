"""The HTTP front end of ``idgate serve``: uvicorn (uvloop + httptools) with the limits it lacks.

httptools parses fast but bounds nothing: one client streaming a header line forever grows
the server's memory without end, and a connection that sent half of its headers (or half of
its body) is kept for as long as the client likes, so a few thousand of them hold every file
descriptor. uvicorn's h11 parser bounds the headers but costs a large part of the request rate
and still has no read timeouts (see bench/front_end.py), so the limits are enforced here, on
the httptools protocol, at a cost of a few attribute updates per request:

* request line (``max_request_line_bytes``, 414), header bytes (``max_header_bytes``, 431)
  and header count (``max_headers``, 431); the bytes received before the headers end are
  counted as they arrive, so a header streamed without end is cut at the sum of the two
  limits (plus one read) instead of growing httptools' buffer;
* headers that must come once (``Authorization``): a second one is refused (400) instead of
  letting one of them win silently;
* time to send the headers, from the connection or the first byte of a request
  (``header_timeout``), and to send the body once the headers are in (``body_timeout``):
  408 and the connection closed; idle keep-alive connections are closed by uvicorn after
  ``keep_alive_timeout``;
* at most ``max_connections`` open connections: a new one past the cap closes the oldest
  connection that has no request in progress (a slow or idle client), else it is answered
  503 with Retry-After.

Each refusal is a JSON ErrorBody like every other error of the gateway, then the connection
is closed. Deadlines are checked on uvicorn's 0.1 s tick against queues of the connections
in each phase, oldest first, so no timer is armed per request and a check looks only at the
connections past their deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import time
from typing import Any, ClassVar

import msgspec
import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ErrorBody
from gateway.settings import HttpLimits

log = structlog.get_logger("idgate.front_end")

# Descriptors kept for everything but client connections (outbox, logs, Redis, database...).
RESERVED_FDS = 256
# Connections closed for a deadline per 0.1 s tick (5,000/s): thousands of slow connections
# that expire at once are closed over a few ticks, without one long stall of the loop.
CLOSES_PER_TICK = 500

_IDLE, _HEADERS, _BODY, _APP = 0, 1, 2, 3

REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def error_response(status: int, error: str, detail: str, field: str | None, retry_after: int = 0) -> bytes:
    body = msgspec.json.encode(ErrorBody(error, detail, field))
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    if retry_after:
        head.append(b"retry-after: %d\r\n" % retry_after)
    return b"".join(head) + b"\r\n" + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the protocol holds the answer."""


class DeadlineQueue:
    """Connections in one phase, oldest first: entering moves a connection to the end, so the
    ones past a deadline are always at the front and a sweep looks at no others."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: dict[GuardedHttpToolsProtocol, None] = {}  # insertion-ordered set

    def enter(self, conn: GuardedHttpToolsProtocol) -> None:
        self.members.pop(conn, None)
        self.members[conn] = None

    def leave(self, conn: GuardedHttpToolsProtocol) -> None:
        self.members.pop(conn, None)

    def oldest(self, besides: GuardedHttpToolsProtocol) -> GuardedHttpToolsProtocol | None:
        for conn in self.members:
            if conn is not besides:
                return conn
        return None

    def expired(self, before: float, limit: int) -> list[GuardedHttpToolsProtocol]:
        """Remove and return the connections that entered before ``before``, at most ``limit``."""
        out: list[GuardedHttpToolsProtocol] = []
        for conn in self.members:
            if conn._since >= before or len(out) >= limit:
                break
            out.append(conn)
        for conn in out:
            del self.members[conn]
        return out


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, time and connection limits (module docstring).

    ``protocol_class`` makes a subclass per server, with its limits and its queues."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    # Connections waiting for headers (new, or a request begun), for a body, and idle
    # between requests (uvicorn's keep-alive timer closes those).
    headers_queue: ClassVar[DeadlineQueue] = DeadlineQueue()
    body_queue: ClassVar[DeadlineQueue] = DeadlineQueue()
    idle_queue: ClassVar[DeadlineQueue] = DeadlineQueue()
    # The loop's time, as of the last tick (0.1 s): deadlines need no finer clock, and
    # reading one list item is cheaper than a call per request phase.
    clock: ClassVar[list[float]] = [time.monotonic()]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # bytes a request may send before its headers end: request line and header lines
        self._head_limit = self.limits.max_request_line_bytes + self.limits.max_header_bytes
        self._phase = _HEADERS
        self._since = 0.0
        self._header_bytes = 0  # bytes received since the request's headers began
        self._authorization = False  # this request sent an Authorization header
        self._refusal: bytes | None = None

    # -- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = self.clock[0]
        self.headers_queue.enter(self)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self._refuse(
                error_response(
                    503,
                    "too_many_connections",
                    f"the server holds its maximum of {self.limits.max_connections} connections",
                    None,
                    retry_after=1,
                )
            )

    def _evict_one(self) -> bool:
        """Close the oldest other connection with no request in progress: one still waiting
        for its headers, else an idle one."""
        oldest = self.headers_queue.oldest(self) or self.idle_queue.oldest(self)
        if oldest is None:
            return False
        self.headers_queue.leave(oldest)  # closing: never picked twice
        self.idle_queue.leave(oldest)
        oldest.timed_out("connection_evicted", "the server is at its connection limit")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.headers_queue.leave(self)
        self.body_queue.leave(self)
        self.idle_queue.leave(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()  # uvicorn's idle timer: from here the header deadline
        phase = self._phase
        if phase == _IDLE:  # the next request begins (even with bytes the parser skips)
            del self.idle_queue.members[self]
            self._phase = phase = _HEADERS
            self._since = self.clock[0]
            self.headers_queue.members[self] = None
        if phase == _HEADERS:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except self._parser_errors as exc:
            if self._refusal is None:
                if isinstance(exc, self._upgrade_error):  # as uvicorn does
                    if self._should_upgrade():
                        self.handle_websocket_upgrade()
                    else:
                        self._unsupported_upgrade_warning()
                    return
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
                return
        if self._refusal is not None:
            self._refuse(self._refusal)
        elif self._phase == _HEADERS and self._header_bytes > self._head_limit:
            self._refuse(self._too_large_headers())

    # -- parser callbacks (the hot path: a few attribute and dict operations per request) ---
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._authorization = False
        if self._phase != _HEADERS:  # a pipelined request, after another in the same read
            self._phase = _HEADERS
            self._since = self.clock[0]
            self.headers_queue.members[self] = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line_bytes:
            self._stop(
                error_response(
                    414,
                    "request_line_too_long",
                    f"the request line exceeds {self.limits.max_request_line_bytes} bytes",
                    "url",
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # A second Authorization header: which one counts would be up to whichever code reads
        # them (the last one won), so the request is ambiguous and refused.
        if name == b"authorization":
            if self._authorization:
                self._stop(
                    error_response(
                        400, "duplicate_header", "the Authorization header is sent twice", "Authorization"
                    )
                )
            self._authorization = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self.headers
        limits = self.limits
        if len(headers) > limits.max_headers:
            self._stop(
                error_response(
                    431, "too_many_headers", f"a request may carry at most {limits.max_headers} headers", None
                )
            )
        # Only when this many bytes came in can the header lines be too large: count them then.
        if self._header_bytes > limits.max_header_bytes and (
            sum(len(n) + len(v) + 4 for n, v in headers) > limits.max_header_bytes
        ):
            self._stop(self._too_large_headers())
        self.headers_queue.members.pop(self, None)
        self._phase = _BODY
        self._since = self.clock[0]
        self.body_queue.members[self] = None
        self._header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.body_queue.members.pop(self, None)
        self._phase = _APP
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase == _APP and not self.pipeline:
            self._phase = _IDLE
            self._since = self.clock[0]
            self.idle_queue.members[self] = None
        super().on_response_complete()

    # -- refusals ---------------------------------------------------------------------------
    def _too_large_headers(self) -> bytes:
        return error_response(
            431,
            "headers_too_large",
            f"the request headers exceed {self.limits.max_header_bytes} bytes",
            None,
        )

    def _stop(self, response: bytes) -> None:
        if self._refusal is None:
            self._refusal = response
        raise _Refused

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` unless a response already began, and close the connection."""
        if self.transport.is_closing():
            return
        # An app waiting for the body sees the client disconnect (connection_lost); its
        # answer goes nowhere.
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(response)
        self.transport.close()

    def timed_out(self, error: str, detail: str) -> None:
        self._refuse(error_response(408, error, detail, None))

    @classmethod
    def sweep(cls, now: float) -> None:
        """Close the connections past their header or body deadline."""
        cls.clock[0] = now
        limits = cls.limits
        for conn in cls.headers_queue.expired(now - limits.header_timeout, CLOSES_PER_TICK):
            conn.timed_out(
                "header_timeout", f"the request headers did not arrive within {limits.header_timeout:g} s"
            )
        for conn in cls.body_queue.expired(now - limits.body_timeout, CLOSES_PER_TICK):
            cycle = conn.cycle
            if cycle is None or not cycle.response_started:
                conn.timed_out(
                    "body_timeout", f"the request body did not arrive within {limits.body_timeout:g} s"
                )
            elif cycle.response_complete:  # answered early (413...): the rest of the body is not wanted
                conn.transport.close()
            else:  # still answering: look again after another period
                conn._since = now
                cls.body_queue.enter(conn)

    _parser_errors: ClassVar[tuple[type[BaseException], ...]]
    _upgrade_error: ClassVar[type[BaseException]]


def _bind_parser_errors() -> None:
    import httptools

    GuardedHttpToolsProtocol._parser_errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
    GuardedHttpToolsProtocol._upgrade_error = httptools.HttpParserUpgrade


_bind_parser_errors()


class GuardedServer(uvicorn.Server):
    """uvicorn's server, sweeping its connections' deadlines on its own 0.1 s tick."""

    async def on_tick(self, counter: int) -> bool:
        protocol = self.config.http_protocol_class
        if isinstance(protocol, type) and issubclass(protocol, GuardedHttpToolsProtocol):
            protocol.sweep(time.monotonic())
        return await super().on_tick(counter)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards its hard limit (as nginx and Go do):
    the default soft limit of 1,024 is less than one connection cap. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def protocol_class(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol with these limits, its connection cap lowered to what the descriptor
    limit allows (logged)."""
    soft = raise_fd_limit(limits.max_connections + RESERVED_FDS)
    if soft < limits.max_connections + RESERVED_FDS:
        lowered = max(16, soft - RESERVED_FDS)
        log.warning(
            "http.connection_cap_lowered",
            configured=limits.max_connections,
            cap=lowered,
            rlimit_nofile=soft,
        )
        limits = dataclasses.replace(limits, max_connections=lowered)
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "limits": limits,
            "headers_queue": DeadlineQueue(),
            "body_queue": DeadlineQueue(),
            "idle_queue": DeadlineQueue(),
            "clock": [time.monotonic()],
        },
    )


def server(app: Any, host: str, port: int, limits: HttpLimits) -> GuardedServer:
    """The uvicorn server ``idgate serve`` runs."""
    return GuardedServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop",
            http=protocol_class(limits),
            log_config=None,
            # No access log and no X-Forwarded-For handling: idgate never uses the client IP
            # of a request, and an access log would write it to disk.
            access_log=False,
            proxy_headers=False,
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=limits.keep_alive_seconds,
        )
    )
