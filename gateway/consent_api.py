"""``POST /v1/consent``: SDKs record a person's consent choices (write-key auth).

The body names the subject by the same identifiers events carry (``userId``,
``anonymousId``, ``identifiers[]`` such as a WeChat openid with its appid), the purposes
granted and withdrawn, and the notice the person saw. Identifiers are pseudonymised
before anything is recorded; the response is sent after the ledger records are stored
and the consent state every replica reads is updated.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody

from consent.service import ConsentService
from consent.trust import ConsentForbidden, screen
from gateway import metrics
from gateway.auth import WriteKeys
from gateway.config import Limits, ResolvedSource
from gateway.cors import check_origin
from gateway.errors import InvalidRequest
from gateway.logging import bind_source
from gateway.openapi import error_responses, limits_text
from gateway.rate_limits import RateLimiter, client_ip
from identity.assertions import standing
from identity.identifiers import IDENTIFIER_TYPES, SCOPED_TYPES, Identifier, InvalidIdentifier
from identity.pseudonym import Pseudonymiser, pseudonymise_identifier

Purpose = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
RawId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | int


class ConsentIdentifier(msgspec.Struct, forbid_unknown_fields=True):
    """Another identifier of the subject (e.g. a WeChat openid with the appid it belongs to)."""

    type: str
    id: RawId
    appid: str | None = None


class ConsentRequest(msgspec.Struct, rename="camel", kw_only=True):
    user_id: RawId | None = None
    anonymous_id: RawId | None = None
    identifiers: Annotated[list[ConsentIdentifier], msgspec.Meta(max_length=20)] = []
    grant: Annotated[list[Purpose], msgspec.Meta(max_length=32)] = []
    withdraw: Annotated[list[Purpose], msgspec.Meta(max_length=32)] = []
    notice_id: str | None = None
    sdk: str | None = None
    evidence_hash: str | None = None
    # "guardian": a parent or guardian consents for a subject under 14.
    consent_kind: Literal["general", "guardian"] = "general"
    subject_is_minor: bool | None = None
    write_key: str | None = None
    # A signed identity assertion (JWT) from the shop's backend: lets a client source
    # record consent for person-level identifiers (user id, phone, email, unionid).
    identity_assertion: str | None = None


class ConsentReceipt(msgspec.Struct, rename="camel", omit_defaults=True):
    record_id: str
    seq: int
    purposes: list[str]
    state: str
    at: datetime
    # In the ledger, not yet in the state every replica decides with (it was unavailable):
    # effective within the reconcile period (IDGATE_CONSENT_RECONCILE_MS).
    pending: bool = False


class RefusedPart(msgspec.Struct):
    """A part of the call the sender could not back: not recorded (the rest was)."""

    field: str
    reason: str
    detail: str


class ConsentRecorded(msgspec.Struct, omit_defaults=True):
    success: bool
    recorded: list[ConsentReceipt]
    at: datetime
    refused: list[RefusedPart] = []


def subject_identifiers(req: ConsentRequest, pseudonymiser: Pseudonymiser) -> list[tuple[Identifier, str]]:
    """The subject's identifiers (pseudonymised), each with the field it came from; a junk
    value is a 400 naming it."""
    raw: list[tuple[str, Any, str | None, str]] = []
    if req.user_id is not None:
        raw.append(("user_id", req.user_id, None, "userId"))
    if req.anonymous_id is not None:
        raw.append(("anonymous_id", req.anonymous_id, None, "anonymousId"))
    for i, item in enumerate(req.identifiers):
        raw.append((item.type, item.id, item.appid, f"identifiers[{i}]"))
    out = []
    for id_type, value, scope, where in raw:
        if id_type not in IDENTIFIER_TYPES:
            raise InvalidRequest("invalid_field", f"unknown identifier type {id_type!r}", f"{where}.type")
        if id_type in SCOPED_TYPES and not scope:
            raise InvalidRequest(
                "invalid_field", "a WeChat openid needs the appid it belongs to", f"{where}.appid"
            )
        try:
            ident = pseudonymise_identifier(pseudonymiser, id_type, value, scope=scope)
        except InvalidIdentifier as exc:
            raise InvalidRequest("invalid_identifier", f"{where}: {exc.reason}", where) from None
        out.append((ident, where))
    if not out:
        raise InvalidRequest("missing_identity", "userId, anonymousId or identifiers is required", "userId")
    return out


def foreign_openids(
    req: ConsentRequest, named: list[tuple[Identifier, str]], own_appids: frozenset[str] | None
) -> frozenset[str]:
    """Pseudonyms of the openids ``identifiers[]`` names of an appid the client source does
    not hold (``wechat_appids``): another app's users."""
    if own_appids is None:
        return frozenset()
    # subject_identifiers keeps the order: userId, anonymousId, then identifiers[i]
    by_field = {where: ident for ident, where in named}
    return frozenset(
        by_field[f"identifiers[{i}]"].value
        for i, item in enumerate(req.identifiers)
        if item.type in SCOPED_TYPES and item.appid not in own_appids
    )


def provide_source(
    request: Request[Any, Any, Any], state: State, data: JSONBody[ConsentRequest]
) -> ResolvedSource:
    """The source of the write key (HTTP Basic user, or ``writeKey`` in the body)."""
    keys: WriteKeys = state.write_keys
    source = keys.authenticate(request.headers.get("authorization", ""), lambda: data.write_key)
    bind_source(source.tenant.id, source.source.id)
    check_origin(request.scope, source)
    return source


def consent_controller(limits: Limits) -> type[Controller]:
    """The controller, with the request size limit of one message (and the limits in its docs)."""

    class ConsentController(Controller):
        path = "/v1/consent"
        tags = ["consent"]
        security = [{"WriteKey": []}]
        dependencies = {
            # one dependency only: two would be resolved in an anyio task group per request
            # (7% of a consent call's time under load, bench/consent_writes.py)
            "source": Provide(provide_source, sync_to_thread=False),
        }

        @post(
            "/",
            status_code=200,
            summary="Record a person's consent choices",
            description="Grants and withdrawals of purposes for the subject the identifiers name, "
            'bound to the notice the person saw (required for a grant). `consentKind: "guardian"` '
            "and `subjectIsMinor: true` cover children under 14. Answered once the ledger records "
            "are stored. Authenticate with the write key as HTTP Basic user (empty password), or "
            f"as `writeKey` in the body. The body counts as one message. {limits_text(limits)}",
            request_max_body_size=limits.max_message_bytes,
            responses=error_responses(
                400,
                401,
                403,
                413,
                429,
                503,
                described={
                    400: "Invalid body, an unknown purpose or identifier type, a junk identifier, "
                    "or a grant without a known notice; `field` names it",
                    401: "Missing or unknown write key (HTTP Basic user, or `writeKey` in the body)",
                    403: "The request comes from a web page whose origin the source does not "
                    "allow (`allowed_origins`; answered without a CORS grant)",
                    413: f"The body is over {limits.max_message_bytes} bytes",
                    429: "Over a rate limit of the source or client network, or over "
                    "`rate_limits.consent_records_per_subject_per_day` for an identifier named; "
                    "`field` names the limit; retry after `Retry-After` seconds",
                    503: "Redis, the database or the consent state is unavailable: nothing was "
                    "recorded; retry after `Retry-After` seconds",
                },
            ),
        )
        async def record(
            self,
            request: Request[Any, Any, Any],
            data: JSONBody[ConsentRequest],
            source: NamedDependency[ResolvedSource],
            state: State,
        ) -> ConsentRecorded:
            consent: ConsentService = state.consent
            pseudonymiser = state.keyring.pseudonymiser(source.tenant.id)
            named = subject_identifiers(data, pseudonymiser)
            limiter: RateLimiter | None = state.get("rate_limiter")
            if limiter is not None:
                ip = client_ip(request.scope, limiter.limits.forwarded_hops)
                await limiter.check_request(source.tenant.id, source.source.id, ip, 1)
                await limiter.check_consent(source.tenant.id, source.source.id, [i.value for i, _ in named])
            sender = standing(
                server=source.source.is_server,
                verifier=state.assertions.get((source.tenant.id, source.source.id)),
                token=data.identity_assertion,
                identifiers=[i for i, _ in named],
                pseudonymiser=pseudonymiser,
                now=time.time(),
                foreign=foreign_openids(data, named, source.source.own_appids),
            )
            try:
                screened = screen(
                    sender,
                    named,
                    minor=data.subject_is_minor,
                    guardian=data.consent_kind == "guardian",
                    asks_consent=bool(data.grant or data.withdraw),
                )
            except ConsentForbidden as exc:  # refused whole: counted like the partial refusals
                for reason in exc.reasons:
                    metrics.INGEST.add("refused_assertion", (source.tenant.id, reason))
                raise
            for part in screened.refused:
                metrics.INGEST.add("refused_assertion", (source.tenant.id, part.reason))
            receipts = await consent.record(
                tenant=source.tenant.id,
                identifiers=screened.identifiers,
                grant=data.grant,
                withdraw=data.withdraw,
                notice_id=data.notice_id,
                source=source.source.id,
                platform=source.source.platform,
                sdk=data.sdk,
                evidence_hash=data.evidence_hash,
                guardian=screened.guardian,
                minor=screened.minor,
            )
            return ConsentRecorded(
                success=True,
                recorded=[
                    ConsentReceipt(
                        r.record_id, r.seq, list(r.purposes), r.state, r.at.astimezone(UTC), r.pending
                    )
                    for r in receipts
                ],
                at=datetime.now(UTC),
                refused=[RefusedPart(r.field, r.reason, r.detail) for r in screened.refused],
            )

    return ConsentController
