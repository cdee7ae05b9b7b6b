"""Launch checks over HTTP: ``POST /v1/validate`` (a Segment batch) and ``POST /sa/validate``
(a Sensors form) answer what the tenant's tracking plan would do to each event, under the
source's validation modes, and store and forward nothing (issue 14).

Same body, authentication, origin check and rate limits as ``/v1/batch`` and ``/sa``. The events are
decoded and pseudonymised in memory exactly as ingest does (the ``identifier`` rule looks at
what the scrubber pseudonymised or redacted), then judged by ``gateway.plan.judge``; no
pipeline stage with a side effect runs: no dedupe claim, no consent record or decision, no
identity link, no outbox append, no violation record, no plan metric. An identity assertion
is taken out of the event and not checked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from litestar import asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.openapi.spec import OpenAPI, OpenAPIResponse, Operation, PathItem, RequestBody
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.types import HTTPScope, Receive, Send

from gateway.config import Limits, ResolvedSource
from gateway.cors import check_origin
from gateway.events import Envelope, Rejection, RejectMessage
from gateway.ingest_http import (
    IngestContext,
    IngestHeaders,
    answering_rate_limits,
    authenticate,
    read_body,
    send_json,
)
from gateway.openapi import JSON, error_response, limits_text, ref, register_components, struct_components
from gateway.pipeline import pseudonymise_identifiers, take_assertion
from gateway.plan import Violation, judge, lookup_key, plan_for, policy_for
from gateway.segment import decode_batch
from gateway.sensors_http import name_sensors_fields, read_sensors_request, sensors_form, sensors_form_body
from identity.pseudonym import MESSAGE_ID, KeyRing

ValidationAction = Literal["deliver", "flag", "omit", "block"]


class ValidatedEvent(msgspec.Struct, rename="camel", omit_defaults=True):
    """What the plan would do to one event."""

    index: Annotated[int, msgspec.Meta(description="the message's position in the batch")]
    action: Annotated[
        ValidationAction,
        msgspec.Meta(
            description="deliver (fits, not checked, or an unplanned event the source allows), flag "
            "(delivered with context.idgate.violations), omit (delivered without the properties in "
            "`omitted`), block (kept as a violation record, not delivered). Consent and dedupe are "
            "not asked: deliver says the plan lets the event through"
        ),
    ]
    event: Annotated[
        str | None,
        msgspec.Meta(
            description="the plan event, or `unplanned`; absent: a call or name the plan does not check"
        ),
    ] = None
    message_id: str | None = None
    violations: list[Violation] = []
    omitted: Annotated[list[str], msgspec.Meta(description="the properties omit would remove")] = []


class ValidationResponse(msgspec.Struct, rename="camel"):
    """The plan's verdict on each message; nothing was stored or forwarded."""

    received: int
    plan: Annotated[str | None, msgspec.Meta(description="the tenant's plan; null: it has none")]
    plan_version: int | None
    valid: Annotated[int, msgspec.Meta(description="messages the plan would deliver unchanged")]
    results: list[ValidatedEvent]
    rejected: Annotated[
        list[Rejection], msgspec.Meta(description="messages ingest would reject before the plan")
    ]


_encode = msgspec.json.Encoder().encode


def validate_events(
    src: ResolvedSource, envs: list[Envelope], rejected: list[Rejection], received: int, keyring: KeyRing
) -> ValidationResponse:
    """The plan's verdicts on decoded events, in memory only."""
    tenant = src.tenant
    plan = plan_for(tenant)
    policy = policy_for(tenant, src.source)
    pseudonymiser = keyring.pseudonymiser(tenant.id)
    message_ids = keyring.anchor(tenant.id).internal(MESSAGE_ID)
    results: list[ValidatedEvent] = []
    rejected = list(rejected)
    valid = 0
    for env in envs:
        take_assertion(env)
        try:
            pseudonymise_identifiers(env, tenant, pseudonymiser, message_ids=message_ids)
        except RejectMessage as exc:
            rejected.append(Rejection(env.index, exc.error, exc.detail, exc.field, env.event.message_id))
            continue
        ev = env.event
        key = lookup_key(ev.type, ev.event, ev.name)
        if plan is None or key is None:
            results.append(ValidatedEvent(env.index, "deliver", message_id=ev.message_id))
            valid += 1
            continue
        verdict = judge(plan, key, ev.properties, env.pseudonyms, policy)
        if verdict.action == "pass":
            valid += 1
        results.append(
            ValidatedEvent(
                env.index,
                "deliver" if verdict.action == "pass" else verdict.action,
                verdict.event or None,
                ev.message_id,
                verdict.violations,
                list(verdict.omit),
            )
        )
    rejected.sort(key=lambda r: r.index)
    return ValidationResponse(
        received=received,
        plan=plan.name if plan is not None else None,
        plan_version=plan.version if plan is not None else None,
        valid=valid,
        results=results,
        rejected=rejected,
    )


VALIDATE_PATH = "/v1/validate"


async def _validate(scope: HTTPScope, receive: Receive, send: Send) -> None:
    if scope["method"] != "POST":
        raise MethodNotAllowedException(detail=f"{VALIDATE_PATH} accepts POST")
    ctx: IngestContext = scope["app"].state.ingest
    headers = IngestHeaders.from_scope(scope)
    body = await read_body(receive, headers, ctx.config.limits.max_batch_bytes)
    src = authenticate(ctx, headers, body)
    check_origin(scope, src)
    ctx.refuse_early(scope, src)
    envs, rejected, count = decode_batch(body, limits=ctx.config.limits, received_at=datetime.now(UTC))
    await ctx.check_rate(scope, src, count)
    answer = validate_events(src, envs, rejected, count, ctx.keyring)
    await send_json(send, 200, _encode(answer), [])


SENSORS_VALIDATE_PATH = "/sa/validate"


async def _validate_sensors(scope: HTTPScope, receive: Receive, send: Send) -> None:
    if scope["method"] != "POST":
        raise MethodNotAllowedException(detail=f"{SENSORS_VALIDATE_PATH} accepts POST")
    ctx: IngestContext = scope["app"].state.ingest
    src, batch, single = await read_sensors_request(scope, receive, ctx)
    answer = validate_events(src, batch.envelopes, batch.rejected, batch.received, ctx.keyring)
    name_sensors_fields(answer.rejected, single=single, received=batch.received)
    await send_json(send, 200, _encode(answer), [])


# The handlers answer the request themselves (no mounted app): the scope is passed as is.
VALIDATE_ROUTES = [
    asgi(VALIDATE_PATH, name="validate_batch", copy_scope=False)(answering_rate_limits(_validate)),
    asgi(SENSORS_VALIDATE_PATH, name="validate_sensors", copy_scope=False)(
        answering_rate_limits(_validate_sensors)
    ),
]


def document_validate_routes(openapi: OpenAPI, limits: Limits) -> None:
    """The ASGI handlers in the document: the Segment batch (``BatchEnvelope``, registered by
    ``document_ingest_routes``) or the Sensors form they read, and the answer."""
    _, components = struct_components([ValidationResponse])
    register_components(openapi, components)
    form, _, project = sensors_form(openapi, limits)
    answered = OpenAPIResponse(
        description="The verdict per message; nothing was stored or forwarded",
        content={JSON: MediaType(schema=ref("ValidationResponse"))},
    )
    too_large = (
        f"A body over {limits.max_batch_bytes} bytes of JSON (also after gunzip), or more than "
        f"{limits.max_batch_messages} messages"
    )
    common = {
        "413": error_response(413, too_large),
        "415": error_response(415, "Unsupported Content-Type or Content-Encoding"),
        "429": error_response(429),
        "503": error_response(503, "Redis (the shared rate limits) cannot be reached"),
    }
    what = (
        "Each message is decoded and pseudonymised in memory and judged by the tenant's tracking "
        "plan under the source's modes (`plan_validation`, `plan_unplanned`); nothing is stored, "
        "forwarded, counted or recorded, no message id is claimed, consent is not asked. "
        f"{limits_text(limits)}"
    )
    if openapi.paths is None:
        openapi.paths = {}
    openapi.paths[VALIDATE_PATH] = PathItem(
        post=Operation(
            tags=["ingest"],
            summary="What the tracking plan would do to a Segment batch (stores and forwards nothing)",
            description="The body of `/v1/batch`, with the same write key (HTTP Basic user, or "
            f"`writeKey` in the body) and rate limits. {what}",
            operation_id="validate_batch",
            request_body=RequestBody(
                content={JSON: MediaType(schema=ref("BatchEnvelope"))},
                required=True,
                description="JSON, optionally gzip-compressed (Content-Encoding: gzip)",
            ),
            responses={
                "200": answered,
                "400": error_response(400, "Malformed JSON or an empty batch; `field` names the field"),
                "401": error_response(401, "Missing or unknown write key"),
                "403": error_response(
                    403, "The request comes from a web page whose origin the source does not allow"
                ),
                **common,
            },
            security=[{"WriteKey": []}],
        )
    )
    openapi.paths[SENSORS_VALIDATE_PATH] = PathItem(
        post=Operation(
            tags=["ingest"],
            summary="What the tracking plan would do to Sensors events (stores and forwards nothing)",
            description="The form of `POST /sa` (`data` or `data_list`, `gzip`), with the source's "
            f"`token` (and `project`) in the query string or the form, and its rate limits. {what}",
            operation_id="validate_sensors",
            parameters=[project],
            request_body=sensors_form_body(form),
            responses={
                "200": answered,
                "400": error_response(
                    400, "No data or data_list, bad base64 or gzip, malformed JSON; `field` names the field"
                ),
                "401": error_response(401, "Missing or unknown token, or a token of another project"),
                **common,
            },
            security=[{"SensorsToken": []}],
        )
    )
