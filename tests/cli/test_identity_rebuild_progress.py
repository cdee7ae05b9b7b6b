"""`idgate identity rebuild` on a terminal: its progress bar ends at 100 % on a log of a
few changes too (it reported only every 10,000 changes, so small logs ended at 0 %)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from identity.db import make_engine, migrate
from identity.graph import IdentityGraph, IdentityRules, Provenance
from identity.store import MIGRATIONS_DIR, IdentityLogStore
from tests.cli.conftest import clean_env
from tests.conftest import IDGATE


def write_identity_log(path: Path, persons: int) -> int:
    """A real change log: each person's user id, device and anonymous id linked."""
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine, script_location=MIGRATIONS_DIR)
    graph = IdentityGraph(IdentityRules())
    rows = []
    for i in range(persons):
        prov = Provenance(source="acme-app", event_id=f"m-{i}", at=datetime.now(UTC), rule="event")
        nodes = [f"user_id:u{i}", f"device_id:d{i}", f"anonymous_id:a{i}"]
        _, changes = graph.resolve(nodes, link=True, provenance=prov)
        rows += [("acme", type(c).__name__, msgspec.json.encode(c), 0) for c in changes]
    store = IdentityLogStore(engine)
    store.insert_and_commit(*store.begin_locked(), rows)
    engine.dispose()
    return len(rows)


def run_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal (click draws bars only on a tty)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_rebuild_progress_ends_at_100_percent_on_a_small_log(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    changes = write_identity_log(data / "identity.sqlite3", persons=7)
    assert 0 < changes < 10_000

    code, out = run_on_a_terminal(
        [str(IDGATE), "identity", "rebuild"], clean_env(IDGATE_ENV="dev", IDGATE_DATA_DIR=str(data))
    )
    assert code == 0, out
    assert f"OK: {changes} changes" in out
    shown = re.findall(r"(\d+)%", out)
    assert shown, out
    assert shown[-1] == "100", out
