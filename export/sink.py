"""The sink contract: what every kind of sink implements, its errors, and option checks.

A sink is where one destination's events end up (files, HTTP receivers, streams). Kinds
live in their own modules (export.file_sinks, export.http_sinks, export.stream_sinks) and
are looked up by name in the registry (export.sinks); each imports only this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import msgspec

from export.outbox import StoredRecord


class Sink(Protocol):
    """Where one destination's events go. ``records`` hold the cleaned event JSON (identifiers
    already re-keyed for the destination's pseudonym domain) and its message id, which every
    sink passes on so the receiver can dedupe (delivery is at-least-once).

    ``recover`` runs before the first write and after every failed one; it must not raise for
    a receiver that is down (network sinks connect on write).

    ``write`` returns the committed state of the sink's files (file sinks that cut back on
    recovery) or ``{}``. It raises ``RetryableSinkError`` (or any other exception) for a
    failure worth retrying, ``PermanentSinkError`` when the receiver refused the records
    themselves (the worker then isolates the bad ones into the dead-letter store).
    """

    destination: str

    async def recover(self, committed: Mapping[str, int]) -> int: ...
    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]: ...
    async def close(self) -> None: ...


@runtime_checkable
class FileSink(Protocol):
    """A sink that keeps files idgate owns (JSONL, Parquet): a person's records can be
    removed from them (a deletion request)."""

    async def purge(self, committed: Mapping[str, int], keys: Collection[str]) -> tuple[int, dict[str, int]]:
        """Remove every record naming one of ``keys`` (the person's values as this
        destination holds them; ``identity.deleted`` notices stay: they are the destination's
        deletion request), rewriting each file atomically (temp, fsync, rename). Only the
        ``committed`` part of a file is kept. Returns the records removed and the files'
        new committed state (to commit with the cursor)."""
        ...


class SinkError(Exception):
    """A sink write failed; the message is safe to log (no payload, no identifiers)."""


class RetryableSinkError(SinkError):
    """Timeouts, connection errors, 5xx, 429 (and a receiver that refuses the destination's
    credentials or URL rather than the records): the same records may succeed later."""


class PermanentSinkError(SinkError):
    """The receiver refused the records themselves (400, 413, 422, ...): retrying cannot help."""


# -- sink options --------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One option of a sink kind: the TOML types it accepts, its default, a check of its value."""

    types: tuple[type, ...]
    doc: str
    default: Any = None
    required: bool = False
    check: Callable[[Any], str | None] | None = None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}


def check_options(kind: str, options: Mapping[str, Any], spec: Mapping[str, Option]) -> list[tuple[str, str]]:
    """(option, problem) pairs: unknown names, missing required ones, wrong types, bad values."""
    problems: list[tuple[str, str]] = []
    for name in options:
        if name not in spec:
            known = ", ".join(sorted(spec)) or "none"
            problems.append((name, f"unknown option for the {kind} sink (known: {known})"))
    for name, option in spec.items():
        if name not in options:
            if option.required:
                problems.append((name, f"required by the {kind} sink"))
            continue
        value = options[name]
        # TOML booleans are ints to Python; an int is fine where a float is asked.
        accepted = isinstance(value, option.types) and not (
            isinstance(value, bool) and bool not in option.types
        )
        if not accepted:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in option.types)
            problems.append((name, f"must be {want}, not {type(value).__name__}"))
            continue
        if option.check is not None and (problem := option.check(value)) is not None:
            problems.append((name, problem))
    return problems


def with_defaults(options: Mapping[str, Any], spec: Mapping[str, Option]) -> dict[str, Any]:
    return {name: options.get(name, option.default) for name, option in spec.items()}


def url_check(*schemes: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            return f"not a valid URL ({exc})"
        if parts.scheme not in schemes:
            return f"must be a URL with scheme {' or '.join(schemes)}"
        if not parts.hostname and parts.scheme != "unix":
            return "the URL has no host"
        return None

    return check


def number_check(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def non_empty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def safe_location(url: str) -> str:
    """Host and port of a URL, for error messages: paths and queries may hold tokens."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


class _MessageId(msgspec.Struct):
    messageId: str = ""  # noqa: N815 - the Segment field name


_message_id_decoder = msgspec.json.Decoder(_MessageId)


def message_id_of(record: StoredRecord) -> str:
    """The record's message id (rows stored before the column existed: from the payload)."""
    if record.message_id:
        return record.message_id
    try:
        return _message_id_decoder.decode(record.payload).messageId
    except msgspec.DecodeError:
        return ""


@functools.lru_cache(maxsize=64)
def _day_of(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86_400, UTC).strftime("%Y-%m-%d")


def day_of_ms(received_at_ms: int) -> str:
    """The UTC date of a timestamp in ms (cached per day: called for every record)."""
    return _day_of(received_at_ms // 86_400_000)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename or a new file is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
