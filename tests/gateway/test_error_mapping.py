"""The error contract in process: every refusal is JSON ``{error, detail, field}`` with the
documented status, from ``gateway.app.create_app`` driven by Litestar's TestClient (no
``idgate serve`` process, no network): 400 invalid input naming the field, 401 without a
known write key or admin token, 403 for the wrong role or tenant, 404, 405, 413, 415."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import COMPLIANCE_TOKEN, OPERATOR_TOKEN, TEST_CONFIG, WEB_KEY

# What a gateway process takes from its environment; the tests' own values replace it all.
ENVIRONMENT = ("REDIS_URL", "DATABASE_URL")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    """The embedded gateway (SQLite, file sinks) on the tests' config, in this process."""
    tmp = tmp_path_factory.mktemp("in-process")
    config = tmp / "idgate.toml"
    config.write_text(TEST_CONFIG)
    with pytest.MonkeyPatch.context() as env:
        for name in [*ENVIRONMENT, *(n for n in os.environ if n.startswith("IDGATE_"))]:
            env.delenv(name, raising=False)
        env.setenv("IDGATE_ENV", "dev")
        settings = Settings.from_env(config_path=config, data_dir=tmp / "var")
    with TestClient(app=create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON error body, after checking it has the contract's shape."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert {"error", "detail", "field"} <= set(body), body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["field"] is None or isinstance(body["field"], str)
    return body


def post_json(client: TestClient[Any], path: str, content: bytes, key: str | None = WEB_KEY, **headers: str):
    return client.post(
        path,
        content=content,
        headers={"Content-Type": "application/json", **headers},
        auth=(key, "") if key else None,
    )


def track(message_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u-1", "event": "Order Completed", "messageId": message_id, **fields}


# -- 400 ---------------------------------------------------------------------------------------
def test_malformed_json_is_a_400_without_a_field(client: TestClient[Any]) -> None:
    r = post_json(client, "/v1/batch", b'{"batch": [')
    assert r.status_code == 400
    body = error_of(r)
    assert body["error"] == "invalid_json" and body["field"] is None


@pytest.mark.parametrize(
    ("path", "content", "error", "field"),
    [
        ("/v1/track", b'{"userId": "u-1"}', "invalid_field", "event"),
        ("/v1/track", b'{"event": "e"}', "missing_identity", "userId"),
        (
            "/v1/track",
            b'{"userId": "u", "event": "e", "timestamp": "yesterday"}',
            "invalid_field",
            "timestamp",
        ),
        ("/v1/batch", b'{"batch": []}', "invalid_field", "batch"),
        (
            "/v1/batch",
            b'{"batch": [{"type": "track", "userId": "u", "event": "e", "timestamp": 12}]}',
            "invalid_field",
            "batch[0].timestamp",
        ),
    ],
    ids=["missing event", "missing ids", "bad timestamp", "empty batch", "bad field in a batch"],
)
def test_a_bad_field_is_a_400_naming_it(
    client: TestClient[Any], path: str, content: bytes, error: str, field: str
) -> None:
    r = post_json(client, path, content)
    assert r.status_code == 400, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == (error, field)


def test_a_bad_consent_call_is_a_400_naming_the_field(client: TestClient[Any]) -> None:
    body = {"anonymousId": "anon-x-1", "grant": ["telepathy"]}
    r = post_json(client, "/v1/consent", json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert error_of(r)["field"] == "grant"


# -- 401 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "error"),
    [(None, "missing_write_key"), ("nope-nope-nope", "invalid_write_key")],
    ids=["no write key", "unknown write key"],
)
def test_ingest_without_a_known_write_key_is_a_401(
    client: TestClient[Any], key: str | None, error: str
) -> None:
    r = post_json(client, "/v1/batch", json.dumps({"batch": [track("k-1")]}).encode(), key=key)
    assert r.status_code == 401, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == (error, "Authorization")


def test_consent_without_a_write_key_is_a_401(client: TestClient[Any]) -> None:
    body = {"anonymousId": "anon-x-1", "grant": ["analytics"], "noticeId": "notice-v1"}
    r = post_json(client, "/v1/consent", json.dumps(body).encode(), key=None)
    assert r.status_code == 401, r.text
    assert error_of(r)["field"] == "Authorization"


# -- 413, 415, 405, 404 ------------------------------------------------------------------------
def test_a_request_over_the_batch_limit_is_a_413(client: TestClient[Any]) -> None:
    batch = {"batch": [track(f"big-{i}", properties={"x": "y" * 20_000}) for i in range(30)]}  # ~600 KB
    r = post_json(client, "/v1/batch", json.dumps(batch).encode())
    assert r.status_code == 413, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("too_large", None)


def test_a_message_over_the_message_limit_is_a_413(client: TestClient[Any]) -> None:
    message = {"userId": "u", "event": "e", "properties": {"x": "y" * 40_000}}  # over 32 KB
    r = post_json(client, "/v1/track", json.dumps(message).encode())
    assert r.status_code == 413, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("too_large", None)


def test_a_wrong_content_type_is_a_415_naming_the_header(client: TestClient[Any]) -> None:
    r = client.post(
        "/v1/batch",
        content=b"batch=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(WEB_KEY, ""),
    )
    assert r.status_code == 415, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("unsupported_media_type", "Content-Type")


def test_get_on_the_batch_endpoint_is_a_405(client: TestClient[Any]) -> None:
    r = client.get("/v1/batch", auth=(WEB_KEY, ""))
    assert r.status_code == 405, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("method_not_allowed", None)


@pytest.mark.parametrize("path", ["/v1/purchase", "/nowhere", "/admin/nowhere"])
def test_an_unknown_path_is_a_json_404(client: TestClient[Any], path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("not_found", None)


# -- admin: 401, 403 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-known-token"}, {"Authorization": f"Basic {OPERATOR_TOKEN}"}],
    ids=["no token", "unknown token", "not a bearer token"],
)
def test_admin_without_a_known_token_is_a_401(client: TestClient[Any], headers: dict[str, str]) -> None:
    r = client.get("/admin/consent/verify", headers=headers)
    assert r.status_code == 401, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("unauthorized", None)


@pytest.mark.parametrize(
    ("path", "token", "params"),
    [
        ("/admin/identity/quarantine", COMPLIANCE_TOKEN, {"tenant": "mall"}),  # an operator's endpoint
        ("/admin/consent/records", OPERATOR_TOKEN, {"tenant": "mall", "identifier": "u-1"}),  # compliance's
        (
            "/admin/consent/records",
            "other-compliance-token",
            {"tenant": "mall", "identifier": "u-1"},
        ),  # shop only
    ],
    ids=[
        "compliance on an operator endpoint",
        "operator on a compliance endpoint",
        "token of another tenant",
    ],
)
def test_admin_with_the_wrong_role_or_tenant_is_a_403(
    client: TestClient[Any], path: str, token: str, params: dict[str, str]
) -> None:
    r = client.get(path, headers={"Authorization": f"Bearer {token}"}, params=params)
    assert r.status_code == 403, r.text
    body = error_of(r)
    assert (body["error"], body["field"]) == ("forbidden", None)


def test_the_right_token_passes_the_same_checks(client: TestClient[Any]) -> None:
    """The refusals above come from the checks, not from a broken app: the right role gets in."""
    r = client.get("/admin/consent/verify", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert r.status_code == 200, r.text
    r = client.get(
        "/admin/consent/records",
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
        params={"tenant": "mall", "identifier": "u-1"},
    )
    assert r.status_code == 200, r.text


def test_the_data_dir_is_the_tests_own(client: TestClient[Any]) -> None:
    settings: Settings = client.app.state.gateway.settings
    assert settings.redis_url is None and settings.database_url is None  # embedded: nothing shared
    assert Path(settings.data_dir).is_dir() and "in-process" in str(settings.data_dir)
