"""The compliance console over plain HTTP: who may open which page (a table over every
console route), sessions (fixation, cookie flags, sign-out, timeout), CSRF on every form,
the access log, and that a searched raw identifier never comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.stores.memory import MemoryStore
from litestar.stores.redis import RedisStore
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.console.sessions import SESSION_COOKIE, ConsoleSessions
from gateway.rate_limits import MemoryCounters
from tests.conftest import COMPLIANCE_TOKEN, MALL_SERVER_KEY, REDIS_URL, ROOT
from tests.console.conftest import CONSOLE_CONFIG, TOKENS, csrf_of, held_merge, person_with_phone, sign_in
from tests.gateway.conftest import in_process_app, in_process_settings
from tests.waiting import async_wait_until, wait_until

DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
ROLES = ("compliance", "operator", "auditor")
C, OPS, A = "compliance", "operator", "auditor"

# Every console route, with the roles that may use it. A route added without its line here
# fails test_the_table_covers_every_console_route.
ROUTES: list[tuple[str, str, frozenset[str]]] = [
    ("GET", "/console", frozenset({C, OPS, A})),
    ("POST", "/console/sign-out", frozenset({C, OPS, A})),
    ("GET", "/console/subject", frozenset({C})),
    ("POST", "/console/subject", frozenset({C})),
    ("GET", "/console/ledger", frozenset({C, A})),
    ("POST", "/console/ledger/verify", frozenset({C, OPS, A})),
    ("GET", "/console/ledger/export", frozenset({C, A})),
    ("GET", "/console/quarantine", frozenset({C, OPS, A})),
    ("GET", "/console/notices", frozenset({C, A})),
    ("GET", "/console/monitoring", frozenset({C, OPS, A})),
    ("POST", "/console/quarantine/review", frozenset({C})),
    ("GET", "/console/rights", frozenset({C, A})),
    ("POST", "/console/rights", frozenset({C})),
    ("GET", "/console/rights/{request_id}", frozenset({C, A})),
    ("POST", "/console/rights/{request_id}/complete", frozenset({C})),
    ("POST", "/console/rights/{request_id}/extend", frozenset({C})),
    ("POST", "/console/rights/{request_id}/pause", frozenset({C})),
    ("POST", "/console/rights/{request_id}/resume", frozenset({C})),
    ("POST", "/console/rights/{request_id}/bundle", frozenset({C})),
]
# Open to anyone: the sign-in form and the language switch.
ANONYMOUS = {("GET", "/console/sign-in"), ("POST", "/console/sign-in"), ("GET", "/console/language")}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Litestar:
    return in_process_app(tmp_path_factory.mktemp("console"), CONSOLE_CONFIG)


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=app, raise_server_exceptions=True) as test_client:
        yield test_client


def url(path: str) -> str:
    return path.replace("{request_id}", "r-" + uuid.uuid4().hex[:8])


def access_log(client: TestClient[Any]) -> list[dict[str, Any]]:
    """The access log, newest first."""
    r = client.get("/admin/access-log", headers=DPO, params={"limit": 500})
    assert r.status_code == 200, r.text
    return list(r.json()["entries"])


# -- who may open what -------------------------------------------------------------------------
def test_the_table_covers_every_console_route(app: Litestar) -> None:
    served = set()
    for route in app.routes:
        if isinstance(route, HTTPRoute) and route.path_format.startswith("/console"):
            for handler in route.route_handlers:
                served |= {(m, route.path_format) for m in handler.http_methods - {"HEAD", "OPTIONS"}}
    tabled = {(m, p) for m, p, _ in ROUTES} | ANONYMOUS
    assert served == tabled, f"untabled: {served - tabled}; gone: {tabled - served}"


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _ in ROUTES])
def test_every_console_route_refuses_anonymous_access(
    client: TestClient[Litestar], method: str, path: str
) -> None:
    client.cookies.clear()
    r = client.request(method, url(path), data={"csrf_token": "x"}, follow_redirects=False)
    if method == "GET":  # a browser is sent to the sign-in page
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in", r.text
    else:
        assert r.status_code == 401, r.text
    assert "problem" in r.text or method == "GET"
    # a forged or stale session cookie is no better
    client.cookies.set(SESSION_COOKIE, "forged-session-id", path="/console")
    r = client.request(method, url(path), data={"csrf_token": "x"}, follow_redirects=False)
    assert r.status_code in (303, 401), r.text


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path", "allowed"), ROUTES)
def test_each_role_reaches_only_its_routes(
    client: TestClient[Litestar], role: str, method: str, path: str, allowed: frozenset[str]
) -> None:
    csrf = sign_in(client, TOKENS[role])
    r = client.request(method, url(path), data={"csrf_token": csrf}, follow_redirects=False)
    if role in allowed:
        # bad or missing form fields (400) or an unknown request id (404), never a refusal
        assert r.status_code not in (401, 403), f"{role} {method} {path}: {r.status_code} {r.text[:300]}"
    else:
        assert r.status_code == 403, f"{role} {method} {path}: {r.status_code}"
        assert 'data-problem="forbidden"' in r.text


def test_a_refused_page_is_in_the_access_log(client: TestClient[Litestar]) -> None:
    sign_in(client, TOKENS["operator"])
    assert client.get("/console/rights", follow_redirects=False).status_code == 403
    refused = [e for e in access_log(client) if e["action"] == "admin.refused"]
    assert any(e["officer"] == "ops" and e["params"]["path"] == "/console/rights" for e in refused), refused


def test_every_page_opened_is_in_the_access_log(client: TestClient[Litestar]) -> None:
    sign_in(client, TOKENS["auditor"])
    for page in ("/console/", "/console/ledger", "/console/rights", "/console/quarantine"):
        assert client.get(page).status_code == 200, page
    actions = [e["action"] for e in access_log(client) if e["officer"] == "audit"]
    for action in (
        "console.sign_in",
        "console.home",
        "console.ledger",
        "console.rights",
        "console.quarantine",
    ):
        assert action in actions, actions


# -- sessions ----------------------------------------------------------------------------------
def test_sign_in_starts_a_new_session_and_ends_the_one_it_came_with(client: TestClient[Litestar]) -> None:
    """Session fixation: an attacker's own session id, planted in the officer's browser,
    is not what the officer gets at sign-in, and it stops working."""
    sign_in(client, TOKENS["operator"])
    planted = client.cookies[SESSION_COOKIE]
    sign_in_page = client.get("/console/sign-in")
    r = client.post(
        "/console/sign-in",
        data={"token": TOKENS["compliance"], "csrf_token": csrf_of(sign_in_page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    issued = client.cookies[SESSION_COOKIE]
    assert issued != planted
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, planted, path="/console")
    assert client.get("/console/", follow_redirects=False).status_code == 303
    client.cookies.set(SESSION_COOKIE, issued, path="/console")
    assert 'id="officer">dpo<' in client.get("/console/").text


def cookie_attributes(set_cookie: str) -> set[str]:
    return {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}


def session_cookie(response: Any) -> str:
    (line,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")]
    return str(line)


def test_the_session_cookie_is_httponly_samesite_strict_and_scoped(client: TestClient[Litestar]) -> None:
    client.cookies.clear()
    form = client.get("/console/sign-in")
    assert "httponly" in cookie_attributes(form.headers["set-cookie"])
    r = client.post(
        "/console/sign-in",
        data={"token": TOKENS["compliance"], "csrf_token": csrf_of(form.text)},
        follow_redirects=False,
    )
    line = session_cookie(r)
    attributes = cookie_attributes(line)
    assert {"httponly", "samesite", "path"} <= attributes, line
    assert "samesite=strict" in line.lower() and "path=/console" in line.lower()
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    assert "expires" not in attributes and "max-age" not in attributes  # gone with the browser


@pytest.mark.parametrize("how", ["https", "configured"])
def test_the_session_cookie_is_secure_behind_tls(tmp_path: Path, how: str) -> None:
    """Over HTTPS, or always when configured (TLS ends at a proxy that does not say so)."""
    settings = in_process_settings(tmp_path, CONSOLE_CONFIG)
    if how == "configured":
        settings = dataclasses.replace(settings, console_secure_cookie=True)
    base = "https://testserver.local" if how == "https" else "http://testserver.local"
    with TestClient(app=create_app(settings), base_url=base) as c:
        form = c.get("/console/sign-in")
        assert "secure" in cookie_attributes(form.headers["set-cookie"])
        sign_in_token = form.headers["set-cookie"].split(";")[0]  # a client would not send it over http
        r = c.post(
            "/console/sign-in",
            data={"token": TOKENS["auditor"], "csrf_token": csrf_of(form.text)},
            headers={"Cookie": sign_in_token},
            follow_redirects=False,
        )
        assert "secure" in cookie_attributes(session_cookie(r))


def test_sign_out_ends_the_session_on_the_server(client: TestClient[Litestar]) -> None:
    csrf = sign_in(client, TOKENS["auditor"])
    session = client.cookies[SESSION_COOKIE]
    r = client.post("/console/sign-out", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    client.cookies.set(SESSION_COOKIE, session, path="/console")  # a copy kept by a thief
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_an_unknown_token_does_not_sign_in(client: TestClient[Litestar]) -> None:
    client.cookies.clear()
    form = client.get("/console/sign-in")
    r = client.post(
        "/console/sign-in",
        data={"token": "not-a-token", "csrf_token": csrf_of(form.text)},
        follow_redirects=False,
    )
    assert r.status_code == 401 and 'id="sign-in-failed"' in r.text
    assert SESSION_COOKIE not in client.cookies
    assert access_log(client)[0]["action"] == "console.sign_in_refused"


def session_store(kind: str) -> Any:
    """The stores the console keeps sessions in: memory (embedded), Redis (distributed)."""
    if kind == "memory":
        return MemoryStore()
    import redis.asyncio as aioredis

    return RedisStore(aioredis.from_url(REDIS_URL), namespace=f"test-console-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_session_ends_when_idle_and_in_any_case_at_its_absolute_limit(kind: str) -> None:
    async def scenario() -> None:
        store = session_store(kind)
        idle = ConsoleSessions(store, idle_seconds=1, absolute_seconds=3600)
        session_id, session = await idle.start("a" * 64)
        assert await idle.get(session_id) == session
        # (polled in the store: a get would be a request, and renew it)
        await async_wait_until(lambda: _gone(store, session_id), timeout=5, what="the idle session to end")
        assert await idle.get(session_id) is None
        done = ConsoleSessions(store, idle_seconds=3600, absolute_seconds=0)
        session_id, _ = await done.start("a" * 64)
        assert await done.get(session_id) is None
        ended = ConsoleSessions(store, idle_seconds=3600, absolute_seconds=3600)
        session_id, _ = await ended.start("a" * 64)
        await ended.end(session_id)
        assert await ended.get(session_id) is None
        await store.delete_all()

    asyncio.run(scenario())


async def _gone(store: Any, session_id: str) -> bool:
    return await store.get(ConsoleSessions.key(session_id)) is None


# -- CSRF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_a_form_without_the_sessions_csrf_token_is_refused(
    app: Litestar, client: TestClient[Litestar], token: str | None
) -> None:
    # The refusals the route tables above provoke (every route, every role) use up this
    # client's budget of refusals logged per minute (REFUSALS_LOGGED_PER_MINUTE): a fresh one.
    app.state.rate_limiter.store = MemoryCounters()
    sign_in(client, TOKENS["compliance"])
    data = {"tenant": "mall", "kind": "access", "type": "phone", "identifier": "13800138000"}
    if token is not None:
        data["csrf_token"] = token
    before = access_log(client)[0]["id"]
    r = client.post("/console/rights", data=data, follow_redirects=False)
    assert r.status_code == 403 and 'data-problem="csrf"' in r.text
    after = [e for e in access_log(client) if e["id"] > before]
    assert [e["action"] for e in after if e["action"].startswith("console.")] == []
    assert any(e["action"] == "admin.refused" and e["params"]["status"] == 403 for e in after), after


def test_the_sign_in_form_needs_its_csrf_token(client: TestClient[Litestar]) -> None:
    """Login CSRF: a page elsewhere cannot sign the officer's browser in as someone else."""
    client.cookies.clear()
    client.get("/console/sign-in")
    r = client.post("/console/sign-in", data={"token": TOKENS["compliance"]}, follow_redirects=False)
    assert r.status_code == 403 and SESSION_COOKIE not in client.cookies


# -- the pages ---------------------------------------------------------------------------------
def test_the_search_answers_with_pseudonyms_only(client: TestClient[Litestar]) -> None:
    phone = f"139{uuid.uuid4().int % 10**8:08d}"
    r = client.post(
        "/v1/consent",
        json={
            "userId": f"u-{phone}",
            "traits": {"phone": phone},
            "grant": ["analytics"],
            "noticeId": "notice-v1",
        },
        auth=(MALL_SERVER_KEY, ""),
    )
    assert r.status_code == 200, r.text
    csrf = sign_in(client, TOKENS["compliance"])
    r = client.post(
        "/console/subject", data={"csrf_token": csrf, "tenant": "mall", "type": "phone", "identifier": phone}
    )
    assert r.status_code == 200, r.text
    assert phone not in r.text and phone[3:] not in r.text
    node = re.search(r'id="subject-node">phone:(k\d+\.[\w-]+)<', r.text)
    assert node, r.text
    entry = access_log(client)[0]
    assert entry["action"] == "console.subject_search" and entry["params"]["subject"] == node.group(1)
    assert phone not in str(access_log(client))


def test_a_bad_identifier_is_a_400_page_naming_the_field(client: TestClient[Litestar]) -> None:
    csrf = sign_in(client, TOKENS["compliance"])
    r = client.post(
        "/console/subject", data={"csrf_token": csrf, "tenant": "mall", "type": "phone", "identifier": "12x"}
    )
    assert r.status_code == 400 and 'id="search-problem"' in r.text and "identifier" in r.text
    assert "12x" not in r.text


def test_console_answers_are_not_cached_nor_framed(client: TestClient[Litestar]) -> None:
    sign_in(client, TOKENS["auditor"])
    r = client.get("/console/ledger")
    assert r.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/admin/access-log"])
def test_the_language_switch_stays_in_the_console(client: TestClient[Litestar], target: str) -> None:
    r = client.get("/console/language", params={"lang": "en", "next": target}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console"


def test_the_language_switch_changes_the_labels(client: TestClient[Litestar]) -> None:
    client.cookies.clear()
    assert "登录" in client.get("/console/sign-in").text
    client.get("/console/language", params={"lang": "en", "next": "/console/sign-in"})
    assert ">Sign in<" in client.get("/console/sign-in").text
    client.get("/console/language", params={"lang": "zh"})


@pytest.mark.parametrize(
    ("token", "name", "role"),
    [
        ("compliance-demo-token", "dpo", "compliance"),
        ("auditor-demo-token", "auditor", "auditor"),
        ("operator-demo-token", "ops", "operator"),
    ],
)
def test_the_readmes_demo_tokens_sign_in_to_the_console_of_make_run(
    tmp_path: Path, token: str, name: str, role: str
) -> None:
    """README "Compliance console": `make run` (the example config, dev mode) and its tokens."""
    settings = dataclasses.replace(in_process_settings(tmp_path), config_path=ROOT / "idgate.example.toml")
    with TestClient(app=create_app(settings), base_url="http://127.0.0.1:8080") as c:
        sign_in(c, token)
        home = c.get("/console/")
        assert f'id="officer">{name}<' in home.text and f"role_{role}" not in home.text
        expected = {"compliance": 200, "auditor": 403, "operator": 403}[role]
        assert c.get("/console/subject").status_code == expected


def test_a_rejected_merge_leaves_the_quarantine_and_is_logged(client: TestClient[Litestar]) -> None:
    held_merge(client)
    csrf = sign_in(client, TOKENS["compliance"])
    page = client.get("/console/quarantine", params={"tenant": "mall"}).text
    a, b = (
        re.findall(r'name="a" value="([^"]+)"', page)[-1],
        re.findall(r'name="b" value="([^"]+)"', page)[-1],
    )
    form = {"csrf_token": csrf, "tenant": "mall", "a": a, "b": b, "decision": "reject"}
    r = client.post("/console/quarantine/review", data=form)
    assert r.status_code == 200 and 'data-outcome="rejected"' in r.text
    assert f'value="{b}"' not in r.text
    entry = access_log(client)[0]
    assert entry["action"] == "console.quarantine_review"
    assert entry["params"] == {"a": a, "b": b, "decision": "reject", "outcome": "rejected"}
    # decided once
    assert client.post("/console/quarantine/review", data=form).status_code == 404
    bad = client.post("/console/quarantine/review", data={**form, "a": "13800138000"})
    assert bad.status_code == 400 and "13800138000" not in bad.text


def test_notices_and_consent_rates(client: TestClient[Litestar]) -> None:
    person_with_phone(client)  # analytics given then withdrawn, identity linking given
    sign_in(client, TOKENS["auditor"])
    r = client.get("/console/notices", params={"tenant": "mall"})
    assert r.status_code == 200
    notices = r.text[r.text.index('id="notices"') : r.text.index("</table>", r.text.index('id="notices"'))]
    assert "notice-v1" in notices and "1111111111111111" in notices
    rows = dict(
        re.findall(r"<tr><td>(\w+)</td><td>\d+</td><td>\d+</td>\s*<td><meter[^>]*value=\"([\d.]+)\"", r.text)
    )
    assert float(rows["identity_linking"]) > 0 and "analytics" in rows, rows
    # the trend: the rate at the end of each of the last 14 days, today's is today's rate
    trends = dict(re.findall(r"<tr><td>(\w+)</td>.*?<td data-trend=\"([^\"]*)\"", r.text, re.S))
    linking = trends["identity_linking"].split(" ")
    assert len(linking) == 14 and float(linking[-1]) == float(rows["identity_linking"]), trends
    assert '<svg class="spark"' in r.text
    assert client.get("/console/notices", params={"tenant": "mall", "by": "platform"}).status_code == 200
    assert client.get("/console/notices", params={"tenant": "mall", "by": "nonsense"}).status_code == 400


def test_the_ledger_page_lists_signed_checkpoints(app: Litestar, client: TestClient[Litestar]) -> None:
    person_with_phone(client)
    checkpoint = app.state.services.audit.ledger.checkpoint()
    assert checkpoint is not None
    sign_in(client, TOKENS["auditor"])
    r = client.get("/console/ledger", params={"tenant": "mall"})
    assert 'id="checkpoints"' in r.text and f"{checkpoint.from_seq}–{checkpoint.to_seq}" in r.text
    assert checkpoint.key_id in r.text


@pytest.mark.parametrize("path", ["/admin/consent/verify", "/admin/rights/", "/admin/access-log"])
def test_an_auditor_token_is_for_the_console_only(client: TestClient[Litestar], path: str) -> None:
    r = client.get(path, headers={"Authorization": f"Bearer {TOKENS['auditor']}"})
    assert r.status_code == 403 and r.json()["error"], r.text


def test_the_subject_view_at_a_past_moment_shows_the_grant_and_the_deliveries_on_it(
    client: TestClient[Litestar],
) -> None:
    phone, user = person_with_phone(client, withdraw=False)
    csrf = sign_in(client, TOKENS["compliance"])
    form = {"csrf_token": csrf, "tenant": "mall", "type": "phone", "identifier": phone}

    def analytics_state(html: str) -> str:
        found = re.search(r"<tr><td>analytics</td><td class=\"state-(\w+)\">", html)
        assert found, html
        return found.group(1)

    # the identify event went to the mall's warehouse on the strength of the grant
    delivered = wait_until(
        lambda: (
            (page := client.post("/console/subject", data=form).text) and 'id="deliveries"' in page and page
        ),
        10,
        what="the delivery of the person's event, relying on the grant",
    )
    records = client.get(
        "/admin/consent/records", params={"tenant": "mall", "type": "phone", "identifier": phone}, headers=DPO
    ).json()["records"]
    (grant,) = [r for r in records if r["state"] == "given"]
    assert f"<td>{grant['seq']}</td><td>mall-warehouse</td>" in delivered
    r = client.post(
        "/v1/consent",
        json={"userId": user, "identifiers": [{"type": "phone", "id": phone}], "withdraw": ["analytics"]},
        auth=(MALL_SERVER_KEY, ""),
    )
    assert r.status_code == 200, r.text
    assert analytics_state(client.post("/console/subject", data=form).text) == "withdrawn"
    then = client.post("/console/subject", data={**form, "at": grant["at"]}).text
    assert analytics_state(then) == "given" and f"<td>{grant['seq']}</td><td>mall-warehouse</td>" in then


def test_a_deletion_request_shows_each_destinations_receipt(
    app: Litestar, client: TestClient[Litestar]
) -> None:
    """The request page follows a deletion per destination: the receipt each destination that
    held the person's data gave for the ``identity.deleted`` notice, as the rights API has it."""
    phone, user = person_with_phone(client, withdraw=False)
    message_id = uuid.uuid4().hex
    r = client.post(
        "/v1/track",
        json={"userId": user, "event": "Product Viewed", "messageId": message_id},
        auth=(MALL_SERVER_KEY, ""),
    )
    assert r.status_code == 200, r.text
    sinks = app.state.gateway.settings.data_dir / "sinks" / "mall-warehouse"
    wait_until(
        lambda: any(message_id in p.read_text() for p in sinks.glob("*.jsonl")),
        30,
        what="the person's event in the warehouse (the index of who holds their data)",
    )
    admin = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    opened = client.post(
        "/admin/rights",
        json={
            "tenant": "mall",
            "kind": "delete",
            "subject": {"type": "phone", "id": phone},
            "requestedBy": "subject",
            "channel": "app",
            "verification": {"method": "account_login", "outcome": "verified"},
        },
        headers=admin,
    )
    assert opened.status_code in (200, 201), opened.text
    request_id = opened.json()["requestId"]

    def received() -> dict[str, str] | None:
        got = client.get(f"/admin/rights/{request_id}", params={"tenant": "mall"}, headers=admin).json()
        receipts: dict[str, str] = got["receipts"]
        return receipts if receipts and "pending" not in receipts.values() else None

    receipts = wait_until(received, 30, what="the deletion receipts")
    assert receipts.get("mall-warehouse") == "delivered", receipts
    sign_in(client, TOKENS["compliance"])
    page = client.get(f"/console/rights/{request_id}", params={"tenant": "mall"})
    assert page.status_code == 200, page.text
    table = re.search(r'<table id="receipts">(.*?)</table>', page.text, re.S)
    assert table, page.text
    shown = dict(re.findall(r'<tr><td>([\w-]+)</td><td class="receipt-(\w+)">', table.group(1)))
    assert shown == receipts, (shown, receipts)
    assert phone not in page.text


def test_the_rights_page_pauses_and_resumes_a_requests_clock(client: TestClient[Litestar]) -> None:
    """Compliance only, with the session's CSRF token like every form: the request page offers
    to pause the clock (with a reason) while the request runs, then to resume it; the API
    shows the same clock; pausing twice is a 409 page naming the problem."""
    opened = client.post(
        "/admin/rights",
        json={
            "tenant": "mall",
            "kind": "access",
            "subject": {"type": "user_id", "id": f"console-pause-{uuid.uuid4().hex[:8]}"},
            "requestedBy": "subject",
            "channel": "email",
            "verification": {"method": "account_login", "outcome": "verified"},
        },
        headers=DPO,
    )
    assert opened.status_code == 201, opened.text
    request_id = opened.json()["requestId"]
    page_path = f"/console/rights/{request_id}?tenant=mall"

    sign_in(client, TOKENS["auditor"])
    seen = client.get(page_path)
    assert seen.status_code == 200 and 'id="pause-form"' not in seen.text  # auditors read only

    csrf = sign_in(client, TOKENS["compliance"])
    before = client.get(page_path).text
    assert 'id="pause-form"' in before and 'id="resume-form"' not in before
    forged = client.post(
        f"/console/rights/{request_id}/pause?tenant=mall",
        data={"csrf_token": "forged", "reason": "awaiting_identity_proof"},
        follow_redirects=False,
    )
    assert forged.status_code == 403 and 'data-problem="csrf"' in forged.text
    r = client.post(
        f"/console/rights/{request_id}/pause?tenant=mall",
        data={"csrf_token": csrf, "reason": "awaiting_identity_proof"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == page_path, r.text
    paused = client.get(page_path).text
    assert 'data-clock="paused"' in paused and 'id="request-paused"' in paused
    assert (
        "awaiting_identity_proof" in paused
        and 'id="resume-form"' in paused
        and 'id="pause-form"' not in paused
    )
    api = client.get(f"/admin/rights/{request_id}", params={"tenant": "mall"}, headers=DPO).json()
    assert api["clock"] == "paused" and api["pauseReason"] == "awaiting_identity_proof", api
    queue = client.get("/console/rights", params={"tenant": "mall"}).text
    assert re.search(rf'data-clock="paused"><td><a href="[^"]*{request_id}', queue), "not paused in the queue"

    twice = client.post(
        f"/console/rights/{request_id}/pause?tenant=mall",
        data={"csrf_token": csrf, "reason": "awaiting_clarification"},
        follow_redirects=False,
    )
    assert twice.status_code == 409 and "already paused" in twice.text, twice.text
    bad = client.post(
        f"/console/rights/{request_id}/pause?tenant=mall",
        data={"csrf_token": csrf, "reason": "because"},
        follow_redirects=False,
    )
    assert bad.status_code == 400 and "reason" in bad.text

    r = client.post(
        f"/console/rights/{request_id}/resume?tenant=mall", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert r.status_code == 303, r.text
    running = client.get(page_path).text
    assert 'data-clock="paused"' not in running and 'id="pause-form"' in running
    actions = [e["action"] for e in access_log(client)[:20]]
    assert "console.rights_resume" in actions and "console.rights_pause" in actions, actions
    steps = client.get(f"/admin/rights/{request_id}", params={"tenant": "mall"}, headers=DPO).json()["steps"]
    assert [s["step"] for s in steps] == ["paused", "resumed"], steps
