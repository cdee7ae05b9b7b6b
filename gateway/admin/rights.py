"""Compliance API of data-subject rights requests (consent.rights): open, list, answer.

Thin handlers: check the tenant scope, pseudonymise the subject (the raw identifier an officer
names never goes further than this module), call ``RightsService`` (on ``app.state.rights``),
write the access log, return typed views. Compliance role only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, FromQuery, JSONBody

from consent.rights import (
    Channel,
    ExtensionReason,
    Outcome,
    PauseReason,
    Requester,
    RightsError,
    RightsKind,
    RightsRequest,
    RightsService,
    Verification,
)
from consent.rights_bundle import bundle_csv, bundle_digest
from gateway.admin.deps import ADMIN_DEPENDENCIES, READ_ERRORS, AdminServices, log_access
from gateway.admin.schemas import IdentifierRef, TenantId
from gateway.auth import Officer, admin_guard, roles
from gateway.errors import InvalidRequest
from gateway.openapi import answered_also_as, error_responses


class OpenRightsRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """A data subject's request as the officer took it."""

    tenant: TenantId
    kind: RightsKind
    subject: IdentifierRef
    requested_by: Requester
    channel: Channel
    verification: Verification
    # When the request reached the company (a letter received last week); default: now.
    received_at: datetime | None = None
    # A correct request: the right value of the subject identifier (e.g. the phone as it should be).
    correction: IdentifierRef | None = None


class CompleteRightsRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId
    outcome: Outcome


class ExtendRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId
    working_days: Annotated[int, msgspec.Meta(ge=1, le=30)]
    reason: ExtensionReason


class PauseClockRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId
    reason: PauseReason


class ResumeClockRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId


class BundleRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId
    # json: the signed bundle; csv: one tabular part of it (``part``), derived from the signed
    # JSON whose SHA-256 the X-Bundle-SHA256 header names
    format: Literal["json", "csv"] = "json"
    part: Literal["identifiers", "consentHistory", "deliveries", "heldEvents"] = "consentHistory"


class RightsList(msgspec.Struct, rename="camel"):
    requests: list[RightsRequest]
    open: int
    overdue: int
    nearly_due: int
    paused: int


_DESCRIBED = {
    503: "The database or Redis is unavailable: nothing was done; retry after `Retry-After` seconds",
    404: "No rights request with this id for this tenant",
    409: "The request is not open (already completed or refused), not of the kind this needs, or its "
    "clock is already paused (pause) or not paused (resume)",
    422: "The subject's identity is not verified: the request is refused and recorded (PIPL Art. 50)",
}
OPEN_ERRORS = error_responses(400, 401, 403, 413, 422, 503, described=_DESCRIBED)
ONE_ERRORS = error_responses(400, 401, 403, 404, 503, described=_DESCRIBED)
ACT_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 503, described=_DESCRIBED)


def provide_rights(state: State) -> RightsService:
    service: RightsService = state.rights
    return service


def rights_refusal(exc: RightsError) -> InvalidRequest:
    """A rights domain error as the 4xx it answers."""
    return InvalidRequest(exc.error, exc.detail, exc.field, exc.status)


def bundle_download(document: dict[str, Any], request_id: str) -> Response[bytes]:
    """A signed access bundle as a file to save (the API's and the console's)."""
    return Response(
        json.dumps(document, ensure_ascii=False, sort_keys=True).encode(),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{request_id}.json"'},
    )


class RightsController(Controller):
    path = "/admin/rights"
    tags = ["compliance"]
    guards = [admin_guard]
    dependencies = {**ADMIN_DEPENDENCIES, "rights": Provide(provide_rights, sync_to_thread=False)}
    security = [{"AdminToken": []}]

    @post(
        "/",
        status_code=201,
        responses=OPEN_ERRORS,
        summary="Open a data-subject rights request (PIPL Art. 44-50)",
        opt=roles("compliance"),
    )
    async def open_request(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        data: JSONBody[OpenRightsRequest],
    ) -> RightsRequest:
        """Compliance role. The subject is named by a raw identifier, pseudonymised here. A
        request whose subject's identity is not verified is refused (422) and recorded with
        its reason; ``withdraw_all`` and ``delete`` are carried out before the answer (a
        ``delete`` then stays open until every destination that held the person's data has
        its receipt: ``receipts`` and ``remaining`` show what it waits for)."""
        services.tokens.check_tenant(officer, data.tenant)
        subject = services.subject_of(officer, data.tenant, data.subject, "subject")
        correction = (
            services.subject_of(officer, data.tenant, data.correction, "correction")
            if data.correction
            else None
        )
        received = data.received_at
        if received is not None:
            received = received.replace(tzinfo=UTC) if received.tzinfo is None else received.astimezone(UTC)
        params: dict[str, Any] = {"subject": subject.value, "type": subject.type, "kind": data.kind}
        try:
            request = await rights.open(
                tenant=data.tenant,
                subject=subject,
                kind=data.kind,
                requested_by=data.requested_by,
                channel=data.channel,
                verification=data.verification,
                officer=officer.name,
                received_at=received,
                correction=correction,
            )
        except RightsError as exc:
            await log_access(services, officer, "rights.refused", data.tenant, params, 0)
            raise rights_refusal(exc) from None
        await log_access(
            services, officer, "rights.open", data.tenant, {**params, "request": request.request_id}, 1
        )
        return request

    @get("/", responses=READ_ERRORS, summary="Rights requests, with their due dates", opt=roles("compliance"))
    async def list_requests(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        status: FromQuery[Literal["open", "refused", "completed"] | None] = None,
        clock: FromQuery[Literal["on_time", "nearly_due", "overdue", "paused", "closed"] | None] = None,
    ) -> RightsList:
        """``clock`` of an open request: ``overdue`` past its due time, ``nearly_due`` within
        ``[rights] nearly_due_working_days`` working days of it, ``paused`` while its clock is
        stopped (neither overdue nor nearly due; ``workingDaysLeft`` as when it was paused)."""
        if tenant is None and officer.tenants:
            raise PermissionDeniedException(detail="a tenant-scoped officer must name the tenant")
        if tenant is not None:
            services.tokens.check_tenant(officer, tenant)
        found = await rights.list(tenant=tenant, status=status, clock=clock)
        await log_access(
            services, officer, "rights.list", tenant, {"status": status, "clock": clock}, len(found)
        )
        return RightsList(
            requests=found,
            open=sum(1 for r in found if r.status == "open"),
            overdue=sum(1 for r in found if r.clock == "overdue"),
            nearly_due=sum(1 for r in found if r.clock == "nearly_due"),
            paused=sum(1 for r in found if r.clock == "paused"),
        )

    @get("/{request_id:str}", responses=ONE_ERRORS, summary="One rights request", opt=roles("compliance"))
    async def get_request(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        tenant: FromQuery[str],
    ) -> RightsRequest:
        services.tokens.check_tenant(officer, tenant)
        try:
            request = await rights.get(tenant, request_id)
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(services, officer, "rights.get", tenant, {"request": request_id}, 1)
        return request

    @post(
        "/{request_id:str}/complete",
        status_code=200,
        responses=ACT_ERRORS,
        summary="Answer an open rights request (records when, and how long it took)",
        opt=roles("compliance"),
    )
    async def complete(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: JSONBody[CompleteRightsRequest],
    ) -> RightsRequest:
        services.tokens.check_tenant(officer, data.tenant)
        try:
            request = await rights.complete(
                tenant=data.tenant, request_id=request_id, outcome=data.outcome, officer=officer.name
            )
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(
            services,
            officer,
            "rights.complete",
            data.tenant,
            {"request": request_id, "outcome": data.outcome},
            1,
        )
        return request

    @post(
        "/{request_id:str}/bundle",
        status_code=200,
        responses=ACT_ERRORS,
        summary="The signed bundle of what idgate holds on the person (access, copy)",
        opt=roles("compliance"),
        media_type="application/json",
        operation_class=answered_also_as("text/csv"),
    )
    async def bundle(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: JSONBody[BundleRequest],
    ) -> Response[bytes]:
        """Compliance role, for an ``access`` or ``copy`` request: identifiers (pseudonyms and
        types), consent history with notice versions, the deliveries that relied on consent,
        events still held, the destinations that received the person's data; signed with
        the ledger key (``idgate rights verify-bundle`` checks it offline). Recorded as a
        step of the request with the bundle's SHA-256; an open request is then completed."""
        services.tokens.check_tenant(officer, data.tenant)
        try:
            document = await rights.bundle(tenant=data.tenant, request_id=request_id, officer=officer.name)
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(
            services,
            officer,
            "rights.bundle",
            data.tenant,
            {"request": request_id},
            len(document["bundle"]["consentHistory"]) + len(document["bundle"]["heldEvents"]),
        )
        if data.format == "csv":
            digest = bundle_digest(document["bundle"])
            return Response(
                bundle_csv(document["bundle"], data.part).encode(),
                media_type="text/csv",
                headers={
                    "Content-Disposition": f'attachment; filename="{request_id}-{data.part}.csv"',
                    "X-Bundle-SHA256": digest,
                },
            )
        return bundle_download(document, request_id)

    @post(
        "/{request_id:str}/extend",
        status_code=200,
        responses=ACT_ERRORS,
        summary="Move an open request's due date, with a reason",
        opt=roles("compliance"),
    )
    async def extend(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: JSONBody[ExtendRequest],
    ) -> RightsRequest:
        """``reason``: ``complex_request``, ``many_requests``, ``awaiting_subject`` or
        ``awaiting_third_party``; the previous due date stays in the ledger."""
        services.tokens.check_tenant(officer, data.tenant)
        try:
            request = await rights.extend(
                tenant=data.tenant,
                request_id=request_id,
                working_days=data.working_days,
                reason=data.reason,
                officer=officer.name,
            )
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(
            services,
            officer,
            "rights.extend",
            data.tenant,
            {"request": request_id, "working_days": data.working_days, "reason": data.reason},
            1,
        )
        return request

    @post(
        "/{request_id:str}/pause",
        status_code=200,
        responses=ACT_ERRORS,
        summary="Stop an open request's clock while waiting on the subject",
        opt=roles("compliance"),
    )
    async def pause(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: JSONBody[PauseClockRequest],
    ) -> RightsRequest:
        """``reason``: ``awaiting_identity_proof`` or ``awaiting_clarification``. Until it is
        resumed the request's ``clock`` is ``paused``: not overdue, not nearly due, its
        ``workingDaysLeft`` as they were. 409 ``already_paused`` when it is paused,
        ``not_open`` when it is completed or refused."""
        services.tokens.check_tenant(officer, data.tenant)
        try:
            request = await rights.pause_clock(
                tenant=data.tenant, request_id=request_id, reason=data.reason, officer=officer.name
            )
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(
            services, officer, "rights.pause", data.tenant, {"request": request_id, "reason": data.reason}, 1
        )
        return request

    @post(
        "/{request_id:str}/resume",
        status_code=200,
        responses=ACT_ERRORS,
        summary="Start a paused request's clock again (its due date moves by the days paused)",
        opt=roles("compliance"),
    )
    async def resume(
        self,
        services: NamedDependency[AdminServices],
        rights: NamedDependency[RightsService],
        officer: NamedDependency[Officer],
        request_id: FromPath[str],
        data: JSONBody[ResumeClockRequest],
    ) -> RightsRequest:
        """The due date moves by the working days after the day of the pause, up to and
        including today (none when resumed the day it was paused); the step records them and
        the previous due date. 409 ``not_paused`` when the clock is running."""
        services.tokens.check_tenant(officer, data.tenant)
        try:
            request = await rights.resume_clock(
                tenant=data.tenant, request_id=request_id, officer=officer.name
            )
        except RightsError as exc:
            raise rights_refusal(exc) from None
        await log_access(services, officer, "rights.resume", data.tenant, {"request": request_id}, 1)
        return request
