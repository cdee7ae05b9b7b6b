"""What the consent ledger keeps of text a client sends: enumerated values and digests only.

The ledger can never be rewritten, so nothing free-text from a client goes in: the SDK a
consent came through is kept as a known SDK name (and its version when it has a version's
shape) or ``"other"``; an evidence hash must be a hex digest (optionally prefixed with its
algorithm) and is refused otherwise.
"""

from __future__ import annotations

import re
from typing import Final

# Lower-case SDK name as clients send it -> the name recorded.
SDK_NAMES: Final = {
    name.lower(): name
    for name in (
        # Segment and RudderStack libraries
        "analytics.js",
        "analytics-next",
        "analytics-node",
        "analytics-python",
        "analytics-ruby",
        "analytics-go",
        "analytics-java",
        "analytics-php",
        "analytics-ios",
        "analytics-android",
        "analytics-kotlin",
        "analytics-swift",
        "analytics-react-native",
        "analytics-flutter",
        "analytics-csharp",
        "analytics.net",
        "rudder-sdk-js",
        "rudder-sdk-android",
        "rudder-sdk-ios",
        "rudder-sdk-node",
        "rudder-sdk-python",
        # Sensors Data SDKs ($lib)
        "js",
        "MiniProgram",
        "Android",
        "iOS",
        "python",
        "Java",
        "PHP",
        "Go",
        "Node",
        "CSharp",
        "Ruby",
        "Flutter",
        "ReactNative",
        "uniapp",
        "Taro",
        "QuickApp",
        "Alipay-MiniProgram",
        "ByteDance-MiniProgram",
        # generic platform SDKs
        "web",
        "web-sdk",
        "ios-sdk",
        "android-sdk",
        "miniprogram-sdk",
        "server",
    )
}
_SDK: Final = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9._\-]{0,63}?)"
    r"(?:[/@ ](?P<version>[vV]?\d{1,4}(?:\.\d{1,6}){0,4}(?:[-+][0-9A-Za-z][0-9A-Za-z.\-]{0,23})?))?",
    re.ASCII,
)
_DIGEST: Final = re.compile(
    r"(?:(?:sha-?1|sha-?224|sha-?256|sha-?384|sha-?512|sha3-256|sha3-384|sha3-512|blake2b|blake2s|sm3)[:=])?"
    r"(?:[0-9a-f]{40}|[0-9a-f]{56}|[0-9a-f]{64}|[0-9a-f]{96}|[0-9a-f]{128})",
    re.ASCII | re.IGNORECASE,
)
OTHER_SDK: Final = "other"


def ledger_sdk(value: str | None) -> str | None:
    """The SDK as the ledger records it: ``<known name>[/<version>]`` or ``"other"``."""
    if value is None or not value.strip():
        return None
    m = _SDK.fullmatch(value.strip())
    name = SDK_NAMES.get(m.group("name").lower()) if m is not None else None
    if name is None or m is None:
        return OTHER_SDK
    version = m.group("version")
    return f"{name}/{version}" if version else name


def is_digest(value: str) -> bool:
    """Whether ``value`` is a hex digest (SHA-1/2/3, BLAKE2, SM3), optionally ``algo:``-prefixed."""
    return _DIGEST.fullmatch(value) is not None
