"""Sinks: where delivered events end up. Embedded mode ships the JSONL file sink.

The JSONL sink writes one file per destination per day (UTC date of ``receivedAt``) and
fsyncs after each batch. The committed size of every file is stored with the delivery
cursor in one outbox transaction; on start the sink truncates each file back to its
committed size, so a crash between write and commit never leaves a duplicate or a half
line behind: the outbox redelivers exactly what was cut.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from export.outbox import StoredRecord


class Sink(Protocol):
    """Where one destination's events go. ``records`` hold the cleaned event JSON (identifiers
    already re-keyed for the destination's pseudonym domain) and its message id, which every
    sink passes on so the receiver can dedupe (delivery is at-least-once).

    ``write`` returns the committed size of each file it appended to (file sinks that cut
    back on recovery) or ``{}``. It raises ``RetryableSinkError`` (or any other exception)
    for a failure worth retrying, ``PermanentSinkError`` when the receiver refused the
    records themselves (the worker then isolates the bad ones into the dead-letter store).
    """

    destination: str

    async def recover(self, committed: Mapping[str, int]) -> int: ...
    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]: ...
    async def close(self) -> None: ...


class SinkError(Exception):
    """A sink write failed; ``detail`` is safe to log (no payload, no identifiers)."""


class RetryableSinkError(SinkError):
    """Timeouts, connection errors, 5xx, 429: the same records may succeed later."""


class PermanentSinkError(SinkError):
    """The receiver refused the records (4xx other than 408/429): retrying cannot help."""


def _day(received_at_ms: int) -> str:
    return datetime.fromtimestamp(received_at_ms / 1000, UTC).strftime("%Y-%m-%d")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlFileSink:
    """``<root>/<destination>/<YYYY-MM-DD>.jsonl``, one cleaned event per line."""

    def __init__(self, root: Path, destination: str) -> None:
        self.destination = destination
        self.directory = root / destination
        self._handles: dict[str, IO[bytes]] = {}

    async def recover(self, committed: Mapping[str, int]) -> int:
        return await asyncio.to_thread(self._recover, committed)

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        return await asyncio.to_thread(self._write, records)

    async def close(self) -> None:
        self._close()

    def _recover(self, committed: Mapping[str, int]) -> int:
        """Cut every file back to its committed size; returns the bytes removed."""
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for path in self.directory.glob("*.jsonl"):
            size = path.stat().st_size
            keep = committed.get(path.name, 0)
            if size > keep:
                removed += size - keep
                with open(path, "r+b") as fh:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
        return removed

    def _handle(self, name: str) -> IO[bytes]:
        fh = self._handles.get(name)
        if fh is None:
            path = self.directory / name
            created = not path.exists()
            fh = open(path, "ab")  # noqa: SIM115 - kept open across batches, closed in close()
            if created:
                _fsync_dir(self.directory)
            self._handles[name] = fh
            if len(self._handles) > 4:  # keep only the newest few days open
                oldest = min(self._handles)
                self._handles.pop(oldest).close()
        return fh

    def _write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        """Append records, fsync, and return the new size of each file written."""
        by_file: dict[str, list[bytes]] = {}
        for r in records:
            by_file.setdefault(f"{_day(r.received_at_ms)}.jsonl", []).append(r.payload)
        sizes: dict[str, int] = {}
        for name, payloads in by_file.items():
            fh = self._handle(name)
            fh.write(b"\n".join(payloads) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            sizes[name] = fh.tell()
        return sizes

    def _close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def validate_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with a destination's sink options, as (option name, problem) pairs."""
    if kind == "jsonl":
        return [(name, "unknown option for the jsonl sink") for name in options]
    return [("sink", f"unknown sink kind {kind!r}")]


def build_sink(
    kind: str, *, root: Path, destination: str, options: Mapping[str, Any] | None = None
) -> Sink:
    """The sink of one destination; ``options`` were checked by validate_options."""
    if kind == "jsonl":
        return JsonlFileSink(root, destination)
    raise ValueError(f"unknown sink kind {kind!r}")
