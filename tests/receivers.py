"""A local HTTP receiver for sink and fault tests: webhook JSON, Segment ``/v1/batch`` and the
Sensors Data form, on a free loopback port, served from a background thread.

    with Receiver(fail_rate=0.3, timeout_rate=0.1, hang_seconds=1.0) as rx:
        sink = build_sink("webhook", root=tmp, destination="d", options={"url": rx.webhook_url})
        ...
        assert rx.message_ids == expected_ids   # each message id once, in order of first arrival

Routes (by path):

* ``POST /v1/batch``: Segment. JSON ``{"batch": [...]}`` (also gzipped, with
  ``Content-Encoding: gzip``); each call needs ``type``, ``messageId`` and ``userId`` or
  ``anonymousId`` (else 400); with ``write_key`` set, the basic auth user must equal it
  (else 401).
* ``POST /sa...``: Sensors. Form ``data_list`` (or ``data`` for one record) = base64 of
  gzipped JSON (``gzip=1``) or of plain JSON; each record must pass the Sensors SDK's own
  checks (``SensorsAnalytics._normalize_data``, else 400). Its message id is the property
  ``idgate_message_id``, else ``<_track_id>:<distinct_id>:<time>``.
* ``POST`` anything else: webhook. JSON ``{"batch": [...]}`` (gzip as above), message id =
  ``messageId``.
* ``GET /_stats``: the counters as JSON, for a receiver run in another process
  (``python -m tests.receivers --port 8123``).

What a POST gets, in this order: ``down`` -> 503 (nothing recorded); a seeded random draw
below ``fail_rate`` -> 500 (nothing recorded); below ``fail_rate + timeout_rate`` -> the
events are recorded, then the answer (200) waits ``hang_seconds``, past the client's
timeout, so the client retries what was in fact received; ``reject(event)`` true for any
event -> 400 (nothing recorded); otherwise recorded, 200.

State (read it any time; the knobs ``fail_rate``, ``timeout_rate``, ``down`` and ``reject``
may be changed while it runs):

* ``events``: the decoded records, first arrival of each message id, in arrival order;
  ``message_ids``: their ids; ``duplicates``: records received again after the first;
* ``requests``: every POST as ``ReceivedRequest(path, status, headers, message_ids)``;
  ``statuses``: a Counter of the answers.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gzip
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from export.outbox import StoredRecord

SENSORS_MESSAGE_ID = "idgate_message_id"


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    status: int
    headers: dict[str, str]
    message_ids: tuple[str, ...]


class BadRequest(Exception):
    """The request body is not in the route's format (answered 400)."""


def decode_sensors_form(body: bytes) -> list[dict[str, Any]]:
    """The records of a Sensors receiver request: form ``data_list`` (or ``data``), base64 of
    gzipped JSON when ``gzip=1``, else base64 of JSON."""
    form = parse_qs(body.decode("ascii"), strict_parsing=True)
    field = "data_list" if "data_list" in form else "data"
    if field not in form:
        raise BadRequest("no data_list or data field")
    raw = base64.b64decode(form[field][0], validate=True)
    if form.get("gzip", ["0"])[0] == "1":
        raw = gzip.decompress(raw)
    decoded = json.loads(raw)
    return decoded if field == "data_list" else [decoded]


def _sensors_check(record: dict[str, Any]) -> None:
    from sensorsanalytics.sdk import SensorsAnalytics, SensorsAnalyticsIllegalDataException

    try:
        SensorsAnalytics._normalize_data(copy.deepcopy(record))
    except (SensorsAnalyticsIllegalDataException, KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"not a valid Sensors record: {exc}") from None


def _sensors_message_id(record: dict[str, Any]) -> str:
    properties = record.get("properties") or {}
    if properties.get(SENSORS_MESSAGE_ID):
        return str(properties[SENSORS_MESSAGE_ID])
    return f"{record.get('_track_id')}:{record.get('distinct_id')}:{record.get('time')}"


def _segment_check(message: dict[str, Any]) -> None:
    if not message.get("type") or not message.get("messageId"):
        raise BadRequest("a call without type or messageId")
    if not (message.get("userId") or message.get("anonymousId")):
        raise BadRequest("a call without userId or anonymousId")


class Receiver:
    def __init__(
        self,
        *,
        fail_rate: float = 0.0,
        timeout_rate: float = 0.0,
        hang_seconds: float = 2.0,
        seed: int = 0,
        write_key: str | None = None,
        reject: Callable[[dict[str, Any]], bool] | None = None,
        port: int = 0,
    ) -> None:
        self.fail_rate = fail_rate
        self.timeout_rate = timeout_rate
        self.hang_seconds = hang_seconds
        self.write_key = write_key
        self.reject = reject
        self.down = False
        self.events: list[dict[str, Any]] = []
        self.message_ids: list[str] = []
        self.duplicates = 0
        self.requests: list[ReceivedRequest] = []
        self.statuses: Counter[int] = Counter()
        self._seen: set[str] = set()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhook"

    @property
    def segment_url(self) -> str:
        """The base URL: the Segment sink appends /v1/batch."""
        return self.url

    @property
    def sensors_url(self) -> str:
        return f"{self.url}/sa?project=default"

    def start(self) -> Receiver:
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": len(self.message_ids),
                "duplicates": self.duplicates,
                "requests": len(self.requests),
                "statuses": {str(k): v for k, v in self.statuses.items()},
            }

    # -- handling ----------------------------------------------------------------------------
    def _decode(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[list[dict[str, Any]], list[str]]:
        if path.startswith("/sa"):
            records = decode_sensors_form(body)
            for r in records:
                _sensors_check(r)
            return records, [_sensors_message_id(r) for r in records]
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
            raise BadRequest('expected {"batch": [...]}')
        records = document["batch"]
        if path.rstrip("/").endswith("/v1/batch"):
            for r in records:
                _segment_check(r)
        return records, [str(r.get("messageId", "")) for r in records]

    def _authorised(self, path: str, headers: dict[str, str]) -> bool:
        if self.write_key is None or not path.rstrip("/").endswith("/v1/batch"):
            return True
        expected = "Basic " + base64.b64encode(f"{self.write_key}:".encode()).decode()
        return headers.get("authorization") == expected

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, float]:
        """(status, response body, seconds to wait before answering) for one POST."""
        ids: list[str] = []
        hang = 0.0
        with self._lock:
            draw = self._random.random()
        if self.down:
            status = 503
        elif draw < self.fail_rate:
            status = 500
        elif not self._authorised(path, headers):
            status = 401
        else:
            try:
                records, ids = self._decode(path, headers, body)
            except (BadRequest, ValueError, OSError) as exc:
                self._log(path, 400, headers, [])
                return 400, json.dumps({"error": str(exc)}).encode(), 0.0
            if draw < self.fail_rate + self.timeout_rate:
                status, hang = 200, self.hang_seconds
            elif self.reject is not None and any(self.reject(r) for r in records):
                status = 400
            else:
                status = 200
            if status == 200:
                self._record(records, ids)
        self._log(path, status, headers, ids)
        return status, b'{"success":true}' if status == 200 else b'{"success":false}', hang

    def _record(self, records: list[dict[str, Any]], ids: list[str]) -> None:
        with self._lock:
            for record, message_id in zip(records, ids, strict=True):
                if message_id in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(message_id)
                self.message_ids.append(message_id)
                self.events.append(record)

    def _log(self, path: str, status: int, headers: dict[str, str], ids: list[str]) -> None:
        with self._lock:
            self.statuses[status] += 1
            self.requests.append(ReceivedRequest(path, status, headers, tuple(ids)))


def _handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real receiver
        timeout = 60  # an idle kept-alive connection is closed after a minute
        # headers and body leave in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every answer
        disable_nagle_algorithm = True

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer, hang = receiver.handle(self.path, headers, body)
            if hang:  # the simulated fault itself: answer only after the client's timeout
                time.sleep(hang)
            try:
                self._answer(status, answer)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/_stats":
                self._answer(200, json.dumps(receiver.stats()).encode())
            else:
                self._answer(404, b"{}")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            return None

    return Handler


# -- records for driving a sink directly ------------------------------------------------------
def sample_records(
    count: int,
    *,
    start_seq: int = 1,
    tenant: str = "shop",
    received_at_ms: int = 1_763_700_000_000,
    prefix: str = "m",
) -> list[StoredRecord]:
    """``count`` outbox records holding cleaned track events shaped like the gateway's (one
    person per 7 events, message ids ``<prefix>-<seq>``)."""
    records = []
    for seq in range(start_seq, start_seq + count):
        message_id = f"{prefix}-{seq}"
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(received_at_ms // 1000))
        at = f"{at}.{received_at_ms % 1000:03d}Z"
        person = seq // 7
        event = {
            "type": "track",
            "messageId": message_id,
            "timestamp": at,
            "receivedAt": at,
            "userId": f"u.pseudo{person}",
            "anonymousId": f"a.pseudo{person}",
            "event": "Order Completed",
            "properties": {"order_id": f"o-{seq}", "total": seq * 1.5, "items": ["sku-1", "sku-2"]},
            "context": {
                "unified_id": f"p_person{person}",
                "idgate": {
                    "tenant": tenant,
                    "source": f"{tenant}-web",
                    "platform": "web",
                    "keyVersion": 1,
                    "purposes": ["analytics"],
                    "consentProof": [seq],
                },
            },
        }
        payload = json.dumps(event, separators=(",", ":")).encode()
        records.append(StoredRecord(seq, received_at_ms, ("d",), payload, b"", message_id, (seq,)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the test receiver until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=2.0)
    parser.add_argument("--write-key")
    args = parser.parse_args()
    rx = Receiver(
        fail_rate=args.fail_rate,
        timeout_rate=args.timeout_rate,
        hang_seconds=args.hang_seconds,
        write_key=args.write_key,
        port=args.port,
    )
    print(f"listening {rx.url}", flush=True)
    try:
        rx._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        rx._server.server_close()


if __name__ == "__main__":
    main()
