from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consent.client_text import is_digest, ledger_sdk
from identity.scrub import (
    is_resident_id,
    looks_like_identifier,
    passes_luhn,
    scrub_name,
    scrub_query,
    scrub_text,
    scrub_value,
    truncate_ip,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call 13800138000 now", "call [redacted:phone] now"),
        ("tel:+86 13912345678", "tel:[redacted:phone]"),
        ("13800138000x and tel13800138000", "[redacted:phone]x and tel[redacted:phone]"),
        ("mail A.B@shop.example.cn", "mail [redacted:email]"),
        ("id 11010519491231002X", "id [redacted:id_card]"),
        ("card 6222021234567890128?", "card [redacted:bank_card]?"),
        ("order 20261121000012345", "order 20261121000012345"),  # no Luhn, no check digit
        ("sku 1380013800012", "sku 1380013800012"),  # 13 digits: not a mobile
        ("id 110105194912310021", "id 110105194912310021"),  # wrong check digit
    ],
)
def test_scrub_text(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "139-1234-0020",
        "139 1234 0020",
        "139.1234.0020",
        "+86 139 1234 0020",
        "+86-139-1234-0020",
        "+8613912340020",
        "8613912340020",
        "0086 13912340020",
        "0086-139-1234-0020",
        "(+86) 139 1234 0020",
        "１３９１２３４００２０",
        "＋８６ １３９－１２３４－００２０",
        "1391 234 0020".replace(" ", "", 1),
    ],
)
def test_phones_with_separators_country_codes_and_full_width_digits(text: str) -> None:
    assert scrub_text(f"call {text} now") == "call [redacted:phone] now"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("11010519491231002X", "id_card"),
        ("110105 19491231 002X", "id_card"),
        ("110105-1949-1231-002X", "id_card"),
        ("１１０１０５１９４９１２３１００２Ｘ", "id_card"),
        ("6222021234567890128", "bank_card"),
        ("6222 0212 3456 7890 128", "bank_card"),
        ("4111-1111-1111-1111", "bank_card"),
        ("4111 1111 1111 1111", "bank_card"),
        ("a.b@shop.example.cn", "email"),
        ("ａ．ｂ＠ｓｈｏｐ．ｃｎ", "email"),
    ],
)
def test_cards_ids_and_emails_in_any_grouping(text: str, kind: str) -> None:
    assert scrub_text(f"x {text} y") == f"x [redacted:{kind}] y"


def test_two_numbers_side_by_side_are_both_found() -> None:
    assert scrub_text("139 1234 0020 or 138-0013-8000") == "[redacted:phone] or [redacted:phone]"


@pytest.mark.parametrize(
    "text", ["v1.2.3", "2026-11-30 13:45:00", "1732950000000", "sku-4111-2222", "Asia/Shanghai"]
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert scrub_text(text) == text


def test_names_keep_a_valid_identifier_shape() -> None:
    assert scrub_name("tel_13912340020") == "tel_redacted_phone"
    assert scrub_name("a.b@x.io") == "redacted_email"
    assert scrub_name("page_viewed") == "page_viewed"


def test_query_parameters_that_are_identifiers_are_pseudonymised() -> None:
    url = (
        "https://x.example/p?openid=oGZUI0egBJY1zhBYw2KhdUfwVJJE&ref=oGZUI0egBJY1zhBYw2KhdUfwVJJE"
        "&m=139%201234%200020&q=red+shoes&utm_source=wechat#/a?uid=42"
    )
    out = scrub_query(url, lambda k: k in ("openid", "uid"), lambda v: f"P({len(v)})")
    assert out == (
        "https://x.example/p?openid=P(28)&ref=P(28)&m=P(13)&q=red+shoes&utm_source=wechat#/a?uid=P(2)"
    )
    assert looks_like_identifier("550e8400-e29b-41d4-a716-446655440000")
    assert not looks_like_identifier("organization_settings_page")


def test_the_ledger_keeps_sdk_names_as_an_enumeration_and_evidence_as_a_digest() -> None:
    assert ledger_sdk("analytics.js/5") == "analytics.js/5"
    assert ledger_sdk("analytics-next@1.70.0") == "analytics-next/1.70.0"
    assert ledger_sdk("ios/5.0") == "iOS/5.0"
    assert ledger_sdk("MiniProgram") == "MiniProgram"
    assert ledger_sdk("Zhang San 139-1234-0020") == "other"
    assert ledger_sdk("13912340020") == "other"
    assert ledger_sdk(None) is None
    assert is_digest("sha256:" + "ab" * 32) and is_digest("cd" * 32)
    assert not is_digest("a.b@x.io") and not is_digest("13912340020")


def test_check_digits() -> None:
    assert is_resident_id("11010519491231002X")
    assert not is_resident_id("110105194912310021")
    assert passes_luhn("4111111111111111") and not passes_luhn("4111111111111112")


def test_scrub_value_walks_nested_json() -> None:
    value = {"a": ["x 13800138000", {"b": "me@x.io"}], "n": 13800138000, "ok": True}
    assert scrub_value(value) == {
        "a": ["x [redacted:phone]", {"b": "[redacted:email]"}],
        "n": 13800138000,
        "ok": True,
    }


@pytest.mark.parametrize(
    ("ip", "expected"),
    [("203.0.113.77", "203.0.113.0"), ("2001:db8:abcd:12::1", "2001:db8:abcd::"), ("nope", None)],
)
def test_ip_truncation(ip: str, expected: str | None) -> None:
    assert truncate_ip(ip) == expected


@given(st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True), st.text(alphabet="abc ,.:", max_size=10))
def test_any_cn_mobile_in_text_is_redacted(mobile: str, around: str) -> None:
    assert mobile not in scrub_text(f"{around}{mobile}{around}")


def _luhn_complete(prefix: str) -> str:
    from identity.scrub import passes_luhn

    return next(prefix + str(d) for d in range(10) if passes_luhn(prefix + str(d)))


def test_digit_groups_inside_a_uuid_are_not_a_bank_card() -> None:
    """A random UUID's middle groups can be all digits and pass the Luhn check: glued to
    letters they are part of the token, not someone's card (message ids stay as sent)."""
    card = _luhn_complete("723999574160806")
    token = f"m-b4fc{card[:4]}-{card[4:8]}-{card[8:12]}-{card[12:]}-08770b1dbd15"
    assert scrub_text(token) == token
    spaced = f"{card[:4]} {card[4:8]} {card[8:12]} {card[12:]}"
    assert scrub_text(f"paid with {spaced}.") == "paid with [redacted:bank_card]."
    assert scrub_text(f"card:{card[:4]}-{card[4:8]}-{card[8:12]}-{card[12:]}") == "card:[redacted:bank_card]"


def test_message_ids_are_whole_tokens() -> None:
    """In a message id a digit run glued to hex letters is part of the random token; one that
    stands apart is still found."""
    from identity.scrub import has_personal_data

    assert not has_personal_data("prop-49299a4c-77f1-4d2b-9b1e-f19097133865", whole_tokens=True)
    assert has_personal_data("prop-49299a4c-77f1-4d2b-9b1e-f19097133865")  # free text: still found
    assert has_personal_data("order-13912340020-1", whole_tokens=True)
    assert has_personal_data("m-li.lei@example.com", whole_tokens=True)
