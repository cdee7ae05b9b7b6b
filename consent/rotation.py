"""Key rotation of the consent state: subject aliases and the re-keying of the projection.

A pseudonym cannot be reversed, so the consent store learns which old-version pseudonym is
which new-version one only when an event carries the raw identifier: the ingest pipeline
then knows both (``ConsentQuery.aliases``) and the consent decision folds their state (the
later record wins). When the old pseudonym has state, the pair is remembered here
(``consent_subject_alias``, once per pair); ``idgate keys rotate`` moves the projection's
entries (SQL ``consent_state`` or the Redis hashes) from each old pseudonym to its new one,
in alias order, behind a persisted cursor, so a killed run resumes where it stopped.

The ledger is never rewritten: its records keep the pseudonym they were made under (the
audit API looks a subject up under every live key version). A projection rebuilt from the
ledger (a lost Redis) brings old-version entries back; look-ups still find them while the
old version is live, ``keys rotate`` moves them again, and ``keys retire`` refuses while
any remain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from consent.models import ConsentStateRow, SubjectAliasRow, advance_projection_mark, projection_mark
from identity.db import dialect_insert
from identity.redis_client import is_cluster

_ALIAS = SubjectAliasRow.__table__  # type: ignore[attr-defined]
_STATE = ConsentStateRow.__table__  # type: ignore[attr-defined]
_SEEN_LIMIT = 200_000


def cursor_name(tenant: str) -> str:
    return f"key_rotation:{tenant}"


@dataclass(frozen=True, slots=True)
class Alias:
    id: int
    old: str
    new: str


class SubjectAliases:
    """The remembered (old pseudonym, new pseudonym) pairs of the consent store."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._seen: set[tuple[str, str]] = set()

    async def remember(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Record pairs not recorded yet (by this process; the table ignores repeats)."""
        new = [(old, current) for old, current in dict.fromkeys(pairs) if (tenant, old) not in self._seen]
        if not new:
            return
        await asyncio.to_thread(self._insert, tenant, new)
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.clear()
        self._seen.update((tenant, old) for old, _ in new)

    def _insert(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> None:
        now = datetime.now(UTC)
        stmt = dialect_insert(self.engine)(_ALIAS).values(
            [{"tenant": tenant, "old": old, "new": new, "at": now} for old, new in pairs]
        )
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["tenant", "old"]))

    def after(self, tenant: str, after_id: int, limit: int) -> list[Alias]:
        query = (
            sa.select(_ALIAS.c.id, _ALIAS.c.old, _ALIAS.c.new)
            .where(_ALIAS.c.tenant == tenant, _ALIAS.c.id > after_id)
            .order_by(_ALIAS.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [Alias(int(r.id), r.old, r.new) for r in conn.execute(query)]

    def olds_of(self, tenant: str, values: Sequence[str]) -> list[str]:
        """Every earlier pseudonym remembered for these (followed back through rotations):
        a subject's ledger history stays findable after its old key version is retired."""
        seen = set(values)
        found: list[str] = []
        frontier = list(values)
        with self.engine.connect() as conn:
            while frontier and len(found) < 1000:
                rows = conn.execute(
                    sa.select(_ALIAS.c.old).where(_ALIAS.c.tenant == tenant, _ALIAS.c.new.in_(frontier))
                )
                frontier = [r.old for r in rows if r.old not in seen]
                seen.update(frontier)
                found += frontier
        return found

    def earlier(self, tenant: str, values: Sequence[str]) -> dict[str, str]:
        """Every earlier pseudonym remembered for these, each with the one of ``values`` it
        became (followed back through rotations): one identifier's state across versions."""
        became: dict[str, str] = {}
        frontier = {v: v for v in values}
        with self.engine.connect() as conn:
            while frontier and len(became) < 1000:
                rows = conn.execute(
                    sa.select(_ALIAS.c.old, _ALIAS.c.new).where(
                        _ALIAS.c.tenant == tenant, _ALIAS.c.new.in_(list(frontier))
                    )
                )
                step = {r.old: frontier[r.new] for r in rows if r.old not in became and r.old not in values}
                became.update(step)
                frontier = step
        return became

    def count_after(self, tenant: str, after_id: int) -> int:
        query = sa.select(sa.func.count()).where(_ALIAS.c.tenant == tenant, _ALIAS.c.id > after_id)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def cursor(self, tenant: str) -> int:
        with self.engine.connect() as conn:
            return projection_mark(conn, cursor_name(tenant)) or 0


def rekey_sql_state(engine: sa.Engine, tenant: str, aliases: Sequence[Alias]) -> int:
    """Move the SQL projection's entries of each alias's old pseudonym to its new one (per
    purpose the later record wins) and advance the cursor, in one transaction. Returns how
    many entries moved."""
    insert = dialect_insert(engine)
    new_of = {a.old: a.new for a in aliases}

    def final(pseudonym: str) -> str:  # a chain of rotations in one batch: A -> B -> C
        for _ in range(len(new_of)):
            if pseudonym not in new_of:
                break
            pseudonym = new_of[pseudonym]
        return pseudonym

    with engine.begin() as conn:
        rows = conn.execute(
            sa.select(_STATE).where(_STATE.c.tenant == tenant, _STATE.c.identifier.in_(list(new_of)))
        ).mappings()
        # per (new, purpose) the latest entry (a chain of rotations may name one new twice)
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:
            value = {**row, "identifier": final(row["identifier"])}
            key = (value["identifier"], value["purpose"])
            if key not in latest or latest[key]["seq"] < value["seq"]:
                latest[key] = value
        moved = len(latest)
        if latest:
            stmt = insert(_STATE).values(list(latest.values()))
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant", "identifier", "purpose"],
                    set_={c: stmt.excluded[c] for c in ("state", "seq", "notice_seq", "kind")},
                    where=_STATE.c.seq < stmt.excluded.seq,
                )
            )
            conn.execute(
                sa.delete(_STATE).where(_STATE.c.tenant == tenant, _STATE.c.identifier.in_(list(new_of)))
            )
        if aliases:
            advance_projection_mark(conn, cursor_name(tenant), aliases[-1].id)
    return moved


# Per alias: copy each field of the old hash to the new one unless the new one holds a later
# record (an entry is [state, seq, ...]), then delete the old hash. Idempotent.
_REKEY_LUA = """
local moved = 0
for i = 1, #KEYS, 2 do
  local old = redis.call('HGETALL', KEYS[i])
  for j = 1, #old, 2 do
    local field, value = old[j], old[j + 1]
    local seq = tonumber(string.match(value, '^%[[^,]*,(%d+)'))
    local cur = redis.call('HGET', KEYS[i + 1], field)
    local cur_seq = cur and tonumber(string.match(cur, '^%[[^,]*,(%d+)')) or -1
    if seq > cur_seq then redis.call('HSET', KEYS[i + 1], field, value) end
    moved = moved + 1
  end
  redis.call('DEL', KEYS[i])
end
return moved
"""


# KEYS: the new hash; ARGV: field, value pairs of the old one.
_MOVE_FORWARD_LUA = """
for j = 1, #ARGV, 2 do
  local seq = tonumber(string.match(ARGV[j + 1], '^%[[^,]*,(%d+)'))
  local cur = redis.call('HGET', KEYS[1], ARGV[j])
  local cur_seq = cur and tonumber(string.match(cur, '^%[[^,]*,(%d+)')) or -1
  if seq > cur_seq then redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
end
return #ARGV / 2
"""


def rekey_redis_state(client: Any, prefix: str, tenant: str, aliases: Sequence[Alias]) -> int:
    """The same move in the Redis projection (a sync ``redis.Redis``); the caller advances
    the cursor after it (a repeat after a crash moves nothing twice)."""
    if not aliases:
        return 0
    keys: list[str] = []
    for alias in aliases:
        keys += [f"{prefix}:consent:{tenant}:{alias.old}", f"{prefix}:consent:{tenant}:{alias.new}"]
    if not is_cluster(client):
        return int(client.eval(_REKEY_LUA, len(keys), *keys))
    # A cluster: the old and new pseudonym's hashes lie in different slots, so no script
    # takes both. Per alias: read the old one, move its entries forward into the new one
    # (one script), then drop the old one; a repeat after a crash in between moves nothing
    # twice (entries only move forward).
    moved = 0
    for old_key, new_key in zip(keys[::2], keys[1::2], strict=True):
        entries = client.hgetall(old_key)
        if entries:
            flat = [x for field, value in entries.items() for x in (field, value)]
            client.eval(_MOVE_FORWARD_LUA, 1, new_key, *flat)
            moved += len(entries)
        client.delete(old_key)
    return moved


def advance_cursor(engine: sa.Engine, tenant: str, value: int) -> None:
    with engine.begin() as conn:
        advance_projection_mark(conn, cursor_name(tenant), value)


def sql_subjects_under(engine: sa.Engine, tenant: str, version: int) -> int:
    """How many subjects the SQL projection holds under key version ``version``."""
    query = sa.select(sa.func.count(sa.distinct(_STATE.c.identifier))).where(
        _STATE.c.tenant == tenant, _STATE.c.identifier.like(f"k{version}.%")
    )
    with engine.connect() as conn:
        return int(conn.scalar(query) or 0)


def redis_subjects_under(client: Any, prefix: str, tenant: str, version: int) -> int:
    """How many subjects the Redis projection holds under key version ``version``."""
    return sum(1 for _ in client.scan_iter(match=f"{prefix}:consent:{tenant}:k{version}.*", count=1000))
