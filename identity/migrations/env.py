"""Alembic environment for the identity store, driven by ``identity.store.migrate_identity``.

Its version table is ``alembic_version_identity`` so the identity and consent schemas can
share one PostgreSQL database and evolve on their own. Autogenerate compares only the
identity store's tables (``identity.models``): other packages register SQLModel tables too.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

from identity.models import IDENTITY_TABLES

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("identity migrations run through identity.store.migrate_identity(engine), not the CLI")


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return name in IDENTITY_TABLES if type_ == "table" else True


context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_object=include_object,
    compare_type=True,
    version_table="alembic_version_identity",
)
with context.begin_transaction():
    context.run_migrations()
