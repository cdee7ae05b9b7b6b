"""What follows a withdrawal (PIPL Art. 15, 47), wired for the app.

Every consent call that withdraws purposes sends a ``consent.withdrawn`` notice (the
person's unified ID, the purposes, the time, the ledger seqs; pseudonymous like every
notice) through the outbox to the tenant's destinations that declare a withdrawn purpose;
delivery sends it only to those whose person index holds the person, like the identity
notices. Withdrawal is not retroactive: what destinations received before stays received,
and the ledger's point-in-time view keeps the deliveries that relied on the earlier grant.

Under the tenant's ``on_withdraw_all = "delete"``, a withdrawal that leaves the person with
no consent-based purpose granted (``consent.withdraw_all``: in one call or over several)
and that speaks for the whole person (a server source, or a client whose call names a
person-level identifier, which only a signed identity assertion lets it do:
``consent.trust``) opens a ``delete`` rights request for the person, requested by the
subject on the source's channel, its verification reference naming the withdrawal
(``ledger:<seq>``). A client withdrawing for its own device deletes nobody.

The call opens it at once; ``sweep`` makes that durable. It looks at the withdrawals the
ledger holds after a shared watermark (a few seconds old: the call itself had its turn)
and opens the deletions that should have been opened: a process that died between the
withdrawal's record and the request's is made good at the next start, or by any replica
within ``SWEEP_SECONDS``. A deletion is opened once per withdrawal, and never while one is
open for the person (checked under the ledger's lock), whichever replica or path gets
there first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from consent.ledger import Ledger
from consent.rights import Channel, RightsError, RightsService, Verification
from consent.rotation import SubjectAliases
from consent.service import PurposeRules
from consent.withdraw_all import (
    SweepMark,
    already_opened,
    earlier_nodes,
    leaves_nothing,
    not_yet_opened,
    person_history,
    withdrawal_reference,
)
from export.outbox import Outbox, notice_record
from gateway.config import Config, Source
from identity.identifiers import DEVICE_TYPES, Identifier, node_type, node_value
from identity.notices import withdrawal_notice
from identity.service import IdentityService

log = structlog.get_logger(__name__)

# The rights requests a withdrawal opens are recorded as carried out by this officer.
WITHDRAWAL_OFFICER = "idgate-withdrawal"
_CHANNELS: dict[str, Channel] = {"app": "app", "web": "web", "miniprogram": "miniprogram"}
# How often every replica sweeps, and how old a withdrawal must be for the sweep to take it
# (younger ones are the call's own business; the sweep comes back for them).
SWEEP_SECONDS = 2.0
SWEEP_GRACE_SECONDS = 3.0
_SWEEP_PAGE = 1_000


class WithdrawalConsequences:
    """``ConsentService.on_withdrawn`` for the app; ``rights`` is set once it is open."""

    def __init__(
        self,
        config: Config,
        identity: IdentityService,
        outbox: Outbox,
        rules: Mapping[str, PurposeRules],
        notify: Callable[[], None],
        ledger: Ledger,
        aliases: SubjectAliases | None = None,
        *,
        hold: bool = False,
    ) -> None:
        self.identity = identity
        self.ledger = ledger
        self.aliases = aliases  # key rotation: a person's earlier pseudonyms
        self.hold = hold  # tests only (IDGATE_DEV_WITHDRAW_ALL_HOLD)
        self.mark = SweepMark(ledger.engine)
        self.outbox = outbox
        self.rules = rules
        self.notify = notify
        self.rights: RightsService | None = None
        self._tenants = {t.id: t for t in config.tenants}
        self._sources: dict[tuple[str, str], Source] = {
            (t.id, s.id): s for t in config.tenants for s in t.sources
        }
        self._deleting = frozenset(t.id for t in config.tenants if t.consent.on_withdraw_all == "delete")
        self._seen_to = 0  # the mark as this process's sweeps last saw it (for the log)

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
        if tenant in self._deleting and self.rights is not None:
            await self.open_deletion(tenant, records)

    async def open_deletion(self, tenant: str, records: Sequence[Any], *, swept: bool = False) -> str | None:
        """The deletion the withdrawal ``records`` of one call open, if they leave the person
        they speak for with nothing granted; returns its request id (None: none opened, or
        it was opened already). ``swept``: found by the sweep, most often after the call
        itself opened it (looked up first, without the ledger's lock)."""
        rights = self.rights
        first = records[0]
        reference = withdrawal_reference(min(int(r.seq) for r in records))
        if swept and await asyncio.to_thread(already_opened, self.ledger, tenant, reference):
            return None
        # only a configured source's own call (a rights request's withdrawal is an officer's)
        source = self._sources.get((tenant, str(first.source)))
        if rights is None or source is None:
            return None
        nodes = list(dict.fromkeys(n for r in records for n in r.identifiers or ()))
        person_level = [n for n in nodes if node_type(n) not in DEVICE_TYPES]
        if not source.is_server and not person_level:
            log.info("consent.withdraw_all_device_only", tenant=tenant, source=source.id)
            return None
        person = list(dict.fromkeys(m for n in nodes for m in self.identity.person(tenant, n)))
        rules = self.rules[tenant]
        last = max(int(r.seq) for r in records)
        same = await asyncio.to_thread(earlier_nodes, self.aliases, tenant, person) if self.aliases else {}
        history = await asyncio.to_thread(person_history, self.ledger, tenant, [*person, *same], last)
        if not leaves_nothing(history, records, rules.known - rules.contract, same):
            return None
        subject = (person_level or nodes)[0]
        if self.hold:  # a crash test kills the process here: recorded, not yet opened
            log.warning("consent.withdraw_all_held", tenant=tenant, withdrawal=reference)
            await asyncio.Event().wait()
        try:
            request = await rights.open(
                tenant=tenant,
                subject=Identifier(node_type(subject), node_value(subject)),
                kind="delete",
                requested_by="subject",
                channel="backend" if source.is_server else _CHANNELS.get(source.platform, "app"),
                verification=Verification("account_login", "verified", reference),
                officer=WITHDRAWAL_OFFICER,
                unless=not_yet_opened(self.ledger, tenant, reference, person),
            )
        except RightsError as error:
            if error.error != "already_open":
                raise
            log.info("consent.withdraw_all_delete_already_open", tenant=tenant, withdrawal=reference)
            return None
        log.info("consent.withdraw_all_delete", tenant=tenant, request_id=request.request_id)
        return request.request_id

    async def start_sweep(self) -> int:
        """The sweep's watermark, set to the ledger's end on the first start (withdrawals
        recorded before it are not swept); returns it."""
        return await asyncio.to_thread(lambda: self.mark.start(self.ledger.last_seq()))

    async def sweep(self, *, grace_seconds: float = SWEEP_GRACE_SECONDS) -> list[str]:
        """Open the deletions the withdrawals after the watermark should have opened (module
        docstring); returns the request ids opened. The watermark moves past a call only
        once it was looked at here."""
        mark = await asyncio.to_thread(self.mark.get)
        if mark is None:
            mark = await self.start_sweep()
        end = await asyncio.to_thread(self.ledger.last_seq)  # read first: what is below is committed
        if not self._deleting or self.rights is None:
            # nothing to open: the watermark keeps up all the same, so a tenant switched to
            # "delete" later has no earlier withdrawal swept (no retroactive deletion)
            if end > mark:
                await asyncio.to_thread(self.mark.advance, end)
            return []
        found = await asyncio.to_thread(
            self.ledger.records, record_type="consent", state="withdrawn", after_seq=mark, limit=_SWEEP_PAGE
        )
        upto = end if len(found) < _SWEEP_PAGE else found[-1].seq
        cutoff = datetime.now(UTC) - timedelta(seconds=grace_seconds)
        opened: list[str] = []
        calls = _calls(found)
        if len(found) == _SWEEP_PAGE and len(calls) > 1:  # the page may end inside a call
            upto = calls.pop()[0].seq - 1
        for call in calls:
            first = call[0]
            if _aware(first.at) > cutoff:
                upto = first.seq - 1
                break
            if first.tenant not in self._deleting:
                continue
            try:
                request_id = await self.open_deletion(first.tenant, call, swept=True)
            except Exception as exc:  # looked at again at the next sweep
                log.error("consent.withdraw_all_sweep_failed", tenant=first.tenant, error=type(exc).__name__)
                upto = first.seq - 1
                break
            if request_id is not None:
                log.warning("consent.withdraw_all_swept", tenant=first.tenant, request_id=request_id)
                opened.append(request_id)
        if upto > mark:
            await asyncio.to_thread(self.mark.advance, upto)
        if max(upto, mark) > self._seen_to:  # moved here, or by another replica's sweep
            self._seen_to = max(upto, mark)
            log.debug("consent.withdraw_all_swept_to", seq=self._seen_to, opened=len(opened))
        return opened


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _calls(records: Sequence[Any]) -> list[list[Any]]:
    """Withdrawal records grouped by the call that wrote them (consecutive seqs, one
    tenant, source, time and subject)."""
    calls: list[list[Any]] = []
    for r in records:
        prev = calls[-1][-1] if calls else None
        if (
            prev is not None
            and r.seq == prev.seq + 1
            and (r.tenant, r.source, r.at, r.identifiers)
            == (prev.tenant, prev.source, prev.at, prev.identifiers)
        ):
            calls[-1].append(r)
        else:
            calls.append([r])
    return calls


async def sweep_periodically(withdrawals: WithdrawalConsequences, seconds: float = SWEEP_SECONDS) -> None:
    """Sweep at start, then every ``seconds`` (every replica may: a deletion opens once)."""
    while True:
        try:
            await withdrawals.sweep()
        except Exception as exc:  # retried at the next period
            log.error("consent.withdraw_all_sweep_failed", error=type(exc).__name__)
        await asyncio.sleep(seconds)
