"""The consent ledger store: append-only, hash-chained, with signed Merkle checkpoints and exports.

Every grant, withdrawal, notice publication, rights request and subject flag is one
``LedgerRecord``. Records carry a global ``seq`` (contiguous from 1, assigned by the
appender under a lock that serialises appenders across processes) and
``hash = sha256(canonical_bytes(record))``, where the canonical bytes include ``seq``,
``record_id`` and ``prev_hash`` (the previous record's hash, ``"0" * 64`` for seq 1). Every
``checkpoint_every`` records a checkpoint stores the Merkle root of the records it covers,
signed with the ledger's Ed25519 key and chained to the previous checkpoint's root.

Exports (JSONL) carry everything a verifier needs offline: the records, the checkpoints
(with their public keys), a header and an end line (the "seal": counts, last hash, a
digest of every exported record hash; signed when the exporting process holds the key).
The encoding lives in ``consent.ledger_format``; the offline verifier, which needs no
database, in ``consent.verify``. ``verify_database`` runs that verifier over the store.
Consent calls append through ``consent.group_commit``: the concurrent calls of a process in
one transaction (``append_prepared``), chained in the order they were queued.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import uuid
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine

from consent.ledger_format import (
    CHECKPOINT_FIELDS,
    EXPORT_FORMAT,
    GENESIS_HASH,
    RECORD_FIELDS,
    canonical_bytes,
    canonical_json,
    checkpoint_message,
    checkpoint_object,
    export_line,
    merkle_root,
    record_hash,
    record_object,
    rfc3339,
    seal_message,
)
from consent.models import (
    CONSENT_KINDS,
    LEGAL_BASES,
    RECORD_STATES,
    RECORD_TYPES,
    ConsentKind,
    LedgerCheckpoint,
    LedgerRecord,
    LegalBasis,
    RecordState,
    RecordType,
)
from consent.signing import LedgerSigner
from consent.verify import VerifyResult, verify_objects
from identity.db import is_postgres, is_sqlite
from identity.identifiers import is_node

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock key shared by every appender of the database ("idgate" + 2).
LEDGER_LOCK_KEY = 0x6964_6761_7465_0002
_EXPORT_BATCH = 1000

_LEDGER: sa.Table = LedgerRecord.__table__  # type: ignore[attr-defined]
_CHECKPOINTS: sa.Table = LedgerCheckpoint.__table__  # type: ignore[attr-defined]


class AppendedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A record as the appender stored it: ``LedgerRecord``'s fields without the ORM object
    (building one of those cost 110 us a record on the consent hot path)."""

    seq: int
    record_id: str
    tenant: str
    record_type: str
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


# Writes of the same transaction as an append: (connection, seq before the first record,
# the records of each caller in chain order).
InTransaction = Callable[[sa.Connection, int, list[list[AppendedRecord]]], None]


class AppendRefused(Exception):
    """A caller's precondition did not hold when its turn came in the locked transaction:
    none of that caller's drafts was appended (the other callers' were)."""


# (connection, the rows chained before it in this transaction) -> None, or raise
# AppendRefused: checked under the ledger's lock, so a check-then-append cannot race another
# process or another caller of the same group.
Precondition = Callable[[sa.Connection, Sequence[dict[str, Any]]], None]


class InvalidRecord(ValueError):
    """A draft that cannot become a ledger record (unknown type or state, naive time, non-JSON detail)."""


class LedgerReadOnly(Exception):
    """Appending or checkpointing needs the ledger signing key, and this Ledger has none."""


class LedgerCorrupt(Exception):
    """The stored ledger is not contiguous; run verify_database to find out where."""


class RecordDraft(msgspec.Struct, kw_only=True, frozen=True):
    """A ledger record before the appender numbers it, names it and chains it."""

    tenant: str
    record_type: RecordType
    subject: str | None = None
    identifiers: list[str] = []
    notice_id: str | None = None
    notice_hash: str | None = None
    purposes: list[str] = []
    state: RecordState
    consent_kind: ConsentKind = "general"
    legal_basis: LegalBasis = "consent"
    source: str | None = None
    platform: str | None = None
    sdk: str | None = None
    at: datetime | None = None
    evidence_hash: str | None = None
    detail: dict[str, Any] = {}

    def __post_init__(self) -> None:
        # msgspec checks types when decoding, not on __init__: the appender is the last gate.
        if self.record_type not in RECORD_TYPES:
            raise InvalidRecord(f"unknown record_type {self.record_type!r}")
        if self.state not in RECORD_STATES:
            raise InvalidRecord(f"unknown state {self.state!r}")
        if self.consent_kind not in CONSENT_KINDS:
            raise InvalidRecord(f"unknown consent_kind {self.consent_kind!r}")
        if self.legal_basis not in LEGAL_BASES:
            raise InvalidRecord(f"unknown legal_basis {self.legal_basis!r}")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise InvalidRecord("tenant is required")
        for identifier in self.identifiers:
            if not is_node(identifier):
                raise InvalidRecord("identifiers must be '<type>:<pseudonym>' strings")
        if not all(isinstance(p, str) and p for p in self.purposes):
            raise InvalidRecord("purposes must be non-empty strings")
        if self.at is not None and (self.at.tzinfo is None or self.at.utcoffset() is None):
            raise InvalidRecord("at must be timezone-aware")
        if not isinstance(self.detail, dict):
            raise InvalidRecord("detail must be a JSON object")


def _draft_fields(draft: RecordDraft, now: datetime) -> dict[str, Any]:
    """The stored form of a draft, normalised so that what is hashed is what reads back."""
    try:
        detail = json.loads(canonical_json(draft.detail))
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"detail is not plain JSON: {exc}") from None
    fields: dict[str, Any] = {
        "tenant": draft.tenant,
        "record_type": draft.record_type,
        "subject": draft.subject,
        "identifiers": list(draft.identifiers),
        "notice_id": draft.notice_id,
        "notice_hash": draft.notice_hash,
        "purposes": list(draft.purposes),
        "state": draft.state,
        "consent_kind": draft.consent_kind,
        "legal_basis": draft.legal_basis,
        "source": draft.source,
        "platform": draft.platform,
        "sdk": draft.sdk,
        "at": (draft.at or now).astimezone(UTC),
        "evidence_hash": draft.evidence_hash,
        "detail": detail,
    }
    try:
        canonical_bytes(fields)
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in a string
        raise InvalidRecord(f"record is not encodable: {exc}") from None
    return fields


# -- the ledger ----------------------------------------------------------------------------


class Ledger:
    """The consent ledger on one database (SQLite or PostgreSQL), shared by every process.

    Without a signer the ledger is read-only (queries, exports, verification)."""

    def __init__(self, engine: Engine, signer: LedgerSigner | None, *, checkpoint_every: int = 1000) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.engine = engine
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self._sqlite_insert: tuple[str, list[tuple[str, Any]]] | None = None

    def __repr__(self) -> str:
        key = self.signer.key_id if self.signer is not None else None
        backend = self.engine.dialect.name
        return f"Ledger(backend={backend}, key_id={key}, checkpoint_every={self.checkpoint_every})"

    # -- writes --------------------------------------------------------------------------
    @contextmanager
    def _locked_transaction(self) -> Iterator[sa.Connection]:
        """One transaction holding the ledger's append lock, across processes and hosts.

        PostgreSQL: a transaction-scoped advisory lock, taken before reading the last seq
        (READ COMMITTED, so the read sees the previous holder's commit). SQLite: BEGIN
        IMMEDIATE takes the database write lock before the read."""
        with self.engine.connect() as conn:
            if is_sqlite(self.engine):
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            elif is_postgres(self.engine):
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                if is_postgres(self.engine):
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEDGER_LOCK_KEY})
                yield conn

    def _require_signer(self) -> LedgerSigner:
        if self.signer is None:
            raise LedgerReadOnly(
                "this ledger has no signing key (IDGATE_LEDGER_KEY or IDGATE_LEDGER_KEY_FILE)"
            )
        return self.signer

    def append(self, drafts: Sequence[RecordDraft]) -> list[LedgerRecord]:
        """Append the drafts as consecutive records, in one transaction (and one checkpoint when due)."""
        if not drafts:
            return []
        (records,) = self.append_prepared([self.prepare(drafts)])
        return [LedgerRecord(**msgspec.structs.asdict(r)) for r in records]

    def prepare(self, drafts: Sequence[RecordDraft]) -> list[dict[str, Any]]:
        """The stored form of the drafts, checked (``InvalidRecord``) before any transaction:
        a draft that cannot be a record fails its own caller, never a group it would join."""
        self._require_signer()
        now = datetime.now(UTC)
        return [_draft_fields(d, now) for d in drafts]

    def append_prepared(
        self,
        groups: Sequence[Sequence[dict[str, Any]]],
        *,
        in_transaction: InTransaction | None = None,
        preconditions: Sequence[Precondition | None] = (),
    ) -> list[list[AppendedRecord]]:
        """Append several callers' prepared drafts (``prepare``) in one locked transaction,
        chained in the order given; returns each caller's records. ``in_transaction(conn,
        prev_seq, records_per_caller)`` runs before the commit, in the same transaction (the
        state projection writes there): what it writes commits with the records or not at all.

        ``preconditions[i]``, when given, is checked for caller ``i`` just before its drafts
        are chained; one that raises ``AppendRefused`` leaves that caller out (its list is
        empty; the precondition keeps its own refusal for its caller)."""
        self._require_signer()
        out: list[list[AppendedRecord]] = []
        rows: list[dict[str, Any]] = []
        with self._locked_transaction() as conn:
            last = conn.execute(
                sa.select(_LEDGER.c.seq, _LEDGER.c.hash).order_by(_LEDGER.c.seq.desc()).limit(1)
            ).first()
            seq, prev_hash = (int(last.seq), str(last.hash)) if last is not None else (0, GENESIS_HASH)
            first_prev = seq
            for i, prepared in enumerate(groups):
                mine = []
                check = preconditions[i] if i < len(preconditions) else None
                if check is not None:
                    try:
                        check(conn, rows)
                    except AppendRefused:
                        out.append([])
                        continue
                for fields in prepared:
                    seq += 1
                    row = {"seq": seq, "record_id": uuid.uuid4().hex, **fields, "prev_hash": prev_hash}
                    row["hash"] = prev_hash = record_hash(row)
                    rows.append(row)
                    mine.append(row)
                out.append([AppendedRecord(**row) for row in mine])
            if not rows:
                return out
            self._insert(conn, rows)
            if in_transaction is not None:
                in_transaction(conn, first_prev, out)
            checkpoint = self._checkpoint_locked(conn, last_seq=seq, force=False)
        log.debug(
            "ledger.appended", first_seq=rows[0]["seq"], last_seq=seq, count=len(rows), groups=len(groups)
        )
        if checkpoint is not None:
            self._log_checkpoint(checkpoint)
        return out

    def _insert(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """The rows in one executemany. On SQLite straight to the driver, with the columns'
        own bind processors (what SQLAlchemy would store, without its per-row overhead)."""
        if not is_sqlite(self.engine):
            conn.execute(sa.insert(_LEDGER), rows)
            return
        if self._sqlite_insert is None:
            dialect = self.engine.dialect
            columns = [
                (c.name, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in _LEDGER.columns
            ]
            names = ", ".join(name for name, _ in columns)
            marks = ", ".join("?" for _ in columns)
            self._sqlite_insert = (f"INSERT INTO {_LEDGER.name} ({names}) VALUES ({marks})", columns)
        sql, columns = self._sqlite_insert
        params = [
            tuple(row[name] if process is None else process(row[name]) for name, process in columns)
            for row in rows
        ]
        conn.exec_driver_sql(sql, params)

    def checkpoint(self) -> LedgerCheckpoint | None:
        """Sign a checkpoint over every record not yet covered; None when there is none."""
        self._require_signer()
        with self._locked_transaction() as conn:
            last_seq = conn.scalar(sa.select(sa.func.max(_LEDGER.c.seq))) or 0
            checkpoint = self._checkpoint_locked(conn, last_seq=int(last_seq), force=True)
        if checkpoint is not None:
            self._log_checkpoint(checkpoint)
        return checkpoint

    def _log_checkpoint(self, cp: LedgerCheckpoint) -> None:
        log.info("ledger.checkpoint", from_seq=cp.from_seq, to_seq=cp.to_seq, root=cp.root, key_id=cp.key_id)

    def _checkpoint_locked(
        self, conn: sa.Connection, *, last_seq: int, force: bool
    ) -> LedgerCheckpoint | None:
        previous = conn.execute(
            sa.select(_CHECKPOINTS.c.to_seq, _CHECKPOINTS.c.root)
            .order_by(_CHECKPOINTS.c.to_seq.desc())
            .limit(1)
        ).first()
        covered, prev_root = (int(previous.to_seq), str(previous.root)) if previous else (0, GENESIS_HASH)
        uncovered = last_seq - covered
        if uncovered <= 0 or (not force and uncovered < self.checkpoint_every):
            return None
        hashes = list(
            conn.scalars(sa.select(_LEDGER.c.hash).where(_LEDGER.c.seq > covered).order_by(_LEDGER.c.seq))
        )
        if len(hashes) != uncovered:
            raise LedgerCorrupt(f"records {covered + 1}..{last_seq} are not contiguous ({len(hashes)} found)")
        signer = self._require_signer()
        at = datetime.now(UTC)
        root = merkle_root(hashes)
        message = checkpoint_message(
            from_seq=covered + 1, to_seq=last_seq, root=root, prev_root=prev_root, at=at
        )
        row: dict[str, Any] = {
            "from_seq": covered + 1,
            "to_seq": last_seq,
            "root": root,
            "signature": signer.sign(message),
            "public_key": signer.public_key_b64,
            "key_id": signer.key_id,
            "at": at,
        }
        inserted = conn.execute(sa.insert(_CHECKPOINTS).values(**row)).inserted_primary_key
        assert inserted is not None  # a single-row INSERT always has its key
        return LedgerCheckpoint(id=inserted[0], **row)

    # -- queries -------------------------------------------------------------------------
    def _contains(self, column: sa.Column[Any], value: str) -> sa.ColumnElement[bool]:
        """``value`` is an element of the JSON array in ``column`` (exact string match)."""
        if is_postgres(self.engine):
            return sa.cast(column, JSONB).contains(sa.cast(sa.literal(json.dumps([value])), JSONB))
        elements = sa.func.json_each(column).table_valued("value")
        return sa.exists(sa.select(sa.literal(1)).select_from(elements).where(elements.c.value == value))

    def holds(
        self, conn: sa.Connection, *, tenant: str, record_type: str, subject: str, detail: Mapping[str, Any]
    ) -> bool:
        """Whether ``conn`` sees a ``record_type`` record of ``subject`` whose detail has every
        item of ``detail`` (a check under the append lock, see ``Precondition``)."""
        return bool(
            self.details(
                conn, tenant=tenant, record_type=record_type, subject=subject, detail=detail, limit=1
            )
        )

    def details(
        self,
        conn: sa.Connection,
        *,
        tenant: str,
        record_type: str,
        detail: Mapping[str, Any],
        subject: str | None = None,
        any_identifier: Sequence[str] = (),
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """The details of the ``record_type`` records ``conn`` sees whose detail has every item
        of ``detail`` (a nested mapping matches the items it names), of ``subject`` or naming
        one of ``any_identifier`` when given (checks under the append lock, ``Precondition``)."""
        query = sa.select(_LEDGER.c.detail).where(
            _LEDGER.c.tenant == tenant, _LEDGER.c.record_type == record_type
        )
        if subject is not None:
            query = query.where(_LEDGER.c.subject == subject)
        if any_identifier:
            query = query.where(sa.or_(*(self._contains(_LEDGER.c.identifiers, i) for i in any_identifier)))
        if is_postgres(self.engine):
            wanted = sa.cast(sa.literal(json.dumps(detail)), JSONB)
            query = query.where(sa.cast(_LEDGER.c.detail, JSONB).contains(wanted))
        else:
            for path, value in _json_paths(detail, "$"):
                query = query.where(sa.func.json_extract(_LEDGER.c.detail, path) == value)
        return [dict(d or {}) for d in conn.execute(query.order_by(_LEDGER.c.seq).limit(limit)).scalars()]

    def records(
        self,
        *,
        tenant: str | None = None,
        subject: str | None = None,
        identifier: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        purpose: str | None = None,
        notice_id: str | None = None,
        record_type: str | None = None,
        state: str | None = None,
        any_identifier: Sequence[str] | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[LedgerRecord]:
        """Records in seq order matching every filter given (``since <= at <= until``).

        ``identifier`` (``"<type>:<pseudonym>"``) and ``purpose`` match an element of the
        record's list; ``any_identifier`` matches records naming any of them (one identifier
        under every live key version); page with ``after_seq`` = the last seq returned."""
        query = sa.select(_LEDGER).where(_LEDGER.c.seq > after_seq)
        if tenant is not None:
            query = query.where(_LEDGER.c.tenant == tenant)
        if subject is not None:
            query = query.where(_LEDGER.c.subject == subject)
        if notice_id is not None:
            query = query.where(_LEDGER.c.notice_id == notice_id)
        if record_type is not None:
            query = query.where(_LEDGER.c.record_type == record_type)
        if state is not None:
            query = query.where(_LEDGER.c.state == state)
        if since is not None:
            query = query.where(_LEDGER.c.at >= since)
        if until is not None:
            query = query.where(_LEDGER.c.at <= until)
        if identifier is not None:
            query = query.where(self._contains(_LEDGER.c.identifiers, identifier))
        if any_identifier:
            query = query.where(sa.or_(*(self._contains(_LEDGER.c.identifiers, i) for i in any_identifier)))
        if purpose is not None:
            query = query.where(self._contains(_LEDGER.c.purposes, purpose))
        query = query.order_by(_LEDGER.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [LedgerRecord(**row) for row in conn.execute(query).mappings()]

    def record(self, seq: int) -> LedgerRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_LEDGER).where(_LEDGER.c.seq == seq)).mappings().first()
        return LedgerRecord(**row) if row is not None else None

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.max(_LEDGER.c.seq))) or 0)

    def count(self, *, tenant: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(_LEDGER)
        if tenant is not None:
            query = query.where(_LEDGER.c.tenant == tenant)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def checkpoints(self) -> list[LedgerCheckpoint]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.to_seq)).mappings()
            return [LedgerCheckpoint(**row) for row in rows]

    # -- export --------------------------------------------------------------------------
    @contextmanager
    def _snapshot(self) -> Iterator[sa.Connection]:
        """One read transaction, so an export is a consistent cut while appends go on."""
        with self.engine.connect() as conn:
            if is_postgres(self.engine):
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def export_objects(
        self,
        *,
        tenant: str | None = None,
        progress: Callable[[int], None] | None = None,
        sign: bool = True,
        tenant_only: bool = False,
    ) -> Generator[dict[str, Any]]:
        """The export as objects: header, records with checkpoints interleaved, end (the seal).

        A checkpoint follows the record with seq == its to_seq (in a tenant-filtered export:
        the last exported record at or before it). ``progress`` gets the number of records
        written since its last call. ``tenant_only`` (with ``tenant``): nothing about the
        other tenants' records either, for an officer who may see one tenant only: no
        checkpoints (their ranges count every tenant's records) and ``ledger_last_seq`` is
        the tenant's own last record."""
        with self._snapshot() as conn:
            last = sa.select(sa.func.max(_LEDGER.c.seq))
            if tenant_only and tenant is not None:
                last = last.where(_LEDGER.c.tenant == tenant)
            upper = int(conn.scalar(last) or 0)
            checkpoints = (
                []
                if tenant_only and tenant is not None
                else [
                    checkpoint_object(row)
                    for row in conn.execute(
                        sa.select(_CHECKPOINTS)
                        .where(_CHECKPOINTS.c.to_seq <= upper)
                        .order_by(_CHECKPOINTS.c.to_seq)
                    ).mappings()
                ]
            )
            header = {
                "kind": "header",
                "format": EXPORT_FORMAT,
                "tenant_filter": tenant,
                "exported_at": rfc3339(datetime.now(UTC)),
                "ledger_last_seq": upper,
            }
            yield header
            query = sa.select(_LEDGER).where(_LEDGER.c.seq <= upper).order_by(_LEDGER.c.seq)
            if tenant is not None:
                query = query.where(_LEDGER.c.tenant == tenant)
            digest = hashlib.sha256()
            count, last_seq, last_hash, pending, next_cp = 0, 0, GENESIS_HASH, 0, 0
            result = conn.execution_options(yield_per=_EXPORT_BATCH).execute(query)
            # Closed explicitly: a consumer that stops early must not leave a server-side cursor.
            with contextlib.closing(result):
                for row in result.mappings():
                    while next_cp < len(checkpoints) and checkpoints[next_cp]["to_seq"] < row["seq"]:
                        yield checkpoints[next_cp]
                        next_cp += 1
                    yield record_object(row)
                    count += 1
                    last_seq, last_hash = int(row["seq"]), str(row["hash"])
                    digest.update(last_hash.encode("ascii", "replace") + b"\n")
                    pending += 1
                    if progress is not None and pending >= _EXPORT_BATCH:
                        progress(pending)
                        pending = 0
            yield from checkpoints[next_cp:]
            if progress is not None and pending:
                progress(pending)
            end: dict[str, Any] = {
                "kind": "end",
                "records": count,
                "last_seq": last_seq,
                "last_hash": last_hash,
                "digest": digest.hexdigest(),
                "checkpoints": len(checkpoints),
                "last_checkpoint_root": checkpoints[-1]["root"] if checkpoints else GENESIS_HASH,
                "signature": None,
                "public_key": None,
                "key_id": None,
            }
            if sign and self.signer is not None:
                end["signature"] = self.signer.sign(seal_message(header, end))
                end["public_key"] = self.signer.public_key_b64
                end["key_id"] = self.signer.key_id
            yield end

    def export_jsonl(
        self,
        fh: IO[str],
        *,
        tenant: str | None = None,
        progress: Callable[[int], None] | None = None,
        tenant_only: bool = False,
    ) -> int:
        """Write the verifiable JSONL export; returns the number of records.

        One JSON object per line, each with a ``kind``:

        - ``header`` (first line): ``format``, ``tenant_filter`` (null for the whole ledger),
          ``exported_at``, ``ledger_last_seq``;
        - ``record``: every ``LedgerRecord`` field, ``at`` as RFC 3339 UTC (``...Z``), seq order;
        - ``checkpoint``: ``id``, ``from_seq``, ``to_seq``, ``root``, ``signature``,
          ``public_key``, ``key_id``, ``at``, right after the record with seq == ``to_seq``;
        - ``end`` (last line, the seal): ``records``, ``last_seq``, ``last_hash``, ``digest``
          (sha256 over the exported record hashes, one per line), ``checkpoints``,
          ``last_checkpoint_root``, and a ``signature``/``public_key``/``key_id`` over
          ``seal_message`` when this ledger holds the signing key (else null).

        With ``tenant``, only that tenant's records are written (checkpoints all are): such
        an export cannot be chain-verified on its own, since the chain is global, and
        ``verify_export`` reports it as incomplete.
        """
        records = 0
        for obj in self.export_objects(tenant=tenant, progress=progress, tenant_only=tenant_only):
            records += obj["kind"] == "record"
            fh.write(export_line(obj))
        return records

    def export_csv(
        self, fh: IO[str], *, tenant: str | None = None, progress: Callable[[int], None] | None = None
    ) -> int:
        """Write the records as CSV (columns ``RECORD_FIELDS``); returns the number of records.

        For spreadsheets and analysts, not for proof: list and object fields are JSON text,
        None is an empty cell, and there are no checkpoints (see ``export_checkpoints_csv``).
        Verification needs the JSONL export."""
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(RECORD_FIELDS)
        records = 0
        for obj in self.export_objects(tenant=tenant, progress=progress, sign=False):
            if obj["kind"] != "record":
                continue
            writer.writerow([_csv_cell(obj[name]) for name in RECORD_FIELDS])
            records += 1
        return records

    def export_checkpoints_csv(self, fh: IO[str]) -> int:
        """Write the checkpoints as CSV (columns ``CHECKPOINT_FIELDS``); returns their number."""
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CHECKPOINT_FIELDS)
        rows = self.checkpoints()
        for cp in rows:
            writer.writerow(
                [
                    _csv_cell(checkpoint_object(cp.model_dump(), CHECKPOINT_FIELDS)[name])
                    for name in CHECKPOINT_FIELDS
                ]
            )
        return len(rows)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return str(value)


def _json_paths(detail: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """SQLite JSON paths of the leaves of ``detail`` (``$.verification.reference``)."""
    for key, value in detail.items():
        if isinstance(value, Mapping):
            yield from _json_paths(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def verify_database(ledger: Ledger, *, trusted_keys: Collection[str] | None = None) -> VerifyResult:
    """Verify the stored ledger: the same checks as an export of it, without a file.

    Detects rows edited or deleted behind the appender's back (the triggers dropped first).
    Records deleted from the very end, after the last checkpoint, leave no trace in the
    database itself: that is what the checkpoints and the seals of earlier exports are for."""
    objects = ledger.export_objects(sign=False)
    with contextlib.closing(objects):  # stopping at the first problem ends the read transaction now
        return verify_objects(enumerate(objects, start=1), trusted_keys)
