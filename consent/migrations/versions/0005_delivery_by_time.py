"""Delivery proofs by destination and time: what retention runs remove and breach queries
read (consent.retention, consent.breach) without scanning every proof.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_consent_delivery_destination_at", "consent_delivery", ["destination", "delivered_at"])


def downgrade() -> None:
    op.drop_index("ix_consent_delivery_destination_at", table_name="consent_delivery")
