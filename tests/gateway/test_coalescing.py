"""Small ingest requests of one source that reach the pipeline in the same turn of the event
loop run as one batch (gateway.pipeline.Ingestor): each request must still be answered with
exactly its own counts, rejections and drops, as if it had run alone.

The requests go straight into the app's ASGI callable (its lifespan run on the test's own
event loop), started together: each handler runs without suspending until it reaches the
pipeline, so they all arrive in one turn of the loop, the way requests read from one poll
of the sockets do under load. The same scenario runs with coalescing off as the control:
the answers must be the same.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar

from gateway.app import create_app
from tests.conftest import APP_KEY, WEB_KEY
from tests.gateway.conftest import in_process_settings
from tests.gateway.test_plan_modes import MODES_PLAN, modes_config
from tests.waiting import async_wait_until

CRAWLER = "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)"
BROWSER = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"


def auth(key: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{key}:".encode())


async def call(
    app: Litestar, method: str, path: str, headers: list[tuple[bytes, bytes]], raw: bytes = b""
) -> tuple[int, bytes]:
    """One request into the ASGI app, as uvicorn hands it over (the body already read)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"idgate"), (b"content-length", str(len(raw)).encode()), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    status, chunks = 0, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def post(
    app: Litestar, key: str, path: str, body: dict[str, Any], agent: str = BROWSER
) -> tuple[int, dict]:
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", auth(key)),
        (b"user-agent", agent.encode()),
    ]
    status, raw = await call(app, "POST", path, headers, json.dumps(body).encode())
    return status, json.loads(raw)


def track(message_id: str, user: str, **extra: Any) -> dict[str, Any]:
    return {"userId": user, "event": "Product Viewed", "messageId": message_id, **extra}


def sink_ids(tmp: Path, destination: str = "warehouse") -> list[str]:
    out = []
    for path in sorted((tmp / "var" / "sinks" / destination).rglob("*.jsonl")):
        out += [json.loads(line)["messageId"] for line in path.read_text().splitlines() if line.strip()]
    return out


def coalesced(metrics_text: str, source: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("idgate_events_coalesced_total{") and f'source="{source}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "control"])
def test_each_coalesced_request_is_answered_with_its_own_counts(tmp_path: Path, coalesce: bool) -> None:
    settings = dataclasses.replace(in_process_settings(tmp_path), ingest_coalesce=coalesce)
    app = create_app(settings)
    run = uuid.uuid4().hex[:8]

    def mid(name: str) -> str:
        return f"{run}-{name}"

    async def scenario() -> tuple[list[tuple[int, dict]], dict[str, float], list[str]]:
        async with app.lifespan():
            # stored before: its retry in the group is a duplicate
            first = await post(app, WEB_KEY, "/v1/track", track(mid("earlier"), f"{run}-u-earlier"))
            assert first[0] == 200 and first[1]["accepted"] == 1, first
            requests = [
                (WEB_KEY, "/v1/track", track(mid("a"), f"{run}-u-a"), BROWSER),
                (WEB_KEY, "/v1/track", track(mid("earlier"), f"{run}-u-earlier"), BROWSER),
                (WEB_KEY, "/v1/track", track(mid("junk"), "undefined"), BROWSER),
                (WEB_KEY, "/v1/track", track(mid("crawler"), f"{run}-u-crawler"), CRAWLER),
                # the same message id and sender as the first request: one of the two is stored
                (WEB_KEY, "/v1/track", track(mid("a"), f"{run}-u-a"), BROWSER),
                (
                    WEB_KEY,
                    "/v1/batch",
                    {
                        "batch": [
                            {"type": "track", **track(mid("b0"), f"{run}-u-b")},
                            {"type": "track", **track(mid("b1"), "null")},
                            {"type": "page", "name": "Home", "userId": f"{run}-u-b", "messageId": mid("b2")},
                        ]
                    },
                    BROWSER,
                ),
                *((WEB_KEY, "/v1/track", track(mid(f"plain{i}"), f"{run}-u-{i}"), BROWSER) for i in range(4)),
                # another source: its own batch
                (APP_KEY, "/v1/track", track(mid("app"), f"{run}-u-app"), BROWSER),
            ]
            before = (await call(app, "GET", "/metrics", []))[1].decode()
            answers = await asyncio.gather(*(post(app, *r) for r in requests))
            after = (await call(app, "GET", "/metrics", []))[1].decode()
            # the counters are the process's: what this scenario added
            runs = {s: coalesced(after, s) - coalesced(before, s) for s in ("shop-web", "shop-app")}
            expected = {mid(n) for n in ("earlier", "a", "b0", "b2", *(f"plain{i}" for i in range(4)))}
            expected |= {mid("app")}

            def all_there() -> list[str]:
                ids = sink_ids(tmp_path)
                return ids if set(ids) >= expected else []

            delivered = await async_wait_until(all_there, what="every accepted event in the warehouse sink")
            return answers, runs, delivered

    answers, runs, delivered = asyncio.run(scenario())
    a, earlier, junk, crawler, a_again, batch, *plain, app_source = answers

    assert a == (200, {**a[1], "accepted": 1, "duplicates": 0, "rejected": [], "dropped": {}})
    assert earlier[0] == 200 and earlier[1]["accepted"] == 0 and earlier[1]["duplicates"] == 1
    # every event of the request rejected: its own 400 naming the field, nobody else's
    assert junk[0] == 400 and junk[1]["error"] == "missing_identity" and junk[1]["field"] == "userId"
    assert [r["index"] for r in junk[1]["rejected"]] == [0] and junk[1]["accepted"] == 0
    # the crawler's user agent is its request's own: only its event is dropped
    assert crawler == (200, {**crawler[1], "accepted": 0, "dropped": {"bot": 1}})
    if coalesce:  # one claim for the batch: the second copy is a duplicate of the first
        assert a_again[0] == 200 and a_again[1]["accepted"] == 0 and a_again[1]["duplicates"] == 1
    else:  # alone, it meets the first request's claim in flight: retry (503), nothing stored
        assert a_again[0] == 503 and a_again[1]["inFlight"] == 1 and a_again[1]["accepted"] == 0
    assert batch[0] == 200 and batch[1]["received"] == 3 and batch[1]["accepted"] == 2
    assert [(r["index"], r["error"]) for r in batch[1]["rejected"]] == [(1, "missing_identity")]
    for answer in [*plain, app_source]:
        assert answer[0] == 200 and answer[1]["accepted"] == 1 and not answer[1]["rejected"], answer

    # each accepted event once, the refused and dropped ones not at all
    stored = [m for m in delivered if m.startswith(run)]
    assert sorted(stored) == sorted(set(stored))
    assert mid("junk") not in stored and mid("crawler") not in stored and mid("b1") not in stored

    if coalesce:
        # the ten shop-web requests ran as one batch; the app source's one alone (not counted)
        assert runs == {"shop-web": 10, "shop-app": 0}
    else:
        assert runs == {"shop-web": 0, "shop-app": 0}


def test_a_client_that_goes_away_does_not_cancel_the_others_events(tmp_path: Path) -> None:
    """The batch runs as its own task: the first request's client disconnecting (its handler
    cancelled) neither fails the others nor loses its own event, which was accepted with
    theirs (at least once: its retry is answered as a duplicate)."""
    app = create_app(in_process_settings(tmp_path))
    run = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        async with app.lifespan():
            tasks = [
                asyncio.create_task(post(app, WEB_KEY, "/v1/track", track(f"{run}-{i}", f"{run}-u-{i}")))
                for i in range(5)
            ]
            await asyncio.sleep(0)  # each handler runs to the pipeline and joins the batch
            tasks[0].cancel()
            answers = await asyncio.gather(*tasks[1:])
            assert all(status == 200 and body["accepted"] == 1 for status, body in answers), answers
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
            await async_wait_until(
                lambda: {f"{run}-{i}" for i in range(5)} <= set(sink_ids(tmp_path)),
                what="all five events in the sink, the cancelled request's too",
            )
            retry = await post(app, WEB_KEY, "/v1/track", track(f"{run}-0", f"{run}-u-0"))
            assert retry[0] == 200 and retry[1]["duplicates"] == 1 and retry[1]["accepted"] == 0

    asyncio.run(scenario())


def test_plan_findings_go_to_the_request_whose_event_broke_the_plan(tmp_path: Path) -> None:
    """The tracking plan's omit and block findings in a coalesced batch: each request's
    ``planViolations`` names its own event only, at its own index."""
    plan = tmp_path / "modes.yaml"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(MODES_PLAN)
    app = create_app(in_process_settings(tmp_path / "gw", modes_config(plan)))
    run = uuid.uuid4().hex[:8]
    good = {"product_id": "sku-1", "quantity": 2}

    def added(name: str, props: dict[str, Any]) -> dict[str, Any]:
        return {
            "anonymousId": f"{run}-anon",
            "event": "Product Added",
            "messageId": f"{run}-{name}",
            "properties": props,
        }

    async def scenario() -> tuple[list[tuple[int, dict]], float]:
        async with app.lifespan():
            before = coalesced((await call(app, "GET", "/metrics", []))[1].decode(), "shop-web")
            requests = [
                added("valid", good),
                added("fixable", {**good, "colour": "red"}),  # omit: the property goes, the event on
                added("missing", {"product_id": "sku-1"}),  # a required property: blocked and kept
                added("valid2", good),
            ]
            answers = await asyncio.gather(*(post(app, WEB_KEY, "/v1/track", r) for r in requests))
            after = coalesced((await call(app, "GET", "/metrics", []))[1].decode(), "shop-web")
            return answers, after - before

    (valid, fixable, missing, valid2), runs = asyncio.run(scenario())
    assert runs == 4  # one batch
    for answer in (valid, valid2):
        assert answer[0] == 200 and answer[1]["accepted"] == 1 and "planViolations" not in answer[1], answer
    assert fixable[0] == 200 and fixable[1]["accepted"] == 1
    assert [(r["index"], r["action"], r["messageId"]) for r in fixable[1]["planViolations"]] == [
        (0, "omitted", f"{run}-fixable")
    ]
    assert missing[0] == 200 and missing[1]["accepted"] == 0
    assert [(r["index"], r["action"], r["messageId"]) for r in missing[1]["planViolations"]] == [
        (0, "kept", f"{run}-missing")
    ]
