"""The consent ledger's canonical form: record hashes, Merkle roots, signed messages, export lines.

Pure Python (hashlib, json): the store (``consent.ledger``) writes with it and the offline
verifier (``consent.verify``) checks with it, so both agree byte for byte.

- A record's ``hash`` is ``sha256(canonical_bytes(record))``: sorted-key compact JSON
  (UTF-8) of every field but ``hash``, times as RFC 3339 UTC. The canonical bytes include
  ``seq``, ``record_id`` and ``prev_hash`` (the previous record's hash, ``GENESIS_HASH``
  for seq 1), which chains the records.
- A checkpoint signs ``checkpoint_message``: the Merkle root of the records it covers,
  chained to the previous checkpoint's root.
- An export (JSONL, format ``EXPORT_FORMAT``) is a header line, the records with the
  checkpoints interleaved, and an end line (the seal) whose signature covers
  ``seal_message``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64
EXPORT_FORMAT = "idgate-consent-ledger/1"
_CHECKPOINT_DOMAIN = b"idgate-ledger-checkpoint/v1\n"
_SEAL_DOMAIN = b"idgate-ledger-export-seal/v1\n"

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
EXPORTED_CHECKPOINT_FIELDS = CHECKPOINT_FIELDS[1:]
# The exact keys of each kind of export line but records (whose fields are hashed instead).
HEADER_KEYS = frozenset({"kind", "format", "tenant_filter", "exported_at", "ledger_last_seq"})
CHECKPOINT_KEYS = frozenset({"kind", *EXPORTED_CHECKPOINT_FIELDS})
SEAL_FIELDS = ("records", "last_seq", "last_hash", "digest", "checkpoints", "last_checkpoint_root")
END_KEYS = frozenset({"kind", *SEAL_FIELDS, "signature", "public_key", "key_id"})


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds, ``Z``: the one text form of a time inside hashes and signatures."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("ledger times must be timezone-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def canonical_json(value: Any) -> bytes:
    """Sorted-key compact JSON in UTF-8, no NaN, times as RFC 3339 UTC: what hashes and signatures cover."""
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
    return canonical_json({k: v for k, v in record_fields.items() if k != "hash"})


def record_hash(record_fields: Mapping[str, Any]) -> str:
    """The ``hash`` field of a record: sha256 hex of its canonical bytes."""
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
    return _CHECKPOINT_DOMAIN + canonical_json(body)


def seal_message(header: Mapping[str, Any], end: Mapping[str, Any]) -> bytes:
    """The bytes an export seal signature covers: the header and the end line's counts and hashes."""
    body = {
        "format": header.get("format"),
        "tenant_filter": header.get("tenant_filter"),
        "exported_at": header.get("exported_at"),
        "ledger_last_seq": header.get("ledger_last_seq"),
        **{k: end.get(k) for k in SEAL_FIELDS},
    }
    return _SEAL_DOMAIN + canonical_json(body)


def record_object(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An export line's object for a record row: every field, time in its canonical text."""
    out: dict[str, Any] = {"kind": "record"}
    for name in RECORD_FIELDS:
        value = row[name]
        out[name] = rfc3339(value) if isinstance(value, datetime) else value
    return out


def checkpoint_object(
    row: Mapping[Any, Any], fields: Sequence[str] = EXPORTED_CHECKPOINT_FIELDS
) -> dict[str, Any]:
    """An export line's object for a checkpoint row (``fields``: which of its fields)."""
    out: dict[str, Any] = {"kind": "checkpoint"}
    for name in fields:
        value = row[name]
        out[name] = rfc3339(value) if isinstance(value, datetime) else value
    return out


def export_line(obj: Mapping[str, Any]) -> str:
    """One JSONL line of an export (compact, UTF-8 as is)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
