"""CORS on the Segment endpoints and ``/v1/consent``, in process over HTTP (Litestar's test
client): each source lists the origins of its pages (``allowed_origins``); a preflight is
granted when some source lists the origin, the request itself only when its write key's
source does (gateway.cors). The browser itself: tests/browser."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from gateway.config import ConfigProblems, parse_config
from tests.conftest import APP_KEY, MALL_WEB_KEY, TEST_CONFIG, WEB_KEY, mid
from tests.gateway.conftest import in_process_app

SHOP = "https://shop.example.cn"
SHOP_DEV = "http://127.0.0.1:8080"
MALL = "https://mall.example.cn"
STRANGER = "https://evil.example"
SEGMENT_PATHS = [
    "/v1/batch",
    "/v1/track",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
    # analytics.js' short paths
    "/v1/b",
    "/v1/t",
    "/v1/i",
    "/v1/p",
    "/v1/s",
    "/v1/g",
    "/v1/a",
]
CORS_PATHS = [*SEGMENT_PATHS, "/v1/consent"]
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def with_origins(config: str, key: str, origins: list[str]) -> str:
    line = f'dev_write_key = "{key}"'
    assert config.count(line) == 1
    return config.replace(line, f"{line}\nallowed_origins = {json.dumps(origins)}")


CONFIG = with_origins(with_origins(TEST_CONFIG, WEB_KEY, [SHOP, SHOP_DEV]), MALL_WEB_KEY, [MALL])


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    app = in_process_app(tmp_path_factory.mktemp("cors"), CONFIG)
    with TestClient(app=app, raise_server_exceptions=False) as test_client:
        yield test_client


def cors_headers(headers: object) -> dict[str, str]:
    return {k.lower(): v for k, v in dict(headers).items() if k.lower().startswith("access-control-")}  # type: ignore[call-overload]


# -- preflight --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CORS_PATHS)
@pytest.mark.parametrize("origin", [SHOP, SHOP_DEV, MALL])
def test_a_preflight_from_an_origin_a_source_lists_is_granted(
    client: TestClient[Litestar], path: str, origin: str
) -> None:
    r = client.options(path, headers={"Origin": origin, **PREFLIGHT})
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert "Origin" in r.headers["vary"]
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "content-encoding"} <= allowed
    assert 0 < int(r.headers["access-control-max-age"]) <= 7200
    assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize("path", CORS_PATHS)
@pytest.mark.parametrize(
    "origin", [STRANGER, "null", SHOP + ".evil.example", "http://shop.example.cn", SHOP + "/"]
)
def test_a_preflight_from_an_origin_no_source_lists_gets_no_grant(
    client: TestClient[Litestar], path: str, origin: str
) -> None:
    r = client.options(path, headers={"Origin": origin, **PREFLIGHT})
    assert r.status_code == 403
    assert r.json() == {
        "error": "origin_not_allowed",
        "detail": "no source of this gateway allows requests from the page's origin",
        "field": "Origin",
    }
    assert cors_headers(r.headers) == {}


@pytest.mark.parametrize("path", CORS_PATHS)
def test_options_without_origin_names_the_methods(client: TestClient[Litestar], path: str) -> None:
    r = client.options(path)
    assert r.status_code == 204
    assert r.headers["allow"] == "POST, OPTIONS"
    assert cors_headers(r.headers) == {}


# -- the requests themselves ------------------------------------------------------------------
def track(**extra: object) -> dict[str, object]:
    return {
        "type": "track",
        "anonymousId": "anon-cors-1",
        "event": "Product Viewed",
        "messageId": mid(),
        **extra,
    }


@pytest.mark.parametrize("origin", [SHOP, SHOP_DEV])
def test_a_request_from_its_sources_origin_is_answered_with_the_grant(
    client: TestClient[Litestar], origin: str
) -> None:
    r = client.post("/v1/track", json=track(), auth=(WEB_KEY, ""), headers={"Origin": origin})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert cors_headers(r.headers) == {"access-control-allow-origin": origin}
    assert "Origin" in r.headers["vary"]
    r = client.post(
        "/v1/consent",
        json={"anonymousId": "anon-cors-1", "withdraw": ["marketing"]},
        auth=(WEB_KEY, ""),
        headers={"Origin": origin},
    )
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert r.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize(
    ("path", "body", "auth", "status", "error"),
    [
        ("/v1/batch", b"{", (WEB_KEY, ""), 400, "invalid_json"),
        ("/v1/track", json.dumps(track()).encode(), ("no-such-key-123", ""), 401, "invalid_write_key"),
        ("/v1/track", json.dumps(track(event="")).encode(), (WEB_KEY, ""), 400, "invalid_field"),
        ("/v1/consent", b'{"grant": ["analytics"]}', (WEB_KEY, ""), 400, "missing_identity"),
    ],
)
def test_error_answers_carry_the_grant_so_the_page_can_read_them(
    client: TestClient[Litestar], path: str, body: bytes, auth: tuple[str, str], status: int, error: str
) -> None:
    r = client.post(
        path, content=body, auth=auth, headers={"Origin": SHOP, "Content-Type": "application/json"}
    )
    assert r.status_code == status and r.json()["error"] == error, r.text
    assert r.headers["access-control-allow-origin"] == SHOP


@pytest.mark.parametrize("path", ["/v1/track", "/v1/t", "/v1/consent"])
@pytest.mark.parametrize(
    ("key", "origin"),
    [
        (WEB_KEY, MALL),  # listed, by another source
        (MALL_WEB_KEY, SHOP),
        (APP_KEY, SHOP),  # the shop's app source lists no origin
        (WEB_KEY, STRANGER),  # listed by none (a request sent without a preflight)
    ],
)
def test_a_request_from_an_origin_its_source_does_not_list_is_refused_without_grant(
    client: TestClient[Litestar], path: str, key: str, origin: str
) -> None:
    body = track() if path != "/v1/consent" else {"anonymousId": "anon-cors-2", "grant": ["analytics"]}
    r = client.post(path, json=body, auth=(key, ""), headers={"Origin": origin})
    assert r.status_code == 403, r.text
    assert r.json() == {
        "error": "origin_not_allowed",
        "detail": "this source does not allow requests from the page's origin (allowed_origins)",
        "field": "Origin",
    }
    assert cors_headers(r.headers) == {}


def test_a_simple_request_with_the_write_key_in_the_body_is_checked_too(client: TestClient[Litestar]) -> None:
    """A text/plain POST needs no preflight: the browser sends it from any page."""
    body = json.dumps({**track(), "writeKey": WEB_KEY})
    r = client.post("/v1/t", content=body, headers={"Origin": STRANGER, "Content-Type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
    r = client.post("/v1/t", content=body, headers={"Origin": SHOP, "Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text


def test_requests_without_origin_are_not_affected(client: TestClient[Litestar]) -> None:
    r = client.post("/v1/track", json=track(), auth=(APP_KEY, ""))
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert cors_headers(r.headers) == {}


@pytest.mark.parametrize(
    ("short", "long"), [("/v1/b", "/v1/batch"), ("/v1/t", "/v1/track"), ("/v1/i", "/v1/identify")]
)
def test_the_short_paths_answer_like_the_long_ones(
    client: TestClient[Litestar], short: str, long: str
) -> None:
    """analytics.js posts to /v1/t, /v1/b...: the same handlers as /v1/track, /v1/batch."""
    message = (
        track() if long != "/v1/identify" else {"type": "identify", "userId": "member-1", "messageId": mid()}
    )
    body = {"batch": [message]} if long == "/v1/batch" else message
    answers = [client.post(p, json=body, auth=(WEB_KEY, "")) for p in (short, long)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json()["accepted"] == 1 and answers[1].json()["duplicates"] == 1
    r = client.get(short)
    assert r.status_code == 405


# -- configuration ----------------------------------------------------------------------------
SOURCE = """
[[tenants]]
id = "shop"

[[tenants.sources]]
id = "web"
platform = "web"
write_key_sha256 = "{key}"
allowed_origins = {origins}

[[tenants.sources]]
id = "sa"
platform = "web"
sensors_project = "shop"
sensors_token_sha256 = "{key2}"
allowed_origins = ["https://sa.example.cn"]
"""


def problems_for(origins: list[str]) -> list[str]:
    text = SOURCE.format(key="a" * 64, key2="b" * 64, origins=json.dumps(origins))
    try:
        parse_config(text)
    except ConfigProblems as exc:
        return exc.problems
    return []


def test_a_source_without_a_write_key_cannot_list_origins() -> None:
    assert problems_for([SHOP]) == [
        "tenants[0].sources[1].allowed_origins: needs a write key (browsers send it to the Segment API)"
    ]


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        ("*", "no wildcard"),
        ("https://*.example.cn", "no wildcard"),
        ("https://shop.example.cn/", "is not an origin"),
        ("https://shop.example.cn/path", "is not an origin"),
        ("shop.example.cn", "is not an origin"),
        ("HTTPS://Shop.example.cn", "is not an origin"),
        ("ftp://shop.example.cn", "is not an origin"),
        ("null", "is not an origin"),
        ("https://user@shop.example.cn", "is not an origin"),
        ("https://shop.example.cn?x=1", "is not an origin"),
        ("https://shop.example.cn:443", "browsers omit the default port"),
        ("http://shop.example.cn:80", "browsers omit the default port"),
    ],
)
def test_origins_are_checked(origin: str, problem: str) -> None:
    found = [p for p in problems_for([origin]) if p.startswith("tenants[0].sources[0]")]
    assert len(found) == 1 and problem in found[0], found
    assert found[0].startswith("tenants[0].sources[0].allowed_origins[0]: ")


@pytest.mark.parametrize(
    "origin",
    [
        SHOP,
        "http://127.0.0.1:8080",
        "http://localhost:3000",
        "https://[::1]:8443",
        "https://shop.example.cn:8443",
    ],
)
def test_well_formed_origins_are_accepted(origin: str) -> None:
    assert [p for p in problems_for([origin]) if p.startswith("tenants[0].sources[0]")] == []


def test_an_origin_listed_twice_is_reported() -> None:
    found = [p for p in problems_for([SHOP, SHOP]) if p.startswith("tenants[0].sources[0]")]
    assert found == [f"tenants[0].sources[0].allowed_origins[1]: {SHOP!r} is listed twice"]
