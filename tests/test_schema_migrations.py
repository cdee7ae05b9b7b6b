"""The SQLModel models and the Alembic migrations of each store agree, on SQLite and PostgreSQL.

Each store's migrations run on a fresh database (SQLite in tmp_path; PostgreSQL in a schema
of the test's own, selected by search_path and dropped afterwards), then Alembic's
autogenerate compares what they made with the models: any missing or extra table, column,
index or unique constraint, and any type or nullability that differs, is a failure. Primary
keys, which autogenerate does not compare, are compared here. The version table is the
migrations' own; triggers (the ledger's append-only guards) are not models and autogenerate
does not see them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from consent.db import migrate_consent
from consent.models import CONSENT_TABLES
from identity.db import make_engine
from identity.models import IDENTITY_TABLES
from identity.store import migrate_identity
from tests.conftest import postgres_schema


@dataclass(frozen=True)
class Store:
    migrate: Callable[[Engine], None]
    tables: tuple[str, ...]  # every table of the store's models
    version_table: str


STORES = {
    "consent": Store(migrate_consent, CONSENT_TABLES, "alembic_version"),
    "identity": Store(migrate_identity, IDENTITY_TABLES, "alembic_version_identity"),
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        yield engine
        engine.dispose()
        return
    with postgres_schema("schema") as schema:
        engine = make_engine(schema.url)
        try:
            yield engine
        finally:
            engine.dispose()


def table_classes(package: str) -> set[str]:
    """The tables of every SQLModel table class defined in the package (all its modules imported)."""
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
        if ".migrations" not in module.name:  # Alembic env modules run only under Alembic
            importlib.import_module(module.name)
    found: set[str] = set()
    classes: list[type[SQLModel]] = [SQLModel]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{package}.") and "__table__" in vars(cls):
            found.add(vars(cls)["__table__"].name)
    return found


def test_the_store_table_lists_name_every_model_table() -> None:
    """The comparison covers the tables the lists name: a table class left off them would escape it."""
    assert table_classes("consent") == set(CONSENT_TABLES)
    assert table_classes("identity") == set(IDENTITY_TABLES)


@pytest.mark.parametrize("store_name", sorted(STORES))
def test_models_and_migrations_agree(store_name: str, empty_engine: Engine) -> None:
    store = STORES[store_name]
    store.migrate(empty_engine)

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ != "table":
            return True
        if reflected:  # everything the migrations made, so an extra table shows
            return name != store.version_table
        return name in store.tables  # other packages register their tables on SQLModel.metadata too

    with empty_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True}
        )
        differences = compare_metadata(context, SQLModel.metadata)
        inspector = sa.inspect(conn)
        made = set(inspector.get_table_names())  # the connection's first schema: the test's own
        primary_keys = {t: inspector.get_pk_constraint(t)["constrained_columns"] for t in store.tables}
    assert differences == [], "models and migrations differ:\n" + "\n".join(map(repr, differences))
    assert made == {*store.tables, store.version_table}
    assert primary_keys == {
        t: [c.name for c in SQLModel.metadata.tables[t].primary_key.columns] for t in store.tables
    }
