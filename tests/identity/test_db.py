"""The one SQLite connection setup (raw sqlite3 and SQLAlchemy engines) and the engine factory."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from identity.db import make_engine, sqlite_connect


def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    busy = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    return journal, synchronous, busy


def test_a_raw_connection_is_durable_waits_on_locks_and_autocommits(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "store.sqlite3"
    conn = sqlite_connect(path)
    assert pragmas(conn) == ("wal", 2, 30_000)  # synchronous 2 = FULL
    assert conn.isolation_level is None
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction  # autocommit: the caller says BEGIN when it wants one
    conn.close()
    assert path.exists()


def test_the_outbox_settings_cross_threads(tmp_path: Path) -> None:
    conn = sqlite_connect(tmp_path / "outbox.sqlite3", check_same_thread=False, timeout=30)
    conn.execute("CREATE TABLE t (x INTEGER)")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (2)")
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=10)
    assert errors == [] and conn.execute("SELECT x FROM t").fetchall() == [(2,)]
    conn.close()


def test_a_deferred_connection_commits_with_its_context(tmp_path: Path) -> None:
    path = tmp_path / "trail.sqlite3"
    writer = sqlite_connect(path, isolation_level="DEFERRED")
    writer.execute("CREATE TABLE t (x INTEGER)")
    with writer:
        writer.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
        assert writer.in_transaction
    assert not writer.in_transaction
    other = sqlite_connect(path)
    assert other.execute("SELECT count(*) FROM t").fetchone() == (2,)
    writer.close()
    other.close()


def test_a_read_only_connection_reads_and_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "odd?name#.sqlite3"  # URI metacharacters in the file name
    writer = sqlite_connect(path)
    writer.execute("CREATE TABLE t (x INTEGER)")
    writer.execute("INSERT INTO t VALUES (7)")
    reader = sqlite_connect(path, readonly=True, check_same_thread=False)
    assert reader.execute("SELECT x FROM t").fetchall() == [(7,)]
    assert reader.execute("PRAGMA busy_timeout").fetchone() == (30_000,)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (8)")
    reader.close()
    writer.close()
    with pytest.raises(sqlite3.OperationalError):
        sqlite_connect(tmp_path / "missing.sqlite3", readonly=True)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_many_first_opens_of_a_new_database_all_end_in_wal(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    start = threading.Barrier(8)
    modes: list[str] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            start.wait(timeout=10)
            conn = sqlite_connect(path)
            modes.append(conn.execute("PRAGMA journal_mode").fetchone()[0])
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and modes == ["wal"] * 8


def test_engine_connections_get_the_same_setup(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b.sqlite3'}")
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        assert pragmas(raw) == ("wal", 2, 30_000)
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    engine.dispose()
    with pytest.raises(ValueError, match="unsupported"):
        make_engine("mysql://localhost/x")
