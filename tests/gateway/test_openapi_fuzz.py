"""Schemathesis against the OpenAPI document of the embedded gateway, in process.

Every operation of ``/docs/openapi.json`` gets generated requests (valid ones, then invalid
ones), sent to the ASGI app (its lifespan running: SQLite, outbox, file sinks in a temporary
directory) with valid credentials for the operation's security scheme: the tests' dev write
key (HTTP Basic), Sensors token (``token`` in the query) or an admin token with a role the
route accepts. The checks: no 5xx, a documented status code, a documented content type, and
a body that conforms to the documented schema of that status.

Random strings rarely name a configured tenant, purpose or notice, nor make a Sensors
payload (base64 of JSON), so half of the cases are steered: such fields get a valid value,
and ``data``/``data_list`` a generated Sensors event (``steer``). The rest of the request
stays as generated.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.routes import HTTPRoute
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.config import DEFAULT_PURPOSES
from identity.identifiers import IDENTIFIER_TYPES
from tests.conftest import COMPLIANCE_TOKEN, OPERATOR_TOKEN, SHOP_SENSORS_TOKEN, WEB_KEY
from tests.gateway.conftest import in_process_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Examples per operation and generation mode: about 25 operations, well under two minutes.
# A deeper hunt: IDGATE_FUZZ_EXAMPLES=300 make test PYTEST_ARGS=tests/gateway/test_openapi_fuzz.py
EXAMPLES_PER_OPERATION = int(os.environ.get("IDGATE_FUZZ_EXAMPLES", "30"))
ADMIN_TOKENS = {"compliance": COMPLIANCE_TOKEN, "operator": OPERATOR_TOKEN}
TENANTS = ("shop", "mall")
NOTICES = ("notice-v1",)


@pytest.fixture(scope="module")
def gateway_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Litestar]:
    app = in_process_app(tmp_path_factory.mktemp("openapi-fuzz"))
    yield app
    shutdown_lifespans()  # the lifespan that schemathesis' client started for the app


@pytest.fixture(scope="module")
def api_schema(gateway_app: Litestar) -> Any:
    return schemathesis.openapi.from_asgi("/docs/openapi.json", gateway_app)


def admin_roles(app: Litestar) -> dict[tuple[str, str], tuple[str, ...]]:
    """(METHOD, path) -> the roles the route declares (``gateway.auth.roles``)."""
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                for method in handler.http_methods:
                    out[(method, route.path_format)] = tuple(handler.opt.get("roles", ()))
    return out


def authenticate(case: Case[Any], roles: dict[tuple[str, str], tuple[str, ...]]) -> None:
    """Valid credentials for the operation's security scheme, replacing whatever was generated."""
    requirements = case.operation.definition.raw.get("security", [])
    schemes = {name for requirement in requirements for name in requirement}
    if "WriteKey" in schemes:
        basic = base64.b64encode(f"{WEB_KEY}:".encode()).decode()
        case.headers["Authorization"] = f"Basic {basic}"
    elif "SensorsToken" in schemes:
        case.query = {**(case.query or {}), "token": SHOP_SENSORS_TOKEN}
    elif "AdminToken" in schemes:
        allowed = roles[(case.method.upper(), case.operation.path)]
        case.headers["Authorization"] = f"Bearer {ADMIN_TOKENS[allowed[0]]}"


# -- steering ---------------------------------------------------------------------------------
NAMES = st.from_regex(r"\A[a-zA-Z_$][a-zA-Z0-9_$]{0,12}\Z") | st.text(max_size=8)
IDS = st.text(min_size=1, max_size=24) | st.integers(min_value=-(2**63), max_value=2**63)
SENSORS_EVENTS = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["track", "track_signup", "track_id_bind", "track_id_unbind", "profile_set", "item_set", "x"]
        ),
        "distinct_id": IDS,
    },
    optional={
        "event": NAMES,
        "time": st.integers(min_value=-1, max_value=10**14) | st.floats(allow_nan=False),
        "login_id": IDS,
        "anonymous_id": IDS,
        "original_id": IDS,
        "identities": st.dictionaries(
            st.sampled_from(
                ["$identity_login_id", "$identity_mp_openid", "$identity_mobile", "$identity_idfa"]
            )
            | NAMES,
            IDS,
            max_size=3,
        ),
        "properties": st.dictionaries(
            NAMES,
            st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.lists(st.text(max_size=6)),
            max_size=4,
        ),
        "lib": st.dictionaries(st.sampled_from(["$lib", "$lib_version", "$app_id"]), st.text(max_size=8)),
        "project": st.sampled_from(["shop", "other"]),
        "_track_id": st.integers(),
        "_flush_time": st.integers(min_value=-1, max_value=10**14),
    },
)


@st.composite
def sensors_form(draw: st.DrawFn) -> dict[str, str]:
    """``data=`` (one event or a list) or ``data_list=``, base64 of JSON, gzipped or not."""
    name = draw(st.sampled_from(["data", "data_list"]))
    events: Any = draw(st.lists(SENSORS_EVENTS, min_size=1, max_size=4))
    if name == "data" and len(events) == 1 and draw(st.booleans()):
        events = events[0]
    raw = json.dumps(events).encode()
    zipped = draw(st.booleans())
    value = base64.b64encode(gzip.compress(raw) if zipped else raw).decode()
    return {name: value, "gzip": "1" if zipped else "0"}


def steer(case: Case[Any], data: st.DataObject) -> None:
    """Give some generated fields values the configuration knows (see the module docstring)."""
    if not data.draw(st.booleans(), label="steer"):
        return
    containers: list[dict[str, Any]] = [c for c in (case.query, case.body) if isinstance(c, dict)]
    for container in containers:
        if "tenant" in container:
            container["tenant"] = data.draw(st.sampled_from(TENANTS))
        for key in ("type", "a_type", "b_type"):
            if isinstance(container.get(key), str):
                container[key] = data.draw(st.sampled_from(sorted(IDENTIFIER_TYPES)))
        for key in ("grant", "withdraw", "purposesChanged"):
            if key in container:
                container[key] = data.draw(st.lists(st.sampled_from(sorted(DEFAULT_PURPOSES)), max_size=3))
        if "noticeId" in container:
            container["noticeId"] = data.draw(st.sampled_from(NOTICES))
        for key in ("identifiers", "a", "b"):
            refs = container.get(key)
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, dict) and "type" in ref:
                    ref["type"] = data.draw(st.sampled_from(["user_id", "anonymous_id", "phone", "email"]))
    if case.operation.path in ("/sa", "/sa.gif", "/sa/validate"):
        form = data.draw(sensors_form())
        if case.method.upper() == "GET":
            case.query = {k: v for k, v in (case.query or {}).items() if k not in ("data", "data_list")}
            case.query.update(form)
        elif isinstance(case.body, dict):
            body: dict[str, Any] = {k: v for k, v in case.body.items() if k not in ("data", "data_list")}
            case.body = {**body, **form}


# -- the run ----------------------------------------------------------------------------------
def fuzz(operation: Any, mode: GenerationMode, roles: dict[tuple[str, str], tuple[str, ...]]) -> None:
    """Run the generated cases of one operation; Hypothesis shrinks a failure to its smallest case."""

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Any], data: st.DataObject) -> None:
        steer(case, data)
        authenticate(case, roles)
        case.call_and_validate(checks=CHECKS)

    run()


def has_input(operation: Any) -> bool:
    """Whether there is anything to make invalid (the negative mode needs it)."""
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def test_every_operation_answers_as_documented(api_schema: Any, gateway_app: Litestar) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    roles = admin_roles(gateway_app)
    failures: list[str] = []
    for operation in operations:
        modes = [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if has_input(operation) else [])]
        for mode in modes:
            try:
                fuzz(operation, mode, roles)
            except (Exception, BaseExceptionGroup) as exc:  # run them all, report the failures together
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    assert not failures, "\n\n".join(failures)
