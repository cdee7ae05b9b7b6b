"""Tables of the identity store: the change log that the graph is the replay of.

The schema is created by the Alembic migrations in ``identity/migrations`` (never by
``create_all``); ``tests/test_schema_migrations.py`` checks that the migrated schema
matches these classes on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


class IdentityLogEntry(SQLModel, table=True):
    """One change of the identity graph (node, edge, merge, refusal, quarantine, unlink, split)."""

    __tablename__ = "identity_log"
    __table_args__ = (sa.Index("ix_identity_log_tenant_seq", "tenant", "seq"),)

    # Assigned by the database in append order (an INTEGER PRIMARY KEY rowid on SQLite).
    seq: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    tenant: str
    kind: str
    change: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))  # an encoded GraphChange
    at_ms: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))


IDENTITY_TABLES: tuple[str, ...] = ("identity_log",)
