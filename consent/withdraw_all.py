"""When withdrawals leave a person with nothing granted (PIPL Art. 15, 47).

The rule behind a tenant's ``on_withdraw_all = "delete"``, decided from the consent state
after a withdrawal, not from the call alone: a withdrawal *leaves the person with nothing*
when, once it is applied, no purpose that rests on consent has a basis for any identifier
of the person (a withdrawal on any of them denies the purpose, and a grant counts only
where it was given: ``consent.decisions``), and either the call named every consent-based
purpose or it took away a purpose the person still had granted just before it. So the
last of several one-by-one withdrawals counts, and an opt-out of a purpose never granted
(a marketing opt-out at sign-up) deletes nobody. The state is folded from the ledger up to
the call's own records, so a sweep that finds the call later decides exactly as the call
would have.

The deletion a withdrawal opens is written once: ``not_yet_opened`` is checked under the
ledger's lock and refuses when a request already names that withdrawal (``ledger:<seq>``
in its verification reference), or when a ``delete`` request is still open for one of the
person's identifiers. ``SweepMark`` is the sweep's watermark (``consent_projection`` row
``withdraw_all``): the last ledger seq whose withdrawals were looked at.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from consent.ledger import AppendRefused, Ledger, Precondition
from consent.models import ProjectionRow, advance_projection_mark, projection_mark
from consent.rotation import SubjectAliases
from identity.db import dialect_insert
from identity.identifiers import node_type, node_value

_PROJECTION = ProjectionRow.__table__  # type: ignore[attr-defined]
SWEEP_MARK = "withdraw_all"
_PAGE = 5_000


def withdrawal_reference(seq: int) -> str:
    """The verification reference of the deletion a withdrawal (its first record) opens."""
    return f"ledger:{seq}"


def latest_states(
    records: Iterable[Any], upto_seq: int, same: Mapping[str, str] | None = None
) -> dict[str, dict[str, tuple[int, str]]]:
    """Identifier -> purpose -> (seq, state) of the latest consent record up to ``upto_seq``;
    ``same``: an earlier pseudonym (key rotation) -> the identifier it is, whose state it
    shares (the later record wins, as the decisions fold aliases)."""
    same = same or {}
    latest: dict[str, dict[str, tuple[int, str]]] = {}
    for r in records:
        if r.record_type != "consent" or r.seq > upto_seq:
            continue
        for node in r.identifiers or ():
            entries = latest.setdefault(same.get(node, node), {})
            for purpose in r.purposes or ():
                if purpose not in entries or entries[purpose][0] < r.seq:
                    entries[purpose] = (r.seq, r.state)
    return latest


def granted(latest: Mapping[str, Mapping[str, tuple[int, str]]], purposes: Collection[str]) -> set[str]:
    """The ``purposes`` with a basis for the person: given on one of their identifiers and
    withdrawn on none (most restrictive wins, as ``consent.decisions.decide``)."""
    out: set[str] = set()
    for purpose in purposes:
        states = [entries[purpose][1] for entries in latest.values() if purpose in entries]
        if "given" in states and "withdrawn" not in states:
            out.add(purpose)
    return out


def leaves_nothing(
    history: Iterable[Any],
    call: Sequence[Any],
    consent_purposes: Collection[str],
    same: Mapping[str, str] | None = None,
) -> bool:
    """Whether the withdrawal records of one ``call`` leave the person (``history``: the
    consent records naming any of their identifiers, up to the call's at least; ``same``:
    as ``latest_states``) with no consent-based purpose granted, taking away the last grant
    (module docstring)."""
    history = list(history)
    first, last = min(r.seq for r in call), max(r.seq for r in call)
    withdrawn = {p for r in call for p in r.purposes or ()}
    if granted(latest_states(history, last, same), consent_purposes):
        return False
    if set(consent_purposes) <= withdrawn:
        return True
    return bool(granted(latest_states(history, first - 1, same), consent_purposes) & withdrawn)


def earlier_nodes(aliases: SubjectAliases, tenant: str, nodes: Sequence[str]) -> dict[str, str]:
    """The earlier pseudonyms remembered for ``nodes`` (key rotation), as nodes: earlier
    node -> the node it became (blocking)."""
    out: dict[str, str] = {}
    by_type: dict[str, list[str]] = {}
    for node in nodes:
        by_type.setdefault(node_type(node), []).append(node_value(node))
    for kind, values in by_type.items():
        for old, new in aliases.earlier(tenant, values).items():
            out[f"{kind}:{old}"] = f"{kind}:{new}"
    return out


def person_history(ledger: Ledger, tenant: str, nodes: Sequence[str], upto_seq: int) -> list[Any]:
    """The consent records naming any of ``nodes``, up to ``upto_seq`` (blocking)."""
    out: list[Any] = []
    after = 0
    while nodes:
        page = ledger.records(
            tenant=tenant, record_type="consent", any_identifier=nodes, after_seq=after, limit=_PAGE
        )
        out.extend(r for r in page if r.seq <= upto_seq)
        if len(page) < _PAGE or page[-1].seq >= upto_seq:
            return out
        after = page[-1].seq
    return out


def not_yet_opened(ledger: Ledger, tenant: str, reference: str, nodes: Sequence[str]) -> Precondition:
    """Refuses (``AppendRefused``) when a rights request already names the withdrawal
    ``reference``, or a ``delete`` request of one of ``nodes`` is still open."""
    named = {"event": "opened", "verification": {"reference": reference}}
    opened_delete = {"event": "opened", "kind": "delete"}
    person = set(nodes)

    def check(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:  # chained before in this same transaction
            d = r.get("detail") or {}
            if r["tenant"] != tenant or r["record_type"] != "rights_request" or d.get("event") != "opened":
                continue
            if (d.get("verification") or {}).get("reference") == reference or (
                d.get("kind") == "delete" and person & set(r.get("identifiers") or ())
            ):
                raise AppendRefused(reference)
        if ledger.details(conn, tenant=tenant, record_type="rights_request", detail=named, limit=1):
            raise AppendRefused(reference)
        for opened in ledger.details(
            conn, tenant=tenant, record_type="rights_request", detail=opened_delete, any_identifier=nodes
        ):
            completion = {"request_id": opened["request_id"], "event": "completed"}
            if not ledger.details(
                conn, tenant=tenant, record_type="rights_request", detail=completion, limit=1
            ):
                raise AppendRefused(reference)

    return check


def already_opened(ledger: Ledger, tenant: str, reference: str) -> bool:
    """Whether a rights request names the withdrawal ``reference`` (blocking; a sweep's
    look before it takes the ledger's lock to open one)."""
    named = {"event": "opened", "verification": {"reference": reference}}
    with ledger.engine.connect() as conn:
        return bool(ledger.details(conn, tenant=tenant, record_type="rights_request", detail=named, limit=1))


class SweepMark:
    """The last ledger seq whose withdrawals the sweep looked at, in the consent database
    (shared by every replica; it only moves forward)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def get(self) -> int | None:
        """The mark; None before the first sweep of this database (blocking)."""
        with self.engine.connect() as conn:
            return projection_mark(conn, SWEEP_MARK)

    def start(self, seq: int) -> int:
        """The mark, set to ``seq`` when there is none yet (the withdrawals before the
        feature's first start are not swept: no retroactive deletion); returns it."""
        with self.engine.begin() as conn:
            stmt = dialect_insert(self.engine)(_PROJECTION).values(name=SWEEP_MARK, applied_seq=seq)
            conn.execute(stmt.on_conflict_do_nothing())
        return self.get() or 0

    def advance(self, seq: int) -> None:
        with self.engine.begin() as conn:
            advance_projection_mark(conn, SWEEP_MARK, seq)


__all__ = [
    "SweepMark",
    "already_opened",
    "earlier_nodes",
    "granted",
    "latest_states",
    "leaves_nothing",
    "not_yet_opened",
    "person_history",
    "withdrawal_reference",
]
