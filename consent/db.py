"""Database engines and schema migrations for the consent store (SQLite embedded, PostgreSQL).

SQLite connections run in WAL mode with ``synchronous=FULL`` (a committed ledger record
survives power loss) and a busy timeout, and let the caller choose how a transaction
begins: the ledger's appender asks for ``BEGIN IMMEDIATE`` with the execution option
``sqlite_begin="IMMEDIATE"`` so concurrent appenders queue on the write lock instead of
failing when they upgrade a read transaction.

``migrate`` applies the Alembic migrations in ``consent/migrations`` programmatically (no
alembic.ini). It is meant to run at every start, from any number of processes at once:
PostgreSQL serialises it with an advisory lock, SQLite with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Advisory lock keys (one bigint namespace per database): "idgate" followed by a small number.
MIGRATE_LOCK_KEY = 0x6964_6761_7465_0001
_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})


def default_sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'consent.sqlite3'}"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # pysqlite's own implicit BEGIN would be DEFERRED and would come too late; we emit BEGIN
    # ourselves in _sqlite_on_begin (the SQLAlchemy recipe for SQLite transactions).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Switching a new database to WAL takes an exclusive lock and may answer "locked"
        # without waiting when several processes open it at once: retry for a while.
        for attempt in range(100):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.05)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


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
    raise ValueError(f"unsupported consent database backend {backend!r} (use sqlite or postgresql+psycopg)")


def alembic_config(script_location: Path = MIGRATIONS_DIR) -> Config:
    """Alembic configuration without an ini file: script location from a package."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("path_separator", "os")
    return config


def migrate(engine: Engine, *, revision: str = "head", script_location: Path = MIGRATIONS_DIR) -> None:
    """Upgrade the schema to ``revision`` in one transaction; safe at every start and concurrently.

    The Alembic version table lives next to the tables, in the first schema of the
    connection's search path on PostgreSQL.
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
    log.debug("consent.migrated", backend=engine.dialect.name, revision=revision)
