"""Sinks: where delivered events end up. Embedded mode ships the JSONL file sink.

The JSONL sink writes one file per destination per day (UTC date of ``receivedAt``) and
fsyncs after each batch. The committed size of every file is stored with the delivery
cursor in one outbox transaction; on start the sink truncates each file back to its
committed size, so a crash between write and commit never leaves a duplicate or a half
line behind: the outbox redelivers exactly what was cut.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

from export.outbox import StoredRecord


class Sink(Protocol):
    destination: str

    def recover(self, committed: Mapping[str, int]) -> int: ...
    def write(self, records: Sequence[StoredRecord]) -> dict[str, int]: ...
    def close(self) -> None: ...


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

    def recover(self, committed: Mapping[str, int]) -> int:
        """Cut every file back to its committed size; returns the bytes removed."""
        self.close()
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

    def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
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

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def build_sink(kind: str, *, root: Path, destination: str) -> Sink:
    if kind == "jsonl":
        return JsonlFileSink(root, destination)
    raise ValueError(f"unknown sink kind {kind!r}")
