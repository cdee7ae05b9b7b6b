"""File sinks: JSONL and Parquet under the data directory, exactly-once across crashes.

* ``jsonl``: ``<root>/<destination>/<YYYY-MM-DD>.jsonl``, one cleaned event per line,
  fsynced after each batch. The committed size of every file is stored with the delivery
  cursor in one outbox transaction; on start (and after a failed write) the sink truncates
  each file back to its committed size, so a crash between write and commit leaves neither
  a duplicate nor a half line: the outbox redelivers exactly what was cut. Exactly-once.
* ``parquet``: ``<root>/<destination>/date=YYYY-MM-DD/part-<first>-<last>.parquet``
  (Hive-style partition by the UTC date of ``receivedAt``; first and last are the outbox
  seqs of the file's records), one file per batch and date, written in a hidden staging
  directory, fsynced and renamed into place, so readers never see half a file. A batch
  written again gets the same name and replaces its file; the files of a write that was
  not committed with the cursor are deleted on recovery (a journal, see ParquetFileSink),
  so the files hold each record once. Exactly-once.

The sink directory belongs to one outbox: recovery cuts back whatever that outbox has not
committed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec

from export.outbox import DELETION_NOTICE_MARK, StoredRecord
from export.sink import (
    Option,
    check_options,
    day_of_ms,
    fsync_path,
    message_id_of,
    one_of,
    with_defaults,
)

_PURGE_SUFFIX = ".purge.tmp"


def _lines_naming(data: bytes, needles: Sequence[bytes], spared: bytes) -> list[tuple[int, int]]:
    """(start, end) of each line of ``data`` holding one of ``needles`` but not ``spared``,
    in order: found with ``bytes.find`` (memchr speed), not by splitting every line."""
    spans: set[tuple[int, int]] = set()
    for needle in needles:
        at = data.find(needle)
        while at != -1:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            end = len(data) if end == -1 else end + 1
            if spared not in data[start:end]:
                spans.add((start, end))
            at = data.find(needle, end)
    return sorted(spans)


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

    async def purge(self, committed: Mapping[str, int], keys: Collection[str]) -> tuple[int, dict[str, int]]:
        return await asyncio.to_thread(self._purge, committed, keys)

    def _purge(self, committed: Mapping[str, int], keys: Collection[str]) -> tuple[int, dict[str, int]]:
        """Rewrite each file without the person's lines: a temp file beside it, fsynced, then
        renamed over it. A crash leaves the old file or the new one (and at worst a temp
        file, removed on recovery); a committed size left larger than the file is set right
        here or by the next write's commit."""
        self._close()
        if not keys or not self.directory.is_dir():
            return 0, {}
        needles = [f'"{k}"'.encode() for k in sorted(keys)]
        notice = DELETION_NOTICE_MARK.encode()
        removed = 0
        sizes: dict[str, int] = {}
        for path in sorted(self.directory.glob("*.jsonl")):
            keep = committed.get(path.name, 0)
            with open(path, "rb") as fh:
                data = fh.read(keep)
            doomed = _lines_naming(data, needles, notice)
            if not doomed:
                if path.stat().st_size < keep:  # an earlier purge renamed, then crashed
                    sizes[path.name] = path.stat().st_size
                continue
            parts, at = [], 0
            for start, end in doomed:
                parts.append(data[at:start])
                at = end
            parts.append(data[at:])
            body = b"".join(parts)
            temp = path.with_name(f".{path.name}{_PURGE_SUFFIX}")
            try:
                with open(temp, "wb") as fh:
                    fh.write(body)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            fsync_path(self.directory)
            removed += len(doomed)
            sizes[path.name] = len(body)
        return removed, sizes

    def _recover(self, committed: Mapping[str, int]) -> int:
        """Cut every file back to its committed size; returns the bytes removed."""
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for temp in self.directory.glob(f".*{_PURGE_SUFFIX}"):  # a purge cut short
            temp.unlink()
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
                fsync_path(self.directory)
            self._handles[name] = fh
            if len(self._handles) > 4:  # keep only the newest few days open
                oldest = min(self._handles)
                self._handles.pop(oldest).close()
        return fh

    def _write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        """Append records, fsync, and return the new size of each file written."""
        by_file: dict[str, list[bytes]] = {}
        for r in records:
            by_file.setdefault(f"{day_of_ms(r.received_at_ms)}.jsonl", []).append(r.payload)
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


# -- parquet -------------------------------------------------------------------------------
PARQUET_COMMITTED = "parquet.writes"
_JOURNAL = ".idgate-journal"
_STAGING = ".idgate-staging"


class _IdgateContext(msgspec.Struct):
    tenant: str | None = None
    source: str | None = None


class _Context(msgspec.Struct):
    unified_id: str | None = None
    idgate: _IdgateContext | None = None


class _Columns(msgspec.Struct, rename="camel"):
    """The fields of an event (or notice) that become Parquet columns."""

    type: str = ""
    timestamp: datetime | None = None
    received_at: datetime | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    event: str | None = None
    name: str | None = None
    context: _Context | None = None
    # notices
    survivor: str | None = None
    previous: str | None = None
    unified_id: str | None = None


_columns_decoder = msgspec.json.Decoder(_Columns)


def _parquet_schema() -> Any:
    import pyarrow as pa

    ts = pa.timestamp("ms", tz="UTC")
    return pa.schema(
        [
            ("seq", pa.int64()),
            ("message_id", pa.string()),
            ("type", pa.string()),
            ("event", pa.string()),
            ("name", pa.string()),
            ("unified_id", pa.string()),
            ("user_id", pa.string()),
            ("anonymous_id", pa.string()),
            ("tenant", pa.string()),
            ("source", pa.string()),
            ("timestamp", ts),
            ("received_at", ts),
            ("payload", pa.string()),
        ]
    )


class ParquetFileSink:
    """``<root>/<destination>/date=YYYY-MM-DD/part-<first seq>-<last seq>.parquet``.

    Columns: seq, message_id, type, event, name, unified_id (for notices: the survivor, the
    split person or the deleted one), user_id, anonymous_id, tenant, source, timestamp,
    received_at (UTC, ms) and payload (the whole event as JSON text).

    Each write has a number, committed with the delivery cursor as ``parquet.writes``.
    Before a file is renamed into place, the journal ``.idgate-journal`` (hidden from
    readers, like the staging directory ``.idgate-staging``) records the write's number and
    whether the file is new or replaces one of the same name (the same records written
    again). ``recover`` deletes the new files of every write numbered above the committed
    one, so it does not depend on the order of seqs (the distributed outbox hands over
    older entries of a dead replica).
    """

    def __init__(
        self, root: Path, destination: str, *, compression: str = "zstd", journal_keep: int = 500
    ) -> None:
        self.destination = destination
        self.directory = root / destination
        self.compression = compression
        # writes kept when the journal is compacted: only those since the last commit matter,
        # and the worker commits every write before the next
        self.journal_keep = journal_keep
        self._writes = 0
        self._journal_entries = 0
        self._schema = _parquet_schema()

    async def recover(self, committed: Mapping[str, int]) -> int:
        return await asyncio.to_thread(self._recover, committed)

    async def write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        return await asyncio.to_thread(self._write, records)

    async def close(self) -> None:
        return None

    async def purge(self, committed: Mapping[str, int], keys: Collection[str]) -> tuple[int, dict[str, int]]:
        return await asyncio.to_thread(self._purge, keys), {}

    def _purge(self, keys: Collection[str]) -> int:
        """Rewrite each part file holding the person's rows without them (staged, fsynced,
        renamed over it: readers see the old file or the new one; a file left empty is
        removed). The files of committed writes only: the worker purges between batches."""
        if not keys or not self.directory.is_dir():
            return 0
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        needles = [f'"{k}"' for k in sorted(keys)]
        removed = 0
        staging = self.directory / _STAGING
        for path in sorted(self.directory.glob("date=*/part-*.parquet")):
            # the payload column first (it holds every value of the record); the whole file
            # only when it names the person
            columns = pq.read_table(path, columns=["payload", "type"])
            person = pc.fill_null(pc.match_substring(columns["payload"], needles[0]), False)
            for needle in needles[1:]:
                person = pc.or_(person, pc.fill_null(pc.match_substring(columns["payload"], needle), False))
            notice = pc.fill_null(pc.equal(columns["type"], "identity.deleted"), False)
            doomed = pc.and_(person, pc.invert(notice))
            count = pc.sum(doomed).as_py() or 0
            if not count:
                continue
            kept = pq.read_table(path, schema=self._schema).filter(pc.invert(doomed))
            if kept.num_rows == 0:
                path.unlink()
            else:
                staging.mkdir(parents=True, exist_ok=True)
                temp = staging / f"{path.name}.{os.getpid()}.tmp"
                try:
                    pq.write_table(kept, temp, compression=self.compression)
                    fsync_path(temp)
                    os.replace(temp, path)
                except BaseException:
                    temp.unlink(missing_ok=True)
                    raise
            fsync_path(path.parent)
            removed += count
        return removed

    def _recover(self, committed: Mapping[str, int]) -> int:
        """Delete the files of uncommitted writes and staged temp files; returns the bytes removed."""
        committed_writes = committed.get(PARQUET_COMMITTED, 0)
        self.directory.mkdir(parents=True, exist_ok=True)
        journal = self.directory / _JOURNAL
        removed = 0
        touched: set[Path] = set()
        lines = journal.read_text("utf-8", "replace").splitlines() if journal.exists() else []
        for line in lines:
            parts = line.split("\t")
            if len(parts) != 3 or not parts[0].isdigit():
                continue  # a torn last line: that write had renamed nothing yet
            number, state, relative = parts
            path = self.directory / relative
            if int(number) > committed_writes and state == "new" and path.is_file():
                removed += path.stat().st_size
                path.unlink()
                touched.add(path.parent)
        staging = self.directory / _STAGING
        if staging.is_dir():
            for temp in staging.iterdir():
                removed += temp.stat().st_size
                temp.unlink()
        for directory in touched:
            fsync_path(directory)
        with open(journal, "wb") as fh:  # everything in it is now settled
            os.fsync(fh.fileno())
        fsync_path(self.directory)
        self._writes = committed_writes
        self._journal_entries = 0
        return removed

    def _write(self, records: Sequence[StoredRecord]) -> dict[str, int]:
        if not records:
            return {}
        number = self._writes + 1
        by_day: dict[str, list[StoredRecord]] = {}
        for r in records:
            by_day.setdefault(day_of_ms(r.received_at_ms), []).append(r)
        plan: list[tuple[str, list[StoredRecord]]] = []
        entries: list[str] = []
        for day, group in by_day.items():
            seqs = [r.seq for r in group]
            relative = f"date={day}/part-{min(seqs):020d}-{max(seqs):020d}.parquet"
            state = "replaced" if (self.directory / relative).exists() else "new"
            plan.append((relative, group))
            entries.append(f"{number}\t{state}\t{relative}\n")
        self._journal(entries, number)
        import pyarrow.parquet as pq

        staging = self.directory / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        for relative, group in plan:
            final = self.directory / relative
            temp = staging / f"{final.name}.{os.getpid()}.tmp"
            try:
                pq.write_table(self._table(group), temp, compression=self.compression)
                fsync_path(temp)
                if not final.parent.is_dir():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    fsync_path(self.directory)
                os.replace(temp, final)  # atomic: readers see no file or the whole file
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            fsync_path(final.parent)
        self._writes = number
        return {PARQUET_COMMITTED: number}

    def _journal(self, entries: list[str], number: int) -> None:
        """Append the write's files to the journal, durably, before any is renamed into place."""
        journal = self.directory / _JOURNAL
        if self._journal_entries > 2 * self.journal_keep:
            keep = [
                line + "\n"
                for line in journal.read_text("utf-8", "replace").splitlines()
                if line.split("\t", 1)[0].isdigit()
                and int(line.split("\t", 1)[0]) > number - self.journal_keep
            ]
            temp = self.directory / f"{_JOURNAL}.tmp"
            with open(temp, "w", encoding="utf-8") as fh:
                fh.writelines(keep)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, journal)
            fsync_path(self.directory)
            self._journal_entries = len(keep)
        with open(journal, "a", encoding="utf-8") as fh:
            fh.writelines(entries)
            fh.flush()
            os.fsync(fh.fileno())
        self._journal_entries += len(entries)

    def _table(self, records: Sequence[StoredRecord]) -> Any:
        import pyarrow as pa

        columns: dict[str, list[Any]] = {name: [] for name in self._schema.names}
        for r in records:
            try:
                row = _columns_decoder.decode(r.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                row = _Columns()  # still delivered: the payload column holds it as it is
            ctx = row.context or _Context()
            idg = ctx.idgate or _IdgateContext()
            received_at = row.received_at or datetime.fromtimestamp(r.received_at_ms / 1000, UTC)
            columns["seq"].append(r.seq)
            columns["message_id"].append(message_id_of(r))
            columns["type"].append(row.type or None)
            columns["event"].append(row.event)
            columns["name"].append(row.name)
            columns["unified_id"].append(ctx.unified_id or row.survivor or row.previous or row.unified_id)
            columns["user_id"].append(row.user_id)
            columns["anonymous_id"].append(row.anonymous_id)
            columns["tenant"].append(idg.tenant)
            columns["source"].append(idg.source)
            columns["timestamp"].append(row.timestamp or received_at)
            columns["received_at"].append(received_at)
            columns["payload"].append(r.payload.decode("utf-8", "replace"))
        return pa.table(columns, schema=self._schema)


FILE_OPTIONS: dict[str, dict[str, Option]] = {
    "jsonl": {},
    "parquet": {
        "compression": Option(
            (str,), "Parquet codec", default="zstd", check=one_of("zstd", "snappy", "gzip", "none")
        ),
    },
}


def validate_file_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    return check_options(kind, options, FILE_OPTIONS[kind])


def build_file_sink(
    kind: str, *, root: Path, destination: str, options: Mapping[str, Any]
) -> JsonlFileSink | ParquetFileSink:
    if kind == "parquet":
        opts = with_defaults(options, FILE_OPTIONS["parquet"])
        return ParquetFileSink(root, destination, compression=opts["compression"])
    return JsonlFileSink(root, destination)


# -- retention (export.retention) ------------------------------------------------------------
def expired_sink_files(directory: Path, kind: str, before_day: str) -> list[Path]:
    """The whole files of a file sink holding only days before ``before_day`` (YYYY-MM-DD):
    JSONL day files ``<day>.jsonl``, Parquet partitions ``date=<day>/`` (every file in them)."""
    if not directory.is_dir():
        return []
    if kind == "parquet":
        return sorted(
            path
            for partition in directory.glob("date=*")
            if partition.is_dir() and partition.name.removeprefix("date=") < before_day
            for path in partition.glob("*.parquet")
        )
    return sorted(path for path in directory.glob("*.jsonl") if path.stem < before_day)


def remove_sink_files(paths: Sequence[Path]) -> int:
    """Delete the files (and the Parquet partitions they leave empty), durably; returns how
    many files went."""
    removed = 0
    parents: set[Path] = set()
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        parents.add(path.parent)
    for parent in sorted(parents):
        if parent.name.startswith("date=") and not any(parent.iterdir()):
            parent.rmdir()
            fsync_path(parent.parent)
        elif parent.exists():
            fsync_path(parent)
    return removed
