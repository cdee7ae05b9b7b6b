"""Consent store fixtures: a migrated database of the test's own on each backend.

SQLite lives in the test's tmp_path; PostgreSQL (the local server, trust auth) gets a fresh
schema per test, named ``ledger_<hex>``, set as the connections' search path so the
tables, the triggers and the Alembic version table all live in it, and dropped afterwards.
A PostgreSQL that cannot be reached fails the test: it is never skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from consent.db import migrate_consent
from consent.ledger import Ledger, RecordDraft
from consent.signing import LedgerSigner, new_ledger_key_b64
from identity.db import make_engine

POSTGRES_URL = os.environ.get("IDGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Database:
    """Where a test's consent store lives; ``engine()`` opens a new engine on it (own pool)."""

    backend: str
    url: str
    connect_args: dict[str, Any] = field(default_factory=dict)
    schema: str | None = None

    def engine(self) -> Engine:
        return make_engine(self.url, connect_args=self.connect_args)

    @property
    def cli_url(self) -> str:
        """One URL that carries the search path too, for the CLI's --database-url."""
        if self.schema is None:
            return self.url
        return f"{self.url}?options={quote(f'-csearch_path={self.schema}')}"


def _libpq_conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def admin_connection() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_libpq_conninfo(POSTGRES_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        problem = str(exc).strip()
    # Outside the except block, so the report is this one line rather than psycopg's traceback.
    pytest.fail(f"PostgreSQL is required at {POSTGRES_URL} (set IDGATE_TEST_POSTGRES_URL): {problem}")


@pytest.fixture
def postgres_database() -> Iterator[Database]:
    """A fresh, empty schema on the local PostgreSQL, dropped with everything in it afterwards."""
    schema = f"ledger_{uuid.uuid4().hex[:16]}"
    with admin_connection() as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Database("postgres", POSTGRES_URL, {"options": f"-csearch_path={schema}"}, schema)
    finally:
        with admin_connection() as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Database:
    return Database("sqlite", f"sqlite:///{tmp_path / 'var' / 'consent.sqlite3'}")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue(f"{request.param}_database")  # type: ignore[no-any-return]


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    eng = database.engine()
    migrate_consent(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def signing_key() -> str:
    return new_ledger_key_b64()


@pytest.fixture
def signer(signing_key: str) -> LedgerSigner:
    return LedgerSigner.from_b64(signing_key)


@pytest.fixture
def ledger(engine: Engine, signer: LedgerSigner) -> Ledger:
    return Ledger(engine, signer, checkpoint_every=5)


DraftFactory = Callable[..., RecordDraft]


@pytest.fixture
def make_draft() -> DraftFactory:
    """Build a consent grant draft; keyword arguments override any field."""

    def build(**overrides: Any) -> RecordDraft:
        subject = overrides.pop("subject", "k1.subject")
        fields: dict[str, Any] = {
            "tenant": "shop",
            "record_type": "consent",
            "subject": subject,
            "identifiers": [f"user_id:{subject}"],
            "notice_id": "privacy-2025-01",
            "notice_hash": "ab" * 32,
            "purposes": ["analytics"],
            "state": "given",
            "consent_kind": "general",
            "legal_basis": "consent",
            "source": "shop-web",
            "platform": "web",
            "sdk": "analytics.js/5",
            "evidence_hash": "cd" * 32,
            "detail": {},
        }
        fields.update(overrides)
        return RecordDraft(**fields)

    return build
