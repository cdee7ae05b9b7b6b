"""Alembic environment for the consent store, driven only by ``consent.db.migrate``.

``migrate`` hands over a connection that is already inside the transaction (and holds the
migration lock), so the whole upgrade commits or rolls back as one. Autogenerate compares
only the consent tables: other packages may register SQLModel tables of their own.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

from consent.models import CONSENT_TABLES

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("consent migrations run through consent.db.migrate(engine), not the alembic CLI")


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "table":
        return name in CONSENT_TABLES
    return True


context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_name=include_name,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
