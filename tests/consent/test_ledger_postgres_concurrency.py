"""Appenders in separate OS processes (spawned, each with its own engine) share one PostgreSQL ledger.

The advisory lock must serialise them: afterwards the seqs are exactly 1..N, every record a
writer was told was appended is there, and the chain and checkpoints verify.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import TYPE_CHECKING, Any

from consent.db import migrate_consent
from consent.ledger import Ledger, RecordDraft, verify_database
from consent.signing import LedgerSigner
from identity.db import make_engine

if TYPE_CHECKING:
    from conftest import Database

WRITERS = 4
RECORDS_PER_WRITER = 100
BATCH = 4
DEADLINE_SECONDS = 30


def append_records(
    url: str,
    connect_args: dict[str, Any],
    signing_key: str,
    writer: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """One writer process: wait for the starting signal, then append in small transactions."""
    engine = make_engine(url, connect_args=connect_args)
    try:
        ledger = Ledger(engine, LedgerSigner.from_b64(signing_key), checkpoint_every=50)
        ledger.last_seq()  # connect before the start, so the writers really race
        ready.put(writer)
        if not start.wait(DEADLINE_SECONDS):
            raise TimeoutError("never started")
        appended: list[tuple[int, str]] = []
        for first in range(0, RECORDS_PER_WRITER, BATCH):
            drafts = [
                RecordDraft(
                    tenant="shop",
                    record_type="consent",
                    subject=f"k1.w{writer}-{i}",
                    identifiers=[f"user_id:k1.w{writer}-{i}"],
                    purposes=["analytics"],
                    state="given",
                    detail={"writer": writer, "i": i},
                )
                for i in range(first, first + BATCH)
            ]
            appended.extend((r.seq, r.record_id) for r in ledger.append(drafts))
        results.put((writer, appended, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((writer, [], repr(exc)))
    finally:
        engine.dispose()


def test_concurrent_appenders_in_processes_keep_one_contiguous_chain(
    postgres_database: Database, signing_key: str
) -> None:
    setup = postgres_database.engine()
    migrate_consent(setup)
    setup.dispose()

    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    start = ctx.Event()
    processes = [
        ctx.Process(
            target=append_records,
            args=(
                postgres_database.url,
                postgres_database.connect_args,
                signing_key,
                w,
                ready,
                start,
                results,
            ),
            daemon=True,
        )
        for w in range(WRITERS)
    ]
    for p in processes:
        p.start()
    try:
        for _ in processes:
            ready.get(timeout=DEADLINE_SECONDS)
        start.set()
        outcomes = [results.get(timeout=DEADLINE_SECONDS) for _ in processes]
    except queue.Empty:
        raise AssertionError("a writer process did not report in time") from None
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [(w, err) for w, _, err in outcomes if err]
    assert errors == []

    reader = postgres_database.engine()
    try:
        ledger = Ledger(reader, None)
        total = WRITERS * RECORDS_PER_WRITER
        records = ledger.records(limit=total + 10)
        assert [r.seq for r in records] == list(range(1, total + 1))
        acknowledged = {pair for _, appended, _ in outcomes for pair in appended}
        assert acknowledged == {(r.seq, r.record_id) for r in records}  # nothing lost, nothing foreign
        for _, appended, _ in outcomes:  # each writer's own batches kept their order
            assert [s for s, _ in appended] == sorted(s for s, _ in appended)
        writer_of = {seq: w for w, appended, _ in outcomes for seq, _ in appended}
        switches = sum(writer_of[s] != writer_of[s + 1] for s in range(1, total))
        assert switches >= WRITERS, "the writers ran one after the other: nothing was tested"
        checkpoints = ledger.checkpoints()
        assert [c.from_seq for c in checkpoints] == [1] + [c.to_seq + 1 for c in checkpoints[:-1]]
        assert all(c.to_seq - c.from_seq + 1 >= 50 for c in checkpoints)
        result = verify_database(ledger)
        assert result.ok and result.records == total, result
    finally:
        reader.dispose()
    assert time.monotonic() - started < DEADLINE_SECONDS
