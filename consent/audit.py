"""What compliance officers read from the consent store: records, point-in-time views,
consent rates, exports.

``ConsentAudit`` answers the audit API (gateway.admin) with typed views; subjects are
named by pseudonymised identifiers (``"<type>:<pseudonym>"`` nodes), never raw ones.
Statistics are computed by the database (a window over the ledger's consent records), so
a ledger of millions of records is never loaded into memory. Methods are blocking: run
them in a thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import sqlalchemy as sa

from consent.ledger import Ledger
from consent.models import LedgerRecord, UTCDateTime
from consent.proofs import Delivery, DeliveryProofs
from consent.rotation import SubjectAliases

StatsGroup = Literal["purpose", "notice", "platform"]
ExportFormat = Literal["jsonl", "csv"]
ExportPart = Literal["records", "checkpoints"]


class LedgerEntry(msgspec.Struct, frozen=True, rename="camel"):
    """One ledger record as the audit API shows it."""

    seq: int
    record_id: str
    tenant: str
    type: str
    subject: str | None
    identifiers: list[str]
    notice_id: str | None
    notice_hash: str | None
    purposes: list[str]
    state: str
    consent_kind: str
    legal_basis: str
    source: str | None
    platform: str | None
    sdk: str | None
    at: datetime
    evidence_hash: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


def ledger_entry(r: LedgerRecord) -> LedgerEntry:
    return LedgerEntry(
        seq=r.seq,
        record_id=r.record_id,
        tenant=r.tenant,
        type=r.record_type,
        subject=r.subject,
        identifiers=list(r.identifiers or []),
        notice_id=r.notice_id,
        notice_hash=r.notice_hash,
        purposes=list(r.purposes or []),
        state=r.state,
        consent_kind=r.consent_kind,
        legal_basis=r.legal_basis,
        source=r.source,
        platform=r.platform,
        sdk=r.sdk,
        at=r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC),
        evidence_hash=r.evidence_hash,
        detail=dict(r.detail or {}),
        prev_hash=r.prev_hash,
        hash=r.hash,
    )


class PurposeState(msgspec.Struct, frozen=True, rename="camel"):
    """The latest record of one purpose for a subject at a moment."""

    state: str
    seq: int
    record_id: str
    notice_id: str | None
    consent_kind: str
    at: datetime


class SubjectView(msgspec.Struct, frozen=True, rename="camel"):
    """What a subject allowed at a moment, and the deliveries that relied on those grants."""

    subject: str
    at: datetime
    under_fourteen: bool | None
    purposes: dict[str, PurposeState]
    deliveries: list[Delivery]
    records: int


class RateGroup(msgspec.Struct, frozen=True):
    given: int
    withdrawn: int
    rate: float | None


class ConsentStats(msgspec.Struct, frozen=True):
    tenant: str
    by: StatsGroup
    subjects: int
    groups: dict[str, RateGroup]
    # as the rates stood at this time (None: now)
    at: datetime | None = None


class ConsentAudit:
    def __init__(self, ledger: Ledger, proofs: DeliveryProofs, aliases: SubjectAliases | None = None) -> None:
        self.ledger = ledger
        self.proofs = proofs
        # key rotation: earlier pseudonyms of a subject, remembered when its events were seen
        self.aliases = aliases

    def _every_node(self, tenant: str, node: str, aliases: Sequence[str]) -> list[str]:
        """The subject under the live versions given, and every earlier pseudonym remembered."""
        nodes = list(dict.fromkeys([node, *aliases]))
        if self.aliases is not None:
            kind = node.partition(":")[0]
            values = [n.partition(":")[2] for n in nodes]
            nodes += [
                f"{kind}:{old}"
                for old in self.aliases.olds_of(tenant, values)
                if f"{kind}:{old}" not in nodes
            ]
        return nodes

    def records(
        self,
        *,
        tenant: str,
        node: str | None = None,
        aliases: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        purpose: str | None = None,
        notice_id: str | None = None,
        after_seq: int = 0,
        limit: int = 500,
    ) -> list[LedgerEntry]:
        """``aliases``: the subject's pseudonyms under older live key versions (matched too,
        with the earlier pseudonyms remembered at rotations)."""
        every = self._every_node(tenant, node, aliases) if node is not None else []
        found = self.ledger.records(
            tenant=tenant,
            identifier=node if len(every) == 1 else None,
            any_identifier=every if len(every) > 1 else None,
            since=since,
            until=until,
            purpose=purpose,
            notice_id=notice_id,
            after_seq=after_seq,
            limit=limit,
        )
        return [ledger_entry(r) for r in found]

    def subject_at(self, *, tenant: str, node: str, at: datetime, aliases: Sequence[str] = ()) -> SubjectView:
        """Point in time: the state of each purpose for the subject (the records naming this
        identifier, under any live key version (``aliases``), up to ``at``), the minor flag,
        and the deliveries relying on the grants."""
        every = self._every_node(tenant, node, aliases)
        found = self.ledger.records(
            tenant=tenant,
            identifier=node if len(every) == 1 else None,
            any_identifier=every if len(every) > 1 else None,
            until=at,
            limit=100_000,
        )
        purposes: dict[str, PurposeState] = {}
        minor: bool | None = None
        for r in found:  # seq order: the last one per purpose is the state at that moment
            if r.record_type == "subject_flag":
                minor = r.state == "flagged"
            if r.record_type != "consent":
                continue
            entry = ledger_entry(r)
            for p in r.purposes or []:
                purposes[p] = PurposeState(
                    state=r.state,
                    seq=r.seq,
                    record_id=r.record_id,
                    notice_id=r.notice_id,
                    consent_kind=r.consent_kind,
                    at=entry.at,
                )
        grants = [v.seq for v in purposes.values() if v.state == "given"]
        return SubjectView(
            subject=node,
            at=at,
            under_fourteen=minor,
            purposes=purposes,
            deliveries=self.proofs.relying_on(grants),
            records=len(found),
        )

    def stats(self, *, tenant: str, by: StatsGroup, at: datetime | None = None) -> ConsentStats:
        """Consent rates: per subject and purpose the latest consent record counts, grouped
        by purpose, by the notice it was given under, or by platform; ``at``: as they stood
        then (only records written by that time count)."""
        engine = self.ledger.engine
        if engine.dialect.name == "postgresql":
            purposes = sa.func.json_array_elements_text(sa.column("purposes")).table_valued("value")
        else:
            purposes = sa.func.json_each(sa.column("purposes")).table_valued("value")
        ledger = sa.table(
            "consent_ledger",
            sa.column("seq"),
            sa.column("tenant"),
            sa.column("record_type"),
            sa.column("subject"),
            sa.column("purposes"),
            sa.column("state"),
            sa.column("notice_id"),
            sa.column("platform"),
            sa.column("at", UTCDateTime()),
        )
        purpose = purposes.c.value
        scope = [ledger.c.tenant == tenant, ledger.c.record_type == "consent"]
        if at is not None:
            scope.append(ledger.c.at <= at)
        latest = (
            sa.select(
                ledger.c.subject.label("subject"),
                purpose.label("purpose"),
                ledger.c.state.label("state"),
                ledger.c.notice_id.label("notice"),
                ledger.c.platform.label("platform"),
                sa.func.row_number()
                .over(partition_by=(ledger.c.subject, purpose), order_by=ledger.c.seq.desc())
                .label("rank"),
            )
            .select_from(ledger.join(purposes, sa.true()))
            .where(*scope)
            .subquery()
        )
        current = sa.select(latest).where(latest.c.rank == 1).subquery()
        key = sa.func.coalesce(current.c[by], "-")
        grouped = sa.select(key.label("key"), current.c.state, sa.func.count()).group_by(key, current.c.state)
        subjects = sa.select(sa.func.count(sa.distinct(current.c.subject)))
        counts: dict[str, dict[str, int]] = {}
        with engine.connect() as conn:
            for group, state, n in conn.execute(grouped):
                counts.setdefault(str(group), {})[str(state)] = int(n)
            total = int(conn.scalar(subjects) or 0)
        groups = {}
        for group, states in sorted(counts.items()):
            given, withdrawn = states.get("given", 0), states.get("withdrawn", 0)
            rate = round(given / (given + withdrawn), 4) if given + withdrawn else None
            groups[group] = RateGroup(given, withdrawn, rate)
        return ConsentStats(tenant=tenant, by=by, subjects=total, groups=groups, at=at)

    def stats_trend(
        self, *, tenant: str, by: StatsGroup, until: datetime, days: int
    ) -> dict[str, list[float | None]]:
        """Each group's consent rate as it stood at the end of each of the ``days`` days up
        to ``until`` (oldest first; None where the group had no record yet)."""
        points = [until - timedelta(days=days - 1 - i) for i in range(days)]
        series: dict[str, list[float | None]] = {}
        for i, moment in enumerate(points):
            for group, rates in self.stats(tenant=tenant, by=by, at=moment).groups.items():
                series.setdefault(group, [None] * days)[i] = rates.rate
        return series

    def export(
        self, *, tenant: str | None, fmt: ExportFormat, part: ExportPart, tenant_only: bool = False
    ) -> str:
        """JSONL (records, signed checkpoints, a seal: ``idgate ledger verify`` checks it
        offline), or CSV of the records or of the checkpoints. ``tenant_only``: nothing
        about other tenants' records (no checkpoints; see ``Ledger.export_objects``)."""
        buf = io.StringIO()
        if fmt == "jsonl":
            self.ledger.export_jsonl(buf, tenant=tenant, tenant_only=tenant_only)
        elif part == "checkpoints":
            self.ledger.export_checkpoints_csv(buf)
        else:
            self.ledger.export_csv(buf, tenant=tenant)
        return buf.getvalue()
