from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.scrub import is_resident_id, passes_luhn, scrub_text, scrub_value, truncate_ip


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
