"""Alembic environment for the consent store, driven only by ``consent.db.migrate_consent``.

``migrate`` hands over a connection that is already inside the transaction (and holds the
migration lock), so the whole upgrade commits or rolls back as one. Autogenerate compares
only the consent store's tables: other packages may register SQLModel tables of their own.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

from consent.models import CONSENT_TABLES  # and registers them on SQLModel.metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("consent migrations run through consent.db.migrate_consent(engine), not the CLI")


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    # Other packages' SQLModel tables are not this migration history's business.
    return name in CONSENT_TABLES if type_ == "table" else True


context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_object=include_object,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
