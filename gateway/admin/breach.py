"""Compliance API of the breach query (PIPL Art. 57): whose data, for which purposes and how
many events went to a destination in a window (consent.breach), to notify the people
concerned. Subjects are pseudonyms and unified IDs, never raw identifiers. Compliance role
only; every query is in the access log.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from consent.breach import BreachQueryError, BreachReport, breach_report
from consent.proofs import DeliveryProofs
from gateway.admin.deps import ADMIN_DEPENDENCIES, READ_ERRORS, AdminServices, log_access, parse_time
from gateway.auth import Officer, admin_guard, roles
from gateway.config import Config
from gateway.errors import InvalidRequest
from identity.service import IdentityResolutionOff

# ISO 8601 times (a time without offset is UTC), parsed by parse_time into a 400 naming the field
_EDGE = {"schema_extra": {"format": "date-time"}, "description": "ISO 8601 (a time without offset is UTC)"}


def _proofs(state: State) -> DeliveryProofs:
    proofs: DeliveryProofs = state.proofs
    return proofs


class BreachController(Controller):
    path = "/admin/breach"
    tags = ["compliance"]
    guards = [admin_guard]
    dependencies = {**ADMIN_DEPENDENCIES, "proofs": Provide(_proofs, sync_to_thread=False)}
    security = [{"AdminToken": []}]

    @get(
        "/",
        responses=READ_ERRORS,
        summary="Breach query (PIPL Art. 57): who, what purposes, how many events went to a destination",
        opt=roles("compliance"),
    )
    async def breach(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        proofs: NamedDependency[DeliveryProofs],
        tenant: Annotated[str, QueryParameter(max_length=63)],
        destination: Annotated[str, QueryParameter(max_length=63)],
        start: Annotated[str, QueryParameter(name="from", **_EDGE)],
        end: Annotated[str, QueryParameter(name="to", **_EDGE)],
    ) -> BreachReport:
        """Compliance role. The deliveries to ``destination`` in [from, to) that relied on
        consent (the delivery proofs), by subject (the consenting identifier's pseudonym and
        the person's unified ID) and purpose. A window spans at most 366 days; 400 names the
        field (``from``, ``to``, ``destination``) of a bad query."""
        services.tokens.check_tenant(officer, tenant)
        report = await asyncio.to_thread(
            breach_query,
            services.config,
            proofs,
            tenant=tenant,
            destination=destination,
            start=start,
            end=end,
        )
        report = with_unified_ids(services, tenant, report)
        await log_access(
            services, officer, "breach.query", tenant, access_params(report), len(report.subjects)
        )
        return report


def breach_query(
    config: Config, proofs: DeliveryProofs, *, tenant: str, destination: str, start: str, end: str
) -> BreachReport:
    """The breach report of a query as an officer writes it (the API's and the CLI's): a 400
    ``InvalidRequest`` naming the field (``destination``, ``from``, ``to``) otherwise.
    Blocking; the tenant is known and the caller's to see."""
    found = next(t for t in config.tenants if t.id == tenant)
    dest = next((d for d in found.destinations if d.id == destination), None)
    if dest is None:
        raise InvalidRequest(
            "invalid_field", f"tenant {tenant!r} has no destination {destination!r}", "destination"
        )
    moment_from, moment_to = parse_time(start, "from"), parse_time(end, "to")
    if moment_from is None or moment_to is None:  # parse_time answers None only for None
        raise InvalidRequest(
            "invalid_field", "from and to are required", "from" if moment_from is None else "to"
        )
    try:
        return breach_report(
            proofs,
            tenant=tenant,
            destination=destination,
            destination_purposes=dest.purposes,
            start=moment_from,
            end=moment_to,
        )
    except BreachQueryError as exc:
        raise InvalidRequest("invalid_field", exc.detail, exc.field) from None


def access_params(report: BreachReport) -> dict[str, str]:
    """What the access log keeps of a breach query."""
    return {"destination": report.destination, "from": report.start.isoformat(), "to": report.end.isoformat()}


def with_unified_ids(services: AdminServices, tenant: str, report: BreachReport) -> BreachReport:
    """The report with each subject's person (unified ID) and the count of distinct persons."""
    try:
        services.identity.graph(tenant)  # IdentityResolutionOff for a tenant without a graph
        subjects = [
            msgspec.structs.replace(s, unified_id=services.identity.unified_id(tenant, s.subject))
            for s in report.subjects
        ]
    except IdentityResolutionOff:
        return report
    persons = len({s.unified_id for s in subjects})
    return msgspec.structs.replace(report, subjects=subjects, persons=persons)
