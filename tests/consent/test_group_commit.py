"""Group commit of ledger appends (consent.group_commit), on SQLite and PostgreSQL.

Concurrent appends are chained in the order they were queued, in groups of one transaction;
whatever groups they fall in, the chain and checkpoints verify. A draft that cannot be a
record fails only its caller; a transaction that fails fails only the callers of its group.
Over HTTP: many concurrent ``POST /v1/consent`` make one valid chain on both backends, and an
acknowledged grant survives a kill -9 right after its 2xx.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from consent.group_commit import Appended, GroupCommitFailed, GroupCommitter
from consent.ledger import AppendedRecord, AppendRefused, InvalidRecord, Ledger, verify_database
from identity.db import make_engine
from tests.conftest import WEB_KEY, Gateway, backend_env, make_gateway

CALLS = 60


def test_concurrent_appends_are_chained_in_queue_order_in_few_transactions(
    ledger: Ledger, make_draft: Callable[..., Any]
) -> None:
    committer = GroupCommitter(ledger)

    async def main() -> list[Appended]:
        calls = [
            committer.append(
                [make_draft(subject=f"k1.s{i}"), make_draft(subject=f"k1.s{i}", purposes=["ads"])]
            )
            for i in range(CALLS)
        ]
        try:
            return await asyncio.gather(*calls)
        finally:
            await committer.close()

    results = asyncio.run(main())
    seqs = [[r.seq for r in a.records] for a in results]
    # queue order is call order; each caller's records are consecutive
    assert [s for pair in seqs for s in pair] == list(range(1, 2 * CALLS + 1))
    assert all(a.records[0].subject == f"k1.s{i}" for i, a in enumerate(results))
    assert committer.groups < CALLS and committer.largest_group > 1  # grouped, not one by one
    assert ledger.count() == 2 * CALLS
    result = verify_database(ledger)
    assert result.ok, result
    # a checkpoint falls due at most once per group and covers all of it
    assert ledger.checkpoints()[-1].to_seq == 2 * CALLS


def test_a_bad_draft_fails_only_its_caller(ledger: Ledger, make_draft: Callable[..., Any]) -> None:
    committer = GroupCommitter(ledger)

    async def main() -> list[Appended | BaseException]:
        calls = [committer.append([make_draft(subject=f"k1.s{i}")]) for i in range(10)]
        calls.insert(5, committer.append([make_draft(subject="k1.bad", detail={"not json": {1, 2}})]))
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await committer.close()

    results = asyncio.run(main())
    assert isinstance(results[5], InvalidRecord)
    good = [r for i, r in enumerate(results) if i != 5]
    assert all(isinstance(r, Appended) for r in good)
    assert ledger.count() == 10
    assert verify_database(ledger).ok


def test_a_failed_transaction_fails_only_the_callers_of_its_group(
    ledger: Ledger, make_draft: Callable[..., Any]
) -> None:
    """A write in the group's transaction fails (as a constraint or the disk would): its
    callers get GroupCommitFailed and none of their records is stored; the other groups,
    before and after, are committed and chain on."""

    def in_transaction(conn: sa.Connection, prev: int, per_call: list[list[AppendedRecord]]) -> list[bool]:
        if any(r.subject == "k1.poison" for records in per_call for r in records):
            raise RuntimeError("the disk said no")
        return [True] * len(per_call)

    committer = GroupCommitter(ledger, in_transaction=in_transaction, max_group_records=5)

    async def main() -> tuple[Appended, list[Appended | BaseException], Appended]:
        before = await committer.append([make_draft(subject="k1.before")])
        calls = [committer.append([make_draft(subject=f"k1.s{i}")]) for i in range(20)]
        calls.insert(10, committer.append([make_draft(subject="k1.poison")]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        after = await committer.append([make_draft(subject="k1.after")])
        await committer.close()
        return before, results, after

    before, results, after = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert isinstance(results[10], GroupCommitFailed)
    assert "nothing of this call was recorded" in str(results[10])
    assert all(isinstance(f, GroupCommitFailed) for f in failed)
    # groups of 5 in queue order: the poison's group is calls 10..14, and only it failed
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == list(range(10, 15))
    stored = {r.subject for r in ledger.records(limit=1000)}
    committed = {r.records[0].subject for r in results if isinstance(r, Appended)}
    assert stored == committed | {"k1.before", "k1.after"}
    assert "k1.poison" not in stored
    assert after.records[0].seq == ledger.last_seq() == len(stored)
    assert before.records[0].seq == 1
    assert verify_database(ledger).ok


# -- over HTTP --------------------------------------------------------------------------------

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def ledger_of(gw: Gateway, env: dict[str, str]) -> tuple[Ledger, sa.Engine]:
    url = env.get("DATABASE_URL") or f"sqlite:///{gw.data_dir / 'consent.sqlite3'}"
    engine = make_engine(url)
    return Ledger(engine, None), engine


async def post_grants(gw: Gateway, subjects: list[str], concurrency: int = 32) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=gw.url, auth=(WEB_KEY, ""), timeout=30) as client:

        async def one(anonymous_id: str) -> httpx.Response:
            async with limit:
                body = {"anonymousId": anonymous_id, "grant": ["analytics"], "noticeId": "notice-v1"}
                return await client.post("/v1/consent", json=body)

        return await asyncio.gather(*(one(s) for s in subjects))


NOTICE_CONFIG_LINES = """
[[tenants.notices]]
id = "notice-v1"
content_sha256 = "2222222222222222222222222222222222222222222222222222222222222222"
"""


def shop_with_notice() -> str:
    """The test config with a notice for "shop" too (its web source posts the grants)."""
    from tests.conftest import TEST_CONFIG

    head, sep, tail = TEST_CONFIG.partition(
        '[tenants.tracking_plan]\n"*" = ["analytics"]\n\n[tenants.external_id_types]'
    )
    assert sep, "TEST_CONFIG changed: place the shop's notice elsewhere"
    return head + NOTICE_CONFIG_LINES + "\n" + sep + tail


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_consent_calls_make_one_valid_chain(tmp_path: Path, backend: str) -> None:
    with ExitStack() as stack:
        env = backend_env(backend, stack)
        gw = make_gateway(tmp_path, config=shop_with_notice(), extra_env=env).start()
        stack.callback(gw.stop)
        tag = uuid.uuid4().hex[:8]
        subjects = [f"anon-{tag}-{i}" for i in range(300)]
        responses = asyncio.run(post_grants(gw, subjects))
        assert all(r.status_code == 200 for r in responses), [
            r.text for r in responses if r.status_code != 200
        ]
        seqs = [rec["seq"] for r in responses for rec in r.json()["recorded"]]
        assert len(seqs) == len(set(seqs)) == len(subjects)
        ledger, engine = ledger_of(gw, env)
        stack.callback(engine.dispose)
        result = verify_database(ledger)
        assert result.ok, result
        assert {r.seq for r in ledger.records(record_type="consent", limit=10_000)} == set(seqs)
        assert ledger.last_seq() == max(seqs)  # nothing but the notice before them, no gap
        # the grants decide at once: a withdrawal right after is effective at once too
        anonymous_id = subjects[0]
        with gw.client() as c:
            r = c.post("/v1/consent", json={"anonymousId": anonymous_id, "withdraw": ["analytics"]})
            assert r.status_code == 200, r.text
            withdrawal_seq = r.json()["recorded"][0]["seq"]
        assert withdrawal_seq == max(seqs) + 1


@pytest.mark.slow
def test_an_acknowledged_grant_survives_kill_9_right_after_its_2xx(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, config=shop_with_notice()).start()
    try:
        tag = uuid.uuid4().hex[:8]
        responses = asyncio.run(post_grants(gw, [f"anon-{tag}-{i}" for i in range(100)]))
        gw.kill9()  # the moment the last 2xx is in
    finally:
        gw.stop()
    acknowledged = {
        rec["recordId"] for r in responses if r.status_code == 200 for rec in r.json()["recorded"]
    }
    assert len(acknowledged) == 100
    gw.start()  # the gateway comes back on the same data directory
    try:
        ledger, engine = ledger_of(gw, {})
        try:
            stored = {r.record_id for r in ledger.records(record_type="consent", limit=10_000)}
            assert acknowledged <= stored
            assert verify_database(ledger).ok
        finally:
            engine.dispose()
    finally:
        gw.stop()


def _once(ledger: Ledger, token: str) -> Callable[[sa.Connection, Any], None]:
    """A precondition: no record of subject ``k1.once`` with this token yet, neither in the
    ledger nor chained earlier in the same transaction."""

    def check(conn: sa.Connection, rows: Any) -> None:
        pending = any(r["subject"] == "k1.once" and r["detail"].get("token") == token for r in rows)
        if pending or ledger.holds(
            conn, tenant="shop", record_type="consent", subject="k1.once", detail={"token": token}
        ):
            raise AppendRefused(token)

    return check


def test_a_precondition_holds_under_the_lock_within_a_group_and_across_writers(
    ledger: Ledger, database: Any, signer: Any, make_draft: Callable[..., Any]
) -> None:
    """Callers whose precondition fails (a record they must not repeat is there already,
    or chained before them in the same transaction) append nothing and get ``AppendRefused``;
    the others of the group are appended. Two writers (replicas) on one database racing
    the same conditional append: exactly one record."""
    other = Ledger(database.engine(), signer)  # another process's engine (own pool)
    one, two = GroupCommitter(ledger), GroupCommitter(other)

    async def main() -> tuple[list[Any], list[Any]]:
        draft = make_draft(subject="k1.once", detail={"token": "group"})
        calls = []
        for i in range(6):  # queued together: one group, the first conditional call wins
            calls.append(one.append([draft], precondition=_once(ledger, "group")))
            calls.append(one.append([make_draft(subject=f"k1.free{i}")]))
        grouped = await asyncio.gather(*calls, return_exceptions=True)
        racing = make_draft(subject="k1.once", detail={"token": "race"})
        raced = await asyncio.gather(
            *(
                committer.append([racing], precondition=_once(lg, "race"))
                for _ in range(4)
                for committer, lg in ((one, ledger), (two, other))
            ),
            return_exceptions=True,
        )
        await one.close()
        await two.close()
        return grouped, raced

    grouped, raced = asyncio.run(main())
    conditional, free = grouped[0::2], grouped[1::2]
    assert isinstance(conditional[0], Appended) and len(conditional[0].records) == 1
    assert all(isinstance(r, AppendRefused) for r in conditional[1:]), conditional
    assert all(isinstance(r, Appended) and len(r.records) == 1 for r in free), free
    assert sum(isinstance(r, Appended) for r in raced) == 1, raced
    assert all(isinstance(r, (Appended, AppendRefused)) for r in raced), raced
    assert [r.detail["token"] for r in ledger.records(subject="k1.once")] == ["group", "race"]
    assert ledger.count() == 8
    result = verify_database(ledger)
    assert result.ok, result
