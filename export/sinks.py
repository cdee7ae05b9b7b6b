"""Sinks: where delivered events end up, and the options each kind of sink takes.

Every sink receives the records of one destination in outbox order and passes each
record's message id on, so whatever sits behind it can dedupe: delivery is at-least-once.
What each kind guarantees on top of that:

* ``jsonl`` (this module): ``<root>/<destination>/<YYYY-MM-DD>.jsonl``, one cleaned event
  per line, fsynced after each batch. The committed size of every file is stored with the
  delivery cursor in one outbox transaction; on start (and after a failed write) the sink
  truncates each file back to its committed size, so a crash between write and commit
  leaves neither a duplicate nor a half line: the outbox redelivers exactly what was cut.
  Exactly-once.
* ``parquet`` (this module): ``<root>/<destination>/date=YYYY-MM-DD/part-<first>-<last>.parquet``
  (Hive-style partition by the UTC date of ``receivedAt``; first and last are the outbox
  seqs of the file's records), one file per batch and date, written in a hidden staging
  directory, fsynced and renamed into place, so readers never see half a file. A batch
  written again gets the same name and replaces its file; the files of a write that was
  not committed with the cursor are deleted on recovery (a journal, see ParquetFileSink),
  so the files hold each record once. Exactly-once.
* ``webhook``, ``segment``, ``sensors`` (export.http_sinks): at-least-once over HTTP with the
  message id in every record.
* ``redis_stream``, ``nats`` (export.stream_sinks): at-least-once to the server, deduplicated
  there by message id (a Redis key per message id; JetStream's ``Nats-Msg-Id`` window).

The sink directory belongs to one outbox: recovery cuts back whatever that outbox has not
committed.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol
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


def _day(received_at_ms: int) -> str:
    """The UTC date of a timestamp in ms (cached per day: called for every record)."""
    return _day_of(received_at_ms // 86_400_000)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename or a new file is durable once its directory is)."""
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
            by_day.setdefault(_day(r.received_at_ms), []).append(r)
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


# -- options and construction ---------------------------------------------------------------
FILE_OPTIONS: dict[str, dict[str, Option]] = {
    "jsonl": {},
    "parquet": {
        "compression": Option(
            (str,), "Parquet codec", default="zstd", check=one_of("zstd", "snappy", "gzip", "none")
        ),
    },
}


def _option_specs() -> dict[str, dict[str, Option]]:
    from export.http_sinks import HTTP_OPTIONS
    from export.stream_sinks import STREAM_OPTIONS

    return {**FILE_OPTIONS, **HTTP_OPTIONS, **STREAM_OPTIONS}


def validate_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with a destination's sink options, as (option name, problem) pairs."""
    specs = _option_specs()
    if kind not in specs:
        return [("sink", f"unknown sink kind {kind!r} (known: {', '.join(specs)})")]
    if kind in FILE_OPTIONS:
        return check_options(kind, options, FILE_OPTIONS[kind])
    if kind in ("webhook", "segment", "sensors"):
        from export.http_sinks import validate_http_options

        return validate_http_options(kind, options)
    from export.stream_sinks import validate_stream_options

    return validate_stream_options(kind, options)


def build_sink(kind: str, *, root: Path, destination: str, options: Mapping[str, Any] | None = None) -> Sink:
    """The sink of one destination. Options are checked again here (config check reports
    them all with their location first), so a bad one fails at start, not at the first write."""
    options = options or {}
    problems = validate_options(kind, options)
    if problems:
        raise ValueError(
            "; ".join(
                f"{name if name == 'sink' else 'options.' + name}: {problem}" for name, problem in problems
            )
        )
    if kind == "jsonl":
        return JsonlFileSink(root, destination)
    if kind == "parquet":
        opts = with_defaults(options, FILE_OPTIONS["parquet"])
        return ParquetFileSink(root, destination, compression=opts["compression"])
    if kind in ("webhook", "segment", "sensors"):
        from export.http_sinks import build_http_sink

        return build_http_sink(kind, destination=destination, options=options)
    if kind in ("redis_stream", "nats"):
        from export.stream_sinks import build_stream_sink

        return build_stream_sink(kind, destination=destination, options=options)
    raise ValueError(f"unknown sink kind {kind!r}")
