"""Per-destination minimisation: a destination that declares what it may receive gets only
those event properties; everything else is removed before delivery.

The allow-list is built by the gateway from the destination's config (property names or
globs, and the tracking plan's properties of the data classes it declares) and handed to
its delivery worker: this module only applies it. Only ``properties`` of event records are
minimised; notices and the envelope fields (ids, context, timestamps) are not.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import msgspec

from export.outbox import StoredRecord

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class PropertyMinimiser:
    """Keeps the properties a destination may receive: names listed exactly, or matching one
    of the globs (``$*``, ``utm_*``)."""

    def __init__(self, names: Iterable[str], globs: Iterable[str] = ()) -> None:
        self.names = frozenset(names)
        patterns = [fnmatch.translate(g) for g in globs]
        self._glob = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._allowed: dict[str, bool] = {}

    def allows(self, key: str) -> bool:
        found = self._allowed.get(key)
        if found is None:
            found = key in self.names or (self._glob is not None and self._glob.match(key) is not None)
            if len(self._allowed) < 4096:
                self._allowed[key] = found
        return found

    def payload(self, record: StoredRecord) -> bytes:
        """The record's payload without the properties the destination may not receive."""
        if record.kind != "event":
            return record.payload
        event = _decode(record.payload)
        properties = event.get("properties")
        if not isinstance(properties, dict):
            return record.payload
        allows = self.allows
        kept = {k: v for k, v in properties.items() if allows(k)}
        if len(kept) == len(properties):
            return record.payload
        event["properties"] = kept
        return _encode(event)
