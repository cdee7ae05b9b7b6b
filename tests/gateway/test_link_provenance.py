"""Identity provenance keeps message ids only as keyed hashes, and makes one only for the
links it records (the common event, whose person is known, needs none)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import Limits
from gateway.events import Envelope
from gateway.pipeline import LinkProvenance
from gateway.privacy import message_id_digest
from gateway.segment import decode_batch
from identity.db import make_engine
from identity.pseudonym import Pseudonymiser
from identity.resolver import GraphResolver
from identity.store import IdentityLogStore, migrate_identity
from tests.identity.test_log_redaction import RULES, ident

KEY = Pseudonymiser(b"provenance-test-key-" * 2, 1)
NOW = datetime(2026, 12, 1, tzinfo=UTC)


class CountingKey:
    """The message-id key, counting the digests made."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, value: str) -> str:
        self.calls += 1
        return KEY(value)


def envelopes(*message_ids: str) -> list[Envelope]:
    batch = [
        {"type": "track", "event": "E", "userId": f"u{i}", "messageId": m} for i, m in enumerate(message_ids)
    ]
    envs, rejected, _ = decode_batch(json.dumps({"batch": batch}).encode(), limits=Limits(), received_at=NOW)
    assert not rejected
    return envs


def test_the_digests_are_the_message_id_hashes() -> None:
    provenance = LinkProvenance("src", envelopes("m-1", "m-2", "m-3"), KEY)
    assert len(provenance) == 3
    assert provenance[1] == ("src", message_id_digest("m-2", KEY))
    assert provenance[-1] == ("src", message_id_digest("m-3", KEY))
    assert provenance[0:2] == [("src", message_id_digest(m, KEY)) for m in ("m-1", "m-2")]
    assert list(provenance) == [("src", message_id_digest(m, KEY)) for m in ("m-1", "m-2", "m-3")]


def test_only_the_links_recorded_make_a_digest(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'identity.sqlite3'}")
        migrate_identity(engine)
        resolver = GraphResolver(IdentityLogStore(engine), RULES)
        await resolver.start()
        try:
            key: Any = CountingKey()  # a Pseudonymiser for LinkProvenance
            first = LinkProvenance("src", envelopes("first-message"), key)
            await resolver.resolve_batch(
                "t", [[ident("user_id:k1.A"), ident("anonymous_id:k1.a")]], [True], first
            )
            assert key.calls == 1
            graph = resolver.graph("t")
            assert graph is not None
            ((_, _, prov),) = graph.explain("user_id:k1.A", "anonymous_id:k1.a") or []
            assert prov.event_id == message_id_digest("first-message", KEY)
            assert "first-message" not in prov.event_id
            # the same person again: nothing to link, no digest made
            again = LinkProvenance("src", envelopes("second-message", "third-message"), key)
            known = [ident("user_id:k1.A"), ident("anonymous_id:k1.a")]
            await resolver.resolve_batch("t", [known, known], [True, True], again)
            assert key.calls == 1
        finally:
            await resolver.stop()
            engine.dispose()

    asyncio.run(scenario())
