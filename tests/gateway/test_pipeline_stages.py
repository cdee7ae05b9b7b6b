"""The ingest pipeline's stages: their order, and dedupe before any side effect.

A client retries a batch when it missed the answer. Everything the first attempt did
(consent records from a consent event, identity links, the outbox append) must not happen
again: the message-id claim comes before every stage that changes something.
"""

from __future__ import annotations

import uuid

import httpx

from gateway.pipeline import (
    STAGES,
    append,
    claim_message_ids,
    collapse_exposures,
    decide_consent,
    detach_identifiers,
    pseudonymise,
    record_consent_signals,
    rekey_on_sight,
    resolve_identity,
)
from tests.conftest import COMPLIANCE_TOKEN, MALL_WEB_KEY, Gateway, mid


def test_the_stages_run_in_the_documented_order() -> None:
    names = [s.__name__ for s in STAGES]
    assert names == [
        # data cleaning (gateway.cleaning): bots and internal networks leave before their
        # identifiers are even pseudonymised
        "clean_traffic",
        "pseudonymise",
        # the suppression list: an erased person's event leaves before anything is stored
        "drop_erased",
        # before the claim: an event the plan keeps must not claim its message id (its replay
        # after a fix would be a duplicate); its record is keyed by message id, so a retried
        # batch keeps nothing twice
        "check_plan",
        "claim_message_ids",
        "rekey_on_sight",
        "record_consent_signals",
        "decide_consent",
        "limit_new_identifiers",
        "resolve_identity",
        # after resolution: an exposure is counted once per unified person, not per device
        "collapse_exposures",
        "transform",
        "encode",
        "append",
        "detach_identifiers",
        "observe_kpis",
    ]
    order = {s: i for i, s in enumerate(STAGES)}
    # nothing that records, links or stores runs before the claim; pseudonymising changes nothing
    assert order[pseudonymise] < order[claim_message_ids]
    assert order[resolve_identity] < order[collapse_exposures]
    for side_effect in (
        rekey_on_sight,
        record_consent_signals,
        decide_consent,
        resolve_identity,
        collapse_exposures,
        append,
        detach_identifiers,
    ):
        assert order[claim_message_ids] < order[side_effect]


def _consent_batch(anon: str, message_id: str) -> dict[str, object]:
    event = {
        "type": "track",
        "event": "Segment Consent Preference Updated",
        "anonymousId": anon,
        "messageId": message_id,
        "context": {"consent": {"categoryPreferences": {"Analytics": True}, "noticeId": "notice-v1"}},
    }
    return {"batch": [event]}


def _records(gateway: Gateway, anon: str) -> list[dict[str, object]]:
    r = httpx.get(
        gateway.url + "/admin/consent/records",
        headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"},
        params={"tenant": "mall", "identifier": anon, "type": "anonymous_id"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    records: list[dict[str, object]] = r.json()["records"]
    return records


def test_a_retried_consent_event_records_nothing_twice(gateway: Gateway) -> None:
    anon, m = f"anon-retry-{uuid.uuid4().hex[:8]}", mid()
    with httpx.Client(base_url=gateway.url, auth=(MALL_WEB_KEY, ""), timeout=10) as client:
        first = client.post("/v1/batch", json=_consent_batch(anon, m))
        assert first.status_code == 200, first.text
        assert (first.json()["accepted"], first.json()["duplicates"]) == (1, 0)
        [recorded] = _records(gateway, anon)
        assert recorded["state"] == "given" and recorded["purposes"] == ["analytics"]

        retry = client.post("/v1/batch", json=_consent_batch(anon, m))  # the SDK missed the answer
        assert retry.status_code == 200, retry.text
        assert (retry.json()["accepted"], retry.json()["duplicates"]) == (0, 1)
    assert _records(gateway, anon) == [recorded]  # no second ledger record
    delivered = gateway.wait_for_sink({m}, "mall-warehouse")
    assert len(delivered) == 1
