"""A tracking plan's ``identifier`` and ``contact`` properties are pseudonymised wherever
they appear (issue 14, item 1): at any depth of an event's properties, in another event
that does not plan them, in identify traits and in context traits; one value is one
pseudonym in all of them. In process, through the ingest stage that does it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import Limits, Tenant
from gateway.pipeline import pseudonymise_identifiers
from gateway.segment import decode_batch
from identity.pseudonym import Pseudonymiser

PLAN = """
plan: classes
version: 1
events:
  product_viewed:
    description: A product detail page was shown.
    owner: merchandising
    purposes: [analytics]
    legal_basis: consent
    segment: ["Product Viewed"]
    properties:
      sku: {class: none, type: string}
      stylist_wechat: {class: contact, type: string}
      member_code: {class: identifier, type: string}
"""
KEY = Pseudonymiser(b"plan-data-class-key" * 2, 1)
STYLIST = "wxid_stylist_8841"
MEMBER = "M-20261111-0042"


def pseudonymised(tmp_path: Path, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plan = tmp_path / "classes.yaml"
    plan.write_text(PLAN)
    tenant = Tenant(id="classes", tracking_plan_file=str(plan))
    for i, m in enumerate(messages):
        m.update(anonymousId="anon-classes-1", messageId=f"m-{i}")
    envs, rejected, _ = decode_batch(
        msgspec.json.encode({"batch": messages}), limits=Limits(), received_at=datetime.now(UTC)
    )
    assert not rejected
    for env in envs:
        pseudonymise_identifiers(env, tenant, KEY)
    return [msgspec.json.decode(msgspec.json.encode(env.event)) for env in envs]


def test_identifier_and_contact_properties_are_pseudonymised_wherever_they_appear(tmp_path: Path) -> None:
    both = {"stylist_wechat": STYLIST, "member_code": MEMBER}
    events = pseudonymised(
        tmp_path,
        [
            {
                "type": "track",
                "event": "Product Viewed",
                "properties": {"sku": "A1", **both, "stylist": dict(both), "history": [dict(both)]},
            },
            {"type": "track", "event": "Wishlist Shared", "properties": dict(both)},
            {"type": "identify", "traits": dict(both)},
            {"type": "track", "event": "Product Viewed", "context": {"traits": dict(both)}},
        ],
    )
    text = msgspec.json.encode(events).decode()
    assert STYLIST not in text and MEMBER not in text
    viewed, other, identify, in_context = events
    props = viewed["properties"]
    assert props["sku"] == "A1"  # class none: as sent
    found = [
        props,
        props["stylist"],
        props["history"][0],
        other["properties"],
        identify["traits"],
        in_context["context"]["traits"],
    ]
    stylist = {f["stylist_wechat"] for f in found}
    member = {f["member_code"] for f in found}
    assert len(stylist) == len(member) == 1  # one value, one pseudonym, wherever it was
    assert stylist.pop().startswith("k1.") and member.pop().startswith("k1.")
