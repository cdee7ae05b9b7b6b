"""Retention on the consent side (PIPL Art. 19): the floors the law sets, the delivery proofs
and officers' access-log entries past their period, and the ledger record of each run.

The consent ledger and the rights-request records in it are never removed by a retention
run: the hash chain and its signed checkpoints prove that nothing was taken out, and the
law wants them kept (at least ``LEDGER_MIN_DAYS``). Access-log entries are kept at least
``ACCESS_LOG_MIN_DAYS``. A configuration below a floor is refused when it is checked.

What a run removed, with its cutoffs, is itself a ``retention_run`` ledger record, so the
removal is provable later from the ledger (``idgate ledger verify``). Methods are
blocking: run them in a thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import msgspec

from consent.access_log import AccessLog
from consent.ledger import Ledger, RecordDraft
from consent.ledger_format import rfc3339
from consent.proofs import DeliveryProofs

# PIPL and its implementing rules: consent records and rights-request handling are evidence
# kept at least three years; the officers' access log (who looked at personal data) six months.
LEDGER_MIN_DAYS = 3 * 365
RIGHTS_REQUESTS_MIN_DAYS = 3 * 365
ACCESS_LOG_MIN_DAYS = 183


def floor_problems(
    *, ledger_days: int, rights_requests_days: int, access_log_days: int, where: str
) -> list[str]:
    """What a tenant's retention floors get wrong, each naming its field (``where``: the
    tenant's retention table). ``access_log_days`` 0 keeps the access log for good."""
    problems = []
    if ledger_days < LEDGER_MIN_DAYS:
        problems.append(
            f"{where}.ledger_days: {ledger_days} is under the legal minimum of {LEDGER_MIN_DAYS} days "
            "(consent records are kept at least 3 years)"
        )
    if rights_requests_days < RIGHTS_REQUESTS_MIN_DAYS:
        problems.append(
            f"{where}.rights_requests_days: {rights_requests_days} is under the legal minimum of "
            f"{RIGHTS_REQUESTS_MIN_DAYS} days (rights-request records are kept at least 3 years)"
        )
    if access_log_days and access_log_days < ACCESS_LOG_MIN_DAYS:
        problems.append(
            f"{where}.access_log_days: {access_log_days} is under the legal minimum of "
            f"{ACCESS_LOG_MIN_DAYS} days (access logs are kept at least 6 months; 0 keeps them for good)"
        )
    return problems


def expire_consent_side(
    proofs: DeliveryProofs,
    access_log: AccessLog,
    *,
    tenant: str,
    destination_cutoffs: Mapping[str, datetime],
    access_log_cutoff: datetime | None,
    apply: bool,
) -> dict[str, int]:
    """Delivery proofs older than their destination's cutoff and access-log entries of the
    tenant older than ``access_log_cutoff`` (None: kept): counted, removed with ``apply``."""
    removed = {
        "delivery_proofs": sum(
            proofs.expire(destination, cutoff, apply=apply)
            for destination, cutoff in destination_cutoffs.items()
        )
    }
    if access_log_cutoff is not None:
        removed["access_log"] = access_log.expire(tenant, access_log_cutoff, apply=apply)
    return removed


class RetentionRun(msgspec.Struct, frozen=True, rename="camel"):
    """One tenant's part of a retention run: its cutoffs and what was (or would be) removed."""

    tenant: str
    apply: bool
    # destination -> data received (delivered, dead-lettered) before this time goes
    cutoffs: dict[str, datetime]
    # destination -> its period in days (the shortest of its own and its purposes')
    periods_days: dict[str, int]
    # store -> entries (files for the file sinks) removed, or found by a dry run
    removed: dict[str, int]
    access_log_cutoff: datetime | None = None
    # identity-graph aliases made before this time expire (``aliases_days``; None: kept)
    aliases_cutoff: datetime | None = None
    ledger_seq: int | None = None


def record_run(ledger: Ledger, run: RetentionRun, *, started_at: datetime, by: str) -> int:
    """Append the run to the consent ledger as a ``retention_run`` record; returns its seq."""
    detail = {
        "started_at": rfc3339(started_at),
        "cutoffs": {d: rfc3339(at) for d, at in sorted(run.cutoffs.items())},
        "periods_days": dict(sorted(run.periods_days.items())),
        "removed": dict(sorted(run.removed.items())),
        "access_log_cutoff": rfc3339(run.access_log_cutoff) if run.access_log_cutoff else None,
        "aliases_cutoff": rfc3339(run.aliases_cutoff) if run.aliases_cutoff else None,
    }
    draft = RecordDraft(
        tenant=run.tenant,
        record_type="retention_run",
        state="completed",
        legal_basis="contract",
        source=by,
        platform="admin",
        detail=detail,
    )
    (record,) = ledger.append([draft])
    return int(record.seq)
