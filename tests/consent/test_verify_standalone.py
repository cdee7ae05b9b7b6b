"""The offline verifier stands alone: an auditor runs it on an export file without SQLAlchemy.

A real ledger on SQLite writes a sealed, checkpointed export; a fresh interpreter, in
which importing SQLAlchemy, SQLModel or the store's modules fails, imports
``consent.verify`` and checks that file (and finds an edit in a copy of it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from consent.db import migrate_consent
from consent.ledger import Ledger
from consent.signing import LedgerSigner

if TYPE_CHECKING:  # fixtures' types; conftest modules are not imported by name at run time
    from conftest import Database, DraftFactory

ROOT = Path(__file__).resolve().parents[2]

# Runs in the subprocess: any import of these packages or modules raises ImportError.
BLOCKED_IMPORTS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = ("sqlalchemy", "sqlmodel", "alembic", "psycopg")
    BLOCKED += ("consent.ledger", "consent.models", "consent.db", "identity")

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ImportError(f"{name} is blocked: the verifier must not need it")
            return None

    assert not [m for m in sys.modules if blocked(m)], "loaded before the test could block it"
    sys.meta_path.insert(0, Block())

    from consent.verify import verify_export

    export_path, tampered_path, key = sys.argv[1:4]
    with open(export_path, "rb") as fh:
        intact = verify_export(fh, trusted_keys=[key])
    with open(tampered_path, "rb") as fh:
        tampered = verify_export(fh, trusted_keys=[key])
    print(json.dumps({
        "intact": [intact.ok, intact.complete, intact.records, intact.checkpoints, intact.signed_through],
        "tampered": [tampered.ok, tampered.problem, tampered.first_bad_seq],
        "loaded": sorted(m for m in sys.modules if blocked(m)),
    }))
    """
)


def test_verify_runs_without_sqlalchemy_on_a_real_export(
    sqlite_database: Database, signer: LedgerSigner, make_draft: DraftFactory, tmp_path: Path
) -> None:
    engine = sqlite_database.engine()
    migrate_consent(engine)
    ledger = Ledger(engine, signer, checkpoint_every=4)
    for i in range(10):  # checkpoints over seq 1..4 and 5..8, an uncovered tail
        ledger.append([make_draft(subject=f"k1.s{i}", purposes=["analytics", "marketing"][: 1 + i % 2])])
    export = tmp_path / "ledger.jsonl"
    with export.open("w", encoding="utf-8") as fh:
        assert ledger.export_jsonl(fh) == 10
    engine.dispose()
    lines = export.read_text(encoding="utf-8").splitlines()
    edited = json.loads(lines[3])  # the header is line 1: this is seq 3
    assert edited["seq"] == 3
    edited["state"] = "withdrawn"
    lines[3] = json.dumps(edited, ensure_ascii=False, separators=(",", ":"))
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS_SCRIPT, str(export), str(tampered), signer.public_key_b64],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["intact"] == [True, True, 10, 2, 10]
    assert result["tampered"] == [False, "edited", 3]
    assert result["loaded"] == []
