"""Retention of aliases (PIPL Art. 19): a unified ID merged into another person before the
cutoff leaves the identity change log and the graph (renamed to a tombstone by the same
rewrite as a redaction); newer aliases and current IDs stay. On SQLite, and on PostgreSQL
with a second replica that starts from the rewritten log."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from identity import redaction
from identity import resolver as resolver_module
from identity.db import make_engine
from identity.graph import GraphChange, IdentityGraph, Merged
from identity.redaction import is_tombstone_unified_id
from identity.resolver import GraphResolver
from identity.store import IdentityLogStore, migrate_identity
from tests.conftest import PostgresSchema
from tests.identity.test_log_redaction import RULES, ident, log_text, opened, replayed
from tests.identity.test_log_redaction import scenario as redaction_scenario


def state_text(graph: IdentityGraph) -> bytes:
    return msgspec.json.encode(graph.state())


async def link(resolver: GraphResolver, nodes: list[str], event: str) -> None:
    await resolver.resolve_batch("t", [[ident(n) for n in nodes]], [True], [("s", event)])


def merges(store: IdentityLogStore) -> list[Merged]:
    changes = [msgspec.json.decode(raw, type=GraphChange) for _, _, raw in store.all_rows()]
    return [c for c in changes if isinstance(c, Merged)]


async def scenario(url: str) -> None:
    engine = make_engine(url)
    migrate_identity(engine)
    store = IdentityLogStore(engine)
    resolver = GraphResolver(store, RULES)
    await resolver.start()
    # another replica (it reads the log when told to here)
    other = GraphResolver(IdentityLogStore(engine), RULES, follow_seconds=3600)
    await other.start()
    try:
        # qa joins P (its ID becomes an alias of P's); after the cutoff, sa joins R
        await link(resolver, ["user_id:k1.P", "anonymous_id:k1.pa"], "e1")
        await link(resolver, ["anonymous_id:k1.qa"], "e2")
        await link(resolver, ["anonymous_id:k1.pa", "anonymous_id:k1.qa"], "e3")
        # each batch may merge too (its identifiers are persons first): all of these are old
        olds = merges(store)
        old = olds[-1]  # qa's ID into P's
        cutoff = max(m.at for m in olds) + timedelta(microseconds=1)
        await link(resolver, ["user_id:k1.R", "anonymous_id:k1.ra"], "e4")
        await link(resolver, ["anonymous_id:k1.sa"], "e5")
        await link(resolver, ["anonymous_id:k1.ra", "anonymous_id:k1.sa"], "e6")
        news = merges(store)[len(olds) :]
        assert all(m.at >= cutoff for m in news)
        graph = resolver.graphs["t"]
        assert graph.resolve_alias(old.merged) == old.survivor
        live = {n: graph.unified_id(n) for n in graph.nodes()}

        await other.catch_up()
        # a dry run counts and writes nothing
        text = log_text(store)
        assert await resolver.expire_aliases("t", cutoff, apply=False) == len(olds)
        assert log_text(store) == text

        assert await resolver.expire_aliases("t", cutoff) == len(olds)
        graph = resolver.graphs["t"]
        # the old ID no longer resolves; the log and the graph no longer name it
        assert graph.resolve_alias(old.merged) == old.merged
        text = log_text(store)
        for m in olds:
            assert m.merged not in text and m.merged.encode() not in state_text(graph)
        aliases: dict[str, str] = graph.state()["aliases"]  # type: ignore[assignment]
        assert [a for a, to in aliases.items() if to == old.survivor and is_tombstone_unified_id(a)]
        # the newer alias and every current ID stay; the log replays to this graph
        r_id = graph.unified_id("user_id:k1.R")
        assert all(graph.resolve_alias(m.merged) == r_id and m.merged in text for m in news)
        assert {n: graph.unified_id(n) for n in graph.nodes()} == live
        assert state_text(replayed(store)) == state_text(graph)

        # a second run finds nothing: no lock, nothing written
        def no_lock() -> Any:
            raise AssertionError("the log's lock was taken")

        resolver.store.begin_locked = no_lock  # type: ignore[method-assign]
        assert await resolver.expire_aliases("t", cutoff) == 0
        assert await resolver.expire_aliases("t", cutoff, apply=False) == 0
        assert log_text(store) == text

        # another replica that had read the old records still resolves the old ID, until
        # its own run finds the log no longer names it and replays the log again
        assert other.graphs["t"].resolve_alias(old.merged) == old.survivor
        assert await other.expire_aliases("t", cutoff) == 0
        assert other.graphs["t"].resolve_alias(old.merged) == old.merged
        assert state_text(other.graphs["t"]) == state_text(graph)
        assert log_text(store) == text

        # a replica started from the rewritten log has the same graph
        later = GraphResolver(IdentityLogStore(engine), RULES)
        await later.start()
        try:
            assert state_text(later.graphs["t"]) == state_text(graph)
        finally:
            await later.stop()
    finally:
        await other.stop()
        await resolver.stop()
        engine.dispose()


@pytest.mark.parametrize("few", [16, 0], ids=["search-per-name", "one-pass"])
def test_old_aliases_expire_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, few: int) -> None:
    """Both ways of finding the names (a search per name for a few, one pass over the
    strings for many: an expiry usually renames many)."""
    monkeypatch.setattr(redaction, "_FEW", few)
    asyncio.run(scenario(f"sqlite:///{tmp_path / 'identity.sqlite3'}"))


@pytest.mark.parametrize("seed", [3, 11, 29, 42])
def test_a_redaction_is_the_same_with_the_one_pass_renaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    monkeypatch.setattr(redaction, "_FEW", 0)
    asyncio.run(redaction_scenario(f"sqlite:///{tmp_path / 'identity.sqlite3'}", seed, 60))


@pytest.mark.postgres
def test_old_aliases_expire_on_postgresql(pg_schema: PostgresSchema) -> None:
    asyncio.run(scenario(pg_schema.url))


def test_links_go_on_while_an_expiry_is_planned_and_a_stale_plan_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expiry is planned without the log's lock: a link decided meanwhile commits at
    once and stays in the graph. A plan whose records changed under it (here: a redaction
    of a person whose merge the plan rewrites, between the read and the lock) is not
    written; the expiry is planned again on the new log, and the redaction's tombstones
    survive it."""

    async def run() -> None:
        async with opened(f"sqlite:///{tmp_path / 'identity.sqlite3'}") as (store, resolver):
            planning, release = threading.Event(), threading.Event()
            plans = 0
            real = resolver_module.plan_alias_expiry

            def held(*args: Any) -> Any:
                nonlocal plans
                plans += 1
                if plans == 1:
                    planning.set()
                    release.wait(30)
                return real(*args)

            monkeypatch.setattr(resolver_module, "plan_alias_expiry", held)
            try:
                await link(resolver, ["user_id:k1.P", "anonymous_id:k1.pa"], "e1")
                await link(resolver, ["anonymous_id:k1.qa"], "e2")
                await link(resolver, ["anonymous_id:k1.pa", "anonymous_id:k1.qa"], "e3")
                olds = merges(store)
                cutoff = max(m.at for m in olds) + timedelta(microseconds=1)
                expiry = asyncio.create_task(resolver.expire_aliases("t", cutoff))
                assert await asyncio.to_thread(planning.wait, 30)
                # the lock is free: a link and a whole erasure of P commit while the plan waits
                await asyncio.wait_for(link(resolver, ["user_id:k1.S", "anonymous_id:k1.sa"], "e4"), 10)
                person = ["user_id:k1.P", "anonymous_id:k1.pa", "anonymous_id:k1.qa"]
                for node in person:
                    await resolver.remove("t", node)
                await resolver.redact("t", person)
                release.set()
                await expiry
                assert plans == 2  # the first plan's records had changed: planned again
                text = log_text(store)
                assert "k1.P" not in text and "k1.pa" not in text and "erased:" in text
                assert all(m.merged not in text for m in olds)
                await resolver.rebuilt()  # the redaction's replay of the log, in the background
                graph = resolver.graphs["t"]
                assert graph.unified_id("anonymous_id:k1.sa") == graph.unified_id("user_id:k1.S")
                assert state_text(replayed(store)) == state_text(graph)
            finally:
                release.set()

    asyncio.run(run())
