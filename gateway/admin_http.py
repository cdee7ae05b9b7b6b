"""Admin and compliance API: consent records, point-in-time views, exports, statistics,
notices, and the access log of officers' own queries.

Tokens are separate from write keys and carry a role: ``compliance`` reads personal data
(every such read is itself written to the access log), ``operator`` runs the gateway
(publishes notices, verifies the ledger). Officers name a subject by its raw identifier;
it is pseudonymised here with the tenant's key, and only the pseudonym is stored or logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from consent.ledger import Ledger, verify_database
from consent.models import AccessLogEntry
from consent.service import ConsentRefused, ConsentService
from gateway.config import AdminToken, Config
from gateway.delivery_setup import rekeyer
from gateway.identity_setup import deletion_notice
from gateway.segment import InvalidRequest, decode_body
from identity.identifiers import IDENTIFIER_TYPES, InvalidIdentifier, normalise
from identity.pseudonym import KeyRing

ROLES = ("compliance", "operator")


@dataclass(frozen=True)
class Officer:
    name: str
    role: str
    tenants: frozenset[str]  # empty: all

    def may_see(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants


@dataclass
class AdminContext:
    config: Config
    tokens: dict[str, Officer]  # sha256(token) -> officer
    keyring: KeyRing
    ledger: Ledger
    consent: ConsentService
    outbox: Any  # the deployment's outbox (SQLite or Redis Streams)
    resolver: Any = None  # identity.resolver.GraphResolver when identity resolution is on
    notify: Callable[[], None] | None = None  # wakes the delivery workers


def index_admin_tokens(tokens: list[AdminToken], *, dev: bool) -> dict[str, Officer]:
    out: dict[str, Officer] = {}
    for t in tokens:
        officer = Officer(t.name, t.role, frozenset(t.tenants))
        if t.token_sha256:
            out[t.token_sha256] = officer
        if dev and t.dev_token:
            out[hashlib.sha256(t.dev_token.encode()).hexdigest()] = officer
    return out


def _ctx(request: Request[Any, Any, Any]) -> AdminContext:
    return request.app.state.admin  # type: ignore[no-any-return]


def officer_for(request: Request[Any, Any, Any], role: str, tenant: str | None) -> Officer:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        raise NotAuthorizedException(detail="send an admin token as 'Authorization: Bearer <token>'")
    officer = _ctx(request).tokens.get(hashlib.sha256(auth[7:].strip().encode()).hexdigest())
    if officer is None:
        raise NotAuthorizedException(detail="unknown admin token")
    if officer.role != role:
        raise PermissionDeniedException(
            detail=f"this needs the {role} role; {officer.name} has {officer.role}"
        )
    if tenant is not None:
        if tenant not in {t.id for t in _ctx(request).config.tenants}:
            raise InvalidRequest("invalid_field", f"unknown tenant {tenant!r}", "tenant")
        if not officer.may_see(tenant):
            raise PermissionDeniedException(detail=f"{officer.name} may not see tenant {tenant!r}")
    return officer


def subject_pseudonym(
    ctx: AdminContext, tenant: str, identifier: str, id_type: str, appid: str | None
) -> str:
    if id_type not in IDENTIFIER_TYPES:
        raise InvalidRequest("invalid_field", f"unknown identifier type {id_type!r}", "type")
    try:
        ident = normalise(id_type, identifier, scope=appid if id_type == "wechat_openid" else None)
    except InvalidIdentifier as exc:
        raise InvalidRequest("invalid_identifier", exc.reason, "identifier") from None
    return ctx.keyring.pseudonymiser(tenant)(ident.value)


def parse_time(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("invalid_field", f"{field} must be an ISO 8601 time", field) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


async def log_access(
    ctx: AdminContext, officer: Officer, action: str, tenant: str | None, params: dict[str, Any], count: int
) -> None:
    """Every officer query is itself recorded (params hold pseudonyms, never raw identifiers)."""

    def write() -> None:
        with ctx.ledger.engine.begin() as conn:
            conn.execute(
                sa.insert(AccessLogEntry.__table__).values(  # type: ignore[attr-defined]
                    at=datetime.now(UTC),
                    officer=officer.name,
                    role=officer.role,
                    action=action,
                    tenant=tenant,
                    params=params,
                    result_count=count,
                )
            )

    await asyncio.to_thread(write)


def record_json(r: Any) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "recordId": r.record_id,
        "tenant": r.tenant,
        "type": r.record_type,
        "subject": r.subject,
        "identifiers": list(r.identifiers or []),
        "noticeId": r.notice_id,
        "noticeHash": r.notice_hash,
        "purposes": list(r.purposes or []),
        "state": r.state,
        "consentKind": r.consent_kind,
        "legalBasis": r.legal_basis,
        "source": r.source,
        "platform": r.platform,
        "sdk": r.sdk,
        "at": r.at.astimezone(UTC).isoformat() if r.at.tzinfo else r.at.isoformat() + "+00:00",
        "evidenceHash": r.evidence_hash,
        "detail": r.detail or {},
        "prevHash": r.prev_hash,
        "hash": r.hash,
    }


class IdentifierRef(msgspec.Struct):
    type: str
    id: str
    appid: str | None = None


class UnlinkRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    a: IdentifierRef
    b: IdentifierRef


def _graph(ctx: AdminContext, tenant: str) -> Any:
    graph = ctx.resolver.graphs.get(tenant) if ctx.resolver is not None else None
    if graph is None:
        raise InvalidRequest("invalid_field", f"identity resolution is off for tenant {tenant!r}", "tenant")
    return graph


def by_destination(ctx: AdminContext, tenant: str, unified_id: str | None) -> dict[str, str | None]:
    """The unified ID as each destination of the tenant knows it (its pseudonym domain)."""
    found = next(t for t in ctx.config.tenants if t.id == tenant)
    return {
        d.id: rekeyer(ctx.keyring, tenant, d).value(unified_id) if unified_id else None
        for d in found.destinations
    }


def _node(ctx: AdminContext, tenant: str, ref: IdentifierRef, field: str) -> str:
    try:
        return f"{ref.type}:{subject_pseudonym(ctx, tenant, ref.id, ref.type, ref.appid)}"
    except InvalidRequest as exc:
        raise InvalidRequest(exc.error, exc.detail, f"{field}.{exc.field}" if exc.field else field) from None


class NoticeRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: str
    id: str
    content_sha256: str
    material: bool = False
    purposes_changed: list[str] = []


_NOTICE = msgspec.json.Decoder(NoticeRequest)
_UNLINK = msgspec.json.Decoder(UnlinkRequest)


class EraseRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    identifiers: list[IdentifierRef]


_ERASE = msgspec.json.Decoder(EraseRequest)


class AdminController(Controller):
    path = "/admin"
    tags = ["admin"]

    @get("/consent/records", summary="Consent records of a subject, time range, purpose or notice")
    async def records(
        self,
        request: Request[Any, Any, Any],
        tenant: str,
        identifier: str | None = None,
        type: str = "user_id",  # noqa: A002 - the query parameter's name
        appid: str | None = None,
        since: str | None = None,
        until: str | None = None,
        purpose: str | None = None,
        notice: str | None = None,
        after_seq: int = 0,
        limit: int = 500,
    ) -> dict[str, Any]:
        """Compliance role. The raw identifier is pseudonymised server-side."""
        officer = officer_for(request, "compliance", tenant)
        ctx = _ctx(request)
        if not 1 <= limit <= 5000:
            raise InvalidRequest("invalid_field", "limit must be between 1 and 5000", "limit")
        pseudonym = subject_pseudonym(ctx, tenant, identifier, type, appid) if identifier else None
        records = await asyncio.to_thread(
            ctx.ledger.records,
            tenant=tenant,
            identifier=f"{type}:{pseudonym}" if pseudonym else None,
            since=parse_time(since, "since"),
            until=parse_time(until, "until"),
            purpose=purpose,
            notice_id=notice,
            after_seq=after_seq,
            limit=limit,
        )
        params = {
            "subject": pseudonym,
            "type": type,
            "since": since,
            "until": until,
            "purpose": purpose,
            "notice": notice,
            "after_seq": after_seq,
        }
        await log_access(ctx, officer, "consent.records", tenant, params, len(records))
        return {
            "subject": pseudonym,
            "records": [record_json(r) for r in records],
            "nextAfterSeq": records[-1].seq if len(records) == limit else None,
        }

    @get(
        "/consent/subject", summary="Point in time: what a subject allowed, and which deliveries relied on it"
    )
    async def subject_at(
        self,
        request: Request[Any, Any, Any],
        tenant: str,
        identifier: str,
        type: str = "user_id",  # noqa: A002
        appid: str | None = None,
        at: str | None = None,
    ) -> dict[str, Any]:
        officer = officer_for(request, "compliance", tenant)
        ctx = _ctx(request)
        pseudonym = subject_pseudonym(ctx, tenant, identifier, type, appid)
        moment = parse_time(at, "at") or datetime.now(UTC)
        records = await asyncio.to_thread(
            ctx.ledger.records, tenant=tenant, identifier=f"{type}:{pseudonym}", until=moment, limit=100_000
        )
        purposes: dict[str, dict[str, Any]] = {}
        minor = None
        for r in records:  # seq order: the last one per purpose is the state at that moment
            if r.record_type == "subject_flag":
                minor = r.state == "flagged"
            if r.record_type != "consent":
                continue
            for p in r.purposes or []:
                purposes[p] = {
                    "state": r.state,
                    "seq": r.seq,
                    "recordId": r.record_id,
                    "noticeId": r.notice_id,
                    "consentKind": r.consent_kind,
                    "at": record_json(r)["at"],
                }
        grant_seqs = [v["seq"] for v in purposes.values() if v["state"] == "given"]
        deliveries = await asyncio.to_thread(ctx.consent.deliveries_relying_on, grant_seqs)
        await log_access(
            ctx,
            officer,
            "consent.subject_at",
            tenant,
            {"subject": pseudonym, "type": type, "at": moment.isoformat()},
            len(records),
        )
        return {
            "subject": pseudonym,
            "at": moment.isoformat(),
            "underFourteen": minor,
            "purposes": purposes,
            "deliveries": deliveries,
        }

    @get("/consent/export", summary="Ledger export: JSONL with checkpoints, or CSV (records or checkpoints)")
    async def export(
        self,
        request: Request[Any, Any, Any],
        tenant: str | None = None,
        format: str = "jsonl",  # noqa: A002
        part: str = "records",
    ) -> Response[bytes]:
        """JSONL carries records, signed checkpoints and a seal (``idgate ledger verify`` checks
        it offline). CSV comes in two parts: ``part=records`` and ``part=checkpoints``."""
        officer = officer_for(request, "compliance", tenant)
        if tenant is None and officer.tenants:
            raise PermissionDeniedException(detail="a tenant-scoped officer must name the tenant")
        if format not in ("jsonl", "csv"):
            raise InvalidRequest("invalid_field", "format must be jsonl or csv", "format")
        if part not in ("records", "checkpoints"):
            raise InvalidRequest("invalid_field", "part must be records or checkpoints", "part")
        ctx = _ctx(request)

        def build() -> str:
            buf = io.StringIO()
            if format == "jsonl":
                ctx.ledger.export_jsonl(buf, tenant=tenant)
            elif part == "checkpoints":
                ctx.ledger.export_checkpoints_csv(buf)
            else:
                ctx.ledger.export_csv(buf, tenant=tenant)
            return buf.getvalue()

        text = await asyncio.to_thread(build)
        lines = text.count("\n")
        await log_access(ctx, officer, "consent.export", tenant, {"format": format, "part": part}, lines)
        media = "application/x-ndjson" if format == "jsonl" else "text/csv"
        name = f"consent-ledger-{tenant or 'all'}{'-checkpoints' if part == 'checkpoints' else ''}.{format}"
        return Response(
            text.encode(), media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    @get("/consent/stats", summary="Consent rates by purpose, notice or platform")
    async def stats(
        self, request: Request[Any, Any, Any], tenant: str, by: str = "purpose"
    ) -> dict[str, Any]:
        officer = officer_for(request, "compliance", tenant)
        if by not in ("purpose", "notice", "platform"):
            raise InvalidRequest("invalid_field", "by must be purpose, notice or platform", "by")
        ctx = _ctx(request)
        records = await asyncio.to_thread(
            ctx.ledger.records, tenant=tenant, record_type="consent", limit=10_000_000
        )
        latest: dict[tuple[str, str], Any] = {}
        for r in records:
            for p in r.purposes or []:
                latest[(r.subject or "", p)] = (r, p)
        counts: dict[str, Counter[str]] = {}
        for r, p in latest.values():
            key = {"purpose": p, "notice": r.notice_id or "-", "platform": r.platform or "-"}[by]
            counts.setdefault(key, Counter())[r.state] += 1
        groups = {
            k: {
                "given": c["given"],
                "withdrawn": c["withdrawn"],
                "rate": round(c["given"] / (c["given"] + c["withdrawn"]), 4)
                if c["given"] + c["withdrawn"]
                else None,
            }
            for k, c in sorted(counts.items())
        }
        await log_access(ctx, officer, "consent.stats", tenant, {"by": by}, len(groups))
        return {"tenant": tenant, "by": by, "subjects": len({s for s, _ in latest}), "groups": groups}

    @get("/consent/verify", summary="Verify the ledger's hash chain and signed checkpoints")
    async def verify(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        officer_for(request, "operator", None)
        result = await asyncio.to_thread(verify_database, _ctx(request).ledger)
        return msgspec.to_builtins(result)  # type: ignore[no-any-return]

    @post("/notices", summary="Publish a privacy-notice version", status_code=201)
    async def publish_notice(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Operator role. A material notice sends the purposes it changes (all when none are
        named) back to re-consent for everyone who agreed to an older version."""
        body = decode_body(_NOTICE, await request.body())
        officer = officer_for(request, "operator", body.tenant)
        receipt = await _ctx(request).consent.publish_notice(
            body.tenant,
            body.id,
            body.content_sha256,
            material=body.material,
            purposes_changed=body.purposes_changed,
            actor=f"admin:{officer.name}",
        )
        if receipt is None:
            raise ConsentRefused(f"notice {body.id!r} is already published", "id")
        return {
            "noticeId": body.id,
            "seq": receipt.seq,
            "recordId": receipt.record_id,
            "material": body.material,
        }

    @get("/identity/explain", summary="The chain of links that joins two identifiers, with provenance")
    async def explain(
        self,
        request: Request[Any, Any, Any],
        tenant: str,
        a: str,
        b: str,
        a_type: str = "user_id",
        b_type: str = "user_id",
        a_appid: str | None = None,
        b_appid: str | None = None,
    ) -> dict[str, Any]:
        """Operator role. Raw identifiers are pseudonymised server-side."""
        officer = officer_for(request, "operator", tenant)
        ctx = _ctx(request)
        graph = _graph(ctx, tenant)
        node_a = _node(ctx, tenant, IdentifierRef(a_type, a, a_appid), "a")
        node_b = _node(ctx, tenant, IdentifierRef(b_type, b, b_appid), "b")
        path = graph.explain(node_a, node_b)
        await log_access(
            ctx, officer, "identity.explain", tenant, {"a": node_a, "b": node_b}, len(path or [])
        )
        return {
            "a": node_a,
            "b": node_b,
            "linked": path is not None,
            "unifiedId": graph.unified_id(node_a) if path is not None else None,
            "unifiedIdByDestination": by_destination(
                ctx, tenant, graph.unified_id(node_a) if path is not None else None
            ),
            "path": [
                {
                    "from": x,
                    "to": y,
                    "source": p.source,
                    "eventId": p.event_id,
                    "at": p.at.isoformat(),
                    "rule": p.rule,
                }
                for x, y, p in (path or [])
            ],
        }

    @post(
        "/identity/unlink",
        status_code=200,
        summary="Remove one link (a wrong bind); the person splits if it was the only path",
    )
    async def unlink(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        body = decode_body(_UNLINK, await request.body())
        officer = officer_for(request, "operator", body.tenant)
        ctx = _ctx(request)
        _graph(ctx, body.tenant)
        node_a = _node(ctx, body.tenant, body.a, "a")
        node_b = _node(ctx, body.tenant, body.b, "b")
        changes = await ctx.resolver.unlink(body.tenant, node_a, node_b)
        if not changes:
            raise InvalidRequest("not_linked", "there is no direct link between these identifiers", "b")
        await log_access(
            ctx, officer, "identity.unlink", body.tenant, {"a": node_a, "b": node_b}, len(changes)
        )
        splits = [c for c in changes if type(c).__name__ == "Split"]
        graph = ctx.resolver.graphs[body.tenant]
        uids = {"a": graph.unified_id(node_a), "b": graph.unified_id(node_b)}
        per_destination = {k: by_destination(ctx, body.tenant, v) for k, v in uids.items()}
        return {
            "removed": True,
            "split": bool(splits),
            "unifiedIds": uids,
            # what each destination received the parts as (its pseudonym domain)
            "unifiedIdsByDestination": {
                d: {k: per_destination[k][d] for k in uids} for d in per_destination["a"]
            },
        }

    @post(
        "/identity/erase",
        status_code=200,
        summary="Erase identifiers from the identity graph; deletion notices go downstream",
    )
    async def erase(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Compliance role (a deletion request, PIPL Art 47). The identifiers leave the graph
        (the person splits where they held it together) and an ``identity.deleted`` notice
        per person goes to every destination that received that person's data."""
        body = decode_body(_ERASE, await request.body())
        officer = officer_for(request, "compliance", body.tenant)
        ctx = _ctx(request)
        graph = _graph(ctx, body.tenant)
        if not 1 <= len(body.identifiers) <= 100:
            raise InvalidRequest("invalid_field", "give between 1 and 100 identifiers", "identifiers")
        nodes = [_node(ctx, body.tenant, ref, f"identifiers[{i}]") for i, ref in enumerate(body.identifiers)]
        by_person: dict[str, list[str]] = {}
        for node in dict.fromkeys(nodes):
            by_person.setdefault(ctx.resolver.unified_id(body.tenant, node), []).append(node)
        changes = 0
        for node in dict.fromkeys(nodes):
            if node in graph:
                changes += len(await ctx.resolver.remove(body.tenant, node))
        tenant = next(t for t in ctx.config.tenants if t.id == body.tenant)
        now = datetime.now(UTC)
        notices = [deletion_notice(tenant, uid, person_nodes, now) for uid, person_nodes in by_person.items()]
        await ctx.outbox.append(notices, dedupe=True)
        if ctx.notify is not None:
            ctx.notify()
        await log_access(ctx, officer, "identity.erase", body.tenant, {"nodes": sorted(set(nodes))}, changes)
        return {"erased": len(set(nodes)), "unifiedIds": sorted(by_person), "notices": len(notices)}

    @get("/identity/quarantine", summary="Merges held back by the circuit breaker, for review")
    async def quarantine(
        self, request: Request[Any, Any, Any], tenant: str, limit: int = 200
    ) -> dict[str, Any]:
        officer_for(request, "operator", tenant)
        held = _graph(_ctx(request), tenant).quarantine()[-limit:]
        return {
            "quarantined": [
                {
                    "a": q.a,
                    "b": q.b,
                    "reason": q.reason,
                    "source": q.provenance.source,
                    "eventId": q.provenance.event_id,
                    "at": q.at.isoformat(),
                }
                for q in held
            ]
        }

    @get("/access-log", summary="Officers' queries of personal data")
    async def access_log(self, request: Request[Any, Any, Any], limit: int = 200) -> dict[str, Any]:
        officer = officer_for(request, "compliance", None)
        ctx = _ctx(request)

        def read() -> list[dict[str, Any]]:
            t = AccessLogEntry.__table__  # type: ignore[attr-defined]
            with ctx.ledger.engine.connect() as conn:
                rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(min(limit, 5000))).mappings()
                return [
                    {**dict(r), "at": r["at"].isoformat()}
                    for r in rows
                    if not officer.tenants or r["tenant"] in officer.tenants
                ]

        entries = await asyncio.to_thread(read)
        await log_access(ctx, officer, "admin.access_log", None, {"limit": limit}, len(entries))
        return {"entries": entries}
