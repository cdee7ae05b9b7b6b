"""Redaction of an erased person from the identity change log: random graphs built through
the resolver (links, merges, refusals, quarantines, unlinks, partial erasures), one person
erased and redacted, the log replayed again: everyone else's graph is the same, and the log
names none of the person's identifiers or unified IDs. On SQLite, and on PostgreSQL with a
second replica that starts from the redacted log."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity import redaction
from identity.db import make_engine
from identity.graph import IdentityGraph, IdentityRules
from identity.identifiers import Identifier
from identity.rebuild import rebuild, replay
from identity.resolver import GraphResolver
from identity.store import IdentityLogStore, migrate_identity
from tests.conftest import PostgresSchema

UNIVERSE = [
    *(f"user_id:k1.u{i}" for i in range(3)),
    *(f"phone:k1.p{i}" for i in range(2)),
    *(f"email:k1.e{i}" for i in range(3)),
    *(f"device_id:k1.d{i}" for i in range(4)),
    *(f"anonymous_id:k1.a{i}" for i in range(4)),
]
RULES = {"t": IdentityRules(max_component=5, breaker_max_merges=3, breaker_window_seconds=3600)}


def ident(node: str) -> Identifier:
    kind, _, value = node.partition(":")
    return Identifier(kind, value)


def view(graph: IdentityGraph, nodes: set[str]) -> dict[str, Any]:
    """What a reader sees of these identifiers: person, ID, links (with provenance), review list."""
    return {
        n: (
            graph.unified_id(n),
            sorted(graph.component(n)),
            sorted((a, b, p) for a, b, p in graph.edges() if n in (a, b)),
            sorted((q.a, q.b, q.reason) for q in graph.quarantine() if n in (q.a, q.b)),
        )
        for n in sorted(nodes)
    }


def replayed(store: IdentityLogStore) -> IdentityGraph:
    tenants, _ = replay(store.all_rows(), RULES)
    return tenants["t"].graph


async def build(resolver: GraphResolver, rnd: random.Random, steps: int) -> None:
    for i in range(steps):
        roll = rnd.random()
        graph = resolver.graphs["t"]
        if roll < 0.75:
            nodes = rnd.sample(UNIVERSE, rnd.randint(1, 4))
            await resolver.resolve_batch("t", [[ident(n) for n in nodes]], [True], [("src", f"e{i}")])
        elif roll < 0.85 and (links := sorted((a, b) for a, b, _ in graph.edges())):
            a, b = rnd.choice(links)
            await resolver.unlink("t", a, b)
        elif roll < 0.92 and graph.quarantine():
            q = rnd.choice(graph.quarantine())
            await resolver.review("t", q.a, q.b, approve=rnd.random() < 0.7, officer="o")
        elif len(graph):
            await resolver.remove("t", rnd.choice(sorted(graph.nodes())))


async def erase(resolver: GraphResolver, rnd: random.Random) -> tuple[set[str], set[str]]:
    """Erase one person from the graph like the deletion does; return their nodes and
    unified IDs (the current ones and those merged into them)."""
    graph = resolver.graphs["t"]
    person = set(graph.component(rnd.choice(sorted(graph.nodes()))))
    uids = {str(graph.unified_id(n)) for n in person}
    uids |= {a for u in set(uids) for a in graph.aliases_of(u)}
    for node in sorted(person):
        await resolver.remove("t", node)
    return person, uids


@asynccontextmanager
async def opened(db: str) -> AsyncIterator[tuple[IdentityLogStore, GraphResolver]]:
    """A migrated identity log at ``db`` and a started resolver over it (tenant ``t``)."""
    engine = make_engine(db)
    migrate_identity(engine)
    store = IdentityLogStore(engine)
    resolver = GraphResolver(store, RULES)
    await resolver.start()
    try:
        yield store, resolver
    finally:
        await resolver.stop()
        engine.dispose()


def log_text(store: IdentityLogStore) -> str:
    return "\n".join(raw.decode() for _, _, raw in store.all_rows())


async def scenario(db: str, seed: int, steps: int) -> None:
    async with opened(db) as (store, resolver):
        rnd = random.Random(seed)
        await build(resolver, rnd, steps)
        if not len(resolver.graphs["t"]):
            return
        person, uids = await erase(resolver, rnd)
        erased = replayed(store)
        others = set(erased.nodes())
        first = await resolver.redact("t", sorted(person))
        after = replayed(store)
        # everyone else: the same persons, IDs, links and review items; the person is gone
        assert view(after, others) == view(erased, others)
        assert set(after.nodes()) == others
        assert rebuild(store.all_rows(), RULES).consistent
        # this replica answers the same for everyone else before and after its graph is
        # rebuilt in the background, and is then the replay of the redacted log
        assert view(resolver.graphs["t"], others) == view(after, others)
        await resolver.rebuilt()
        assert view(resolver.graphs["t"], others) == view(after, others)
        assert resolver.graphs["t"].state() == after.state()
        # the log names none of the person's strings (IDs still held by someone else aside)
        text = log_text(store)
        assert not [n for n in person if n in text]
        live = {after.unified_id(n) for n in others}
        assert not [u for u in uids if u in text and u not in live and after.resolve_alias(u) not in live]
        assert first.updates or not person
        # idempotent: a second run (a resume after a crash) finds nothing to rename
        again = await resolver.redact("t", sorted(person))
        assert again.updates == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(5, 60))
def test_redaction_keeps_everyone_elses_replay_on_sqlite(
    tmp_path_factory: pytest.TempPathFactory, seed: int, steps: int
) -> None:
    db = tmp_path_factory.mktemp("redact") / "identity.sqlite3"
    asyncio.run(scenario(f"sqlite:///{db}", seed, steps))


def test_redaction_of_a_merged_then_split_person(tmp_path: Path) -> None:
    """A merge with someone else, a split, a refusal and a quarantine naming both people:
    only the erased person's strings change, the other keeps their ID and links."""

    async def run() -> None:
        async with opened(f"sqlite:///{tmp_path / 'identity.sqlite3'}") as (store, resolver):
            p, q = ["user_id:k1.P", "anonymous_id:k1.pa"], ["user_id:k1.Q", "anonymous_id:k1.qa"]
            for i, nodes in enumerate(
                [p, q, ["anonymous_id:k1.pa", "anonymous_id:k1.qa"], ["user_id:k1.P", "user_id:k1.Q"]]
            ):
                await resolver.resolve_batch("t", [[ident(n) for n in nodes]], [True], [("s", f"e{i}")])
            await resolver.unlink("t", "anonymous_id:k1.pa", "anonymous_id:k1.qa")
            graph = resolver.graphs["t"]
            q_id = graph.unified_id("user_id:k1.Q")
            for node in p:
                await resolver.remove("t", node)
            before = view(replayed(store), set(q))
            plan = await resolver.redact("t", p)
            assert plan.identifiers == 2 and plan.updates
            assert view(replayed(store), set(q)) == before
            assert replayed(store).unified_id("user_id:k1.Q") == q_id
            text = log_text(store)
            assert "k1.P" not in text and "k1.pa" not in text and "erased:" in text

    asyncio.run(run())


def test_redacted_log_converges_on_a_second_postgres_replica(pg_schema: PostgresSchema) -> None:
    """Two replicas on one PostgreSQL log: one erases and redacts a person; a replica
    started afterwards replays the redacted log to the same graph as the first one."""

    async def run() -> None:
        engine = make_engine(pg_schema.url)
        migrate_identity(engine)
        first = GraphResolver(IdentityLogStore(engine), RULES)
        await first.start()
        other = GraphResolver(IdentityLogStore(engine), RULES)
        await other.start()
        try:
            rnd = random.Random(7)
            await build(first, rnd, 40)
            await build(other, rnd, 20)
            await first.catch_up()
            person, _ = await erase(first, rnd)
            await first.redact("t", sorted(person))
            later = GraphResolver(IdentityLogStore(engine), RULES)
            await later.start()
            try:
                await other.catch_up()
                nodes = set(first.graphs["t"].nodes())
                assert not person & nodes
                assert view(later.graphs["t"], nodes) == view(first.graphs["t"], nodes)
                assert view(other.graphs["t"], nodes) == view(first.graphs["t"], nodes)
                assert not [n for n in person if n in log_text(first.store)]
            finally:
                await later.stop()
        finally:
            await other.stop()
            await first.stop()
            engine.dispose()

    asyncio.run(run())


def test_a_redaction_that_would_change_the_replay_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite is replayed before it commits: when the replay differs (here: a
    renaming that forgets the erasure records' tombstones), nothing is written."""

    async def run() -> None:
        async with opened(f"sqlite:///{tmp_path / 'identity.sqlite3'}") as (store, resolver):
            nodes = ["user_id:k1.P", "anonymous_id:k1.pa"]
            await resolver.resolve_batch("t", [[ident(n) for n in nodes]], [True], [("s", "e1")])
            for node in nodes:
                await resolver.remove("t", node)
            before = log_text(store)
            real = redaction.rename
            monkeypatch.setattr(
                redaction,
                "rename",
                lambda v, names: (
                    v if isinstance(v, dict) and v.get("kind") == "NodeRemoved" else real(v, names)
                ),
            )
            with pytest.raises(redaction.RedactionUnsafe):
                await resolver.redact("t", nodes)
            assert log_text(store) == before

    asyncio.run(run())


ODD = [
    'user_id:k1.q"uote',
    "user_id:k1.back\\slash",
    "email:k1.per%cent",
    "device_id:k1.under_score",
    "anonymous_id:k1.非ASCII",
    "phone:k1.p_ct",
]


def closure(rows: list[tuple[int, bytes]], nodes: set[str]) -> list[int]:
    """The history of ``nodes`` the slow way: decode every record, grow until closed."""
    decoded = [(seq, redaction.names_in(redaction._decode(raw))) for seq, raw in rows]
    names, found = set(nodes), set()
    while True:
        more = {seq for seq, named in decoded if named & names} - found
        if not more:
            return sorted(found)
        found |= more
        names |= {n for seq, named in decoded if seq in more for n in named}


async def history_matches_a_full_decode(db: str, seed: int) -> None:
    async with opened(db) as (store, resolver):
        rnd = random.Random(seed)
        universe = [*UNIVERSE, *ODD]
        for i in range(80):
            nodes = rnd.sample(universe, rnd.randint(1, 3))
            await resolver.resolve_batch("t", [[ident(n) for n in nodes]], [True], [("src", f"e{i}")])
            if rnd.random() < 0.1 and (links := sorted((a, b) for a, b, _ in resolver.graphs["t"].edges())):
                await resolver.unlink("t", *rnd.choice(links))
        rows = [(seq, raw) for seq, _, raw in store.all_rows()]
        for node in [*ODD, *rnd.sample(UNIVERSE, 3)]:
            found = redaction.history(lambda needles: store.naming(None, "t", needles), [node])
            assert [seq for seq, _ in found] == closure(rows, {node}), node
            assert all(raw == dict(rows)[seq] for seq, raw in found)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_history_finds_what_a_full_decode_finds_on_sqlite(tmp_path: Path, seed: int) -> None:
    """The database search for a person's history (odd characters in node strings: JSON
    escapes, LIKE wildcards, non-ASCII) finds exactly the records a decode of the whole log
    finds, transitively."""
    asyncio.run(history_matches_a_full_decode(f"sqlite:///{tmp_path / 'identity.sqlite3'}", seed))


def test_history_finds_what_a_full_decode_finds_on_postgres(pg_schema: PostgresSchema) -> None:
    asyncio.run(history_matches_a_full_decode(pg_schema.url, 4))


def test_changes_made_while_the_graph_is_rebuilt_are_kept(tmp_path: Path) -> None:
    """After a redaction this replica replays the log in the background; links decided
    while that replay runs are in the graph it swaps in, which is the log's replay."""

    async def run() -> None:
        async with opened(f"sqlite:///{tmp_path / 'identity.sqlite3'}") as (store, resolver):
            replaying, release = threading.Event(), threading.Event()
            real = resolver._replayed

            def held(rows: Any) -> Any:
                replaying.set()
                release.wait(30)
                return real(rows)

            resolver._replayed = held  # type: ignore[method-assign]
            try:
                p = ["user_id:k1.P", "anonymous_id:k1.pa"]
                await resolver.resolve_batch("t", [[ident(n) for n in p]], [True], [("s", "e1")])
                for node in p:
                    await resolver.remove("t", node)
                await resolver.redact("t", p)
                assert await asyncio.to_thread(replaying.wait, 30)
                later = ["user_id:k1.Q", "anonymous_id:k1.qa"]
                await resolver.resolve_batch("t", [[ident(n) for n in later]], [True], [("s", "e2")])
                q_id = resolver.graphs["t"].unified_id("user_id:k1.Q")
                release.set()
                await resolver.rebuilt()
                graph = resolver.graphs["t"]
                assert graph.unified_id("anonymous_id:k1.qa") == q_id
                assert graph.state() == replayed(store).state()
                assert "k1.P" not in log_text(store)
            finally:
                release.set()

    asyncio.run(run())
