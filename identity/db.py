"""Database plumbing shared by every store: SQLite connection setup, engines, Alembic migrations.

It lives in ``identity``, the base layer, so that ``consent`` and ``export`` can use it
without importing each other.

- ``configure_sqlite`` is the one SQLite setup: a busy timeout, WAL (retried while another
  process switches a new database to it), ``synchronous=FULL`` (a committed row survives
  power loss). ``sqlite_connect`` opens a raw ``sqlite3`` connection with it, for the hot
  paths that skip SQLAlchemy; ``make_engine`` applies it to every connection of a
  SQLAlchemy engine.
- SQLite engines let the caller choose how a transaction begins: appenders ask for
  ``BEGIN IMMEDIATE`` with the execution option ``sqlite_begin="IMMEDIATE"`` so concurrent
  writers queue on the write lock instead of failing when they upgrade a read transaction.
- ``migrate`` applies a package's Alembic migrations programmatically (no alembic.ini). It
  is meant to run at every start, from any number of processes at once: PostgreSQL
  serialises it with an advisory lock, SQLite with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Advisory lock keys (one bigint namespace per database): "idgate" followed by a small number.
MIGRATE_LOCK_KEY = 0x6964_6761_7465_0001
_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
_WAL_ATTEMPTS = 100
_WAL_RETRY_SECONDS = 0.05

SqliteIsolation = Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"] | None


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def dialect_insert(engine: Engine) -> Any:
    """The dialect's INSERT construct (PostgreSQL's or SQLite's: both have ON CONFLICT)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if is_postgres(engine) else sqlite.insert


# -- raw sqlite3 ------------------------------------------------------------------------------


def configure_sqlite(
    conn: sqlite3.Connection, *, readonly: bool = False, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
) -> None:
    """Busy timeout, WAL and ``synchronous=FULL`` on a new connection (only the timeout when read-only:
    a reader neither changes the journal mode nor commits)."""
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    if readonly:
        return
    # Switching a new database to WAL takes an exclusive lock and may answer "locked" without
    # waiting when several processes open it at once: retry for a while.
    for attempt in range(_WAL_ATTEMPTS):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == _WAL_ATTEMPTS - 1:
                raise
            time.sleep(_WAL_RETRY_SECONDS)
    conn.execute("PRAGMA synchronous=FULL")


def sqlite_connect(
    path: str | Path,
    *,
    readonly: bool = False,
    check_same_thread: bool = True,
    timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000,
    isolation_level: SqliteIsolation = None,
) -> sqlite3.Connection:
    """A raw sqlite3 connection set up like every other (``configure_sqlite``).

    ``isolation_level=None`` (the default) is autocommit: the caller issues ``BEGIN`` itself,
    e.g. ``BEGIN IMMEDIATE`` for a writer. With ``"DEFERRED"``, sqlite3 opens a transaction
    before the first write and ``with conn:`` commits it. ``readonly`` opens the file with
    ``mode=ro`` (it must exist); otherwise its directory is created when missing. ``timeout``
    (seconds) is also the busy timeout."""
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout, check_same_thread=check_same_thread, isolation_level=None
        )
    else:
        if str(path) != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path, timeout=timeout, check_same_thread=check_same_thread, isolation_level=None
        )
    try:
        configure_sqlite(conn, readonly=readonly, busy_timeout_ms=int(timeout * 1000))
    except BaseException:
        conn.close()
        raise
    conn.isolation_level = isolation_level
    return conn


# -- SQLAlchemy engines -----------------------------------------------------------------------


_MAX_ROW_ID = 2**63 - 1


def row_id(text: str) -> int | None:
    """A SQLite rowid named in a URL or a CLI argument, or None when it cannot be one: only
    ASCII digits (``"²".isdigit()`` is true but ``int`` refuses it) and within SQLite's
    64-bit integer range (a longer number would overflow the driver, not miss the row)."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= _MAX_ROW_ID else None


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # pysqlite's own implicit BEGIN would be DEFERRED and would come too late; we emit BEGIN
    # ourselves in _sqlite_on_begin (the SQLAlchemy recipe for SQLite transactions).
    dbapi_connection.isolation_level = None
    configure_sqlite(dbapi_connection)


def _sqlite_on_begin(conn: sa.Connection) -> None:
    mode = str(conn.get_execution_options().get("sqlite_begin", "DEFERRED")).upper()
    if mode not in _SQLITE_BEGIN_MODES:
        raise ValueError(f"sqlite_begin must be one of {sorted(_SQLITE_BEGIN_MODES)}, not {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, connect_args: dict[str, Any] | None = None, echo: bool = False) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...``.

    ``connect_args`` go to the driver (e.g. ``{"options": "-csearch_path=myschema"}`` for psycopg).
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, **(connect_args or {})},
            echo=echo,
        )
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        return sa.create_engine(parsed, connect_args=connect_args or {}, pool_pre_ping=True, echo=echo)
    raise ValueError(f"unsupported database backend {backend!r} (use sqlite or postgresql+psycopg)")


# -- Alembic ----------------------------------------------------------------------------------


def alembic_config(script_location: Path) -> Config:
    """Alembic configuration without an ini file: script location from a package."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("path_separator", "os")
    return config


def migrate(engine: Engine, *, script_location: Path, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` in one transaction; safe at every start and concurrently.

    The Alembic version table (named by the package's ``env.py``) lives next to the tables,
    in the first schema of the connection's search path on PostgreSQL.
    """
    config = alembic_config(script_location)
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            if is_postgres(engine):
                # Transaction-scoped: released by the COMMIT that publishes the new schema, so
                # the next process waiting here sees it and has nothing left to do.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    log.debug(
        "db.migrated", backend=engine.dialect.name, script_location=str(script_location), revision=revision
    )
