"""Consent state projection: latest record per identifier and purpose, notices, watermark.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

These tables are derived from the ledger (consent.state) and can be rebuilt from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consent_state",
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("identifier", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("notice_seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "identifier", "purpose"),
    )
    op.create_table(
        "consent_notice",
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("notice_id", sa.String(), nullable=False),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("material", sa.Boolean(), nullable=False),
        sa.Column("purposes", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "notice_id"),
    )
    op.create_table(
        "consent_projection",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("applied_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("consent_projection")
    op.drop_table("consent_notice")
    op.drop_table("consent_state")
