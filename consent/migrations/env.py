"""Alembic environment for the consent store, driven only by ``consent.db.migrate_consent``.

``migrate`` hands over a connection that is already inside the transaction (and holds the
migration lock), so the whole upgrade commits or rolls back as one. Autogenerate compares
only the consent store's tables: other packages may register SQLModel tables of their own.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

import consent.models  # noqa: F401 - registers the consent tables on SQLModel.metadata

# The consent store's tables (consent.models and the consent state projection); other
# packages' SQLModel tables are not this migration history's business.
CONSENT_TABLE_PREFIXES = ("consent_", "admin_")

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("consent migrations run through consent.db.migrate_consent(engine), not the CLI")


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    if type_ == "table":
        return bool(name) and str(name).startswith(CONSENT_TABLE_PREFIXES)
    return True


context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_object=include_object,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
