"""The OpenAPI document: the parts Litestar cannot derive from handler signatures.

Litestar documents the controllers (consent, admin, operations) from their signatures and
msgspec structs. This module supplies the rest:

- ``to_openapi_schema`` converts the JSON Schema that msgspec generates for a struct into
  Litestar's ``openapi.spec`` objects, keeping ``$ref``s, and ``register_structs`` registers
  the results as components. The raw ASGI ingest handlers (``gateway.ingest_http``,
  ``gateway.sensors_http``) use it to document the structs they decode and encode.
- ``IngestResponse`` is the ingest answer, as a struct the document can show.
- ``error_responses`` declares a controller's error statuses with the ``ErrorBody`` schema
  (replacing Litestar's default 400 schema, which is not what the error handlers send);
  ``error_response`` does the same for the hand-written ingest operations.
- ``limits_text`` puts the running configuration's size limits into descriptions.
- ``finish_document`` applies the rules that hold for every operation: each error answer
  is an ``ErrorBody``, each 503 carries ``Retry-After``.
- ``openapi_config`` and ``docs_assets_routers``: the security schemes, and Swagger UI and
  ReDoc pages whose scripts and styles the gateway serves itself (no CDN: the docs work
  offline). Swagger UI comes from the ``swagger-ui-bundle-v2`` package, ReDoc is vendored
  under ``gateway/static/vendor/redoc`` (see its README).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Router
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, RedocRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    Discriminator,
    OpenAPI,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityScheme,
)
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

from gateway.config import Limits
from gateway.errors import ErrorBody
from gateway.events import Rejection

REF_TEMPLATE = "#/components/schemas/{name}"
JSON = "application/json"

# -- msgspec JSON Schema -> Litestar spec objects ----------------------------------------------
_SchemaNode = Schema | Reference


def _schema(value: Any) -> _SchemaNode:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a schema object, got {value!r}")
    return to_openapi_schema(value)


def _schemas(value: Any) -> list[_SchemaNode]:
    return [_schema(v) for v in value]


def _schema_map(value: Any) -> dict[str, _SchemaNode]:
    return {k: _schema(v) for k, v in value.items()}


def _schema_or_bool(value: Any) -> _SchemaNode | bool:
    return value if isinstance(value, bool) else _schema(value)


def _type(value: Any) -> OpenAPIType | list[OpenAPIType]:
    return [OpenAPIType(v) for v in value] if isinstance(value, list) else OpenAPIType(value)


def _discriminator(value: Any) -> Discriminator:
    return Discriminator(
        property_name=value["propertyName"], mapping=dict(value.get("mapping") or {}) or None
    )


def _same(value: Any) -> Any:
    return value


# JSON Schema keyword -> (attribute of litestar's Schema, how to convert the value). A keyword
# that is not here is refused, so a new msgspec keyword cannot vanish from the document unseen.
_KEYWORDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "title": ("title", _same),
    "description": ("description", _same),
    "type": ("type", _type),
    "format": ("format", OpenAPIFormat),
    "enum": ("enum", list),
    "const": ("const", _same),
    "default": ("default", _same),
    "examples": ("examples", list),
    "properties": ("properties", _schema_map),
    "patternProperties": ("pattern_properties", _schema_map),
    "additionalProperties": ("additional_properties", _schema_or_bool),
    "required": ("required", list),
    "minProperties": ("min_properties", _same),
    "maxProperties": ("max_properties", _same),
    "items": ("items", _schema),
    "prefixItems": ("prefix_items", _schemas),
    "minItems": ("min_items", _same),
    "maxItems": ("max_items", _same),
    "uniqueItems": ("unique_items", _same),
    "anyOf": ("any_of", _schemas),
    "oneOf": ("one_of", _schemas),
    "allOf": ("all_of", _schemas),
    "not": ("schema_not", _schema),
    "discriminator": ("discriminator", _discriminator),
    "minLength": ("min_length", _same),
    "maxLength": ("max_length", _same),
    "pattern": ("pattern", _same),
    "minimum": ("minimum", _same),
    "maximum": ("maximum", _same),
    "exclusiveMinimum": ("exclusive_minimum", _same),
    "exclusiveMaximum": ("exclusive_maximum", _same),
    "multipleOf": ("multiple_of", _same),
    "contentEncoding": ("content_encoding", _same),
    "contentMediaType": ("content_media_type", _same),
    "contentSchema": ("content_schema", _schema),
}


def to_openapi_schema(schema: Mapping[str, Any]) -> Schema | Reference:
    """One JSON Schema object (as ``msgspec.json.schema_components`` writes it) as Litestar's
    ``Schema``, or a ``Reference`` for ``{"$ref": ...}``; nested schemas are converted too.

    ``Schema.to_schema()`` gives the same JSON back, except ``"default": null``: Litestar's
    spec objects drop null values (a property outside ``required`` is optional all the same).
    Raises ValueError for a keyword it does not know."""
    if "$ref" in schema:
        if set(schema) - {"$ref", "description"}:
            raise ValueError(f"a $ref with sibling keywords is not supported: {sorted(schema)}")
        return Reference(ref=schema["$ref"], description=schema.get("description"))
    kwargs: dict[str, Any] = {}
    for keyword, value in schema.items():
        try:
            attribute, convert = _KEYWORDS[keyword]
        except KeyError:
            raise ValueError(f"JSON Schema keyword {keyword!r} is not supported") from None
        kwargs[attribute] = convert(value)
    return Schema(**kwargs)


def struct_components(
    types: Iterable[Any],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """msgspec's JSON Schema for ``types``: one schema per type (mostly ``$ref``s) and the
    components they reference, with references in OpenAPI's form."""
    refs, components = msgspec.json.schema_components(list(types), ref_template=REF_TEMPLATE)
    return list(refs), dict(components)


def register_components(openapi: OpenAPI, components: Mapping[str, Mapping[str, Any]]) -> None:
    """Add JSON Schema components to the document. A component of the same name that Litestar
    generated from the same struct (same properties) is kept as it is; a different one with
    that name is an error (two types would share one ``$ref``)."""
    if openapi.components is None:
        openapi.components = Components()
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    schemas = openapi.components.schemas
    for name, component in components.items():
        existing = schemas.get(name)
        if existing is not None:
            if set(existing.properties or {}) != set(component.get("properties") or {}):
                raise ValueError(f"two different types are both named {name!r} in the OpenAPI document")
            continue
        converted = to_openapi_schema(component)
        if not isinstance(converted, Schema):
            raise ValueError(f"component {name!r} is only a reference")
        schemas[name] = converted


def register_structs(openapi: OpenAPI, *types: Any) -> list[Schema | Reference]:
    """Register the msgspec types (and everything they reference) as components; returns the
    schema of each type, usually a ``Reference`` to its component."""
    refs, components = struct_components(types)
    register_components(openapi, components)
    return [to_openapi_schema(r) for r in refs]


def ref(name: str) -> Reference:
    return Reference(ref=REF_TEMPLATE.format(name=name))


# -- the ingest answer -------------------------------------------------------------------------
class IngestResponse(msgspec.Struct, rename="camel", omit_defaults=True):
    """What an ingest request did with its messages. It is sent once every accepted message is
    stored durably; rejected messages are listed with the reason, the others went on."""

    success: Annotated[
        bool, msgspec.Meta(description="true when a message was accepted or none was rejected")
    ]
    received: Annotated[int, msgspec.Meta(ge=0, description="messages in the request")]
    accepted: Annotated[int, msgspec.Meta(ge=0, description="messages stored durably")]
    duplicates: Annotated[
        int, msgspec.Meta(ge=0, description="messages whose messageId was already stored (nothing redone)")
    ]
    rejected: Annotated[
        list[Rejection], msgspec.Meta(description="the messages not accepted, by index, with the reason")
    ]
    dropped: Annotated[
        dict[str, int],
        msgspec.Meta(description="messages accepted but stored for no destination, counted by reason"),
    ]
    in_flight: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="messages whose messageId another request is storing right now (then the "
            "answer is a 503: retry them); absent when 0",
        ),
    ] = 0


# -- limits and errors -------------------------------------------------------------------------
def limits_text(limits: Limits) -> str:
    """The size limits of the running configuration, for operation descriptions."""
    return (
        f"Limits of this gateway: a message up to {limits.max_message_bytes} bytes; a request "
        f"body up to {limits.max_batch_bytes} bytes (also after gunzip); a batch of up to "
        f"{limits.max_batch_messages} messages."
    )


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid input: `error` says what is wrong and `field` names the field, parameter or header",
    401: "Missing or unknown credentials",
    403: "The token's role or tenant scope does not allow this",
    404: "Nothing at this path",
    413: "The request body is too large",
    415: "Unsupported Content-Type or Content-Encoding",
    429: "Rate limited: too many requests from this source, address or person; retry later",
    503: "Overloaded or unavailable: nothing was acknowledged; retry after `Retry-After` seconds",
}

RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
    description="Seconds to wait before retrying",
    required=True,
)


def error_responses(*statuses: int, described: Mapping[int, str] | None = None) -> dict[int, ResponseSpec]:
    """A controller's error statuses (``responses=`` of a route decorator), each with the
    ``ErrorBody`` schema; ``described`` replaces the default description of a status."""
    texts = {**ERROR_DESCRIPTIONS, **(described or {})}
    return {
        status: ResponseSpec(data_container=ErrorBody, description=texts[status], generate_examples=False)
        for status in statuses
    }


def error_response(status: int, description: str | None = None) -> OpenAPIResponse:
    """One error answer of a hand-written operation: ``ErrorBody`` (and ``Retry-After`` for 503)."""
    return OpenAPIResponse(
        description=description or ERROR_DESCRIPTIONS[status],
        content={JSON: OpenAPIMediaType(schema=ref("ErrorBody"))},
        headers={"Retry-After": RETRY_AFTER} if status == 503 else None,
    )


def answered_also_as(*media_types: str) -> type[Operation]:
    """An ``operation_class`` for a route whose success answer comes in more media types than
    the ``media_type`` Litestar documents (e.g. JSONL or CSV, by a query parameter)."""

    @dataclass
    class AlsoAnsweredAs(Operation):
        def __post_init__(self) -> None:
            for status, response in (self.responses or {}).items():
                if status.startswith("2") and isinstance(response, OpenAPIResponse) and response.content:
                    schema = next(iter(response.content.values())).schema
                    for media_type in media_types:
                        response.content.setdefault(media_type, OpenAPIMediaType(schema=schema))

    return AlsoAnsweredAs


def _refers_to_error_body(response: OpenAPIResponse) -> bool:
    return any(
        isinstance(media.schema, Reference) and media.schema.ref == REF_TEMPLATE.format(name="ErrorBody")
        for media in (response.content or {}).values()
    )


def operations(openapi: OpenAPI) -> Sequence[tuple[str, str, Any]]:
    """(path, method, Operation) of every operation in the document."""
    out = []
    for path, item in (openapi.paths or {}).items():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation = getattr(item, method, None)
            if operation is not None:
                out.append((path, method, operation))
    return out


def finish_document(openapi: OpenAPI) -> None:
    """Rules for every operation: ``ErrorBody`` is a component (whatever declared it), and every
    503 answered with an ``ErrorBody`` documents its ``Retry-After`` header."""
    register_structs(openapi, ErrorBody)
    for _, _, operation in operations(openapi):
        for status, response in (operation.responses or {}).items():
            if status == "503" and isinstance(response, OpenAPIResponse) and _refers_to_error_body(response):
                response.headers = {**(response.headers or {}), "Retry-After": RETRY_AFTER}


# -- the document's configuration and its pages ----------------------------------------------
DOCS_PATH = "/docs"
ASSETS_PATH = "/static/vendor"
SWAGGER_UI_ASSETS = f"{ASSETS_PATH}/swagger-ui"
REDOC_ASSETS = f"{ASSETS_PATH}/redoc"
REDOC_DIRECTORY = Path(__file__).with_name("static") / "vendor" / "redoc"
FAVICON = f"<link rel='icon' type='image/png' href='{SWAGGER_UI_ASSETS}/favicon-32x32.png'>"

SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    "WriteKey": SecurityScheme(
        type="http",
        scheme="basic",
        description="A source's write key as the HTTP Basic user (empty password); "
        "the ingest endpoints also take it as `writeKey` in the body",
    ),
    "SensorsToken": SecurityScheme(
        type="apiKey",
        name="token",
        security_scheme_in="query",
        description="A source's Sensors token in the server URL (`/sa?project=...&token=...`), "
        "as Sensors SDKs send it; the form may carry it too",
    ),
    "AdminToken": SecurityScheme(
        type="http",
        scheme="bearer",
        description="An admin token (role compliance or operator, optionally scoped to tenants)",
    ),
}


def _version() -> str:
    try:
        return version("idgate")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def openapi_config() -> OpenAPIConfig:
    """The document's metadata and security schemes; Swagger UI at ``/docs`` (and
    ``/docs/swagger``), ReDoc at ``/docs/redoc``, the JSON at ``/docs/openapi.json``."""
    return OpenAPIConfig(
        title="idgate",
        version=_version(),
        description="Privacy-compliant identity resolution and consent gateway",
        path=DOCS_PATH,
        render_plugins=[
            SwaggerRenderPlugin(
                js_url=f"{SWAGGER_UI_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{SWAGGER_UI_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{SWAGGER_UI_ASSETS}/swagger-ui-standalone-preset.js",
                favicon=FAVICON,
            ),
            RedocRenderPlugin(
                js_url=f"{REDOC_ASSETS}/redoc.standalone.js", google_fonts=False, favicon=FAVICON
            ),
            JsonRenderPlugin(),
        ],
        use_handler_docstrings=True,
        components=Components(security_schemes=SECURITY_SCHEMES),
    )


def docs_assets_routers() -> list[Router]:
    """The scripts, styles and icon of the docs pages, served by the gateway itself."""
    return [
        create_static_files_router(
            path=SWAGGER_UI_ASSETS, directories=[Path(str(swagger_ui_path))], name="swagger_ui_assets"
        ),
        create_static_files_router(path=REDOC_ASSETS, directories=[REDOC_DIRECTORY], name="redoc_assets"),
    ]
