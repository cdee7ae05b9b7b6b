"""Personal data cannot leave in any field (in process): every key and string of a Segment
or Sensors event, after the pseudonymise and transform stages, is a pseudonym, a field known
to be safe, or scrubbed. The sinks, the outbox, the ledger, Redis and PostgreSQL are scanned
end to end in tests/e2e/test_canary_every_field.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from gateway.config import IdentityConfig, Limits, Tenant, parse_config
from gateway.events import Envelope
from gateway.pipeline import pseudonymise_identifiers, scrub_personal_data
from gateway.privacy import EventScrubber, clean_message_id, message_id_digest
from gateway.segment import decode_batch
from gateway.sensors import decode_events
from identity.pseudonym import Pseudonymiser
from tests.canaries import Canaries

NOW = datetime(2026, 11, 30, tzinfo=UTC)
KEY = Pseudonymiser(b"privacy-test-key" * 2, 1)
TENANT = Tenant(id="t", external_id_types={"wx_openid": "wechat_openid"})


def run_stages(envs: list[Envelope], tenant: Tenant = TENANT) -> list[dict]:
    out = []
    for env in envs:
        pseudonymise_identifiers(env, tenant, KEY)
        scrub_personal_data(env, tenant, KEY)
        out.append(msgspec.to_builtins(env.event))
    return out


def test_no_personal_data_in_any_segment_field() -> None:
    c = Canaries()
    batch = c.segment_batch("m")
    envs, rejected, _ = decode_batch(json.dumps({"batch": batch}).encode(), limits=Limits(), received_at=NOW)
    assert not rejected
    events = run_stages(envs)
    text = json.dumps(events, ensure_ascii=False)
    c.assert_nowhere(text, "the events as they leave")
    c.assert_nowhere(json.dumps(events), "the events as they leave (ASCII JSON)")
    track, page, identify, group = events
    ctx = track["context"]
    # safe fields pass as sent; the rest is scrubbed or pseudonymised
    assert ctx["channel"] == "browser" and ctx["locale"] == "zh-CN" and ctx["timezone"] == "Asia/Shanghai"
    assert ctx["os"]["version"] == "17.1" and ctx["device"]["type"] == "ios"
    assert ctx["library"]["version"] == "[redacted:phone]"  # a version's shape, but a phone
    assert ctx["device"]["token"].startswith("k1.") and ctx["device"]["token"] in envs[0].pseudonyms
    assert ctx["location"]["latitude"] == 31.2 and ctx["network"]["wifi"] is True
    assert ctx["ip"] == "203.0.113.0"
    assert ctx["traits"]["wx_openid"].startswith("k1.")
    assert ctx["externalIds"][0]["collection"] == "users [redacted:email]"
    # identifier-like keys by pattern, on properties and traits
    for key in ("wechat_openid", "buyer_openid", "union_id", "member_id", "customer_id"):
        assert track["properties"][key].startswith("k1."), key
        assert identify["traits"][key].startswith("k1."), key
    # keys: a phone, an email, an ID card in a key are replaced
    assert "tel_redacted_phone" in track["properties"] and "redacted_email" in track["properties"]
    assert "id_redacted_id_card" in track["properties"]["nested"]
    assert "kredacted_phone" in track["integrations"]
    # URL query parameters that are identifiers: pseudonymised, the rest kept
    url = track["properties"]["url"]
    assert "q=shoes" in url and "openid=k1." in url and "uid=k1." in url and "union_id=k1." in url
    assert ctx["page"]["search"].startswith("?openid=k1.")
    assert ctx["page"]["path"] == "/u/[redacted:phone]"
    assert track["event"] == "Bought for redacted_phone"
    assert page["category"] == "cat [redacted:phone]" and page["name"] == "Checkout [redacted:email]"
    assert group["groupId"] == "group [redacted:phone]"
    # the message id held a phone: a keyed hash of it, the same on a retry
    assert track["messageId"] == message_id_digest(c.ids["message_id"], KEY)
    assert page["messageId"] == batch[1]["messageId"]  # nothing personal: as sent


def test_no_personal_data_in_any_sensors_field() -> None:
    c = Canaries()
    payload = json.dumps(c.sensors_batch(1)).encode()
    decoded = decode_events(payload, single=False, limits=Limits(), received_at=NOW, derive=KEY, project="p")
    assert not decoded.rejected, decoded.rejected
    events = run_stages(decoded.envelopes)
    c.assert_nowhere(json.dumps(events, ensure_ascii=False), "the Sensors events as they leave")
    track = events[0]
    lib = track["context"]["sensors"]["lib"]
    assert lib["$lib"] == "MiniProgramredacted_phone" or "[redacted:phone]" in lib["$lib"]
    assert lib["$lib_method"] == "code [redacted:email]"
    assert lib["$app_version"] == "[redacted:phone]"
    assert "p_redacted_phone" in track["properties"] and "idredacted_id_card" in track["properties"]
    assert track["event"] == "Buyredacted_phone"
    assert "openid=k1." in track["properties"]["$url"] and "uid=k1." in track["properties"]["$url"]
    assert track["properties"]["$url_query"].startswith("openid=k1.")


def test_identifier_keys_are_configurable_per_tenant() -> None:
    tenant = Tenant(id="t2", identity=IdentityConfig(identifier_keys=["vip_no", "*_loyalty_card"]))
    batch = [
        {
            "type": "track",
            "userId": "u-1",
            "event": "E",
            "properties": {"vip_no": "V12345678", "shop_loyalty_card": "L-1", "sku": "S-1"},
            "context": {"page": {"url": "https://x.example/?vip_no=V12345678&sku=S-1"}},
        }
    ]
    envs, _, _ = decode_batch(json.dumps({"batch": batch}).encode(), limits=Limits(), received_at=NOW)
    (event,) = run_stages(envs, tenant)
    props = event["properties"]
    assert props["vip_no"].startswith("k1.") and props["shop_loyalty_card"].startswith("k1.")
    assert props["sku"] == "S-1"
    assert "V12345678" not in event["context"]["page"]["url"] and "sku=S-1" in event["context"]["page"]["url"]


def test_identifier_keys_come_from_the_tenant_config() -> None:
    config = parse_config(
        """
[[tenants]]
id = "t3"
consent = { enforce = false }
[tenants.identity]
identifier_keys = ["vip_no"]
[[tenants.sources]]
id = "w"
platform = "web"
dev_write_key = "w-key-000000001"
""",
        dev=True,
    )
    (tenant,) = config.tenants
    assert tenant.identity.identifier_keys == ["vip_no"]
    envs, _, _ = decode_batch(
        json.dumps({"batch": [{"type": "identify", "userId": "u", "traits": {"VIP_NO": "V1"}}]}).encode(),
        limits=Limits(),
        received_at=NOW,
    )
    (event,) = run_stages(envs, tenant)
    assert event["traits"]["VIP_NO"].startswith("k1.")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("wechat_openid", True),
        ("buyer_openid", True),
        ("buyerOpenId", True),
        ("union_id", True),
        ("wxUnionId", True),
        ("member_id", True),
        ("memberId", True),
        ("customer_id", True),
        ("buyer_id", True),
        ("$identity_member_id", True),
        ("product_id", False),
        ("order_id", False),
        ("phone_brand", False),
        ("iphone_model", False),
    ],
)
def test_identifier_keys_by_pattern(key: str, expected: bool) -> None:
    assert EventScrubber().identifier_keys(key) is expected


def test_message_ids_without_personal_data_pass_as_sent() -> None:
    assert clean_message_id("3f0c-uuid-like-id", KEY) == "3f0c-uuid-like-id"
    hashed = clean_message_id("order-13912340020", KEY)
    assert hashed.startswith("mid-") and "13912340020" not in hashed
    assert hashed == clean_message_id("order-13912340020", KEY)  # a retry dedupes
