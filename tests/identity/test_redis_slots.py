"""On a Redis Cluster every script and MULTI of idgate takes keys of one hash slot (the
cluster refuses anything else); on one server the key names are the ones they always were.
Keys are built by the stores themselves, with a cluster client that is never connected."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from consent.state import RedisConsentState
from export.dedupe import RedisDedupe, redis_dedupe_key
from export.kpis import RedisKpiStore
from export.redis_outbox import RedisStreamOutbox
from export.stream_sinks import RedisStreamSink
from gateway.rate_limits import RedisCounters
from identity.redis_client import hash_tag, is_cluster_url, key_slot, slot_groups

TENANTS = ("shop", "mall", "t-3")
PERSONS = ("k1.aaaa", "k1.bbbb", "k2.cccc", "k1.dddd")


def one_slot(keys: list[str]) -> bool:
    return len({key_slot(k) for k in keys}) == 1


@pytest.fixture
def cluster() -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=1)  # never connected: key names only


def test_outbox_scripts_and_commit_take_the_stream_slot(cluster: RedisCluster) -> None:
    dedupe = RedisDedupe(cluster, window_seconds=60, prefix="p:dedupe")
    outbox = RedisStreamOutbox(cluster, prefix="p", replica="r1", dedupe=dedupe)
    outbox.destinations.update({"warehouse", "stream", "mall-ads"})
    queue = outbox.queue("warehouse")
    keys = [
        outbox.stream,
        *outbox._counter_keys(),
        outbox.received_at_key("warehouse"),
        queue._files_key,
        queue._persons_key,
    ]
    assert one_slot(keys), keys
    # one server: the names of before
    single = RedisStreamOutbox(Redis(port=1), prefix="p", replica="r1", dedupe=dedupe)
    assert (single.stream, single.acked_key("w"), single.received_at_key("w")) == (
        "p:outbox",
        "p:outbox:acked:w",
        "p:received-at:w",
    )


def test_dedupe_claims_of_one_source_share_a_slot_and_sources_spread() -> None:
    for source in ("shop-web", "mall-app", "mall-mp"):
        assert one_slot([redis_dedupe_key(source, f"m-{i}", "p:dedupe") for i in range(50)])
    slots = {key_slot(redis_dedupe_key(s, "m", "p:dedupe")) for s in ("shop-web", "mall-app", "mall-mp")}
    assert len(slots) == 3


@pytest.mark.parametrize("tenant", TENANTS)
def test_kpi_multi_key_commands_take_one_slot(cluster: RedisCluster, tenant: str) -> None:
    store = RedisKpiStore(cluster, "p", retention_buckets=60, bucket_seconds=60)
    for kpi in ("uv_home", "cart_persons"):
        hlls = [store._hll(tenant, b, kpi, s) for b in range(100, 160) for s in ("web", "app", "*")]
        tops = [store._top(tenant, b, kpi, s) for b in range(100, 160) for s in ("web", "*")]
        assert one_slot(hlls) and one_slot(tops)
    days = [store._seen(tenant, d) for d in range(10, 40)]
    assert one_slot([*days, f"p:kpi:seen-before:{hash_tag(True, tenant)}:40"])
    # KPIs of different tenants and KPIs spread
    assert len({key_slot(store._hll(t, 1, k, "web")) for t in TENANTS for k in ("a", "b", "c")}) > 3
    single = RedisKpiStore(Redis(port=1), "p", retention_buckets=60, bucket_seconds=60)
    assert single._hll(tenant, 7, "uv", "web") == f"p:kpi:hll:{tenant}:uv:web:7"


@pytest.mark.parametrize("tenant", TENANTS)
def test_rate_limit_scripts_take_one_slot_per_tenant(cluster: RedisCluster, tenant: str) -> None:
    # the keys the limiter builds (gateway.rate_limits.RateLimiter), through the store's naming
    counters = RedisCounters(cluster, "p")
    hits = [f"{{{tenant}}}:src:web:req", f"{{{tenant}}}:ip:10.0.0.0:ev", f"{{{tenant}}}:consent:k1.a"]
    assert one_slot([f"{counters.prefix}:rl:{h}:123" for h in hits])
    assert one_slot([f"{counters.prefix}:rl:pace:{h}" for h in hits])  # the paced per-second keys
    assert one_slot([f"p:rl:ids:{{{tenant}}}:{p}:9" for p in PERSONS])


def test_consent_apply_runs_once_per_slot(cluster: RedisCluster) -> None:
    state = RedisConsentState(cluster, prefix="p")
    assert state.cluster
    keys = [state._key(t, p) for t in TENANTS for p in PERSONS] * 2
    groups = slot_groups(True, keys)
    assert sorted(i for g in groups for i in g) == list(range(len(keys)))
    for g in groups:
        assert one_slot([keys[i] for i in g])
    assert len(groups) > 1  # persons spread over slots
    assert slot_groups(False, keys) == [list(range(len(keys)))]


def test_stream_sink_keys_share_the_stream_slot() -> None:
    sink = RedisStreamSink("dest", url="redis+cluster://127.0.0.1:7000", stream="events", key_prefix="p:sink")
    assert one_slot([sink.stream, *(sink.dedupe_key(f"m-{i}") for i in range(50))])


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("rediss+cluster://h:7000")
    assert not is_cluster_url("redis://h:6379/0")


def test_a_cluster_url_naming_another_database_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import Settings, SettingsError

    monkeypatch.setenv("IDGATE_ENV", "dev")
    monkeypatch.setenv("REDIS_URL", "redis+cluster://127.0.0.1:7000/9")
    with pytest.raises(SettingsError, match="REDIS_URL: a Redis Cluster has only database 0"):
        Settings.from_env()
    monkeypatch.setenv("REDIS_URL", "redis+cluster://127.0.0.1:7000/0")
    assert Settings.from_env().redis_url == "redis+cluster://127.0.0.1:7000/0"
