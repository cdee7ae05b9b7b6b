"""The offline verifier of consent ledger exports: what an auditor runs, without a database.

``verify_export`` reads a JSONL export (``consent.ledger_format``) once and names the first
bad record of an edited, shortened, extended or reordered export. It needs only the
canonical encoding and the Ed25519 public keys the export carries: this module imports
neither SQLAlchemy nor the store (``consent.ledger``), which feeds its own export objects
to ``verify_objects`` for ``verify_database``.

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

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, TypeGuard

import msgspec

from consent.ledger_format import (
    CHECKPOINT_KEYS,
    END_KEYS,
    EXPORT_FORMAT,
    GENESIS_HASH,
    HEADER_KEYS,
    checkpoint_message,
    merkle_root,
    record_hash,
    seal_message,
)
from consent.signing import key_id_of, verify


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


def _is_int(value: Any) -> TypeGuard[int]:
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
        expected_keys = {"header": HEADER_KEYS, "checkpoint": CHECKPOINT_KEYS, "end": END_KEYS}.get(str(kind))
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


def verify_objects(objects: Iterable[tuple[int, Any]], trusted_keys: Collection[str] | None) -> VerifyResult:
    """Verify export objects given as (line number, parsed object): an export file or the store's own."""
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
    return verify_objects(_parsed(lines), trusted_keys)
