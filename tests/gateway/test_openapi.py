"""The OpenAPI document, in process: every route is in it with request and response schemas,
its security scheme and its error answers (``ErrorBody``); it is built from the running
configuration (limits); the msgspec -> OpenAPI converter keeps schemas and ``$ref``s; the
Swagger UI and ReDoc pages load nothing from outside the gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.openapi.spec import Reference, Schema
from litestar.routes import ASGIRoute, HTTPRoute
from litestar.testing import TestClient

from consent.audit import LedgerEntry
from gateway.admin.schemas import EraseRequest, NoticeRequest
from gateway.config import Limits
from gateway.consent_api import ConsentRequest
from gateway.errors import ErrorBody
from gateway.events import Rejection
from gateway.ingest_http import ingest_response
from gateway.openapi import (
    IngestResponse,
    register_components,
    register_structs,
    struct_components,
    to_openapi_schema,
)
from gateway.pipeline import IngestResult
from gateway.segment import BatchEnvelope, SegmentMessage
from gateway.sensors import SensorsEvent
from tests.conftest import COMPLIANCE_TOKEN, TEST_CONFIG
from tests.gateway.conftest import in_process_app

# Routes that are deliberately not in the document, and why.
NOT_IN_DOCUMENT = {"/metrics": "Prometheus' text format, read by scrapers, not API clients"}
# The document's own pages and their scripts and styles; the compliance console's HTML pages
# (a browser's, not an API client's: tests/console covers every one of them).
DOCS_PATHS = ("/docs", "/static/vendor/", "/console", "/static/console")
# Error answers that are not an ErrorBody, and why: (path, method, status).
NOT_ERROR_BODIES = {("/readyz", "get", "503"): "a Readiness, for load balancers, like its 200"}
# The security scheme each group of operations uses (by path prefix; None: public).
SECURITY = [
    ("/v1/consent", "WriteKey"),
    ("/v1/", "WriteKey"),
    ("/sa", "SensorsToken"),
    ("/admin/", "AdminToken"),
]
PUBLIC = ("/healthz", "/readyz")
METHODS = ("get", "put", "post", "delete", "patch")
ERROR_BODY = "#/components/schemas/ErrorBody"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    app = in_process_app(tmp_path_factory.mktemp("openapi"))
    with TestClient(app=app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def document(client: TestClient[Litestar]) -> dict[str, Any]:
    r = client.get("/docs/openapi.json")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def is_bare(document: dict[str, Any], schema: dict[str, Any] | None) -> bool:
    """No schema, or one that says nothing but "an object" (what the ingest routes had)."""
    if not schema:
        return True
    return set(resolve(document, schema)) <= {"type", "title", "description"} and schema.get("type") in (
        "object",
        None,
    )


def refers_to(schema: dict[str, Any], ref: str) -> bool:
    return schema.get("$ref") == ref or any(s.get("$ref") == ref for s in schema.get("anyOf", []))


# -- completeness -----------------------------------------------------------------------------
def test_every_route_is_in_the_document(client: TestClient[Litestar], document: dict[str, Any]) -> None:
    documented = {(path, method) for path, method, _ in operations(document)}
    missing, hidden = [], []
    for route in client.app.routes:
        path = route.path_format
        if path.startswith(DOCS_PATHS):
            continue
        if isinstance(route, ASGIRoute):  # raw ASGI: documented by hand, by path
            if not any(p == path for p, _ in documented):
                missing.append(f"{path} (ASGI)")
            continue
        assert isinstance(route, HTTPRoute), route
        for handler in route.route_handlers:
            for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                if not handler.resolve_include_in_schema():
                    if path not in NOT_IN_DOCUMENT:
                        hidden.append(f"{method} {path}")
                elif (path, method.lower()) not in documented:
                    missing.append(f"{method} {path}")
    assert not missing, f"routes missing from the document: {missing}"
    assert not hidden, f"routes left out of the document without a reason in NOT_IN_DOCUMENT: {hidden}"
    assert set(NOT_IN_DOCUMENT).isdisjoint(document["paths"])


def test_the_ingest_routes_have_every_method_they_answer(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for name in ("batch", "track", "identify", "page", "screen", "group", "alias"):
        # and the short path analytics.js posts to (/v1/b, /v1/t...); OPTIONS: CORS preflight
        assert set(paths[f"/v1/{name}"]) == set(paths[f"/v1/{name[0]}"]) == {"post", "options"}
    for path in ("/sa", "/sa.gif"):
        assert set(paths[path]) == {"get", "post"}
    assert set(paths["/v1/consent"]) == {"post", "options"}


def test_every_body_has_a_schema(document: dict[str, Any]) -> None:
    bare = []
    for path, method, operation in operations(document):
        body = operation.get("requestBody")
        if method in ("post", "put", "patch"):
            assert body is not None, f"{method.upper()} {path} has no requestBody"
        for media_type, content in (body or {}).get("content", {}).items():
            schema = content.get("schema")
            if is_bare(document, schema) and not (
                media_type == "text/plain" and schema == _form_text(schema)
            ):
                bare.append(f"{method.upper()} {path} {media_type}: {schema}")
    assert not bare, bare


def _form_text(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Sensors form sent as text/plain is a string (described), which is its whole schema."""
    return schema if schema and schema.get("type") == "string" and schema.get("description") else None


def test_every_operation_has_a_success_schema(document: dict[str, Any]) -> None:
    without = []
    for path, method, operation in operations(document):
        success = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
        assert success, f"{method.upper()} {path} documents no 2xx answer"
        for status, response in success.items():
            content = response.get("content") or {}
            if not content or any(is_bare(document, c.get("schema")) for c in content.values()):
                without.append(f"{method.upper()} {path} {status}")
    assert not without, without


def test_every_error_answer_is_an_error_body(document: dict[str, Any]) -> None:
    others = []
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or (path, method, status) in NOT_ERROR_BODIES:
                continue
            content = response.get("content") or {}
            if set(content) != {"application/json"} or not refers_to(
                content["application/json"]["schema"], ERROR_BODY
            ):
                others.append(f"{method.upper()} {path} {status}: {content}")
    assert not others, others
    assert set(resolve(document, {"$ref": ERROR_BODY})["required"]) == {"error", "detail"}


def test_error_statuses_where_they_apply(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        statuses = {int(s) for s in operation["responses"]}
        label = f"{method.upper()} {path}"
        has_input = bool(operation.get("parameters") or operation.get("requestBody"))
        if path.startswith("/v1/") and path != "/v1/consent" or path.startswith("/sa"):
            assert {400, 401, 413, 415, 429, 503} <= statuses, label
        elif path == "/v1/consent":
            assert {400, 401, 413, 429, 503} <= statuses, label
        elif path.startswith("/admin/"):
            assert {401, 403, 503} <= statuses, label
            assert (400 in statuses) == has_input, label
            assert (413 in statuses) == ("requestBody" in operation), label
        if "{" in path:  # a path parameter can name something that is not there
            assert 404 in statuses, label


def test_every_503_documents_retry_after(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        response = operation["responses"].get("503")
        if response is not None and (path, method, "503") not in NOT_ERROR_BODIES:
            header = response["headers"]["Retry-After"]
            assert header["required"] is True and header["schema"]["type"] == "integer", (path, method)


def test_each_operation_names_its_security_scheme(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["WriteKey"] == {**schemes["WriteKey"], "type": "http", "scheme": "basic"}
    assert schemes["AdminToken"] == {**schemes["AdminToken"], "type": "http", "scheme": "bearer"}
    assert schemes["SensorsToken"] == {
        **schemes["SensorsToken"],
        "type": "apiKey",
        "in": "query",
        "name": "token",
    }
    for path, method, operation in operations(document):
        expected = next((scheme for prefix, scheme in SECURITY if path.startswith(prefix)), None)
        if expected is None:
            assert path in PUBLIC and "security" not in operation, (path, method)
        else:
            assert operation.get("security") == [{expected: []}], (path, method)


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = set(re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(document)))
    assert refs, "the document uses components"
    names = set(document["components"]["schemas"])
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= names
    assert all(ref.startswith("#/components/schemas/") for ref in refs)


def test_query_parameter_bounds_are_documented(document: dict[str, Any]) -> None:
    def parameter(path: str, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            p for p in document["paths"][path]["get"]["parameters"] if p["name"] == name
        ]
        assert len(found) == 1, (path, name)
        return found[0]

    for path in ("/admin/consent/records", "/admin/access-log", "/admin/identity/quarantine"):
        schema = parameter(path, "limit")["schema"]
        assert (schema["minimum"], schema["maximum"]) == (1, 5000), path
    assert parameter("/admin/consent/records", "after_seq")["schema"]["maximum"] == 2**63 - 1
    assert parameter("/admin/consent/records", "since")["schema"]["format"] == "date-time"


# -- the ingest schemas come from the structs ------------------------------------------------
def test_the_segment_schemas_are_the_structs_the_adapter_decodes(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    batch = schemas["BatchEnvelope"]["properties"]["batch"]
    assert batch["items"]["discriminator"]["propertyName"] == "type"
    assert batch["items"]["discriminator"]["mapping"] == {
        t: f"#/components/schemas/{t.capitalize()}"
        for t in ("track", "identify", "page", "screen", "group", "alias")
    }
    assert schemas["Track"]["required"] == ["type", "event"]
    assert schemas["Track"]["properties"]["type"] == {"enum": ["track"]}
    assert "type" not in schemas["TrackCall"]["properties"] and schemas["TrackCall"]["required"] == ["event"]
    assert schemas["AliasCall"]["required"] == ["previousId"]
    assert schemas["Track"]["properties"]["timestamp"]["anyOf"][0] == {
        "type": "string",
        "format": "date-time",
    }
    track = document["paths"]["/v1/track"]["post"]
    assert track["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TrackCall"
    }
    answer = track["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/IngestResponse"}
    assert schemas["IngestResponse"]["properties"]["rejected"]["items"] == {
        "$ref": "#/components/schemas/Rejection"
    }


def test_the_sensors_form_fields_are_documented(document: dict[str, Any]) -> None:
    post = document["paths"]["/sa"]["post"]
    form = post["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert {"data", "data_list", "gzip"} <= set(form["properties"])
    assert form["properties"]["data_list"]["contentSchema"]["items"] == {
        "$ref": "#/components/schemas/SensorsEvent"
    }
    get = document["paths"]["/sa.gif"]["get"]
    assert {"data", "data_list", "gzip", "project"} <= {p["name"] for p in get["parameters"]}
    assert set(get["responses"]["200"]["content"]) == {"image/gif"}
    assert "_track_id" in document["components"]["schemas"]["SensorsEvent"]["properties"]


# -- built from the configuration ------------------------------------------------------------
def test_the_limits_are_those_of_the_running_configuration(tmp_path: Path) -> None:
    limits = Limits(max_message_bytes=20_001, max_batch_bytes=300_002, max_batch_messages=777)
    config = TEST_CONFIG.replace(
        "max_message_bytes = 32768\nmax_batch_bytes = 512000\n",
        f"max_message_bytes = {limits.max_message_bytes}\nmax_batch_bytes = {limits.max_batch_bytes}\n"
        f"max_batch_messages = {limits.max_batch_messages}\n",
    )
    assert config != TEST_CONFIG
    document = in_process_app(tmp_path, config).openapi_schema.to_schema()  # no request, no lifespan
    paths = document["paths"]
    for path, method in [
        ("/v1/batch", "post"),
        ("/v1/track", "post"),
        ("/sa", "post"),
        ("/v1/consent", "post"),
    ]:
        description = paths[path][method]["description"]
        for value in (limits.max_message_bytes, limits.max_batch_bytes, limits.max_batch_messages):
            assert str(value) in description, (path, value, description)
    assert str(limits.max_message_bytes) in paths["/v1/track"]["post"]["responses"]["413"]["description"]
    assert str(limits.max_batch_bytes) in paths["/v1/batch"]["post"]["responses"]["413"]["description"]
    batch = document["components"]["schemas"]["BatchEnvelope"]["properties"]["batch"]
    assert (batch["minItems"], batch["maxItems"]) == (1, limits.max_batch_messages)
    form = paths["/sa"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert form["properties"]["data_list"]["contentSchema"]["maxItems"] == limits.max_batch_messages


# -- the converter ---------------------------------------------------------------------------
def without_null_defaults(value: Any) -> Any:
    """What Litestar's spec objects give back: null values (``"default": null``) left out."""
    if isinstance(value, dict):
        return {k: without_null_defaults(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_null_defaults(v) for v in value]
    return value


@pytest.mark.parametrize(
    "types",
    [
        [BatchEnvelope, SegmentMessage],
        [IngestResponse, ErrorBody],
        [SensorsEvent],
        [ConsentRequest, NoticeRequest, EraseRequest, LedgerEntry],
    ],
    ids=["segment", "ingest answer", "sensors", "consent and admin"],
)
def test_msgspec_schemas_convert_without_loss(types: list[Any]) -> None:
    refs, components = struct_components(types)
    for schema in [*refs, *components.values()]:
        assert to_openapi_schema(schema).to_schema() == without_null_defaults(schema)
    assert all(isinstance(to_openapi_schema(r), Reference) for r in refs if "$ref" in r)


def test_every_keyword_the_converter_knows_round_trips() -> None:
    schema = {
        "title": "T",
        "description": "d",
        "type": ["object", "null"],
        "properties": {
            "a": {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^a", "format": "date-time"},
            "b": {
                "type": "integer",
                "minimum": 0,
                "maximum": 9,
                "exclusiveMinimum": -1,
                "exclusiveMaximum": 10,
            },
            "c": {"type": "number", "multipleOf": 0.5},
            "d": {"type": "array", "items": {"$ref": "#/components/schemas/X"}, "minItems": 1, "maxItems": 2},
            "e": {"type": "array", "prefixItems": [{"const": 1}], "uniqueItems": True},
            "f": {"anyOf": [{"$ref": "#/components/schemas/X"}, {"type": "null"}], "default": 3},
            "g": {"oneOf": [{"enum": ["x", "y"]}], "examples": ["x"]},
            "h": {"allOf": [{"type": "object"}], "not": {"type": "null"}},
            "i": {"type": "string", "contentEncoding": "base64", "contentMediaType": "application/json"},
            "j": {"type": "string", "contentSchema": {"type": "array"}},
        },
        "patternProperties": {"^x-": {}},
        "additionalProperties": False,
        "required": ["a"],
        "minProperties": 1,
        "maxProperties": 9,
        "discriminator": {"propertyName": "type", "mapping": {"x": "#/components/schemas/X"}},
    }
    assert to_openapi_schema(schema).to_schema() == schema
    converted = to_openapi_schema({"additionalProperties": {"$ref": "#/components/schemas/X"}})
    assert isinstance(converted, Schema) and isinstance(converted.additional_properties, Reference)


@pytest.mark.parametrize(
    "schema",
    [{"$defs": {}}, {"if": {"type": "string"}}, {"$ref": "#/components/schemas/X", "type": "object"}],
    ids=["$defs", "unknown keyword", "$ref with siblings"],
)
def test_the_converter_refuses_what_it_would_lose(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        to_openapi_schema(schema)


def test_registering_keeps_one_schema_per_name(client: TestClient[Litestar]) -> None:
    openapi = client.app.openapi_schema
    assert openapi.components is not None and openapi.components.schemas is not None
    before = openapi.components.schemas["ErrorBody"]
    assert register_structs(openapi, ErrorBody)[0] == Reference(ref=ERROR_BODY)
    assert openapi.components.schemas["ErrorBody"] is before  # the same struct: kept as it is
    with pytest.raises(ValueError, match="ErrorBody"):
        register_components(openapi, {"ErrorBody": {"type": "object", "properties": {"other": {}}}})


# -- the answers match their schemas ---------------------------------------------------------
def test_ingest_response_is_the_ingest_answer() -> None:
    result = IngestResult(received=4, accepted=1, duplicates=1, in_flight=1)
    result.rejected.append(
        Rejection(2, "invalid_field", "event must be a non-empty string", "batch[2].event", "m-2")
    )
    result.rejected.append(Rejection(3, "invalid_json", "malformed JSON"))
    result.dropped["no_consent"] += 1
    body = json.loads(msgspec.json.encode(result.body()))
    typed = msgspec.convert(body, IngestResponse)
    assert json.loads(msgspec.json.encode(typed)) == body
    assert typed.in_flight == 1 and typed.rejected[1].field is None
    without_in_flight = json.loads(msgspec.json.encode(IngestResult(received=1, accepted=1).body()))
    assert "inFlight" not in without_in_flight
    assert (
        json.loads(msgspec.json.encode(msgspec.convert(without_in_flight, IngestResponse)))
        == without_in_flight
    )


def test_an_in_flight_answer_is_an_error_body_with_the_counts() -> None:
    status, raw, headers = ingest_response(IngestResult(received=2, accepted=1, in_flight=1))
    body = json.loads(raw)
    assert status == 503 and (b"retry-after", b"5") in headers
    assert body["error"] == "in_flight" and body["detail"] and body["field"] is None
    assert body["inFlight"] == 1 and body["accepted"] == 1
    msgspec.convert(body, ErrorBody)
    msgspec.convert(body, IngestResponse)


# -- the pages load nothing from outside -----------------------------------------------------
class AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value is not None:
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/docs", "/docs/swagger", "/docs/redoc"])
def test_the_docs_pages_load_their_assets_from_the_gateway(client: TestClient[Litestar], page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
    links = AssetLinks()
    links.feed(r.text)
    assert len(links.urls) >= 2, links.urls  # a script and the favicon at least
    for url in links.urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text), f"{page} names an external asset"


def test_the_bundled_assets_are_what_the_pages_need(client: TestClient[Litestar]) -> None:
    swagger = client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert swagger.status_code == 200 and "SwaggerUIBundle" in swagger.text[:200_000]
    redoc = client.get("/static/vendor/redoc/redoc.standalone.js")
    assert redoc.status_code == 200 and "Redoc" in redoc.text[:1000]
    assert client.get("/static/vendor/redoc/LICENSE").status_code == 200


# -- what schemathesis found (tests/gateway/test_openapi_fuzz.py), fixed -----------------------
@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/admin/consent/records", {"after_seq": str(2**64)}, "after_seq"),
        ("/admin/consent/records", {"until": "9999-12-31T23:59:59-14:00"}, "until"),
        ("/admin/consent/records", {"since": "0001-01-01T00:00:00+14:00"}, "since"),
        ("/admin/consent/subject", {"identifier": "u-1", "at": "9999-12-31T23:59:59-14:00"}, "at"),
    ],
    ids=["sequence number over 64 bits", "until after 9999 in UTC", "since before year 1 in UTC", "at"],
)
def test_admin_parameters_out_of_range_are_a_400(
    client: TestClient[Litestar], path: str, params: dict[str, str], field: str
) -> None:
    headers = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    r = client.get(path, params={"tenant": "mall", **params}, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
