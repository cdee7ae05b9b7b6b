"""Recording consent and deciding with it: the consent domain's entry points.

``ConsentService`` turns a consent call (grant / withdraw purposes for a subject's
identifiers, bound to a notice) into ledger records, then applies them to the state
projection before returning, so the decision that follows sees them. ``LedgerPolicy`` is
the pipeline's consent stage: one state lookup per batch, then ``decide`` per event.

The ledger is the truth and the projection heals from it (``reconcile``, run every second
by the gateway on every replica): the projection's watermark only advances over a run of
records applied in seq order, so a record whose immediate apply failed (Redis down at that
moment) is applied by the next reconcile, whichever replica runs it; a projection that went
back in time (a restored Redis snapshot) or lost everything is replayed from where it is,
and decisions are refused (503) while it has less than it had.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa
import structlog

from consent.client_text import is_digest, ledger_sdk
from consent.decisions import (
    MINOR_FLAG,
    ConsentDecision,
    ConsentQuery,
    ConsentTicket,
    DeliveryVerdict,
    DestinationSpec,
    StateEntry,
    decide,
)
from consent.group_commit import GroupCommitter
from consent.ledger import AppendedRecord, Ledger, Precondition, RecordDraft
from consent.models import ConsentKind, RecordState, RecordType
from consent.rotation import SubjectAliases
from consent.state import (
    ConsentStateStore,
    ProjectionChanges,
    RecordView,
    RedisConsentState,
    SqlConsentState,
    UnknownNotice,
    notice_floor,
)
from identity.identifiers import Identifier

log = structlog.get_logger(__name__)
_NOT_FLAGGED = StateEntry("cleared", 0)


class ConsentStateUnavailable(Exception):
    """The consent state is being rebuilt from the ledger: no decision can be trusted yet."""


class ConsentRefused(Exception):
    """A consent call that cannot be recorded as asked (maps to 400)."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


@dataclass(frozen=True)
class PurposeRules:
    """The configured purposes of one tenant: their legal basis and consent kind."""

    contract: frozenset[str]
    kinds: Mapping[str, str]  # purpose -> general | separate | guardian

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self.kinds)


class Receipt(msgspec.Struct, frozen=True):
    record_id: str
    seq: int
    purposes: tuple[str, ...]
    state: str
    at: datetime
    # Recorded in the ledger but not yet in the state decisions read (it was unavailable):
    # effective at the next reconcile, within the reconcile period.
    pending: bool = False


# Told of the withdrawal records of each consent call once they are in the ledger (the
# gateway sends the ``consent.withdrawn`` notices and applies the tenant's on_withdraw_all).
OnWithdrawn = Callable[[str, Sequence[Any]], Awaitable[None]]

# A reconcile keeps track of this many records it need not apply again (applied here first).
_APPLIED_HERE_LIMIT = 1_000_000


def view(record: Any) -> RecordView:
    return RecordView(
        seq=record.seq,
        tenant=record.tenant,
        record_type=record.record_type,
        identifiers=tuple(record.identifiers or ()),
        purposes=tuple(record.purposes or ()),
        state=record.state,
        consent_kind=record.consent_kind,
        notice_id=record.notice_id,
        notice_hash=record.notice_hash,
        at=record.at,
        detail=dict(record.detail or {}),
    )


class ConsentService:
    def __init__(self, ledger: Ledger, state: ConsentStateStore, rules: Mapping[str, PurposeRules]) -> None:
        self.ledger = ledger
        self.state = state
        self.rules = rules
        self._lock = asyncio.Lock()  # one projection writer per process
        # seqs this process applied at once after appending: a reconcile skips them
        self._applied_here: set[int] = set()
        self._watermark = 0  # the projection's watermark as last seen by reconcile
        self.on_withdrawn: OnWithdrawn | None = None
        self._committed_changes: list[ProjectionChanges] = []
        self.committer = GroupCommitter(
            ledger,
            in_transaction=self._write_in_transaction if isinstance(state, SqlConsentState) else None,
            after_commit=self._after_commit,
        )

    async def _append(
        self, drafts: list[RecordDraft], *, precondition: Precondition | None = None
    ) -> tuple[list[Any], bool]:
        """Append to the ledger (grouped with the other calls of this moment) and apply to the
        projection before returning; returns the records and whether the apply succeeded
        (when not, the next reconcile applies them: the records are in the ledger, so the
        call is acknowledged all the same). A ``precondition`` that fails under the ledger's
        lock raises ``AppendRefused`` here, nothing appended."""
        appended = await self.committer.append(drafts, precondition=precondition)
        return appended.records, appended.applied

    def _write_in_transaction(
        self, conn: sa.Connection, prev_seq: int, per_call: list[list[AppendedRecord]]
    ) -> list[bool]:
        """The projection beside the ledger: written in the append's own transaction, in one
        savepoint for the group, else one per caller (a caller whose write fails is pending)."""
        store = self.state
        assert isinstance(store, SqlConsentState)
        views = [[view(r) for r in records] for records in per_call]
        changes: list[ProjectionChanges] = []
        try:
            with conn.begin_nested():
                changes.append(store.write(conn, [v for vs in views for v in vs]))
            written = [True] * len(views)
        except Exception as exc:
            log.error("consent.projection_group_write_failed", error=type(exc).__name__, calls=len(views))
            written = []
            for vs in views:
                try:
                    with conn.begin_nested():
                        changes.append(store.write(conn, vs))
                    written.append(True)
                except Exception as one:
                    log.error("consent.projection_apply_failed", error=type(one).__name__, records=len(vs))
                    written.append(False)
        last = max((records[-1].seq for records in per_call if records), default=prev_seq)
        if all(written):
            store.advance_in(conn, last, expected=prev_seq)
        self._committed_changes = changes
        return written

    async def _after_commit(self, per_call: list[list[AppendedRecord]], written: list[bool]) -> list[bool]:
        """Once a group is committed and before its callers are answered: the in-process
        caches take what was written beside the ledger, or Redis gets the group's records."""
        if isinstance(self.state, SqlConsentState):
            changes, self._committed_changes = self._committed_changes, []
            for change in changes:
                self.state.written(change)
            applied = written
        else:
            try:
                records = [r for rs in per_call for r in rs]
                async with self._lock:
                    await self.state.apply([view(r) for r in records], advance=False)
                    if isinstance(self.state, RedisConsentState) and records:
                        # the group is contiguous: the reconcile need not read it back
                        await self.state.advance_from(records[0].seq - 1, records[-1].seq)
                applied = [True] * len(per_call)
            except Exception as exc:
                log.error("consent.projection_apply_failed", error=type(exc).__name__, calls=len(per_call))
                applied = [False] * len(per_call)
        if self.state.beside_ledger:
            if len(self._applied_here) > _APPLIED_HERE_LIMIT:
                self._applied_here.clear()  # a reconcile then applies them again: harmless
            self._applied_here.update(
                r.seq for rs, ok in zip(per_call, applied, strict=True) if ok for r in rs
            )
        return applied

    async def catch_up(self, batch: int = 5_000) -> int:
        """Apply, in seq order, the ledger records after the projection's watermark and move
        the watermark over them; returns how many records were applied."""
        applied = 0
        async with self._lock:
            after = await self.state.applied_seq()
            while True:
                records = await asyncio.to_thread(self.ledger.records, after_seq=after, limit=batch)
                if not records:
                    return applied
                if self.state.beside_ledger:
                    todo = [view(r) for r in records if r.seq not in self._applied_here]
                else:
                    todo = [view(r) for r in records]
                if todo:
                    await self.state.apply(todo, advance=False)
                    applied += len(todo)
                after = records[-1].seq
                await self.state.advance(after)
                self._applied_here = {s for s in self._applied_here if s > after}

    async def reconcile(self) -> int:
        """Heal the projection from the ledger (run periodically, and on demand). A watermark
        lower than the last one seen means the projection lost records (a restored or emptied
        Redis): decisions are refused until it has them back."""
        watermark = await self.state.applied_seq()
        if watermark < self._watermark:
            log.error("consent.projection_went_back", had=self._watermark, has=watermark)
            self.state.rebuilding = True
            self._applied_here.clear()  # what was applied here may be what was lost
        try:
            applied = await self.catch_up()
        finally:
            self._watermark = await self.state.applied_seq()
        if self.state.rebuilding:
            log.info("consent.projection_rebuilt", watermark=self._watermark)
            self.state.rebuilding = False
        return applied

    async def flag_minor(
        self, *, tenant: str, identifiers: Sequence[tuple[str, str]], source: str, platform: str
    ) -> bool:
        """Flag a subject as under 14 unless already flagged; True when a record was written."""
        state = await self.state.lookup(tenant, [p for _, p in identifiers])
        if any((entries.get(MINOR_FLAG) or _NOT_FLAGGED).state == "flagged" for entries in state.values()):
            return False
        await self.record(
            tenant=tenant,
            identifiers=identifiers,
            notice_id=None,
            source=source,
            platform=platform,
            minor=True,
        )
        return True

    async def record_changes(
        self,
        *,
        tenant: str,
        identifiers: Sequence[tuple[str, str]],
        device: Sequence[str],
        grant: Sequence[str],
        withdraw: Sequence[str],
        notice_id: str | None,
        source: str,
        platform: str,
        sdk: str | None = None,
    ) -> list[Receipt]:
        """A consent signal carried on an ordinary event: record only what the state of the
        sender's ``device`` identifiers does not already show (SDKs repeat the signal on
        every event; the ledger gets one record per change)."""
        state = await self.state.lookup(tenant, list(device))

        def shown(purpose: str, wanted: str) -> bool:
            return any((entries.get(purpose) or _NOT_FLAGGED).state == wanted for entries in state.values())

        new_grants = [p for p in grant if not shown(p, "given")]
        new_withdrawals = [p for p in withdraw if not shown(p, "withdrawn")]
        if not new_grants and not new_withdrawals:
            return []
        if new_grants and not notice_id:
            notice_id = await self.current_notice(tenant)
        return await self.record(
            tenant=tenant,
            identifiers=identifiers,
            grant=new_grants,
            withdraw=new_withdrawals,
            notice_id=notice_id,
            source=source,
            platform=platform,
            sdk=sdk,
        )

    async def current_notice(self, tenant: str) -> str | None:
        """The most recently published notice of the tenant."""
        notices = await self.state.notices(tenant)
        return max(notices.values(), key=lambda n: n.seq).notice_id if notices else None

    async def publish_notice(
        self,
        tenant: str,
        notice_id: str,
        content_hash: str,
        *,
        material: bool = False,
        purposes_changed: Sequence[str] = (),
        actor: str = "config",
    ) -> Receipt | None:
        """Publish a privacy-notice version; a material one sends the purposes it changes
        (all purposes when none are named) back to re-consent. Idempotent per notice id."""
        existing = (await self.state.notices(tenant)).get(notice_id)
        if existing is not None:
            if existing.content_hash != content_hash:
                raise ConsentRefused(f"notice {notice_id!r} was published with other content", "contentHash")
            return None
        unknown = set(purposes_changed) - self.rules[tenant].known
        if unknown:
            raise ConsentRefused(f"unknown purposes {sorted(unknown)}", "purposesChanged")
        (record,), _ = await self._append(
            [
                RecordDraft(
                    tenant=tenant,
                    record_type="notice",
                    subject=None,
                    identifiers=[],
                    notice_id=notice_id,
                    notice_hash=content_hash,
                    purposes=list(purposes_changed),
                    state="published",
                    consent_kind="general",
                    legal_basis="consent",
                    source=actor,
                    detail={"material": material, "purposes_changed": list(purposes_changed)},
                )
            ]
        )
        log.info(
            "consent.notice_published", tenant=tenant, notice_id=notice_id, material=material, seq=record.seq
        )
        return Receipt(record.record_id, record.seq, tuple(purposes_changed), "published", record.at)

    async def record(
        self,
        *,
        tenant: str,
        identifiers: Sequence[tuple[str, str]],
        grant: Sequence[str] = (),
        withdraw: Sequence[str] = (),
        notice_id: str | None,
        source: str,
        platform: str,
        sdk: str | None = None,
        evidence_hash: str | None = None,
        guardian: bool = False,
        minor: bool | None = None,
        consequences: bool = True,
    ) -> list[Receipt]:
        """Record grants and withdrawals for the subject known by ``identifiers``
        (``(type, pseudonym)`` pairs, already pseudonymised). ``consequences`` False: the
        withdrawals are a step of a deletion, which tells downstream itself (``on_withdrawn``
        is not called)."""
        rules = self.rules[tenant]
        if not identifiers:
            raise ConsentRefused("no usable identifier for the subject", "userId")
        overlap = set(grant) & set(withdraw)
        if overlap:
            raise ConsentRefused(f"purposes both granted and withdrawn: {sorted(overlap)}", "grant")
        unknown = (set(grant) | set(withdraw)) - rules.known
        if unknown:
            raise ConsentRefused(
                f"unknown purposes {sorted(unknown)}", "grant" if set(grant) & unknown else "withdraw"
            )
        if not grant and not withdraw and minor is None:
            raise ConsentRefused("nothing to record: grant, withdraw or subjectIsMinor is required", "grant")
        # Nothing free-text from a client is written to the ledger (it cannot be rewritten).
        if evidence_hash is not None and not is_digest(evidence_hash):
            raise ConsentRefused(
                "evidenceHash must be a hex digest (e.g. sha256:<64 hex digits>)", "evidenceHash"
            )
        sdk = ledger_sdk(sdk)
        notice_hash = None
        if grant:
            if not notice_id:
                raise ConsentRefused("a grant must name the notice the person agreed to", "noticeId")
            notice = (await self.state.notices(tenant)).get(notice_id)
            if notice is None:
                raise ConsentRefused(f"unknown notice {notice_id!r}", "noticeId")
            notice_hash = notice.content_hash
        elif notice_id is not None:
            # a withdrawal stands whatever notice it names; an unknown name is not kept, and
            # neither is a name that cannot be checked now (the state store is down): the
            # withdrawal itself must reach the ledger
            try:
                known = notice_id in await self.state.notices(tenant)
            except Exception:
                known = False
            if not known:
                notice_id = None
        ids = [Identifier(t, p).node for t, p in identifiers]
        subject = next((p for t, p in identifiers if t == "user_id"), identifiers[0][1])
        now = datetime.now(UTC)

        def draft(
            record_type: RecordType,
            state: RecordState,
            purposes: list[str],
            kind: ConsentKind,
            detail: dict[str, Any],
        ) -> RecordDraft:
            return RecordDraft(
                tenant=tenant,
                record_type=record_type,
                subject=subject,
                identifiers=ids,
                notice_id=notice_id,
                notice_hash=notice_hash,
                purposes=purposes,
                state=state,
                consent_kind=kind,
                legal_basis="consent",
                source=source,
                platform=platform,
                sdk=sdk,
                at=now,
                evidence_hash=evidence_hash,
                detail=detail,
            )

        drafts: list[RecordDraft] = []
        if minor is not None:
            flag: RecordState = "flagged" if minor else "cleared"
            drafts.append(draft("subject_flag", flag, [MINOR_FLAG], "general", {"under_14": minor}))
        # One record per consent kind, so separate consents stand as their own records.
        states: tuple[tuple[RecordState, Sequence[str]], ...] = (("given", grant), ("withdrawn", withdraw))
        for state, purposes in states:
            by_kind: dict[ConsentKind, list[str]] = {}
            for p in purposes:
                kind = "guardian" if guardian else _consent_kind(rules.kinds.get(p, "general"))
                by_kind.setdefault(kind, []).append(p)
            for kind, ps in by_kind.items():
                drafts.append(draft("consent", state, sorted(ps), kind, {}))
        records, applied = await self._append(drafts)
        withdrawn = [r for r in records if r.record_type == "consent" and r.state == "withdrawn"]
        if withdrawn and consequences and self.on_withdrawn is not None:
            try:
                await self.on_withdrawn(tenant, withdrawn)
            except Exception as exc:  # the withdrawal stands (it is in the ledger) whatever follows
                log.error("consent.withdrawal_consequences_failed", tenant=tenant, error=type(exc).__name__)
        return [Receipt(r.record_id, r.seq, tuple(r.purposes), r.state, r.at, not applied) for r in records]


class LedgerPolicy:
    """The pipeline's consent stage, enforcing PIPL from the ledger's projection."""

    enforced = True

    def __init__(
        self,
        state: ConsentStateStore,
        rules: Mapping[str, PurposeRules],
        aliases: SubjectAliases | None = None,
    ) -> None:
        self.state = state
        self.rules = rules
        # key rotation: where old -> new pseudonym pairs seen with state are remembered
        self.aliases = aliases
        self._floors: dict[str, tuple[Any, dict[str, int]]] = {}

    async def decide_batch(
        self,
        queries: Sequence[ConsentQuery],
        destinations: Sequence[DestinationSpec],
        *,
        want_linking: bool = True,
    ) -> list[ConsentDecision]:
        if not queries:
            return []
        if self.state.rebuilding:
            raise ConsentStateUnavailable("the consent state is being rebuilt from the ledger")
        tenant = queries[0].tenant
        rules = self.rules[tenant]
        identifiers = list(dict.fromkeys(i for q in queries for i in q.all_ids()))
        snap = await self.state.snapshot(tenant, identifiers)
        floor = self._floors.get(tenant)
        if floor is None or floor[0] is not snap.notices:  # notices change rarely
            floor = self._floors[tenant] = (snap.notices, notice_floor(snap.notices.values(), rules.known))
        contract, state, epoch = rules.contract, snap.state, snap.epoch
        if self.aliases is not None:
            held = [pair for q in queries for pair in q.aliases if state.get(pair[0])]
            if held:  # for `idgate keys rotate` (consent.rotation)
                await self.aliases.remember(tenant, held)
        return [
            decide(
                q,
                destinations,
                state,
                contract_purposes=contract,
                notice_floor=floor[1],
                epoch=epoch,
                want_linking=want_linking,
            )
            for q in queries
        ]

    async def restrictive_seq(self) -> int:
        return await self.state.restrictive_seq()

    async def erased(self, tenant: str, identifiers: Sequence[str]) -> set[str]:
        if self.state.rebuilding:
            raise ConsentStateUnavailable("the consent state is being rebuilt from the ledger")
        return await self.state.erased(tenant, identifiers) if identifiers else set()

    async def ask_again(
        self, destination: DestinationSpec, tickets: Sequence[bytes]
    ) -> dict[int, DeliveryVerdict]:
        """Consent asked again at send time: may each event (by the consent ticket it was
        routed with; empty: no consent was asked) still go to ``destination``, and still as
        personalised (PIPL Art. 24)? One decision answers both. Only the events whose answer
        is not ``SEND`` are returned, by position (usually none). Events decided after the
        last restricting record (a withdrawal, a minor flag, a material notice) cannot have
        lost a basis and are not asked again."""
        changed: dict[int, DeliveryVerdict] = {}
        current = await self.restrictive_seq()
        by_tenant: dict[str, list[tuple[int, ConsentTicket]]] = {}
        for i, raw in enumerate(tickets):
            if not raw:
                continue
            ticket = _decode_ticket(raw)
            if ticket.epoch >= current:
                continue
            by_tenant.setdefault(ticket.query.tenant, []).append((i, ticket))
        for items in by_tenant.values():
            decisions = await self.decide_batch([t.query for _, t in items], [destination])
            for (i, ticket), decision in zip(items, decisions, strict=True):
                if destination.id not in decision.destinations:
                    changed[i] = DeliveryVerdict.WITHHOLD
                elif ticket.personalised and not decision.personalised:
                    changed[i] = DeliveryVerdict.SEND_NON_PERSONALISED
        return changed


def non_personalised_ticket(raw: bytes) -> bytes:
    """The consent ticket of an event from now on forwarded as non-personalised."""
    return _encode_ticket(msgspec.structs.replace(_decode_ticket(raw), personalised=False))


_decode_ticket = msgspec.json.Decoder(ConsentTicket).decode
_encode_ticket = msgspec.json.Encoder().encode


def _consent_kind(value: str) -> ConsentKind:
    if value == "separate":
        return "separate"
    if value == "guardian":
        return "guardian"
    return "general"


__all__ = [
    "ConsentRefused",
    "ConsentService",
    "ConsentStateUnavailable",
    "LedgerPolicy",
    "PurposeRules",
    "Receipt",
    "UnknownNotice",
    "non_personalised_ticket",
]
