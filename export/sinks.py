"""The sink registry: every kind of sink by name, with its options, checks and constructor.

Destinations name their sink kind in the config (``sink = "webhook"``); ``validate_options``
reports bad options by name for ``idgate config check``, ``build_sink`` builds the sink for
the delivery worker. The kinds live in their own modules, which import only export.sink,
so nothing here is imported back.

What each kind guarantees (delivery is at-least-once; every record carries its message id
so whatever sits behind a sink can dedupe):

* ``jsonl``, ``parquet`` (export.file_sinks): exactly-once files under the data directory.
* ``webhook``, ``segment``, ``sensors`` (export.http_sinks): at-least-once over HTTP.
* ``redis_stream``, ``nats`` (export.stream_sinks): at-least-once to the server,
  deduplicated there by message id (a Redis key per message id; JetStream's
  ``Nats-Msg-Id`` window).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.file_sinks import FILE_OPTIONS, build_file_sink, validate_file_options
from export.http_sinks import HTTP_OPTIONS, build_http_sink, validate_http_options
from export.sink import Option, Sink
from export.stream_sinks import STREAM_OPTIONS, build_stream_sink, validate_stream_options


@dataclass(frozen=True)
class SinkKind:
    options: Mapping[str, Option]
    validate: Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]
    build: Callable[[str, Path, str, Mapping[str, Any]], Sink]


SINK_KINDS: dict[str, SinkKind] = {
    **{
        kind: SinkKind(
            spec,
            validate_file_options,
            lambda kind, root, destination, options: build_file_sink(
                kind, root=root, destination=destination, options=options
            ),
        )
        for kind, spec in FILE_OPTIONS.items()
    },
    **{
        kind: SinkKind(
            spec,
            validate_http_options,
            lambda kind, root, destination, options: build_http_sink(
                kind, destination=destination, options=options
            ),
        )
        for kind, spec in HTTP_OPTIONS.items()
    },
    **{
        kind: SinkKind(
            spec,
            validate_stream_options,
            lambda kind, root, destination, options: build_stream_sink(
                kind, destination=destination, options=options
            ),
        )
        for kind, spec in STREAM_OPTIONS.items()
    },
}


def validate_options(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with a destination's sink options, as (option name, problem) pairs."""
    found = SINK_KINDS.get(kind)
    if found is None:
        return [("sink", f"unknown sink kind {kind!r} (known: {', '.join(SINK_KINDS)})")]
    return found.validate(kind, options)


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
    return SINK_KINDS[kind].build(kind, root, destination, options)
