"""The README's five-minute path, run as a newcomer runs it: `idgate serve` with the shipped
idgate.example.toml on a fresh ./var, then every shell block between the README's
``five-minutes`` markers, in order, with bash (only the port differs). Each answer must
match the output the README prints under its command, and the sink must hold one person
across the anonymous browsing and the login."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.cli.conftest import ServeFactory
from tests.conftest import ROOT, jsonl_records
from tests.waiting import wait_until

README = ROOT / "README.md"


def five_minute_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- five-minutes:start", 1)[1].split("<!-- five-minutes:end -->", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def expected_lines(block: str) -> list[re.Pattern[str]]:
    """The README's ``# ...`` output lines after the command, ``...`` matching anything."""
    command_done = False
    patterns = []
    for line in block.splitlines():
        if line.startswith("EOF") or line.rstrip().endswith("}'"):
            command_done = True
            continue
        if command_done and line.startswith("# "):
            shown = line[2:].rstrip()
            literal = re.escape(shown).replace(r"\.\.\.", ".*")
            patterns.append(re.compile(re.sub(r"(\\ )+", r"\\s+", literal)))
    return patterns


def sink_events(data_dir: Path) -> list[dict]:
    return jsonl_records(sorted((data_dir / "sinks" / "warehouse").glob("*.jsonl")))


def test_the_readme_happy_path_shows_one_person_across_the_login(tmp_path: Path, serve: ServeFactory) -> None:
    blocks = five_minute_blocks()
    assert len(blocks) == 5, "the README's five-minute path changed: update this test with it"
    gw = serve(tmp_path / "var", cwd=tmp_path).wait_ready()
    outputs = []
    for i, block in enumerate(blocks):
        if i == len(blocks) - 1:  # "a moment later": delivery runs in the background
            wait_until(
                lambda: (
                    len([e for e in sink_events(gw.data_dir) if "unified_id" in e.get("context", {})]) >= 3
                ),
                timeout=20,
                what="three events with their unified ID in the sink",
            )
        script = block.replace("127.0.0.1:8080", f"127.0.0.1:{gw.port}")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"block {i}:\n{script}\n{done.stderr}"
        lines = done.stdout.splitlines()
        patterns = expected_lines(block)
        assert patterns, f"block {i} shows no output"
        assert len(lines) == len(patterns), f"block {i}: {lines}"
        for line, pattern in zip(lines, patterns, strict=True):
            assert pattern.fullmatch(line), (
                f"block {i}: {line!r} does not match the README's {pattern.pattern!r}"
            )
        outputs.append(lines)

    listed = [line.split() for line in outputs[-1]]
    assert [row[0] for row in listed] == ["m-1", "m-2", "m-3"]
    persons = {row[-1] for row in listed}
    assert len(persons) == 1, listed  # the anonymous browsing and the login: one person
    events = {e["messageId"]: e for e in sink_events(gw.data_dir) if "unified_id" in e.get("context", {})}
    assert {e["context"]["unified_id"] for e in events.values()} == persons
    # what the README says about the lines themselves
    added = events["m-3"]
    assert added["properties"]["note"] == "call me on [redacted:phone]"
    assert events["m-2"]["context"]["ip"] == "203.0.113.0"
    assert added["userId"].startswith("k1.") and added["context"]["idgate"]["consentProof"]
    assert any(e["type"] == "identity.merged" for e in sink_events(gw.data_dir))
