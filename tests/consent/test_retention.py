"""Retention (PIPL Art. 19) and the breach query (Art. 57) over real HTTP and the real CLI,
on the embedded stores and in distributed mode (PostgreSQL + Redis).

Events sent through the gateway are the "new" data; "old" data (60 days) is planted in
every store a retention run covers, with the gateway stopped (so delivery and pruning do
not move it meanwhile). A dry run changes nothing and reports the counts; an applied run
removes exactly the old data, and its ledger record verifies offline."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
import sqlalchemy as sa

from consent.models import AccessLogEntry, DeliveryProof
from export.outbox import OutboxRecord
from export.violations import PlanFinding, RedisViolations, SqliteViolations, ViolationRecord, ViolationStore
from identity.db import make_engine
from tests.conftest import (
    COMPLIANCE_TOKEN,
    IDGATE,
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    TEST_CONFIG,
    Gateway,
    backend_env,
    make_gateway,
    mid,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

# mall (the last [[tenants]] of TEST_CONFIG) gets a Parquet destination and its periods
RETENTION_CONFIG = (
    TEST_CONFIG
    + """
[[tenants.destinations]]
id = "mall-parquet"
sink = "parquet"
purposes = ["analytics"]

[tenants.retention]
days = 30
destinations = { "mall-ads" = 7 }
access_log_days = 183
"""
)
OLD = datetime.now(UTC) - timedelta(days=60)
OLD_DAY = OLD.date().isoformat()
OLD_ACCESS = datetime.now(UTC) - timedelta(days=200)  # the access log's period is 183 days
STORES = (
    "outbox",
    "dead_letters",
    "sink_files",
    "person_index",
    "plan_violations",
    "delivery_proofs",
    "access_log",
)


def bearer(token: str = COMPLIANCE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def idgate(gw: Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI on the gateway's stores and config."""
    return subprocess.run(
        [str(IDGATE), *args],
        env={**gw.env, "IDGATE_DATA_DIR": str(gw.data_dir), "IDGATE_CONFIG": str(gw.config_path)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Planted:
    """Old and new entries planted in each store (markers by message id and unified ID)."""

    gw: Gateway
    tag: str

    @property
    def distributed(self) -> bool:
        return "REDIS_URL" in self.gw.env

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.gw.env["REDIS_URL"])

    @property
    def prefix(self) -> str:
        return self.gw.env["IDGATE_REDIS_PREFIX"]

    def consent_engine(self) -> sa.Engine:
        url = self.gw.env.get("DATABASE_URL") or f"sqlite:///{self.gw.data_dir / 'consent.sqlite3'}"
        return make_engine(url)

    def outbox_db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.gw.data_dir / "outbox.sqlite3")

    def name(self, age: str) -> str:
        return f"{age}-{self.tag}"

    def plant(self) -> None:
        now = datetime.now(UTC)
        for age, moment in (("old", OLD), ("new", now)):
            ms = int(moment.timestamp() * 1000)
            name = self.name(age)
            record = OutboxRecord(
                tenant="mall",
                source="mall-web",
                message_id=name,
                received_at_ms=ms,
                destinations=("mall-warehouse",),
                payload=b'{"type":"track","event":"Planted"}',
                pseudonyms=(f"p_{name}",),
                person=f"p_{name}",
            )
            self._plant_outbox_and_dead_letter(record, ms)
            self._plant_person_index(f"p_{name}", ms)
            self._plant_violation(record)
            with self.consent_engine().begin() as conn:
                conn.execute(
                    sa.insert(DeliveryProof.__table__),  # type: ignore[attr-defined]
                    {
                        "ledger_seq": 1,
                        "destination": "mall-warehouse",
                        "message_id": name,
                        "delivered_at": moment,
                    },
                )
                conn.execute(
                    sa.insert(AccessLogEntry.__table__),  # type: ignore[attr-defined]
                    {
                        "at": OLD_ACCESS if age == "old" else moment,
                        "officer": name,
                        "role": "compliance",
                        "action": "planted",
                        "tenant": "mall",
                        "params": {},
                        "result_count": 0,
                    },
                )
        sinks = self.gw.data_dir / "sinks"
        (sinks / "mall-warehouse").mkdir(parents=True, exist_ok=True)
        (sinks / "mall-warehouse" / f"{OLD_DAY}.jsonl").write_text('{"messageId":"old"}\n')
        partition = sinks / "mall-parquet" / f"date={OLD_DAY}"
        partition.mkdir(parents=True, exist_ok=True)
        (partition / "part-00000000000000000001-00000000000000000001.parquet").write_bytes(b"PAR1")

    def _plant_outbox_and_dead_letter(self, record: OutboxRecord, ms: int) -> None:
        dead = {
            "message_id": record.message_id,
            "received_at_ms": ms,
            "dead_at_ms": ms,
            "attempts": 8,
            "reason": "planted",
            "payload": record.payload,
            "consent": b"",
            "proof": "",
            "tenant": "mall",
            "source": "mall-web",
            "kind": "event",
            "person": record.person,
            "pseudonyms": record.person,
        }
        if self.distributed:
            client = self.redis()
            client.xadd(f"{self.prefix}:outbox", {"r": msgspec.msgpack.encode(record)})
            client.incr(f"{self.prefix}:outbox:appended")
            client.xadd(f"{self.prefix}:dlq:mall-warehouse", dead)
            client.close()
            return
        with self.outbox_db() as db:
            db.execute(
                "INSERT INTO outbox(tenant, source, message_id, received_at_ms, destinations, payload, kind, "
                "person, pseudonyms) VALUES ('mall', 'mall-web', ?, ?, 'mall-warehouse', ?, 'event', ?, ?)",
                (record.message_id, ms, record.payload, record.person, record.person),
            )
            db.execute(
                f"INSERT INTO dead_letter(destination, {', '.join(dead)}) "  # noqa: S608
                f"VALUES ('mall-warehouse', {', '.join('?' * len(dead))})",
                tuple(dead.values()),
            )
            db.execute("INSERT INTO dedupe(key, seen_at_ms) VALUES (?, ?)", (record.message_id, ms))

    def violations(self) -> ViolationStore:
        """The tracking plan's records: shared in Redis, else the gateway's file."""
        if self.distributed:
            return RedisViolations(self.redis(), self.prefix)
        return SqliteViolations(self.gw.data_dir / "violations.sqlite3")

    def _plant_violation(self, record: OutboxRecord) -> None:
        """An event the tracking plan kept."""
        store = self.violations()
        found = (PlanFinding("required", "properties.sku", "required property missing"),)
        store.keep(
            [
                ViolationRecord(
                    tenant="mall",
                    source="mall-web",
                    message_id=record.message_id,
                    event="product_added",
                    plan_version=1,
                    received_at_ms=record.received_at_ms,
                    findings=found,
                    payload=record.payload,
                    pseudonyms=record.pseudonyms,
                )
            ]
        )
        store.close()

    def _plant_person_index(self, person: str, ms: int) -> None:
        if self.distributed:
            client = self.redis()
            client.sadd(f"{self.prefix}:received:mall-warehouse", person)
            client.zadd(f"{self.prefix}:received-at:mall-warehouse", {person: ms})
            client.close()
            return
        with self.outbox_db() as db:
            db.execute(
                "INSERT INTO delivered_person(destination, unified_id, delivered_at_ms) "
                "VALUES ('mall-warehouse', ?, ?)",
                (person, ms),
            )

    def held(self) -> dict[str, set[str]]:
        """Which planted markers ("old", "new") each store still holds."""
        markers = {self.name("old"): "old", self.name("new"): "new", f"p_{self.name('old')}": "old"}
        markers[f"p_{self.name('new')}"] = "new"

        def found(values: Any) -> set[str]:
            return {markers[v] for v in values if v in markers}

        held: dict[str, set[str]] = {}
        if self.distributed:
            client = self.redis()
            entries = client.xrange(f"{self.prefix}:outbox")
            held["outbox"] = found(
                msgspec.msgpack.decode(f[b"r"], type=OutboxRecord).message_id for _, f in entries
            )
            dead = client.xrange(f"{self.prefix}:dlq:mall-warehouse")
            held["dead_letters"] = found(f[b"message_id"].decode() for _, f in dead)
            persons = client.smembers(f"{self.prefix}:received:mall-warehouse")
            held["person_index"] = found(p.decode() for p in persons)
            client.close()
        else:
            with self.outbox_db() as db:
                held["outbox"] = found(m for (m,) in db.execute("SELECT message_id FROM outbox"))
                held["dead_letters"] = found(m for (m,) in db.execute("SELECT message_id FROM dead_letter"))
                held["person_index"] = found(
                    p for (p,) in db.execute("SELECT unified_id FROM delivered_person")
                )
                held["dedupe"] = found(k for (k,) in db.execute("SELECT key FROM dedupe"))
        kept = self.violations()
        held["plan_violations"] = found(v.message_id for v in kept.list("mall", limit=1000))
        kept.close()
        with self.consent_engine().connect() as conn:
            proofs = conn.execute(sa.text("SELECT message_id FROM consent_delivery"))
            held["delivery_proofs"] = found(m for (m,) in proofs)
            officers = conn.execute(sa.text("SELECT officer FROM admin_access_log"))
            held["access_log"] = found(o for (o,) in officers)
        sinks = self.gw.data_dir / "sinks"
        held["sink_files"] = {
            "old"
            for path in (
                sinks / "mall-warehouse" / f"{OLD_DAY}.jsonl",
                sinks / "mall-parquet" / f"date={OLD_DAY}",
            )
            if path.exists()
        }
        return held


def send_with_consent(gw: Gateway, anonymous_id: str, events: int) -> list[str]:
    with httpx.Client(base_url=gw.url, auth=(MALL_WEB_KEY, ""), timeout=10) as c:
        r = c.post(
            "/v1/consent", json={"anonymousId": anonymous_id, "grant": ["analytics"], "noticeId": "notice-v1"}
        )
        assert r.status_code == 200, r.text
        ids = [mid() for _ in range(events)]
        batch = [
            {"type": "track", "anonymousId": anonymous_id, "event": "Product Viewed", "messageId": m}
            for m in ids
        ]
        r = c.post("/v1/batch", json={"batch": batch})
        assert r.status_code == 200 and r.json()["accepted"] == events, r.text
    wait_until(
        lambda: {e["messageId"] for e in gw.sink_lines("mall-warehouse")} >= set(ids),
        20,
        what="the events at mall-warehouse",
    )
    return ids


def check_breach_query(gw: Gateway, anonymous_id: str, sent: int) -> None:
    now = datetime.now(UTC)
    window = {"tenant": "mall", "destination": "mall-warehouse"}
    window |= {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(minutes=5)).isoformat()}
    # the proofs are written right after the sink write: poll until all of them are in
    r = wait_until(
        lambda: (
            got
            if (
                got := httpx.get(f"{gw.url}/admin/breach", params=window, headers=bearer(), timeout=10)
            ).status_code
            == 200
            and got.json()["events"] >= sent
            else None
        ),
        20,
        what="the deliveries in the breach report",
    )
    report = r.json()
    assert anonymous_id not in r.text  # pseudonyms and unified IDs only
    assert report["purposes"]["analytics"] >= sent and report["persons"] >= 1
    mine = [
        s for s in report["subjects"] if s["events"] == sent and s["subject"].startswith("anonymous_id:k")
    ]
    assert mine and mine[0]["purposes"] == ["analytics"] and mine[0]["unifiedId"].startswith("p_"), report
    log = httpx.get(f"{gw.url}/admin/access-log", params={"limit": 20}, headers=bearer(), timeout=10).json()
    assert any(e["action"] == "breach.query" and e["tenant"] == "mall" for e in log["entries"]), log

    bad = {
        "to": {**window, "to": (now - timedelta(hours=2)).isoformat()},  # before from
        "destination": {**window, "destination": "warehouse"},  # shop's, not mall's
    }
    bad_from = {**window, "from": "yesterday"}
    too_wide = {**window, "from": (now - timedelta(days=400)).isoformat()}
    for field, params in [*bad.items(), ("from", bad_from), ("to", too_wide)]:
        r = httpx.get(f"{gw.url}/admin/breach", params=params, headers=bearer(), timeout=10)
        assert r.status_code == 400 and r.json()["field"] == field, (field, r.text)
    missing = {k: v for k, v in window.items() if k != "to"}
    r = httpx.get(f"{gw.url}/admin/breach", params=missing, headers=bearer(), timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "to", r.text
    r = httpx.get(f"{gw.url}/admin/breach", params=window, headers=bearer(OPERATOR_TOKEN), timeout=10)
    assert r.status_code == 403, r.text
    assert httpx.get(f"{gw.url}/admin/breach", params=window, timeout=10).status_code == 401

    cli = idgate(gw, "breach", "--tenant", "mall", "--destination", "mall-warehouse", "--json",
                 "--from", window["from"], "--to", window["to"])  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["events"] == report["events"] and anonymous_id not in cli.stdout
    cli = idgate(gw, "breach", "--tenant", "mall", "--destination", "mall-warehouse",
                 "--from", window["to"], "--to", window["from"])  # fmt: skip
    assert cli.returncode == 2 and "--to" in cli.stderr, cli.stderr


def retention_end_to_end(tmp_path: Path, env: dict[str, str]) -> None:
    gw = make_gateway(
        tmp_path, config=RETENTION_CONFIG, extra_env={"IDGATE_RETENTION_INTERVAL_SECONDS": "0", **env}
    )
    gw.start()
    try:
        anonymous_id = f"ret-anon-{uuid.uuid4().hex[:8]}"
        sent = send_with_consent(gw, anonymous_id, 3)
        check_breach_query(gw, anonymous_id, len(sent))
    finally:
        gw.stop()
    planted = Planted(gw, uuid.uuid4().hex[:8])
    planted.plant()
    before = planted.held()
    assert all(before[s] >= {"old"} for s in STORES), before
    assert all("new" in before[s] for s in STORES if s != "sink_files"), before

    dry = idgate(gw, "retention", "run", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    (run,) = [json.loads(line) for line in dry.stdout.splitlines()]
    assert run["tenant"] == "mall" and run["apply"] is False and run["ledgerSeq"] is None
    assert run["periodsDays"] == {"mall-warehouse": 30, "mall-orders": 30, "mall-overseas": 30,
                                  "mall-ads": 7, "mall-parquet": 30}  # fmt: skip
    removed = run["removed"]
    assert removed["outbox"] == 1 and removed["dead_letters"] == 1 and removed["person_index"] == 1, removed
    assert removed["sink_files"] == 2 and removed["delivery_proofs"] == 1 and removed["access_log"] == 1
    assert removed["plan_violations"] == 1, removed  # the longest period of mall's destinations: 30 days
    assert removed["dedupe_entries"] == (0 if planted.distributed else 1), removed
    assert planted.held() == before  # a dry run changes nothing

    applied = idgate(gw, "retention", "run", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "mall: removed outbox 1, dead_letters 1, sink_files 2, person_index 1" in applied.stdout
    after = planted.held()
    for store in STORES:
        assert "old" not in after[store], (store, after)
        if store != "sink_files":
            assert "new" in after[store], (store, after)
    if not planted.distributed:
        assert after["dedupe"] == {"new"}
    assert {e["messageId"] for e in gw.sink_lines("mall-warehouse")} >= set(sent)  # today's file stays

    again = idgate(gw, "retention", "run", "--dry-run", "--json")
    assert all(n == 0 for n in json.loads(again.stdout)["removed"].values()), again.stdout

    # the run is in the ledger, which still verifies offline
    public = idgate(gw, "keys", "ledger-public-key")
    assert public.returncode == 0, public.stderr
    exported = idgate(gw, "ledger", "export", "--out", "-")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    (ledgered,) = [r for r in records if r.get("record_type") == "retention_run"]
    assert ledgered["tenant"] == "mall" and ledgered["state"] == "completed"
    assert ledgered["detail"]["removed"]["outbox"] == 1 and ledgered["detail"]["removed"]["sink_files"] == 2
    # mall-ads keeps 7 days: its cutoff is later than the 30-day destinations'
    assert ledgered["detail"]["cutoffs"]["mall-ads"] > ledgered["detail"]["cutoffs"]["mall-warehouse"]
    verified = idgate(
        gw, "ledger", "verify", "-", "--public-key", public.stdout.strip(), stdin=exported.stdout
    )
    assert verified.returncode == 0 and verified.stdout.startswith("OK: "), verified.stdout + verified.stderr


def test_retention_and_breach_query_on_the_embedded_stores(tmp_path: Path) -> None:
    retention_end_to_end(tmp_path, {})


@pytest.mark.postgres
@pytest.mark.redis
def test_retention_and_breach_query_on_postgresql_and_redis(tmp_path: Path, redis_ns: Any) -> None:
    with ExitStack() as stack:
        retention_end_to_end(tmp_path, {**backend_env("postgres", stack), **redis_ns.env()})


@pytest.fixture
def old_sink_file_gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path, config=RETENTION_CONFIG, extra_env={"IDGATE_RETENTION_INTERVAL_SECONDS": "1"})
    yield gw
    gw.stop()


def test_the_gateway_enforces_retention_on_its_own(old_sink_file_gateway: Gateway) -> None:
    gw = old_sink_file_gateway
    old_file = gw.data_dir / "sinks" / "mall-warehouse" / f"{OLD_DAY}.jsonl"
    old_file.parent.mkdir(parents=True)
    old_file.write_text('{"messageId":"old"}\n')
    gw.start()
    wait_until(lambda: not old_file.exists(), 20, what="the job to remove the old sink file")

    def ledgered_runs() -> list[dict[str, Any]]:
        got = httpx.get(
            f"{gw.url}/admin/consent/records", params={"tenant": "mall"}, headers=bearer(), timeout=10
        )
        return [r for r in got.json()["records"] if r["type"] == "retention_run"]

    runs = wait_until(ledgered_runs, 10, what="the job's retention_run record")
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'idgate_retention_removed_total{store="sink_files",tenant="mall"} 1.0' in metrics
    assert runs[0]["detail"]["removed"]["sink_files"] == 1 and runs[0]["source"].startswith(
        "retention-job:"
    ), runs


def test_config_check_refuses_periods_under_the_legal_floors(tmp_path: Path) -> None:
    config = tmp_path / "idgate.toml"
    config.write_text(
        RETENTION_CONFIG.replace(
            "access_log_days = 183", "access_log_days = 30\nledger_days = 365\naliases_days = -1"
        )
        + "purposes = { nosuch = 3 }\n"
    )
    done = subprocess.run(
        [str(IDGATE), "config", "check", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "tenants[1].retention.ledger_days: 365 is under the legal minimum of 1095 days" in done.stderr
    assert "tenants[1].retention.access_log_days: 30 is under the legal minimum of 183 days" in done.stderr
    assert "tenants[1].retention.purposes.nosuch: unknown purpose" in done.stderr
    assert "tenants[1].retention.aliases_days: must be 0 (kept for good) or at least 1 day" in done.stderr


def test_old_aliases_leave_the_identity_graph_with_a_retention_run(tmp_path: Path) -> None:
    """A shopper's identifiers merge through the gateway; their merges are then aged past
    ``aliases_days`` (the gateway stopped, like the planted data above). ``idgate retention
    run`` counts them, then expires them: the old unified IDs leave the identity change log
    and no longer resolve, the person keeps their ID, the run's ledger record counts them and
    the ledger still verifies. A second run finds nothing and writes nothing."""
    from identity.graph import GraphChange, Merged
    from identity.rebuild import replay
    from identity.store import IdentityLogStore
    from tests.identity.test_identity_http import shopper_journey, unified_ids

    gw = make_gateway(
        tmp_path,
        config=RETENTION_CONFIG + "aliases_days = 30\n",
        extra_env={"IDGATE_RETENTION_INTERVAL_SECONDS": "0"},
    )
    gw.start()
    try:
        sent, user = shopper_journey(gw, with_linking=True)
        before = unified_ids(gw, sent)
    finally:
        gw.stop()
    log_path = gw.data_dir / "identity.sqlite3"

    def merges() -> list[tuple[int, Merged]]:
        with sqlite3.connect(log_path) as db:
            rows = db.execute(
                "SELECT seq, change FROM identity_log WHERE tenant = 'mall' AND kind = 'Merged'"
            )
            return [(seq, msgspec.json.decode(raw, type=GraphChange)) for seq, raw in rows]  # type: ignore[misc]

    made = merges()
    assert made, "the journey merged nothing"
    with sqlite3.connect(log_path) as db:  # the merges happened 60 days ago
        for seq, m in made:
            aged = msgspec.structs.replace(m, at=OLD)
            db.execute("UPDATE identity_log SET change = ? WHERE seq = ?", (msgspec.json.encode(aged), seq))
    old_ids = {m.merged for _, m in made}
    log_text = lambda: "\n".join(  # noqa: E731
        raw.decode() for _, _, raw in IdentityLogStore(make_engine(f"sqlite:///{log_path}")).all_rows()
    )
    assert all(u in log_text() for u in old_ids)

    dry = idgate(gw, "retention", "run", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["removed"]["aliases"] == len(old_ids), dry.stdout
    assert all(u in log_text() for u in old_ids)  # a dry run changes nothing

    applied = idgate(gw, "retention", "run", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert f"aliases {len(old_ids)}" in applied.stdout, applied.stdout
    text = log_text()
    assert not [u for u in old_ids if u in text]
    store = IdentityLogStore(make_engine(f"sqlite:///{log_path}"))
    graph = replay(store.all_rows())[0]["mall"].graph
    assert all(graph.resolve_alias(u) == u for u in old_ids)  # no longer resolves
    person = {graph.unified_id(n) for n in graph.nodes()}
    assert all(m.survivor in text for _, m in made if m.survivor in person)

    again = idgate(gw, "retention", "run", "--dry-run", "--json")
    assert json.loads(again.stdout)["removed"]["aliases"] == 0, again.stdout
    rerun = idgate(gw, "retention", "run", "--apply", "--json")
    assert json.loads(rerun.stdout)["removed"]["aliases"] == 0 and log_text() == text

    public = idgate(gw, "keys", "ledger-public-key")
    exported = idgate(gw, "ledger", "export", "--out", "-")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    runs = [r for r in records if r.get("record_type") == "retention_run"]
    assert [r["detail"]["removed"]["aliases"] for r in runs] == [len(old_ids), 0], runs
    assert runs[0]["detail"]["aliases_cutoff"] is not None
    verified = idgate(
        gw, "ledger", "verify", "-", "--public-key", public.stdout.strip(), stdin=exported.stdout
    )
    assert verified.returncode == 0 and verified.stdout.startswith("OK: "), verified.stdout + verified.stderr

    # the gateway starts from the rewritten log; the person keeps their ID downstream
    gw.start()
    try:
        m = mid()
        r = httpx.post(
            f"{gw.url}/v1/track",
            auth=(MALL_SERVER_KEY, ""),
            json={"messageId": m, "userId": user, "event": "Order Completed"},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        assert unified_ids(gw, [m]) == [before[-1]]
    finally:
        gw.stop()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_retention_run_on_a_postgresql_database_no_gateway_has_used(tmp_path: Path, redis_ns: Any) -> None:
    """``idgate retention run`` before any gateway ever started on the database (a fresh
    schema of the test's own, dropped afterwards): it creates the consent and identity
    tables as a gateway does at start, instead of failing on a missing table; the aliases
    step finds an empty identity log, and the applied run is the ledger's first record."""
    from tests.conftest import postgres_schema

    with postgres_schema("retention_fresh") as schema:
        engine = make_engine(schema.server_url, connect_args=schema.connect_args)
        try:
            assert sa.inspect(engine).get_table_names() == []  # nothing made the tables yet
            config = tmp_path / "idgate.toml"
            config.write_text(RETENTION_CONFIG + "aliases_days = 30\n")
            env = {**make_gateway(tmp_path / "no-gateway").env}  # never started
            env.update(
                {
                    "DATABASE_URL": schema.url,
                    "IDGATE_DATA_DIR": str(tmp_path / "var"),
                    "IDGATE_CONFIG": str(config),
                    **redis_ns.env(),
                }
            )

            def run(mode: str) -> dict[str, Any]:
                done = subprocess.run(
                    [str(IDGATE), "retention", "run", mode, "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
                (report,) = [json.loads(line) for line in done.stdout.splitlines()]
                return report  # type: ignore[no-any-return]

            dry = run("--dry-run")
            assert dry["removed"]["aliases"] == 0 and dry["ledgerSeq"] is None, dry
            tables = set(sa.inspect(engine).get_table_names())
            assert {"identity_log", "consent_ledger"} <= tables, tables
            applied = run("--apply")
            assert applied["ledgerSeq"] == 1 and all(n == 0 for n in applied["removed"].values()), applied
            with engine.connect() as conn:
                kinds = conn.execute(sa.text("SELECT record_type FROM consent_ledger")).scalars().all()
            assert kinds == ["retention_run"], kinds
        finally:
            engine.dispose()
