"""Operator and compliance API over the identity graph: explain, unlink, erase, quarantine.

Operators work on node ids (``<type>:<pseudonym>``): the quarantine list and explain's
path give them. Turning a raw identifier into its pseudonym is a look-up of personal data
for the compliance role only, recorded in the access log; raw identifiers are
pseudonymised here with the tenant's key, and the identity domain (identity.service) sees
pseudonyms only.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, QueryParameter

from gateway.admin.deps import (
    ADMIN_DEPENDENCIES,
    READ_ERRORS,
    WRITE_ERRORS,
    AdminServices,
    log_access,
    node_identifier,
    require_raw_lookup,
)
from gateway.admin.schemas import (
    EraseRequest,
    ErasureResult,
    Explained,
    LinkHop,
    QuarantinedMerge,
    QuarantineList,
    UnlinkRequest,
    UnlinkResult,
)
from gateway.auth import Officer, admin_guard, roles


class IdentityController(Controller):
    path = "/admin/identity"
    tags = ["identity"]
    guards = [admin_guard]
    dependencies = ADMIN_DEPENDENCIES
    security = [{"AdminToken": []}]

    @staticmethod
    def _node(
        services: AdminServices,
        officer: Officer,
        tenant: str,
        value: str,
        id_type: str | None,
        appid: str | None,
        side: str,
    ) -> str:
        if id_type is None:
            return node_identifier(value, side).node
        require_raw_lookup(officer, side)
        # under every live key version: the one the graph holds (a rotation keeps the past)
        every = services.subjects(
            tenant, value, id_type, appid, fields=(side, f"{side}_type", f"{side}_appid")
        )
        return services.graph_subjects(tenant, every)[0].node

    @get(
        "/explain",
        responses=READ_ERRORS,
        summary="The chain of links that joins two identifiers, with provenance",
        opt=roles("operator", "compliance"),
    )
    async def explain(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        a: Annotated[str, QueryParameter(max_length=255, description="a node id, or raw with a_type")],
        b: Annotated[str, QueryParameter(max_length=255, description="a node id, or raw with b_type")],
        a_type: FromQuery[str | None] = None,
        b_type: FromQuery[str | None] = None,
        a_appid: FromQuery[str | None] = None,
        b_appid: FromQuery[str | None] = None,
    ) -> Explained:
        """``a`` and ``b`` are node ids (``<type>:<pseudonym>``, as the quarantine list and
        explain's own path show them): operators work on those. With ``a_type`` / ``b_type``
        they are raw identifiers, pseudonymised server-side: a look-up of personal data for
        the compliance role only (403 for operators), recorded in the access log."""
        services.tokens.check_tenant(officer, tenant)
        node_a = self._node(services, officer, tenant, a, a_type, a_appid, "a")
        node_b = self._node(services, officer, tenant, b, b_type, b_appid, "b")
        found = services.identity.explain(tenant, node_a, node_b)
        raw = [side for side, t in (("a", a_type), ("b", b_type)) if t is not None]
        params = {"a": node_a, "b": node_b, **({"raw_lookup": raw} if raw else {})}
        await log_access(services, officer, "identity.explain", tenant, params, len(found.path))
        return Explained(
            a=found.a,
            b=found.b,
            linked=found.linked,
            unified_id=found.unified_id,
            unified_id_by_destination=services.by_destination(tenant, found.unified_id),
            path=[
                LinkHop(
                    h.a, h.b, h.provenance.source, h.provenance.event_id, h.provenance.at, h.provenance.rule
                )
                for h in found.path
            ],
        )

    @post(
        "/unlink",
        responses=WRITE_ERRORS,
        status_code=200,
        summary="Remove one link (a wrong bind); the person splits if it was the only path",
        opt=roles("operator", "compliance"),
    )
    async def unlink(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: JSONBody[UnlinkRequest],
    ) -> UnlinkResult:
        """``a`` and ``b`` name node ids (``{"node": "<type>:<pseudonym>"}``); raw identifiers
        (``{"type", "id"}``) only with the compliance role."""
        services.tokens.check_tenant(officer, data.tenant)
        node_a = services.graph_subjects_of(officer, data.tenant, data.a, "a")[0].node
        node_b = services.graph_subjects_of(officer, data.tenant, data.b, "b")[0].node
        result = await services.identity.unlink(data.tenant, node_a, node_b)
        await log_access(
            services,
            officer,
            "identity.unlink",
            data.tenant,
            {"a": node_a, "b": node_b},
            int(result.split) + 1,
        )
        per_destination = {k: services.by_destination(data.tenant, v) for k, v in result.unified_ids.items()}
        return UnlinkResult(
            removed=True,
            split=result.split,
            unified_ids=result.unified_ids,
            unified_ids_by_destination={
                d: {k: str(per_destination[k][d]) for k in result.unified_ids} for d in per_destination["a"]
            },
        )

    @post(
        "/erase",
        responses=WRITE_ERRORS,
        status_code=200,
        summary="Erase identifiers from the identity graph; deletion notices go downstream",
        opt=roles("compliance"),
    )
    async def erase(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        data: JSONBody[EraseRequest],
    ) -> ErasureResult:
        """Compliance role (a deletion request, PIPL Art 47). The identifiers leave the graph
        (the person splits where they held it together) and an ``identity.deleted`` notice
        per person goes to every destination that received that person's data. ``erased``
        counts the identifiers removed from the graph; ``notInGraph`` those it never held
        (never linked: only their derived unified ID went downstream, and it is notified)."""
        services.tokens.check_tenant(officer, data.tenant)
        # under every live key version the graph holds it (a rotation keeps the past)
        idents = [
            ident
            for i, ref in enumerate(data.identifiers)
            for ident in services.graph_subjects_of(officer, data.tenant, ref, f"identifiers[{i}]")
        ]
        done = await services.identity.erase(data.tenant, idents)
        await log_access(
            services,
            officer,
            "identity.erase",
            data.tenant,
            {"nodes": sorted({i.node for i in idents})},
            len(done.removed),
        )
        return ErasureResult(
            erased=len(done.removed),
            not_in_graph=len(done.not_in_graph),
            unified_ids=done.unified_ids,
            notices=done.notices,
        )

    @get(
        "/quarantine",
        summary="Merges held back by the circuit breaker, for review",
        opt=roles("operator"),
        responses=READ_ERRORS,
    )
    async def quarantine(
        self,
        services: NamedDependency[AdminServices],
        officer: NamedDependency[Officer],
        tenant: FromQuery[str],
        limit: Annotated[int, QueryParameter(ge=1, le=5000, description="at most this many")] = 200,
    ) -> QuarantineList:
        services.tokens.check_tenant(officer, tenant)
        held = services.identity.quarantine(tenant, limit)
        await log_access(services, officer, "identity.quarantine", tenant, {"limit": limit}, len(held))
        return QuarantineList(
            quarantined=[
                QuarantinedMerge(q.a, q.b, q.reason, q.provenance.source, q.provenance.event_id, q.at)
                for q in held
            ]
        )
