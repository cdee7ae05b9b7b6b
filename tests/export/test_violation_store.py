"""The violation store's behaviour, one suite run against every backend: SQLite (embedded),
Redis and a Redis Cluster (distributed, shared by the replicas). Records round-trip, a
retried message id replaces its record, deletions count each record once (two replicas
deleting one record at once included), a person's records are found and purged, retention
expires by received time; Redis refuses new records past its bound and says which."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from export.violations import (
    PlanFinding,
    RedisViolations,
    SqliteViolations,
    ViolationRecord,
    ViolationStore,
    move_records,
)
from identity.identifiers import Identifier
from identity.redis_client import key_slot, open_redis
from tests.conftest import RedisNamespace

BACKENDS = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
]


def _open(kind: str, request: pytest.FixtureRequest, max_records: int = 100_000) -> ViolationStore:
    if kind == "sqlite":
        tmp = request.getfixturevalue("tmp_path")
        return SqliteViolations(tmp / "violations.sqlite3")
    ns: RedisNamespace = request.getfixturevalue("redis_ns" if kind == "redis" else "cluster_ns")
    return RedisViolations(open_redis(ns.url), ns.prefix, max_records=max_records)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[ViolationStore]:
    opened = _open(request.param, request)
    yield opened
    opened.close()


def record(
    message_id: str,
    *,
    tenant: str = "shop",
    source: str = "shop-web",
    event: str = "product_added",
    received_at_ms: int = 1_700_000_000_000,
    pseudonyms: tuple[str, ...] = (),
    identifiers: tuple[Identifier, ...] = (),
    unproven: tuple[Identifier, ...] = (),
    action: str = "kept",
    payload: bytes = b'{"type":"track","event":"Product Added"}',
) -> ViolationRecord:
    return ViolationRecord(
        tenant=tenant,
        source=source,
        message_id=message_id,
        event=event,
        plan_version=3,
        received_at_ms=received_at_ms,
        findings=(PlanFinding("type", "properties.price", "must satisfy type: 'number'"),),
        payload=payload,
        identifiers=identifiers,
        unproven=unproven,
        pseudonyms=pseudonyms,
        server=True,
        action=action,
    )


def test_records_round_trip_in_order_with_filters_and_counts(store: ViolationStore) -> None:
    ident = (Identifier("user_id", "p_user"),)
    kept = [
        record("m-1", identifiers=ident, unproven=(Identifier("phone", "p_phone"),), pseudonyms=("p_a",)),
        record("m-2", event="unplanned"),
        record("m-3", action="omitted"),
        record("m-4", tenant="mall", source="mall-web"),
    ]
    assert list(store.keep(kept)) == []
    listed = store.list("shop")
    assert [r.message_id for r in listed] == ["m-1", "m-2", "m-3"]
    first = listed[0]
    assert first.id and first.kept_at_ms > 0
    stripped = ViolationRecord(**{**_fields(first), "id": "", "kept_at_ms": 0})
    assert stripped == kept[0]  # every field as kept: findings, payload, identifiers, flags
    assert store.get(first.id) == first
    assert [r.message_id for r in store.list("shop", event="unplanned")] == ["m-2"]
    assert [r.message_id for r in store.list("shop", action="omitted")] == ["m-3"]
    assert [r.message_id for r in store.list("shop", limit=2)] == ["m-1", "m-2"]
    assert store.counts("shop") == {"product_added": 2, "unplanned": 1}
    assert store.counts() == {"product_added": 3, "unplanned": 1}
    assert {r.message_id for r in store.list()} == {"m-1", "m-2", "m-3", "m-4"}
    assert store.list("nobody") == [] and store.counts("nobody") == {}


def _fields(r: ViolationRecord) -> dict[str, object]:
    return {f: getattr(r, f) for f in r.__struct_fields__}


def test_a_retried_message_id_replaces_its_record_under_the_same_id(store: ViolationStore) -> None:
    store.keep([record("m-1"), record("m-2")])
    before = {r.message_id: r.id for r in store.list("shop")}
    store.keep([record("m-1", event="unplanned", payload=b'{"v":2}')])
    after = store.list("shop")
    assert {r.message_id: r.id for r in after} == before
    assert store.get(before["m-1"]) is not None
    assert store.get(before["m-1"]).payload == b'{"v":2}'  # type: ignore[union-attr]
    assert store.counts("shop") == {"product_added": 1, "unplanned": 1}  # moved, not added
    # the same message id from another source is another record
    store.keep([record("m-1", source="shop-app")])
    assert len(store.list("shop")) == 3


def test_deletions_count_each_record_once(store: ViolationStore) -> None:
    store.keep([record(f"m-{i}") for i in range(40)])
    ids = [r.id for r in store.list("shop", limit=100)]
    assert store.delete(ids[:2]) == 2
    assert store.delete(ids[:2]) == 0  # already gone
    assert store.get(ids[0]) is None
    # two replicas deleting the same records at once (a replay on each): counted once in all
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(store.delete(ids[2:]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 38
    assert store.list("shop") == [] and store.counts("shop") == {}
    # a deleted message id kept again is a new record
    store.keep([record("m-0")])
    assert [r.message_id for r in store.list("shop")] == ["m-0"]


@pytest.mark.parametrize("missing", ["abc", "0", "²", "99999999999999999999999", "", "shop.", ".1", "shop.x"])
def test_ids_that_name_no_record(store: ViolationStore, missing: str) -> None:
    store.keep([record("m-1")])
    assert store.get(missing) is None
    assert store.delete([missing]) == 0
    assert len(store.list("shop")) == 1


def test_a_persons_records_are_found_and_purged_and_no_one_elses(store: ViolationStore) -> None:
    store.keep(
        [
            record("by-pseudonym", pseudonyms=("p_me",)),
            record("by-identifier", identifiers=(Identifier("user_id", "p_me"),)),
            record("by-unproven", unproven=(Identifier("anonymous_id", "p_device"),)),
            record("someone-else", pseudonyms=("p_other",)),
            record("other-tenant", tenant="mall", source="mall-web", pseudonyms=("p_me",)),
        ]
    )
    mine = {"p_me", "p_device"}
    found = {r.message_id for r in store.find_person("shop", mine)}
    assert found == {"by-pseudonym", "by-identifier", "by-unproven"}
    assert len(store.find_person("shop", mine, limit=2)) == 2
    assert store.purge_person("shop", mine) == 3
    assert store.purge_person("shop", mine) == 0
    assert [r.message_id for r in store.list("shop")] == ["someone-else"]
    assert [r.message_id for r in store.list("mall")] == ["other-tenant"]
    assert store.counts("shop") == {"product_added": 1}


def test_retention_expires_records_received_before_the_cutoff(store: ViolationStore) -> None:
    store.keep([record(f"m-{ms}", received_at_ms=ms) for ms in (1_000, 2_000, 3_000)])
    store.keep([record("mall-old", tenant="mall", received_at_ms=1_000)])
    assert store.expire("shop", 2_000, apply=False) == 1  # strictly before
    assert store.expire("shop", 3_000, apply=False) == 2
    assert len(store.list("shop")) == 3  # counting deletes nothing
    assert store.expire("shop", 3_000, apply=True) == 2
    assert [r.message_id for r in store.list("shop")] == ["m-3000"]
    assert store.expire("shop", 3_000, apply=True) == 0
    assert len(store.list("mall")) == 1  # another tenant's
    assert store.counts("shop") == {"product_added": 1}


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_redis_refuses_new_records_past_its_bound_and_says_which(
    kind: str, request: pytest.FixtureRequest
) -> None:
    store = _open(kind, request, max_records=3)
    try:
        assert list(store.keep([record(f"m-{i}") for i in range(2)])) == []
        refused = store.keep([record("m-2"), record("m-3"), record("m-0", event="unplanned")])
        assert [r.message_id for r in refused] == ["m-3"]  # m-0 replaced its record: no new one
        assert sorted(r.message_id for r in store.list("shop")) == ["m-0", "m-1", "m-2"]
        assert store.counts("shop") == {"product_added": 2, "unplanned": 1}
        assert list(store.keep([record("m-9", tenant="mall")])) == []  # the bound is per tenant
        store.delete([store.list("shop")[0].id])
        assert list(store.keep([record("m-3")])) == []  # room again
    finally:
        store.close()


@pytest.mark.redis
def test_on_a_cluster_a_tenants_keys_share_a_slot_and_tenants_spread(cluster_ns: RedisNamespace) -> None:
    """Each script touches one tenant's keys (one slot); tenants land on several masters, and
    listing or counting every tenant reads them all."""
    client = open_redis(cluster_ns.url)
    store = RedisViolations(client, cluster_ns.prefix)
    try:
        tenants = [f"t{i}" for i in range(12)]
        for t in tenants:
            assert len({key_slot(k) for k in store._keys(t)}) == 1
        masters = {client.get_node_from_key(store._keys(t)[0]).name for t in tenants}
        assert len(masters) >= 2  # the test means something: the tenants are spread
        for i, t in enumerate(tenants):
            store.keep([record(f"m-{j}", tenant=t) for j in range(i + 1)])
        assert store.counts() == {"product_added": sum(range(1, 13))}
        assert len(store.list(limit=1000)) == sum(range(1, 13))
        assert store.purge_person("t3", {"p_nobody"}) == 0
        assert store.expire("t11", 2_000_000_000_000, apply=True) == 12
    finally:
        store.close()


@pytest.mark.redis
def test_a_replicas_own_records_move_into_the_shared_store(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """A replica joining the distributed mode brings the records its file held: kept in
    Redis before they leave the file; what the shared store refuses (its bound) stays."""
    own = SqliteViolations(tmp_path / "violations.sqlite3")
    shared = RedisViolations(open_redis(redis_ns.url), redis_ns.prefix, max_records=7)
    try:
        own.keep([record(f"m-{i}", pseudonyms=(f"p_{i}",)) for i in range(5)])
        own.keep([record("mall-1", tenant="mall", source="mall-web")])
        assert move_records(own, shared, page=2) == (6, 0)
        assert own.list() == []
        moved = shared.list("shop")
        assert [r.message_id for r in moved] == [f"m-{i}" for i in range(5)]
        assert moved[3].pseudonyms == ("p_3",) and len(shared.list("mall")) == 1
        own.keep([record(f"n-{i}") for i in range(4)])
        assert move_records(own, shared, page=2) == (2, 2)  # shop is at 7 now
        assert [r.message_id for r in own.list()] == ["n-2", "n-3"]
    finally:
        own.close()
        shared.close()
