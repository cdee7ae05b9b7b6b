"""The embedded outbox database: its connections and its schema versions, in one place.

One SQLite file (``outbox.sqlite3`` under the data directory) holds the outbox, the dedupe
marks, the delivery cursors, the per-destination person index, the committed sink sizes
and the dead letters. Its schema version is SQLite's ``user_version``; every step from an
older version is here, run at open by whichever component opens the file first (the
outbox, the dead-letter store, the ``idgate dlq`` command), under ``BEGIN IMMEDIATE`` so
two openers never migrate at once.

Version 3 added what the records say about themselves (kind, person, pseudonyms). Rows
written by version 2 carry none of it; the upgrade reads it off their payloads once, by
the shapes version 2 used (notices begin with ``{"type":"identity.``, unified IDs are
``p_`` + 20-22 characters, pseudonyms ``k<version>.`` + 22), so delivery after the upgrade
re-keys and routes them like new records. Nothing else reads payload bytes that way.

Version 4 added when a person's data last went to a destination (``delivered_person.
delivered_at_ms``, for retention); entries of older versions count from the upgrade.

Version 5 keeps the dedupe marks as their 16-byte digests (a BLOB key) instead of 32 hex
characters: half the index, and a mark costs about half as much to write and to look up
(the dedupe statement was the ingest path's largest single cost). The upgrade converts the
marks it finds.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from identity.db import sqlite_connect

SCHEMA_VERSION = 5

_TABLES = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    destinations TEXT NOT NULL,
    payload BLOB NOT NULL,
    consent BLOB NOT NULL DEFAULT x'',
    proof TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'event',
    person TEXT NOT NULL DEFAULT '',
    pseudonyms TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS dedupe (
    key BLOB PRIMARY KEY,
    seen_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_cursor (
    destination TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS delivered_person (
    destination TEXT NOT NULL,
    unified_id TEXT NOT NULL,
    delivered_at_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, unified_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_file (
    destination TEXT NOT NULL,
    file TEXT NOT NULL,
    committed_bytes INTEGER NOT NULL,
    PRIMARY KEY (destination, file)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    dead_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    consent BLOB NOT NULL,
    proof TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'event',
    person TEXT NOT NULL DEFAULT '',
    pseudonyms TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS dead_letter_destination ON dead_letter(destination, id);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL
);
"""


class OutboxSchemaError(Exception):
    """The outbox database is newer than this idgate, or cannot be read."""


def open_outbox_database(path: Path) -> sqlite3.Connection:
    """A connection to the outbox database (identity.db's one SQLite setup: autocommit, so
    transactions are explicit; WAL; ``synchronous=FULL``, an acknowledged append survives
    power loss), usable from whichever thread runs it."""
    return sqlite_connect(path, check_same_thread=False, timeout=30)


# -- version 2 rows -----------------------------------------------------------------------------
_V2_NOTICE_PREFIX = b'{"type":"identity.'
_V2_UNIFIED_ID = re.compile(rb'"unified_id":"(p_[A-Za-z0-9_-]{20,22})"')
_V2_VALUE = re.compile(rb'"(k\d{1,4}\.[A-Za-z0-9_-]{22}|p_[A-Za-z0-9_-]{20,22})"')


def v2_record_fields(payload: bytes) -> tuple[str, str, str]:
    """(kind, person, comma-joined pseudonyms) of a record stored before version 3."""
    if payload.startswith(_V2_NOTICE_PREFIX):
        return "notice", "", ""
    person = _V2_UNIFIED_ID.search(payload)
    values = dict.fromkeys(m.group(1).decode() for m in _V2_VALUE.finditer(payload))
    return "event", person.group(1).decode() if person else "", ",".join(values)


def _fill_v2_rows(conn: sqlite3.Connection, table: str) -> None:
    key = "seq" if table == "outbox" else "id"
    rows = conn.execute(f"SELECT {key}, payload FROM {table}").fetchall()  # noqa: S608
    conn.executemany(
        f"UPDATE {table} SET kind = ?, person = ?, pseudonyms = ? WHERE {key} = ?",  # noqa: S608
        [(*v2_record_fields(bytes(payload)), rowid) for rowid, payload in rows],
    )


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _convert_dedupe_v4(conn: sqlite3.Connection, chunk: int = 50_000) -> None:
    """Copy the version 4 marks (hex text keys) into the version 5 table, as bytes."""
    cursor = conn.execute("SELECT key, seen_at_ms FROM dedupe_v4")
    while rows := cursor.fetchmany(chunk):
        conn.executemany(
            "INSERT OR IGNORE INTO dedupe(key, seen_at_ms) VALUES (?, ?)",
            [(bytes.fromhex(key), seen) for key, seen in rows if _is_hex_digest(key)],
        )
    conn.execute("DROP TABLE dedupe_v4")


def _is_hex_digest(key: object) -> bool:
    return isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def migrate_outbox_database(conn: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it had."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise OutboxSchemaError(
                f"the outbox database has schema {version}, newer than this idgate ({SCHEMA_VERSION})"
            )
        existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version < 2 and "outbox" in existing and "consent" not in _columns(conn, "outbox"):
            # 1 -> 2: the consent question and its proof travel with each event
            conn.execute("ALTER TABLE outbox ADD COLUMN consent BLOB NOT NULL DEFAULT x''")
            conn.execute("ALTER TABLE outbox ADD COLUMN proof TEXT NOT NULL DEFAULT ''")
        if version < 3:
            # 2 -> 3: records say what they are, whose data and which pseudonyms they carry
            added = {
                "outbox": (
                    "kind TEXT NOT NULL DEFAULT 'event'",
                    "person TEXT NOT NULL DEFAULT ''",
                    "pseudonyms TEXT NOT NULL DEFAULT ''",
                ),
                "dead_letter": (
                    "tenant TEXT NOT NULL DEFAULT ''",
                    "source TEXT NOT NULL DEFAULT ''",
                    "kind TEXT NOT NULL DEFAULT 'event'",
                    "person TEXT NOT NULL DEFAULT ''",
                    "pseudonyms TEXT NOT NULL DEFAULT ''",
                ),
            }
            for table, columns in added.items():
                if table not in existing:
                    continue
                have = _columns(conn, table)
                for column in columns:
                    if column.split()[0] not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                _fill_v2_rows(conn, table)
        if version < 4 and "delivered_person" in existing:
            # 3 -> 4: the person index says when each person's data last went out
            if "delivered_at_ms" not in _columns(conn, "delivered_person"):
                conn.execute(
                    "ALTER TABLE delivered_person ADD COLUMN delivered_at_ms INTEGER NOT NULL DEFAULT 0"
                )
            conn.execute(
                "UPDATE delivered_person SET delivered_at_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER) "
                "WHERE delivered_at_ms = 0"
            )
        if version < 5 and "dedupe" in existing:
            # 4 -> 5: dedupe marks keyed by their digest's bytes, not its hex
            conn.execute("ALTER TABLE dedupe RENAME TO dedupe_v4")
            existing.discard("dedupe")
        for statement in _TABLES.split(";"):
            if statement.strip():
                conn.execute(statement)
        if version < 5 and "dedupe_v4" in {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }:
            _convert_dedupe_v4(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(version)
