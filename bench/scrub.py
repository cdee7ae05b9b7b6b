"""Scrubbing benchmark: what the pseudonymise and transform stages cost per event, in process.

Decodes a batch of Segment events once per round, then times the two stages that touch every
string of an event, ``pseudonymise_identifiers`` (identifier fields, and since issue 12 every
key and string of traits and properties) and ``scrub_personal_data`` (the transform stage: the
rest of the context, integrations, the event name...), separately, with ``time.process_time``
(no HTTP, no storage). The event sets:

* ``bench``: what ``bench/ingest.py`` posts (a userId, "Product Viewed", three properties);
* ``typical``: an analytics.js track event with a page context;
* ``ecommerce``: a realistic Segment e-commerce event from a shop's app or web page ("Order
  Completed", "Product Viewed", "Checkout Started" with a products list, context app / device
  / os / library / network / screen / page / campaign / traits / userAgent, varying values:
  order ids, prices, search terms, URLs);
* ``worst``: personal data planted in every field (tests/canaries.py).

Prints microseconds per event of each stage (median of the rounds, and the spread). Runs
against whatever ``gateway`` is first on PYTHONPATH, so one script measures two checkouts
side by side, also one from before issue 12 (its older stage signatures are recognised):

    PYTHONPATH=/path/to/old .venv/bin/python bench/scrub.py
    .venv/bin/python bench/scrub.py [--events 2000] [--rounds 7] [--sets bench,ecommerce] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import random
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
    sys.path.insert(0, str(_HERE.parent))

from gateway.config import Limits, Tenant  # noqa: E402
from gateway.pipeline import pseudonymise_identifiers, scrub_personal_data  # noqa: E402
from gateway.segment import decode_batch  # noqa: E402
from identity.pseudonym import Pseudonymiser  # noqa: E402

KEY = Pseudonymiser(b"bench-scrub-key-" * 2, 1)
TENANT = Tenant(id="bench", external_id_types={"wx_openid": "wechat_openid"})
NOW = datetime(2026, 11, 30, tzinfo=UTC)
SETS = ("bench", "typical", "ecommerce", "worst")


def bench_event(i: int) -> dict[str, Any]:
    """bench/ingest.py's single event (and each of its batch items)."""
    return {
        "type": "track",
        "userId": f"u-{i % 100000}",
        "event": "Product Viewed",
        "properties": {"product_id": "A1", "sku": "A1", "price": 12.5},
        "messageId": f"m{i}",
        "timestamp": "2026-11-30T08:00:00.000Z",
    }


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


_PRODUCTS = [
    ("507f1f77bcf86cd799439011", "SKU-4412-B", "Trail running shoes", "Shoes/Running", "Lightfoot", 499.0),
    ("505bd76785ebb509fc183733", "SKU-1108-R", "Merino socks, 3 pairs", "Apparel/Socks", "Woolcraft", 89.0),
    ("5c1a0d2e9d3e7a3c2f4b8e91", "SKU-7731-G", "Hydration vest 5L", "Gear/Packs", "Summit", 629.5),
    ("60d5ecb8b392d8a4e0c2a7f3", "SKU-2290-W", "Windproof jacket", "Apparel/Jackets", "Northline", 1299.0),
]
_AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148 MicroMessenger/8.0.44(0x18002c2d) NetType/WIFI Language/zh_CN",
    "Mozilla/5.0 (Linux; Android 14; 23049RAD8C Build/UKQ1.230804.001; wv) AppleWebKit/537.36 (KHTML, "
    "like Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
    "Safari/537.36 Edg/120.0.0.0",
]
_SEARCHES = ["trail shoes", "socks", "越野跑鞋", "jacket waterproof", "hydration vest", "羊毛袜"]


def ecommerce(i: int) -> dict[str, Any]:
    """A Segment e-commerce spec event as a shop's app or page sends it: the context a real
    SDK fills in, a logged-in user's traits, a products list; order ids, prices, searches and
    URLs vary from event to event, user agents and library names repeat."""
    rng = random.Random(i)
    products = [
        {
            "product_id": pid,
            "sku": sku,
            "name": name,
            "category": cat,
            "brand": brand,
            "variant": rng.choice(["black", "blue", "M", "L", "42"]),
            "price": price,
            "quantity": rng.randint(1, 3),
            "position": n + 1,
            "url": f"https://shop.example.cn/p/{sku.lower()}?color={rng.choice(['black', 'blue'])}",
            "image_url": f"https://img.shop.example.cn/{pid}.jpg",
        }
        for n, (pid, sku, name, cat, brand, price) in enumerate(rng.sample(_PRODUCTS, rng.randint(1, 3)))
    ]
    kind = i % 3
    search = rng.choice(_SEARCHES)
    path = ["/checkout/complete", f"/p/{products[0]['sku'].lower()}", "/cart"][kind]
    page_url = (
        f"https://shop.example.cn{path}?utm_source=wechat&utm_medium=social&utm_campaign=w48&from=timeline"
    )
    properties: dict[str, Any] = {
        "order_id": f"SO{20261130000000 + i}",
        "checkout_id": f"co_{uuid.UUID(int=rng.getrandbits(128)).hex[:20]}",
        "affiliation": "WeChat mini shop",
        "total": round(sum(p["price"] * p["quantity"] for p in products), 2),
        "revenue": round(sum(p["price"] * p["quantity"] for p in products) / 1.13, 2),
        "shipping": 0 if rng.random() < 0.6 else 12,
        "tax": 12.5,
        "discount": rng.choice([0, 20, 50]),
        "coupon": rng.choice(["", "WINTER20", "NEWUSER"]),
        "currency": "CNY",
        "payment_method": rng.choice(["wechat_pay", "alipay", "unionpay"]),
        "products": products,
    }
    event = ["Order Completed", "Product Viewed", "Checkout Started"][kind]
    if kind == 1:
        properties = {**products[0], "currency": "CNY", "value": products[0]["price"]}
    uid = f"member-{100000 + i % 5000}"
    return {
        "type": "track",
        "event": event,
        "userId": uid,
        "anonymousId": str(uuid.UUID(int=rng.getrandbits(128))),
        "messageId": f"ajs-next-{uuid.UUID(int=rng.getrandbits(128)).hex}",
        "timestamp": "2026-11-30T08:00:00.000Z",
        "sentAt": "2026-11-30T08:00:00.120Z",
        "properties": properties,
        "context": {
            "active": True,
            "app": {
                "name": "Lightfoot Shop",
                "version": "5.12.0",
                "build": "51200",
                "namespace": "cn.example.shop",
            },
            "campaign": {
                "name": "w48",
                "source": "wechat",
                "medium": "social",
                "term": search,
                "content": "banner-2",
            },
            "device": {
                "id": str(uuid.UUID(int=rng.getrandbits(128))).upper(),
                "manufacturer": "Apple",
                "model": "iPhone15,2",
                "name": "iPhone",
                "type": "ios",
            },
            "library": {"name": "analytics-ios", "version": "4.1.8"},
            "locale": "zh-CN",
            "network": {"bluetooth": False, "carrier": "China Mobile", "cellular": False, "wifi": True},
            "os": {"name": "iOS", "version": "17.1.2"},
            "page": {
                "path": path,
                "referrer": f"https://www.baidu.com/s?wd={search}",
                "search": "?utm_source=wechat&utm_medium=social&utm_campaign=w48&from=timeline",
                "title": f"{products[0]['name']} | Lightfoot",
                "url": page_url,
            },
            "screen": {"width": 390, "height": 844, "density": 3},
            "timezone": "Asia/Shanghai",
            "traits": {
                "member_level": rng.choice(["silver", "gold"]),
                "city": "Shanghai",
                "age_band": "25-34",
            },
            "userAgent": rng.choice(_AGENTS),
            "ip": f"203.0.113.{rng.randint(1, 254)}",
        },
        "integrations": {"All": True, "Sensors": {"project": "production"}},
    }


def _canaries() -> Any:
    """tests/canaries.py of this script's checkout (also when measuring older code)."""
    spec = importlib.util.spec_from_file_location("bench_canaries", _HERE.parent / "tests" / "canaries.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Canaries


def events(kind: str, n: int) -> list[dict[str, Any]]:
    if kind == "bench":
        return [bench_event(i) for i in range(n)]
    if kind == "typical":
        return [typical(i) for i in range(n)]
    if kind == "ecommerce":
        return [ecommerce(i) for i in range(n)]
    canaries = _canaries()
    return [e for i in range(max(1, n // 4)) for e in canaries().segment_batch(f"m{i}")]


def _stages() -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    """The two stages over one envelope, whatever signature this checkout has."""
    if len(inspect.signature(scrub_personal_data).parameters) == 3:

        def transform(env: Any) -> None:
            scrub_personal_data(env, TENANT, KEY)  # type: ignore[call-arg,unused-ignore]

    else:

        def transform(env: Any) -> None:
            scrub_personal_data(env)  # type: ignore[call-arg,unused-ignore]

    def pseudonymise(env: Any) -> None:
        pseudonymise_identifiers(env, TENANT, KEY)

    return pseudonymise, transform


def without_scrubbing() -> None:
    """The stages with every scrubbing walk made a no-op (what is left: identifier fields,
    IP truncation), to tell what the walk itself costs; for this code and for code from
    before issue 12 (``scrub_value`` / ``scrub_text`` over some fields)."""
    import gateway.pipeline as pipeline

    try:
        from gateway.privacy import EventScrubber
    except ImportError:  # before issue 12
        pipeline.scrub_value = lambda value, on_key=None: value  # type: ignore[attr-defined,unused-ignore]
        pipeline.scrub_text = lambda value: value  # type: ignore[attr-defined,unused-ignore]
        return
    EventScrubber.clean = lambda self, value, *args, **kwargs: value  # type: ignore[method-assign]
    EventScrubber.text = lambda self, value, url_pseudonym: value  # type: ignore[method-assign]
    EventScrubber.name = lambda self, key: key  # type: ignore[method-assign]
    pipeline.clean_message_id = lambda message_id, pseudonymiser: message_id


def run(kind: str, n: int, rounds: int) -> dict[str, list[float]]:
    raw = json.dumps({"batch": events(kind, n)}).encode()
    pseudonymise, transform = _stages()
    out: dict[str, list[float]] = {"pseudonymise": [], "transform": [], "both": []}
    for _ in range(rounds):
        envs, rejected, _ = decode_batch(raw, limits=Limits(max_batch_messages=100_000), received_at=NOW)
        assert not rejected, rejected[:1]
        t0 = time.process_time()
        for env in envs:
            pseudonymise(env)
        t1 = time.process_time()
        for env in envs:
            transform(env)
        t2 = time.process_time()
        out["pseudonymise"].append((t1 - t0) / len(envs) * 1e6)
        out["transform"].append((t2 - t1) / len(envs) * 1e6)
        out["both"].append((t2 - t0) / len(envs) * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every round")
    p.add_argument(
        "--no-scrub",
        action="store_true",
        help="make the scrubbing walks no-ops: the stages' cost without them (the difference is the walk's)",
    )
    args = p.parse_args()
    if args.no_scrub:
        without_scrubbing()
    kinds = [k for k in args.sets.split(",") if k]
    if any(k not in SETS for k in kinds):
        p.error(f"--sets takes {', '.join(SETS)}")
    print(
        f"code under test: {Path(inspect.getfile(scrub_personal_data)).resolve()}"
        + (" (scrubbing walks off: --no-scrub)" if args.no_scrub else "")
    )
    print(f"us/event CPU, median of {args.rounds} rounds of {args.events} events [min-max]")
    print(f"{'events':10} {'pseudonymise':>22} {'transform':>22} {'both':>22}")
    report: dict[str, Any] = {}
    for kind in kinds:
        figures = run(kind, args.events, args.rounds)
        report[kind] = figures
        cells = [
            f"{statistics.median(v):7.1f} [{min(v):5.1f}-{max(v):5.1f}]"
            for v in (figures["pseudonymise"], figures["transform"], figures["both"])
        ]
        print(f"{kind:10} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}")
    if args.json:
        print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
    main()
