"""Consent is asked again at delivery: an event already in the outbox when a withdrawal
lands is not sent for the withdrawn purpose."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from consent.db import migrate_consent
from consent.decisions import ConsentQuery, ConsentTicket, DestinationSpec
from consent.ledger import Ledger
from consent.service import ConsentService, LedgerPolicy
from consent.signing import load_signer
from consent.state import SqlConsentState
from export.delivery import DeliveryService, DeliveryWorker
from export.file_sinks import JsonlFileSink
from export.outbox import OutboxRecord
from export.sqlite_outbox import SqliteOutbox
from gateway.config import parse_config
from gateway.consent_setup import delivery_recheck, purpose_rules
from gateway.pipeline import destination_specs
from identity.db import make_engine
from tests.conftest import MALL_WEB_KEY, TEST_CONFIG, Gateway, RedisNamespace, backend_env, make_gateway, mid
from tests.e2e.test_delivery_faults import idgate
from tests.receivers import Receiver
from tests.waiting import async_wait_until, wait_until


def test_withdrawal_between_ingest_and_delivery_withholds_the_event(tmp_path: Path) -> None:
    config = parse_config(TEST_CONFIG, dev=True)
    mall = next(t for t in config.tenants if t.id == "mall")
    engine = make_engine(f"sqlite:///{tmp_path / 'consent.sqlite3'}")
    migrate_consent(engine)
    ledger = Ledger(engine, load_signer(env_value=None, key_file=None, dev_file=tmp_path / "ledger-key"))
    store = SqlConsentState(engine)
    rules = {"mall": purpose_rules(mall)}
    service = ConsentService(ledger, store, rules)
    policy = LedgerPolicy(store, rules)
    specs = {s.id: s for s in destination_specs(mall.destinations)}
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3")
    outbox.open()

    async def main() -> list[str]:
        await service.publish_notice("mall", "notice-v1", "1" * 64)
        await service.record(
            tenant="mall",
            identifiers=[("anonymous_id", "k1.kept")],
            grant=["analytics"],
            notice_id="notice-v1",
            source="mall-web",
            platform="web",
        )
        await service.record(
            tenant="mall",
            identifiers=[("anonymous_id", "k1.gone")],
            grant=["analytics"],
            notice_id="notice-v1",
            source="mall-web",
            platform="web",
        )
        for i, subject in enumerate(["k1.kept", "k1.gone"]):
            query = ConsentQuery(tenant="mall", device_ids=(subject,), user_ids=(), purposes=("analytics",))
            (decision,) = await policy.decide_batch([query], list(specs.values()))
            assert "mall-warehouse" in decision.destinations
            ticket = ConsentTicket(decision.epoch, query)
            await outbox.append(
                [
                    OutboxRecord(
                        "mall",
                        "mall-web",
                        f"m{i}",
                        1_763_700_000_000,
                        ("mall-warehouse",),
                        msgspec.json.encode({"messageId": f"m{i}"}),
                        msgspec.json.encode(ticket),
                    )
                ],
                dedupe=True,
            )
        # the withdrawal lands while both events wait in the outbox
        await service.record(
            tenant="mall",
            identifiers=[("anonymous_id", "k1.gone")],
            withdraw=["analytics"],
            notice_id=None,
            source="mall-web",
            platform="web",
        )
        worker = DeliveryWorker(
            outbox.queue("mall-warehouse"),
            JsonlFileSink(tmp_path / "sinks", "mall-warehouse"),
            poll_seconds=0.01,
            recheck=delivery_recheck(policy, specs),
        )
        delivery = DeliveryService(outbox, [worker])
        await delivery.start()

        async def drained() -> bool:  # delivered, or withheld by the recheck
            return await outbox.pending() == 0

        await async_wait_until(drained, what="the outbox to drain")
        await delivery.stop()
        files = list((tmp_path / "sinks" / "mall-warehouse").glob("*.jsonl"))
        return [msgspec.json.decode(line)["messageId"] for f in files for line in f.read_bytes().splitlines()]

    assert asyncio.run(main()) == ["m0"]
    outbox.close()
    engine.dispose()


def test_a_withdrawal_of_personalisation_before_delivery_flags_the_event(tmp_path: Path) -> None:
    """PIPL Art. 24 at delivery: an event accepted as personalised whose subject withdraws
    ``personalisation`` before its first delivery goes out flagged non-personalised, and not
    at all to a destination that declares only ``personalisation``; an event accepted as
    non-personalised stays so after a later grant (a grant does not reach back)."""
    config = parse_config(TEST_CONFIG, dev=True)
    mall = next(t for t in config.tenants if t.id == "mall")
    engine = make_engine(f"sqlite:///{tmp_path / 'consent.sqlite3'}")
    migrate_consent(engine)
    ledger = Ledger(engine, load_signer(env_value=None, key_file=None, dev_file=tmp_path / "ledger-key"))
    store = SqlConsentState(engine)
    rules = {"mall": purpose_rules(mall)}
    service = ConsentService(ledger, store, rules)
    policy = LedgerPolicy(store, rules)
    recs = DestinationSpec("mall-recs", ("personalisation",), overseas=False, third_party=False)
    specs = {s.id: s for s in [*destination_specs(mall.destinations), recs]}
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3")
    outbox.open()

    async def consent(subject: str, grant: Sequence[str] = (), withdraw: Sequence[str] = ()) -> None:
        await service.record(
            tenant="mall",
            identifiers=[("anonymous_id", subject)],
            grant=grant,
            withdraw=withdraw,
            notice_id="notice-v1" if grant else None,
            source="mall-web",
            platform="web",
        )

    async def main() -> dict[str, list[tuple[str, bool, bool]]]:
        await service.publish_notice("mall", "notice-v1", "1" * 64)
        both = ["analytics", "personalisation"]
        await consent("k1.stays", grant=both)
        await consent("k1.optout", grant=both)
        await consent("k1.later", grant=["analytics"])
        for subject in ("k1.stays", "k1.optout", "k1.later"):
            query = ConsentQuery(tenant="mall", device_ids=(subject,), user_ids=(), purposes=tuple(both))
            (decision,) = await policy.decide_batch([query], list(specs.values()))
            ticket = ConsentTicket(decision.epoch, query, decision.personalised)
            idgate = {"tenant": "mall", "personalisation": decision.personalised}
            # a property of the same name is the client's, not idgate's flag: left alone
            event = {
                "messageId": subject,
                "context": {"idgate": idgate},
                "properties": {"personalisation": True},
            }
            await outbox.append(
                [
                    OutboxRecord(
                        "mall",
                        "mall-web",
                        subject,
                        1_763_700_000_000,
                        decision.destinations,
                        msgspec.json.encode(event),
                        msgspec.json.encode(ticket),
                    )
                ],
                dedupe=True,
            )
        # while the events wait in the outbox: one withdraws personalisation, one grants it
        await consent("k1.optout", withdraw=["personalisation"])
        await consent("k1.later", grant=["personalisation"])
        workers = [
            DeliveryWorker(
                outbox.queue(destination),
                JsonlFileSink(tmp_path / "sinks", destination),
                poll_seconds=0.01,
                recheck=delivery_recheck(policy, specs),
            )
            for destination in ("mall-warehouse", "mall-recs")
        ]
        delivery = DeliveryService(outbox, workers)
        await delivery.start()

        async def drained() -> bool:  # delivered, or withheld by the recheck
            return await outbox.pending() == 0

        await async_wait_until(drained, what="the outbox to drain")
        await delivery.stop()
        received: dict[str, list[tuple[str, bool, bool]]] = {}
        for destination in ("mall-warehouse", "mall-recs"):
            files = sorted((tmp_path / "sinks" / destination).glob("*.jsonl"))
            events = [msgspec.json.decode(line) for f in files for line in f.read_bytes().splitlines()]
            received[destination] = [
                (
                    e["messageId"],
                    e["context"]["idgate"]["personalisation"],
                    e["properties"]["personalisation"],
                )
                for e in events
            ]
        return received

    received = asyncio.run(main())
    assert received["mall-warehouse"] == [
        ("k1.stays", True, True),
        ("k1.optout", False, True),
        ("k1.later", False, True),
    ]
    assert received["mall-recs"] == [("k1.stays", True, True)]
    outbox.close()
    engine.dispose()


@dataclass
class TwoShoppers:
    """A gateway (embedded, or distributed on PostgreSQL and Redis) and two shoppers on the
    mall's web source who granted ``purposes``: one about to withdraw, one staying."""

    gw: Gateway
    web: httpx.Client
    leaving: str
    staying: str

    @classmethod
    def start(
        cls,
        stack: ExitStack,
        request: pytest.FixtureRequest,
        tmp_path: Path,
        backend: str,
        config: str,
        purposes: Sequence[str],
    ) -> TwoShoppers:
        env: dict[str, str] = {}
        if backend == "distributed":
            redis_ns: RedisNamespace = request.getfixturevalue("redis_ns")
            env = {**backend_env("postgres", stack), **redis_ns.env()}
        gw = make_gateway(tmp_path, config=config, extra_env=env).start()
        stack.callback(gw.stop)
        web = stack.enter_context(httpx.Client(base_url=gw.url, auth=(MALL_WEB_KEY, ""), timeout=10))
        tag = uuid.uuid4().hex[:8]
        shoppers = cls(gw, web, f"anon-leaving-{tag}", f"anon-staying-{tag}")
        for anon in (shoppers.leaving, shoppers.staying):
            body = {"anonymousId": anon, "grant": list(purposes), "noticeId": "notice-v1"}
            r = web.post("/v1/consent", json=body)
            assert r.status_code == 200, r.text
        return shoppers

    def send(self, anon: str, count: int) -> list[str]:
        """``count`` events of ``anon`` in one batch, all accepted; their message ids."""
        ids = [mid() for _ in range(count)]
        batch = [{"type": "track", "anonymousId": anon, "event": "Viewed", "messageId": m} for m in ids]
        r = self.web.post("/v1/batch", json={"batch": batch})
        assert r.status_code == 200 and r.json()["accepted"] == count, r.text
        return ids


HOOK_CONFIG = """
[[tenants]]
id = "mall"

[[tenants.sources]]
id = "mall-web"
platform = "web"
dev_write_key = "{key}"

[[tenants.notices]]
id = "notice-v1"
content_sha256 = "{sha}"

[tenants.tracking_plan]
"*" = ["analytics"]

[[tenants.destinations]]
id = "hook"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{url}", timeout_seconds = 1 }}
retry = {{ max_attempts = 1000, initial_backoff_ms = 20, max_backoff_ms = 200 }}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("distributed", marks=[pytest.mark.postgres, pytest.mark.redis])]
)
def test_a_withdrawal_while_the_destination_is_down_stops_its_waiting_events(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The events are in the outbox and being retried against a receiver that is down when
    the person withdraws; when it comes back, none of them is delivered (asked again before
    every attempt), on the embedded outbox and on the Redis stream outbox."""
    with ExitStack() as stack, Receiver(seed=3) as rx:
        rx.down = True
        config = HOOK_CONFIG.format(key=MALL_WEB_KEY, sha="1" * 64, url=rx.webhook_url)
        shop = TwoShoppers.start(stack, request, tmp_path, backend, config, ["analytics"])
        gw, web, leaving, staying, send = shop.gw, shop.web, shop.leaving, shop.staying, shop.send
        gone, kept = send(leaving, 3), send(staying, 3)
        wait_until(lambda: rx.statuses[503] >= 3, what="the gateway retrying the down receiver")
        r = web.post("/v1/consent", json={"anonymousId": leaving, "withdraw": ["analytics"]})
        assert r.status_code == 200, r.text
        # An attempt already past its consent check when the withdrawal was acknowledged may
        # still be on its way; the attempt after it (the second refusal from now on) was
        # asked after the withdrawal, and so is every one after that.
        refused = rx.statuses[503]
        wait_until(lambda: rx.statuses[503] >= refused + 2, what="two more attempts after the withdrawal")
        rx.down = False
        wait_until(lambda: set(kept) <= set(rx.message_ids), timeout=30, what="the staying person's events")
        # everything queued before this one has been through delivery by the time it arrives
        marker = send(staying, 1)
        wait_until(lambda: set(marker) <= set(rx.message_ids), timeout=30, what="the marker event")
        assert not set(gone) & set(rx.message_ids)
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'idgate_delivery_withheld_total{destination="hook"} 3.0' in metrics


PERSONALISATION_CONFIG = """
[[tenants]]
id = "mall"

[[tenants.sources]]
id = "mall-web"
platform = "web"
dev_write_key = "{key}"

[[tenants.notices]]
id = "notice-v1"
content_sha256 = "{sha}"

[tenants.tracking_plan]
"*" = ["analytics", "personalisation"]

[[tenants.destinations]]
id = "hook"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{hook}", timeout_seconds = 1 }}
retry = {{ max_attempts = 1000, initial_backoff_ms = 20, max_backoff_ms = 200 }}

[[tenants.destinations]]
id = "recs"
sink = "webhook"
purposes = ["personalisation"]
options = {{ url = "{recs}", timeout_seconds = 1 }}
retry = {{ max_attempts = 1000, initial_backoff_ms = 20, max_backoff_ms = 200 }}

# gives up at once: its events wait in the dead-letter store until `idgate dlq replay`
[[tenants.destinations]]
id = "parked"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{parked}", timeout_seconds = 1 }}
retry = {{ max_attempts = 2, initial_backoff_ms = 20, max_backoff_ms = 50 }}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("distributed", marks=[pytest.mark.postgres, pytest.mark.redis])]
)
def test_a_withdrawal_of_personalisation_while_events_wait_flags_every_delivery_of_them(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """PIPL Art. 24 asked again at delivery, over real HTTP: the person's events were
    accepted as personalised and are waiting (being retried against receivers that are
    down, or in the dead-letter store) when they withdraw ``personalisation``. The retried
    copies reach the analytics receiver flagged ``personalisation: false``, the
    personalisation-only receiver gets none of them, and a dead-letter replay after the
    withdrawal is flagged too; another person's events keep ``true``. On the embedded outbox
    and on the Redis stream outbox."""
    with ExitStack() as stack:
        hook, recs, parked = (stack.enter_context(Receiver(seed=s)) for s in (3, 4, 5))
        for rx in (hook, recs, parked):
            rx.down = True
        config = PERSONALISATION_CONFIG.format(
            key=MALL_WEB_KEY,
            sha="1" * 64,
            hook=hook.webhook_url,
            recs=recs.webhook_url,
            parked=parked.webhook_url,
        )
        shop = TwoShoppers.start(stack, request, tmp_path, backend, config, ["analytics", "personalisation"])
        gw, web, leaving, staying, send = shop.gw, shop.web, shop.leaving, shop.staying, shop.send

        def dead_letters() -> list[str]:
            listed = idgate(gw, "dlq", "list", "--json", "--destination", "parked")
            assert listed.returncode == 0, listed.stderr
            return [json.loads(line)["messageId"] for line in listed.stdout.splitlines()]

        def flags(rx: Receiver) -> dict[str, bool]:
            return {e["messageId"]: e["context"]["idgate"]["personalisation"] for e in rx.events}

        gone, kept = send(leaving, 3), send(staying, 3)
        wait_until(
            lambda: hook.statuses[503] >= 3 and recs.statuses[503] >= 3,
            what="the gateway retrying the down receivers",
        )
        wait_until(lambda: sorted(dead_letters()) == sorted(gone + kept), timeout=30, what="the dead letters")
        r = web.post("/v1/consent", json={"anonymousId": leaving, "withdraw": ["personalisation"]})
        assert r.status_code == 200, r.text
        # An attempt already past its consent check when the withdrawal was acknowledged may
        # still be on its way; the second refusal from now on was asked after it.
        refused = hook.statuses[503], recs.statuses[503]
        wait_until(
            lambda: hook.statuses[503] >= refused[0] + 2 and recs.statuses[503] >= refused[1] + 2,
            what="two more attempts after the withdrawal",
        )
        hook.down = recs.down = False
        wait_until(lambda: set(gone + kept) <= set(hook.message_ids), timeout=30, what="the retried events")
        assert {m: flags(hook)[m] for m in gone + kept} == {
            **dict.fromkeys(gone, False),
            **dict.fromkeys(kept, True),
        }
        # everything queued before this one has been through delivery by the time it arrives
        marker = send(staying, 1)
        wait_until(lambda: set(kept + marker) <= set(recs.message_ids), timeout=30, what="the marker event")
        assert not set(gone) & set(recs.message_ids)
        assert all(flags(recs).values())

        parked.down = False
        replay = idgate(gw, "dlq", "replay", "--destination", "parked")
        assert replay.returncode == 0, replay.stderr
        wait_until(
            lambda: set(gone + kept) <= set(parked.message_ids), timeout=30, what="the replayed events"
        )
        assert {m: flags(parked)[m] for m in gone + kept} == {
            **dict.fromkeys(gone, False),
            **dict.fromkeys(kept, True),
        }
