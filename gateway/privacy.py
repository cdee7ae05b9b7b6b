"""Personal data cannot leave in any field: what happens to every string of an event.

The rule is inverted: a string leaves idgate only if it is

1. a pseudonym idgate wrote (identifier fields, identifier-like keys, ``context.device.token``),
2. a field known to be safe, and its value has the shape that field allows (``SAFE_CONTEXT``:
   versions, locales, time zones, enumerations such as ``channel`` or the Sensors type), or
3. the scrubber's output (``identity.scrub``): phones, ID and bank cards, emails redacted;
   URL query parameters that look like identifiers pseudonymised.

Keys are checked as well as values (a key holding a phone number becomes
``redacted_phone``), at every depth of properties, traits, context and integrations; the
event name, page ``name`` and ``category`` and the message id too. A message id that
carries personal data is replaced by a keyed hash of itself (``mid-...``), the same on
every retry, so dedupe still works.

Timestamps are datetimes and ``type`` is decoded from a closed set: they carry no client
text. Numbers and booleans are left as sent.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from gateway.config import Tenant
from gateway.plan import keys_of_class
from identity.identifiers import URL_IDENTIFIER_KEY_PATTERNS, IdentifierKeys
from identity.pseudonym import Pseudonymiser
from identity.scrub import has_personal_data, scrub_name, scrub_query, scrub_text

# -- the allowlist ---------------------------------------------------------------------------
VERSION: Final = re.compile(
    r"[vV]?\d{1,4}(?:\.\d{1,6}){0,4}(?:[-+][0-9A-Za-z][0-9A-Za-z.\-]{0,23})?", re.ASCII
)
LOCALE: Final = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,3}", re.ASCII)
TIMEZONE: Final = re.compile(
    r"[A-Za-z]{1,32}(?:/[A-Za-z_+\-]{1,32}){0,2}|UTC[+\-]\d{1,2}(?::\d{2})?", re.ASCII
)
NAME: Final = re.compile(r"[A-Za-z_$][A-Za-z_$]{0,63}", re.ASCII)  # no digits: no number fits
PSEUDONYMISE: Final = object()  # marker: the value is an identifier, pseudonymised

Safe = re.Pattern[str] | frozenset[str] | object
Schema = dict[str, "Safe | Schema"]

CHANNELS: Final = frozenset({"server", "browser", "mobile", "client", "web", "app", "miniprogram"})
DEVICE_TYPES: Final = frozenset(
    {"ios", "android", "web", "mac", "macos", "windows", "linux", "ipados", "tvos", "watchos", "harmonyos"}
)
SENSORS_TYPES: Final = frozenset(
    {
        "track",
        "track_signup",
        "track_id_bind",
        "track_id_unbind",
        "profile_set",
        "profile_set_once",
        "profile_unset",
        "profile_increment",
        "profile_append",
        "profile_delete",
    }
)
SENSORS_LIB_METHODS: Final = frozenset({"code", "autoTrack", "autotrack", "visual"})

# context fields whose value passes unscrubbed when it has the field's shape (anything else
# in the context is scrubbed). Segment spec fields and what the Sensors adapter writes.
SAFE_CONTEXT: Final[Schema] = {
    "channel": CHANNELS,
    "locale": LOCALE,
    "timezone": TIMEZONE,
    "library": {"version": VERSION},
    "app": {"version": VERSION, "build": VERSION},
    "os": {"version": VERSION},
    "device": {"type": DEVICE_TYPES, "token": PSEUDONYMISE},
    "sensors": {
        "type": SENSORS_TYPES,
        "project": NAME,
        "lib": {"$lib_version": VERSION, "$app_version": VERSION, "$lib_method": SENSORS_LIB_METHODS},
    },
}


def _safe(shape: Any, value: str) -> bool:
    if isinstance(shape, frozenset):
        return value in shape
    if isinstance(shape, re.Pattern):
        # a shape is not proof: "139.1234.0020" has a version's shape and is a phone number
        return shape.fullmatch(value) is not None and not has_personal_data(value)
    return False


_MAX_CLEAN = 16384
_MAX_REMEMBERED = 512
_MAX_KEYS = 8192


class EventScrubber:
    """One tenant's rules: which keys hold identifiers (properties, traits, URL query
    parameters). Built once per tenant; ``clean`` is the walk every client value takes."""

    __slots__ = ("_clean", "_keys", "_names", "_safe", "identifier_keys", "url_keys")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        patterns = tuple(patterns)
        self.identifier_keys = IdentifierKeys(patterns)
        self.url_keys = IdentifierKeys((*patterns, *URL_IDENTIFIER_KEY_PATTERNS))
        self._names: dict[str, str] = {}
        # what the walk needs to know of a key, found once per key (keys repeat from event to
        # event): its cleaned name, whether it names an identifier, its lower case (trait types)
        self._keys: dict[str, tuple[str, bool, str]] = {}
        # strings already found free of personal data (user agents, library names, URLs
        # without identifiers repeat from event to event): not scanned again. Only clean
        # strings are remembered, never one that held personal data.
        self._clean: set[str] = set()
        # (shape, value) pairs found safe: a locale, a time zone, a library version repeat
        self._safe: set[tuple[Any, str]] = set()

    def name(self, key: str) -> str:
        """A key or event name with personal data replaced (memoised: keys repeat)."""
        out = self._names.get(key)
        if out is None:
            out = scrub_name(key)
            if len(self._names) < 8192:
                self._names[key] = out
        return out

    def _key(self, key: str) -> tuple[str, bool, str]:
        entry = (self.name(key), self.identifier_keys(key), key.lower())
        if len(self._keys) < _MAX_KEYS:
            self._keys[key] = entry
        return entry

    def text(self, value: str, url_pseudonym: Callable[[str], str]) -> str:
        """Free text: identifier-like query parameters pseudonymised, then the scrubber."""
        if value in self._clean:
            return value
        out = scrub_text(scrub_query(value, self.url_keys, url_pseudonym) if "=" in value else value)
        if out == value and len(value) <= _MAX_REMEMBERED and len(self._clean) < _MAX_CLEAN:
            self._clean.add(value)
        return out

    def clean(
        self,
        value: Any,
        schema: Any,
        keep: set[str],
        opaque: Callable[[Any], str],
        url_pseudonym: Callable[[str], str],
        trait_types: Mapping[str, str] | None = None,
        link_trait: Callable[[str, Any], str] | None = None,
    ) -> Any:
        """``value`` with every key and string cleaned: strings in ``keep`` (pseudonyms
        idgate wrote) and values of the shape ``schema`` allows pass; a scalar under a key
        whose lower case ``trait_types`` names is claimed by ``link_trait(type, value)``
        first; identifier-like keys get their value pseudonymised with ``opaque``; the rest
        is scrubbed."""
        return self._walk(value, schema, keep, opaque, url_pseudonym, trait_types, link_trait)

    def _walk(
        self,
        value: Any,
        schema: Any,
        keep: set[str],
        opaque: Callable[[Any], str],
        url_pseudonym: Callable[[str], str],
        trait_types: Mapping[str, str] | None,
        link_trait: Callable[[str, Any], str] | None,
    ) -> Any:
        if isinstance(value, str):
            if value in keep:
                return value
            if schema is not None and _safe(schema, value):
                if len(self._safe) < _MAX_CLEAN and len(value) <= _MAX_REMEMBERED:
                    self._safe.add((schema, value))
                return value
            if schema is PSEUDONYMISE and value:
                return opaque(value)
            return self.text(value, url_pseudonym)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            nodes = schema if isinstance(schema, dict) else None
            keys = self._keys
            known_clean = self._clean
            for k, v in value.items():
                entry = keys.get(k)
                if entry is None:
                    entry = self._key(k)
                nk = entry[0]
                if nodes is not None:
                    node = nodes.get(k)
                    if node is not None:
                        # a value of a shape already found safe (a dict node is no shape)
                        if v.__class__ is str and node.__class__ is not dict and (node, v) in self._safe:
                            out[nk] = v
                        else:
                            out[nk] = self._walk(
                                v, node, keep, opaque, url_pseudonym, trait_types, link_trait
                            )
                        continue
                # the common case, inline: a scalar under an ordinary key
                kind = v.__class__
                if kind is str or kind is int:
                    if v == "":
                        out[nk] = v
                    elif trait_types is not None and (id_type := trait_types.get(entry[2])) is not None:
                        out[nk] = link_trait(id_type, v)  # type: ignore[misc]  # given with trait_types
                    elif v in keep:
                        out[nk] = v
                    elif entry[1]:
                        out[nk] = opaque(v)
                    elif kind is int or v in known_clean:
                        out[nk] = v
                    else:
                        out[nk] = self.text(v, url_pseudonym)
                elif kind is float or kind is bool or v is None:
                    out[nk] = v
                elif kind is list and entry[1]:  # a list of identifiers
                    # only strings and integers are identifier values (a dict or a list in
                    # the list is walked; it is not hashable, so never looked up in keep)
                    out[nk] = [
                        (x if x == "" or x in keep else opaque(x))
                        if isinstance(x, str | int) and not isinstance(x, bool)
                        else self._walk(x, None, keep, opaque, url_pseudonym, trait_types, link_trait)
                        for x in v
                    ]
                else:
                    out[nk] = self._walk(v, None, keep, opaque, url_pseudonym, trait_types, link_trait)
            return out
        if isinstance(value, list):
            return [
                self._walk(v, schema, keep, opaque, url_pseudonym, trait_types, link_trait) for v in value
            ]
        return value


_scrubbers: dict[int, EventScrubber] = {}


def scrubber_for(tenant: Tenant) -> EventScrubber:
    found = _scrubbers.get(id(tenant))
    if found is None:
        # the tracking plan's identifier and contact properties are identifier keys too
        planned = (glob.escape(k) for k in keys_of_class(tenant, "identifier", "contact"))
        found = _scrubbers[id(tenant)] = EventScrubber((*tenant.identity.identifier_keys, *planned))
    return found


def url_pseudonymiser(pseudonymiser: Pseudonymiser) -> Callable[[str], str]:
    """Pseudonyms for identifiers found inside URLs: a separate derivation, so they never
    equal the identifier's pseudonym in the event's identifier fields (which delivery
    re-keys per destination as whole strings; an embedded one it could not)."""

    def url_pseudonym(value: str) -> str:
        return pseudonymiser("url\x1f" + value)

    return url_pseudonym


def message_id_digest(message_id: str, pseudonymiser: Pseudonymiser) -> str:
    """How a message id is kept beyond the outbox (delivery proofs, identity provenance):
    a keyed hash, ``mid-`` + 22 characters; the same id always gives the same digest."""
    return "mid-" + pseudonymiser("messageId\x1f" + message_id).split(".", 1)[1]


def clean_message_id(message_id: str, pseudonymiser: Pseudonymiser) -> str:
    """The message id as stored and forwarded: as sent when it holds no personal data,
    else a keyed hash of it (the same for every retry, so dedupe still works)."""
    if has_personal_data(message_id, whole_tokens=True):
        return message_id_digest(message_id, pseudonymiser)
    return message_id
