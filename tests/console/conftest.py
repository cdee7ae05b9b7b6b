"""The compliance console's tests: the tests' config with an auditor token, and signing in
over plain HTTP (a ``TestClient`` or ``httpx.Client``: both keep cookies)."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import TEST_CONFIG

AUDITOR_TOKEN = "auditor-test-token"
TOKENS = {
    "compliance": "compliance-test-token",
    "operator": "operator-test-token",
    "auditor": AUDITOR_TOKEN,
}
_AUDITOR = f"""
[[admin_tokens]]
name = "audit"
role = "auditor"
dev_token = "{AUDITOR_TOKEN}"
"""
_FIRST_TENANT = "\n[[tenants]]\n"
assert TEST_CONFIG.count(_FIRST_TENANT) >= 1
CONSOLE_CONFIG = TEST_CONFIG.replace(_FIRST_TENANT, _AUDITOR + _FIRST_TENANT, 1)

_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def sign_in(client: Any, token: str) -> str:
    """Sign ``client`` in with an admin token (through the sign-in form); returns the
    session's CSRF token. The client's earlier cookies are dropped first."""
    client.cookies.clear()
    form = client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    r = client.post(
        "/console/sign-in",
        data={"token": token, "csrf_token": csrf_of(form.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/console", r.text
    home = client.get("/console/")
    assert home.status_code == 200, home.text
    return csrf_of(home.text)
