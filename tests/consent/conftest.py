"""Consent store fixtures: a migrated database of the test's own on each backend.

SQLite lives in the test's tmp_path; PostgreSQL (the local server) gets a fresh schema per
test from ``pg_schema`` (tests/conftest.py), dropped afterwards. A PostgreSQL that cannot
be reached fails the test: it is never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from consent.db import migrate_consent
from consent.ledger import Ledger, RecordDraft
from consent.signing import LedgerSigner, new_ledger_key_b64
from identity.db import make_engine
from tests.conftest import PostgresSchema


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
        return self.url if self.schema is None else PostgresSchema(self.schema, self.url).url


@pytest.fixture
def postgres_database(pg_schema: PostgresSchema) -> Database:
    """A fresh, empty schema on the local PostgreSQL, dropped with everything in it afterwards."""
    return Database("postgres", pg_schema.server_url, pg_schema.connect_args, pg_schema.name)


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Database:
    return Database("sqlite", f"sqlite:///{tmp_path / 'var' / 'consent.sqlite3'}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
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
