"""deploy/nginx.conf in a real nginx in front of a real `idgate serve` (issue 12, item 9):
the public listener serves the ingest and consent endpoints only, and no spelling of
/metrics, /docs, /admin or the OpenAPI document gets through it; the internal listener
serves them.

nginx runs in the foreground with a prefix of the test's own and the repository's config,
in which only addresses change (the upstream, the listeners, the pid file, no Docker DNS).
"""

from __future__ import annotations

import base64
import http.client
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import (
    COMPLIANCE_TOKEN,
    ROOT,
    SHOP_SENSORS_TOKEN,
    Gateway,
    free_port,
    mid,
    missing,
    require_marker,
)
from tests.sensors.conftest import encode, sensors_event
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nginx]

CONF = ROOT / "deploy" / "nginx.conf"
PUBLIC_404 = b"not served on the public listener"


@dataclass
class Nginx:
    public: int
    internal: int

    def request(
        self,
        port: int,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """``path`` goes on the request line exactly as given (no client-side normalising)."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "idgate.example")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def local_config(gateway_port: int, public: int, internal: int, prefix: Path) -> str:
    text = CONF.read_text()
    swaps = [
        ("pid /tmp/nginx.pid;", f"pid {prefix / 'nginx.pid'};"),
        ("worker_processes auto;", "worker_processes 1;"),
        ("resolver 127.0.0.11 valid=5s ipv6=off;", ""),
        ("server gateway:8080 resolve ", f"server 127.0.0.1:{gateway_port} "),
        ("listen 8080;", f"listen 127.0.0.1:{public};"),
        ("listen 8081;", f"listen 127.0.0.1:{internal};"),
    ]
    for old, new in swaps:
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def lb(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    require_marker("nginx", "nginx")
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        missing("nginx", "nginx is required on PATH (apt-get install -y nginx)")
    prefix = tmp_path_factory.mktemp("nginx")
    public, internal = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(local_config(gateway.port, public, internal, prefix))
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lb = Nginx(public, internal)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            return lb.request(public, "GET", "/lb-health")[0] == 200
        except OSError:
            return False

    wait_until(healthy, 20, what="nginx's /lb-health")
    yield lb
    proc.terminate()
    proc.wait(timeout=15)


PRIVATE_PATHS = [
    "/metrics",
    "/metrics/",
    "/metrics%2F",
    "/metrics%2f",
    "/metrics/.",
    "/metrics/./",
    "/metrics/..;/metrics",
    "/metrics;x",
    "/metrics?format=text",
    "//metrics",
    "///metrics/",
    "/./metrics",
    "/METRICS",
    "/Metrics/",
    "/%6detrics",
    "/%6Detrics%2F",
    "/v1/../metrics",
    "/v1/%2e%2e/metrics",
    "/v1/track/../../metrics",
    "/sa/../metrics",
    "/docs",
    "/docs/",
    "/docs/openapi.json",
    "/docs/openapi.json/",
    "/docs%2Fopenapi.json",
    "//docs/openapi.json",
    "/DOCS/swagger",
    "/docs/redoc",
    "/schema",
    "/schema/openapi.json",
    "/openapi.json",
    "/static/vendor/redoc/redoc.standalone.js",
    "/console",
    "/console/sign-in",
    "/CONSOLE/sign-in",
    "/v1/../console/",
    "/static/console/console.css",
    "/admin/consent/stats",
    "/admin/consent/stats/",
    "/admin%2Fconsent%2Fstats",
    "//admin/consent/stats",
    "/ADMIN/consent/stats",
    "/v1/consent/../../admin/consent/stats",
    "/v1/track/..%2F..%2Fadmin/consent/stats",
    "/healthz",
    "/readyz",
]


@pytest.mark.parametrize("path", PRIVATE_PATHS)
def test_no_spelling_of_a_private_path_gets_through_the_public_listener(lb: Nginx, path: str) -> None:
    auth = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    for method in ("GET", "HEAD", "POST"):
        status, body = lb.request(
            lb.public, method, path, body=b"{}" if method == "POST" else None, headers=auth
        )
        # nginx's own 404 (or its 400 for a path that climbs above the root), never the gateway's
        assert status in (400, 404), (method, path, status, body[:200])
        assert method == "HEAD" or status == 400 or PUBLIC_404 in body, (method, path, body[:200])
        for leak in (b"# HELP", b"openapi", b"idgate_", b"records", b"<html"):
            assert status == 400 or leak not in body.replace(PUBLIC_404, b""), (path, body[:200])


def test_the_public_listener_serves_ingest_and_consent(lb: Nginx) -> None:
    basic = {
        "Authorization": "Basic " + base64.b64encode(b"web-test-key-0001:").decode(),
        "Content-Type": "application/json",
    }
    status, body = lb.request(
        lb.public,
        "POST",
        "/v1/track",
        body=f'{{"userId": "u-lb", "event": "Through nginx", "messageId": "{mid()}"}}'.encode(),
        headers=basic,
    )
    assert status == 200 and b'"accepted":1' in body, body
    batch = f'{{"batch": [{{"type": "track", "userId": "u-lb", "event": "B", "messageId": "{mid()}"}}]}}'
    status, body = lb.request(lb.public, "POST", "/v1/batch?x=1", body=batch.encode(), headers=basic)
    assert status == 200, body
    # analytics.js' short path for track
    short = f'{{"userId": "u-lb", "event": "Short", "messageId": "{mid()}"}}'
    status, body = lb.request(lb.public, "POST", "/v1/t", body=short.encode(), headers=basic)
    assert status == 200 and b'"accepted":1' in body, body
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    data = encode(sensors_event("visitor-lb"), compress=False)
    status, body = lb.request(
        lb.public,
        "POST",
        f"/sa?project=shop&token={SHOP_SENSORS_TOKEN}",
        body=f"data={quote(data)}".encode(),
        headers=form,
    )
    assert status == 200, body
    # an unknown /v1 path is nginx's 404, not passed on
    status, body = lb.request(lb.public, "POST", "/v1/admin", body=b"{}", headers=basic)
    assert status == 404 and PUBLIC_404 in body


def test_the_internal_listener_serves_metrics_docs_and_admin(lb: Nginx) -> None:
    status, body = lb.request(lb.internal, "GET", "/metrics")
    assert status == 200 and b"# HELP" in body
    status, body = lb.request(lb.internal, "GET", "/docs/openapi.json")
    assert status == 200 and b"openapi" in body
    auth = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    status, body = lb.request(lb.internal, "GET", "/admin/consent/stats?tenant=mall", headers=auth)
    assert status == 200, body
