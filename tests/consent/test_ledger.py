"""The consent ledger on both backends: schema, appends, chain, checkpoints, queries, exports, CLI, keys."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import pickle
import stat
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from consent.cli import ledger as ledger_cli
from consent.db import MIGRATIONS_DIR, default_sqlite_url, migrate_consent
from consent.ledger import InvalidRecord, Ledger, LedgerReadOnly, verify_database
from consent.ledger_format import GENESIS_HASH, checkpoint_message, merkle_root, record_hash
from consent.signing import (
    InvalidLedgerKey,
    LedgerSigner,
    load_signer,
    new_ledger_key_b64,
    verify,
)
from consent.verify import verify_export
from identity.db import alembic_config, make_engine

if TYPE_CHECKING:  # fixtures' types; conftest modules are not imported by name at run time
    from conftest import Database, DraftFactory


def export_text(ledger: Ledger, **kwargs: str) -> str:
    buf = io.StringIO()
    ledger.export_jsonl(buf, **kwargs)
    return buf.getvalue()


# -- schema --------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_safe_concurrently(database: Database) -> None:
    engines = [database.engine() for _ in range(3)]
    errors: list[BaseException] = []

    def run(eng: Engine) -> None:
        try:
            migrate_consent(eng)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    migrate_consent(engines[0])
    assert errors == []
    with engines[0].connect() as conn:
        head = ScriptDirectory.from_config(alembic_config(MIGRATIONS_DIR)).get_current_head()
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == head
    for e in engines:
        e.dispose()


def test_the_database_refuses_updates_and_deletes(ledger: Ledger, make_draft: DraftFactory) -> None:
    ledger.append([make_draft()])
    for statement in ("UPDATE consent_ledger SET state = 'withdrawn'", "DELETE FROM consent_ledger"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), ledger.engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert ledger.last_seq() == 1


def test_make_engine_sqlite_settings(tmp_path: Path) -> None:
    url = default_sqlite_url(tmp_path / "nested" / "data")
    assert url == f"sqlite:///{tmp_path / 'nested' / 'data' / 'consent.sqlite3'}"
    eng = make_engine(url)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    eng.dispose()
    assert (tmp_path / "nested" / "data" / "consent.sqlite3").exists()


# -- appends, chain, checkpoints -------------------------------------------------------------


def test_append_numbers_and_chains_records(ledger: Ledger, make_draft: DraftFactory) -> None:
    first = ledger.append([make_draft(subject="k1.a"), make_draft(subject="k1.b", state="withdrawn")])
    second = ledger.append([make_draft(subject="k1.c")])
    records = first + second
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in zip(records, records[1:], strict=False):
        assert after.prev_hash == before.hash
    stored = ledger.records()
    assert [r.model_dump() for r in stored] == [r.model_dump() for r in records]
    for r in stored:
        assert r.hash == record_hash(r.model_dump())
        assert len(r.record_id) == 32 and int(r.record_id, 16) >= 0
    assert ledger.last_seq() == 3
    assert ledger.append([]) == []


def test_times_are_stored_as_utc_with_microseconds(ledger: Ledger, make_draft: DraftFactory) -> None:
    shanghai = timezone(timedelta(hours=8))
    at = datetime(2025, 3, 1, 9, 30, 15, 123456, tzinfo=shanghai)
    (appended,) = ledger.append([make_draft(at=at)])
    (stored,) = ledger.records()
    assert stored.at == at and stored.at.tzinfo == UTC and stored.at.microsecond == 123456
    assert stored.hash == appended.hash == record_hash(stored.model_dump())


def test_drafts_are_validated(make_draft: DraftFactory) -> None:
    with pytest.raises(InvalidRecord, match="state"):
        make_draft(state="maybe")
    with pytest.raises(InvalidRecord, match="record_type"):
        make_draft(record_type="gossip")
    with pytest.raises(InvalidRecord, match="timezone"):
        make_draft(at=datetime(2025, 1, 1))
    with pytest.raises(InvalidRecord, match="identifiers"):
        make_draft(identifiers=["no-type"])


def test_detail_must_be_plain_json(ledger: Ledger, make_draft: DraftFactory) -> None:
    with pytest.raises(InvalidRecord, match="detail"):
        ledger.append([make_draft(detail={"x": float("nan")})])
    with pytest.raises(InvalidRecord, match="detail"):
        ledger.append([make_draft(detail={"x": object()})])
    assert ledger.last_seq() == 0


def test_checkpoints_are_signed_merkle_roots_chained_together(
    ledger: Ledger, make_draft: DraftFactory, signer: LedgerSigner
) -> None:
    for i in range(12):  # checkpoint_every=5: checkpoints after seq 5 and 10
        ledger.append([make_draft(subject=f"k1.s{i}")])
    assert [(c.from_seq, c.to_seq) for c in ledger.checkpoints()] == [(1, 5), (6, 10)]
    forced = ledger.checkpoint()
    assert forced is not None and (forced.from_seq, forced.to_seq) == (11, 12)
    assert ledger.checkpoint() is None
    hashes = {r.seq: r.hash for r in ledger.records()}
    prev_root = GENESIS_HASH
    for cp in ledger.checkpoints():
        assert cp.root == merkle_root([hashes[s] for s in range(cp.from_seq, cp.to_seq + 1)])
        assert cp.public_key == signer.public_key_b64 and cp.key_id == signer.key_id
        assert cp.at.tzinfo == UTC
        message = checkpoint_message(
            from_seq=cp.from_seq, to_seq=cp.to_seq, root=cp.root, prev_root=prev_root, at=cp.at
        )
        assert verify(cp.public_key, message, cp.signature)
        assert not verify(cp.public_key, message + b"x", cp.signature)
        prev_root = cp.root


def test_a_big_batch_gets_one_checkpoint_in_its_transaction(ledger: Ledger, make_draft: DraftFactory) -> None:
    ledger.append([make_draft(subject=f"k1.s{i}") for i in range(13)])
    assert [(c.from_seq, c.to_seq) for c in ledger.checkpoints()] == [(1, 13)]


def test_a_ledger_without_key_is_read_only(engine: Engine, make_draft: DraftFactory) -> None:
    reader = Ledger(engine, None)
    with pytest.raises(LedgerReadOnly):
        reader.append([make_draft()])
    with pytest.raises(LedgerReadOnly):
        reader.checkpoint()
    assert reader.records() == [] and reader.last_seq() == 0


def test_merkle_root_shape() -> None:
    a, b, c = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))

    def node(left: str, right: str) -> str:
        return hashlib.sha256(bytes.fromhex(left) + bytes.fromhex(right)).hexdigest()

    assert merkle_root([a]) == a
    assert merkle_root([a, b]) == node(a, b)
    assert merkle_root([a, b, c]) == node(node(a, b), c)  # the odd node is promoted
    assert merkle_root([a, b, c, a, b]) == node(node(node(a, b), node(c, a)), b)
    with pytest.raises(ValueError):
        merkle_root([])


def test_sqlite_appenders_in_parallel_stay_contiguous(
    sqlite_database: Database, signing_key: str, make_draft: DraftFactory
) -> None:
    """BEGIN IMMEDIATE serialises appenders with engines (connection pools) of their own."""
    setup = sqlite_database.engine()
    migrate_consent(setup)
    setup.dispose()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        eng = sqlite_database.engine()
        try:
            store = Ledger(eng, LedgerSigner.from_b64(signing_key), checkpoint_every=7)
            for i in range(20):
                store.append([make_draft(subject=f"k1.w{n}-{i}"), make_draft(subject=f"k1.w{n}-{i}b")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    eng = sqlite_database.engine()
    store = Ledger(eng, None)
    assert [r.seq for r in store.records(limit=1000)] == list(range(1, 161))
    assert verify_database(store).ok
    eng.dispose()


# -- queries -------------------------------------------------------------------------------


def test_queries_filter_on_every_field(ledger: Ledger, make_draft: DraftFactory) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    ledger.append(
        [
            make_draft(subject="k1.a", identifiers=["user_id:k1.a", "device_id:k1.d"], at=t0),
            make_draft(subject="k1.b", purposes=["marketing", "analytics"], at=t0 + timedelta(hours=1)),
            make_draft(tenant="other", subject="k1.a", at=t0 + timedelta(hours=2)),
            make_draft(
                record_type="notice",
                subject=None,
                identifiers=[],
                state="published",
                notice_id="privacy-2025-02",
                purposes=[],
                at=t0 + timedelta(hours=3),
            ),
        ]
    )

    def seqs(**kwargs: object) -> list[int]:
        return [r.seq for r in ledger.records(**kwargs)]  # type: ignore[arg-type]

    assert seqs() == [1, 2, 3, 4]
    assert seqs(tenant="shop") == [1, 2, 4]
    assert seqs(subject="k1.a") == [1, 3]
    assert seqs(identifier="device_id:k1.d") == [1]
    assert seqs(identifier="device_id:k1") == []  # whole elements only
    assert seqs(identifier="user_id:k1.a", tenant="shop") == [1]
    assert seqs(purpose="marketing") == [2]
    assert seqs(purpose="analytics") == [1, 2, 3]
    assert seqs(notice_id="privacy-2025-02") == [4]
    assert seqs(record_type="notice") == [4]
    assert seqs(since=t0 + timedelta(hours=1)) == [2, 3, 4]
    assert seqs(until=t0 + timedelta(hours=1)) == [1, 2]
    assert seqs(since=t0 + timedelta(minutes=1), until=t0 + timedelta(hours=2)) == [2, 3]
    assert seqs(after_seq=2) == [3, 4]
    assert seqs(limit=2) == [1, 2]
    assert seqs(purpose="analytics", after_seq=1, limit=1) == [2]
    assert ledger.count() == 4 and ledger.count(tenant="shop") == 3
    record = ledger.record(2)
    assert record is not None and record.purposes == ["marketing", "analytics"]
    assert ledger.record(99) is None


# -- export and verification ----------------------------------------------------------------


def test_export_verifies_and_places_checkpoints_after_their_last_record(
    ledger: Ledger, make_draft: DraftFactory, signer: LedgerSigner
) -> None:
    for i in range(12):
        ledger.append([make_draft(subject=f"k1.s{i}", tenant="shop" if i % 3 else "other")])
    text = export_text(ledger)
    objects = [json.loads(line) for line in text.splitlines()]
    assert objects[0]["kind"] == "header" and objects[0]["tenant_filter"] is None
    assert objects[-1]["kind"] == "end" and objects[-1]["key_id"] == signer.key_id
    kinds = [(o["kind"], o.get("seq", o.get("to_seq"))) for o in objects[1:-1]]
    assert kinds[5] == ("checkpoint", 5) and kinds[4] == ("record", 5)
    assert kinds[11] == ("checkpoint", 10) and kinds[10] == ("record", 10)
    assert [s for k, s in kinds if k == "record"] == list(range(1, 13))

    result = verify_export(text.splitlines())
    assert result.ok and result.complete, result
    assert (result.records, result.checkpoints, result.signed_through) == (12, 2, 12)
    assert result.key_ids == [signer.key_id]
    assert verify_export(io.BytesIO(text.encode())).ok  # an open binary file
    assert verify_export(text.splitlines(), trusted_keys=[signer.public_key_b64]).ok
    stranger = LedgerSigner.from_b64(new_ledger_key_b64())
    pinned = verify_export(text.splitlines(), trusted_keys=[stranger.public_key_b64])
    assert not pinned.ok and pinned.problem == "bad_signature"

    database = verify_database(ledger)
    assert database.ok and database.complete and database.records == 12

    filtered = export_text(ledger, tenant="shop")
    records = [json.loads(line) for line in filtered.splitlines() if '"kind":"record"' in line]
    assert {r["tenant"] for r in records} == {"shop"} and len(records) == 8
    partial = verify_export(filtered.splitlines())
    assert partial.ok and not partial.complete and partial.records == 8
    assert "tenant-filtered" in partial.detail


def test_an_empty_ledger_exports_and_verifies(ledger: Ledger) -> None:
    result = verify_export(export_text(ledger).splitlines())
    assert result.ok and result.records == 0 and result.checkpoints == 0


def test_verify_database_finds_rows_changed_behind_its_back(
    ledger: Ledger, make_draft: DraftFactory, database: Database
) -> None:
    for i in range(8):
        ledger.append([make_draft(subject=f"k1.s{i}")])
    with ledger.engine.begin() as conn:  # someone with database access removes the guard first
        if database.backend == "postgres":
            conn.execute(sa.text("DROP TRIGGER consent_ledger_append_only ON consent_ledger"))
        else:
            conn.execute(sa.text("DROP TRIGGER consent_ledger_no_update"))
            conn.execute(sa.text("DROP TRIGGER consent_ledger_no_delete"))
        conn.execute(sa.text("UPDATE consent_ledger SET state = 'withdrawn' WHERE seq = 3"))
    edited = verify_database(ledger)
    assert (edited.ok, edited.problem, edited.first_bad_seq) == (False, "edited", 3)
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE consent_ledger SET state = 'given' WHERE seq = 3"))
        conn.execute(sa.text("DELETE FROM consent_ledger WHERE seq = 7"))
    removed = verify_database(ledger)
    assert (removed.ok, removed.problem, removed.first_bad_seq) == (False, "removed", 7)


def test_csv_export(ledger: Ledger, make_draft: DraftFactory) -> None:
    for i in range(6):
        ledger.append([make_draft(subject=f"k1.s{i}", detail={"n": i})])
    buf = io.StringIO()
    assert ledger.export_csv(buf) == 6
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [int(r["seq"]) for r in rows] == list(range(1, 7))
    assert json.loads(rows[2]["detail"]) == {"n": 2} and json.loads(rows[0]["identifiers"]) == [
        "user_id:k1.s0"
    ]
    assert rows[0]["at"].endswith("Z") and rows[0]["hash"] == ledger.records()[0].hash
    cps = io.StringIO()
    assert ledger.export_checkpoints_csv(cps) == 1
    assert list(csv.DictReader(io.StringIO(cps.getvalue())))[0]["to_seq"] == "5"


# -- CLI -----------------------------------------------------------------------------------


def test_cli_export_verify_checkpoint(
    ledger: Ledger, make_draft: DraftFactory, database: Database, signing_key: str, tmp_path: Path
) -> None:
    for i in range(7):
        ledger.append([make_draft(subject=f"k1.s{i}")])
    runner = CliRunner()
    env = {"IDGATE_LEDGER_KEY": signing_key}
    out = tmp_path / "export" / "ledger.jsonl"
    exported = runner.invoke(
        ledger_cli, ["export", "--database-url", database.cli_url, "--out", str(out)], env=env
    )
    assert exported.exit_code == 0, exported.output
    assert "exported 7 records" in exported.output

    verified = runner.invoke(ledger_cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert verified.output.startswith("OK: 7 records, 1 checkpoints\n")

    lines = out.read_text().splitlines()
    record = json.loads(lines[3])
    assert record["seq"] == 3
    record["purposes"] = ["analytics", "marketing"]
    lines[3] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")
    tampered = runner.invoke(ledger_cli, ["verify", str(out)])
    assert tampered.exit_code == 1
    assert tampered.output.startswith("TAMPERED: edited at seq 3: ")

    checkpointed = runner.invoke(ledger_cli, ["checkpoint", "--database-url", database.cli_url], env=env)
    assert checkpointed.exit_code == 0, checkpointed.output
    assert "checkpoint 6..7" in checkpointed.output
    again = runner.invoke(ledger_cli, ["checkpoint", "--database-url", database.cli_url], env=env)
    assert "nothing to checkpoint" in again.output
    keyless = runner.invoke(
        ledger_cli, ["checkpoint", "--database-url", database.cli_url], env={"IDGATE_LEDGER_KEY": ""}
    )
    assert keyless.exit_code == 2 and "IDGATE_LEDGER_KEY" in keyless.output

    csv_out = tmp_path / "ledger.csv"
    as_csv = runner.invoke(
        ledger_cli,
        ["export", "--database-url", database.cli_url, "--out", str(csv_out), "--format", "csv"],
        env={"IDGATE_LEDGER_KEY": ""},
    )
    assert as_csv.exit_code == 0, as_csv.output
    assert len(csv_out.read_text().splitlines()) == 8
    assert len((tmp_path / "ledger.checkpoints.csv").read_text().splitlines()) == 3


def test_cli_verify_on_a_tenant_export_says_partial(
    ledger: Ledger, make_draft: DraftFactory, database: Database, tmp_path: Path
) -> None:
    ledger.append([make_draft(tenant="shop"), make_draft(tenant="other"), make_draft(tenant="shop")])
    out = tmp_path / "shop.jsonl"
    runner = CliRunner()
    exported = runner.invoke(
        ledger_cli,
        ["export", "--database-url", database.cli_url, "--out", str(out), "--tenant", "shop"],
        env={"IDGATE_LEDGER_KEY": ""},
    )
    assert exported.exit_code == 0 and "seal unsigned" in exported.output
    verified = runner.invoke(ledger_cli, ["verify", str(out)])
    assert verified.exit_code == 0
    assert verified.output.splitlines()[:2] == [
        "OK: 2 records, 0 checkpoints",
        "PARTIAL: tenant-filtered export; the global hash chain was not verified",
    ]


def test_cli_export_needs_an_existing_database(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "consent.sqlite3"
    result = CliRunner().invoke(
        ledger_cli, ["export", "--database-url", f"sqlite:///{missing}", "--out", str(tmp_path / "x.jsonl")]
    )
    assert result.exit_code == 2 and "no consent database" in result.output
    assert not missing.parent.exists() and not (tmp_path / "x.jsonl").exists()


# -- keys ----------------------------------------------------------------------------------


def test_signer_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_ledger_key_b64()
    assert load_signer(env_value=key, key_file=None, dev_file=None).public_key_b64 == (
        LedgerSigner.from_b64(key).public_key_b64
    )
    key_file = tmp_path / "ledger.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    assert (
        load_signer(env_value=None, key_file=key_file, dev_file=None).key_id
        == LedgerSigner.from_b64(key).key_id
    )

    dev_file = tmp_path / "var" / "dev-ledger-key"
    first = load_signer(env_value=None, key_file=None, dev_file=dev_file)
    assert stat.S_IMODE(dev_file.stat().st_mode) == 0o600
    assert load_signer(env_value=None, key_file=None, dev_file=dev_file).key_id == first.key_id

    with pytest.raises(InvalidLedgerKey, match="IDGATE_LEDGER_KEY"):
        load_signer(env_value=None, key_file=None, dev_file=None)
    with pytest.raises(InvalidLedgerKey, match="32 raw bytes"):
        LedgerSigner.from_b64(base64.b64encode(b"short").decode())
    assert first.key_id == hashlib.sha256(base64.b64decode(first.public_key_b64)).hexdigest()[:16]


def test_key_material_never_shows(
    tmp_path: Path, engine: Engine, make_draft: DraftFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    dev_file = tmp_path / "dev-ledger-key"
    with capture_logs() as logs:
        signer = load_signer(env_value=None, key_file=None, dev_file=dev_file)
        store = Ledger(engine, signer, checkpoint_every=2)
        store.append([make_draft(), make_draft(), make_draft()])
        store.checkpoint()
        exported = export_text(store)
        # A key file readable by others is refused, naming its path and mode only.
        loose = tmp_path / "loose.key"
        loose.write_text(dev_file.read_text())
        loose.chmod(0o644)
        with pytest.raises(InvalidLedgerKey) as refused:
            load_signer(env_value=None, key_file=loose, dev_file=None)
    secret = dev_file.read_text().strip()
    raw = base64.b64decode(secret)
    assert "has mode 0644" in str(refused.value)
    shown = [
        repr(signer),
        str(signer),
        repr(store),
        repr(logs),
        capsys.readouterr().out,
        exported,
        str(refused.value),
    ]
    for text in shown:
        assert secret not in text and raw.hex() not in text
    assert any(e["event"] == "ledger.dev_key_generated" for e in logs)
    with pytest.raises(TypeError):
        pickle.dumps(signer)
    with pytest.raises(InvalidLedgerKey) as bad:
        LedgerSigner.from_b64(secret[:-4] + "!!!!")
    assert secret[:8] not in str(bad.value)
