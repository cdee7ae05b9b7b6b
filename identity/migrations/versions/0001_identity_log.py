"""Identity change log: every node, edge, merge, refusal, quarantine, unlink and split.

Revision ID: i0001
Revises:
Create Date: 2026-11-22

The graph is the replay of this log; replicas append to it under one lock and follow it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "identity_log",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("change", sa.LargeBinary(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_identity_log_tenant_seq", "identity_log", ["tenant", "seq"])


def downgrade() -> None:
    op.drop_index("ix_identity_log_tenant_seq", table_name="identity_log")
    op.drop_table("identity_log")
