"""Kill -9 right after a 2xx: every acknowledged event is delivered exactly once after restart."""

from __future__ import annotations

from collections import Counter

from tests.conftest import Gateway, mid


def test_acknowledged_events_survive_kill9_exactly_once(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway.start()
    acknowledged: list[str] = []
    for _ in range(5):
        ids = [mid() for _ in range(200)]
        assert gw.send_tracks(ids)["accepted"] == 200
        acknowledged += ids
    gw.kill9()  # immediately after the last 2xx, delivery most likely still running

    gw.start()
    # A client that did not see the ack would resend: dedupe holds across the restart.
    replay = gw.send_tracks(acknowledged[-100:])
    assert (replay["accepted"], replay["duplicates"]) == (0, 100)

    gw.wait_for_sink(set(acknowledged), timeout=30)
    for destination in ("warehouse", "stream"):
        counts = Counter(e["messageId"] for e in gw.sink_lines(destination))
        assert set(counts) == set(acknowledged), destination
        assert max(counts.values()) == 1, f"{destination}: delivered twice"


def test_half_written_sink_lines_are_cut_back_and_redelivered(fresh_gateway: Gateway) -> None:
    """A crash between the sink write and the cursor commit leaves extra bytes: they are cut."""
    gw = fresh_gateway.start()
    ids = [mid() for _ in range(20)]
    gw.send_tracks(ids)
    gw.wait_for_sink(set(ids))
    gw.kill9()
    # Simulate a write that was not committed: a duplicate line and half a line.
    (path,) = (gw.data_dir / "sinks" / "warehouse").glob("*.jsonl")
    with open(path, "ab") as fh:
        fh.write(path.read_bytes().splitlines(keepends=True)[0] + b'{"type":"tra')
    gw.start()
    more = [mid() for _ in range(5)]
    gw.send_tracks(more)
    gw.wait_for_sink(set(ids) | set(more))
    counts = Counter(e["messageId"] for e in gw.sink_lines("warehouse"))  # parses every line
    assert set(counts) == set(ids) | set(more) and max(counts.values()) == 1
