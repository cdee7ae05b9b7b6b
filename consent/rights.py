"""Data-subject rights requests (PIPL Art. 44-50): intake, the clock, and what each kind does.

A request names its subject by one identifier, already pseudonymised by the caller (raw
identifiers never reach this module). Every state change of a request is one
``rights_request`` record appended to the consent ledger, so requests survive restarts, are
hash-chained and signed like consents, and an officer can prove when each was received,
verified, acted on and answered. The current state of a request is the fold of its records
(``detail.request_id`` ties them together); nothing else is stored.

Records of one request, in order:

- ``requested`` / ``opened``: kind, who asked (``requested_by``), the channel, how the
  subject's identity was verified, the time of receipt and the due time (the clock,
  ``consent.rights_clock``);
- ``refused``: the subject's identity could not be verified (Art. 50: a refusal is recorded
  with its reason); the request ends there;
- ``requested`` / ``step``: a part of the work done (consents withdrawn, graph erased, events
  purged), with counts and the ledger seqs it wrote; or a change of the clock: ``extended``
  (the due date moved, with a reason), ``paused`` (the clock stopped while the handler waits
  on the subject, with a reason) and ``resumed`` (the due date moved by the working days the
  pause took: ``consent.rights_clock``);
- ``completed`` / ``completed``: the outcome, the completion time and how long it took (seconds
  and working days).

``withdraw_all``, ``restrict`` and ``delete`` are carried out when they are opened;
``correct`` too (the wrong identifier leaves the person; the right one links at the next
event); ``access`` and ``copy`` are answered with a signed bundle (``bundle``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

import msgspec
import sqlalchemy as sa
import structlog

from consent.ledger import AppendRefused, Precondition, RecordDraft
from consent.models import RecordState
from consent.proofs import DeliveryProofs
from consent.rights_bundle import build_bundle, bundle_digest, sign_bundle
from consent.rights_clock import RightsClock, local_day
from consent.service import ConsentService
from consent.suppression import SUPPRESSED_STEP
from identity.identifiers import Identifier, node_type, node_value
from identity.scrub import looks_like_identifier

log = structlog.get_logger(__name__)

RightsKind = Literal["access", "copy", "correct", "delete", "restrict", "withdraw_all"]
RIGHTS_KINDS: tuple[str, ...] = RightsKind.__args__  # type: ignore[attr-defined]
# Who made the request: the person, a guardian (a minor, Art. 31), an authorised agent, or a
# next of kin exercising a deceased person's rights (Art. 49).
Requester = Literal["subject", "guardian", "agent", "next_of_kin"]
# ``backend``: the shop's backend relayed the subject's own request (a server source's
# withdrawal of every purpose, under on_withdraw_all = "delete").
Channel = Literal[
    "app", "web", "miniprogram", "backend", "email", "phone", "letter", "in_person", "customer_service"
]
VerificationMethod = Literal[
    "account_login", "sms_code", "id_document", "in_person", "notarised_letter", "none"
]
VerificationOutcome = Literal["verified", "failed", "not_possible"]
RequestStatus = Literal["open", "refused", "completed"]
Outcome = Literal["done", "partly_done", "declined"]
ClockStatus = Literal["on_time", "nearly_due", "overdue", "paused", "closed"]
# Why a due date was moved: no free text (it would invite personal data into the ledger).
ExtensionReason = Literal["complex_request", "many_requests", "awaiting_subject", "awaiting_third_party"]
# Why a request's clock was stopped: the handler waits on the subject (no free text either).
PauseReason = Literal["awaiting_identity_proof", "awaiting_clarification"]
# A destination's receipt of a deletion (the ``identity.deleted`` notice): ``pending`` until
# delivery reports it; ``delivered`` (written to a file or stream), ``acknowledged`` (an HTTP
# receiver answered 2xx) or ``failed`` (dead-lettered: a replay delivers it later).
ReceiptStatus = Literal["pending", "delivered", "acknowledged", "failed"]
RECEIVED: frozenset[str] = frozenset({"delivered", "acknowledged"})
# The step of a deletion that names the destinations holding the person's data (their
# person index, read before anything is deleted) and the person's unified IDs.
RECIPIENTS_STEP = "recipients"
RECEIPT_STEP = "receipt"
PAUSED_STEP = "paused"
RESUMED_STEP = "resumed"


# Who records the receipts delivery reports (the ledger record's source is ``admin:<officer>``).
RECEIPT_OFFICER = "idgate-delivery"


class Verification(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the subject's identity was checked. ``reference`` is the officer's own case or
    ticket number (never personal data: letters, digits and ``._:-`` only)."""

    method: VerificationMethod
    outcome: VerificationOutcome
    reference: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] | None = None


class ClockChanged(AppendRefused):
    """Another officer (or replica) paused or resumed the request's clock first."""


class RightsError(Exception):
    """A rights request that cannot be taken or changed as asked (maps to a 4xx)."""

    def __init__(self, error: str, detail: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.field = field
        self.status = status


class RightsRequest(msgspec.Struct, rename="camel"):
    """A request as its ledger records tell it."""

    request_id: str
    tenant: str
    kind: str
    subject: str  # "<type>:<pseudonym>" named at intake
    status: str
    requested_by: str
    channel: str
    verification: dict[str, Any]
    received_at: datetime
    due_at: datetime
    officer: str
    records: list[int]  # ledger seqs of its records, in order
    steps: list[dict[str, Any]] = []
    refusal_reason: str | None = None
    completed_at: datetime | None = None
    outcome: str | None = None
    correction: str | None = None  # a correct request: the right identifier ("<type>:<pseudonym>")
    # what a request could not reach (partly done), or a deletion still waits for (open):
    # ``destination:<id>`` for each destination whose receipt is not in
    remaining: list[str] = []
    # a deletion: the receipt of each destination that held the person's data
    receipts: dict[str, str] = {}
    # a deletion: the person's unified IDs (what the destinations' deletion notices name)
    unified_ids: list[str] = []
    seconds_to_complete: float | None = None
    working_days_to_complete: int | None = None
    # the clock stopped (``clock`` is ``paused``): since when, and why
    paused_at: datetime | None = None
    pause_reason: str | None = None
    # working days given back by the pauses resumed so far (the due date moved by them)
    paused_working_days: int = 0
    # filled in by the listing at the time it answers; a paused request's working days left
    # are those it had when paused
    clock: str = "on_time"
    working_days_left: int | None = None


class People(Protocol):
    """The identity graph as rights requests need it (identity.service.IdentityService)."""

    def person(self, tenant: str, node: str) -> list[str]:
        """Every node of the person ``node`` belongs to, itself included."""
        ...

    def unified_id(self, tenant: str, node: str) -> str: ...

    async def detach(self, tenant: str, identifiers: Sequence[Identifier]) -> int:
        """Remove every direct link of these identifiers; returns the links removed."""
        ...


class Holdings(msgspec.Struct):
    """What the export stores hold on a person: the events still held (outbox, dead
    letters) and the destinations that received the person's data."""

    events: list[dict[str, Any]]
    recipients: list[str]


# (tenant, nodes of the person, their unified IDs) -> what is held on them
HoldingsOf = Callable[[str, Sequence[str], Sequence[str]], Awaitable[Holdings]]
# A step of a deletion carried out by another domain (identity graph, outbox, dead letters,
# file sinks): (tenant, nodes of the person) -> what to record (counts, per-store figures).
DeletionStep = Callable[[str, Sequence[str]], Awaitable[Mapping[str, Any]]]


def _both(first: Precondition, second: Precondition) -> Precondition:
    def check(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
        first(conn, rows)
        second(conn, rows)

    return check


def _refusal(v: Verification) -> str | None:
    if v.method == "none":
        return "identity_not_verified: no verification method"
    if v.outcome == "failed":
        return f"identity_not_verified: {v.method} check failed"
    if v.outcome == "not_possible":
        return f"identity_not_verified: {v.method} check not possible"
    return None


def fold_requests(records: Sequence[Any], clock: RightsClock, now: datetime) -> list[RightsRequest]:
    """The requests these ``rights_request`` ledger records tell, with their clock at ``now``."""
    by_id: dict[str, RightsRequest] = {}
    for r in records:
        d = r.detail or {}
        rid = d.get("request_id")
        if not rid:
            continue
        event = d.get("event")
        if event in ("opened", "refused"):
            by_id[rid] = RightsRequest(
                request_id=rid,
                tenant=r.tenant,
                kind=d["kind"],
                subject=(r.identifiers or [""])[0],
                status="open" if event == "opened" else "refused",
                requested_by=d["requested_by"],
                channel=d["channel"],
                verification=d["verification"],
                received_at=datetime.fromisoformat(d["received_at"]),
                due_at=datetime.fromisoformat(d["due_at"]),
                officer=d["officer"],
                records=[r.seq],
                refusal_reason=d.get("reason"),
                correction=d.get("correction"),
            )
            continue
        request = by_id.get(rid)
        if request is None:
            continue
        request.records.append(r.seq)
        if event == "step":
            request.steps.append({k: v for k, v in d.items() if k not in ("request_id", "event")})
            step = d.get("step")
            if step == "extended":
                request.due_at = datetime.fromisoformat(d["due_at"])
            elif step == PAUSED_STEP:
                request.paused_at = datetime.fromisoformat(d["paused_at"])
                request.pause_reason = d.get("reason")
            elif step == RESUMED_STEP:
                request.due_at = datetime.fromisoformat(d["due_at"])
                request.paused_at = request.pause_reason = None
                request.paused_working_days += int(d.get("working_days") or 0)
            elif step == RECIPIENTS_STEP:  # a resumed deletion adds to what it found first
                for destination in d.get("destinations") or ():
                    request.receipts.setdefault(destination, "pending")
                request.unified_ids = sorted({*request.unified_ids, *(d.get("unified_ids") or ())})
            elif step == RECEIPT_STEP:
                request.receipts[d["destination"]] = d["status"]
        elif event == "completed":
            request.status = "completed"
            request.outcome = d.get("outcome")
            request.completed_at = datetime.fromisoformat(d["completed_at"])
            request.seconds_to_complete = d.get("seconds_to_complete")
            request.working_days_to_complete = d.get("working_days_to_complete")
            request.remaining = list(d.get("remaining") or [])
    for request in by_id.values():
        if request.status == "open":
            request.remaining = [
                f"destination:{k}" for k, v in sorted(request.receipts.items()) if v not in RECEIVED
            ]
            if request.paused_at is not None:  # stopped: not late, nothing counts down
                request.clock = "paused"
                request.working_days_left = clock.working_days_left(request.due_at, request.paused_at)
            else:
                request.clock = clock.status(request.due_at, now)
                request.working_days_left = clock.working_days_left(request.due_at, now)
        else:
            request.clock = "closed"
    return list(by_id.values())


class RightsService:
    """Opens, carries out and answers rights requests; the ledger holds every step."""

    def __init__(
        self,
        consent: ConsentService,
        clock: RightsClock,
        *,
        people: People,
        proofs: DeliveryProofs | None = None,
        holdings: HoldingsOf | None = None,
        deletion_steps: Mapping[str, DeletionStep] | None = None,
        deletion_gaps: Sequence[str] = (),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consent = consent
        self.clock = clock
        self.people = people
        self.proofs = proofs
        self.holdings = holdings
        self.deletion_steps = dict(deletion_steps or {})
        self.deletion_gaps = list(deletion_gaps)
        self.now = now

    # -- writing -------------------------------------------------------------------------
    async def _write(
        self,
        tenant: str,
        subject: str,
        nodes: Sequence[str],
        state: RecordState,
        detail: dict[str, Any],
        officer: str,
        *,
        while_open: str | None = None,
        unless: Precondition | None = None,
    ) -> int:
        """Append one ``rights_request`` record. With ``while_open`` (a request id), only
        while that request has no completion, checked under the ledger's lock: two replicas
        answering one request at once record one completion, and the other is told
        ``not_open`` (409). ``unless``: a precondition of the caller's (``open``)."""
        draft = RecordDraft(
            tenant=tenant,
            record_type="rights_request",
            subject=node_value(subject),
            identifiers=list(dict.fromkeys([subject, *nodes])),
            state=state,
            source=f"admin:{officer}",
            platform="admin",
            at=self.now(),
            detail=detail,
        )
        guard = unless
        if while_open is not None:
            still_open = self._still_open(tenant, node_value(subject), while_open)
            guard = still_open if unless is None else _both(still_open, unless)
        try:
            (record,), _ = await self.consent._append([draft], precondition=guard)
        except ClockChanged as changed:
            raise RightsError("clock_changed", str(changed), "requestId", 409) from None
        except AppendRefused:
            if while_open is None:
                raise RightsError("already_open", "the request was already opened", None, 409) from None
            raise RightsError("not_open", f"request {while_open} is completed", "requestId", 409) from None
        return int(record.seq)

    def _unrecorded(
        self, tenant: str, subject: str, wanted: dict[str, Any], refusal: Callable[[], Exception]
    ) -> Precondition:
        """A precondition, checked under the ledger's lock, that raises ``refusal()`` when a
        ``rights_request`` record of ``subject`` whose detail holds ``wanted`` is in the ledger
        or among the rows being appended with it."""

        def check(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
            pending = any(
                r["tenant"] == tenant
                and r["record_type"] == "rights_request"
                and wanted.items() <= r["detail"].items()
                for r in rows
            )
            if pending or self.consent.ledger.holds(
                conn, tenant=tenant, record_type="rights_request", subject=subject, detail=wanted
            ):
                raise refusal()

        return check

    def _still_open(self, tenant: str, subject: str, request_id: str) -> Precondition:
        """Refuses (``AppendRefused``) once the request has a completion."""
        completion = {"request_id": request_id, "event": "completed"}
        return self._unrecorded(tenant, subject, completion, lambda: AppendRefused(request_id))

    async def open(
        self,
        *,
        tenant: str,
        subject: Identifier,
        kind: RightsKind,
        requested_by: Requester,
        channel: Channel,
        verification: Verification,
        officer: str,
        received_at: datetime | None = None,
        correction: Identifier | None = None,
        unless: Precondition | None = None,
    ) -> RightsRequest:
        """Take a request: refused (and recorded) when the subject's identity is not verified;
        otherwise opened with its due date, and carried out at once for ``withdraw_all``,
        ``restrict``, ``delete`` and ``correct`` (which needs ``correction``: the right value
        of the subject identifier, pseudonymised). ``unless``: checked under the ledger's
        lock before the request is opened; when it refuses, nothing is recorded and
        ``RightsError("already_open")`` (409) is raised (a withdrawal's deletion opened once)."""
        now = self.now()
        if (kind == "correct") != (correction is not None):
            raise RightsError(
                "invalid_field",
                "correction is required for a correct request, and only for one",
                "correction",
            )
        if correction is not None and correction.node == subject.node:
            raise RightsError("invalid_field", "the correction is the identifier it corrects", "correction")
        if verification.reference is not None and looks_like_identifier(verification.reference):
            # the ledger never holds personal data: a case number, not a phone or an id card
            raise RightsError(
                "invalid_field",
                "reference looks like personal data (a phone, an ID number...): give the case number",
                "verification.reference",
            )
        received = received_at or now
        if received > now:
            raise RightsError("invalid_field", "receivedAt is in the future", "receivedAt")
        request_id = f"dsr-{uuid.uuid4()}"
        due = self.clock.due(received)
        detail: dict[str, Any] = {
            "request_id": request_id,
            "event": "opened",
            "kind": kind,
            "requested_by": requested_by,
            "channel": channel,
            "verification": msgspec.to_builtins(verification),
            "received_at": received.isoformat(),
            "due_at": due.isoformat(),
            "officer": officer,
        }
        if correction is not None:
            detail["correction"] = correction.node
        reason = _refusal(verification)
        if reason is not None:
            detail["event"] = "refused"
            detail["reason"] = reason
            await self._write(tenant, subject.node, [], "refused", detail, officer)
            log.info("rights.refused", tenant=tenant, request_id=request_id, kind=kind, reason=reason)
            raise RightsError(
                "unverified_request",
                f"the subject's identity is not verified ({reason}); refused and recorded as {request_id}",
                "verification",
                422,
            )
        await self._write(tenant, subject.node, [], "requested", detail, officer, unless=unless)
        log.info("rights.opened", tenant=tenant, request_id=request_id, kind=kind, due_at=due.isoformat())
        if kind in ("withdraw_all", "restrict"):
            await self._withdraw_all(tenant, request_id, subject.node, officer, step=kind)
            return await self.complete(tenant=tenant, request_id=request_id, outcome="done", officer=officer)
        if kind == "delete":
            await self._delete(tenant, request_id, subject.node, officer)
            return await self._complete_deletion(tenant, request_id, officer)
        if correction is not None:
            await self._correct(tenant, request_id, subject, correction, officer)
            return await self.complete(tenant=tenant, request_id=request_id, outcome="done", officer=officer)
        return await self.get(tenant, request_id)

    async def _step(
        self,
        tenant: str,
        request_id: str,
        subject: str,
        nodes: Sequence[str],
        officer: str,
        step: dict[str, Any],
        *,
        while_open: bool = False,
        unless: Precondition | None = None,
    ) -> None:
        await self._write(
            tenant,
            subject,
            nodes,
            "requested",
            {"request_id": request_id, "event": "step", **step},
            officer,
            while_open=request_id if while_open else None,
            unless=unless,
        )

    async def _withdraw_all(
        self,
        tenant: str,
        request_id: str,
        subject: str,
        officer: str,
        step: str = "withdraw_all",
        known: Sequence[str] = (),
        deleting: bool = False,
    ) -> list[str]:
        """Withdraw every purpose that rests on consent, for every identifier of the person
        (``restrict`` locks processing the same way: nothing that needs consent is forwarded
        until the person grants again; only contract-necessary processing goes on).
        ``known``: identifiers the request named before (a resumed deletion whose graph step
        had already run). ``deleting``: a deletion's first step; its ``identity.deleted``
        notice tells downstream, not a ``consent.withdrawn`` one the purge would catch."""
        nodes = list(dict.fromkeys([subject, *self.people.person(tenant, subject), *known]))
        rules = self.consent.rules[tenant]
        purposes = sorted(rules.known - rules.contract)
        receipts = await self.consent.record(
            tenant=tenant,
            identifiers=[(node_type(n), node_value(n)) for n in nodes],
            withdraw=purposes,
            notice_id=None,
            source=f"rights:{request_id}",
            platform="admin",
            consequences=not deleting,
        )
        record = {
            "step": step,
            "purposes": purposes,
            "identifiers": len(nodes),
            "consent_records": [r.seq for r in receipts],
        }
        await self._step(tenant, request_id, subject, nodes, officer, record)
        return nodes

    async def _correct(
        self, tenant: str, request_id: str, wrong: Identifier, right: Identifier, officer: str
    ) -> None:
        """The wrong identifier (a mistyped phone) leaves the person: its links are removed,
        the person splits where they held it together (``identity.split`` notices go
        downstream). The right value links through the normal rules (consent, limits, the
        trust model) at the person's next event that carries it; the ledger keeps both."""
        nodes = self.people.person(tenant, wrong.node)
        removed = await self.people.detach(tenant, [wrong])
        step = {"step": "correct", "wrong": wrong.node, "corrected": right.node, "links_removed": removed}
        await self._step(tenant, request_id, wrong.node, [*nodes, right.node], officer, step)

    async def _delete(self, tenant: str, request_id: str, subject: str, officer: str) -> None:
        """Withdraw everything (the withdrawals stay in the ledger), put every identifier of
        the person on the suppression list (consent.suppression: their re-sent events are
        dropped before anything is stored, so nothing purged next can come back), then
        every deletion step of the other domains, in order."""
        # resumed: the person as the request's earlier records named them (the graph may be gone)
        known = await asyncio.to_thread(self._request_nodes, tenant, request_id)
        nodes = await self._withdraw_all(tenant, request_id, subject, officer, known=known, deleting=True)
        await self._step(
            tenant, request_id, subject, nodes, officer, {"step": SUPPRESSED_STEP, "identifiers": len(nodes)}
        )
        for name, run in self.deletion_steps.items():
            counts = await run(tenant, nodes)
            await self._step(tenant, request_id, subject, nodes, officer, {"step": name, **dict(counts)})

    async def extend(
        self, *, tenant: str, request_id: str, working_days: int, reason: ExtensionReason, officer: str
    ) -> RightsRequest:
        """Move an open request's due date ``working_days`` further, with a reason (recorded;
        the original due date stays in the ledger)."""
        if not 1 <= working_days <= 30:
            raise RightsError("invalid_field", "workingDays must be between 1 and 30", "workingDays")
        request = await self.get(tenant, request_id)
        if request.status != "open":
            raise RightsError("not_open", f"request {request_id} is {request.status}", "requestId", 409)
        due = self.clock.extend(request.due_at, working_days)
        step = {
            "step": "extended",
            "working_days": working_days,
            "reason": reason,
            "due_at": due.isoformat(),
            "previous_due_at": request.due_at.isoformat(),
        }
        await self._step(tenant, request_id, request.subject, [], officer, step, while_open=True)
        return await self.get(tenant, request_id)

    async def pause_clock(
        self, *, tenant: str, request_id: str, reason: PauseReason, officer: str
    ) -> RightsRequest:
        """Stop an open request's clock while the handler waits on the subject (``reason``):
        until ``resume_clock`` it is neither overdue nor nearly due and its working days left do not
        count down. Recorded with who, when, why, and the due date and working days left at
        that moment. A request already paused, completed or refused: ``RightsError`` (409)."""
        request = await self.get(tenant, request_id)
        if request.status != "open":
            raise RightsError("not_open", f"request {request_id} is {request.status}", "requestId", 409)
        if request.paused_at is not None:
            raise RightsError(
                "already_paused",
                f"request {request_id}'s clock is already paused (since {request.paused_at.isoformat()}):"
                " resume it first",
                "requestId",
                409,
            )
        now = self.now()
        number = sum(1 for s in request.steps if s.get("step") == PAUSED_STEP) + 1
        step = {
            "step": PAUSED_STEP,
            "pause": number,
            "reason": reason,
            "paused_at": now.isoformat(),
            "due_at": request.due_at.isoformat(),
            "working_days_left": self.clock.working_days_left(request.due_at, now),
        }
        unless = self._not_yet(tenant, request, {"step": PAUSED_STEP, "pause": number}, "paused")
        await self._step(
            tenant, request_id, request.subject, [], officer, step, while_open=True, unless=unless
        )
        log.info("rights.paused", tenant=tenant, request_id=request_id, reason=reason)
        return await self.get(tenant, request_id)

    async def resume_clock(self, *, tenant: str, request_id: str, officer: str) -> RightsRequest:
        """Start a paused request's clock again: its due date moves by the working days the
        pause took (``RightsClock.paused_working_days``: after the day of the pause, up to and
        including today), recorded with the previous due date. A request whose clock is not
        paused, or that is completed or refused: ``RightsError`` (409)."""
        request = await self.get(tenant, request_id)
        if request.status != "open":
            raise RightsError("not_open", f"request {request_id} is {request.status}", "requestId", 409)
        if request.paused_at is None:
            raise RightsError(
                "not_paused",
                f"request {request_id}'s clock is not paused: nothing to resume",
                "requestId",
                409,
            )
        now = self.now()
        number = sum(1 for s in request.steps if s.get("step") == PAUSED_STEP)
        days = self.clock.paused_working_days(request.paused_at, now)
        due = self.clock.extend(request.due_at, days)
        step = {
            "step": RESUMED_STEP,
            "pause": number,
            "paused_at": request.paused_at.isoformat(),
            "resumed_at": now.isoformat(),
            "working_days": days,
            "due_at": due.isoformat(),
            "previous_due_at": request.due_at.isoformat(),
        }
        unless = self._not_yet(tenant, request, {"step": RESUMED_STEP, "pause": number}, "resumed")
        await self._step(
            tenant, request_id, request.subject, [], officer, step, while_open=True, unless=unless
        )
        log.info("rights.resumed", tenant=tenant, request_id=request_id, working_days=days)
        return await self.get(tenant, request_id)

    def _not_yet(
        self, tenant: str, request: RightsRequest, marker: dict[str, Any], done: str
    ) -> Precondition:
        """Refuses (``ClockChanged``) when a step with ``marker`` (the n-th pause, or its resume)
        is already recorded: two officers pausing at once record one pause, checked under the
        ledger's lock like a completion."""
        wanted = {"request_id": request.request_id, "event": "step", **marker}
        changed = f"request {request.request_id}'s clock was just {done} by someone else"
        return self._unrecorded(tenant, node_value(request.subject), wanted, lambda: ClockChanged(changed))

    async def _complete_deletion(self, tenant: str, request_id: str, officer: str) -> RightsRequest:
        """A deletion is answered once every store was reached (its steps) and every
        destination that held the person's data has its receipt; until then it stays open,
        ``remaining`` naming the destinations it waits for (a failed one is retried from
        the dead letters like any delivery). It is ``done`` only when no store is left out:
        the stores this deployment cannot delete from (``deletion_gaps``) make it
        ``partly_done``, naming them."""
        request = await self.get(tenant, request_id)
        if request.status != "open" or request.remaining:
            return request
        outcome: Outcome = "partly_done" if self.deletion_gaps else "done"
        try:
            return await self.complete(
                tenant=tenant,
                request_id=request_id,
                outcome=outcome,
                officer=officer,
                remaining=self.deletion_gaps,
            )
        except RightsError as error:
            if error.error != "not_open":
                raise
            # the last receipt came in meanwhile and its delivery worker (here or on another
            # replica) completed the request first: it is answered, which is what was asked
            return await self.get(tenant, request_id)

    async def deletion_receipt(
        self, *, tenant: str, destination: str, unified_ids: Collection[str], status: ReceiptStatus
    ) -> set[str]:
        """Delivery reports that ``destination`` was sent (or gave up on) the deletion notices
        of these persons: the receipt is recorded on each open deletion of theirs, which
        completes once every destination's receipt is in. Returns every unified ID of the
        persons of those deletion requests, earlier merged ones included (erased whole: the
        destination's person index forgets them once it received the notice)."""
        wanted = set(unified_ids)
        matched: set[str] = set()
        for request in await self.list(tenant=tenant):
            ids = wanted.intersection(request.unified_ids) if request.kind == "delete" else set()
            if not ids:
                continue
            matched.update(request.unified_ids)  # the IDs merged into the person's too
            if request.status != "open" or request.receipts.get(destination, status) == status:
                continue  # not a destination it waits for, or a redelivery already recorded
            step = {"step": RECEIPT_STEP, "destination": destination, "status": status}
            try:
                await self._step(
                    tenant, request.request_id, request.subject, [], RECEIPT_OFFICER, step, while_open=True
                )
            except RightsError:  # completed meanwhile (another replica): nothing left to wait for
                continue
            log.info(
                "rights.receipt",
                tenant=tenant,
                request_id=request.request_id,
                destination=destination,
                status=status,
            )
            await self._complete_deletion(tenant, request.request_id, request.officer)
        return matched if status in RECEIVED else set()

    async def complete(
        self, *, tenant: str, request_id: str, outcome: Outcome, officer: str, remaining: Sequence[str] = ()
    ) -> RightsRequest:
        """Answer a request: records the completion time and how long it took (and, for a
        ``partly_done`` one, what ``remaining`` it could not reach)."""
        request = await self.get(tenant, request_id)
        if request.status != "open":
            raise RightsError("not_open", f"request {request_id} is {request.status}", "requestId", 409)
        done = self.now()
        due = request.due_at
        if request.paused_at is not None:  # answered while paused: the pause ends here
            due = self.clock.extend(due, self.clock.paused_working_days(request.paused_at, done))
        seconds = (done - request.received_at).total_seconds()
        days = self.clock.calendar.working_days_between(local_day(request.received_at), local_day(done))
        detail: dict[str, Any] = {
            "request_id": request_id,
            "event": "completed",
            "outcome": outcome,
            "completed_at": done.isoformat(),
            "seconds_to_complete": round(seconds, 3),
            "working_days_to_complete": days,
            "on_time": done <= due,
        }
        if remaining:
            detail["remaining"] = list(remaining)
        await self._write(tenant, request.subject, [], "completed", detail, officer, while_open=request_id)
        log.info(
            "rights.completed",
            tenant=tenant,
            request_id=request_id,
            outcome=outcome,
            seconds=round(seconds, 3),
        )
        return await self.get(tenant, request_id)

    async def resume(self) -> list[str]:
        """Carry out the ``withdraw_all`` and ``delete`` requests left open (the process died
        between their records): every step again (each is idempotent: a second withdrawal,
        purge or erasure finds nothing more), then complete them; a deletion that reached
        every store before stays open for its destinations' receipts. Run at start; returns
        the ids completed. Another replica completing one first is not an error."""
        done: list[str] = []
        for request in await self.list(tenant=None, status="open"):
            if request.kind not in ("withdraw_all", "restrict", "delete", "correct"):
                continue
            if request.kind == "correct" and not request.correction:
                continue
            log.warning("rights.resuming", tenant=request.tenant, request_id=request.request_id)
            if request.kind == "correct":
                wrong, right = request.subject, str(request.correction)
                await self._correct(
                    request.tenant,
                    request.request_id,
                    Identifier(node_type(wrong), node_value(wrong)),
                    Identifier(node_type(right), node_value(right)),
                    request.officer,
                )
            elif request.kind != "delete":
                await self._withdraw_all(
                    request.tenant, request.request_id, request.subject, request.officer, step=request.kind
                )
            elif not set(self.deletion_steps) <= {s.get("step") for s in request.steps}:
                await self._delete(request.tenant, request.request_id, request.subject, request.officer)
            # else: every store was reached before; only receipts may be outstanding
            try:
                if request.kind == "delete":
                    finished = await self._complete_deletion(
                        request.tenant, request.request_id, request.officer
                    )
                    if finished.status == "open":
                        continue  # waiting for destinations' receipts: delivery completes it
                else:
                    await self.complete(
                        tenant=request.tenant,
                        request_id=request.request_id,
                        outcome="done",
                        officer=request.officer,
                    )
            except RightsError:
                continue
            done.append(request.request_id)
        return done

    async def bundle(self, *, tenant: str, request_id: str, officer: str) -> dict[str, Any]:
        """The signed bundle answering an access or copy request (consent.rights_bundle):
        recorded as a step with the bundle's digest; an open request is then completed."""
        request = await self.get(tenant, request_id)
        if request.kind not in ("access", "copy"):
            raise RightsError(
                "wrong_kind",
                f"request {request_id} is a {request.kind} request, not access or copy",
                "requestId",
                409,
            )
        if request.status == "refused":
            raise RightsError("not_open", f"request {request_id} was refused", "requestId", 409)
        signer = self.consent.ledger.signer
        if signer is None:
            raise RightsError("unavailable", "this gateway holds no ledger signing key", None, 503)
        nodes = list(dict.fromkeys([request.subject, *self.people.person(tenant, request.subject)]))
        unified = sorted({self.people.unified_id(tenant, n) for n in nodes})
        records = await asyncio.to_thread(self._history, tenant, nodes)
        consent_seqs = [r.seq for r in records if r.record_type == "consent"]
        deliveries = (
            await asyncio.to_thread(self.proofs.relying_on, consent_seqs, 10_000) if self.proofs else []
        )
        held = await self.holdings(tenant, nodes, unified) if self.holdings else Holdings([], [])
        bundle = build_bundle(
            request_id=request_id,
            tenant=tenant,
            kind=request.kind,
            subject=request.subject,
            nodes=nodes,
            unified_ids=unified,
            records=records,
            deliveries=deliveries,
            held=held.events,
            recipients=held.recipients,
            generated_at=self.now(),
        )
        step = {
            "step": "bundle",
            "sha256": bundle_digest(bundle),
            "identifiers": len(nodes),
            "consent_records": len(records),
            "deliveries": len(deliveries),
            "held_events": len(held.events),
            "destinations": len(bundle["destinations"]),
        }
        await self._step(tenant, request_id, request.subject, nodes, officer, step)
        if request.status == "open":
            await self.complete(tenant=tenant, request_id=request_id, outcome="done", officer=officer)
        return sign_bundle(bundle, signer)

    def _history(self, tenant: str, nodes: Sequence[str]) -> list[Any]:
        """Every ledger record naming one of ``nodes``, rights requests included, in seq order."""
        by_seq: dict[int, Any] = {}
        for node in nodes:
            after = 0
            while True:
                page = self.consent.ledger.records(
                    tenant=tenant, identifier=node, after_seq=after, limit=5000
                )
                by_seq.update((r.seq, r) for r in page)
                if len(page) < 5000:
                    break
                after = page[-1].seq
        return [by_seq[s] for s in sorted(by_seq)]

    # -- reading -------------------------------------------------------------------------
    def _request_nodes(self, tenant: str, request_id: str) -> list[str]:
        """Every identifier the records of one request name (blocking)."""
        named = (
            r.identifiers or []
            for r in self._records(tenant)
            if (r.detail or {}).get("request_id") == request_id
        )
        return list(dict.fromkeys(n for identifiers in named for n in identifiers))

    def _records(self, tenant: str | None) -> list[Any]:
        out: list[Any] = []
        after = 0
        while True:
            page = self.consent.ledger.records(
                tenant=tenant, record_type="rights_request", after_seq=after, limit=5000
            )
            out.extend(page)
            if len(page) < 5000:
                return out
            after = page[-1].seq

    def fold(self, records: Sequence[Any], now: datetime | None = None) -> list[RightsRequest]:
        return fold_requests(records, self.clock, now or self.now())

    async def list(
        self, *, tenant: str | None, status: str | None = None, clock: str | None = None
    ) -> list[RightsRequest]:
        records = await asyncio.to_thread(self._records, tenant)
        out = self.fold(records)
        if status is not None:
            out = [r for r in out if r.status == status]
        if clock is not None:
            out = [r for r in out if r.clock == clock]
        return out

    async def get(self, tenant: str, request_id: str) -> RightsRequest:
        for request in await self.list(tenant=tenant):
            if request.request_id == request_id:
                return request
        raise RightsError(
            "not_found", f"no rights request {request_id} for tenant {tenant!r}", "requestId", 404
        )

    def open_counts(self) -> dict[tuple[str, str, str], int]:
        """(tenant, kind, clock) -> open requests, for the ``/metrics`` gauge (blocking)."""
        counts: dict[tuple[str, str, str], int] = {}
        for r in self.fold(self._records(None)):
            if r.status == "open":
                key = (r.tenant, r.kind, r.clock)
                counts[key] = counts.get(key, 0) + 1
        return counts


__all__ = [
    "RECEIVED",
    "RIGHTS_KINDS",
    "Channel",
    "DeletionStep",
    "ExtensionReason",
    "Holdings",
    "HoldingsOf",
    "PauseReason",
    "People",
    "ReceiptStatus",
    "Requester",
    "RightsError",
    "RightsKind",
    "RightsRequest",
    "RightsService",
    "Verification",
    "fold_requests",
]
