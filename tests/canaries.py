"""Canary personal data in every format and every field the privacy rules cover, and the
scan that proves none of it left: shared by the in-process tests (tests/gateway/test_privacy.py)
and the end-to-end sink scans (tests/e2e/test_canary_every_field.py).

Each run draws fresh values (a CN mobile, a resident ID with its check digit, a bank card
passing Luhn, an email, WeChat ids) and writes them in the formats people type: separators,
country codes, full-width digits, grouped cards and IDs. ``Canaries.needles`` is what a scan
looks for: every written form, its compact digits, its UTF-8 seen as Latin-1 (raw bytes of a
file) and its JSON escape.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_FULL_WIDTH = str.maketrans("0123456789+-@.", "０１２３４５６７８９＋－＠．")


def resident_id(rng: random.Random) -> str:
    birth = f"{rng.randrange(1950, 2005)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
    body = f"110105{birth}{rng.randrange(1000):03d}"
    total = sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True))
    return body + _ID_CHECK[total % 11]


def luhn_card(rng: random.Random, prefix: str = "6222", length: int = 19) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    for check in "0123456789":
        digits = body + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2 == 1:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


@dataclass
class Canaries:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        t = self.tag
        p = f"139{rng.randrange(10**8):08d}"
        card = luhn_card(rng)
        idc = resident_id(rng)
        self.phone = p
        self.forms: dict[str, str] = {
            "phone": p,
            "phone_dash": f"{p[:3]}-{p[3:7]}-{p[7:]}",
            "phone_space": f"{p[:3]} {p[3:7]} {p[7:]}",
            "phone_dot": f"{p[:3]}.{p[3:7]}.{p[7:]}",
            "phone_cc": f"+86 {p[:3]} {p[3:7]} {p[7:]}",
            "phone_0086": f"0086-{p}",
            "phone_e164": f"+86{p}",
            "phone_full_width": p.translate(_FULL_WIDTH),
            "phone_cc_full_width": f"+86 {p[:3]}-{p[3:7]}-{p[7:]}".translate(_FULL_WIDTH),
            "id_card": idc,
            "id_card_space": f"{idc[:6]} {idc[6:14]} {idc[14:]}",
            "id_card_dash": f"{idc[:6]}-{idc[6:10]}-{idc[10:14]}-{idc[14:]}",
            "bank_card": card,
            "bank_card_space": " ".join(card[i : i + 4] for i in range(0, len(card), 4)),
            "bank_card_dash": "-".join(card[i : i + 4] for i in range(0, 16, 4)) + card[16:],
            "email": f"canary.{t}@example.com",
            "email_upper": f"CANARY.{t}@EXAMPLE.COM",
        }
        self.ids: dict[str, str] = {
            "user_id": f"CANARY-user-{t}",
            "anonymous_id": f"CANARY-anon-{t}",
            "device_id": f"CANARY-device-{t}",
            "openid": f"oCANARYopenid{t}",
            "wechat_openid": f"oCANARYwechat{t}",
            "buyer_openid": f"oCANARYbuyer{t}",
            "union_id": f"oCANARYunion{t}",
            "wx_openid": f"oCANARYwxtrait{t}",
            "member_id": f"CANARY-member-{t}",
            "customer_id": f"CANARY-customer-{t}",
            "url_openid": f"oCANARYurlOpenid9{t}",
            "url_uid": f"CANARY-urluid-{t}",
            "message_id": f"msg-{p}-{t}",
        }

    def needles(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in {**self.forms, **self.ids}.items():
            out[name] = value
            if not value.isascii():
                out[name + "(latin-1)"] = value.encode().decode("latin-1")
                out[name + "(json)"] = json.dumps(value)[1:-1]
        out["phone_digits"] = self.phone
        out["id_card_digits"] = self.forms["id_card"][:17]
        out["bank_card_digits"] = self.forms["bank_card"]
        return out

    def leaks(self, text: str) -> list[str]:
        lowered = text.lower()
        return [k for k, v in self.needles().items() if v.lower() in lowered]

    def assert_nowhere(self, text: str, where: str) -> None:
        leaked = self.leaks(text)
        assert not leaked, f"personal data {leaked} found in {where}"

    # -- Segment --------------------------------------------------------------------------
    def segment_batch(self, marker: str) -> list[dict[str, Any]]:
        f, i = self.forms, self.ids
        url = (
            f"https://shop.example/pay?openid={i['url_openid']}&uid={i['url_uid']}"
            f"&mobile={quote(f['phone_cc'])}&q=shoes#/done?union_id={i['union_id']}"
        )
        context = {
            "ip": "203.0.113.77",
            "channel": "browser",
            "library": {"name": f"lib {f['email']}", "version": f["phone_dot"]},
            "os": {"name": f"os {f['phone_space']}", "version": "17.1"},
            "app": {
                "name": f"app {f['phone_dash']}",
                "version": f["phone_dash"],
                "build": f["phone_full_width"],
                "namespace": f["email_upper"],
            },
            "device": {
                "id": i["device_id"],
                "name": f"{f['phone_cc']}'s phone",
                "model": f["id_card_space"],
                "manufacturer": f["bank_card_space"],
                "token": f["bank_card"],
                "type": "ios",
            },
            "location": {
                "city": f"near {f['id_card_dash']}",
                "country": f["phone_0086"],
                "region": f["phone_cc_full_width"],
                "latitude": 31.2,
                "speed": 0,
            },
            "network": {"carrier": f"carrier {f['bank_card_dash']}", "wifi": True},
            "locale": "zh-CN",
            "timezone": "Asia/Shanghai",
            "userAgent": f"Mozilla/5.0 {f['email']}",
            "externalIds": [
                {
                    "id": i["openid"],
                    "type": "wx_openid",
                    "appid": "wx123",
                    "collection": f"users {f['email']}",
                    "encoding": f["phone_space"],
                }
            ],
            "traits": {"wx_openid": i["wx_openid"], "phone": f["phone_dash"], "note": f["id_card"]},
            "page": {
                "url": url,
                "referrer": url,
                "search": f"?openid={i['url_openid']}",
                "path": f"/u/{f['phone']}",
            },
            "campaign": {"name": f"c {f['phone_e164']}"},
        }
        properties = {
            f"tel_{f['phone']}": 1,
            f["email"]: "key is an email",
            "nested": {f"id_{f['id_card']}": True, "card": f["bank_card_dash"]},
            "wechat_openid": i["wechat_openid"],
            "buyer_openid": i["buyer_openid"],
            "union_id": i["union_id"],
            "member_id": i["member_id"],
            "customer_id": i["customer_id"],
            "note": f"ship to {f['phone_full_width']}, {f['phone_cc']}, card {f['bank_card_space']}",
            "url": url,
            "referrer": url,
            "marker": marker,
        }
        integrations = {"All": True, "Amplitude": {"session_note": f["phone_dash"]}, f"k{f['phone']}": True}
        return [
            {
                "type": "track",
                "userId": i["user_id"],
                "anonymousId": i["anonymous_id"],
                "messageId": i["message_id"],
                "event": f"Bought for {f['phone_dash']}",
                "context": context,
                "integrations": integrations,
                "properties": {**properties, "marker": marker + "-track"},
            },
            {
                "type": "page",
                "userId": i["user_id"],
                "messageId": f"page-{uuid.uuid4()}",
                "name": f"Checkout {f['email']}",
                "category": f"cat {f['phone_space']}",
                "context": context,
                "properties": {**properties, "marker": marker + "-page"},
            },
            {
                "type": "identify",
                "userId": i["user_id"],
                "messageId": f"identify-{uuid.uuid4()}",
                "context": context,
                "traits": {
                    **properties,
                    "phone": f["phone_cc"],
                    "email": f["email_upper"],
                    "marker": marker + "-identify",
                },
            },
            {
                "type": "group",
                "userId": i["user_id"],
                "groupId": f"group {f['phone_dash']}",
                "messageId": f"group-{uuid.uuid4()}",
                "context": context,
                "traits": {"marker": marker + "-group", "contact": f["email"]},
            },
        ]

    # -- Sensors --------------------------------------------------------------------------
    def sensors_batch(self, track_id: int) -> list[dict[str, Any]]:
        f, i = self.forms, self.ids
        now = int(time.time() * 1000)
        url = (
            f"https://shop.example/pay?openid={i['url_openid']}&uid={i['url_uid']}&m={quote(f['phone_dash'])}"
        )
        lib = {
            "$lib": f"MiniProgram{f['phone']}",
            "$lib_version": f["phone_dot"],
            "$lib_method": f"code {f['email']}",
            "$app_version": f["phone_dash"],
        }
        return [
            {
                "type": "track",
                "event": f"Buy{f['phone']}",
                "distinct_id": i["anonymous_id"],
                "time": now,
                "_track_id": track_id,
                "lib": lib,
                "properties": {
                    f"p_{f['phone']}": 1,
                    f"id{f['id_card']}": "x",
                    "$url": url,
                    "$referrer": url,
                    "$url_query": f"openid={i['url_openid']}",
                    "$app_version": f["phone_dash"],
                    "$lib_method": f["email"],
                    "wechat_openid": i["wechat_openid"],
                    "union_id": i["union_id"],
                    "member_id": i["member_id"],
                    "note": f"{f['phone_full_width']} {f['bank_card_space']} {f['id_card_space']}",
                },
            },
            {
                "type": "profile_set",
                "distinct_id": i["user_id"],
                "login_id": i["user_id"],
                "time": now,
                "lib": lib,
                "properties": {
                    "customer_id": i["customer_id"],
                    "mobile": f["phone_cc"],
                    f"e_{f['phone']}": 1,
                },
            },
        ]
