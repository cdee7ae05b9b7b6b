"""The suppression list (consent.suppression) in both consent state stores, SQLite and Redis:
a deletion's ``suppressed`` step flags every identifier it names; a later grant naming a
person-level identifier (only a server source or an identity assertion can record one)
clears the flag of every identifier it names; a device-only grant, a withdrawal or an
earlier grant replayed late clears nothing; a second deletion flags again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consent.db import migrate_consent
from consent.state import RecordView, RedisConsentState, SqlConsentState
from consent.suppression import SUPPRESSED_STEP
from identity.db import make_engine
from identity.redis_client import open_async_redis
from tests.conftest import RedisNamespace


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis_ns", marks=pytest.mark.redis),
        pytest.param("cluster_ns", marks=pytest.mark.redis),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'consent.sqlite3'}")
        migrate_consent(engine)
        yield SqlConsentState(engine)
        engine.dispose()
        return
    # one server answers the check with one script; a cluster with one HGET per key
    ns: RedisNamespace = request.getfixturevalue(request.param)
    client = open_async_redis(ns.url)
    yield RedisConsentState(client, prefix=ns.prefix)


def suppressed(seq: int, *nodes: str) -> RecordView:
    return RecordView(
        seq=seq,
        tenant="t",
        record_type="rights_request",
        identifiers=nodes,
        purposes=(),
        state="requested",
        detail={"request_id": "dsr-1", "event": "step", "step": SUPPRESSED_STEP},
    )


def consent(seq: int, state: str, *nodes: str) -> RecordView:
    return RecordView(
        seq=seq, tenant="t", record_type="consent", identifiers=nodes, purposes=("analytics",), state=state
    )


def test_the_suppression_list_is_set_and_lifted_by_the_ledger_records(store: Any) -> None:
    user, web, app, other = "user_id:k1.u", "anonymous_id:k1.w", "anonymous_id:k1.a", "user_id:k1.o"
    values = ["k1.u", "k1.w", "k1.a", "k1.o"]

    async def erased() -> set[str]:
        return set(await store.erased("t", values))

    async def go() -> None:
        await store.apply([consent(1, "given", user, web, app), consent(2, "given", other)])
        assert await erased() == set()
        await store.apply([suppressed(3, user, web, app)])
        assert await erased() == {"k1.u", "k1.w", "k1.a"}
        # withdrawals and device-only grants (a client may record those) lift nothing
        await store.apply([consent(4, "withdrawn", user, web), consent(5, "given", app)])
        assert await erased() == {"k1.u", "k1.w", "k1.a"}
        # an older grant applied late (a reconcile) loses to the later flag
        await store.apply([consent(1, "given", user, web, app)])
        assert await erased() == {"k1.u", "k1.w", "k1.a"}
        # the person registers again: the backend's grant names the user id and one device
        await store.apply([consent(6, "given", user, web)])
        assert await erased() == {"k1.a"}
        # the purposes' own state is untouched by the flags
        state = await store.lookup("t", ["k1.u"])
        assert state["k1.u"]["analytics"].state == "given" and state["k1.u"]["analytics"].seq == 6
        # a second deletion flags again
        await store.apply([suppressed(7, user, web)])
        assert await erased() == {"k1.u", "k1.w", "k1.a"}

    asyncio.run(go())
