"""A TCP proxy a test can cut: a gateway talks to Redis or PostgreSQL through it, and the
test takes the service "down" (every connection dropped, new ones refused) and "up" again
without touching the shared server other tests use.

    with TcpProxy("127.0.0.1", 6379) as proxy:
        env = {"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/9", ...}
        proxy.cut()      # like the server going away
        proxy.restore()  # back
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._cut = False
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._drop_all()
        self._listener.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (the service is down)."""
        with self._lock:
            self._cut = True
        self._drop_all()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def _drop_all(self) -> None:
        with self._lock:
            peers = list(self._peers)
            self._peers.clear()
        for sock in peers:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()

    def _serve(self) -> None:
        while self._running:
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            refused = self._cut
        if refused:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._peers[client] = upstream
            self._peers[upstream] = client
        self._selector.register(client, selectors.EVENT_READ, None)
        self._selector.register(upstream, selectors.EVENT_READ, None)

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._peers.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        with self._lock:
            self._peers.pop(sock, None)
            self._peers.pop(other, None)
        for s in (sock, other):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            s.close()
