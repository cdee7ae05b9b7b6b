"""Slow clients against a gateway, run as a process of its own by tests/gateway/test_front_end.py.

    python -m tests.gateway.slow_clients --port P [--slowloris 2000] [--slow-bodies 20] [--bombs 0]
                                          [--duration 10]

Keeps ``--slowloris`` connections open that send a partial request (a request line and a
header, then one more header line per second, never the blank line), and ``--slow-bodies``
connections that send complete headers of a POST announcing a body, then one byte of it per
half second, and ``--bombs`` connections that stream one header line without end (as fast
as the server reads it). A connection the server closes is opened again at once, so the attack holds
its numbers for ``--duration`` seconds. Prints ``{"ready": n}`` once every connection is open,
then at the end one JSON line of counts: connections opened, closed by the server, and the
status codes the server answered before closing (with the largest time a connection lived).
Runs in its own process so its work does not slow the client whose latency the test measures.
"""

from __future__ import annotations

import argparse
import base64
import json
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

SLOWLORIS_HEAD = b"GET /v1/track HTTP/1.1\r\nHost: idgate\r\nUser-Agent: slowloris\r\n"
SLOWLORIS_DRIP = b"X-Slow: 1\r\n"
BOMB_HEAD = b"POST /v1/batch HTTP/1.1\r\nHost: idgate\r\nX-Bomb: "
BOMB_CHUNK = b"a" * 65536


def slow_body_head(write_key: str) -> bytes:
    auth = base64.b64encode(f"{write_key}:".encode()).decode()
    return (
        "POST /v1/batch HTTP/1.1\r\nHost: idgate\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: 100000\r\n\r\n"
        '{"batch": ['
    ).encode()


@dataclass
class Conn:
    sock: socket.socket
    kind: str
    opened: float
    answer: bytes = b""


@dataclass
class Stats:
    opened: int = 0
    closed_by_server: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    longest_s: dict[str, float] = field(default_factory=dict)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--slowloris", type=int, default=2000)
    p.add_argument("--slow-bodies", type=int, default=20)
    p.add_argument("--bombs", type=int, default=0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--write-key", default="web-test-key-0001")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sel = selectors.DefaultSelector()
    stats = Stats()
    conns: dict[int, Conn] = {}
    body_head = slow_body_head(args.write_key)

    def open_one(kind: str) -> None:
        sock = socket.create_connection(("127.0.0.1", args.port), timeout=10)
        sock.sendall({"slowloris": SLOWLORIS_HEAD, "slow_body": body_head, "bomb": BOMB_HEAD}[kind])
        sock.setblocking(False)
        conns[sock.fileno()] = Conn(sock, kind, time.monotonic())
        sel.register(sock, selectors.EVENT_READ)
        stats.opened += 1

    def closed(conn: Conn) -> None:
        sel.unregister(conn.sock)
        del conns[conn.sock.fileno()]
        conn.sock.close()
        lived = time.monotonic() - conn.opened
        stats.closed_by_server[conn.kind] += 1
        stats.longest_s[conn.kind] = max(stats.longest_s.get(conn.kind, 0.0), lived)
        status = conn.answer[9:12].decode("ascii", "replace") if conn.answer.startswith(b"HTTP/") else "none"
        stats.statuses[f"{conn.kind} {status}"] += 1
        if time.monotonic() < end:
            open_one(conn.kind)

    end = time.monotonic() + args.duration
    for _ in range(args.slowloris):
        open_one("slowloris")
    for _ in range(args.slow_bodies):
        open_one("slow_body")
    for _ in range(args.bombs):
        open_one("bomb")
    bomb_bytes = 0
    print(json.dumps({"ready": len(conns)}), flush=True)

    next_drip = {"slowloris": time.monotonic() + 1.0, "slow_body": time.monotonic() + 0.5}
    while time.monotonic() < end:
        for conn in [c for c in conns.values() if c.kind == "bomb"]:
            try:
                bomb_bytes += conn.sock.send(BOMB_CHUNK)
            except BlockingIOError:
                pass
            except OSError:
                closed(conn)
        for key, _ in sel.select(timeout=0.01 if args.bombs else 0.1):
            conn = conns.get(key.fd)
            if conn is None:
                continue
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if data:
                conn.answer += data
            else:
                closed(conn)
        now = time.monotonic()
        for kind, due in next_drip.items():
            if now < due:
                continue
            next_drip[kind] = now + (1.0 if kind == "slowloris" else 0.5)
            for conn in [c for c in conns.values() if c.kind == kind]:
                try:
                    conn.sock.send(SLOWLORIS_DRIP if kind == "slowloris" else b" ")
                except OSError:
                    closed(conn)
    print(
        json.dumps(
            {
                "opened": stats.opened,
                "open_at_end": len(conns),
                "closed_by_server": dict(stats.closed_by_server),
                "statuses": dict(stats.statuses),
                "longest_s": stats.longest_s,
                "bomb_bytes_sent": bomb_bytes,
            }
        ),
        flush=True,
    )
    for conn in conns.values():
        conn.sock.close()


if __name__ == "__main__":
    sys.exit(main())
