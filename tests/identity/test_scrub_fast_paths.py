"""The scrubber's shortcuts answer what the full work answers: the lone-digit check that
passes random tokens (message ids) without the full scan, and the dotted-quad fast path of
IP truncation."""

from __future__ import annotations

import ipaddress
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from identity.scrub import (
    _CANDIDATES,
    _ENOUGH_DIGITS,
    _FOLD,
    _NUMBERS,
    _key_mark,
    _scan,
    has_personal_data,
    truncate_ip,
)


def full_scan(text: str) -> bool:
    """``has_personal_data(text, whole_tokens=True)`` without the lone-digit shortcut."""
    folded = text if text.isascii() else text.translate(_FOLD)
    if "@" in folded:
        pattern = _CANDIDATES
    elif len(folded) >= 11 and _ENOUGH_DIGITS.match(folded) is not None:
        pattern = _NUMBERS
    else:
        return False
    return _scan(text, folded, pattern, _key_mark, True) is not text


# Pieces message ids are made of, and the numbers the scrubber looks for, glued or apart.
PIECES = st.sampled_from(
    [
        "13912340020",
        "139",
        "1234",
        "0020",
        "86",
        "+86",
        "0086",
        "(+86)",
        "11010519491231002X",
        "110105",
        "19491231",
        "002X",
        "6222021234567890128",
        "6222",
        "0212",
        "3456",
        "7890",
        "128",
        "-",
        " ",
        ".",
        "_",
        "x",
        "X",
        "ajs-next-",
        "m-",
        "订单",
        "１３９",
        "０",
        "f",
        "b4fc7239",
        "a@b.cn",
    ]  # fmt: skip
)
TOKENS = st.lists(PIECES | st.text(alphabet="0123456789abcdefX-. ", max_size=6), max_size=10).map("".join)


@settings(max_examples=3000, deadline=None)
@given(TOKENS)
def test_the_lone_digit_shortcut_answers_what_the_full_scan_answers(text: str) -> None:
    assert has_personal_data(text, whole_tokens=True) is full_scan(text)


@settings(max_examples=500, deadline=None)
@given(st.uuids(), st.sampled_from(["", "ajs-", "ajs-next-", "m-", "ios-"]), st.booleans())
def test_message_ids_of_the_sdks(value: uuid.UUID, prefix: str, bare: bool) -> None:
    text = prefix + (value.hex if bare else str(value))
    assert has_personal_data(text, whole_tokens=True) is full_scan(text)


def test_numbers_standing_alone_in_a_token_still_count() -> None:
    for text in (
        "ajs-13912340020",
        "m-139-1234-0020-x",
        "id 110105 19491231 002X.",
        "card-6222-0212-3456-7890-128",
        "86-139-1234-0020",
    ):
        assert has_personal_data(text, whole_tokens=True), text
        assert full_scan(text), text
    assert not has_personal_data("m-b4fc7239-9957-4160-8060-0877f19097133865", whole_tokens=True)


def reference_truncate(value: str) -> str | None:
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


OCTETS = st.sampled_from(
    [
        "0",
        "00",
        "1",
        "01",
        "9",
        "10",
        "99",
        "100",
        "199",
        "200",
        "249",
        "250",
        "255",
        "256",
        "300",
        "1000",
        "",
        "٣",
    ]
)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(OCTETS, min_size=2, max_size=5).map(".".join)
    | st.ip_addresses().map(str)
    | st.text(max_size=20),
    st.sampled_from(["", " ", "\t", "\n"]),
)
def test_ip_truncation_fast_path_answers_what_ipaddress_answers(value: str, pad: str) -> None:
    assert truncate_ip(pad + value + pad) == reference_truncate(pad + value + pad)
