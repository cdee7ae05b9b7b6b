"""A real headless Chromium (Debian's ``chromium``, driven by Playwright for Python) and
Segment's analytics.js (``@segment/analytics-next`` from npm, locked in analytics/), served
to the browser from a shop page on an origin of its own.

Playwright's own browser downloads are never used: the tests launch ``/usr/bin/chromium``
(``IDGATE_TEST_CHROMIUM`` names another). Without Chromium or Playwright the tests fail
(marker ``browser``); without npm they fail too (marker ``node``): see tests/conftest.py.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, free_port, missing, require_marker
from tests.console.conftest import TOKENS

ANALYTICS = Path(__file__).resolve().parent / "analytics"
UMD = ANALYTICS / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
CHROMIUM = os.environ.get("IDGATE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def analytics_js() -> Path:
    """The directory of analytics.js' standalone UMD bundle (``index.js`` and its chunks):
    installed from the lockfile with ``npm ci`` the first time."""
    require_marker("node", "npm (to install analytics.js)")
    npm = shutil.which("npm")
    if npm is None:
        missing("node", "npm is needed to install Segment's analytics.js for the browser tests: not on PATH")
    if not (UMD / "index.js").is_file():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=ANALYTICS,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return UMD


# Module scope: Playwright's sync API runs an event loop of its own; it is gone before the
# next module's tests (asyncio ones among them) run.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's ``Browser``)."""
    require_marker("browser", "a Chromium browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing("browser", f"Playwright for Python is not installed (pip install playwright): {exc}")
    if not os.access(CHROMIUM, os.X_OK):
        missing("browser", f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; a small
        # /dev/shm (containers) would crash pages without --disable-dev-shm-usage.
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@dataclass
class Site:
    """A static web site on 127.0.0.1 at a port of its own: an origin other than idgate's."""

    root: Path
    port: int
    server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Site:
        handler = functools.partial(_Quiet, directory=str(self.root))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, name=f"site-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def shop_site(tmp_path: Path, analytics_js: Path) -> Iterator[Any]:
    """Makes shop sites: ``shop_site(html)`` serves ``index.html`` and analytics.js
    (``/analytics/index.js``) from a new port; stopped after the test."""
    sites: list[Site] = []

    def make(html: str) -> Site:
        root = tmp_path / f"site-{len(sites)}"
        root.mkdir()
        (root / "index.html").write_text(html)
        (root / "analytics").symlink_to(analytics_js, target_is_directory=True)
        site = Site(root, free_port()).start()
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.stop()


# -- the console in a browser --------------------------------------------------------------
VIEWPORT = {"width": 1366, "height": 768}


@dataclass
class Exchange:
    method: str
    url: str
    request_body: str
    status: int
    body: str


@dataclass
class Recorder:
    """Every request of a browser context, with its answer (redirects followed too);
    nothing outside 127.0.0.1."""

    exchanges: list[Exchange] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def route(self, route: Any) -> None:
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def response(self, response: Any) -> None:
        request = response.request
        try:
            body = response.body().decode("utf-8", errors="replace")
        except Exception:  # a redirect has no body
            body = ""
        self.exchanges.append(
            Exchange(request.method, request.url, request.post_data or "", response.status, body)
        )

    def mark(self) -> int:
        return len(self.exchanges)


@pytest.fixture
def browser_page(chromium: Any) -> Iterator[tuple[Any, Recorder]]:
    context = chromium.new_context(viewport=VIEWPORT, accept_downloads=True)
    recorder = Recorder()
    context.route("**/*", recorder.route)
    context.on("response", recorder.response)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page, recorder
    assert recorder.outside == [], f"the console asked for {recorder.outside}"
    context.close()


def sign_in(page: Any, gw: Gateway, role: str) -> None:
    """The console sends an anonymous browser to the sign-in form (cookies are dropped first:
    a new officer at the same browser)."""
    page.context.clear_cookies()
    page.goto(gw.url + "/console/")
    assert page.url.endswith("/console/sign-in")
    page.fill("#token", TOKENS[role])
    page.click("#sign-in")
    page.wait_for_selector("#officer")


def assert_fits(page: Any) -> None:
    """The page fits a 1366x768 laptop screen: nothing scrolls sideways."""
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"], page.url
