"""File sinks: Parquet written atomically and exactly once (read back with pyarrow), the
option checks of every sink kind, the dispatch of build_sink."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from export.file_sinks import PARQUET_COMMITTED, JsonlFileSink, ParquetFileSink
from export.outbox import StoredRecord
from export.sinks import build_sink, validate_options
from tests.receivers import sample_records

DAY_MS = 86_400_000
T0 = 1_763_700_000_000  # 2025-11-21


def _notice(seq: int, body: dict) -> StoredRecord:
    payload = json.dumps(body).encode()
    return StoredRecord(seq, T0, ("d",), payload, b"", body["messageId"], kind="notice")


def _read(directory: Path) -> list[dict]:
    return pq.read_table(directory).sort_by("seq").to_pylist()


def _visible_files(directory: Path) -> list[str]:
    """Files a reader sees (pyarrow, Spark and Hive skip names starting with "." or "_")."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )


def test_parquet_columns_partitions_and_names(tmp_path: Path) -> None:
    sink = build_sink("parquet", root=tmp_path, destination="lake")
    assert isinstance(sink, ParquetFileSink)
    first = sample_records(5, start_seq=1)
    # a batch spanning midnight UTC: one file per date partition
    second = sample_records(3, start_seq=6) + sample_records(2, start_seq=9, received_at_ms=T0 + DAY_MS)
    merged = _notice(
        11,
        {
            "type": "identity.merged",
            "messageId": "identity.merged:p_b",
            "survivor": "p_a",
            "merged": "p_b",
            "receivedAt": "2025-11-21T05:00:00+00:00",
            "context": {"idgate": {"tenant": "shop", "notice": True}},
        },
    )

    async def main() -> list[dict[str, int]]:
        assert await sink.recover({}) == 0
        out = [await sink.write(first), await sink.write(second), await sink.write([merged])]
        await sink.close()
        return out

    committed = asyncio.run(main())
    assert committed == [{PARQUET_COMMITTED: 1}, {PARQUET_COMMITTED: 2}, {PARQUET_COMMITTED: 3}]
    lake = tmp_path / "lake"
    assert _visible_files(lake) == [
        "date=2025-11-21/part-00000000000000000001-00000000000000000005.parquet",
        "date=2025-11-21/part-00000000000000000006-00000000000000000008.parquet",
        "date=2025-11-21/part-00000000000000000011-00000000000000000011.parquet",
        "date=2025-11-22/part-00000000000000000009-00000000000000000010.parquet",
    ]
    assert not list((lake / ".idgate-staging").iterdir())  # no temp file left
    rows = _read(lake)
    assert [r["seq"] for r in rows] == list(range(1, 12))
    assert [r["message_id"] for r in rows[:10]] == [f"m-{i}" for i in range(1, 11)]
    row = rows[0]
    event = json.loads(row["payload"])
    assert row["type"] == "track" and row["event"] == "Order Completed"
    assert row["unified_id"] == event["context"]["unified_id"] == "p_person0"
    assert row["user_id"] == event["userId"] and row["anonymous_id"] == event["anonymousId"]
    assert (row["tenant"], row["source"]) == ("shop", "shop-web")
    assert int(row["timestamp"].timestamp() * 1000) == T0 == int(row["received_at"].timestamp() * 1000)
    assert str(row["date"]) == "2025-11-21"  # the Hive partition, read back as a column
    notice = rows[-1]
    assert notice["type"] == "identity.merged" and notice["unified_id"] == "p_a"
    assert notice["user_id"] is None and notice["message_id"] == "identity.merged:p_b"


def test_parquet_redelivery_never_duplicates(tmp_path: Path) -> None:
    """The worker's protocol by hand: write, keep what write returned as committed, crash
    before a commit, recover(committed), redeliver from the cursor."""
    sink = ParquetFileSink(tmp_path, "lake")
    lake = tmp_path / "lake"

    async def main() -> None:
        await sink.recover({})
        committed = await sink.write(sample_records(50, start_seq=1))
        # the same batch again (a commit that failed after it was done): same name, replaced
        assert await sink.write(sample_records(50, start_seq=1)) == {PARQUET_COMMITTED: 2}
        assert len(_read(lake)) == 50
        # a batch written, then a crash before the cursor commit, with a temp file left over
        await sink.write(sample_records(30, start_seq=51))
        (lake / ".idgate-staging" / "part-x.parquet.1.tmp").write_bytes(b"half a file")
        removed = await sink.recover(committed)
        assert removed > 0
        # the same-named file of write 2 held the committed records: it stays
        assert len(_read(lake)) == 50
        # the outbox redelivers from the cursor, cut differently (a bigger batch) ...
        committed = await sink.write(sample_records(80, start_seq=51))
        assert committed == {PARQUET_COMMITTED: 2}
        # ... and then older seqs after newer ones (the distributed outbox claims a dead
        # replica's entries): uncommitted, they are removed all the same
        await sink.write(sample_records(10, start_seq=200))
        await sink.write(sample_records(10, start_seq=20, received_at_ms=T0 - DAY_MS))
        await sink.recover(committed)

    asyncio.run(main())
    rows = _read(lake)
    assert [r["seq"] for r in rows] == list(range(1, 131))
    assert _visible_files(lake) == [
        "date=2025-11-21/part-00000000000000000001-00000000000000000050.parquet",
        "date=2025-11-21/part-00000000000000000051-00000000000000000130.parquet",
    ]
    assert not list((lake / ".idgate-staging").iterdir())
    assert (lake / ".idgate-journal").read_bytes() == b""


def test_parquet_journal_stays_small(tmp_path: Path) -> None:
    sink = ParquetFileSink(tmp_path, "lake", compression="none", journal_keep=10)
    journal = tmp_path / "lake" / ".idgate-journal"

    async def main() -> dict[str, int]:
        await sink.recover({})
        committed: dict[str, int] = {}
        for i in range(1, 62):
            committed = await sink.write(sample_records(1, start_seq=i))
            assert len(journal.read_text().splitlines()) <= 21
        await sink.write(sample_records(1, start_seq=5000))  # not committed
        await sink.recover(committed)
        return committed

    assert asyncio.run(main()) == {PARQUET_COMMITTED: 61}
    rows = _read(tmp_path / "lake")
    assert [r["seq"] for r in rows] == list(range(1, 62))


def test_jsonl_is_unchanged(tmp_path: Path) -> None:
    sink = build_sink("jsonl", root=tmp_path, destination="files")
    assert isinstance(sink, JsonlFileSink)

    async def main() -> dict[str, int]:
        await sink.recover({})
        sizes = await sink.write(sample_records(3))
        await sink.close()
        return sizes

    assert list(asyncio.run(main())) == ["2025-11-21.jsonl"]
    lines = (tmp_path / "files" / "2025-11-21.jsonl").read_text().splitlines()
    assert [json.loads(line)["messageId"] for line in lines] == ["m-1", "m-2", "m-3"]


VALID = {
    "jsonl": {},
    "parquet": {"compression": "snappy"},
    "webhook": {"url": "https://hooks.example.com/in", "timeout_seconds": 5, "headers": {"X-Team": "bi"}},
    "segment": {"url": "https://api.segment.io", "write_key_env": "SEGMENT_WRITE_KEY"},
    "sensors": {"url": "http://sa.example.com:8106/sa?project=default", "project": "default"},
    "redis_stream": {"stream": "events", "maxlen": 10_000},
    "nats": {"subject": "idgate.events", "stream": "IDGATE"},
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_options_pass(kind: str) -> None:
    assert validate_options(kind, VALID[kind]) == []


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        ("jsonl", {"path": "/x"}, {"path": "unknown option"}),
        (
            "parquet",
            {"compression": "lzo", "row_group": 5},
            {"compression": "must be one of", "row_group": "unknown"},
        ),
        ("parquet", {"compression": 3}, {"compression": "must be a string"}),
        ("webhook", {}, {"url": "required"}),
        ("webhook", {"url": "ftp://x"}, {"url": "http or https"}),
        ("webhook", {"url": "http://"}, {"url": "no host"}),
        ("webhook", {"url": "http://h:99999"}, {"url": "not a valid URL"}),
        (
            "webhook",
            {"url": "http://h", "timeout_seconds": "5"},
            {"timeout_seconds": "must be an integer or a number"},
        ),
        ("webhook", {"url": "http://h", "timeout_seconds": True}, {"timeout_seconds": "not bool"}),
        ("webhook", {"url": "http://h", "timeout_seconds": 0}, {"timeout_seconds": "between"}),
        ("webhook", {"url": "http://h", "headers": {"Content-Type": "x"}}, {"headers": "set by the sink"}),
        (
            "webhook",
            {"url": "http://h", "headers": {"Bad Name": "x"}},
            {"headers": "not a valid header name"},
        ),
        ("webhook", {"url": "http://h", "headers": {"X-A": 1}}, {"headers": "a string on one line"}),
        (
            "webhook",
            {"url": "http://h", "headers_env": {"Authorization": "not-a-var"}},
            {"headers_env": "environment"},
        ),
        ("segment", {"url": "http://h"}, {"write_key": "required"}),
        (
            "segment",
            {"url": "http://h", "write_key": "k", "write_key_env": "K"},
            {"write_key_env": "not both"},
        ),
        (
            "segment",
            {"url": "http://h", "write_key": "k", "max_request_bytes": 10},
            {"max_request_bytes": "between"},
        ),
        ("sensors", {"url": "http://h/sa", "project": "my project"}, {"project": "Sensors project"}),
        ("sensors", {"url": "http://h/sa", "events_per_request": 0}, {"events_per_request": "between"}),
        ("redis_stream", {}, {"stream": "required"}),
        ("redis_stream", {"stream": "s", "url": "http://h"}, {"url": "redis or rediss or unix"}),
        (
            "redis_stream",
            {"stream": "s", "maxlen": 1.5, "ttl": 3},
            {"maxlen": "an integer", "ttl": "unknown"},
        ),
        ("nats", {}, {"subject": "required"}),
        ("nats", {"subject": "idgate.*"}, {"subject": "without wildcards"}),
        ("nats", {"subject": "a", "stream": "a.b"}, {"stream": "stream name"}),
        ("nats", {"subject": "a", "url": "redis://h"}, {"url": "nats or tls"}),
        ("kafka", {}, {"sink": "unknown sink kind"}),
    ],
)
def test_bad_options_are_reported_by_name(kind: str, options: dict, expected: dict[str, str]) -> None:
    problems = validate_options(kind, options)
    by_name = {name: problem for name, problem in problems}
    assert set(by_name) == set(expected), problems
    for name, fragment in expected.items():
        assert fragment in by_name[name], (name, by_name[name])


def test_config_check_names_the_bad_option() -> None:
    from gateway.config import ConfigProblems, parse_config

    text = """
[[tenants]]
id = "shop"
[[tenants.sources]]
id = "web"
platform = "web"
dev_write_key = "web-test-key-0001"
[[tenants.destinations]]
id = "hook"
sink = "webhook"
purposes = ["analytics"]
options = { url = "ftp://example.com", timeout_seconds = 5, retries = 3 }
"""
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, dev=True)
    problems = "\n".join(info.value.problems)
    assert "tenants[0].destinations[0].options.url: must be a URL with scheme http or https" in problems
    assert "tenants[0].destinations[0].options.retries: unknown option for the webhook sink" in problems
    assert "options.timeout_seconds" not in problems


def test_readme_has_a_valid_example_per_kind() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[2] / "export" / "README.md").read_text()
    examples = [tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)]
    destinations = [d for e in examples for d in e["tenants"]["destinations"]]
    assert sorted(d["sink"] for d in destinations) == sorted(VALID)
    for d in destinations:
        assert validate_options(d["sink"], d.get("options", {})) == [], d["id"]


def _deleted_notice(seq: int, unified_id: str) -> StoredRecord:
    body = {"type": "identity.deleted", "messageId": f"n-{seq}", "unifiedId": unified_id, "identifiers": []}
    return StoredRecord(
        seq, T0, ("d",), json.dumps(body, separators=(",", ":")).encode(), b"", f"n-{seq}", kind="notice"
    )


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_purge_rewrites_the_files_without_the_persons_lines(kind: str, tmp_path: Path) -> None:
    """A deletion removes every line naming the person (any of their values, as a whole JSON
    string) from the committed files, keeps their deletion notice (the destination's
    deletion request) and everyone else's lines; a second purge finds nothing more."""
    sink = build_sink(kind, root=tmp_path, destination="d", options={})

    async def go() -> tuple[int, int, dict[str, int]]:
        await sink.recover({})
        committed: dict[str, int] = {}
        records = sample_records(21)  # one person per 7 seqs (seq // 7)
        for lo in range(0, 21, 7):
            committed.update(await sink.write(records[lo : lo + 7]))
        committed.update(await sink.write([_deleted_notice(22, "p_person1")]))
        removed, sizes = await sink.purge(committed, {"p_person1", "u.pseudo1"})  # type: ignore[attr-defined]
        committed.update(sizes)
        again, _ = await sink.purge(committed, {"p_person1", "u.pseudo1"})  # type: ignore[attr-defined]
        await sink.recover(committed)  # the committed sizes are the files' own: nothing cut
        return removed, again, committed

    removed, again, committed = asyncio.run(go())
    # seqs 7..13 are person 1's
    assert (removed, again) == (7, 0)
    directory = tmp_path / "d"
    if kind == "jsonl":
        lines = [json.loads(x) for f in sorted(directory.glob("*.jsonl")) for x in f.read_text().splitlines()]
        assert committed == {f.name: f.stat().st_size for f in directory.glob("*.jsonl")}
    else:
        lines = [json.loads(r["payload"]) for r in _read(directory)]
    text = json.dumps(lines)
    assert "u.pseudo1" not in text
    assert [x["type"] for x in lines if "p_person1" in json.dumps(x)] == ["identity.deleted"]
    assert len([x for x in lines if x["type"] == "track"]) == 21 - 7
    assert not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_a_jsonl_purge_cut_short_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """A crash before the rename leaves a temp file beside the intact old file (recovery
    removes it); a crash after the rename but before the commit leaves a committed size
    larger than the file, set right by the next purge (or the next write's commit)."""
    sink = JsonlFileSink(tmp_path, "d")

    async def go() -> None:
        await sink.recover({})
        committed = dict(await sink.write(sample_records(14)))
        (name,) = committed
        path = tmp_path / "d" / name
        before = path.read_bytes()
        (tmp_path / "d" / f".{name}.purge.tmp").write_bytes(b"half")
        await sink.recover(committed)
        assert path.read_bytes() == before and not list((tmp_path / "d").glob(".*.tmp"))
        removed, sizes = await sink.purge(committed, {"p_person1"})
        assert removed == 7 and sizes[name] == path.stat().st_size < committed[name]
        # the commit of ``sizes`` was lost: a later purge (nothing left to remove) repairs it
        removed, repaired = await sink.purge(committed, {"p_person1"})
        assert removed == 0 and repaired == sizes

    asyncio.run(go())
