"""Property tests: every tampering of a ledger export is detected, and the first bad record is named.

Ledgers of several sizes are built once on SQLite (checkpoint every 4 records, so exports
have checkpoints in the middle, a checkpoint on the last record, and uncovered tails) and
exported; each example applies one tampering to an export and verifies it offline.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from consent.db import migrate_consent
from consent.ledger import Ledger, RecordDraft
from consent.ledger_format import (
    GENESIS_HASH,
    RECORD_FIELDS,
    checkpoint_message,
    merkle_root,
    record_hash,
    seal_message,
)
from consent.signing import LedgerSigner, new_ledger_key_b64
from consent.verify import verify_export
from identity.db import make_engine

SIZES = (1, 2, 5, 8, 23)
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Exports:
    full: list[list[dict[str, Any]]]  # parsed export lines, one list per ledger size
    filtered: list[list[dict[str, Any]]]  # tenant-filtered exports of the same ledgers
    key: LedgerSigner


def _draft(i: int) -> RecordDraft:
    base = datetime(2025, 5, 1, 8, 0, tzinfo=UTC) + timedelta(seconds=i, microseconds=i * 7)
    if i % 7 == 3:
        return RecordDraft(
            tenant="mall",
            record_type="notice",
            notice_id=f"notice-{i}",
            notice_hash=hashlib.sha256(str(i).encode()).hexdigest(),
            purposes=["marketing"],
            state="published",
            at=base,
            detail={"material": i % 2 == 0, "purposes_changed": ["marketing"]},
        )
    return RecordDraft(
        tenant="shop" if i % 3 else "mall",
        record_type="consent",
        subject=f"k1.subject{i % 4}",
        identifiers=[f"user_id:k1.subject{i % 4}", f"device_id:k1.device{i}"],
        notice_id="notice-1",
        notice_hash="ab" * 32,
        purposes=["analytics", "marketing"][: 1 + i % 2],
        state="withdrawn" if i % 5 == 4 else "given",
        consent_kind="separate" if i % 2 else "general",
        source="shop-web",
        platform="web",
        sdk="analytics.js/5",
        at=base,
        evidence_hash=hashlib.sha256(f"evidence {i}".encode()).hexdigest(),
        detail={"ua_family": "Chrome", "n": i, "nested": {"ok": True, "list": [1, "两", None]}},
    )


def _export(ledger: Ledger, tenant: str | None = None) -> list[dict[str, Any]]:
    buf = io.StringIO()
    ledger.export_jsonl(buf, tenant=tenant)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    signer = LedgerSigner.from_b64(new_ledger_key_b64())
    full, filtered = [], []
    for size in SIZES:
        engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('tamper') / 'consent.sqlite3'}")
        migrate_consent(engine)
        ledger = Ledger(engine, signer, checkpoint_every=4)
        i = 0
        while i < size:  # batches of 1 to 3 records
            batch = min(1 + i % 3, size - i)
            ledger.append([_draft(i + j) for j in range(batch)])
            i += batch
        if size == 5:
            ledger.checkpoint()  # the last record is a checkpoint's to_seq
        full.append(_export(ledger))
        filtered.append(_export(ledger, tenant="shop"))
        engine.dispose()
    return Exports(full, filtered, signer)


def verify(objects: list[Any], **kwargs: Any) -> Any:
    return verify_export([json.dumps(o, ensure_ascii=False) for o in objects], **kwargs)


def positions(objects: list[dict[str, Any]], kind: str) -> list[int]:
    return [i for i, o in enumerate(objects) if o.get("kind") == kind]


def rehash(record: dict[str, Any]) -> None:
    record["hash"] = record_hash({k: v for k, v in record.items() if k != "kind"})


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def other_value(old: Any) -> st.SearchStrategy[Any]:
    """A value that differs from ``old`` (usually of the same type, sometimes not)."""
    if isinstance(old, bool) or old is None:
        same: st.SearchStrategy[Any] = JSON_VALUES
    elif isinstance(old, int):
        same = st.integers(-(10**6), 10**6) | st.just(old + 1)
    elif isinstance(old, str):
        same = st.text(max_size=70) | st.just(old[:-1] + ("0" if old[-1:] != "0" else "1"))
    elif isinstance(old, list):
        same = st.lists(st.text(max_size=12), max_size=4) | st.just(old[::-1]) | st.just([*old, old[:1]])
    else:
        same = st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3) | st.just({**old, "x": 1})
    # Python equality is looser than JSON's (1 == True == 1.0): skip those, never mis-assert.
    return (same | JSON_VALUES).filter(lambda new: new != old)


def pick_export(data: st.DataObject, exports: Exports, *, min_records: int = 1) -> list[dict[str, Any]]:
    candidates = [e for e in exports.full if len(positions(e, "record")) >= min_records]
    return [dict(o) for o in data.draw(st.sampled_from(candidates), label="export")]


# -- untampered ---------------------------------------------------------------------------


def test_untampered_exports_verify(exports: Exports) -> None:
    for objects, size in zip(exports.full, SIZES, strict=True):
        result = verify(objects, trusted_keys=[exports.key.public_key_b64])
        assert result.ok and result.complete and result.records == size, result
        assert result.signed_through == size
    for objects in exports.filtered:
        result = verify(objects)
        assert result.ok and not result.complete, result


# -- edits ----------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_an_edited_field_names_its_record(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports)
    pos = data.draw(st.sampled_from(positions(objects, "record")), label="record")
    field = data.draw(st.sampled_from(RECORD_FIELDS), label="field")
    record = dict(objects[pos])
    seq = record["seq"]
    record[field] = data.draw(other_value(record[field]), label="new value")
    objects[pos] = record
    result = verify(objects)
    assert (result.ok, result.problem, result.first_bad_seq) == (False, "edited", seq), result


@PROPERTY
@given(data=st.data())
def test_an_edit_with_a_recomputed_hash_is_detected(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports)
    pos = data.draw(st.sampled_from(positions(objects, "record")), label="record")
    field = data.draw(st.sampled_from([f for f in RECORD_FIELDS if f != "hash"]), label="field")
    record = dict(objects[pos])
    record[field] = data.draw(other_value(record[field]), label="new value")
    rehash(record)
    objects[pos] = record
    assert not verify(objects).ok


@PROPERTY
@given(data=st.data())
def test_a_rewritten_chain_is_caught_by_checkpoints_or_the_seal(
    exports: Exports, data: st.DataObject
) -> None:
    """Edit one record, then recompute every later hash and the end line's unsigned fields."""
    objects = pick_export(data, exports)
    records = positions(objects, "record")
    start = data.draw(st.sampled_from(records), label="record")
    objects[start] = {
        **objects[start],
        "state": "withdrawn" if objects[start]["state"] != "withdrawn" else "given",
    }
    prev = objects[records[records.index(start) - 1]]["hash"] if start != records[0] else GENESIS_HASH
    digest = hashlib.sha256()
    for pos in records:
        if pos >= start:
            objects[pos] = {**objects[pos], "prev_hash": prev}
            rehash(objects[pos])
        prev = objects[pos]["hash"]
        digest.update(prev.encode() + b"\n")
    objects[-1] = {**objects[-1], "last_hash": prev, "digest": digest.hexdigest()}
    result = verify(objects)
    assert not result.ok and result.problem in ("bad_checkpoint", "bad_signature"), result


# -- removals, insertions, reordering ---------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_a_removed_record_is_named(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports)
    pos = data.draw(st.sampled_from(positions(objects, "record")), label="record")
    seq = objects.pop(pos)["seq"]
    result = verify(objects)
    assert (result.ok, result.problem, result.first_bad_seq) == (False, "removed", seq), result


@PROPERTY
@given(data=st.data())
def test_swapped_records_are_reordered_at_the_earlier_seq(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports, min_records=2)
    a, b = data.draw(
        st.lists(st.sampled_from(positions(objects, "record")), min_size=2, max_size=2, unique=True)
    )
    objects[a], objects[b] = objects[b], objects[a]
    result = verify(objects)
    expected = min(objects[a]["seq"], objects[b]["seq"])
    assert (result.ok, result.problem, result.first_bad_seq) == (False, "reordered", expected), result


@PROPERTY
@given(data=st.data())
def test_a_duplicated_record_is_detected(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports)
    source = data.draw(st.sampled_from(positions(objects, "record")), label="record")
    where = data.draw(st.integers(0, len(objects)), label="insert at")
    objects.insert(where, dict(objects[source]))
    result = verify(objects)
    assert not result.ok
    if 0 < where < len(objects) - 1:  # between the header and the end line
        assert (result.problem, result.first_bad_seq) == ("inserted", objects[where]["seq"]), result


@PROPERTY
@given(data=st.data())
def test_a_forged_record_is_detected(exports: Exports, data: st.DataObject) -> None:
    """A made-up record, as plausible as it gets: a real seq or the next one, linked to the
    record before that seq, its own hash recomputed (or not)."""
    objects = pick_export(data, exports)
    records = positions(objects, "record")
    template = dict(objects[data.draw(st.sampled_from(records), label="template")])
    seq = data.draw(st.integers(1, len(records) + 1), label="seq")
    hashes = {objects[p]["seq"]: objects[p]["hash"] for p in records}
    forged = {
        **template,
        "seq": seq,
        "record_id": "f" * 32,
        "state": data.draw(st.sampled_from(["given", "withdrawn"])),
        "purposes": data.draw(
            st.lists(st.sampled_from(["analytics", "marketing", "cross_border"]), max_size=3)
        ),
        "prev_hash": hashes.get(seq - 1, GENESIS_HASH),
    }
    if data.draw(st.booleans(), label="recompute hash"):
        rehash(forged)
    objects.insert(data.draw(st.integers(1, len(objects) - 1), label="insert at"), forged)
    assert not verify(objects).ok


@PROPERTY
@given(data=st.data())
def test_a_truncated_export_is_detected(exports: Exports, data: st.DataObject) -> None:
    objects = pick_export(data, exports)
    cut = data.draw(st.integers(0, len(objects) - 1), label="keep lines")
    assert not verify(objects[:cut]).ok


# -- checkpoints and signatures ---------------------------------------------------------------


def with_checkpoints(exports: Exports) -> list[list[dict[str, Any]]]:
    return [e for e in exports.full if positions(e, "checkpoint")]


@PROPERTY
@given(data=st.data())
def test_an_altered_checkpoint_root_is_a_bad_checkpoint(exports: Exports, data: st.DataObject) -> None:
    objects = [dict(o) for o in data.draw(st.sampled_from(with_checkpoints(exports)))]
    pos = data.draw(st.sampled_from(positions(objects, "checkpoint")), label="checkpoint")
    old = objects[pos]["root"]
    new = data.draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).filter(lambda r: r != old))
    objects[pos] = {**objects[pos], "root": new}
    result = verify(objects)
    assert (result.ok, result.problem, result.first_bad_seq) == (
        False,
        "bad_checkpoint",
        objects[pos]["from_seq"],
    )


@PROPERTY
@given(data=st.data())
def test_an_altered_signature_is_a_bad_signature(exports: Exports, data: st.DataObject) -> None:
    objects = [dict(o) for o in data.draw(st.sampled_from(with_checkpoints(exports)))]
    pos = data.draw(
        st.sampled_from([*positions(objects, "checkpoint"), len(objects) - 1]), label="signed line"
    )
    old = objects[pos]["signature"]
    raw = data.draw(
        st.binary(min_size=0, max_size=80).map(lambda b: base64.b64encode(b).decode()) | st.text()
    )
    assume(raw != old)
    objects[pos] = {**objects[pos], "signature": raw}
    result = verify(objects)
    assert (result.ok, result.problem) == (False, "bad_signature"), result


@PROPERTY
@given(data=st.data())
def test_any_checkpoint_field_change_or_removal_is_detected(exports: Exports, data: st.DataObject) -> None:
    objects = [dict(o) for o in data.draw(st.sampled_from(with_checkpoints(exports)))]
    pos = data.draw(st.sampled_from(positions(objects, "checkpoint")), label="checkpoint")
    if data.draw(st.booleans(), label="remove"):
        del objects[pos]
    else:
        fields = [k for k in objects[pos] if k != "kind"]
        field = data.draw(st.sampled_from(fields), label="field")
        objects[pos] = {**objects[pos], field: data.draw(other_value(objects[pos][field]))}
    assert not verify(objects).ok


def test_a_forger_with_a_key_of_their_own_fails_against_the_pinned_key(exports: Exports) -> None:
    """Rewrite the middle of the biggest export and re-sign everything with another key:
    consistent, so only pinning the operator's key exposes it."""
    objects = [dict(o) for o in exports.full[-1]]
    forger = LedgerSigner.from_b64(new_ledger_key_b64())
    records = positions(objects, "record")
    objects[records[6]]["purposes"] = ["cross_border"]
    prev, prev_root, pending, digest = GENESIS_HASH, GENESIS_HASH, [], hashlib.sha256()
    for pos, obj in enumerate(objects):
        if obj["kind"] == "record":
            obj["prev_hash"] = prev
            rehash(obj)
            prev = obj["hash"]
            pending.append(prev)
            digest.update(prev.encode() + b"\n")
        elif obj["kind"] == "checkpoint":
            obj["root"] = merkle_root(pending)
            message = checkpoint_message(
                from_seq=obj["from_seq"],
                to_seq=obj["to_seq"],
                root=obj["root"],
                prev_root=prev_root,
                at=obj["at"],
            )
            obj.update(signature=forger.sign(message), public_key=forger.public_key_b64, key_id=forger.key_id)
            prev_root, pending = obj["root"], []
        elif obj["kind"] == "end":
            obj.update(last_hash=prev, digest=digest.hexdigest(), last_checkpoint_root=prev_root)
            obj.update(public_key=forger.public_key_b64, key_id=forger.key_id)
            obj["signature"] = forger.sign(seal_message(objects[0], obj))
        objects[pos] = obj
    unpinned = verify(objects)
    assert unpinned.ok and unpinned.key_ids == [forger.key_id] != [exports.key.key_id]
    pinned = verify(objects, trusted_keys=[exports.key.public_key_b64])
    assert (pinned.ok, pinned.problem) == (False, "bad_signature")


# -- tenant-filtered exports ------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_tampering_with_a_tenant_export_is_detected(exports: Exports, data: st.DataObject) -> None:
    objects = [
        dict(o) for o in data.draw(st.sampled_from([e for e in exports.filtered if positions(e, "record")]))
    ]
    records = positions(objects, "record")
    pos = data.draw(st.sampled_from(records), label="record")
    how = data.draw(st.sampled_from(["edit", "remove", "duplicate", "swap"]), label="tampering")
    if how == "edit":
        field = data.draw(st.sampled_from(RECORD_FIELDS))
        objects[pos] = {**objects[pos], field: data.draw(other_value(objects[pos][field]))}
    elif how == "remove":
        del objects[pos]
    elif how == "duplicate":
        objects.insert(data.draw(st.integers(1, len(objects) - 1)), dict(objects[pos]))
    else:
        assume(len(records) >= 2)
        other = data.draw(st.sampled_from([p for p in records if p != pos]))
        objects[pos], objects[other] = objects[other], objects[pos]
    assert not verify(objects).ok


def test_malformed_input_is_reported_not_raised(exports: Exports, tmp_path: Path) -> None:
    good = [json.dumps(o) for o in exports.full[2]]
    assert verify_export([]).problem == "malformed"
    assert verify_export(["not json", *good[1:]]).problem == "malformed"
    assert verify_export([good[0], "[1, 2]", *good[1:]]).problem == "malformed"
    assert verify_export([*good, good[-1]]).problem == "malformed"  # content after the end line
    broken = verify_export([*good[:2], '{"kind": "record", "seq": "two"}', *good[2:]])
    assert (broken.problem, broken.first_bad_seq) == ("edited", 2)  # a record line that matches no hash
