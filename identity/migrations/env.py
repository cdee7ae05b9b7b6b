"""Alembic environment for the identity store, driven by ``migrate(engine, script_location=...)``.

Its version table is ``alembic_version_identity`` so the identity and consent schemas can
share one PostgreSQL database and evolve on their own.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("identity migrations run through migrate(engine, script_location=...), not the CLI")

context.configure(connection=connection, target_metadata=None, version_table="alembic_version_identity")
with context.begin_transaction():
    context.run_migrations()
