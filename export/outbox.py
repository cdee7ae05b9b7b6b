"""The outbox contract: what ingest appends, what delivery reads, and the dedupe claims.

The outbox is the gateway's ack point: a request is answered 2xx only after its records
are durable there. Two implementations share this contract: the embedded SQLite outbox
(export.sqlite_outbox) and the Redis stream shared by replicas (export.redis_outbox).

Dedupe happens before any side effect of a request: ingest first *claims* its message ids
(``Outbox.claim``), does its work (consent records, identity links) only for the new ones,
then appends the records together with the claim (``Outbox.append(..., claim=...)``), which
confirms the claimed ids durably with the records; on failure it releases them
(``Outbox.release``) so the client's retry is accepted. A message id claimed by a request
still in flight is answered IN_FLIGHT (the client retries later), never dropped.

Records say what they are (``kind``: an event or a notice), whose data they carry
(``person``: the unified ID, for the per-destination person index) and which pseudonyms
and unified IDs their payload holds (``pseudonyms``: what delivery re-keys for each
destination's pseudonym domain). Delivery never parses payload bytes to find these.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Literal, Protocol

import msgspec

from identity.notices import Notice, encode_notice

RecordKind = Literal["event", "notice"]


class OutboxUnavailable(Exception):
    """The outbox could not durably store the events; nothing from the request was acked."""


class OutboxFull(Exception):
    """The outbox holds as many undelivered events as its bound allows: the client retries
    later (backpressure; nothing of the request was acknowledged or recorded)."""

    def __init__(self, backlog: int, bound: int, retry_after: int = 5) -> None:
        super().__init__(f"the gateway is holding {backlog} undelivered events (bound {bound}); retry later")
        self.backlog = backlog
        self.bound = bound
        self.retry_after = retry_after


# The person index (which persons' data a destination holds: where deletion notices go, and
# its retention clock) is written for a person at most this often per destination: its time
# serves retention, which counts in days, and rewriting it for every event of a returning
# person cost a write per event. Each destination's writer remembers up to this many persons.
PERSON_REFRESH_MS = 10 * 60 * 1000
PERSONS_REMEMBERED = 200_000


class NotedPersons:
    """The persons one destination's writer put into the person index, and when (ms): a
    person written less than ``PERSON_REFRESH_MS`` ago is not due again. Holds up to
    ``PERSONS_REMEMBERED`` persons, then starts over."""

    def __init__(self) -> None:
        self._at: dict[str, int] = {}

    def due(self, persons: Iterable[str], now_ms: int) -> list[str]:
        """The ``persons`` to write now."""
        stale = now_ms - PERSON_REFRESH_MS
        return [p for p in persons if self._at.get(p, stale) <= stale]

    def note(self, persons: Iterable[str], now_ms: int) -> None:
        if len(self._at) > PERSONS_REMEMBERED:
            self._at.clear()
        self._at.update(dict.fromkeys(persons, now_ms))

    def forget(self, persons: Iterable[str] | None = None) -> None:
        """``persons`` left the index (every one noted: None)."""
        if persons is None:
            self._at.clear()
        for p in persons or ():
            self._at.pop(p, None)


class OutboxRecord(msgspec.Struct, frozen=True, array_like=True):  # compact in the Redis outbox
    tenant: str
    source: str
    message_id: str
    received_at_ms: int
    destinations: tuple[str, ...]
    payload: bytes
    # The encoded consent question the event was routed by, asked again at delivery.
    consent: bytes = b""
    # Ledger seqs of the consent records that allowed the forward.
    proof: tuple[int, ...] = ()
    kind: RecordKind = "event"
    # The unified ID whose data the event carries ("" for notices and unresolved events).
    person: str = ""
    # Every pseudonym and unified ID in the payload, as stored (tenant domain).
    pseudonyms: tuple[str, ...] = ()


class StoredRecord(msgspec.Struct, frozen=True):
    """An outbox record as a destination's queue hands it out, with its position."""

    seq: int
    received_at_ms: int
    destinations: tuple[str, ...]
    payload: bytes
    consent: bytes = b""
    message_id: str = ""
    proof: tuple[int, ...] = ()
    kind: RecordKind = "event"
    person: str = ""
    pseudonyms: tuple[str, ...] = ()
    tenant: str = ""
    source: str = ""

    def to_outbox(self, destinations: tuple[str, ...] | None = None) -> OutboxRecord:
        return OutboxRecord(
            tenant=self.tenant,
            source=self.source,
            message_id=self.message_id,
            received_at_ms=self.received_at_ms,
            destinations=self.destinations if destinations is None else destinations,
            payload=self.payload,
            consent=self.consent,
            proof=self.proof,
            kind=self.kind,
            person=self.person,
            pseudonyms=self.pseudonyms,
        )


def stored(seq: int, r: OutboxRecord) -> StoredRecord:
    return StoredRecord(
        seq=seq,
        received_at_ms=r.received_at_ms,
        destinations=r.destinations,
        payload=r.payload,
        consent=r.consent,
        message_id=r.message_id,
        proof=r.proof,
        kind=r.kind,
        person=r.person,
        pseudonyms=r.pseudonyms,
        tenant=r.tenant,
        source=r.source,
    )


def notice_record(notice: Notice, destinations: tuple[str, ...]) -> OutboxRecord:
    """A notice as an outbox record for the tenant's destinations (delivery sends it only
    to those that received the person's data)."""
    return OutboxRecord(
        tenant=notice.tenant,
        source="idgate",
        message_id=notice.message_id,
        received_at_ms=int(notice.received_at.timestamp() * 1000),
        destinations=destinations,
        payload=encode_notice(notice),
        kind="notice",
    )


# How an ``identity.deleted`` notice starts (msgspec's compact JSON, the tag first): the
# notice is the destination's deletion request, kept where a person's other records go.
DELETION_NOTICE_MARK = '"type":"identity.deleted"'


def person_pattern(keys: Collection[str]) -> re.Pattern[str]:
    """One regular expression for any of a person's values, each a whole JSON string."""
    return re.compile("|".join(re.escape(f'"{k}"') for k in sorted(keys)))


def names_person(payload: bytes, pattern: re.Pattern[bytes]) -> bool:
    """Whether a notice's payload names the person (a deletion notice never counts)."""
    return DELETION_NOTICE_MARK.encode() not in payload and pattern.search(payload) is not None


def scoped_message_id(message_id: str, *subjects: str | None) -> str:
    """What a message id is claimed as: the id within the subject that sent it.

    ``subjects`` are the event's pseudonyms (anonymous id, user id): keyed hashes, so the
    key reveals nothing, and a client that does not know another device's identifiers
    cannot produce its claim. Claimed bare, a predictable message id sent first by one
    device would make another device's later event with that id a "duplicate" (a
    pre-claim); scoped, only the same device's retries (same ids, same message id) are.
    """
    return "\x1f".join((*(s or "" for s in subjects), message_id))


def dedupe_key(source: str, message_id: str) -> bytes:
    """Message ids are hashed with their source so no dedupe store holds anything readable."""
    return hashlib.blake2b(f"{source}\x1f{message_id}".encode(), digest_size=16).digest()


class _Sender(msgspec.Struct, rename="camel"):
    anonymous_id: str | None = None
    user_id: str | None = None


_sender = msgspec.json.Decoder(_Sender).decode


def claimed_as(record: OutboxRecord | StoredRecord) -> str:
    """The message id an event was claimed as at ingest (``scoped_message_id`` by its
    sender's pseudonyms, as its payload holds them): what its dedupe entry is keyed by."""
    try:
        sender = _sender(record.payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        sender = _Sender()
    return scoped_message_id(record.message_id, sender.anonymous_id, sender.user_id)


class PersonPurge(msgspec.Struct):
    """What purging a person's held events removed: the events, the dedupe entries of their
    message ids (found through the events, so removed before them), and the merge and split
    notices naming the person."""

    events: int = 0
    dedupe_keys: int = 0
    notices: int = 0


class ClaimStatus(IntEnum):
    DUPLICATE = 0
    NEW = 1
    IN_FLIGHT = 2


class Claim(msgspec.Struct):
    """What a request holds between claiming its message ids and appending its records:
    the status of each id asked, the keys it claimed (NEW ones), opaque to the caller, and
    the room it reserved in the outbox's bound for them.

    The keys are the claiming store's own: names of the shared Redis dedupe in ``keys``, or
    the embedded outbox's 16-byte digests in ``digests`` (kept as bytes from the claim to the
    mark, with no text form in between)."""

    statuses: list[ClaimStatus]
    keys: list[str]
    reserved: int = 0
    digests: list[bytes] = msgspec.field(default_factory=list)


class DeliveryState(msgspec.Struct):
    last_seq: int
    delivered: int
    sink_files: dict[str, int]


class DeliveryBatch(msgspec.Struct):
    """One read of a destination's queue: its records and what acknowledges the read."""

    records: list[StoredRecord]
    scanned: int
    token: object = None


class DestinationQueue(Protocol):
    """One destination's view of the outbox: read a batch, then commit it as delivered."""

    destination: str

    async def open(self) -> dict[str, int]:
        """Start reading; returns the committed sizes of the destination's sink files."""
        ...

    async def fetch(self, limit: int) -> DeliveryBatch: ...
    async def commit(
        self,
        batch: DeliveryBatch,
        delivered: int,
        sink_files: dict[str, int],
        persons: Iterable[str],
        released: Iterable[str] = (),
    ) -> None:
        """Commit a read as delivered, with the persons the destination now holds data of
        and those it was told to delete (``released``: the person index forgets them)."""
        ...

    async def received(self, persons: Iterable[str]) -> set[str]:
        """Which of ``persons`` the destination has been sent data of."""
        ...

    async def commit_files(self, sink_files: dict[str, int]) -> None:
        """Record the committed state of the destination's sink files after they were
        rewritten outside a batch (a person's lines removed)."""
        ...


class Outbox(Protocol):
    """Where ingest appends and delivery reads (SQLite embedded, or the Redis stream)."""

    @property
    def alive(self) -> bool: ...

    @property
    def accepting(self) -> bool:
        """False after an append failed (a full disk, the store down) until ``probe`` or an
        append succeeds again: readiness reports it."""
        ...

    async def probe(self) -> bool:
        """Try a tiny durable write (or a ping); True when the outbox can accept again."""
        ...

    async def claim(self, source: str, message_ids: Sequence[str]) -> Claim:
        """Claim message ids before any side effect of the request, and check the bound:
        ``OutboxFull`` when the new ones would take the backlog past it."""
        ...

    async def append(
        self, records: Sequence[OutboxRecord], *, dedupe: bool = False, claim: Claim | None = None
    ) -> list[bool]:
        """Durably append; returns per record True (stored) or False (a duplicate message
        id, only with ``dedupe``). With ``claim`` the claimed message ids are confirmed
        together with the records."""
        ...

    async def release(self, claim: Claim) -> None: ...
    def queue(self, destination: str) -> DestinationQueue: ...
    async def register_destinations(self, destinations: Iterable[str]) -> None: ...
    async def backlog(self) -> int:
        """The largest number of events a destination has not taken yet."""
        ...

    async def prune(self, chunk: int = 5_000) -> tuple[int, int]: ...
    async def purge_person(self, tenant: str, pseudonyms: Collection[str]) -> PersonPurge:
        """Delete the events held for a person (a deletion request) and the dedupe entries
        of their message ids; notices stay."""
        ...

    async def find_person(
        self, tenant: str, pseudonyms: Collection[str], limit: int = 10_000
    ) -> list[StoredRecord]:
        """The events held for a person (an access request)."""
        ...

    async def checkpoint(self) -> tuple[int, int]: ...
    def close(self) -> None: ...

    # -- retention (export.retention) ------------------------------------------------
    async def expire(self, tenant: str, cutoffs: Mapping[str, int], *, apply: bool) -> int:
        """Records of ``tenant`` past retention (``past_retention``): counted, deleted with
        ``apply``. Returns how many there are (were)."""
        ...

    async def expire_person_index(self, destination: str, cutoff_ms: int, *, apply: bool) -> int:
        """Persons whose data last went to ``destination`` before ``cutoff_ms``: counted,
        taken out of its person index with ``apply``."""
        ...

    async def expire_dedupe(self, *, apply: bool) -> int:
        """Dedupe entries past the dedupe window not pruned yet: counted, deleted with ``apply``."""
        ...


def past_retention(received_at_ms: int, destinations: Iterable[str], cutoffs: Mapping[str, int]) -> bool:
    """A record is past retention when it is older than the cutoff (ms) of every destination
    it is for: while one of them still keeps data that old, the record stays. A destination
    without a cutoff keeps it."""
    dests = [d for d in destinations if d]
    return bool(dests) and all(received_at_ms < cutoffs.get(d, 0) for d in dests)
