"""Tracking plan benchmark: what the ``check_plan`` stage costs per event on the seed plan.

Decodes Segment events once (a valid "Product Added", a valid "Order Completed" with three
products, a "Product Added" with a string price, an unplanned event), runs
``pseudonymise_identifiers`` + ``scrub_personal_data`` over them (the per-event work the
pipeline already does in process, as a yardstick), then times the ``check_plan`` stage in
observe mode over batches of 1 and of 100 events, and prints microseconds per event (median
of the rounds) and the stage's cost relative to the yardstick. In process: no HTTP, no
storage (a kept event's write is only in ``enforce`` mode and only for violating events).

    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/plan.py [--events 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# bench/identity.py would shadow the identity package: drop the script's own folder
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
if not any(Path(p, "gateway").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402

from gateway.config import Limits, ResolvedSource, Source, Tenant  # noqa: E402
from gateway.events import Envelope  # noqa: E402
from gateway.pipeline import (  # noqa: E402
    IngestBatch,
    IngestResult,
    check_plan,
    pseudonymise_identifiers,
    scrub_personal_data,
)
from gateway.plan import plan_for  # noqa: E402
from gateway.plan_monitor import PlanMonitor  # noqa: E402
from gateway.segment import decode_batch  # noqa: E402
from identity.pseudonym import Pseudonymiser  # noqa: E402

KEY = Pseudonymiser(b"bench-plan-key--" * 2, 1)
SEED = _HERE.parent / "plans" / "ecommerce.yaml"
TENANT = Tenant(id="bench", tracking_plan_file=str(SEED), plan_mode="observe")
SOURCE = ResolvedSource(tenant=TENANT, source=Source(id="bench-web", platform="web"), destinations=())
NOW = datetime(2026, 11, 30, tzinfo=UTC)


def message(i: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "anonymousId": str(uuid.uuid4()),
        "messageId": f"ajs-next-{uuid.uuid4()}",
        "context": {"library": {"name": "analytics.js", "version": "npm:next-1.70.0"}, "locale": "zh-CN"},
    }
    kind = i % 4
    if kind == 0:
        base.update(
            event="Product Added", properties={"product_id": f"sku-{i}", "price": 19.9, "quantity": 1}
        )
    elif kind == 1:
        products = [{"product_id": f"sku-{i}-{k}", "price": 9.5, "quantity": 2} for k in range(3)]
        base.update(
            event="Order Completed",
            properties={"order_id": f"o-{i}", "total": 57, "currency": "CNY", "products": products},
        )
    elif kind == 2:
        base.update(
            event="Product Added", properties={"product_id": f"sku-{i}", "price": "19.9", "quantity": 1}
        )
    else:
        base.update(event="Wishlist Shared", properties={"list": f"l-{i}"})
    return base


def decoded(body: bytes, n: int) -> list[Envelope]:
    envs, _, _ = decode_batch(body, limits=Limits(max_batch_messages=n + 1), received_at=NOW)
    return list(envs)


def prepared(body: bytes, n: int) -> list[Envelope]:
    """The events as check_plan sees them: pseudonymised."""
    envs = decoded(body, n)
    for env in envs:
        pseudonymise_identifiers(env, TENANT, KEY)
    return envs


def time_scrub(body: bytes, n: int) -> float:
    envs = decoded(body, n)
    start = time.perf_counter()
    for env in envs:
        pseudonymise_identifiers(env, TENANT, KEY)
        scrub_personal_data(env, TENANT, KEY)
    return (time.perf_counter() - start) / len(envs)


def time_check(envs: list[Envelope], batch_size: int) -> float:
    # the gateway's plan monitor counts each event (coverage, live tail); no store: in memory
    services: Any = SimpleNamespace(
        encoder=msgspec.json.Encoder(), violations=None, plan_monitor=PlanMonitor(None)
    )
    batches = [envs[k : k + batch_size] for k in range(0, len(envs), batch_size)]

    async def run() -> float:
        start = time.perf_counter()
        for part in batches:
            await check_plan(services, IngestBatch(SOURCE, list(part), [IngestResult(len(part))], KEY))
        return time.perf_counter() - start

    return asyncio.run(run()) / len(envs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    plan = plan_for(TENANT)
    assert plan is not None
    body = msgspec.json.encode({"batch": [message(i) for i in range(args.events)]})
    envs = prepared(body, args.events)
    scrub = statistics.median(time_scrub(body, args.events) for _ in range(args.rounds))
    # the event loop's own cost of a stage call, per batch, is part of the single-event figure
    single = statistics.median(time_check(envs, 1) for _ in range(args.rounds))
    batched = statistics.median(time_check(envs, 100) for _ in range(args.rounds))
    valid = [e for e in envs if e.index % 4 in (0, 1)]
    only_valid = statistics.median(time_check(valid, 100) for _ in range(args.rounds))
    wrong = [e for e in envs if e.index % 4 == 2]
    only_wrong = statistics.median(time_check(wrong, 100) for _ in range(args.rounds))
    print(f"plan {plan.name} v{plan.version}: {len(plan.events)} events; {args.events} events a round")
    print(
        "mix: 1/4 valid Product Added, 1/4 valid Order Completed (3 products), "
        "1/4 string price, 1/4 unplanned"
    )
    print(f"  pseudonymise + scrub (yardstick)  {scrub * 1e6:8.2f} us/event")
    print(
        f"  check_plan, batches of 1          {single * 1e6:8.2f} us/event  "
        f"({single / scrub:6.1%} of the yardstick)"
    )
    print(f"  check_plan, batches of 100        {batched * 1e6:8.2f} us/event  ({batched / scrub:6.1%})")
    print(
        f"  check_plan, valid events only     {only_valid * 1e6:8.2f} us/event  ({only_valid / scrub:6.1%})"
    )
    print(
        f"  check_plan, string price only     {only_wrong * 1e6:8.2f} us/event  ({only_wrong / scrub:6.1%})"
    )


if __name__ == "__main__":
    main()
