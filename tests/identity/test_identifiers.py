from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.identifiers import Identifier, InvalidIdentifier, normalise, normalise_phone


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13800138000", "+8613800138000"),
        ("+86 138-0013-8000", "+8613800138000"),
        ("0086 13800138000", "+8613800138000"),
        ("8613800138000", "+8613800138000"),
        ("+14155552671", "+14155552671"),
    ],
)
def test_phone_normalises_to_e164(raw: str, expected: str) -> None:
    assert normalise_phone(raw) == expected


@pytest.mark.parametrize("raw", ["12345", "23800138000", "+0123", "phone", "+86 1380013800"])
def test_invalid_phones_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidIdentifier):
        normalise("phone", raw)


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "  ",
        "null",
        "NULL",
        "undefined",
        "None",
        "NaN",
        "0",
        "-1",
        "anonymous",
        "guest",
        "[object Object]",
        0,
        -1,
        None,
        True,
        1.5,
        {"a": 1},
    ],
)
def test_junk_values_are_never_identifiers(junk: object) -> None:
    with pytest.raises(InvalidIdentifier):
        normalise("user_id", junk)


@pytest.mark.parametrize("value", ["00000000-0000-0000-0000-000000000000", "0000000000000000"])
def test_all_zero_advertising_ids_are_rejected(value: str) -> None:
    for id_type in ("idfa", "oaid"):
        with pytest.raises(InvalidIdentifier):
            normalise(id_type, value)


def test_length_limits() -> None:
    with pytest.raises(InvalidIdentifier):
        normalise("user_id", "x" * 256)
    with pytest.raises(InvalidIdentifier):
        normalise("idfv", "abc")
    assert normalise("user_id", "x" * 255).value == "x" * 255


def test_email_lowercased_and_openid_scoped_by_appid() -> None:
    assert normalise("email", " Shopper@Example.COM ") == Identifier("email", "shopper@example.com")
    a = normalise("wechat_openid", "oAbCdEf123456", scope="wxA")
    b = normalise("wechat_openid", "oAbCdEf123456", scope="wxB")
    assert a != b


def test_integer_user_ids_become_strings() -> None:
    assert normalise("user_id", 12345) == Identifier("user_id", "12345")


@given(st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True))
def test_every_cn_mobile_formatting_normalises_the_same(national: str) -> None:
    expected = "+86" + national
    spaced = f"{national[:3]} {national[3:7]}-{national[7:]}"
    assert {normalise_phone(national), normalise_phone("+86" + spaced), normalise_phone("86" + national)} == {
        expected
    }
