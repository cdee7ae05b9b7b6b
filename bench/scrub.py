"""Scrubbing benchmark: what the pseudonymise and transform stages cost per event.

Decodes a batch of Segment events once per round (a typical analytics.js track event with
a page context, and a worst case carrying personal data in every field, tests/canaries.py),
then times ``pseudonymise_identifiers`` + ``scrub_personal_data`` over them in process (no
HTTP, no storage) and prints microseconds per event (median of the rounds). Runs against
whatever ``gateway`` is on PYTHONPATH, so the same script measures a branch before and after:

    PYTHONPATH=/path/to/old /work/main/.venv/bin/python bench/scrub.py
    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/scrub.py [--events 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/identity.py would shadow the identity package: drop the script's own folder
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
if not any(Path(p, "gateway").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Limits, Tenant  # noqa: E402
from gateway.pipeline import pseudonymise_identifiers, scrub_personal_data  # noqa: E402
from gateway.segment import decode_batch  # noqa: E402
from identity.pseudonym import Pseudonymiser  # noqa: E402

KEY = Pseudonymiser(b"bench-scrub-key-" * 2, 1)
TENANT = Tenant(id="bench", external_id_types={"wx_openid": "wechat_openid"})
NOW = datetime(2026, 11, 30, tzinfo=UTC)


def typical(i: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"user-{i}",
        "anonymousId": str(uuid.uuid4()),
        "messageId": f"ajs-next-{uuid.uuid4()}",
        "properties": {"product_id": f"sku-{i}", "price": 19.9, "currency": "CNY", "category": "shoes"},
        "context": {
            "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
            "page": {
                "path": "/products/42",
                "referrer": "https://search.example/?q=shoes",
                "search": "?utm_source=wechat",
                "title": "Running shoes",
                "url": "https://shop.example/products/42?utm_source=wechat",
            },
            "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15",
            "locale": "zh-CN",
            "timezone": "Asia/Shanghai",
            "ip": "203.0.113.77",
        },
    }


def worst(i: int) -> list[dict[str, Any]]:
    from tests.canaries import Canaries

    return Canaries().segment_batch(f"m{i}")


def run(kind: str, n: int, rounds: int) -> float:
    body = (
        [typical(i) for i in range(n)] if kind == "typical" else [e for i in range(n // 4) for e in worst(i)]
    )
    raw = json.dumps({"batch": body}).encode()
    new_signature = len(inspect.signature(scrub_personal_data).parameters) == 3
    times = []
    for _ in range(rounds):
        envs, _, _ = decode_batch(raw, limits=Limits(max_batch_messages=100_000), received_at=NOW)
        t0 = time.process_time()
        for env in envs:
            pseudonymise_identifiers(env, TENANT, KEY)
            if new_signature:
                scrub_personal_data(env, TENANT, KEY)  # type: ignore[call-arg]
            else:
                scrub_personal_data(env)  # type: ignore[call-arg]
        times.append((time.process_time() - t0) / len(envs) * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    print(f"code under test: {Path(inspect.getfile(scrub_personal_data)).resolve()}")
    for kind in ("typical", "worst"):
        us = run(kind, args.events, args.rounds)
        print(f"{kind:8} {us:8.1f} us/event CPU (pseudonymise + transform stages, median of {args.rounds})")


if __name__ == "__main__":
    main()
