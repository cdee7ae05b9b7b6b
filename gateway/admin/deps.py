"""What the admin controllers get injected, and the helpers they share.

Services live on ``app.state.services`` (opened by the app's lifespan); the controllers
ask for them by name (``audit``, ``access_log``, ``identity``, ...) and for the calling
``officer`` that ``gateway.auth.admin_guard`` authenticated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from consent.access_log import AccessLog
from consent.audit import ConsentAudit
from consent.service import ConsentService
from export.domains import DomainRekeyer
from gateway.admin.schemas import IdentifierRef
from gateway.auth import AdminTokens, Officer
from gateway.config import Config
from gateway.errors import InvalidRequest
from gateway.openapi import error_responses
from identity.identifiers import IDENTIFIER_TYPES, SCOPED_TYPES, Identifier, InvalidIdentifier
from identity.pseudonym import KeyRing, pseudonymise_identifier_aliases
from identity.service import IdentityResolutionOff, IdentityService


@dataclass
class AdminServices:
    """The domain services the admin API calls (put on ``app.state.services``)."""

    config: Config
    keyring: KeyRing
    tokens: AdminTokens
    audit: ConsentAudit
    access_log: AccessLog
    consent: ConsentService
    identity: IdentityService
    # tenant -> destination -> its pseudonym domain
    rekeyers: Mapping[str, Mapping[str, DomainRekeyer]]
    verify_ledger: Any  # () -> VerifyResult, blocking

    def by_destination(self, tenant: str, unified_id: str | None) -> dict[str, str | None]:
        """The unified ID as each destination of the tenant knows it (its pseudonym domain)."""
        return {d: r.value(unified_id) if unified_id else None for d, r in self.rekeyers[tenant].items()}

    def subject(
        self,
        tenant: str,
        raw: str,
        id_type: str,
        appid: str | None,
        *,
        fields: tuple[str, str, str] = ("identifier", "type", "appid"),
    ) -> Identifier:
        """A raw identifier named by an officer, pseudonymised with the tenant's active key;
        a 400 naming the field (``fields``: the names of the value, type and appid) otherwise."""
        return self.subjects(tenant, raw, id_type, appid, fields=fields)[0]

    def subjects(
        self,
        tenant: str,
        raw: str,
        id_type: str,
        appid: str | None,
        *,
        fields: tuple[str, str, str] = ("identifier", "type", "appid"),
    ) -> list[Identifier]:
        """The identifier under every live key version, the active one first: what was
        stored before a key rotation is found under its old pseudonym."""
        first, older = self._pseudonymise(tenant, raw, id_type, appid, fields)
        return [first, *(Identifier(first.type, value) for value in older)]

    def graph_subjects(self, tenant: str, ref_subjects: list[Identifier]) -> list[Identifier]:
        """Of an identifier's live-version pseudonyms, those the identity graph holds; when
        it holds none, the oldest (a never-linked identifier's unified ID derives from it)."""
        try:
            graph = self.identity.graph(tenant)
        except IdentityResolutionOff:  # the caller reports it
            return ref_subjects[:1]
        held = [i for i in ref_subjects if i.node in graph]
        return held or ref_subjects[-1:]

    def _pseudonymise(
        self, tenant: str, raw: str, id_type: str, appid: str | None, fields: tuple[str, str, str]
    ) -> tuple[Identifier, tuple[str, ...]]:
        id_field, type_field, appid_field = fields
        if id_type not in IDENTIFIER_TYPES:
            raise InvalidRequest("invalid_field", f"unknown identifier type {id_type!r}", type_field)
        if id_type in SCOPED_TYPES and not appid:
            raise InvalidRequest(
                "invalid_field", "a WeChat openid needs the appid it belongs to", appid_field
            )
        try:
            return pseudonymise_identifier_aliases(
                self.keyring.pseudonymiser(tenant),
                self.keyring.older_pseudonymisers(tenant),
                id_type,
                raw,
                scope=appid if id_type in SCOPED_TYPES else None,
            )
        except InvalidIdentifier as exc:
            raise InvalidRequest("invalid_identifier", exc.reason, id_field) from None

    def subject_of(self, tenant: str, ref: IdentifierRef, where: str) -> Identifier:
        return self.subject(
            tenant, ref.id, ref.type, ref.appid, fields=(where, f"{where}.type", f"{where}.appid")
        )

    def graph_subjects_of(self, tenant: str, ref: IdentifierRef, where: str) -> list[Identifier]:
        """``graph_subjects`` of an identifier named in a request body."""
        every = self.subjects(
            tenant, ref.id, ref.type, ref.appid, fields=(where, f"{where}.type", f"{where}.appid")
        )
        return self.graph_subjects(tenant, every)


def _officer(request: Request[Any, Any, Any]) -> Officer:
    officer: Officer = request.state.officer
    return officer


def provide_services(state: State) -> AdminServices:
    services: AdminServices = state.services
    return services


# What the admin routes answer besides success (all ErrorBody): 401 without a known bearer
# token, 403 for the wrong role or tenant (admin_guard), 400 for a bad parameter or body, 413
# for a body over the gateway's request size limit, 503 while the database or Redis is down.
_UNAVAILABLE = {
    503: "The database or Redis is unavailable: nothing was done; retry after `Retry-After` seconds"
}
ADMIN_ERRORS = error_responses(401, 403, 503, described=_UNAVAILABLE)
READ_ERRORS = error_responses(400, 401, 403, 503, described=_UNAVAILABLE)
WRITE_ERRORS = error_responses(400, 401, 403, 413, 503, described=_UNAVAILABLE)

ADMIN_DEPENDENCIES = {
    "services": Provide(provide_services, sync_to_thread=False),
    "officer": Provide(_officer, sync_to_thread=False),
}


async def log_access(
    services: AdminServices,
    officer: Officer,
    action: str,
    tenant: str | None,
    params: Mapping[str, Any],
    count: int,
) -> None:
    """Every officer query is itself recorded (params hold pseudonyms, never raw identifiers)."""
    await asyncio.to_thread(
        services.access_log.write,
        officer=officer.name,
        role=officer.role,
        action=action,
        tenant=tenant,
        params=params,
        count=count,
    )


def parse_time(value: str | None, field: str) -> datetime | None:
    """An ISO 8601 time as UTC (a time without offset is UTC); a 400 naming ``field`` otherwise,
    also for one that has no UTC equivalent (``0001-01-01T00:00:00+01:00``)."""
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("invalid_field", f"{field} must be an ISO 8601 time", field) from None
    try:
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest("invalid_field", f"{field} is out of range in UTC", field) from None
