"""The cached walk of ``EventScrubber.clean`` (per-key facts, values of a safe shape and clean
strings remembered) answers exactly what the plain walk answers: for any JSON value, with
or without the context's allowlist, with or without trait linking, on a fresh scrubber and
on one whose caches earlier values filled. The plain walk below is the rule as written
before the caches (gateway/privacy.py's docstring), kept here as the reference."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.privacy import PSEUDONYMISE, SAFE_CONTEXT, EventScrubber, _safe
from identity.scrub import scrub_name, scrub_query, scrub_text

TRAIT_TYPES = {"phone": "phone", "mobile": "phone", "email": "email", "wx": "wechat_openid"}
KEPT = "k1.kept-pseudonym"


def reference_clean(
    scrubber: EventScrubber,
    value: Any,
    schema: Any,
    keep: set[str],
    opaque: Callable[[Any], str],
    url_pseudonym: Callable[[str], str],
    on_key: Callable[[str, Any], str | None] | None = None,
) -> Any:
    """Every key scrubbed; a string in ``keep`` or of the shape ``schema`` allows passes; a
    scalar under a key ``on_key`` claims is its answer; identifier keys pseudonymised; the
    rest scrubbed (URL query identifiers pseudonymised first)."""

    def text(v: str) -> str:
        return scrub_text(scrub_query(v, scrubber.url_keys, url_pseudonym) if "=" in v else v)

    if isinstance(value, str):
        if value in keep or (schema is not None and _safe(schema, value)):
            return value
        if schema is PSEUDONYMISE and value:
            return opaque(value)
        return text(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        nodes = schema if isinstance(schema, dict) else None
        for k, v in value.items():
            nk = scrub_name(k)
            node = nodes.get(k) if nodes is not None else None
            if node is None:
                kind = v.__class__
                if kind is str or kind is int:
                    if v == "":
                        out[nk] = v
                        continue
                    if on_key is not None:
                        claimed = on_key(k, v)
                        if claimed is not None:
                            out[nk] = claimed
                            continue
                    if v in keep:
                        out[nk] = v
                    elif scrubber.identifier_keys(k):
                        out[nk] = opaque(v)
                    elif kind is int:
                        out[nk] = v
                    else:
                        out[nk] = text(v)
                    continue
                if kind is float or kind is bool or v is None:
                    out[nk] = v
                    continue
                if kind is list and scrubber.identifier_keys(k):
                    out[nk] = [
                        (x if x == "" or x in keep else opaque(x))
                        if isinstance(x, str | int) and not isinstance(x, bool)
                        else reference_clean(scrubber, x, None, keep, opaque, url_pseudonym, on_key)
                        for x in v
                    ]
                    continue
            out[nk] = reference_clean(scrubber, v, node, keep, opaque, url_pseudonym, on_key)
        return out
    if isinstance(value, list):
        return [reference_clean(scrubber, v, schema, keep, opaque, url_pseudonym, on_key) for v in value]
    return value


def _fake(prefix: str, raw: Any) -> str:
    return f"{prefix}.{hashlib.sha256(repr(raw).encode()).hexdigest()[:10]}"


class Calls:
    """Deterministic stand-ins for the pseudonymiser and the identity linker, recording every
    call in order (the walk must write the same pseudonyms, in the same order)."""

    def __init__(self) -> None:
        self.keep = {KEPT}
        self.log: list[tuple[str, Any]] = []

    def opaque(self, raw: Any) -> str:
        self.log.append(("opaque", raw))
        out = _fake("k1", raw)
        self.keep.add(out)
        return out

    def url(self, raw: str) -> str:
        self.log.append(("url", raw))
        return _fake("u1", raw)

    def link(self, id_type: str, raw: Any) -> str | None:
        """Like ``link``: None for a value that is no valid identifier of the type."""
        self.log.append(("link", (id_type, raw)))
        if isinstance(raw, str) and raw.startswith("x"):
            return None
        out = _fake("k1", (id_type, raw))
        self.keep.add(out)
        return out

    def link_trait(self, id_type: str, raw: Any) -> str:
        return self.link(id_type, raw) or self.opaque(raw)

    def on_key(self, key: str, raw: Any) -> str | None:
        id_type = TRAIT_TYPES.get(key.lower())
        return None if id_type is None else self.link_trait(id_type, raw)


KEYS = st.sampled_from(
    [
        "phone",
        "Mobile",
        "EMAIL",
        "wx",
        "member_id",
        "buyerOpenId",
        "union_id",
        "wechat_openid",
        "product_id",
        "sku",
        "name",
        "url",
        "channel",
        "locale",
        "timezone",
        "library",
        "version",
        "app",
        "build",
        "os",
        "device",
        "type",
        "token",
        "sensors",
        "lib",
        "project",
        "$lib_version",
        "$app_version",
        "$lib_method",
        "tel_13912340020",
        "k13912340020",
        "a@b.example",
        "ids",
        "user_ids",
        "",
    ]  # fmt: skip
) | st.text(max_size=12)
STRINGS = st.sampled_from(
    [
        "",
        KEPT,
        "13912340020",
        "139-1234-0020",
        "+86 139 1234 0020",
        "１３９１２３４００２０",
        "someone@example.com",
        "17.1",
        "5.12.0",
        "139.1234.0020",
        "v2.3.4-beta.1",
        "zh-CN",
        "en_US",
        "Asia/Shanghai",
        "UTC+8",
        "ios",
        "browser",
        "web",
        "code",
        "autoTrack",
        "track",
        "myproject",
        "6222021234567890128",
        "11010519491231002X",
        "https://shop.example/?openid=oAbCdEf1234567890GhIjK&q=1",
        "?uid=42&utm_source=wechat",
        "q=shoes",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)",
        "x-not-valid",
        "SO20261130000123",
    ]  # fmt: skip
) | st.text(max_size=24)
SCALARS = (
    STRINGS
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=30,
)


def shaped(schema: Any) -> st.SearchStrategy[Any]:
    """Values that follow the allowlist's tree (so its shapes are met), with anything at its
    leaves and extra keys beside its nodes."""
    if not isinstance(schema, dict):
        return STRINGS | VALUES
    return st.fixed_dictionaries({}, optional={k: shaped(node) for k, node in schema.items()})


CONTEXTS = st.tuples(shaped(SAFE_CONTEXT), st.dictionaries(KEYS, VALUES, max_size=3)).map(
    lambda p: {**p[1], **p[0]}
)
SHARED = EventScrubber(["vip_*"])  # its caches fill across examples, as in a running gateway


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES | CONTEXTS | st.lists(CONTEXTS, max_size=2), context=st.booleans(), traits=st.booleans())
def test_the_cached_walk_answers_what_the_plain_walk_answers(value: Any, context: bool, traits: bool) -> None:
    schema = SAFE_CONTEXT if context else None
    for scrubber in (EventScrubber(["vip_*"]), SHARED, SHARED):  # fresh, then warm twice
        expected_calls, calls = Calls(), Calls()
        expected = reference_clean(
            scrubber,
            value,
            schema,
            expected_calls.keep,
            expected_calls.opaque,
            expected_calls.url,
            expected_calls.on_key if traits else None,
        )
        got = scrubber.clean(
            value,
            schema,
            calls.keep,
            calls.opaque,
            calls.url,
            TRAIT_TYPES if traits else None,
            calls.link_trait if traits else None,
        )
        assert got == expected
        assert repr(got) == repr(expected)  # the same types too (True is not 1)
        assert calls.log == expected_calls.log
        assert calls.keep == expected_calls.keep
