"""What the admin controllers get injected, and the helpers they share.

Services live on ``app.state.services`` (opened by the app's lifespan); the controllers
ask for them by name (``audit``, ``access_log``, ``identity``, ...) and for the calling
``officer`` that ``gateway.auth.admin_guard`` authenticated.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import structlog
from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import PermissionDeniedException
from litestar.types import Scope

from consent.access_log import AccessLog
from consent.audit import ConsentAudit
from consent.service import ConsentService
from export.domains import DomainRekeyer
from gateway.admin.schemas import IdentifierRef
from gateway.auth import AdminTokens, Officer
from gateway.config import Config
from gateway.errors import InvalidRequest
from gateway.openapi import error_responses
from gateway.rate_limits import client_ip, may_log_refusal
from identity.identifiers import IDENTIFIER_TYPES, SCOPED_TYPES, Identifier, InvalidIdentifier
from identity.pseudonym import KeyRing, pseudonymise_identifier_aliases
from identity.service import IdentityResolutionOff, IdentityService

log = structlog.get_logger("idgate.admin")


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

    def subject_of(self, officer: Officer, tenant: str, ref: IdentifierRef, where: str) -> Identifier:
        """A body's identifier: its node id, or (compliance only) the raw identifier."""
        if ref.node is not None:
            if ref.id is not None or ref.type is not None:
                raise InvalidRequest("invalid_field", "name either node or type and id, not both", where)
            return node_identifier(ref.node, f"{where}.node")
        if ref.id is None or ref.type is None:
            raise InvalidRequest("invalid_field", "needs node, or type and id", where)
        require_raw_lookup(officer, f"{where}.id")
        return self.subject(
            tenant, ref.id, ref.type, ref.appid, fields=(f"{where}.id", f"{where}.type", f"{where}.appid")
        )

    def graph_subjects_of(
        self, officer: Officer, tenant: str, ref: IdentifierRef, where: str
    ) -> list[Identifier]:
        """A body's identifier as the graph holds it: its node id, or (compliance only) the
        raw identifier under every live key version (``graph_subjects``)."""
        if ref.node is not None or ref.id is None or ref.type is None:
            return [self.subject_of(officer, tenant, ref, where)]
        require_raw_lookup(officer, f"{where}.id")
        every = self.subjects(
            tenant, ref.id, ref.type, ref.appid, fields=(f"{where}.id", f"{where}.type", f"{where}.appid")
        )
        return self.graph_subjects(tenant, every)


_PSEUDONYM = re.compile(r"^k[0-9]{1,6}\.[A-Za-z0-9_-]{22}$")


def node_identifier(node: str, field: str) -> Identifier:
    """A node id (``<type>:<pseudonym>``) an officer names; a 400 naming ``field`` otherwise."""
    try:
        ident = Identifier.from_node(node)
    except ValueError:
        ident = None
    if ident is None or ident.type not in IDENTIFIER_TYPES or not _PSEUDONYM.match(ident.value):
        raise InvalidRequest(
            "invalid_field",
            "a node id is '<type>:<pseudonym>' as the quarantine list and explain show it "
            "(raw identifiers: the compliance role, with the type given)",
            field,
        )
    return ident


def require_raw_lookup(officer: Officer, field: str) -> None:
    """Turning a raw identifier into its pseudonym is a look-up of personal data: the
    compliance role's (and logged). Operators work on node ids."""
    if officer.role != "compliance":
        raise PermissionDeniedException(
            detail=f"{field}: raw identifiers are looked up by the compliance role; "
            f"{officer.name} has {officer.role}: name node ids ('<type>:<pseudonym>') instead"
        )


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


async def log_refused_admin_request(exc: Exception, scope: Scope) -> None:
    """An app ``after_exception`` hook: every admin or console request refused 401 or 403 (no or an
    unknown token, the wrong role, another tenant, a raw look-up by an operator) is in the
    access log too, with who asked when known, the method and path (never the query
    string, which may hold raw identifiers) and the reason."""
    path = str(scope.get("path", ""))
    if not path.startswith(("/admin", "/console")):
        return
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if status not in (401, 403):
        return
    services: AdminServices | None = getattr(scope["app"].state, "services", None)
    if services is None:
        return
    officer = (scope.get("state") or {}).get("officer")
    asked = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1")).get("tenant", [None])[0]
    known = {t.id for t in services.config.tenants}
    params = {
        "status": status,
        "method": scope.get("method", ""),
        "path": path[:200],
        "reason": str(getattr(exc, "detail", "") or exc)[:300],
    }
    limiter = getattr(scope["app"].state, "rate_limiter", None)
    try:
        if not await may_log_refusal(limiter, client_ip(scope, services.config.rate_limits.forwarded_hops)):
            return
        await asyncio.to_thread(
            services.access_log.write,
            officer=officer.name if isinstance(officer, Officer) else "(unauthenticated)",
            role=officer.role if isinstance(officer, Officer) else "",
            action="admin.refused",
            tenant=asked if asked in known else None,
            params=params,
            count=0,
        )
    except Exception as error:  # the refusal is answered all the same
        log.warning("access_log.refusal_not_written", error=type(error).__name__)


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
