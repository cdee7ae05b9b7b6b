"""Data-cleaning benchmark: what gateway.cleaning costs per event, in process.

Decodes a batch of Segment events once per round (analytics.js track events with a page
context and a browser user agent, as in bench/scrub.py) and times, CPU per event (median
of the rounds):

- ``clean_traffic``'s checks (bot user agent, internal networks, timestamp skew) with a
  tenant's full cleaning config, for user agents that repeat (a shop's real mix: a few
  hundred browser builds; crawlerdetect keeps a bounded cache) and for user agents that
  are all different (every check a cache miss: the worst case);
- the pseudonymise stage with and without the tenant's blocked identifiers and QA ids
  (the difference is what they cost), beside the stage itself for scale.

    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/cleaning.py [--events 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/identity.py would shadow the identity package: drop the script's own folder
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
if not any(Path(p, "gateway").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.cleaning import RequestOrigin, TrafficCleaner, drop_reason  # noqa: E402
from gateway.config import CleaningConfig, InternalId, Limits, ResolvedSource, Source, Tenant  # noqa: E402
from gateway.events import Envelope  # noqa: E402
from gateway.pipeline import pseudonymise_identifiers  # noqa: E402
from gateway.segment import decode_batch  # noqa: E402
from identity.pseudonym import Pseudonymiser  # noqa: E402

KEY = Pseudonymiser(b"bench-cleaning-key" * 2, 1)
NOW = datetime(2026, 11, 30, tzinfo=UTC)
CLEANING = CleaningConfig(
    bot_patterns=["MyUptimeProbe/", "internal-crawler"],
    internal_ids=[InternalId(type="user_id", value=f"qa-{i:03}") for i in range(20)],
    internal_networks=["10.20.0.0/16", "192.168.0.0/16", "2001:db8:77::/48"],
    blocked_identifiers=["test", "12345678", "demo"],
    blocked_identifier_patterns=["demo-[0-9]+", "tester.*"],
)
TENANT = Tenant(id="bench", cleaning=CLEANING)
SOURCE = ResolvedSource(TENANT, Source(id="web", platform="web"), ())
ORIGIN = RequestOrigin("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)", "203.0.113.77")


def event(i: int, agents: int) -> dict[str, Any]:
    build = i % agents
    return {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"user-{i}",
        "anonymousId": str(uuid.uuid4()),
        "messageId": f"ajs-next-{uuid.uuid4()}",
        "properties": {"product_id": f"sku-{i}", "price": 19.9, "currency": "CNY"},
        "context": {
            "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
            "page": {"path": "/products/42", "url": "https://shop.example/products/42"},
            "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
            f"(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.{build} NetType/WIFI Language/zh_CN",
            "ip": "203.0.113.77",
        },
    }


def timed(raw: bytes, rounds: int, work: Callable[[list[Envelope]], None]) -> float:
    times = []
    for _ in range(rounds):
        envs, _, _ = decode_batch(raw, limits=Limits(max_batch_messages=100_000), received_at=NOW)
        t0 = time.process_time()
        work(envs)
        times.append((time.process_time() - t0) / len(envs) * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    n = args.events

    def checks(cleaner: TrafficCleaner) -> Callable[[list[Envelope]], None]:
        def run(envs: list[Envelope]) -> None:
            for env in envs:
                if drop_reason(env.event, SOURCE, ORIGIN, cleaner) is None:
                    cleaner.has_skewed_timestamp(env.event)

        return run

    rows = []
    for label, agents in (("repeating user agents (300)", 300), ("all different user agents", n)):
        raw = json.dumps({"batch": [event(i, agents) for i in range(n)]}).encode()
        # a fresh cleaner per round would measure the cache's warm-up: one per run, as in idgate
        cleaner = TrafficCleaner.compile(CLEANING)
        if agents == n:
            # every round sees user agents the cache has not: make them unique per round
            def unique(envs: list[Envelope], c: TrafficCleaner = cleaner) -> None:
                for env in envs:
                    env.event.context["userAgent"] += uuid.uuid4().hex[:8]
                checks(c)(envs)

            # the suffixing is timed with it: measure it alone and take it off
            def suffix_only(envs: list[Envelope]) -> None:
                for env in envs:
                    env.event.context["userAgent"] += uuid.uuid4().hex[:8]

            us = timed(raw, args.rounds, unique) - timed(raw, args.rounds, suffix_only)
        else:
            us = timed(raw, args.rounds, checks(cleaner))
        rows.append((f"clean_traffic checks, {label}", us))

    raw = json.dumps({"batch": [event(i, 300) for i in range(n)]}).encode()
    cleaner = TrafficCleaner.compile(CLEANING)
    internal = cleaner.internal_pseudonyms(KEY)

    def plain(envs: list[Envelope]) -> None:
        for env in envs:
            pseudonymise_identifiers(env, TENANT, KEY)

    def with_cleaning(envs: list[Envelope]) -> None:
        for env in envs:
            pseudonymise_identifiers(env, TENANT, KEY, blocked=cleaner.is_blocked_identifier)
            any(i.value in internal for i in env.identifiers)

    base = timed(raw, args.rounds, plain)
    rows.append(("pseudonymise stage alone (for scale)", base))
    rows.append(("  + blocked identifiers and QA ids", timed(raw, args.rounds, with_cleaning) - base))
    for label, us in rows:
        print(f"{label:48} {us:7.2f} us/event CPU (median of {args.rounds}, {n} events)")


if __name__ == "__main__":
    main()
