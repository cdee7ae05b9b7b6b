"""What follows a withdrawal (PIPL Art. 15, 47), wired for the app.

Every consent call that withdraws purposes sends a ``consent.withdrawn`` notice (the
person's unified ID, the purposes, the time, the ledger seqs; pseudonymous like every
notice) through the outbox to the tenant's destinations that declare a withdrawn purpose;
delivery sends it only to those whose person index holds the person, like the identity
notices. Withdrawal is not retroactive: what destinations received before stays received,
and the ledger's point-in-time view keeps the deliveries that relied on the earlier grant.

Under the tenant's ``on_withdraw_all = "delete"``, a withdrawal of every consent-based
purpose in one call that speaks for the whole person (a server source, or a client whose
call names a person-level identifier, which only a signed identity assertion lets it do:
``consent.trust``) opens a ``delete`` rights request for the person, requested by the
subject on the source's channel. A client withdrawing for its own device deletes nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from consent.rights import Channel, RightsService, Verification
from consent.service import PurposeRules
from export.outbox import Outbox, notice_record
from gateway.config import Config, Source
from identity.identifiers import DEVICE_TYPES, Identifier, node_type, node_value
from identity.notices import withdrawal_notice
from identity.service import IdentityService

log = structlog.get_logger(__name__)

# The rights requests a withdrawal opens are recorded as carried out by this officer.
WITHDRAWAL_OFFICER = "idgate-withdrawal"
_CHANNELS: dict[str, Channel] = {"app": "app", "web": "web", "miniprogram": "miniprogram"}


class WithdrawalConsequences:
    """``ConsentService.on_withdrawn`` for the app; ``rights`` is set once it is open."""

    def __init__(
        self,
        config: Config,
        identity: IdentityService,
        outbox: Outbox,
        rules: Mapping[str, PurposeRules],
        notify: Callable[[], None],
    ) -> None:
        self.identity = identity
        self.outbox = outbox
        self.rules = rules
        self.notify = notify
        self.rights: RightsService | None = None
        self._tenants = {t.id: t for t in config.tenants}
        self._sources: dict[tuple[str, str], Source] = {
            (t.id, s.id): s for t in config.tenants for s in t.sources
        }

    async def __call__(self, tenant: str, records: Sequence[Any]) -> None:
        nodes = list(dict.fromkeys(n for r in records for n in r.identifiers or ()))
        purposes = sorted({p for r in records for p in r.purposes or ()})
        if not nodes or not purposes:
            return
        await self._notify_recipients(tenant, nodes, purposes, records)
        await self._delete_if_configured(tenant, nodes, purposes, records)

    async def _notify_recipients(
        self, tenant: str, nodes: Sequence[str], purposes: Sequence[str], records: Sequence[Any]
    ) -> None:
        config = self._tenants[tenant]
        concerned = tuple(d.id for d in config.destinations if set(d.purposes) & set(purposes))
        if not concerned:
            return
        at = max(r.at for r in records)
        seqs = [int(r.seq) for r in records]
        persons = sorted({self.identity.unified_id(tenant, n) for n in nodes})
        notices = [withdrawal_notice(tenant, uid, purposes, seqs, at) for uid in persons]
        await self.outbox.append([notice_record(n, concerned) for n in notices], dedupe=True)
        self.notify()
        log.info(
            "consent.withdrawal_notices", tenant=tenant, persons=len(persons), destinations=len(concerned)
        )

    async def _delete_if_configured(
        self, tenant: str, nodes: Sequence[str], purposes: Sequence[str], records: Sequence[Any]
    ) -> None:
        if self._tenants[tenant].consent.on_withdraw_all != "delete" or self.rights is None:
            return
        rules = self.rules[tenant]
        if not (rules.known - rules.contract) <= set(purposes):
            return  # not every consent-based purpose
        first = records[0]
        # only a configured source's own call (a rights request's withdrawal is an officer's)
        source = self._sources.get((tenant, str(first.source)))
        if source is None:
            return
        person_level = [n for n in nodes if node_type(n) not in DEVICE_TYPES]
        if not source.is_server and not person_level:
            log.info("consent.withdraw_all_device_only", tenant=tenant, source=source.id)
            return
        subject = (person_level or list(nodes))[0]
        request = await self.rights.open(
            tenant=tenant,
            subject=Identifier(node_type(subject), node_value(subject)),
            kind="delete",
            requested_by="subject",
            channel="backend" if source.is_server else _CHANNELS.get(source.platform, "app"),
            verification=Verification("account_login", "verified", f"ledger:{min(r.seq for r in records)}"),
            officer=WITHDRAWAL_OFFICER,
        )
        log.info("consent.withdraw_all_delete", tenant=tenant, request_id=request.request_id)
