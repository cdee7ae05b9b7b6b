"""What key rotation costs on the hot path, and how fast ``keys rotate`` moves consent state.

* pseudonymise: the pipeline's ``pseudonymise_identifiers`` over typical Segment events
  (userId, anonymousId, device id, a phone trait) with one live key version (no aliases:
  the cost before rotation) and with two (each linkable identifier also pseudonymised under
  the old version), for identifiers seen for the first time and for returning ones (the
  alias cache);
* decide: the consent decision for those events, without aliases and with them (the
  state of both pseudonyms read and folded);
* rekey: ``consent.rotation.rekey_sql_state`` on an embedded SQLite consent store, subjects
  moved per second in batches of 500.

    .venv/bin/python bench/rotation.py [--events 20000] [--subjects 20000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consent.db import migrate_consent  # noqa: E402
from consent.decisions import DestinationSpec, StateEntry, decide  # noqa: E402
from consent.rotation import SubjectAliases, rekey_sql_state  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.events import Envelope, Event  # noqa: E402
from gateway.pipeline import consent_query, pseudonymise_identifiers  # noqa: E402
from identity.db import make_engine  # noqa: E402
from identity.pseudonym import KeyRing, new_key_document  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAREHOUSE = [DestinationSpec("warehouse", ("analytics",), overseas=False, third_party=False)]


def events(n: int) -> list[Event]:
    now = datetime.now(UTC)
    return [
        Event(
            type="track",
            event="Product Viewed",
            message_id=f"m-{i}",
            user_id=f"u-{i}",
            anonymous_id=f"anon-{i}",
            context={"device": {"id": f"dev-{i}"}},
            traits={"phone": f"1380013{i % 10000:04d}"},
            timestamp=now,
            received_at=now,
        )
        for i in range(n)
    ]


def pseudonymise_rate(
    ring: KeyRing, evs: list[Event], older: bool, cache: dict[str, tuple[str, ...]] | None = None
) -> tuple[float, list[Envelope]]:
    tenant = load_config(ROOT / "idgate.example.toml", dev=True).tenants[0]
    envs = [Envelope(copy.deepcopy(e), i) for i, e in enumerate(evs)]
    active = ring.pseudonymiser("acme")
    old = ring.older_pseudonymisers("acme") if older else ()
    started = time.perf_counter()
    for env in envs:
        pseudonymise_identifiers(env, tenant, active, old, cache)
    return len(envs) / (time.perf_counter() - started), envs


def decide_rate(envs: list[Envelope]) -> float:
    tenant = load_config(ROOT / "idgate.example.toml", dev=True).tenants[0]
    queries = [consent_query(env, tenant) for env in envs]
    state = {}
    for q in queries:
        for i in q.device_ids:
            state[i] = {"analytics": StateEntry("given", 1, 1)}
        for old, _ in q.aliases:
            state[old] = {"analytics": StateEntry("given", 1, 1)}
    started = time.perf_counter()
    for q in queries:
        decide(q, WAREHOUSE, state)
    return len(queries) / (time.perf_counter() - started)


def rekey_rate(subjects: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'consent.sqlite3'}")
        migrate_consent(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO consent_state (tenant, identifier, purpose, state, seq, notice_seq, kind) "
                "VALUES "
                + ",".join(
                    f"('acme', 'k1.s{i}', 'analytics', 'given', {i + 1}, 1, 'general')"
                    for i in range(subjects)
                )
            )
        aliases = SubjectAliases(engine)
        aliases._insert("acme", [(f"k1.s{i}", f"k2.s{i}") for i in range(subjects)])
        cursor, started = 0, time.perf_counter()
        while batch := aliases.after("acme", cursor, 500):
            rekey_sql_state(engine, "acme", batch)
            cursor = batch[-1].id
        rate = subjects / (time.perf_counter() - started)
        engine.dispose()
        return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--subjects", type=int, default=20_000)
    args = p.parse_args()
    ring = KeyRing.from_json(new_key_document(["acme"], new_key_document(["acme"])))
    evs = events(args.events)
    one, envs_one = pseudonymise_rate(ring, evs, older=False)
    two, envs_two = pseudonymise_rate(ring, evs, older=True)
    cache: dict[str, tuple[str, ...]] = {}
    pseudonymise_rate(ring, evs, older=True, cache=cache)  # the identifiers seen once
    again, _ = pseudonymise_rate(ring, evs, older=True, cache=cache)
    print(f"pseudonymise  one live version {one:>10,.0f} events/s   two live versions {two:>10,.0f} events/s")
    print(f"              two live versions, returning identifiers (alias cache) {again:>10,.0f} events/s")
    d_one, d_two = decide_rate(envs_one), decide_rate(envs_two)
    print(
        f"decide        no aliases       {d_one:>10,.0f} events/s   "
        f"with aliases      {d_two:>10,.0f} events/s"
    )
    print(f"keys rotate   SQLite projection {rekey_rate(args.subjects):>9,.0f} subjects/s (batches of 500)")


if __name__ == "__main__":
    main()
