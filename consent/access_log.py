"""The officers' access log: every read or change of personal data by an admin is recorded.

Who (officer name and role), what (an action name), for which tenant, with which
parameters (pseudonyms, never raw identifiers) and how many results. Kept in the consent
store beside the ledger. Methods are blocking: run them in a thread.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from consent.models import AccessLogEntry

_TABLE: sa.Table = AccessLogEntry.__table__  # type: ignore[attr-defined]


class AccessEntry(msgspec.Struct, frozen=True, rename="camel"):
    id: int
    at: datetime
    officer: str
    role: str
    action: str
    tenant: str | None
    params: dict[str, Any]
    result_count: int


class AccessLog:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def write(
        self,
        *,
        officer: str,
        role: str,
        action: str,
        tenant: str | None,
        params: Mapping[str, Any],
        count: int,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(_TABLE).values(
                    at=datetime.now(UTC),
                    officer=officer,
                    role=role,
                    action=action,
                    tenant=tenant,
                    params=dict(params),
                    result_count=count,
                )
            )

    def entries(self, *, limit: int, tenants: Collection[str] = ()) -> list[AccessEntry]:
        """The newest entries first; ``tenants`` non-empty: only entries of those tenants."""
        query = sa.select(_TABLE).order_by(_TABLE.c.id.desc()).limit(limit)
        if tenants:
            query = query.where(_TABLE.c.tenant.in_(list(tenants)))
        with self.engine.connect() as conn:
            return [
                AccessEntry(
                    id=r["id"],
                    at=r["at"],
                    officer=r["officer"],
                    role=r["role"],
                    action=r["action"],
                    tenant=r["tenant"],
                    params=dict(r["params"] or {}),
                    result_count=r["result_count"],
                )
                for r in conn.execute(query).mappings()
            ]

    # -- retention (consent.retention) ---------------------------------------------------
    def expire(self, tenant: str, before: datetime, *, apply: bool) -> int:
        """The entries of ``tenant`` written before ``before``: counted, and removed with ``apply``."""
        t = _TABLE
        where = (t.c.tenant == tenant, t.c.at < before)
        with self.engine.begin() as conn:
            if not apply:
                return int(conn.scalar(sa.select(sa.func.count()).select_from(t).where(*where)) or 0)
            return int(conn.execute(sa.delete(t).where(*where)).rowcount or 0)
