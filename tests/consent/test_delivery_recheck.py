"""Consent is asked again at delivery: an event already in the outbox when a withdrawal
lands is not sent for the withdrawn purpose."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from consent.db import migrate_consent
from consent.decisions import ConsentQuery, ConsentTicket
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
from tests.conftest import TEST_CONFIG
from tests.waiting import async_wait_until


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
