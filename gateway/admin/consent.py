"""Compliance API over the consent store: records, point-in-time views, exports, statistics,
verification, notices, and the access log of officers' own queries.

Thin handlers: check the tenant scope, pseudonymise the subject, call the consent domain
(consent.audit, consent.service), write the access log, return typed views.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromQuery, JSONBody, QueryParameter

from consent.audit import ConsentStats, ExportFormat, ExportPart, StatsGroup, SubjectView
from consent.service import ConsentRefused
from consent.verify import VerifyResult
from gateway.admin.deps import (
    ADMIN_DEPENDENCIES,
    ADMIN_ERRORS,
    READ_ERRORS,
    WRITE_ERRORS,
    AdminServices,
    log_access,
    parse_time,
)
from gateway.admin.schemas import AccessLogPage, NoticePublished, NoticeRequest, RecordsPage
from gateway.auth import Officer, admin_guard, roles
from gateway.openapi import answered_also_as

Limit = Annotated[int, QueryParameter(ge=1, le=5000, description="at most this many")]
# ISO 8601 times (a time without offset is UTC), parsed by parse_time into a 400 naming the field.
Time = Annotated[str | None, QueryParameter(schema_extra={"format": "date-time"}, description="ISO 8601")]
# The ledger's sequence numbers are 64-bit signed integers (the maximum repeated as an int:
# Litestar documents bounds as floats, and 2**63 - 1 is not one).
MAX_SEQ = 2**63 - 1
AfterSeq = Annotated[
    int,
    QueryParameter(
        ge=0,
        le=MAX_SEQ,
        schema_extra={"maximum": MAX_SEQ},
        description="continue after this sequence number (nextAfterSeq)",
    ),
]


def export_download(text: str, tenant: str | None, fmt: ExportFormat, part: ExportPart) -> Response[bytes]:
    """A ledger export as a file to save (the API's and the console's)."""
    media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    name = f"consent-ledger-{tenant or 'all'}{'-checkpoints' if part == 'checkpoints' else ''}.{fmt}"
    return Response(
        text.encode(), media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


class ConsentAuditController(Controller):
    path = "/admin"
    tags = ["compliance"]
    guards = [admin_guard]
    dependencies = ADMIN_DEPENDENCIES
    security = [{"AdminToken": []}]

    @get(
        "/consent/records",
        responses=READ_ERRORS,
        summary="Consent records of a subject, time range, purpose or notice",
        opt=roles("compliance"),
    )
    async def records(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        identifier: FromQuery[str | None] = None,
        id_type: Annotated[str, QueryParameter(name="type")] = "user_id",
        appid: FromQuery[str | None] = None,
        since: Time = None,
        until: Time = None,
        purpose: FromQuery[str | None] = None,
        notice: FromQuery[str | None] = None,
        after_seq: AfterSeq = 0,
        limit: Limit = 500,
    ) -> RecordsPage:
        """Compliance role. A raw identifier is pseudonymised server-side; only the
        pseudonym is stored or logged."""
        services.tokens.check_tenant(officer, tenant)
        every = services.subjects(tenant, identifier, id_type, appid) if identifier else []
        node = every[0].node if every else None
        found = await asyncio.to_thread(
            services.audit.records,
            tenant=tenant,
            node=node,
            aliases=[i.node for i in every[1:]],
            since=parse_time(since, "since"),
            until=parse_time(until, "until"),
            purpose=purpose,
            notice_id=notice,
            after_seq=after_seq,
            limit=limit,
        )
        subject = node.partition(":")[2] if node else None
        params = {
            "subject": subject,
            "type": id_type,
            "since": since,
            "until": until,
            "purpose": purpose,
            "notice": notice,
            "after_seq": after_seq,
        }
        await log_access(services, officer, "consent.records", tenant, params, len(found))
        return RecordsPage(
            subject=subject, records=found, next_after_seq=found[-1].seq if len(found) == limit else None
        )

    @get(
        "/consent/subject",
        responses=READ_ERRORS,
        summary="Point in time: what a subject allowed, and which deliveries relied on it",
        opt=roles("compliance"),
    )
    async def subject_at(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        identifier: FromQuery[str],
        id_type: Annotated[str, QueryParameter(name="type")] = "user_id",
        appid: FromQuery[str | None] = None,
        at: Time = None,
    ) -> SubjectView:
        services.tokens.check_tenant(officer, tenant)
        every = services.subjects(tenant, identifier, id_type, appid)
        subject = every[0]
        moment = parse_time(at, "at") or datetime.now(UTC)
        view = await asyncio.to_thread(
            services.audit.subject_at,
            tenant=tenant,
            node=subject.node,
            at=moment,
            aliases=[i.node for i in every[1:]],
        )
        params = {"subject": subject.value, "type": id_type, "at": moment.isoformat()}
        await log_access(services, officer, "consent.subject_at", tenant, params, view.records)
        return view

    @get(
        "/consent/export",
        responses=READ_ERRORS,
        summary="Ledger export: JSONL with checkpoints, or CSV (records or checkpoints)",
        opt=roles("compliance"),
        media_type="application/x-ndjson",
        operation_class=answered_also_as("text/csv"),
    )
    async def export(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str | None] = None,
        fmt: Annotated[ExportFormat, QueryParameter(name="format")] = "jsonl",
        part: FromQuery[ExportPart] = "records",
    ) -> Response[bytes]:
        """JSONL carries records, signed checkpoints and a seal (``idgate ledger verify`` checks
        it offline). CSV comes in two parts: ``part=records`` and ``part=checkpoints``. A
        tenant-scoped officer gets the tenant's records only: no checkpoints (their ranges
        count every tenant's records; ``part=checkpoints`` is 403) and ``ledger_last_seq``
        is the tenant's own last record."""
        if tenant is None and officer.tenants:
            raise PermissionDeniedException(detail="a tenant-scoped officer must name the tenant")
        if tenant is not None:
            services.tokens.check_tenant(officer, tenant)
        scoped = bool(officer.tenants)
        if scoped and fmt == "csv" and part == "checkpoints":
            raise PermissionDeniedException(
                detail="checkpoints cover every tenant's records: a tenant-scoped officer may not read them"
            )
        text = await asyncio.to_thread(
            services.audit.export, tenant=tenant, fmt=fmt, part=part, tenant_only=scoped
        )
        lines = text.count("\n")
        await log_access(services, officer, "consent.export", tenant, {"format": fmt, "part": part}, lines)
        return export_download(text, tenant, fmt, part)

    @get(
        "/consent/stats",
        summary="Consent rates by purpose, notice or platform",
        opt=roles("compliance"),
        responses=READ_ERRORS,
    )
    async def stats(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        by: FromQuery[StatsGroup] = "purpose",
        at: Time = None,
    ) -> ConsentStats:
        """``at``: the rates as they stood then (only records written by that time count)."""
        services.tokens.check_tenant(officer, tenant)
        moment = parse_time(at, "at")
        result = await asyncio.to_thread(services.audit.stats, tenant=tenant, by=by, at=moment)
        params = {"by": by} if moment is None else {"by": by, "at": moment.isoformat()}
        await log_access(services, officer, "consent.stats", tenant, params, len(result.groups))
        return result

    @get(
        "/consent/verify",
        responses=ADMIN_ERRORS,
        summary="Verify the ledger's hash chain and signed checkpoints",
        opt=roles("operator", "compliance"),
    )
    async def verify(
        self, services: NamedDependency[AdminServices], officer: NamedDependency[Officer]
    ) -> VerifyResult:
        """The whole ledger (its chain is global). A tenant-scoped officer gets the verdict
        only (``ok``, ``problem``, ``complete``, key ids): the counts, positions and details
        describe every tenant's records and are withheld."""
        result: VerifyResult = await asyncio.to_thread(services.verify_ledger)
        if officer.tenants:
            result = VerifyResult(
                ok=result.ok,
                records=0,
                checkpoints=0,
                problem=result.problem,
                complete=result.complete,
                key_ids=result.key_ids,
            )
        await log_access(services, officer, "consent.verify", None, {}, result.records)
        return result

    @get(
        "/access-log",
        summary="Officers' queries of personal data",
        opt=roles("compliance"),
        responses=READ_ERRORS,
    )
    async def access_log(
        self, services: NamedDependency[AdminServices], officer: NamedDependency[Officer], limit: Limit = 200
    ) -> AccessLogPage:
        entries = await asyncio.to_thread(services.access_log.entries, limit=limit, tenants=officer.tenants)
        await log_access(services, officer, "admin.access_log", None, {"limit": limit}, len(entries))
        return AccessLogPage(entries=entries)


class NoticesController(Controller):
    path = "/admin/notices"
    tags = ["operations"]
    guards = [admin_guard]
    dependencies = ADMIN_DEPENDENCIES
    security = [{"AdminToken": []}]

    @post(
        "/",
        summary="Publish a privacy-notice version",
        status_code=201,
        opt=roles("operator"),
        responses=WRITE_ERRORS,
    )
    async def publish(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: JSONBody[NoticeRequest],
    ) -> NoticePublished:
        """Operator role. A material notice sends the purposes it changes (all when none are
        named) back to re-consent for everyone who agreed to an older version."""
        services.tokens.check_tenant(officer, data.tenant)
        receipt = await services.consent.publish_notice(
            data.tenant,
            data.id,
            data.content_sha256,
            material=data.material,
            purposes_changed=data.purposes_changed,
            actor=f"admin:{officer.name}",
        )
        if receipt is None:
            raise ConsentRefused(f"notice {data.id!r} is already published", "id")
        await log_access(
            services,
            officer,
            "notice.publish",
            data.tenant,
            {"notice": data.id, "material": data.material},
            1,
        )
        return NoticePublished(
            notice_id=data.id, seq=receipt.seq, record_id=receipt.record_id, material=data.material
        )
