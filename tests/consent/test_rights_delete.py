"""Deletion that stays deleted (issue 13), over real HTTP against a real `idgate serve`, on
SQLite and on PostgreSQL+Redis: canary identifiers of one person are sent to a JSONL sink, a
Parquet sink and a webhook (whose receiver is down, so the person's event is dead-lettered,
and later the deletion notice too); a delete request then reaches every store; a scan of
every file, table, Redis key and dead letter finds the person nowhere but in the deletion
proof (the ledger, the suppression list, the destinations' ``identity.deleted`` notices);
a re-sent event is dropped as ``erased``; the webhook's receipt is ``failed`` until the
dead letter is replayed, then ``acknowledged``, and only then is the request ``done``; a
fresh, asserted consent brings the person back (un-suppression), and the dedupe entries
went with the events; ``idgate ledger verify`` passes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    IDGATE,
    MALL_APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    SHARED_KEYS,
    TEST_CONFIG,
    WEB_KEY,
    Gateway,
    RedisNamespace,
    assertion,
    make_gateway,
    postgres_schema,
)
from tests.consent.test_rights import bearer, ledger_records, login, open_request, send, tag
from tests.gateway.test_tracking_plan import fix_plan, plan_config, product_added, seed_plan
from tests.receivers import Receiver
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

DELETED = '"type":"identity.deleted"'


def config(hook_url: str) -> str:
    return (
        TEST_CONFIG
        + f"""
[[tenants.destinations]]
id = "mall-parquet"
sink = "parquet"
purposes = ["analytics"]

[[tenants.destinations]]
id = "mall-hook"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{hook_url}", timeout_seconds = 1 }}
retry = {{ max_attempts = 1, initial_backoff_ms = 20, max_backoff_ms = 50 }}
"""
    )


def idgate(gw: Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**gw.env, "IDGATE_DATA_DIR": str(gw.data_dir)}
    return subprocess.run(
        [str(IDGATE), *args], env=env, capture_output=True, text=True, timeout=60, input=stdin
    )


def parquet_rows(gw: Gateway, destination: str) -> list[dict[str, Any]]:
    root = gw.data_dir / "sinks" / destination
    return [r for f in sorted(root.glob("date=*/part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def domain_values(event: dict[str, Any]) -> set[str]:
    """The person's values in a destination's pseudonym domain, as one of their events holds them."""
    values = {event.get("userId"), event.get("anonymousId"), (event.get("context") or {}).get("unified_id")}
    return {v for v in values if v}


def request_of(gw: Gateway, request_id: str) -> dict[str, Any]:
    got = httpx.get(f"{gw.url}/admin/rights/{request_id}", params={"tenant": "mall"}, headers=bearer())
    assert got.status_code == 200, got.text
    return dict(got.json())


# -- the scan ---------------------------------------------------------------------------------
# Where the person may still be named: the ledger (consent history and the deletion's own
# records, kept by law), the consent state (the person's withdrawals and the suppression
# list) and the officers' access log (who read the person's data: kept by law, 6 months).
PROOF_TABLES = {"consent_ledger", "consent_state", "admin_access_log"}


def found_in_files(gw: Gateway, canaries: set[str]) -> list[str]:
    """Every file under the data directory but the databases (scanned by table): the sink
    files line by line (the ``identity.deleted`` notices excepted), Parquet row by row."""
    hits = []
    for path in sorted(gw.data_dir.rglob("*")):
        if not path.is_file() or ".sqlite3" in path.name:
            continue
        if path.suffix == ".parquet":
            lines = [json.dumps(r, default=str) for r in pq.read_table(path).to_pylist()]
        else:
            lines = path.read_text(errors="replace").splitlines()
        for line in lines:
            if DELETED in line or '"identity.deleted"' in line:
                continue
            hits += [f"{path.relative_to(gw.data_dir)}: {c}" for c in canaries if c in line]
    return hits


def found_in_sqlite(gw: Gateway, canaries: set[str]) -> list[str]:
    hits = []
    for path in sorted(gw.data_dir.glob("*.sqlite3")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                if table in PROOF_TABLES:
                    continue
                for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - our own tables
                    text = " ".join(
                        bytes(v).decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row
                    )
                    if DELETED in text:
                        continue  # a deletion notice (outbox, dead letters): the deletion request
                    hits += [f"{path.name}/{table}: {c}" for c in canaries if c in text]
        finally:
            conn.close()
    return hits


def found_in_postgres(url: str, schema: str, canaries: set[str]) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    hits = []
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": schema},
            ).scalars()
            for table in list(tables):
                if table in PROOF_TABLES:
                    continue
                for row in conn.execute(sa.text(f'SELECT * FROM "{schema}"."{table}"')):
                    text = " ".join(str(v) for v in row)
                    hits += [f"postgres/{table}: {c}" for c in canaries if c in text]
    finally:
        engine.dispose()
    return hits


def found_in_redis(ns: RedisNamespace, canaries: set[str]) -> list[str]:
    """Every key of the namespace, whatever its type (the consent state's hashes excepted:
    the person's withdrawals and suppression flags, as in the SQL consent_state)."""
    import redis

    client = redis.Redis.from_url(ns.url)
    hits = []
    try:
        for key in client.scan_iter(match=f"{ns.prefix}:*"):
            name = key.decode()
            if name.startswith(f"{ns.prefix}:consent:"):
                continue
            kind = client.type(key).decode()
            if kind == "string":
                values: list[Any] = [client.get(key)]
            elif kind == "hash":
                values = [*client.hgetall(key).items()]
            elif kind == "set":
                values = list(client.smembers(key))
            elif kind == "zset":
                values = list(client.zrange(key, 0, -1))
            elif kind == "list":
                values = list(client.lrange(key, 0, -1))
            elif kind == "stream":
                values = [fields for _, fields in client.xrange(key)]
            else:
                values = []
            for value in [name, *values]:  # the key's name too: counters are keyed by pseudonyms
                text = repr(value)
                if "identity.deleted" in text:
                    continue
                hits += [f"redis {name}: {c}" for c in canaries if c in text]
    finally:
        client.close()
    return hits


# -- the test ---------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis])])
def mode(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            yield {"env": {}}
            return
        ns: RedisNamespace = request.getfixturevalue("redis_ns")
        schema = stack.enter_context(postgres_schema("rdel"))
        yield {"env": {"DATABASE_URL": schema.url, **SHARED_KEYS, **ns.env()}, "schema": schema, "redis": ns}


def test_a_deleted_person_is_nowhere_stays_out_and_every_destination_has_its_receipt(
    tmp_path: Path, mode: dict[str, Any]
) -> None:
    with Receiver(seed=5) as rx, ExitStack() as stack:
        g = make_gateway(tmp_path, config=config(rx.webhook_url), extra_env=mode["env"]).start()
        stack.callback(g.stop)
        t = tag()
        user, web_device, app_device = f"canary-user-{t}", f"canary-web-{t}", f"canary-app-{t}"
        other, other_device = f"keep-user-{t}", f"keep-web-{t}"
        login(g, MALL_WEB_KEY, user, web_device)
        login(g, MALL_APP_KEY, user, app_device)
        login(g, MALL_WEB_KEY, other, other_device)
        first = send(g, MALL_WEB_KEY, "track", anonymousId=web_device, userId=user, event="Product Viewed")
        mine = [first, send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")]
        theirs = send(
            g, MALL_WEB_KEY, "track", anonymousId=other_device, userId=other, event="Product Viewed"
        )
        sent = {m["messageId"] for m in [*mine, theirs]}
        wait_until(lambda: sent <= set(rx.message_ids), 30, what="the events at the webhook")
        wait_until(
            lambda: sent <= {e["messageId"] for e in g.sink_lines("mall-warehouse")}, 30, what="JSONL lines"
        )
        wait_until(
            lambda: sent <= {r["message_id"] for r in parquet_rows(g, "mall-parquet")},
            30,
            what="Parquet rows",
        )
        # the receiver goes down: the person's next event is dead-lettered at the webhook
        rx.down = True
        dead = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        wait_until(lambda: "delivery.dead_lettered" in g.log_text(), 30, what="the dead letter")

        # the canaries: raw identifiers, pseudonyms, unified IDs, and each destination's values
        nodes = {x for rec in ledger_records(g, identifier=user) for x in rec["identifiers"]}
        pseudonyms = {n.split(":", 1)[1] for n in nodes}
        assert len(pseudonyms) == 3
        access = open_request(g, kind="access", subject={"type": "user_id", "id": user}).json()
        bundle = httpx.post(
            f"{g.url}/admin/rights/{access['requestId']}/bundle", json={"tenant": "mall"}, headers=bearer()
        ).json()["bundle"]
        unified = set(bundle["unifiedIds"])
        assert unified and {"mall-warehouse", "mall-parquet", "mall-hook"} <= set(bundle["destinations"])
        ids = {m["messageId"] for m in mine}
        downstream = set()
        for e in g.sink_lines("mall-warehouse"):
            if e["messageId"] in ids:
                downstream |= domain_values(e)
        for r in parquet_rows(g, "mall-parquet"):
            if r["message_id"] in ids:
                downstream |= domain_values(json.loads(r["payload"]))
        for e in rx.events:
            if e["messageId"] in ids:
                downstream |= domain_values(e)
        raw = {user, web_device, app_device}
        canaries = raw | pseudonyms | unified | downstream
        assert found_in_files(g, canaries), "the canaries are where the scan looks before the deletion"

        r = open_request(g, kind="delete", subject={"type": "user_id", "id": user}, channel="web")
        assert r.status_code == 201, r.text
        request_id = r.json()["requestId"]
        steps = {s["step"]: s for s in r.json()["steps"]}
        assert steps["withdraw_all"]["identifiers"] == 3 and steps["suppressed"]["identifiers"] == 3
        assert set(steps["recipients"]["destinations"]) == {"mall-warehouse", "mall-parquet", "mall-hook"}
        assert steps["events"]["dead_letters"] >= 1 and steps["events"]["dedupe_keys"] >= 1, steps
        # per sink: two identifies, three tracks and the notices of the person's merge
        removed = steps["file_sinks"]["lines_removed"]
        assert removed["mall-warehouse"] == removed["mall-parquet"] >= 5 and "mall-hook" not in removed, steps
        assert steps["identity_graph"]["erased"] == 3 and steps["identity_graph"]["notices"] == 1
        # the identity change log's past records of the person: renamed to tombstones
        assert steps["identity_log"]["records"] >= 3 and steps["identity_log"]["identifiers"] == 3, steps

        # the file sinks and the parquet files got the deletion notice; the webhook is down:
        # its receipt is "failed" and the request stays open, naming what it waits for
        def settled() -> dict[str, Any] | None:
            got = request_of(g, request_id)
            return got if got["receipts"].get("mall-hook") == "failed" else None

        request = wait_until(settled, 30, what="the webhook's failed receipt")
        wait_until(
            lambda: (
                request_of(g, request_id)["receipts"]
                == {"mall-warehouse": "delivered", "mall-parquet": "delivered", "mall-hook": "failed"}
            ),
            30,
            what="the file sinks' receipts",
        )
        request = request_of(g, request_id)
        assert request["status"] == "open" and request["remaining"] == ["destination:mall-hook"], request
        # a kill -9 while it waits: at the restart it is still open, its stores not done again
        g.kill9()
        g.start()
        wait_until(lambda: "rights.resuming" in g.log_text(), 20, what="the resume at the restart")
        resumed = request_of(g, request_id)
        assert resumed["status"] == "open" and len(resumed["steps"]) == len(request["steps"]), resumed

        # the dead letter is replayed like any delivery: acknowledged, and the request is done
        rx.down = False
        replay = idgate(g, "dlq", "replay", "--all")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        done = wait_until(
            lambda: (lambda x: x if x["status"] == "completed" else None)(request_of(g, request_id)),
            30,
            what="the deletion completed",
        )
        # every store, the identity change log included
        assert done["outcome"] == "done" and not done.get("remaining"), done
        assert done["receipts"]["mall-hook"] == "acknowledged", done
        assert [e for e in rx.events if e.get("type") == "identity.deleted"], "the webhook got the deletion"

        # the scan: nowhere but in the deletion proof
        hits = found_in_files(g, canaries)
        if "schema" in mode:
            hits += found_in_postgres(mode["schema"].url, mode["schema"].name, canaries)
            hits += found_in_redis(mode["redis"], canaries)
        hits += found_in_sqlite(g, canaries)
        assert hits == [], "\n".join(hits)
        assert not any(c in g.log_text() for c in raw)
        assert dead["messageId"] not in idgate(g, "dlq", "list", "--json").stdout
        # the person's files: only their deletion notices are left of them
        assert theirs["messageId"] in {e["messageId"] for e in g.sink_lines("mall-warehouse")}
        assert theirs["messageId"] in {r["message_id"] for r in parquet_rows(g, "mall-parquet")}

        # the person index (delivered_person, Redis received:*) was in the scan; an access
        # request finds no event held (the deliveries made stay in the ledger's proofs)
        again = open_request(g, kind="access", subject={"type": "user_id", "id": user}).json()
        bundle = httpx.post(
            f"{g.url}/admin/rights/{again['requestId']}/bundle", json={"tenant": "mall"}, headers=bearer()
        ).json()["bundle"]
        assert bundle["heldEvents"] == [], bundle

        # a re-sent old event is dropped before anything is stored: dropped.erased
        resent = {"anonymousId": web_device, "userId": user, "event": "Product Viewed"}
        refused = send(g, MALL_WEB_KEY, "track", messageId=first["messageId"], **resent)
        assert refused["accepted"] == 0 and refused["dropped"] == {"erased": 1}, refused
        assert (
            'idgate_events_dropped_total{reason="erased",tenant="mall"}' in httpx.get(f"{g.url}/metrics").text
        )

        # the ledger still verifies (the CLI, offline, from the export)
        export = httpx.get(f"{g.url}/admin/consent/export", params={"tenant": "mall"}, headers=bearer())
        key = next(k for k in (json.loads(x).get("public_key") for x in export.text.splitlines()) if k)
        verified = idgate(g, "ledger", "verify", "-", "--public-key", key, stdin=export.text)
        assert verified.returncode == 0 and verified.stdout.startswith("OK"), (
            verified.stdout + verified.stderr
        )

        # the person comes back: they log in again and the shop's backend asserts their consent
        # (a grant with person-level proof lifts the suppression of what it names); the old
        # event's dedupe entry went with it, so the same message id is stored anew
        login(g, MALL_WEB_KEY, user, web_device)
        back = send(g, MALL_WEB_KEY, "track", messageId=first["messageId"], **resent)
        assert back["accepted"] == 1 and back["duplicates"] == 0, back
        # the other device was not named by the new consent: it stays suppressed
        still = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        assert still["dropped"] == {"erased": 1}, still
        # a client alone (no assertion) cannot lift it for its device
        r = httpx.post(
            f"{g.url}/v1/consent",
            auth=(MALL_APP_KEY, ""),
            json={"anonymousId": app_device, "grant": ["analytics"], "noticeId": "notice-v1"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        still = send(g, MALL_APP_KEY, "track", anonymousId=app_device, event="Product Viewed")
        assert still["dropped"] == {"erased": 1}, still


@pytest.mark.postgres
@pytest.mark.redis
def test_every_replica_purges_its_own_sink_files(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """Distributed mode: two replicas share the ledger (PostgreSQL) and the outbox (Redis)
    but each writes its own sink files; a deletion carried out on one is applied by the
    other to its files too (it follows the deletions' ``file_sinks`` steps in the ledger)."""
    with ExitStack() as stack:
        schema = stack.enter_context(postgres_schema("rdel2"))
        env = {"DATABASE_URL": schema.url, **SHARED_KEYS, **redis_ns.env()}
        a = make_gateway(tmp_path / "a", extra_env=env).start()
        stack.callback(a.stop)
        b = make_gateway(tmp_path / "b", extra_env=env).start()
        stack.callback(b.stop)
        t = tag()
        user, device = f"canary-rep-{t}", f"canary-rep-web-{t}"
        token = assertion(user, device)
        granted = httpx.post(
            f"{b.url}/v1/consent",
            auth=(MALL_WEB_KEY, ""),
            json={
                "anonymousId": device,
                "userId": user,
                "grant": ["analytics", "identity_linking"],
                "noticeId": "notice-v1",
                "identityAssertion": token,
            },
            timeout=10,
        )
        assert granted.status_code == 200, granted.text
        send(
            b, MALL_WEB_KEY, "identify", anonymousId=device, userId=user, context={"identityAssertion": token}
        )

        def lines() -> list[dict[str, Any]]:  # either replica may deliver any event
            return [*a.sink_lines("mall-warehouse"), *b.sink_lines("mall-warehouse")]

        sent = {
            send(b, MALL_WEB_KEY, "track", anonymousId=device, userId=user, event="Viewed")["messageId"]
            for _ in range(20)
        }
        wait_until(lambda: sent <= {e["messageId"] for e in lines()}, 30, what="the events in the sinks")
        held_by_b = [e for e in b.sink_lines("mall-warehouse") if e["messageId"] in sent]
        values = {v for e in lines() if e["messageId"] in sent for v in domain_values(e)}

        r = open_request(a, kind="delete", subject={"type": "user_id", "id": user})
        assert r.status_code == 201, r.text

        def named(gw: Gateway) -> list[dict[str, Any]]:
            return [
                e
                for e in gw.sink_lines("mall-warehouse")
                if e.get("type") != "identity.deleted" and domain_values(e) & values
            ]

        wait_until(
            lambda: not named(a) and not named(b), 30, what="the person gone from both replicas' files"
        )
        if held_by_b:  # b rewrote its files itself, following a's deletion
            wait_until(lambda: "rights.sink_purge_followed" in b.log_text(), 10, what="b's log line")


def test_the_tracking_plans_records_of_a_person_are_in_the_bundle_and_go_with_the_deletion(
    tmp_path: Path,
) -> None:
    """Events the plan kept (``block``) hold the person's pseudonyms: an access request lists
    them, a deletion removes them (step ``plan_violations``) and leaves other persons'."""
    plan = seed_plan(tmp_path)
    g = make_gateway(tmp_path, config=plan_config(plan, "enforce")).start()
    try:
        t = tag()
        user, other = f"canary-plan-{t}", f"keep-plan-{t}"

        def bad_price(who: str) -> dict[str, Any]:  # price as a string: blocked, kept as a record
            props = {"product_id": "sku-1", "price": "12", "quantity": 1}
            return send(g, WEB_KEY, "track", userId=who, event="Product Added", properties=props)

        mine, theirs = bad_price(user), bad_price(other)
        assert mine["accepted"] == 0 and theirs["accepted"] == 0, mine

        def kept() -> set[str]:
            operator = bearer(OPERATOR_TOKEN)  # the plan's records are the data team's
            r = httpx.get(f"{g.url}/admin/plan/violations", params={"tenant": "shop"}, headers=operator)
            assert r.status_code == 200, r.text
            return {v["messageId"] for v in r.json()["violations"]}

        assert {mine["messageId"], theirs["messageId"]} <= kept()
        subject = {"type": "user_id", "id": user}
        access = open_request(g, tenant="shop", kind="access", subject=subject).json()
        bundle = httpx.post(
            f"{g.url}/admin/rights/{access['requestId']}/bundle", json={"tenant": "shop"}, headers=bearer()
        ).json()["bundle"]
        held = [e for e in bundle["heldEvents"] if e["store"] == "plan_violation"]
        assert [e["messageId"] for e in held] == [mine["messageId"]], bundle["heldEvents"]
        assert held[0]["planEvent"] == "product_added" and held[0]["violations"][0]["rule"] == "type"

        r = open_request(g, tenant="shop", kind="delete", subject=subject)
        assert r.status_code == 201, r.text
        steps = {s["step"]: s for s in r.json()["steps"]}
        assert steps["plan_violations"]["records_removed"] == 1, steps
        assert mine["messageId"] not in kept() and theirs["messageId"] in kept()
        pseudonyms = {i["pseudonym"] for i in bundle["identifiers"]}
        assert pseudonyms
        store = sqlite3.connect(g.data_dir / "violations.sqlite3")
        rows = store.execute("SELECT message_id, envelope, payload FROM plan_violation").fetchall()
        store.close()
        assert theirs["messageId"] in {m for m, _, _ in rows}
        left = [m for m, e, p in rows for x in pseudonyms if x.encode() in bytes(e) + bytes(p)]
        assert left == [] and user not in g.log_text()
    finally:
        g.stop()


@pytest.mark.postgres
@pytest.mark.redis
def test_replicas_share_the_plan_violation_records(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    """Distributed mode: the events the plan blocked are one store in Redis. A record kept on
    replica a is listed (API and CLI) and replayed from replica b; replaying the same message
    id again, from any replica, is a duplicate; a deletion carried out on b removes the
    record a kept, in its own step (per-replica stores found none there)."""
    with ExitStack() as stack:
        schema = stack.enter_context(postgres_schema("rdelv"))
        env = {"DATABASE_URL": schema.url, **SHARED_KEYS, **redis_ns.env()}
        plan = seed_plan(tmp_path)
        config = plan_config(plan, "enforce")
        a = make_gateway(tmp_path / "a", config=config, extra_env=env).start()
        stack.callback(a.stop)
        b = make_gateway(tmp_path / "b", config=config, extra_env=env).start()
        stack.callback(b.stop)
        operator = bearer(OPERATOR_TOKEN)

        def listed(gw: Gateway) -> dict[str, Any]:
            r = httpx.get(f"{gw.url}/admin/plan/violations/", params={"tenant": "shop"}, headers=operator)
            assert r.status_code == 200, r.text
            return dict(r.json())

        def replay(gw: Gateway, ids: list[str]) -> dict[str, Any]:
            r = httpx.post(
                f"{gw.url}/admin/plan/violations/replay",
                json={"tenant": "shop", "ids": ids},
                headers=operator,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            return dict(r.json())

        bad = product_added("9.90")
        sent = httpx.post(f"{a.url}/v1/batch", json={"batch": [bad]}, auth=(WEB_KEY, ""), timeout=10).json()
        assert sent["accepted"] == 0 and sent["planViolations"][0]["action"] == "kept", sent
        on_b = listed(b)
        assert on_b["counts"] == {"product_added": 1}
        [record] = on_b["violations"]
        assert record["messageId"] == bad["messageId"]
        shown = httpx.get(f"{b.url}/admin/plan/violations/{record['id']}", headers=operator)
        assert shown.status_code == 200 and shown.json()["event"]["properties"]["price"] == "9.90"
        cli = idgate(b, "plan", "violations", "--tenant", "shop", "--json")
        assert cli.returncode == 0, cli.stderr
        assert [v["messageId"] for v in json.loads(cli.stdout)["violations"]] == [bad["messageId"]]
        assert not (b.data_dir / "violations.sqlite3").exists()  # nothing kept per replica

        fix_plan(plan)
        b.stop()
        b.start()  # b runs the fixed plan; a still the old one
        assert replay(b, [record["id"]])["replayed"] == 1

        def delivered() -> list[str]:  # either replica may deliver (one shared outbox)
            return [
                e["messageId"] for gw in (a, b) for e in gw.sink_lines() if e["messageId"] == bad["messageId"]
            ]

        wait_until(lambda: delivered() == [bad["messageId"]], 30, what="the replayed event delivered")
        assert listed(a)["counts"] == {}  # gone for a too
        # the client retries the bad event to a (old plan): kept again; replayed from b it is
        # a duplicate of the event delivered, and its record goes
        retried = httpx.post(f"{a.url}/v1/batch", json={"batch": [bad]}, auth=(WEB_KEY, ""), timeout=10)
        assert retried.json()["planViolations"][0]["action"] == "kept", retried.text
        [again] = listed(b)["violations"]
        assert replay(b, [again["id"]])["duplicates"] == 1
        assert listed(a)["counts"] == {}
        later = product_added(1)  # the duplicate was never appended; delivery went on past it
        httpx.post(f"{b.url}/v1/batch", json={"batch": [later]}, auth=(WEB_KEY, ""), timeout=10)
        wait_until(
            lambda: later["messageId"] in {e["messageId"] for gw in (a, b) for e in gw.sink_lines()},
            30,
            what="a later event delivered",
        )
        assert delivered() == [bad["messageId"]]  # once
        unknown = httpx.post(
            f"{a.url}/admin/plan/violations/replay",
            json={"tenant": "shop", "ids": [again["id"]]},
            headers=operator,
            timeout=30,
        )
        assert unknown.status_code == 400 and unknown.json()["field"] == "ids", unknown.text

        # a person's record kept on a, deleted by a request carried out on b: once
        user = f"canary-planrep-{tag()}"
        props = {"product_id": "sku-1", "price": "12", "quantity": 1}
        blocked = send(a, WEB_KEY, "track", userId=user, event="Product Added", properties=props)
        assert blocked["accepted"] == 0, blocked
        assert [v["messageId"] for v in listed(b)["violations"]] == [blocked["messageId"]]
        r = open_request(b, tenant="shop", kind="delete", subject={"type": "user_id", "id": user})
        assert r.status_code == 201, r.text
        assert {s["step"]: s for s in r.json()["steps"]}["plan_violations"]["records_removed"] == 1
        assert listed(a)["counts"] == {} and listed(b)["counts"] == {}
