"""A change-log commit that fails: the resolver rebuilds its graph from the log (the links
it had decided but not written are gone, the committed ones stay), answers the caller with
the error instead of waiting for ever on its own lock, and keeps working afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from identity.db import make_engine
from identity.graph import IdentityRules
from identity.identifiers import Identifier
from identity.resolver import GraphResolver
from identity.store import IdentityLogStore, migrate_identity

USER, DEVICE, NEW_DEVICE, LATER_DEVICE = (
    Identifier("user_id", "k1.u1"),
    Identifier("device_id", "k1.d1"),
    Identifier("device_id", "k1.d2"),
    Identifier("device_id", "k1.d3"),
)


class FailingOnce(IdentityLogStore):
    """A store whose next commit fails like a full disk would (rolled back)."""

    fail = False

    def insert_and_commit(
        self, conn: sa.Connection, tx: sa.RootTransaction, rows: Sequence[tuple[str, str, bytes, int]]
    ) -> int:
        if not self.fail:
            return super().insert_and_commit(conn, tx, rows)
        self.fail = False
        self.abandon(conn, tx)
        raise sa.exc.OperationalError("INSERT INTO identity_log", {}, Exception("database or disk is full"))


def test_a_failed_commit_rebuilds_the_graph_and_releases_the_lock(tmp_path: Path) -> None:
    async def run() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'identity.sqlite3'}")
        migrate_identity(engine)
        store = FailingOnce(engine)
        resolver = GraphResolver(store, {"t": IdentityRules()})
        await resolver.start()
        try:
            (person,) = await resolver.resolve_batch("t", [[USER, DEVICE]], [True], [("app", "e1")])
            store.fail = True
            with pytest.raises(sa.exc.OperationalError):
                await asyncio.wait_for(
                    resolver.resolve_batch("t", [[USER, NEW_DEVICE]], [True], [("app", "e2")]), timeout=10
                )
            graph = resolver.graphs["t"]
            assert NEW_DEVICE.node not in graph  # decided, never written: gone with the rebuild
            assert graph.unified_id(DEVICE.node) == person  # what the log holds stays
            (later,) = await asyncio.wait_for(
                resolver.resolve_batch("t", [[USER, LATER_DEVICE]], [True], [("app", "e3")]), timeout=10
            )
            assert later == person
        finally:
            await resolver.stop()
            engine.dispose()

    asyncio.run(run())
