"""``consent.rotation`` on a real SQLite consent store: the projection's entries move from
old pseudonyms to new ones, the later record winning, chains of rotations followed, the
cursor advanced with the move, and a subject's earlier pseudonyms found again."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from consent.db import migrate_consent
from consent.rotation import SubjectAliases, rekey_sql_state, sql_subjects_under
from identity.db import make_engine


def test_rekey_moves_entries_latest_wins_and_follows_chains(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'consent.sqlite3'}")
    migrate_consent(engine)
    rows = [
        ("k1.a", "analytics", "given", 3),
        ("k2.a", "analytics", "withdrawn", 7),  # later, under the new version: kept
        ("k1.a", "marketing", "given", 4),
        ("k1.b", "analytics", "given", 5),  # k1.b -> k2.b -> k3.b in one batch
    ]
    with engine.begin() as conn:
        for ident, purpose, state, seq in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO consent_state (tenant, identifier, purpose, state, seq, notice_seq, kind) "
                    "VALUES ('acme', :i, :p, :s, :q, 0, 'general')"
                ),
                {"i": ident, "p": purpose, "s": state, "q": seq},
            )
    aliases = SubjectAliases(engine)
    aliases._insert("acme", [("k1.a", "k2.a"), ("k1.b", "k2.b"), ("k2.b", "k3.b")])
    aliases._insert("acme", [("k1.a", "k9.x")])  # an old pseudonym maps once: ignored
    batch = aliases.after("acme", 0, 10)
    assert [(a.old, a.new) for a in batch] == [("k1.a", "k2.a"), ("k1.b", "k2.b"), ("k2.b", "k3.b")]
    assert rekey_sql_state(engine, "acme", batch) == 3
    with engine.connect() as conn:
        state = {
            (r.identifier, r.purpose): (r.state, r.seq)
            for r in conn.execute(sa.text("SELECT * FROM consent_state"))
        }
    assert state == {
        ("k2.a", "analytics"): ("withdrawn", 7),
        ("k2.a", "marketing"): ("given", 4),
        ("k3.b", "analytics"): ("given", 5),
    }
    assert aliases.cursor("acme") == batch[-1].id and aliases.count_after("acme", batch[-1].id) == 0
    assert sql_subjects_under(engine, "acme", 1) == 0 and sql_subjects_under(engine, "acme", 2) == 1
    assert sorted(aliases.olds_of("acme", ["k3.b"])) == ["k1.b", "k2.b"]
    # a repeat (a crash before the caller saw the answer) changes nothing
    assert rekey_sql_state(engine, "acme", batch) == 0
