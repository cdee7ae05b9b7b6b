"""Where the consent store lives and how its schema is migrated.

Engines, SQLite setup and the migration runner are shared with the other stores
(``identity.db``); this module keeps what is the consent store's own: its migrations
(``consent/migrations``, version table ``alembic_version``) and its embedded file name.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from identity.db import migrate

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def default_sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'consent.sqlite3'}"


def migrate_consent(engine: Engine, *, revision: str = "head") -> None:
    """Create or upgrade the consent tables; safe at every start and from many processes at once."""
    migrate(engine, script_location=MIGRATIONS_DIR, revision=revision)
