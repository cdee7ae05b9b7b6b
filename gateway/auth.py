"""Who is calling: sources by write key (SDKs) and officers by admin token (the admin API).

Write keys are HTTP Basic users (or ``writeKey`` in the body); they name a source of a
tenant. Admin tokens are bearer tokens with a role (``compliance`` reads personal data,
``operator`` runs the gateway) and optionally a list of tenants they may see. Both are
stored as SHA-256 hashes only.

Admin routes are protected by one guard, ``admin_guard``, that reads the roles a route
declares in its ``opt`` (``opt={"roles": ("compliance",)}``). A route that declares no
role is refused to everyone: forgetting the declaration fails closed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from gateway.config import AdminToken, Config, ResolvedSource, hash_write_key
from gateway.errors import InvalidRequest

# auditor: reads and verifies (the compliance console), never changes anything
Role = Literal["compliance", "operator", "auditor"]
ROLES: tuple[Role, ...] = ("compliance", "operator", "auditor")
AUTH_CACHE_SIZE = 1024


# -- sources ------------------------------------------------------------------------------------
@dataclass
class WriteKeys:
    """Write-key hash -> source, with a cache of the Authorization headers seen (clients send
    the same header on every request: remember the answer, not the key)."""

    index: Mapping[str, ResolvedSource]
    cache: dict[str, ResolvedSource] = field(default_factory=dict)

    def authenticate(
        self, authorization: str, body_write_key: Callable[[], str | None] | None = None
    ) -> ResolvedSource:
        """Write key as HTTP Basic user, or ``writeKey`` from the body (read only when there
        is no Basic user), to its source."""
        cached = self.cache.get(authorization) if authorization else None
        if cached is not None:
            return cached
        basic = authorization[:6].lower() == "basic "
        write_key: str | None = None
        if basic:
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidRequest(
                    "invalid_write_key", "malformed Basic authorization header", "Authorization", 401
                ) from None
            write_key = decoded.split(":", 1)[0]
        if not write_key and body_write_key is not None:
            write_key = body_write_key()
        if not write_key:
            raise InvalidRequest(
                "missing_write_key",
                "send the write key as HTTP Basic user or as writeKey",
                "Authorization",
                401,
            )
        resolved = self.index.get(hash_write_key(write_key))
        if resolved is None:
            raise InvalidRequest("invalid_write_key", "unknown write key", "Authorization", 401)
        if basic:
            if len(self.cache) >= AUTH_CACHE_SIZE:
                self.cache.clear()
            self.cache[authorization] = resolved
        return resolved


# -- officers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Officer:
    name: str
    role: Role
    tenants: frozenset[str]  # empty: all

    def may_see(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants


@dataclass(frozen=True)
class AdminTokens:
    config: Config
    index: Mapping[str, Officer]  # sha256(token) -> officer

    @classmethod
    def build(cls, config: Config, tokens: Sequence[AdminToken], *, dev: bool) -> AdminTokens:
        out: dict[str, Officer] = {}
        for t in tokens:
            officer = Officer(t.name, t.role, frozenset(t.tenants))
            if t.token_sha256:
                out[t.token_sha256] = officer
            if dev and t.dev_token:
                out[hashlib.sha256(t.dev_token.encode()).hexdigest()] = officer
        return cls(config, out)

    def officer(self, authorization: str) -> Officer:
        if authorization[:7].lower() != "bearer ":
            raise NotAuthorizedException(detail="send an admin token as 'Authorization: Bearer <token>'")
        officer = self.index.get(hashlib.sha256(authorization[7:].strip().encode()).hexdigest())
        if officer is None:
            raise NotAuthorizedException(detail="unknown admin token")
        return officer

    def check_tenant(self, officer: Officer, tenant: str) -> None:
        """400 for an unknown tenant, 403 for one the officer may not see."""
        if tenant not in {t.id for t in self.config.tenants}:
            raise InvalidRequest("invalid_field", f"unknown tenant {tenant!r}", "tenant")
        if not officer.may_see(tenant):
            raise PermissionDeniedException(detail=f"{officer.name} may not see tenant {tenant!r}")


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Authenticate the bearer token and check the role the route declares."""
    roles: tuple[Role, ...] = tuple(handler.opt.get("roles", ()))
    if not roles:
        raise PermissionDeniedException(detail="this endpoint declares no role: refused to everyone")
    tokens: AdminTokens = connection.app.state.admin_tokens
    officer = tokens.officer(connection.headers.get("authorization", ""))
    # known before the role check, so a refusal is logged with who asked
    connection.state.officer = officer
    if officer.role not in roles:
        raise PermissionDeniedException(
            detail=f"this needs the {' or '.join(roles)} role; {officer.name} has {officer.role}"
        )
    structlog.contextvars.bind_contextvars(officer=officer.name, role=officer.role)


def roles(*allowed: Role) -> dict[str, Any]:
    """A route's ``opt`` declaring who may call it."""
    return {"roles": allowed}
