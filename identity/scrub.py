"""Detection and redaction of personal data that leaks into free-text event properties.

Finds CN mobile numbers, 18-digit resident ID numbers (with a valid check digit), bank
card numbers (Luhn) and email addresses inside strings, and truncates IP addresses
(IPv4 to /24, IPv6 to /48).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

# One pass per string: emails, ID numbers ending in X, or runs of 11-19 digits.
_CANDIDATES = re.compile(
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+|(?<!\d)(?:\d{17}[Xx]|(?:\+?86[\s-]?)?\d{11,19})(?!\d)"
)
_MOBILE = re.compile(r"^(?:\+?86[\s-]?)?1[3-9]\d{9}$")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def is_resident_id(value: str) -> bool:
    if len(value) != 18 or not value[:17].isdigit():
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


def classify(candidate: str) -> str | None:
    """Which kind of personal data a candidate substring is, if any."""
    if "@" in candidate:
        return "email"
    if _MOBILE.match(candidate):
        return "phone"
    if is_resident_id(candidate):
        return "id_card"
    if candidate.isdigit() and 16 <= len(candidate) <= 19 and passes_luhn(candidate):
        return "bank_card"
    return None


def _redact_match(m: re.Match[str]) -> str:
    kind = classify(m.group(0))
    return f"[redacted:{kind}]" if kind else m.group(0)


def scrub_text(text: str) -> str:
    return _CANDIDATES.sub(_redact_match, text)


def scrub_value(value: Any, on_key: Callable[[str, Any], Any] | None = None) -> Any:
    """Scrub every string inside a JSON value in place-free fashion (returns a new value).

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
                    out[k] = replaced
                    continue
            out[k] = scrub_value(v, on_key)
        return out
    if isinstance(value, list):
        return [scrub_value(v, on_key) for v in value]
    return value


_KEEP = object()
KEEP = _KEEP  # sentinel: ``on_key`` returns it to let scrub_value handle the key normally


def truncate_ip(value: str) -> str | None:
    """IPv4 to /24, IPv6 to /48; None for anything that is not an IP address."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
