"""The identity map: unified-ID intervals per identifier, replayed from the change log,
and its Parquet export in a destination's pseudonym domain (through the CLI on a real
gateway's log)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
import pytest

from identity.graph import GraphChange, IdentityGraph, Provenance
from identity.identity_map import identity_map
from tests.conftest import IDGATE, SHOP_SERVER_KEY, make_gateway, mid

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(s: int) -> datetime:
    return T0 + timedelta(seconds=s)


def test_intervals_follow_merges_splits_and_erasure() -> None:
    ids = iter(f"p_{n:022d}" for n in range(100))
    graph = IdentityGraph(node_id=lambda _n: next(ids))
    log: list[GraphChange] = []

    def resolve(nodes: list[str], s: int) -> str:
        uid, changes = graph.resolve(nodes, link=True, provenance=Provenance("web", f"e{s}", at(s), "event"))
        log.extend(changes)
        return uid

    first = resolve(["anonymous_id:k1.a", "user_id:k1.u"], 1)  # a person (a is born first: its ID)
    resolve(["anonymous_id:k1.b"], 2)  # another, then merged into the first
    assert resolve(["anonymous_id:k1.b", "user_id:k1.u"], 3) == first
    log.extend(graph.unlink("anonymous_id:k1.a", "user_id:k1.u", at=at(4)))  # u and b split off a
    log.extend(graph.remove("anonymous_id:k1.b", at=at(5)))  # b erased
    rows = [(i, "shop", msgspec.json.encode(c)) for i, c in enumerate(log, 1)]
    got = {(i.node, i.valid_from, i.valid_to): i.unified_id for i in identity_map(rows, "shop")}
    assert graph.unified_id("anonymous_id:k1.a") == first  # the part with the oldest node keeps the ID
    u_now = graph.unified_id("user_id:k1.u")
    assert u_now is not None and u_now != first
    second = "p_" + "2".zfill(22)
    assert got == {
        ("anonymous_id:k1.a", at(1), None): first,
        ("user_id:k1.u", at(1), at(4)): first,
        ("user_id:k1.u", at(4), None): u_now,
        ("anonymous_id:k1.b", at(2), at(3)): second,
        ("anonymous_id:k1.b", at(3), at(4)): first,
        ("anonymous_id:k1.b", at(4), at(5)): u_now,
    }
    assert identity_map(rows, "other-tenant") == []


@pytest.mark.slow
def test_export_map_cli_joins_with_what_the_destination_received(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path).start()
    try:
        # the shop's backend tells idgate about each login (a server source)
        with gw.client(SHOP_SERVER_KEY) as c:
            for anon in ("anon-1", "anon-2"):
                r = c.post("/v1/identify", json={"anonymousId": anon, "userId": "user-7", "messageId": mid()})
                assert r.status_code == 200
            last = mid()
            c.post("/v1/track", json={"userId": "user-7", "event": "Paid", "messageId": last})
        [event] = gw.wait_for_sink({last}, "warehouse")
        env = {**gw.env, "IDGATE_DATA_DIR": str(gw.data_dir)}
        out = tmp_path / "map.parquet"
        args = ["identity", "export-map", "--tenant", "shop", "--destination", "warehouse", "--out", str(out)]
        done = subprocess.run(
            [str(IDGATE), *args, "--config", str(gw.config_path)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "wrote 3 rows" in done.stdout
        table = pq.read_table(out).to_pylist()
        assert {r["id_type"] for r in table} == {"anonymous_id", "user_id"}
        assert all(r["valid_to"] is None for r in table)
        # the map speaks the destination's domain: it joins with the events it received
        assert {r["unified_id"] for r in table} == {event["context"]["unified_id"]}
        assert event["userId"] in {r["pseudonym"] for r in table}
        # another destination's domain gives other values
        other = tmp_path / "stream.parquet"
        args[5], args[7] = "stream", str(other)
        subprocess.run([str(IDGATE), *args, "--config", str(gw.config_path)], env=env, check=True)
        assert not {r["pseudonym"] for r in pq.read_table(other).to_pylist()} & {
            r["pseudonym"] for r in table
        }
        bad = subprocess.run(
            [str(IDGATE), *args[:5], "nowhere", "--out", str(other), "--config", str(gw.config_path)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "no destination 'nowhere'" in bad.stderr
    finally:
        gw.stop()
