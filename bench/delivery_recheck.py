"""What consent asked again at delivery costs: a delivery worker draining the embedded outbox
into a JSONL sink, in process, with the gateway's delivery-time recheck and without it.

Each round grants ``analytics`` and ``personalisation`` to a fresh pool of subjects
(``--subjects``, anonymous-id pseudonyms) in an embedded SQLite consent store, appends N
events of theirs (about 800 bytes of JSON each, shaped like the gateway's, each with its
consent ticket) to a fresh SQLite outbox for one destination declaring ``analytics``, then
times one worker (batches of ``--batch``) from start until the outbox is drained, and the
time spent inside the recheck; and, before the worker starts, the recheck alone on the
first batch (CPU only, the best of 30 calls: the steadiest figure on a busy machine).
Scenarios:

* ``none``: no recheck at all (the ceiling);
* ``fresh``: no restricting record since the events were accepted: the recheck reads the
  restrictive epoch and decodes the tickets, nothing is decided again (the common case);
* ``stale``: one unrelated withdrawal after the events were accepted: every event is
  decided again (one state lookup per batch), none changes;
* ``optout``: ``--optout`` of the subjects withdraw ``personalisation`` after the events
  were accepted: every event is decided again and theirs go out flagged non-personalised
  (on a checkout before that change: sent unchanged). The sink is checked: every event
  arrived, and (where the checkout flags them) exactly the opted-out subjects' flagged.

Scenarios alternate within each round; medians over ``--rounds``. The script only uses the
API that a checkout before the personalisation recheck has too, so running a copy of it
from another checkout's ``bench/`` measures that checkout the same way.

    .venv/bin/python bench/delivery_recheck.py [--events 50000] [--batch 500] [--subjects 1000]
                                               [--optout 0.1] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import msgspec  # noqa: E402
import structlog  # noqa: E402

from consent.db import migrate_consent  # noqa: E402
from consent.decisions import ConsentQuery, ConsentTicket, DestinationSpec  # noqa: E402
from consent.ledger import Ledger  # noqa: E402
from consent.service import ConsentService, LedgerPolicy, PurposeRules  # noqa: E402
from consent.signing import load_signer  # noqa: E402
from consent.state import SqlConsentState  # noqa: E402
from export.delivery import DeliveryService, DeliveryWorker, Recheck  # noqa: E402
from export.file_sinks import JsonlFileSink  # noqa: E402
from export.outbox import OutboxRecord, StoredRecord, stored  # noqa: E402
from export.sqlite_outbox import SqliteOutbox  # noqa: E402
from gateway.consent_setup import delivery_recheck  # noqa: E402
from identity.db import make_engine  # noqa: E402

SCENARIOS = ("none", "fresh", "stale", "optout")
TENANT, DESTINATION = "bench", "warehouse"
PURPOSES = ("analytics", "personalisation")
T0 = 1_763_700_000_000


def event(seq: int, subject: str, person: int) -> dict[str, Any]:
    at_ms = T0 + seq * 10
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms // 1000)) + f".{at_ms % 1000:03d}Z"
    return {
        "type": "track",
        "messageId": str(uuid.UUID(int=seq)),
        "timestamp": at,
        "receivedAt": at,
        "anonymousId": subject,
        "event": "Product Viewed",
        "properties": {
            "sku": f"sku-{seq % 97}",
            "price": seq * 1.5,
            "currency": "CNY",
            "list": [{"sku": "sku-1", "price": 9.9, "position": 2}],
        },
        "context": {
            "ip": "203.0.113.0",
            "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
            "os": {"name": "iOS", "version": "17.2"},
            "app": {"name": "shop", "version": "5.1.0"},
            "library": {"name": "analytics-ios", "version": "4.1.8"},
            "unified_id": f"p_{person:022d}",
            "idgate": {
                "tenant": TENANT,
                "source": "app",
                "platform": "app",
                "keyVersion": 1,
                "purposes": list(PURPOSES),
                "consentProof": [seq],
                "personalisation": True,
            },
        },
    }


class Round:
    """One round's stores: a consent store with a fresh pool of subjects, and an outbox."""

    def __init__(self, root: Path, subjects: int, batch: int) -> None:
        self.root = root
        self.batch = batch
        self.engine = make_engine(f"sqlite:///{root / 'consent.sqlite3'}")
        migrate_consent(self.engine)
        ledger = Ledger(self.engine, load_signer(env_value=None, key_file=None, dev_file=root / "ledger-key"))
        self.store = SqlConsentState(self.engine)
        kinds = dict.fromkeys(("necessary_service", "marketing", *PURPOSES), "general")
        rules = {TENANT: PurposeRules(contract=frozenset({"necessary_service"}), kinds=kinds)}
        self.service = ConsentService(ledger, self.store, rules)
        self.policy = LedgerPolicy(self.store, rules)
        self.spec = DestinationSpec(DESTINATION, ("analytics",), overseas=False, third_party=False)
        self.subjects = [f"k1.{uuid.uuid4().hex[:22]}" for _ in range(subjects)]

    async def consent(self, subject: str, grant: Sequence[str] = (), withdraw: Sequence[str] = ()) -> None:
        await self.service.record(
            tenant=TENANT,
            identifiers=[("anonymous_id", subject)],
            grant=grant,
            withdraw=withdraw,
            notice_id="notice-v1" if grant else None,
            source="app",
            platform="app",
        )

    async def prepare(self, outbox: SqliteOutbox, events: int) -> None:
        await self.service.publish_notice(TENANT, "notice-v1", "1" * 64)
        for s in self.subjects:
            await self.consent(s, grant=PURPOSES)
        queries = {
            s: ConsentQuery(tenant=TENANT, device_ids=(s,), user_ids=(), purposes=PURPOSES)
            for s in self.subjects
        }
        decisions = await self.policy.decide_batch(list(queries.values()), [self.spec])
        tickets = {
            s: msgspec.json.encode(ConsentTicket(d.epoch, q))
            for (s, q), d in zip(queries.items(), decisions, strict=True)
        }
        assert all(DESTINATION in d.destinations for d in decisions)
        chunk: list[OutboxRecord] = []
        self.first: list[StoredRecord] = []  # the first batch, for the recheck alone
        for seq in range(1, events + 1):
            person = seq % len(self.subjects)
            subject = self.subjects[person]
            body = event(seq, subject, person)
            chunk.append(
                OutboxRecord(
                    tenant=TENANT,
                    source="app",
                    message_id=body["messageId"],
                    received_at_ms=T0 + seq * 10,
                    destinations=(DESTINATION,),
                    payload=json.dumps(body, separators=(",", ":")).encode(),
                    consent=tickets[subject],
                    proof=(seq,),
                    person=f"p_{person:022d}",
                )
            )
            if len(self.first) < self.batch:
                self.first.append(stored(seq, chunk[-1]))
            if len(chunk) == 5_000:
                await outbox.append(chunk, dedupe=False)
                chunk = []
        if chunk:
            await outbox.append(chunk, dedupe=False)

    def close(self) -> None:
        self.engine.dispose()


class TimedRecheck:
    def __init__(self, inner: Recheck) -> None:
        self.inner = inner
        self.seconds = 0.0

    async def __call__(self, destination: str, records: Sequence[StoredRecord]) -> Any:
        started = time.perf_counter()
        try:
            return await self.inner(destination, records)
        finally:
            self.seconds += time.perf_counter() - started


async def run_scenario(
    scenario: str, root: Path, events: int, batch: int, subjects: int, optout: float
) -> dict[str, Any]:
    stores = Round(root, subjects, batch)
    outbox = SqliteOutbox(root / "outbox.sqlite3")
    outbox.open()
    try:
        await stores.prepare(outbox, events)
        opted = set(stores.subjects[: int(len(stores.subjects) * optout)]) if scenario == "optout" else set()
        if scenario == "stale":  # one unrelated withdrawal: the epoch moves past every ticket
            await stores.consent(stores.subjects[0], withdraw=["marketing"])
        for s in opted:
            await stores.consent(s, withdraw=["personalisation"])
        recheck = (
            None
            if scenario == "none"
            else TimedRecheck(delivery_recheck(stores.policy, {DESTINATION: stores.spec}))
        )
        alone = 0.0
        if recheck is not None:  # CPU only: the best of 30 calls on the first batch
            inner, first = recheck.inner, stores.first
            calls = []
            for _ in range(30):
                started = time.perf_counter()
                await inner(DESTINATION, first)
                calls.append(time.perf_counter() - started)
            alone = min(calls) / len(first) * 1e6
        worker = DeliveryWorker(
            outbox.queue(DESTINATION),
            JsonlFileSink(root / "sinks", DESTINATION),
            batch_size=batch,
            poll_seconds=0.01,
            linger_seconds=0.0,
            recheck=recheck,
        )
        delivery = DeliveryService(outbox, [worker], prune_seconds=3600, checkpoint_seconds=3600)
        started = time.perf_counter()
        await delivery.start()
        while await outbox.pending():
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
        await delivery.stop()
        lines = [
            msgspec.json.decode(line)
            for f in (root / "sinks" / DESTINATION).glob("*.jsonl")
            for line in f.read_bytes().splitlines()
        ]
        if len(lines) != events:
            raise RuntimeError(f"{scenario}: the sink holds {len(lines)} events, {events} were appended")
        flagged = [e for e in lines if e["context"]["idgate"]["personalisation"] is False]
        if flagged and {e["anonymousId"] for e in flagged} != opted:
            raise RuntimeError(f"{scenario}: flagged the wrong subjects")
        return {
            "events_per_s": events / elapsed,
            "recheck_us_per_event": (recheck.seconds / events * 1e6) if recheck is not None else 0.0,
            "recheck_alone_us_per_event": alone,
            "flagged": len(flagged),
        }
    finally:
        outbox.close()
        stores.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--subjects", type=int, default=1_000)
    parser.add_argument(
        "--optout", type=float, default=0.1, help="share of subjects withdrawing personalisation"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    for r in range(args.rounds):
        for scenario in SCENARIOS:
            with tempfile.TemporaryDirectory(prefix="idgate-bench-recheck-") as tmp:
                out = asyncio.run(
                    run_scenario(scenario, Path(tmp), args.events, args.batch, args.subjects, args.optout)
                )
            results[scenario].append(out)
            print(
                f"round {r + 1} {scenario:<6} {out['events_per_s']:>9,.0f} events/s  "
                f"recheck {out['recheck_us_per_event']:5.2f} us/event "
                f"(alone {out['recheck_alone_us_per_event']:5.2f})  flagged {out['flagged']}",
                file=sys.stderr,
            )
    summary = {
        s: {
            "events_per_s": statistics.median(o["events_per_s"] for o in outs),
            "recheck_us_per_event": statistics.median(o["recheck_us_per_event"] for o in outs),
            "recheck_alone_us_per_event": statistics.median(o["recheck_alone_us_per_event"] for o in outs),
            "flagged": outs[-1]["flagged"],
        }
        for s, outs in results.items()
    }
    print(
        f"{args.events:,} events, batches of {args.batch}, {args.subjects:,} subjects, "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'scenario':<8} {'events/s':>10} {'recheck us/event':>17} {'alone us/event':>15} {'flagged':>8}")
    for s, v in summary.items():
        print(
            f"{s:<8} {v['events_per_s']:>10,.0f} {v['recheck_us_per_event']:>17.2f} "
            f"{v['recheck_alone_us_per_event']:>15.2f} {v['flagged']:>8}"
        )
    if args.json:
        print(json.dumps({"args": vars(args), "medians": summary}))


if __name__ == "__main__":
    main()
