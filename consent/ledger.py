"""The consent ledger: append-only, hash-chained, with signed Merkle checkpoints and verifiable exports.

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
``verify_export`` names the first bad record of an edited, shortened, extended or
reordered export.

What verification proves, and what it does not:

- any change to an exported record, and any removal, insertion or reordering, is detected
  from the hash chain and the seal alone;
- a rewrite that recomputes every hash after the change is detected by the signed
  checkpoints and the signed seal, provided the verifier pins the ledger's public key
  (``trusted_keys``, ``idgate ledger verify --public-key``): without a pinned key, a
  forger holding a key of their own can re-sign, and the result lists the key ids seen so
  they can be compared;
- a tenant-filtered export holds only part of the global chain, so only each record's own
  hash, its order, the checkpoint signatures and the seal can be checked: the result says
  ``complete=False`` and the CLI says so.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine

from consent.db import is_postgres, is_sqlite
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
from consent.signing import LedgerSigner, key_id_of, verify
from identity.identifiers import is_node

log = structlog.get_logger(__name__)

GENESIS_HASH = "0" * 64
EXPORT_FORMAT = "idgate-consent-ledger/1"
# pg_advisory_xact_lock key shared by every appender of the database ("idgate" + 2).
LEDGER_LOCK_KEY = 0x6964_6761_7465_0002
_CHECKPOINT_DOMAIN = b"idgate-ledger-checkpoint/v1\n"
_SEAL_DOMAIN = b"idgate-ledger-export-seal/v1\n"
_EXPORT_BATCH = 1000

RECORD_FIELDS: tuple[str, ...] = (
    "seq",
    "record_id",
    "tenant",
    "record_type",
    "subject",
    "identifiers",
    "notice_id",
    "notice_hash",
    "purposes",
    "state",
    "consent_kind",
    "legal_basis",
    "source",
    "platform",
    "sdk",
    "at",
    "evidence_hash",
    "detail",
    "prev_hash",
    "hash",
)
CHECKPOINT_FIELDS: tuple[str, ...] = (
    "id",
    "from_seq",
    "to_seq",
    "root",
    "signature",
    "public_key",
    "key_id",
    "at",
)

# In exports the checkpoint id is left out: it is the database's row id, covered by no signature.
_EXPORTED_CHECKPOINT_FIELDS = CHECKPOINT_FIELDS[1:]
_HEADER_KEYS = frozenset({"kind", "format", "tenant_filter", "exported_at", "ledger_last_seq"})
_CHECKPOINT_KEYS = frozenset({"kind", *_EXPORTED_CHECKPOINT_FIELDS})
_END_KEYS = frozenset(
    {"kind", "records", "last_seq", "last_hash", "digest", "checkpoints", "last_checkpoint_root"}
    | {"signature", "public_key", "key_id"}
)

_LEDGER: sa.Table = LedgerRecord.__table__  # type: ignore[attr-defined]
_CHECKPOINTS: sa.Table = LedgerCheckpoint.__table__  # type: ignore[attr-defined]


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


class VerifyResult(msgspec.Struct, kw_only=True):
    """The outcome of verifying an export or the database.

    ``problem`` is one of ``edited``, ``removed``, ``inserted``, ``reordered``,
    ``bad_checkpoint``, ``bad_signature``, ``malformed``; ``first_bad_seq`` names the first
    record concerned when one can be named. ``complete`` is True only when the whole chain
    from seq 1 was verified (never for a tenant-filtered export); ``signed_through`` is the
    last seq covered by a valid signature (checkpoint or export seal).
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None = None
    problem: str | None = None
    detail: str = ""
    complete: bool = False
    signed_through: int = 0
    key_ids: list[str] = []


# -- canonical encoding ------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds, ``Z``: the one text form of a time inside hashes and signatures."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidRecord("ledger times must be timezone-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _canonical_json(value: Any) -> bytes:
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    ).encode("utf-8")


def canonical_bytes(record_fields: Mapping[str, Any]) -> bytes:
    """Sorted-key compact JSON (UTF-8) of every field but ``hash``; times as RFC 3339 UTC.

    Lists keep their order: the order of identifiers and purposes is part of the record."""
    return _canonical_json({k: v for k, v in record_fields.items() if k != "hash"})


def record_hash(record_fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(record_fields)).hexdigest()


def merkle_root(hashes: Sequence[str]) -> str:
    """Root of the binary SHA-256 tree over the record hashes in seq order.

    Leaves are the 32-byte record hashes; a parent is ``sha256(left || right)``; the last
    node of a level with an odd count is promoted unchanged. The tree shape is fixed by the
    count, which the signed checkpoint states (from_seq..to_seq)."""
    if not hashes:
        raise ValueError("a Merkle root needs at least one hash")
    level = [bytes.fromhex(h) for h in hashes]
    while len(level) > 1:
        parents = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])
        level = parents
    return level[0].hex()


def checkpoint_message(*, from_seq: int, to_seq: int, root: str, prev_root: str, at: datetime | str) -> bytes:
    """The bytes a checkpoint signature covers (``prev_root`` chains checkpoints together)."""
    stamp = at if isinstance(at, str) else rfc3339(at)
    body = {"from_seq": from_seq, "to_seq": to_seq, "root": root, "prev_root": prev_root, "at": stamp}
    return _CHECKPOINT_DOMAIN + _canonical_json(body)


def seal_message(header: Mapping[str, Any], end: Mapping[str, Any]) -> bytes:
    """The bytes an export seal signature covers: the header and the end line's counts and hashes."""
    body = {
        "format": header.get("format"),
        "tenant_filter": header.get("tenant_filter"),
        "exported_at": header.get("exported_at"),
        "ledger_last_seq": header.get("ledger_last_seq"),
        **{k: end.get(k) for k in _SEAL_FIELDS},
    }
    return _SEAL_DOMAIN + _canonical_json(body)


_SEAL_FIELDS = ("records", "last_seq", "last_hash", "digest", "checkpoints", "last_checkpoint_root")


def _draft_fields(draft: RecordDraft, now: datetime) -> dict[str, Any]:
    """The stored form of a draft, normalised so that what is hashed is what reads back."""
    try:
        detail = json.loads(_canonical_json(draft.detail))
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


def _record_object(row: Mapping[str, Any]) -> dict[str, Any]:
    """An export line's object for a record row: every field, time in its canonical text."""
    out: dict[str, Any] = {"kind": "record"}
    for name in RECORD_FIELDS:
        value = row[name]
        out[name] = rfc3339(value) if isinstance(value, datetime) else value
    return out


def _checkpoint_object(
    row: Mapping[str, Any], fields: Sequence[str] = _EXPORTED_CHECKPOINT_FIELDS
) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "checkpoint"}
    for name in fields:
        value = row[name]
        out[name] = rfc3339(value) if isinstance(value, datetime) else value
    return out


def _export_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


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
        self._require_signer()
        now = datetime.now(UTC)
        prepared = [_draft_fields(d, now) for d in drafts]
        rows: list[dict[str, Any]] = []
        with self._locked_transaction() as conn:
            last = conn.execute(
                sa.select(_LEDGER.c.seq, _LEDGER.c.hash).order_by(_LEDGER.c.seq.desc()).limit(1)
            ).first()
            seq, prev_hash = (int(last.seq), str(last.hash)) if last is not None else (0, GENESIS_HASH)
            for fields in prepared:
                seq += 1
                row = {"seq": seq, "record_id": uuid.uuid4().hex, **fields, "prev_hash": prev_hash}
                row["hash"] = prev_hash = record_hash(row)
                rows.append(row)
            conn.execute(sa.insert(_LEDGER), rows)
            checkpoint = self._checkpoint_locked(conn, last_seq=seq, force=False)
        log.debug("ledger.appended", first_seq=rows[0]["seq"], last_seq=seq, count=len(rows))
        if checkpoint is not None:
            self._log_checkpoint(checkpoint)
        return [LedgerRecord(**row) for row in rows]

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
        result = conn.execute(sa.insert(_CHECKPOINTS).values(**row))
        return LedgerCheckpoint(id=result.inserted_primary_key[0], **row)

    # -- queries -------------------------------------------------------------------------
    def _contains(self, column: sa.Column[Any], value: str) -> sa.ColumnElement[bool]:
        """``value`` is an element of the JSON array in ``column`` (exact string match)."""
        if is_postgres(self.engine):
            return sa.cast(column, JSONB).contains(sa.cast(sa.literal(json.dumps([value])), JSONB))
        elements = sa.func.json_each(column).table_valued("value")
        return sa.exists(sa.select(sa.literal(1)).select_from(elements).where(elements.c.value == value))

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
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[LedgerRecord]:
        """Records in seq order matching every filter given (``since <= at <= until``).

        ``identifier`` (``"<type>:<pseudonym>"``) and ``purpose`` match an element of the
        record's list; page with ``after_seq`` = the last seq returned."""
        query = sa.select(_LEDGER).where(_LEDGER.c.seq > after_seq)
        if tenant is not None:
            query = query.where(_LEDGER.c.tenant == tenant)
        if subject is not None:
            query = query.where(_LEDGER.c.subject == subject)
        if notice_id is not None:
            query = query.where(_LEDGER.c.notice_id == notice_id)
        if record_type is not None:
            query = query.where(_LEDGER.c.record_type == record_type)
        if since is not None:
            query = query.where(_LEDGER.c.at >= since)
        if until is not None:
            query = query.where(_LEDGER.c.at <= until)
        if identifier is not None:
            query = query.where(self._contains(_LEDGER.c.identifiers, identifier))
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
        self, *, tenant: str | None = None, progress: Callable[[int], None] | None = None, sign: bool = True
    ) -> Iterator[dict[str, Any]]:
        """The export as objects: header, records with checkpoints interleaved, end (the seal).

        A checkpoint follows the record with seq == its to_seq (in a tenant-filtered export:
        the last exported record at or before it). ``progress`` gets the number of records
        written since its last call."""
        with self._snapshot() as conn:
            upper = int(conn.scalar(sa.select(sa.func.max(_LEDGER.c.seq))) or 0)
            checkpoints = [
                _checkpoint_object(row)
                for row in conn.execute(
                    sa.select(_CHECKPOINTS)
                    .where(_CHECKPOINTS.c.to_seq <= upper)
                    .order_by(_CHECKPOINTS.c.to_seq)
                ).mappings()
            ]
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
                    yield _record_object(row)
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
        self, fh: IO[str], *, tenant: str | None = None, progress: Callable[[int], None] | None = None
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
        for obj in self.export_objects(tenant=tenant, progress=progress):
            records += obj["kind"] == "record"
            fh.write(_export_line(obj))
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
                    _csv_cell(_checkpoint_object(cp.model_dump(), CHECKPOINT_FIELDS)[name])
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


# -- verification --------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, problem: str, first_bad_seq: int | None, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.first_bad_seq = first_bad_seq
        self.detail = detail


class _Anomaly(msgspec.Struct):
    """A break in seq order, classified once the rest of the export has been seen."""

    # "seq": seq != expected; "link": prev_hash does not link; "checkpoint": records
    # expected..got came before the checkpoint that ends at expected - 1.
    kind: str
    expected: int
    got: int | None
    line: int


def _is_int(value: Any) -> bool:
    return type(value) is int


class _Verifier:
    """Walks an export (or the database, as export objects) once, keeping O(checkpoint interval) state.

    A break in seq order is classified after the whole input has been read (is the
    missing seq somewhere later? does the unexpected one appear twice?), so that a swap
    reads as ``reordered``, a gap as ``removed`` and a copy as ``inserted``."""

    def __init__(self, trusted_keys: Collection[str] | None) -> None:
        self.trusted = frozenset(trusted_keys) if trusted_keys else None
        self.header: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.partial = False
        self.records = 0
        self.checkpoints = 0
        self.expected = 1
        self.prev_hash = GENESIS_HASH
        self.pending: list[str] = []
        self.seen: set[int] = set()  # tenant-filtered exports only
        self.last_seq = 0
        self.digest = hashlib.sha256()
        self.cp_to = 0
        self.cp_root = GENESIS_HASH
        self.accepted_checkpoints = 0
        self.signed_through = 0
        self.key_ids: list[str] = []
        self.anomaly: _Anomaly | None = None
        self.later: Counter[int] = Counter()

    # -- per line ----------------------------------------------------------------------
    def feed(self, obj: Any, line: int) -> None:
        if self.anomaly is not None:
            # Only the seqs that follow matter now, to classify the break.
            if isinstance(obj, dict):
                if obj.get("kind") == "record" and _is_int(obj.get("seq")):
                    self.later[obj["seq"]] += 1
                elif obj.get("kind") == "end":
                    self.end = obj
            return
        if self.end is not None:
            raise _Failure("malformed", None, f"line {line}: content after the end line")
        if not isinstance(obj, dict):
            raise _Failure("malformed", self._here(), f"line {line}: not a JSON object")
        kind = obj.get("kind")
        expected_keys = {"header": _HEADER_KEYS, "checkpoint": _CHECKPOINT_KEYS, "end": _END_KEYS}.get(
            str(kind)
        )
        if expected_keys is not None and obj.keys() != expected_keys:
            raise _Failure(
                "malformed", self._here(), f"line {line}: unexpected or missing fields in a {kind} line"
            )
        if self.header is None:
            if kind != "header" or obj.get("format") != EXPORT_FORMAT:
                raise _Failure("malformed", None, f"line {line}: not an {EXPORT_FORMAT} export header")
            tenant_filter = obj.get("tenant_filter")
            if tenant_filter is not None and not isinstance(tenant_filter, str):
                raise _Failure("malformed", None, f"line {line}: tenant_filter must be a string or null")
            self.header = obj
            self.partial = tenant_filter is not None
        elif kind == "record":
            self._record(obj, line)
        elif kind == "checkpoint":
            self._checkpoint(obj, line)
        elif kind == "end":
            self.end = obj
        else:
            raise _Failure("malformed", self._here(), f"line {line}: unknown kind {kind!r}")

    def _here(self) -> int | None:
        return None if self.partial or self.header is None else self.expected

    def _record(self, obj: dict[str, Any], line: int) -> None:
        self.records += 1
        fields = {k: v for k, v in obj.items() if k != "kind"}
        seq = fields.get("seq")
        claimed = fields.get("hash")
        try:
            computed: str | None = record_hash(fields)
        except (TypeError, ValueError):
            computed = None
        if computed is None or computed != claimed:
            named = (seq if _is_int(seq) else None) if self.partial else self.expected
            raise _Failure(
                "edited",
                named,
                f"line {line}: record seq {seq!r} does not match its hash (its content was changed)",
            )
        if not _is_int(seq):  # hashed as such: a forged record, made without the ledger's encoder
            raise _Failure("malformed", self._here(), f"line {line}: record without an integer seq")
        self.digest.update(str(claimed).encode("ascii", "replace") + b"\n")
        if self.partial:
            self._partial_record(fields, seq, line)
            return
        if seq != self.expected:
            self.anomaly = _Anomaly("seq", self.expected, seq, line)
            return
        if fields.get("prev_hash") != self.prev_hash:
            self.anomaly = _Anomaly("link", seq, seq, line)
            return
        self.prev_hash = str(claimed)
        self.pending.append(self.prev_hash)
        self.expected += 1

    def _partial_record(self, fields: dict[str, Any], seq: int, line: int) -> None:
        assert self.header is not None
        if fields.get("tenant") != self.header["tenant_filter"]:
            raise _Failure(
                "inserted", seq, f"line {line}: seq {seq} belongs to another tenant than the export's filter"
            )
        if seq in self.seen:
            raise _Failure("inserted", seq, f"line {line}: seq {seq} appears twice")
        if seq < self.last_seq:
            raise _Failure("reordered", seq, f"line {line}: seq {seq} comes after seq {self.last_seq}")
        self.seen.add(seq)
        self.last_seq = seq
        self.prev_hash = str(fields["hash"])

    def _checkpoint(self, obj: dict[str, Any], line: int) -> None:
        self.checkpoints += 1
        from_seq, to_seq = obj.get("from_seq"), obj.get("to_seq")
        strings = [obj.get(k) for k in ("root", "signature", "public_key", "key_id", "at")]
        if not (_is_int(from_seq) and _is_int(to_seq) and all(isinstance(s, str) for s in strings)):
            raise _Failure("malformed", self._here(), f"line {line}: checkpoint fields missing or mistyped")
        span = f"checkpoint over seq {from_seq}..{to_seq} (line {line})"
        if from_seq != self.cp_to + 1 or to_seq < from_seq:
            raise _Failure(
                "bad_checkpoint",
                self.cp_to + 1,
                f"{span} does not continue the previous checkpoint (through seq {self.cp_to}): "
                "a checkpoint was removed, or this one forged",
            )
        if not self.partial:
            last = self.expected - 1
            if to_seq > last:  # records it covers are missing before it
                self.anomaly = _Anomaly("seq", self.expected, None, line)
                return
            if to_seq < last:  # records after it came first: inserted there, or this line moved
                self.anomaly = _Anomaly("checkpoint", to_seq + 1, last, line)
                return
            if obj["root"] != merkle_root(self.pending):
                raise _Failure(
                    "bad_checkpoint", from_seq, f"{span}: the root does not match the records it covers"
                )
        self._check_signature(
            obj,
            checkpoint_message(
                from_seq=from_seq, to_seq=to_seq, root=obj["root"], prev_root=self.cp_root, at=obj["at"]
            ),
            from_seq,
            span,
        )
        self.cp_to, self.cp_root = to_seq, obj["root"]
        self.pending = []
        self.accepted_checkpoints += 1
        if not self.partial:
            self.signed_through = to_seq

    def _check_signature(self, obj: Mapping[str, Any], message: bytes, seq: int | None, what: str) -> None:
        public_key, signature, key_id = obj.get("public_key"), obj.get("signature"), obj.get("key_id")
        if not isinstance(public_key, str) or not isinstance(signature, str):
            raise _Failure("bad_signature", seq, f"{what}: no signature")
        try:
            actual_id = key_id_of(public_key)
        except ValueError:
            raise _Failure("bad_signature", seq, f"{what}: the public key is not base64") from None
        if key_id != actual_id:
            raise _Failure("bad_signature", seq, f"{what}: key_id does not name its public key")
        if self.trusted is not None and public_key not in self.trusted:
            raise _Failure("bad_signature", seq, f"{what}: signed by untrusted key {actual_id}")
        if not verify(public_key, message, signature):
            raise _Failure("bad_signature", seq, f"{what}: the signature does not verify")
        if actual_id not in self.key_ids:
            self.key_ids.append(actual_id)

    # -- at the end ----------------------------------------------------------------------
    def finish(self) -> VerifyResult:
        if self.anomaly is not None:
            self._classify(self.anomaly)
        if self.header is None:
            raise _Failure("malformed", None, "empty export: no header line")
        end = self.end
        if end is None:
            raise _Failure("malformed", self._here(), "no end line: the export was cut short")
        if not all(_is_int(end.get(k)) for k in ("records", "last_seq", "checkpoints")):
            raise _Failure("malformed", None, "end line fields missing or mistyped")
        if not self.partial and self.header.get("ledger_last_seq") != end["last_seq"]:
            raise _Failure("malformed", None, "the header and the end line disagree on the last seq")
        if self.partial:
            self._finish_partial(end)
        else:
            last = self.expected - 1
            if end["last_seq"] > last:
                raise _Failure(
                    "removed",
                    last + 1,
                    f"the export ends at seq {last} but was written through {end['last_seq']}",
                )
            if end["last_seq"] < last:
                raise _Failure(
                    "inserted",
                    end["last_seq"] + 1,
                    f"records after seq {end['last_seq']}, where the export ended",
                )
            if end.get("last_hash") != self.prev_hash:
                raise _Failure(
                    "edited", last or None, f"seq {last} is not the record the export ended with (rewritten)"
                )
        if end["records"] != self.records:
            raise _Failure(
                "inserted" if self.records > end["records"] else "removed",
                None,
                f"{self.records} records, the end line says {end['records']}",
            )
        if end.get("digest") != self.digest.hexdigest():
            raise _Failure("edited", None, "the records are not the ones exported (digest differs)")
        if end["checkpoints"] != self.accepted_checkpoints or end.get("last_checkpoint_root") != self.cp_root:
            raise _Failure(
                "bad_checkpoint",
                self.cp_to + 1,
                f"{self.accepted_checkpoints} checkpoints through seq {self.cp_to}, the end line says "
                f"{end['checkpoints']}: a checkpoint was removed",
            )
        sealed = end.get("signature") is not None
        if sealed:
            self._check_signature(end, seal_message(self.header, end), None, "export seal")
            if not self.partial:
                self.signed_through = self.expected - 1
        return self._ok(sealed)

    def _finish_partial(self, end: Mapping[str, Any]) -> None:
        if end["last_seq"] > self.last_seq:
            raise _Failure(
                "removed",
                None,
                f"the export ends at seq {self.last_seq}, its end line says {end['last_seq']}",
            )
        if end["last_seq"] < self.last_seq:
            raise _Failure(
                "inserted",
                end["last_seq"] + 1,
                f"records after seq {end['last_seq']}, where the export ended",
            )
        if self.records and end.get("last_hash") != self.prev_hash:
            raise _Failure(
                "edited", self.last_seq, f"seq {self.last_seq} is not the record the export ended with"
            )

    def _classify(self, anomaly: _Anomaly) -> None:
        end_seq = self.end.get("last_seq") if self.end is not None else None
        at = f"line {anomaly.line}"
        if anomaly.kind == "link":
            if _is_int(end_seq) and anomaly.got is not None and anomaly.got > end_seq:
                raise _Failure("inserted", anomaly.got, f"{at}: seq {anomaly.got} is after the export's end")
            seq = anomaly.expected
            raise _Failure(
                "edited",
                seq - 1,
                f"{at}: seq {seq}'s prev_hash does not match the hash of seq {seq - 1}: "
                f"seq {seq - 1} was rewritten (or seq {seq} forged)",
            )
        expected, got = anomaly.expected, anomaly.got
        if anomaly.kind == "checkpoint":
            assert got is not None
            # Records expected..got came before the checkpoint that ends at expected - 1: if one
            # of them appears again later, that earlier one was an insertion.
            again = min((s for s in self.later if expected <= s <= got), default=None)
            if again is not None:
                raise _Failure("inserted", again, f"{at}: seq {again} appears twice")
            raise _Failure(
                "bad_checkpoint", None, f"{at}: the checkpoint through seq {expected - 1} is out of place"
            )
        if got is not None:
            if got < expected:
                raise _Failure("inserted", got, f"{at}: seq {got} appears again (a copy or forged record)")
            if self.later[got] > 0:
                raise _Failure("inserted", got, f"{at}: seq {got} appears twice")
            if _is_int(end_seq) and got > end_seq:
                raise _Failure("inserted", got, f"{at}: seq {got} is after the export's end ({end_seq})")
        if self.later[expected] > 0:
            what = f"seq {got}" if got is not None else "a checkpoint"
            raise _Failure("reordered", expected, f"{at}: {what} comes before seq {expected}")
        raise _Failure("removed", expected, f"{at}: seq {expected} is missing")

    def _ok(self, sealed: bool) -> VerifyResult:
        notes: list[str] = []
        if self.partial:
            assert self.header is not None
            notes.append(
                f"tenant-filtered export ({self.header['tenant_filter']}): each record's hash and order, "
                "the checkpoint signatures and the seal were checked; the global chain and checkpoint "
                "roots cannot be"
            )
        else:
            notes.append(f"hash chain intact from seq 1 to {self.expected - 1}")
            notes.append(f"checkpoints cover seq 1..{self.cp_to}")
        notes.append("export seal signed" if sealed else "export seal unsigned")
        if self.key_ids:
            pinned = "trusted" if self.trusted is not None else "not pinned"
            notes.append(f"signing key ids {', '.join(self.key_ids)} ({pinned})")
        return VerifyResult(
            ok=True,
            records=self.records,
            checkpoints=self.checkpoints,
            detail="; ".join(notes),
            complete=not self.partial,
            signed_through=self.signed_through,
            key_ids=self.key_ids,
        )

    def failed(self, failure: _Failure) -> VerifyResult:
        return VerifyResult(
            ok=False,
            records=self.records,
            checkpoints=self.checkpoints,
            first_bad_seq=failure.first_bad_seq,
            problem=failure.problem,
            detail=failure.detail,
            complete=False,
            signed_through=self.signed_through,
            key_ids=self.key_ids,
        )


def _verify_objects(objects: Iterable[tuple[int, Any]], trusted_keys: Collection[str] | None) -> VerifyResult:
    verifier = _Verifier(trusted_keys)
    try:
        for line, obj in objects:
            verifier.feed(obj, line)
        return verifier.finish()
    except _Failure as failure:
        return verifier.failed(failure)


def _parsed(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except (ValueError, RecursionError):
            yield number, None  # reported as malformed where it stands


def verify_export(
    lines: Iterable[str | bytes], *, trusted_keys: Collection[str] | None = None
) -> VerifyResult:
    """Verify a JSONL export offline (an open file works: it iterates over lines).

    ``trusted_keys`` (base64 public keys) makes any signature by another key a
    ``bad_signature``; without it, the key ids seen are listed in the result."""
    return _verify_objects(_parsed(lines), trusted_keys)


def verify_database(ledger: Ledger, *, trusted_keys: Collection[str] | None = None) -> VerifyResult:
    """Verify the stored ledger: the same checks as an export of it, without a file.

    Detects rows edited or deleted behind the appender's back (the triggers dropped first).
    Records deleted from the very end, after the last checkpoint, leave no trace in the
    database itself: that is what the checkpoints and the seals of earlier exports are for."""
    objects = ledger.export_objects(sign=False)
    with contextlib.closing(objects):  # stopping at the first problem ends the read transaction now
        return _verify_objects(enumerate(objects, start=1), trusted_keys)
