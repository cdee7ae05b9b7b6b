"""``POST /v1/consent``: SDKs record a person's consent choices (write-key auth).

The body names the subject by the same identifiers events carry (``userId``,
``anonymousId``, ``identifiers[]`` such as a WeChat openid with its appid), the purposes
granted and withdrawn, and the notice the person saw. Identifiers are pseudonymised
before anything is recorded; the response is sent after the ledger records are stored
and the consent state every replica reads is updated.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import asgi
from litestar.exceptions import MethodNotAllowedException
from litestar.types import Receive, Scope, Send

from consent.service import ConsentRefused, ConsentService
from gateway.ingest_http import IngestContext, IngestHeaders, authenticate, read_body, send_json
from gateway.segment import InvalidRequest, decode_body
from identity.identifiers import IDENTIFIER_TYPES, InvalidIdentifier, normalise
from identity.pseudonym import Pseudonymiser


class ConsentIdentifier(msgspec.Struct):
    type: str
    id: str | int
    appid: str | None = None


class ConsentRequest(msgspec.Struct, rename="camel", kw_only=True):
    user_id: str | int | None = None
    anonymous_id: str | int | None = None
    identifiers: list[ConsentIdentifier] = []
    grant: list[str] = []
    withdraw: list[str] = []
    notice_id: str | None = None
    sdk: str | None = None
    evidence_hash: str | None = None
    # "guardian": a parent or guardian consents for a subject under 14.
    consent_kind: str = "general"
    subject_is_minor: bool | None = None
    write_key: str | None = None


_decoder = msgspec.json.Decoder(ConsentRequest)
_encode = msgspec.json.Encoder().encode


def subject_identifiers(req: ConsentRequest, pseudonym: Pseudonymiser) -> list[tuple[str, str]]:
    """The subject's identifiers as (type, pseudonym); a junk value is a 400 naming it."""
    raw: list[tuple[str, Any, str | None, str]] = []
    if req.user_id is not None:
        raw.append(("user_id", req.user_id, None, "userId"))
    if req.anonymous_id is not None:
        raw.append(("anonymous_id", req.anonymous_id, None, "anonymousId"))
    for i, ident in enumerate(req.identifiers):
        raw.append((ident.type, ident.id, ident.appid, f"identifiers[{i}]"))
    out = []
    for id_type, value, scope, field in raw:
        if id_type not in IDENTIFIER_TYPES:
            raise InvalidRequest("invalid_field", f"unknown identifier type {id_type!r}", f"{field}.type")
        if id_type == "wechat_openid" and not scope:
            raise InvalidRequest(
                "invalid_field", "a WeChat openid needs the appid it belongs to", f"{field}.appid"
            )
        try:
            ident = normalise(id_type, value, scope=scope)
        except InvalidIdentifier as exc:
            raise InvalidRequest("invalid_identifier", f"{field}: {exc.reason}", field) from None
        out.append((id_type, pseudonym(ident.value)))
    if not out:
        raise InvalidRequest("missing_identity", "userId, anonymousId or identifiers is required", "userId")
    return out


async def _consent(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["method"] != "POST":
        raise MethodNotAllowedException(detail="/v1/consent accepts POST")
    app_state = scope["app"].state
    ctx: IngestContext = app_state.ingest
    service: ConsentService = app_state.consent
    headers = IngestHeaders.from_scope(scope)
    body = await read_body(receive, headers, ctx.config.limits.max_message_bytes)
    src = authenticate(ctx, headers, body)
    req = decode_body(_decoder, body)
    if req.consent_kind not in ("general", "guardian"):
        raise InvalidRequest("invalid_field", "consentKind must be 'general' or 'guardian'", "consentKind")
    identifiers = subject_identifiers(req, ctx.keyring.pseudonymiser(src.tenant.id))
    try:
        receipts = await service.record(
            tenant=src.tenant.id,
            identifiers=identifiers,
            grant=req.grant,
            withdraw=req.withdraw,
            notice_id=req.notice_id,
            source=src.source.id,
            platform=src.source.platform,
            sdk=req.sdk,
            evidence_hash=req.evidence_hash,
            guardian=req.consent_kind == "guardian",
            minor=req.subject_is_minor,
        )
    except ConsentRefused as exc:
        raise InvalidRequest("invalid_consent", exc.detail, exc.field) from None
    body_out = {
        "success": True,
        "recorded": [
            {
                "recordId": r.record_id,
                "seq": r.seq,
                "purposes": list(r.purposes),
                "state": r.state,
                "at": r.at.astimezone(UTC).isoformat(),
            }
            for r in receipts
        ],
        "at": datetime.now(UTC).isoformat(),
    }
    await send_json(send, 200, _encode(body_out), [])


consent_route = asgi("/v1/consent", name="record_consent")(_consent)
