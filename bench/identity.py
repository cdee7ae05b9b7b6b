"""Identity resolution benchmark: GraphResolver throughput and memory with N identifiers loaded.

Per backend (SQLite file in a temp dir; PostgreSQL in a fresh schema of PG_URL, dropped after),
on a fresh identity log, tenant "bench", default rules, derived unified IDs:

* load: N identifiers as N/2 persons (user_id + device_id, linked) through ``resolve_batch``
  in batches (locked path: log lock, append, commit per batch); RSS growth per identifier;
* lookup (timed): known persons picked at random, both identifiers, link=True (memory only);
* new: one new anonymous_id per set, link=False (fast path; log appends in the background,
  their drain time after the phase is reported);
* merge (timed): pairs of never-seen identifiers, link=True (locked path, 4 changes each);
* restart: a new GraphResolver on the same log, ``start()`` replays it.

Identity resolution has no Redis part (NO_REDIS); with ``--backend both`` each backend runs in
its own process so the RSS figures do not mix.

    .venv/bin/python bench/identity.py [--identifiers 1000000] [--backend both] [--batch 100]
                                       [--seconds 5] [--json] [--baseline ../main]

Targets (issue 17): at most 250 B of RSS per linked identifier at 1M identifiers, and at least
500k lookups/s; each is printed MET or NOT MET. ``--baseline DIR`` runs this same benchmark on
another checkout (e.g. a worktree of main) first, in its own process, and prints its figures
in a column beside these.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# this file is bench/identity.py: with bench/ first on sys.path it would shadow the identity package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import sqlalchemy as sa  # noqa: E402
import structlog  # noqa: E402

from identity.db import make_engine, migrate  # noqa: E402
from identity.graph import IdentityRules  # noqa: E402
from identity.identifiers import Identifier  # noqa: E402
from identity.pseudonym import KeyRing, new_key_document  # noqa: E402
from identity.resolver import GraphResolver  # noqa: E402
from identity.store import MIGRATIONS_DIR, IdentityLogStore  # noqa: E402
from identity.unified_ids import derived_unified_id  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TENANT = "bench"
NO_REDIS = (
    "note: identity resolution has no Redis part (the graph is in memory, replicas follow the "
    "PostgreSQL log): 'Postgres+Redis' is the postgres backend"
)
ROWS = [
    ("load_ids_per_s", "load identifiers/s (locked, merges)"),
    ("rss_bytes_per_id", "RSS growth bytes/identifier"),
    ("lookup_ids_per_s", "lookup identifiers/s (known)"),
    ("new_ids_per_s", "new anonymous identifiers/s"),
    ("new_drain_s", "  background append drain s"),
    ("new_logged_ids_per_s", "  incl. drain (all logged) id/s"),
    ("merge_ids_per_s", "merge identifiers/s (new pairs)"),
    ("restart_s", "restart: replay seconds"),
    ("restart_changes_per_s", "restart: changes/s"),
    ("log_rows", "log rows at restart"),
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def timed(resolver: GraphResolver, make, seconds: float, per_set: int, batch: int, link: bool):
    """Run batches from ``make(i)`` for ``seconds``; identifiers/s, sets. Timed: resolve_batch plus
    one yield to the loop after it (the resolver's background work: log appends, follower)."""
    spent, sets_done, prov = 0.0, 0, [("bench", "e")] * batch
    while spent < seconds:
        sets = [make(sets_done + j) for j in range(batch)]
        t0 = time.perf_counter()
        out = await resolver.resolve_batch(TENANT, sets, [link] * batch, prov)
        await asyncio.sleep(0)
        spent += time.perf_counter() - t0
        assert None not in out
        sets_done += batch
    return sets_done * per_set / spent, sets_done


async def run_backend(backend: str, args: argparse.Namespace) -> dict:
    n, batch = args.identifiers, args.batch
    tmp = Path(tempfile.mkdtemp(prefix="idgate-bench-"))
    admin, schema = None, f"bench_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        engine = make_engine(f"sqlite:///{tmp / 'identity.sqlite3'}")
    else:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    resolvers: list[GraphResolver] = []
    res: dict = {"backend": backend, "identifiers": n, "batch": batch}
    try:
        migrate(engine, script_location=MIGRATIONS_DIR)
        store = IdentityLogStore(engine)
        keys = KeyRing.from_json(new_key_document([TENANT]))
        pseud = keys.pseudonymiser(TENANT)

        def new_resolver() -> GraphResolver:
            r = GraphResolver(store, {TENANT: IdentityRules()}, node_ids={TENANT: derived_unified_id(pseud)})
            resolvers.append(r)
            return r

        def person(i: int) -> list[Identifier]:
            return [Identifier("user_id", pseud(f"u{i}")), Identifier("device_id", pseud(f"d{i}"))]

        resolver = new_resolver()
        await resolver.start()
        persons = n // 2
        prov = [("bench", "e")] * batch
        gc.collect()
        rss0, spent, wall0 = rss_bytes(), 0.0, time.perf_counter()
        for start in range(0, persons, batch):
            sets = [person(i) for i in range(start, min(start + batch, persons))]
            t0 = time.perf_counter()
            await resolver.resolve_batch(TENANT, sets, [True] * len(sets), prov[: len(sets)])
            await asyncio.sleep(0)
            spent += time.perf_counter() - t0
            if start and start % (batch * 2000) == 0:
                say(f"  [{backend}] loaded {2 * start:,} identifiers ({2 * start / spent:,.0f}/s)")
        gc.collect()
        res["load_ids_per_s"] = 2 * persons / spent
        res["load_wall_s"] = time.perf_counter() - wall0
        res["rss_bytes_per_id"] = (rss_bytes() - rss0) / (2 * persons)
        res["graph"] = resolver.graphs[TENANT].stats()
        say(f"  [{backend}] load: {res['load_ids_per_s']:,.0f} id/s, {res['rss_bytes_per_id']:.0f} B/id")

        rng = random.Random(1)
        res["lookup_ids_per_s"], _ = await timed(
            resolver, lambda _i: person(rng.randrange(persons)), args.seconds, 2, batch, True
        )
        say(f"  [{backend}] lookup: {res['lookup_ids_per_s']:,.0f} id/s")

        def anon(i: int) -> list[Identifier]:
            return [Identifier("anonymous_id", pseud(f"a{i}"))]

        res["new_ids_per_s"], new_sets = await timed(resolver, anon, args.seconds, 1, batch, False)
        t0 = time.perf_counter()
        await resolver.flush()  # every new identifier is in the log
        res["new_drain_s"] = time.perf_counter() - t0
        res["new_logged_ids_per_s"] = new_sets / (new_sets / res["new_ids_per_s"] + res["new_drain_s"])
        say(f"  [{backend}] new: {res['new_ids_per_s']:,.0f} id/s ({new_sets:,} sets)")

        res["merge_ids_per_s"], _ = await timed(
            resolver, lambda i: person(persons + 1 + i), args.seconds, 2, batch, True
        )
        say(f"  [{backend}] merge: {res['merge_ids_per_s']:,.0f} id/s")
        res["graph_before_restart"] = resolver.graphs[TENANT].stats()

        again = new_resolver()
        t0 = time.perf_counter()
        await again.start()
        res["restart_s"] = time.perf_counter() - t0
        res["log_rows"] = again.applied_seq
        res["restart_changes_per_s"] = again.applied_seq / res["restart_s"]
        res["replay_matches"] = again.graphs[TENANT].stats() == res["graph_before_restart"]
        say(f"  [{backend}] restart: {res['restart_s']:.1f} s, {res['log_rows']:,} changes")
        return res
    finally:
        for r in resolvers:
            await r.stop()
        engine.dispose()
        if admin is not None:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
        shutil.rmtree(tmp, ignore_errors=True)


TARGET_BYTES_PER_ID = 250
TARGET_LOOKUPS_PER_S = 500_000
TARGET_AT_IDENTIFIERS = 1_000_000


def in_child(backend: str, args: argparse.Namespace, script: str = __file__) -> dict:
    """One backend in its own process, so the RSS figures of one do not leak into the other."""
    cmd = [sys.executable, script, "--backend", backend, "--json", "--identifiers", str(args.identifiers)]
    cmd += ["--batch", str(args.batch), "--seconds", str(args.seconds)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])[0]


def table(results: list[dict]) -> str:
    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"

    lines = [f"{'':36}" + "".join(f"{r.get('label', r['backend']):>16}" for r in results)]
    lines += [f"{label:36}" + "".join(f"{fmt(r.get(key)):>16}" for r in results) for key, label in ROWS]
    return "\n".join(lines)


def targets(results: list[dict], baselines: list[dict], identifiers: int) -> list[str]:
    """The issue 17 target lines, MET or NOT MET, with the baseline's figure beside."""
    at = (
        "" if identifiers == TARGET_AT_IDENTIFIERS else f" (measured at {identifiers:,}; the target is at 1M)"
    )
    base = {b["backend"]: b for b in baselines}
    lines = []
    for r in results:
        b = base.get(r["backend"], {})
        per_id, lookups = r["rss_bytes_per_id"], r["lookup_ids_per_s"]
        was_id = f", baseline {b['rss_bytes_per_id']:,.0f}" if b else ""
        was_lookups = f", baseline {b['lookup_ids_per_s']:,.0f}" if b else ""
        met = "MET" if per_id <= TARGET_BYTES_PER_ID else "NOT MET"
        lines.append(
            f"[{r['backend']}] target <= {TARGET_BYTES_PER_ID} B per linked identifier at 1M: {met} "
            f"({per_id:,.0f} B{was_id}){at}"
        )
        met = "MET" if lookups >= TARGET_LOOKUPS_PER_S else "NOT MET"
        lines.append(
            f"[{r['backend']}] target >= {TARGET_LOOKUPS_PER_S:,} lookups/s: {met} "
            f"({lookups:,.0f}/s{was_lookups})"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--identifiers", type=int, default=1_000_000)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p.add_argument(
        "--baseline", type=Path, help="a checkout (e.g. a worktree of main) to run first, for comparison"
    )
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    baselines = []
    if args.baseline is not None:
        script = str(args.baseline.resolve() / "bench" / "identity.py")
        for b in backends:
            say(f"baseline ({args.baseline}): {b}")
            baselines.append(in_child(b, args, script) | {"label": f"{b} (base)"})
    if len(backends) > 1 or baselines:
        results = [in_child(b, args) for b in backends]
    else:
        results = [asyncio.run(run_backend(backends[0], args))]
    print(
        f"identity resolution, {args.identifiers:,} identifiers, batch {args.batch}, {args.seconds:g} s/phase"
    )
    print(table([x for r in results for x in (r, *[b for b in baselines if b["backend"] == r["backend"]])]))
    for line in targets(results, baselines, args.identifiers):
        print(line)
    if "postgres" in backends:
        print(NO_REDIS)
    for r in results:
        if not r["replay_matches"]:
            print(f"WARNING [{r['backend']}]: replayed graph differs from {r['graph_before_restart']}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
