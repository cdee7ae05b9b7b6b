"""The console's pages: thin handlers over the same domain services as the admin API
(``AdminServices`` and ``RightsService`` on ``app.state``), each page written to the
officers' access log like an API query.

Raw identifiers reach the server only in the body of the subject search (a POST, so
never in a URL); they are pseudonymised here and the pages show pseudonyms only.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlencode

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency, Provide
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException, TooManyRequestsException
from litestar.params import Body, FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template

from consent.audit import ledger_entry
from consent.rights import (
    Channel,
    ExtensionReason,
    Outcome,
    PauseReason,
    Requester,
    RightsError,
    RightsKind,
    RightsService,
    Verification,
    VerificationMethod,
    VerificationOutcome,
)
from gateway.admin.consent import export_download
from gateway.admin.deps import AdminServices, log_access, node_identifier, parse_time, provide_services
from gateway.admin.rights import bundle_download, provide_rights, rights_refusal
from gateway.auth import AdminTokens, Officer, roles
from gateway.console.access import (
    CONSOLE_PATH,
    SIGN_IN_PATH,
    Console,
    console_guard,
    console_of,
    officer_of,
    page,
)
from gateway.console.accounts import ConsoleAccounts, count_failure, may_try
from gateway.console.sessions import LANGUAGE_COOKIE, SESSION_COOKIE, SIGN_IN_COOKIE, same_token
from gateway.errors import InvalidRequest
from gateway.rate_limits import client_ip
from identity.identifiers import IDENTIFIER_TYPES, Identifier
from identity.service import IdentityResolutionOff, NotQuarantined

EVERYONE = roles("compliance", "operator", "auditor")
READERS = roles("compliance", "auditor")  # personal data, pseudonymised: no operators
COMPLIANCE = roles("compliance")  # raw look-ups and every change
RATE_TREND_DAYS = 14  # the notices page's consent-rate trend: the rate at the end of each day


DEPENDENCIES = {
    "services": Provide(provide_services, sync_to_thread=False),
    "officer": Provide(officer_of, sync_to_thread=False),
    "rights": Provide(provide_rights, sync_to_thread=False),
}
Form = Body(media_type=RequestEncodingType.URL_ENCODED)


def _cookie(request: Request[Any, Any, Any], key: str, value: str, *, max_age: int | None = None) -> Cookie:
    """A console cookie: HttpOnly, SameSite=Strict, Secure over HTTPS (or when configured)."""
    console = console_of(request)
    return Cookie(
        key=key,
        value=value,
        path=CONSOLE_PATH,
        httponly=True,
        samesite="strict",
        secure=console.secure_cookie or request.url.scheme == "https",
        max_age=max_age,
    )


def visible_tenants(services: AdminServices, officer: Officer) -> list[str]:
    return [t.id for t in services.config.tenants if officer.may_see(t.id)]


def chosen_tenant(services: AdminServices, officer: Officer, tenant: str | None) -> str:
    """The tenant a page is about: the one asked for (checked), else the officer's first."""
    if tenant:
        services.tokens.check_tenant(officer, tenant)
        return tenant
    return visible_tenants(services, officer)[0]


# -- sign-in, sign-out, language ---------------------------------------------------------------
class SignInForm(msgspec.Struct):
    token: str = ""
    name: str = ""
    password: str = ""
    csrf_token: str = ""


class SignInController(Controller):
    """Anonymous pages: the sign-in form (with a CSRF token of its own, in a cookie and the
    form: before sign-in there is no session) and the language switch."""

    path = CONSOLE_PATH
    include_in_schema = False

    @get("/sign-in")
    async def sign_in_form(self, request: Request[Any, Any, Any]) -> Template:
        token = secrets.token_urlsafe(32)
        template = page(request, "sign_in.html", sign_in_csrf=token, failed=False)
        template.cookies.append(_cookie(request, SIGN_IN_COOKIE, token, max_age=3600))
        return template

    @post("/sign-in", status_code=200)
    async def sign_in(
        self, request: Request[Any, Any, Any], data: Annotated[SignInForm, Form]
    ) -> Response[Any]:
        """An admin token, or a console user's name and password. Failed attempts are
        counted per name and client network; past the limit, 429 until the window ends."""
        if not same_token(request.cookies.get(SIGN_IN_COOKIE, ""), data.csrf_token):
            return page(request, "error.html", status=403, problem="csrf")
        console: Console = console_of(request)
        services: AdminServices = request.app.state.services
        store = request.app.state.rate_limiter.store
        network = client_ip(request.scope, services.config.rate_limits.forwarded_hops)
        name = data.name.strip()[:64]
        if not await may_try(store, name or "(token)", network):
            raise TooManyRequestsException(detail="too many failed sign-ins: wait a quarter of an hour")
        officer, principal = await self._check(request, console, name, data)
        if officer is None:
            await count_failure(store, name or "(token)", network)
            await asyncio.to_thread(
                services.access_log.write,
                officer="(unauthenticated)",
                role="",
                action="console.sign_in_refused",
                tenant=None,
                params={"name": name} if name in console.accounts.by_name else {},
                count=0,
            )
            return page(request, "sign_in.html", status=401, sign_in_csrf=data.csrf_token, failed=True)
        # A new session id at every sign-in, whatever cookie came with the request.
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            await console.sessions.end(old)
        session_id, _ = await console.sessions.start(principal)
        await log_access(services, officer, "console.sign_in", None, {"with": principal.partition(":")[0]}, 1)
        redirect = Redirect(CONSOLE_PATH, status_code=303)
        redirect.cookies.append(_cookie(request, SESSION_COOKIE, session_id))
        redirect.cookies.append(_cookie(request, SIGN_IN_COOKIE, "", max_age=0))
        return redirect

    @staticmethod
    async def _check(
        request: Request[Any, Any, Any], console: Console, name: str, data: SignInForm
    ) -> tuple[Officer | None, str]:
        if name:
            officer = await asyncio.to_thread(console.accounts.password, name, data.password)
            return officer, f"user:{name}"
        token = data.token.strip()
        principal = ConsoleAccounts.token_principal(token)
        tokens: AdminTokens = request.app.state.admin_tokens
        return (console.accounts.officer(principal, tokens) if token else None), principal

    @get("/language")
    async def switch_language(
        self,
        request: Request[Any, Any, Any],
        lang: FromQuery[Literal["zh", "en"]] = "zh",
        back: Annotated[str, QueryParameter(name="next", max_length=500)] = CONSOLE_PATH,
    ) -> Redirect:
        # only back into the console (no open redirect)
        target = (
            back if back.startswith(CONSOLE_PATH) and "//" not in back and "\\" not in back else CONSOLE_PATH
        )
        redirect = Redirect(target, status_code=303)
        redirect.cookies.append(_cookie(request, LANGUAGE_COOKIE, lang, max_age=365 * 86400))
        return redirect


# -- signed-in pages ---------------------------------------------------------------------------
class SubjectForm(msgspec.Struct):
    csrf_token: str = ""
    tenant: str = ""
    type: str = "phone"
    identifier: str = ""
    appid: str = ""
    at: str = ""


class ReviewForm(msgspec.Struct):
    csrf_token: str = ""
    tenant: str = ""
    a: str = ""
    b: str = ""
    decision: str = ""


class LedgerRequest(msgspec.Struct):
    csrf_token: str = ""


@dataclass(frozen=True)
class ClusterLink:
    node: str
    hops: list[Any]


class ConsoleController(Controller):
    path = CONSOLE_PATH
    guards = [console_guard]
    dependencies = DEPENDENCIES
    include_in_schema = False

    @get("/", opt=EVERYONE)
    async def home(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
    ) -> Template:
        await log_access(services, officer, "console.home", None, {}, 0)
        return page(request, "home.html")

    @post("/sign-out", opt=EVERYONE, status_code=303)
    async def sign_out(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
    ) -> Redirect:
        await console_of(request).sessions.end(request.cookies.get(SESSION_COOKIE, ""))
        await log_access(services, officer, "console.sign_out", None, {}, 0)
        redirect = Redirect(SIGN_IN_PATH, status_code=303)
        redirect.cookies.append(_cookie(request, SESSION_COOKIE, "", max_age=0))
        return redirect

    # subject ---------------------------------------------------------------------------------
    @get("/subject", opt=COMPLIANCE)
    async def subject_form(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
    ) -> Template:
        chosen = chosen_tenant(services, officer, tenant)
        await log_access(services, officer, "console.subject", chosen, {}, 0)
        return page(request, "subject.html", **self._form_context(services, officer, chosen, "phone"))

    @staticmethod
    def _form_context(services: AdminServices, officer: Officer, tenant: str, id_type: str) -> dict[str, Any]:
        return {
            "tenants": visible_tenants(services, officer),
            "tenant": tenant,
            "types": IDENTIFIER_TYPES,
            "chosen_type": id_type,
            "result": None,
            "problem": None,
        }

    @post("/subject", opt=COMPLIANCE, status_code=200)
    async def subject_search(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: Annotated[SubjectForm, Form],
    ) -> Template:
        """The person behind a raw identifier: pseudonymised first; from then on only
        pseudonyms (the raw value is not put back into the form either)."""
        tenant = chosen_tenant(services, officer, data.tenant or None)
        context = self._form_context(services, officer, tenant, data.type)
        try:
            every = services.subjects(tenant, data.identifier.strip(), data.type, data.appid.strip() or None)
            moment = parse_time(data.at.strip() or None, "at") or datetime.now(UTC)
        except InvalidRequest as exc:
            await log_access(services, officer, "console.subject_search", tenant, {"type": data.type}, 0)
            return page(request, "subject.html", status=400, **{**context, "problem": exc})
        subject = every[0]
        aliases = [i.node for i in every[1:]]
        result = await asyncio.to_thread(self._subject, services, tenant, every, moment)
        view = await asyncio.to_thread(
            services.audit.subject_at, tenant=tenant, node=subject.node, at=moment, aliases=aliases
        )
        timeline = await asyncio.to_thread(
            services.audit.records, tenant=tenant, node=subject.node, aliases=aliases, limit=1000
        )
        params = {"subject": subject.value, "type": subject.type, "at": moment.isoformat()}
        await log_access(services, officer, "console.subject_search", tenant, params, len(timeline))
        return page(
            request,
            "subject.html",
            **{**context, "result": {**result, "view": view, "timeline": timeline, "at": moment}},
        )

    @staticmethod
    def _subject(
        services: AdminServices, tenant: str, every: list[Identifier], at: datetime
    ) -> dict[str, Any]:
        """The person the identifier belongs to: identifiers, unified ID, the link path to each."""
        try:
            held = services.graph_subjects(tenant, every)[0]
            nodes = services.identity.person(tenant, held.node)
            unified_id: str | None = services.identity.unified_id(tenant, held.node)
            links = [
                ClusterLink(node, services.identity.explain(tenant, held.node, node).path)
                for node in nodes
                if node != held.node
            ]
            resolution = True
        except IdentityResolutionOff:
            held, nodes, unified_id, links, resolution = every[0], [every[0].node], None, [], False
        return {
            "subject": held,
            "identifiers": [Identifier.from_node(n) for n in nodes],
            "unified_id": unified_id,
            "links": links,
            "resolution": resolution,
        }

    # ledger ----------------------------------------------------------------------------------
    @get("/ledger", opt=READERS)
    async def ledger(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        purpose: Annotated[str | None, QueryParameter(max_length=100)] = None,
        notice: Annotated[str | None, QueryParameter(max_length=200)] = None,
        since: Annotated[str | None, QueryParameter(max_length=40)] = None,
        until: Annotated[str | None, QueryParameter(max_length=40)] = None,
        after_seq: Annotated[int, QueryParameter(ge=0, le=2**63 - 1)] = 0,
    ) -> Template:
        chosen = chosen_tenant(services, officer, tenant)
        limit = 100
        found = await asyncio.to_thread(
            services.audit.records,
            tenant=chosen,
            since=parse_time(since or None, "since"),
            until=parse_time(until or None, "until"),
            purpose=purpose or None,
            notice_id=notice or None,
            after_seq=after_seq,
            limit=limit,
        )
        filters = {"purpose": purpose, "notice": notice, "since": since, "until": until}
        await log_access(
            services, officer, "console.ledger", chosen, {**filters, "after_seq": after_seq}, len(found)
        )
        next_query = (
            urlencode(
                {"tenant": chosen, **{k: v for k, v in filters.items() if v}, "after_seq": found[-1].seq}
            )
            if len(found) == limit
            else None
        )
        # checkpoints cover every tenant's records: not for a tenant-scoped officer
        checkpoints = (
            [] if officer.tenants else (await asyncio.to_thread(services.audit.ledger.checkpoints))[-20:]
        )
        return page(
            request,
            "ledger.html",
            tenants=visible_tenants(services, officer),
            tenant=chosen,
            records=found,
            checkpoints=list(reversed(checkpoints)),
            filters=filters,
            next_query=next_query,
            verified=None,
        )

    @post("/ledger/verify", opt=EVERYONE, status_code=200)
    async def verify(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: Annotated[LedgerRequest, Form],
    ) -> Template:
        """The check of ``idgate ledger verify`` over the database. A tenant-scoped officer
        gets the verdict only (the positions describe every tenant's records)."""
        result = await asyncio.to_thread(services.verify_ledger)
        scoped = bool(officer.tenants)
        await log_access(services, officer, "console.ledger_verify", None, {"ok": result.ok}, result.records)
        return page(request, "verify.html", result=result, scoped=scoped)

    @get("/ledger/export", opt=READERS)
    async def export(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        fmt: Annotated[Literal["jsonl", "csv"], QueryParameter(name="format")] = "jsonl",
        part: FromQuery[Literal["records", "checkpoints"]] = "records",
    ) -> Response[bytes]:
        """The API's signed export (``GET /admin/consent/export``), for the chosen tenant."""
        chosen = chosen_tenant(services, officer, tenant)
        scoped = bool(officer.tenants)
        if scoped and part == "checkpoints":
            raise InvalidRequest("invalid_field", "checkpoints cover every tenant's records", "part", 403)
        text = await asyncio.to_thread(
            services.audit.export, tenant=chosen, fmt=fmt, part=part, tenant_only=scoped
        )
        await log_access(
            services,
            officer,
            "console.ledger_export",
            chosen,
            {"format": fmt, "part": part},
            text.count("\n"),
        )
        return export_download(text, chosen, fmt, part)

    # notices and statistics ------------------------------------------------------------------
    @get("/notices", opt=READERS)
    async def notices(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        by: FromQuery[Literal["purpose", "notice", "platform"]] = "purpose",
    ) -> Template:
        """The tenant's privacy-notice versions (ledger records of type ``notice``) and its
        consent rates (the API's ``/admin/consent/stats``)."""
        chosen = chosen_tenant(services, officer, tenant)
        published = await asyncio.to_thread(
            services.audit.ledger.records, tenant=chosen, record_type="notice", limit=1000
        )
        stats = await asyncio.to_thread(services.audit.stats, tenant=chosen, by=by)
        trend = await asyncio.to_thread(
            services.audit.stats_trend, tenant=chosen, by=by, until=datetime.now(UTC), days=RATE_TREND_DAYS
        )
        await log_access(services, officer, "console.notices", chosen, {"by": by}, len(stats.groups))
        return page(
            request,
            "notices.html",
            tenants=visible_tenants(services, officer),
            tenant=chosen,
            notices=[ledger_entry(r) for r in reversed(published)],
            stats=stats,
            trend=trend,
            by=by,
        )

    # identity review -------------------------------------------------------------------------
    @get("/quarantine", opt=EVERYONE)
    async def quarantine(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
    ) -> Template:
        chosen = chosen_tenant(services, officer, tenant)
        context = self._quarantine_context(services, officer, chosen)
        await log_access(services, officer, "console.quarantine", chosen, {}, len(context["held"]))
        return page(request, "quarantine.html", **context, reviewed=None)

    @staticmethod
    def _quarantine_context(services: AdminServices, officer: Officer, tenant: str) -> dict[str, Any]:
        try:
            held, resolution = services.identity.quarantine(tenant, 500), True
        except IdentityResolutionOff:
            held, resolution = [], False
        tenants = visible_tenants(services, officer)
        return {"tenants": tenants, "tenant": tenant, "held": held, "resolution": resolution}

    @post("/quarantine/review", opt=COMPLIANCE, status_code=200)
    async def review(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: Annotated[ReviewForm, Form],
    ) -> Template:
        """Approve (the merge is made through the per-type limits; its notice goes
        downstream) or reject a held link; either way it is in the access log."""
        tenant = chosen_tenant(services, officer, data.tenant or None)
        if data.decision not in ("approve", "reject"):
            raise InvalidRequest("invalid_field", "decision must be approve or reject", "decision")
        a, b = node_identifier(data.a, "a").node, node_identifier(data.b, "b").node
        try:
            done = await services.identity.review(
                tenant, a, b, approve=data.decision == "approve", officer=officer.name
            )
        except NotQuarantined:
            raise NotFoundException(detail="no link between these identifiers is held for review") from None
        params = {"a": a, "b": b, "decision": data.decision, "outcome": done.outcome}
        await log_access(services, officer, "console.quarantine_review", tenant, params, 1)
        context = self._quarantine_context(services, officer, tenant)
        return page(request, "quarantine.html", **context, reviewed=done)


# -- rights requests ---------------------------------------------------------------------------
class OpenRequestForm(msgspec.Struct):
    csrf_token: str = ""
    tenant: str = ""
    kind: str = ""
    type: str = "phone"
    identifier: str = ""
    appid: str = ""
    requested_by: str = "subject"
    channel: str = "app"
    method: str = "sms_code"
    verification_outcome: str = "verified"
    reference: str = ""


class CompleteForm(msgspec.Struct):
    csrf_token: str = ""
    outcome: str = "done"


class ExtendForm(msgspec.Struct):
    csrf_token: str = ""
    working_days: int = 0
    reason: str = ""


class PauseForm(msgspec.Struct):
    csrf_token: str = ""
    reason: str = ""


class BundleForm(msgspec.Struct):
    csrf_token: str = ""


class ResumeForm(msgspec.Struct):
    csrf_token: str = ""


def _choice(value: str, allowed: Any, field: str) -> Any:
    if value not in get_args(allowed):
        raise InvalidRequest("invalid_field", f"{field} must be one of {', '.join(get_args(allowed))}", field)
    return value


CHOICES: dict[str, Any] = {
    "kinds": get_args(RightsKind),
    "requesters": get_args(Requester),
    "channels": get_args(Channel),
    "methods": get_args(VerificationMethod),
    "verification_outcomes": get_args(VerificationOutcome),
    "outcomes": get_args(Outcome),
    "extension_reasons": get_args(ExtensionReason),
    "pause_reasons": get_args(PauseReason),
}


class RightsPagesController(Controller):
    path = f"{CONSOLE_PATH}/rights"
    guards = [console_guard]
    dependencies = DEPENDENCIES
    include_in_schema = False

    @get("/", opt=READERS)
    async def queue(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
    ) -> Template:
        chosen = chosen_tenant(services, officer, tenant)
        found = await rights.list(tenant=chosen)
        # open ones first, by due date; then the closed, latest first
        found.sort(
            key=lambda r: (
                r.status != "open",
                r.due_at.timestamp() if r.status == "open" else -r.received_at.timestamp(),
            )
        )
        await log_access(services, officer, "console.rights", chosen, {}, len(found))
        return page(
            request,
            "rights.html",
            tenants=visible_tenants(services, officer),
            tenant=chosen,
            requests=found,
            types=IDENTIFIER_TYPES,
            **CHOICES,
        )

    @post("/", opt=COMPLIANCE, status_code=303)
    async def open_request(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        data: Annotated[OpenRequestForm, Form],
    ) -> Redirect:
        tenant = chosen_tenant(services, officer, data.tenant or None)
        subject = services.subject(tenant, data.identifier.strip(), data.type, data.appid.strip() or None)
        try:
            verification = msgspec.convert(
                {
                    "method": data.method,
                    "outcome": data.verification_outcome,
                    "reference": data.reference.strip() or None,
                },
                Verification,
            )
        except msgspec.ValidationError as exc:
            raise InvalidRequest("invalid_field", str(exc), "verification") from None
        params: dict[str, Any] = {"subject": subject.value, "type": subject.type, "kind": data.kind}
        try:
            opened = await rights.open(
                tenant=tenant,
                subject=subject,
                kind=_choice(data.kind, RightsKind, "kind"),
                requested_by=_choice(data.requested_by, Requester, "requested_by"),
                channel=_choice(data.channel, Channel, "channel"),
                verification=verification,
                officer=officer.name,
            )
        except RightsError as exc:
            await log_access(services, officer, "console.rights_refused", tenant, params, 0)
            raise rights_refusal(exc) from None
        await log_access(
            services, officer, "console.rights_open", tenant, {**params, "request": opened.request_id}, 1
        )
        return Redirect(
            f"{CONSOLE_PATH}/rights/{opened.request_id}?{urlencode({'tenant': tenant})}", status_code=303
        )

    @get("/{request_id:str}", opt=READERS)
    async def one(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        tenant: FromQuery[str | None] = None,
    ) -> Template:
        chosen = chosen_tenant(services, officer, tenant)
        try:
            found = await rights.get(chosen, request_id)
        except RightsError as exc:
            raise NotFoundException(detail=exc.detail) from None
        await log_access(services, officer, "console.rights_get", chosen, {"request": request_id}, 1)
        return page(request, "rights_request.html", tenant=chosen, r=found, **CHOICES)

    async def _act(
        self,
        services: AdminServices,
        officer: Officer,
        tenant: str,
        request_id: str,
        action: str,
        done: Any,
        **params: Any,
    ) -> Redirect:
        try:
            await done
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(
            services, officer, f"console.rights_{action}", tenant, {"request": request_id, **params}, 1
        )
        return Redirect(
            f"{CONSOLE_PATH}/rights/{request_id}?{urlencode({'tenant': tenant})}", status_code=303
        )

    @post("/{request_id:str}/complete", opt=COMPLIANCE, status_code=303)
    async def complete(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: Annotated[CompleteForm, Form],
        tenant: FromQuery[str | None] = None,
    ) -> Redirect:
        chosen = chosen_tenant(services, officer, tenant)
        outcome = _choice(data.outcome, Outcome, "outcome")
        done = rights.complete(tenant=chosen, request_id=request_id, outcome=outcome, officer=officer.name)
        return await self._act(services, officer, chosen, request_id, "complete", done, outcome=outcome)

    @post("/{request_id:str}/extend", opt=COMPLIANCE, status_code=303)
    async def extend(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: Annotated[ExtendForm, Form],
        tenant: FromQuery[str | None] = None,
    ) -> Redirect:
        chosen = chosen_tenant(services, officer, tenant)
        reason = _choice(data.reason, ExtensionReason, "reason")
        if not 1 <= data.working_days <= 30:
            raise InvalidRequest("invalid_field", "working_days must be 1 to 30", "working_days")
        done = rights.extend(
            tenant=chosen,
            request_id=request_id,
            working_days=data.working_days,
            reason=reason,
            officer=officer.name,
        )
        return await self._act(
            services,
            officer,
            chosen,
            request_id,
            "extend",
            done,
            working_days=data.working_days,
            reason=reason,
        )

    @post("/{request_id:str}/pause", opt=COMPLIANCE, status_code=303)
    async def pause(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: Annotated[PauseForm, Form],
        tenant: FromQuery[str | None] = None,
    ) -> Redirect:
        """Stop the request's clock (``POST /admin/rights/{id}/pause``)."""
        chosen = chosen_tenant(services, officer, tenant)
        reason = _choice(data.reason, PauseReason, "reason")
        done = rights.pause_clock(tenant=chosen, request_id=request_id, reason=reason, officer=officer.name)
        return await self._act(services, officer, chosen, request_id, "pause", done, reason=reason)

    @post("/{request_id:str}/resume", opt=COMPLIANCE, status_code=303)
    async def resume(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: Annotated[ResumeForm, Form],
        tenant: FromQuery[str | None] = None,
    ) -> Redirect:
        """Start the request's clock again (``POST /admin/rights/{id}/resume``)."""
        chosen = chosen_tenant(services, officer, tenant)
        done = rights.resume_clock(tenant=chosen, request_id=request_id, officer=officer.name)
        return await self._act(services, officer, chosen, request_id, "resume", done)

    @post("/{request_id:str}/bundle", opt=COMPLIANCE, status_code=200)
    async def bundle(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: Annotated[BundleForm, Form],
        tenant: FromQuery[str | None] = None,
    ) -> Response[bytes]:
        """The signed access bundle (``POST /admin/rights/{id}/bundle``), as a download."""
        chosen = chosen_tenant(services, officer, tenant)
        try:
            document = await rights.bundle(tenant=chosen, request_id=request_id, officer=officer.name)
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(services, officer, "console.rights_bundle", chosen, {"request": request_id}, 1)
        return bundle_download(document, request_id)
