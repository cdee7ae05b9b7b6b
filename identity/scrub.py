"""Detection and redaction of personal data inside strings: the scrubber every client string
passes through unless it is a pseudonym or a field known to be safe.

Finds, inside any string:

- CN mobile numbers, bare or with separators (``139-1234-0020``, ``139 1234 0020``), with a
  country code (``+86``, ``0086``, ``86``, ``(+86)``);
- 18-digit resident ID numbers with a valid check digit, bare or grouped with spaces or
  dashes (``110105 19491231 002X``);
- bank card numbers passing Luhn, bare or in groups of four;
- email addresses;

in ASCII or with full-width (or any other Unicode decimal) digits and full-width ``+ - @ .``,
which are folded to ASCII one code point for one, so positions in the original are kept.
It also pseudonymises URL query parameters that look like identifiers (``scrub_query``) and
truncates IP addresses (IPv4 to /24, IPv6 to /48).

Everything is compiled at import; the per-string work is one regex scan (plus one
``str.translate`` for non-ASCII text).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_plus


def _fold_table() -> dict[int, int]:
    """Non-ASCII look-alikes of what the patterns match -> ASCII, one code point each."""
    table: dict[int, int] = {}
    for cp in range(0x80, 0x10000):
        d = unicodedata.decimal(chr(cp), None)
        if d is not None:
            table[cp] = 48 + d
    for cp in range(0xFF21, 0xFF3B):  # full-width A-Z
        table[cp] = cp - 0xFF21 + 65
    for cp in range(0xFF41, 0xFF5B):  # full-width a-z
        table[cp] = cp - 0xFF41 + 97
    table.update(
        {
            0xFF0B: ord("+"),
            0xFF0D: ord("-"),
            0x2010: ord("-"),
            0x2011: ord("-"),
            0x2012: ord("-"),
            0x2013: ord("-"),
            0x2014: ord("-"),
            0x2212: ord("-"),
            0xFF0E: ord("."),
            0xFF20: ord("@"),
            0xFF3F: ord("_"),
            0xFF08: ord("("),
            0xFF09: ord(")"),
            0x3000: ord(" "),
            0x00A0: ord(" "),
            0x2009: ord(" "),
            0x202F: ord(" "),
        }
    )
    return table


_FOLD: Final = _fold_table()

_EMAIL = r"(?P<email>[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+)"
# 18 characters: bare, 6-8-4 or 6-4-4-4 groups.
_ID = r"(?P<id>\d{17}[\dXx]|\d{6}[ \-]\d{8}[ \-]\d{3}[\dXx]|\d{6}[ \-]\d{4}[ \-]\d{4}[ \-]\d{3}[\dXx])"
# 16-19 digits: bare, groups of four (and a short tail), or 6-13.
_CARD = r"(?P<card>\d{16,19}|\d{4}(?:[ \-]\d{4}){3}(?:[ \-]?\d{1,3})?|\d{6}[ \-]\d{13})"
# CN mobile: optional country code, then 3-4-4, 3-8, 7-4 or 3-2-3-3 with one kind of gap.
_PHONE = (
    r"(?P<phone>(?:(?:\+|00)[ \-]?86[ \-]?|\(\+?86\)[ \-]?|86[ \-]?)?"
    r"1[3-9]\d(?:\d{8}|[ \-.]\d{4}[ \-.]\d{4}|\d{4}[ \-.]\d{4}|[ \-.]\d{8}|[ \-]\d{2}[ \-]\d{3}[ \-]\d{3}))"
)
_CANDIDATES: Final = re.compile(rf"{_EMAIL}|(?<!\d)(?:{_ID}|{_CARD}|{_PHONE})(?!\d)", re.ASCII)
# Without an "@" no email can match: the pattern without its (backtracking) email branch.
_NUMBERS: Final = re.compile(rf"(?<!\d)(?:{_ID}|{_CARD}|{_PHONE})(?!\d)", re.ASCII)
# Fewer than 11 digits and no "@": nothing to find (one cheap scan instead of the full one).
_ENOUGH_DIGITS: Final = re.compile(r"(?:\D*\d){11}", re.ASCII)
_NOT_DIGIT: Final = re.compile(r"[^\dXx]", re.ASCII)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def is_resident_id(value: str) -> bool:
    if len(value) != 18 or not value[:17].isdigit() or not value.isascii():
        return False
    total = sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17].upper()


def passes_luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _kind(m: re.Match[str]) -> str | None:
    group = m.lastgroup
    if group == "email":
        return "email"
    if group == "phone":
        return "phone"
    compact = _NOT_DIGIT.sub("", m.group(0))
    if group == "id" and is_resident_id(compact):
        return "id_card"
    if compact.isdigit() and passes_luhn(compact):
        return "bank_card"
    return None


_SEPARATED: Final = frozenset(" -.")


def _inside_token(text: str, m: re.Match[str], whole_tokens: bool = False) -> bool:
    """A number written in groups (``139-1234-0020``) is someone's only when it stands on
    its own: digit groups glued to letters are part of a longer token (the middle of a
    UUID, ``m-b4fc7239-9957-4160-8060-0877...``, passes the Luhn check one time in ten)."""
    if whole_tokens and m.lastgroup != "email":
        # an identifier-shaped string (a message id): a bare digit run glued to letters,
        # ``...f19097133865``, is part of its random token too
        start, end = m.start(), m.end()
        return (start > 0 and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum())
    if m.lastgroup == "email" or not any(c in _SEPARATED for c in m.group(0)):
        return False
    start, end = m.start(), m.end()
    before = text[start - 1] if start else ""
    after = text[end : end + 2]
    return before.isalnum() or (after[:1].isalnum()) or (after[:1] == "-" and after[1:2].isalnum())


def classify(candidate: str) -> str | None:
    """Which kind of personal data a whole string is, if any."""
    folded = candidate if candidate.isascii() else candidate.translate(_FOLD)
    m = _CANDIDATES.fullmatch(folded.strip())
    return _kind(m) if m is not None else None


# Digit runs that stand on their own (no ASCII letter or digit either side; an ID card's
# check letter included). Under ``whole_tokens`` every digit group of a number that counts is
# such a run (its separators and its ends touch no letter or digit), so fewer than 11 digits
# in them all rule a number out: a random token (a UUID, ``ajs-next-`` + hex) is passed
# without the full scan.
_LONE_DIGITS: Final = re.compile(r"(?<![0-9A-Za-z])[0-9]+[Xx]?(?![0-9A-Za-z])", re.ASCII)


def _sub(text: str, replace: Callable[[str], str], whole_tokens: bool = False) -> str:
    folded = text if text.isascii() else text.translate(_FOLD)
    if "@" in folded:
        pattern = _CANDIDATES
    elif len(folded) >= 11 and _ENOUGH_DIGITS.match(folded) is not None:
        if whole_tokens and sum(map(len, _LONE_DIGITS.findall(folded))) < 11:
            return text
        pattern = _NUMBERS
    else:
        return text
    return _scan(text, folded, pattern, replace, whole_tokens)


def _scan(
    text: str, folded: str, pattern: re.Pattern[str], replace: Callable[[str], str], whole_tokens: bool
) -> str:
    out: list[str] = []
    last = 0
    for m in pattern.finditer(folded):
        if _inside_token(folded, m, whole_tokens):
            continue
        kind = _kind(m)
        if kind is not None:
            out.append(text[last : m.start()])
            out.append(replace(kind))
            last = m.end()
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# What every redaction in a value starts with.
REDACTION_MARK: Final = "[redacted:"


def _value_mark(kind: str) -> str:
    return f"{REDACTION_MARK}{kind}]"


def _key_mark(kind: str) -> str:
    return f"redacted_{kind}"


def scrub_text(text: str) -> str:
    """``text`` with every phone, ID card, bank card and email replaced by ``[redacted:<kind>]``."""
    return _sub(text, _value_mark)


def scrub_name(text: str) -> str:
    """For keys and event names: the same detection, replaced by ``redacted_<kind>`` so the
    result is still a valid Sensors name (letters, digits, ``_``)."""
    return _sub(text, _key_mark)


def has_personal_data(text: str, *, whole_tokens: bool = False) -> bool:
    """``whole_tokens``: for identifier-shaped strings (message ids), where digits glued to
    letters belong to a random token (a UUID's hex may hold ``19097133865``)."""
    return _sub(text, _key_mark, whole_tokens) is not text


# -- URL query strings ---------------------------------------------------------------------
# key=value pairs after ?, & , ; or # (and at the very start, for a bare search string).
_PARAM: Final = re.compile(r"(^|[?&;#])([^=&;#?/\s]{1,128})=([^&;#\s]*)")
# Values that are identifiers whatever their key: WeChat openid / unionid shapes, UUIDs,
# long hex strings (device and session ids).
_OPENID_SHAPE: Final = re.compile(
    r"o(?=[0-9A-Za-z_\-]*\d)(?=[0-9A-Za-z_\-]*[A-Z])[0-9A-Za-z_\-]{19,40}", re.ASCII
)
_HEXISH: Final = re.compile(
    r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}|[0-9A-Fa-f]{24,}",
    re.ASCII,
)


def looks_like_identifier(value: str) -> bool:
    """An openid/unionid, a UUID or a long hex id, or a string holding personal data."""
    return (
        _OPENID_SHAPE.fullmatch(value) is not None
        or _HEXISH.fullmatch(value) is not None
        or has_personal_data(value)
    )


def scrub_query(
    text: str, is_identifier_key: Callable[[str], bool], pseudonymise: Callable[[str], str]
) -> str:
    """Pseudonymise the values of query parameters (in a URL, a search string or a
    fragment) whose key names an identifier or whose value looks like one."""
    if "=" not in text:
        return text

    def param(m: re.Match[str]) -> str:
        raw = m.group(3)
        if not raw:
            return m.group(0)
        value = unquote_plus(raw) if ("%" in raw or "+" in raw) else raw
        key = m.group(2)
        if is_identifier_key(unquote_plus(key) if "%" in key else key) or looks_like_identifier(value):
            return f"{m.group(1)}{key}={pseudonymise(value)}"
        return m.group(0)

    return _PARAM.sub(param, text)


# -- JSON values ------------------------------------------------------------------------------
def scrub_value(value: Any, on_key: Callable[[str, Any], Any] | None = None) -> Any:
    """Scrub every string (and every key) inside a JSON value; returns a new value.

    ``on_key`` lets the caller treat some keys specially (e.g. pseudonymise ``openid``).
    """
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if on_key is not None:
                replaced = on_key(k, v)
                if replaced is not _KEEP:
                    out[scrub_name(k)] = replaced
                    continue
            out[scrub_name(k)] = scrub_value(v, on_key)
        return out
    if isinstance(value, list):
        return [scrub_value(v, on_key) for v in value]
    return value


_KEEP = object()
KEEP = _KEEP  # sentinel: ``on_key`` returns it to let scrub_value handle the key normally


# A dotted-quad IPv4 address as ``ipaddress`` accepts it (four decimal octets 0-255, no
# leading zero): the common case, truncated without building address objects.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4: Final = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET})\.{_OCTET}", re.ASCII)


def truncate_ip(value: str) -> str | None:
    """IPv4 to /24, IPv6 to /48; None for anything that is not an IP address."""
    v4 = _IPV4.fullmatch(value.strip())
    if v4 is not None:
        return v4.group(1) + ".0"
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
