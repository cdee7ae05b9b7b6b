"""The distributed outbox: one Redis stream shared by every replica, a consumer group per destination.

An append is acknowledged to the client once Redis has it (run Redis with ``appendonly
yes`` and ``appendfsync always`` so that means on disk). Each
destination is a consumer group and each replica a consumer in it, so:

* any replica's workers deliver any replica's events (XREADGROUP hands each entry to one);
* a replica that dies holding read-but-unacknowledged entries loses nothing: after
  ``claim_idle_ms`` another replica's worker takes them over (XAUTOCLAIM), and the replica
  itself, when it comes back, first re-reads its own pending entries;
* a destination that is down or slow only grows its own group's lag.

An append is one Lua script (atomic): the XADDs, each entry one msgpack field, and the
confirmation of the request's message-id claims (export.dedupe), so a message id counts as
seen exactly when its event is in the stream. (On a Redis Cluster the claims live in their
sources' slots: they are confirmed right after the script; see ``append``.)

A batch is committed with one MULTI/EXEC: XACK of every entry it spanned, the committed
sizes of this replica's sink files (file sinks cut back to them on restart, so they stay
exactly-once) and the persons whose data the destination now holds (for notices).
Entries every group has acknowledged are trimmed by ``prune``.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import msgspec
import structlog

from export.dedupe import CLAIM_FUNCTION, RedisDedupe, claim_statuses
from export.outbox import (
    Claim,
    ClaimStatus,
    DeliveryBatch,
    NotedPersons,
    OutboxFull,
    OutboxRecord,
    OutboxUnavailable,
    PersonPurge,
    StoredRecord,
    claimed_as,
    dedupe_key,
    names_person,
    past_retention,
    person_pattern,
    stored,
)
from export.outbox_schema import v2_record_fields
from identity.redis_client import hash_tag, is_cluster

log = structlog.get_logger(__name__)

# The exact backlog, shared by the replicas: entries ever appended minus, per destination,
# entries its group acknowledged; the largest of those is the backlog (like the slowest
# cursor of the embedded outbox).
_BACKLOG = """
local function backlog(first_acked, count)
  local appended = tonumber(redis.call('GET', KEYS[first_acked - 1]) or '0')
  local worst = 0
  for i = first_acked, first_acked + count - 1 do
    local lag = appended - tonumber(redis.call('GET', KEYS[i]) or '0')
    if lag > worst then worst = lag end
  end
  return worst
end
"""
# KEYS: the stream, the appended counter, k acked counters, then message-id claims to
# confirm; ARGV: the dedupe window, k, the bound (0: none), then the entries. Refuses
# (returns -1 and the backlog) when the entries would take the backlog past the bound.
_APPEND = (
    _BACKLOG
    + """
local k = tonumber(ARGV[2])
local bound = tonumber(ARGV[3])
local n = #ARGV - 3
if bound > 0 and n > 0 then
  local worst = backlog(3, k)
  if worst + n > bound then return {-1, worst} end
end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'r', ARGV[i])
end
if n > 0 then redis.call('INCRBY', KEYS[2], n) end
for i = 3 + k, #KEYS do
  redis.call('SET', KEYS[i], 'd', 'EX', ARGV[1])
end
return {n, 0}
"""
)
# KEYS: the appended counter, k acked counters; returns the backlog.
_MEASURE = (
    _BACKLOG
    + """
return backlog(2, #KEYS - 1)
"""
)
# KEYS: the appended counter, k acked counters, then the message-id keys to claim; ARGV: k,
# the claim's seconds. One server only (on a cluster the claims lie in their sources' slots):
# the claim and the backlog the bound is checked against, in one round trip.
_CLAIM_AND_MEASURE = (
    _BACKLOG
    + CLAIM_FUNCTION
    + """
local k = tonumber(ARGV[1])
return {backlog(2, k), claim(2 + k, ARGV[2])}
"""
)
# KEYS: the stream, then the acked counter of each destination; ARGV: the number of
# destinations k, their group names, then the entry ids to delete. An entry deleted before a
# group read it (after the group's last-delivered-id) will never be acknowledged by that
# group: its acked counter is moved on by one, so the backlog stays exact.
_PURGE = """
local function parse(id)
  local ms, n = string.match(id, '^(%d+)%-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local function after(a, b)
  local am, an = parse(a)
  local bm, bn = parse(b)
  return am > bm or (am == bm and an > bn)
end
local k = tonumber(ARGV[1])
local last = {}
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name then last[name] = delivered end
end
local removed = 0
for i = 2 + k, #ARGV do
  local id = ARGV[i]
  if redis.call('XDEL', KEYS[1], id) == 1 then
    removed = removed + 1
    for j = 1, k do
      local seen = last[ARGV[1 + j]]
      if seen == nil or after(id, seen) then redis.call('INCR', KEYS[1 + j]) end
    end
  end
end
return removed
"""

_encode_entry = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(OutboxRecord).decode


def _seq(entry_id: bytes) -> int:
    """A stream id ``<ms>-<n>`` as one increasing integer (the worker's record key)."""
    ms, _, n = entry_id.partition(b"-")
    return (int(ms) << 20) | int(n)


def _record(entry_id: bytes, e: OutboxRecord) -> StoredRecord:
    if e.kind == "event" and not e.pseudonyms:
        # an entry appended by a version without these fields (every event idgate writes
        # now names at least its userId or anonymousId pseudonym)
        kind, person, pseudonyms = v2_record_fields(e.payload)
        e = msgspec.structs.replace(
            e,
            kind="notice" if kind == "notice" else "event",
            person=person,
            pseudonyms=tuple(pseudonyms.split(",") if pseudonyms else ()),
        )
    return stored(_seq(entry_id), e)


class RedisStreamOutbox:
    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        replica: str,
        dedupe: RedisDedupe,
        dedupe_window_seconds: int = 24 * 3600,
        claim_idle_ms: int = 30_000,
        max_pending: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client  # redis.asyncio.Redis
        self.clock = clock
        self.dedupe = dedupe
        self.max_pending = max_pending
        self.prefix = prefix
        # On a cluster every key of the outbox (the stream, its counters, the per-destination
        # sink files and person index) shares the stream's slot, so each script and MULTI
        # takes one slot; on one server the names are the ones they always were.
        self.cluster = is_cluster(client)
        self.stream = hash_tag(self.cluster, f"{prefix}:outbox")
        self.home = self.stream if self.cluster else prefix
        self._appended_key = f"{self.stream}:appended"
        self.replica = replica
        self.dedupe_window_seconds = dedupe_window_seconds
        self.claim_idle_ms = claim_idle_ms
        self.destinations: set[str] = set()
        self.alive = True
        self.accepting = True
        self._append_script = client.register_script(_APPEND)
        self._measure_script = client.register_script(_MEASURE)
        self._claim_and_measure = client.register_script(_CLAIM_AND_MEASURE)
        self._purge_script = client.register_script(_PURGE)

    def close(self) -> None:
        self.alive = False

    # -- claims and appends -------------------------------------------------------------
    def acked_key(self, destination: str) -> str:
        return f"{self.stream}:acked:{destination}"

    def _counter_keys(self) -> list[str]:
        return [self._appended_key, *(self.acked_key(d) for d in sorted(self.destinations))]

    async def exact_backlog(self) -> int:
        """Entries appended that the slowest destination has not acknowledged yet."""
        return int(await self._measure_script(keys=self._counter_keys(), args=[]))

    async def claim(self, source: str, message_ids: Sequence[str]) -> Claim:
        """Claim the message ids; refuse (``OutboxFull``) before any side effect of the
        request when the new ones would take the backlog past the bound (checked again,
        atomically, by the append)."""
        keys = [self.dedupe.key(source, m) for m in message_ids]
        backlog: int | None = None
        if self.max_pending and keys and not self.cluster:
            counters = self._counter_keys()
            measured, answers = await self._claim_and_measure(
                keys=[*counters, *keys], args=[len(counters) - 1, self.dedupe.claim_seconds]
            )
            backlog, statuses = int(measured), claim_statuses(keys, answers)
        else:
            statuses = await self.dedupe.claim(keys)
        claim = Claim(statuses, [k for k, s in zip(keys, statuses, strict=True) if s is ClaimStatus.NEW])
        if self.max_pending and claim.keys:
            if backlog is None:
                backlog = await self.exact_backlog()
            if backlog + len(claim.keys) > self.max_pending:
                await self.dedupe.release(claim.keys)
                raise OutboxFull(backlog, self.max_pending)
        return claim

    async def release(self, claim: Claim) -> None:
        await self.dedupe.release(claim.keys)

    async def append(
        self, records: Sequence[OutboxRecord], *, dedupe: bool = False, claim: Claim | None = None
    ) -> list[bool]:
        """Append in one atomic script that also confirms ``claim``'s message ids for the
        dedupe window. With ``dedupe`` (notices, replays) a record whose message id was
        appended within the window is skipped."""
        records = list(records)
        confirm = claim.keys if claim is not None else []
        stored = [True] * len(records)
        try:
            if dedupe and records:
                pipe = self.client.pipeline(transaction=False)
                for r in records:
                    key = f"{self.prefix}:outbox-dedupe:{dedupe_key(r.source, r.message_id).hex()}"
                    pipe.set(key, 1, nx=True, ex=self.dedupe_window_seconds)
                stored = [bool(x) for x in await pipe.execute()]
            entries = [
                _encode_entry(r) for r, fresh in zip(records, stored, strict=True) if fresh and r.destinations
            ]
            refused: list[int] | None = None
            # On a cluster the claims lie in their sources' slots, not the stream's: they are
            # confirmed right after the append instead of by it. A replica that dies between
            # the two leaves pending claims that expire, so the client's retry is appended
            # again (delivered at least once; sinks dedupe by message id).
            together = [] if self.cluster else confirm
            if entries or together:
                counters = self._counter_keys()
                bound = self.max_pending if claim is not None else 0  # internal appends: unbounded
                done, backlog = await self._append_script(
                    keys=[self.stream, *counters, *together],
                    args=[self.dedupe.window_seconds, len(counters) - 1, bound, *entries],
                )
                if int(done) < 0:
                    refused = [int(backlog)]
            if self.cluster and confirm and refused is None:
                await self.dedupe.confirm(confirm)
        except Exception as exc:
            self.accepting = False
            raise OutboxUnavailable(f"outbox append failed: {type(exc).__name__}") from exc
        if refused is not None:
            raise OutboxFull(refused[0], self.max_pending)
        self.accepting = True
        return stored

    async def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> list[StoredRecord]:
        """The events of a person still in the stream (an access request)."""
        wanted = set(pseudonyms)
        found: list[StoredRecord] = []
        start = "-"
        while len(found) < limit:
            rows = await self.client.xrange(self.stream, min=start, count=1000)
            if not rows:
                break
            for eid, fields in rows:
                entry = _decode_entry(fields[b"r"])
                if entry.kind == "event" and entry.tenant == tenant:
                    record = _record(eid, entry)
                    if record.person in wanted or wanted & set(record.pseudonyms):
                        found.append(record)
            last = rows[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return found[:limit]

    async def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> PersonPurge:
        """Delete the events of a person still in the stream (a deletion request): every
        event of ``tenant`` whose person or pseudonyms include one of ``pseudonyms``, and
        the dedupe entries of their message ids first (the keys are digests: only the events
        lead to them), and the merge and split notices naming the person (their
        deletion notice supersedes them; it stays). Each chunk's deletions and counter moves
        are one atomic script."""
        wanted = set(pseudonyms)
        pattern = re.compile(person_pattern(wanted).pattern.encode()) if wanted else None
        groups = sorted(self.destinations)
        removed, forgotten, notices, start = 0, 0, 0, "-"
        while True:
            rows = await self.client.xrange(self.stream, min=start, count=1000)
            if not rows:
                return PersonPurge(events=removed - notices, dedupe_keys=forgotten, notices=notices)
            doomed = []
            claims = []
            for eid, fields in rows:
                entry = _decode_entry(fields[b"r"])
                if entry.kind == "event" and entry.tenant == tenant:
                    if not entry.pseudonyms:
                        entry = _record(eid, entry).to_outbox()
                    if entry.person in wanted or wanted & set(entry.pseudonyms):
                        doomed.append(eid.decode() if isinstance(eid, bytes) else str(eid))
                        claims.append(self.dedupe.key(entry.source, claimed_as(entry)))
                elif entry.tenant == tenant and pattern is not None and names_person(entry.payload, pattern):
                    doomed.append(eid.decode() if isinstance(eid, bytes) else str(eid))
                    notices += 1
            forgotten += await self.dedupe.forget(claims)
            if doomed:
                removed += int(
                    await self._purge_script(
                        keys=[self.stream, *(self.acked_key(d) for d in groups)],
                        args=[len(groups), *groups, *doomed],
                    )
                )
            last = rows[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    async def probe(self) -> bool:
        try:
            ok = bool(await self.client.ping())
        except Exception:
            ok = False
        self.accepting = ok
        return ok

    # -- delivery ----------------------------------------------------------------------
    async def register_destinations(self, destinations: Iterable[str]) -> None:
        """Create a consumer group per destination (from the stream's start, so nothing
        appended before the group existed is trimmed away from it)."""
        for d in destinations:
            self.destinations.add(d)
            try:
                await self.client.xgroup_create(self.stream, d, id="0", mkstream=True)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            else:
                # a new group owes only the entries still in the stream, not those trimmed
                appended = int(await self.client.get(self._appended_key) or 0)
                held = int(await self.client.xlen(self.stream))
                await self.client.set(self.acked_key(d), max(0, appended - held), nx=True)

    def queue(self, destination: str) -> RedisDestinationQueue:
        return RedisDestinationQueue(self, destination)

    async def _groups(self) -> list[dict[Any, Any]]:
        try:
            return list(await self.client.xinfo_groups(self.stream))
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return []
            raise

    async def backlog(self) -> int:
        """The largest number of entries a destination has not acknowledged yet."""
        worst = 0
        for g in await self._groups():
            if g["name"].decode() not in self.destinations:
                continue
            lag = g.get("lag")
            if lag is None:  # unknown after trims/deletes: bound it by the stream length
                lag = await self.client.xlen(self.stream)
            worst = max(worst, int(lag) + int(g.get("pending", 0)))
        return worst

    pending = backlog

    async def prune(self, chunk: int = 5_000) -> tuple[int, int]:
        """Trim entries every registered destination has acknowledged."""
        floor: bytes | None = None
        groups = {g["name"].decode(): g for g in await self._groups()}
        if not self.destinations or any(d not in groups for d in self.destinations):
            return 0, 0
        for d in self.destinations:
            g = groups[d]
            if int(g.get("pending", 0)):
                summary = await self.client.xpending(self.stream, d)
                low = summary["min"]
                low = low if isinstance(low, bytes) else str(low).encode()
            else:
                low = g["last-delivered-id"]
                low = low if isinstance(low, bytes) else str(low).encode()
            if floor is None or _seq(low) < _seq(floor):
                floor = low
        if floor is None or floor == b"0-0":
            return 0, 0
        trimmed = await self.client.xtrim(self.stream, minid=floor.decode(), approximate=False)
        return int(trimmed), 0

    async def checkpoint(self) -> tuple[int, int]:
        return 0, 0

    # -- retention (export.retention) --------------------------------------------------
    def received_key(self, destination: str) -> str:
        """The person index: the persons whose data went to ``destination`` (a set)."""
        return f"{self.home}:received:{destination}"

    def received_epoch_key(self, destination: str) -> str:
        """Moved on (INCR) by everything that takes persons out of ``destination``'s index,
        on any replica: a deletion's receipt, a retention run."""
        return f"{self.home}:received-epoch:{destination}"

    def received_at_key(self, destination: str) -> str:
        """When each person's data last went to ``destination`` (a sorted set beside the
        person index ``received:<destination>``, scored by ms)."""
        return f"{self.home}:received-at:{destination}"

    async def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Entries of ``tenant`` (events and notices) past retention (export.outbox.
        past_retention): counted, deleted with ``apply`` (each chunk one atomic script that
        keeps the backlog counters exact, as ``purge_person``)."""
        if not cutoffs:
            return 0
        groups = sorted(self.destinations)
        found, start = 0, "-"
        while True:
            rows = await self.client.xrange(self.stream, min=start, count=1000)
            if not rows:
                return found
            doomed = []
            for eid, fields in rows:
                entry = _decode_entry(fields[b"r"])
                if entry.tenant == tenant and past_retention(
                    entry.received_at_ms, entry.destinations, cutoffs
                ):
                    doomed.append(eid.decode() if isinstance(eid, bytes) else str(eid))
            if doomed and apply:
                found += int(
                    await self._purge_script(
                        keys=[self.stream, *(self.acked_key(d) for d in groups)],
                        args=[len(groups), *groups, *doomed],
                    )
                )
            else:
                found += len(doomed)
            last = rows[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    async def expire_person_index(self, destination: str, cutoff_ms: int, *, apply: bool) -> int:
        """Persons whose data last went to ``destination`` before ``cutoff_ms``."""
        at_key = self.received_at_key(destination)
        if not apply:
            return int(await self.client.zcount(at_key, "-inf", f"({cutoff_ms}"))
        persons = await self.client.zrangebyscore(at_key, "-inf", f"({cutoff_ms}")
        removed = 0
        for start in range(0, len(persons), 1000):
            chunk = persons[start : start + 1000]
            pipe = self.client.pipeline(transaction=True)
            pipe.srem(self.received_key(destination), *chunk)
            pipe.zrem(at_key, *chunk)
            pipe.incr(self.received_epoch_key(destination))
            _, dropped, _ = await pipe.execute()
            removed += int(dropped)
        return removed

    async def expire_dedupe(self, *, apply: bool) -> int:
        """Nothing to do: dedupe keys expire in Redis at the end of the window (their TTL)."""
        return 0


class RedisDestinationQueue:
    """One destination's consumer group, read by this replica's consumer."""

    def __init__(self, outbox: RedisStreamOutbox, destination: str) -> None:
        self.outbox = outbox
        self.client = outbox.client
        self.destination = destination
        self.consumer = outbox.replica
        self._files_key = f"{outbox.home}:sinkfile:{destination}:{outbox.replica}"
        self._persons_key = outbox.received_key(destination)
        # While the epoch stays where it was, the persons this queue noted are still in the
        # index and need not be written again.
        self._epoch_key = outbox.received_epoch_key(destination)
        self._noted = NotedPersons()
        self._noted_epoch: int | None = None
        self._own_pending = True
        self._next_claim = 0.0
        self._claim_cursor = "0-0"

    async def open(self) -> dict[str, int]:
        await self.outbox.register_destinations([self.destination])
        self._own_pending = True  # after a restart or failure: our unacknowledged entries first
        raw = await self.client.hgetall(self._files_key)
        return {k.decode(): int(v) for k, v in raw.items()}

    def _batch(self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]]) -> DeliveryBatch:
        ids: list[bytes] = []
        mine: list[StoredRecord] = []
        needle = self.destination
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields:  # None: trimmed or deleted while pending
                entry = _decode_entry(fields[b"r"])
                if needle in entry.destinations:
                    mine.append(_record(entry_id, entry))
        return DeliveryBatch(mine, len(ids), ids)

    async def fetch(self, limit: int) -> DeliveryBatch:
        stream = self.outbox.stream
        if self._own_pending:
            got = await self.client.xreadgroup(self.destination, self.consumer, {stream: "0"}, count=limit)
            entries = got[0][1] if got else []
            if entries:
                return self._batch(entries)
            self._own_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            # entries another replica read and never acknowledged (it died or hung)
            cursor, claimed, *_ = await self.client.xautoclaim(
                stream,
                self.destination,
                self.consumer,
                min_idle_time=self.outbox.claim_idle_ms,
                start_id=self._claim_cursor,
                count=limit,
            )
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            if self._claim_cursor == "0-0":
                self._next_claim = now + min(5.0, self.outbox.claim_idle_ms / 4000)
            if claimed:
                log.warning("outbox.claimed", destination=self.destination, entries=len(claimed))
                return self._batch(claimed)
        got = await self.client.xreadgroup(self.destination, self.consumer, {stream: ">"}, count=limit)
        return self._batch(got[0][1] if got else [])

    async def commit(
        self,
        batch: DeliveryBatch,
        delivered: int,
        sink_files: dict[str, int],
        persons: Iterable[str],
        released: Iterable[str] = (),
    ) -> None:
        """One MULTI: acknowledge the batch, record the sink sizes, and note in the person
        index (the set and its retention clock) the persons it sent data of, or forget those
        a deletion's receipt ``released``.

        A person this queue wrote less than ten minutes ago (as the embedded outbox) is not
        written again, as long as nothing took anyone out of the index since (the epoch
        key, read in the same MULTI): when something did, the persons skipped are written
        again at once, so a person whose data just went out is always in the index."""
        ids = batch.token
        assert isinstance(ids, list)
        now_ms = int(self.outbox.clock() * 1000)
        forgotten = list(released)
        # noted then released in the same MULTI would leave the person out: same as not noted
        people = set(persons).difference(forgotten)
        fresh = self._noted.due(people, now_ms)
        skipped = people.difference(fresh)
        pipe = self.client.pipeline(transaction=True)
        if ids:
            pipe.xack(self.outbox.stream, self.destination, *ids)
            pipe.incrby(self.outbox.acked_key(self.destination), len(ids))
        if sink_files:
            pipe.hset(self._files_key, mapping=sink_files)
        self._note(pipe, fresh, now_ms)
        if forgotten:
            # a person released by a deletion leaves the index and its retention clock
            pipe.srem(self._persons_key, *forgotten)
            pipe.zrem(self.outbox.received_at_key(self.destination), *forgotten)
        if not len(pipe) and not skipped:
            return
        epoch = await self._execute_reading_epoch(pipe, moved=bool(forgotten))
        if self._noted_at(epoch, fresh, now_ms) or not skipped:
            return
        # persons left the index since this queue noted the skipped ones: note them again
        pipe = self.client.pipeline(transaction=True)
        self._note(pipe, skipped, now_ms)
        self._noted_at(await self._execute_reading_epoch(pipe, moved=False), skipped, now_ms)

    async def _execute_reading_epoch(self, pipe: Any, *, moved: bool) -> int:
        """Run the MULTI with the epoch read at its end (moved on first when ``moved``). A
        missing epoch key starts at a random value: a Redis that lost its data (and with it
        the index) shows another epoch than the one this queue remembers."""
        pipe.set(self._epoch_key, secrets.randbelow(2**62) + 1, nx=True)
        if moved:
            pipe.incr(self._epoch_key)
        pipe.get(self._epoch_key)
        *_, epoch = await pipe.execute()
        return int(epoch)

    def _note(self, pipe: Any, persons: Collection[str], now_ms: int) -> None:
        if persons:
            pipe.sadd(self._persons_key, *persons)
            pipe.zadd(self.outbox.received_at_key(self.destination), dict.fromkeys(persons, now_ms))

    def _noted_at(self, epoch: int, persons: Collection[str], now_ms: int) -> bool:
        """Remember ``persons`` as written at ``epoch``; True when the epoch had not moved
        (what was remembered before still holds), False when the memory was dropped."""
        held = epoch == self._noted_epoch
        if not held:
            self._noted.forget()
            self._noted_epoch = epoch
        self._noted.note(persons, now_ms)
        return held

    async def commit_files(self, sink_files: dict[str, int]) -> None:
        if sink_files:
            await self.client.hset(self._files_key, mapping=sink_files)

    async def received(self, persons: Iterable[str]) -> set[str]:
        wanted = sorted(set(persons))
        if not wanted:
            return set()
        flags = await self.client.smismember(self._persons_key, wanted)
        return {p for p, ok in zip(wanted, flags, strict=True) if ok}
