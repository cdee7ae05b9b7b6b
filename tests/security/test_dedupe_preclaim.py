"""Attack: pre-claiming a predictable message id so that another device's event is dropped.

Dedupe used to key on (source, messageId) only. Message ids are often predictable (an
order number, a counter), so anyone with the public write key could send them first and
the victim's later events with those ids were answered "duplicate" and never stored. The
claim is now scoped by the sender's pseudonyms: the victim's event is accepted, and a
retry of it (same device, same message id) is still a duplicate.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from tests.conftest import WEB_KEY, RedisNamespace, make_gateway
from tests.gateway.conftest import in_process_app


def preclaim_then_victim(client: httpx.Client | TestClient) -> None:  # type: ignore[type-arg]
    message_id = f"order-{uuid.uuid4().hex[:8]}"  # the predictable id the victim will use
    attacker = {"anonymousId": f"attacker-{uuid.uuid4().hex[:8]}", "event": "Order Completed"}
    victim = {"anonymousId": f"victim-{uuid.uuid4().hex[:8]}", "event": "Order Completed"}
    r = client.post("/v1/track", json={**attacker, "messageId": message_id}, auth=(WEB_KEY, ""))
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text

    r = client.post("/v1/track", json={**victim, "messageId": message_id}, auth=(WEB_KEY, ""))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["duplicates"] == 0, r.text

    # the victim's SDK retries (a lost response): still a duplicate, nothing stored twice
    r = client.post("/v1/track", json={**victim, "messageId": message_id}, auth=(WEB_KEY, ""))
    assert r.status_code == 200 and r.json()["duplicates"] == 1 and r.json()["accepted"] == 0, r.text
    # and the attacker's own retry too
    r = client.post("/v1/track", json={**attacker, "messageId": message_id}, auth=(WEB_KEY, ""))
    assert r.json()["duplicates"] == 1, r.text


def test_preclaimed_message_id_does_not_suppress_another_device_embedded(tmp_path: Path) -> None:
    with TestClient(in_process_app(tmp_path)) as client:
        preclaim_then_victim(client)


@pytest.mark.slow
def test_preclaimed_message_id_does_not_suppress_another_device_across_replicas(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """Distributed dedupe (claims in Redis): the attacker claims on one replica, the victim
    sends and retries through the other."""
    a = make_gateway(tmp_path / "a", extra_env=redis_ns.env()).start()
    b = make_gateway(tmp_path / "b", extra_env=redis_ns.env()).start()
    try:
        message_id = f"order-{uuid.uuid4().hex[:8]}"
        attacker = {
            "anonymousId": f"attacker-{uuid.uuid4().hex[:8]}",
            "event": "Paid",
            "messageId": message_id,
        }
        victim = {"anonymousId": f"victim-{uuid.uuid4().hex[:8]}", "event": "Paid", "messageId": message_id}
        with a.client() as ca, b.client() as cb:
            assert ca.post("/v1/track", json=attacker).json()["accepted"] == 1
            r = cb.post("/v1/track", json=victim)
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
            r = ca.post("/v1/track", json=victim)
            assert r.status_code == 200 and r.json()["duplicates"] == 1, r.text
    finally:
        a.stop()
        b.stop()
