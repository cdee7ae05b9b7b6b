"""The breach query (PIPL Art. 57): whose data, for which purposes and how many events went
to one destination in a time window, so the people concerned can be notified.

It reads the delivery proofs (which forwarded event relied on which consent records) and
the ledger records they name (the subject's pseudonyms, the purposes granted). Subjects
are pseudonyms (``<type>:<pseudonym>``), never raw identifiers. Blocking: run in a thread.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec
import sqlalchemy as sa

from consent.models import LedgerRecord
from consent.proofs import DeliveryProofs

_LEDGER: sa.Table = LedgerRecord.__table__  # type: ignore[attr-defined]

MAX_WINDOW = timedelta(days=366)
# deliveries read per query; a window holding more is answered ``truncated``
MAX_DELIVERIES = 200_000


class BreachQueryError(Exception):
    """A breach query that cannot be answered as asked (maps to a 4xx naming ``field``)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


def check_window(start: datetime, end: datetime, *, fields: tuple[str, str] = ("from", "to")) -> None:
    """A window runs forward and spans at most ``MAX_WINDOW``."""
    if end <= start:
        raise BreachQueryError(fields[1], f"{fields[1]} must be after {fields[0]}")
    if end - start > MAX_WINDOW:
        raise BreachQueryError(
            fields[1], f"the window spans more than {MAX_WINDOW.days} days: query it in parts"
        )


class BreachSubject(msgspec.Struct, frozen=True, rename="camel"):
    """One subject whose data went to the destination in the window."""

    subject: str  # the node id of the consenting identifier: "<type>:<pseudonym>"
    events: int
    purposes: list[str]
    first_delivered_at: datetime
    last_delivered_at: datetime
    # the person (unified ID) the identifier belongs to now; None without identity resolution
    unified_id: str | None = None


class BreachReport(msgspec.Struct, frozen=True, rename="camel"):
    tenant: str
    destination: str
    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")
    events: int = 0  # distinct events delivered in the window
    subjects: list[BreachSubject] = []
    persons: int = 0  # distinct unified IDs among the subjects
    purposes: dict[str, int] = {}  # purpose -> events delivered for it
    # more deliveries than one query reads (MAX_DELIVERIES): narrow the window
    truncated: bool = False


def subject_node(subject: str | None, identifiers: list[str]) -> str | None:
    """The node (``<type>:<pseudonym>``) of a record's subject among its identifiers."""
    return next(
        (n for n in identifiers if n.partition(":")[2] == subject), identifiers[0] if identifiers else None
    )


@dataclass
class _Seen:
    first: datetime
    last: datetime
    messages: set[str] = field(default_factory=set)
    purposes: set[str] = field(default_factory=set)


def breach_report(
    proofs: DeliveryProofs,
    *,
    tenant: str,
    destination: str,
    destination_purposes: Collection[str],
    start: datetime,
    end: datetime,
    limit: int = MAX_DELIVERIES,
) -> BreachReport:
    """The deliveries to ``destination`` in [start, end) that relied on consent, by subject
    and purpose (a purpose counts when the destination needs it and the record granted it)."""
    check_window(start, end)
    rows = proofs.delivered_between(destination, start, end, limit + 1)
    truncated = len(rows) > limit
    rows = rows[:limit]
    seqs = sorted({seq for _, seq, _ in rows})
    records: dict[int, tuple[str | None, list[str]]] = {}
    t = _LEDGER.c
    with proofs.engine.connect() as conn:
        for chunk in range(0, len(seqs), 1000):
            query = sa.select(t.seq, t.subject, t.identifiers, t.purposes).where(
                t.seq.in_(seqs[chunk : chunk + 1000]), t.tenant == tenant
            )
            for seq, subject, identifiers, purposes in conn.execute(query):
                records[int(seq)] = (subject_node(subject, identifiers or []), list(purposes or []))
    needed = set(destination_purposes)
    by_subject: dict[str, _Seen] = {}
    message_purposes: dict[str, set[str]] = {}
    for message_id, seq, at in rows:
        subject, granted = records.get(seq, (None, []))
        if subject is None:
            continue
        purposes = {p for p in granted if p in needed}
        message_purposes.setdefault(message_id, set()).update(purposes)
        seen = by_subject.setdefault(subject, _Seen(first=at, last=at))
        seen.messages.add(message_id)
        seen.purposes.update(purposes)
        seen.first, seen.last = min(seen.first, at), max(seen.last, at)
    counts: dict[str, int] = {}
    for purposes in message_purposes.values():
        for p in purposes:
            counts[p] = counts.get(p, 0) + 1
    subjects = [
        BreachSubject(
            subject=subject,
            events=len(seen.messages),
            purposes=sorted(seen.purposes),
            first_delivered_at=seen.first,
            last_delivered_at=seen.last,
        )
        for subject, seen in sorted(by_subject.items())
    ]
    return BreachReport(
        tenant=tenant,
        destination=destination,
        start=start,
        end=end,
        events=len(message_purposes),
        subjects=subjects,
        purposes=dict(sorted(counts.items())),
        truncated=truncated,
    )
