"""Purging a person's held events (a deletion request, issue 13) from both outbox backends and
both dead-letter stores: only that person's events of that tenant go, notices stay, the other
events are still delivered in order, and the Redis backlog counters stay exact; the dedupe
entries of the purged events go with them, and a destination's person index forgets a
person once it was sent their deletion notice. The file sinks rewrite their files without
the person's lines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec

from export.outbox import ClaimStatus, claimed_as, notice_record, scoped_message_id, stored
from identity.notices import deletion_notice
from tests.export import test_delivery as base
from tests.export.test_delivery import Backend, event, merged_notice, person

backend = base.backend  # the same fixture: both outbox backends with their dead-letter stores


def test_purge_removes_only_the_persons_events_and_keeps_notices(backend: Backend) -> None:
    async def go() -> None:
        box = backend.outbox
        await box.register_destinations(["a", "b"])
        gone, kept = person(1), person(2)
        records = [
            event(i, person=gone if i % 2 == 0 else kept, destinations=("a", "b"), user=f"k1.user{i % 2}")
            for i in range(10)
        ]
        other_tenant = msgspec.structs.replace(event(99, person=gone, destinations=("a", "b")), tenant="u")
        merged = merged_notice(gone, person(3), ("a", "b"))  # names the person: it goes too
        notice = merged_notice(kept, person(4), ("a", "b"))
        deleted = notice_record(deletion_notice("t", gone, [], datetime.now(UTC)), ("a", "b"))  # it stays
        await backend.append([*records, other_tenant, merged, notice, deleted])
        qa, qb = box.queue("a"), box.queue("b")
        await qa.open()
        await qb.open()
        first = await qa.fetch(4)  # "a" has taken m0..m3, "b" nothing yet
        await qa.commit(first, len(first.records), {}, ())

        purged = await box.purge_person("t", {gone})
        assert (purged.events, purged.notices) == (5, 1)
        assert (await box.purge_person("t", {"k1.user1"})).events == 5  # by an identifier pseudonym too
        assert (await box.purge_person("t", {gone, "k1.user1"})).events == 0

        async def rest(queue: object) -> list[str]:
            out: list[str] = []
            while True:
                batch = await queue.fetch(100)  # type: ignore[attr-defined]
                if not batch.scanned:
                    return out
                out += [r.message_id for r in batch.records]
                await queue.commit(batch, len(batch.records), {}, ())  # type: ignore[attr-defined]

        assert await rest(qa) == ["m99", notice.message_id, deleted.message_id]
        assert await rest(qb) == ["m99", notice.message_id, deleted.message_id]
        if hasattr(box, "exact_backlog") and asyncio.iscoroutinefunction(box.exact_backlog):
            assert await box.exact_backlog() == 0  # the deleted entries count as acknowledged

    asyncio.run(go())


def test_dead_letters_of_a_person_are_purged(backend: Backend) -> None:
    gone, kept = person(1), person(2)
    records = [stored(i + 1, event(i, person=gone if i < 3 else kept, user=f"k1.u{i}")) for i in range(6)]
    records.append(stored(7, msgspec.structs.replace(event(7, person=gone), tenant="u")))
    backend.dead_letters.add("a", records, "refused", 1)
    backend.dead_letters.add("b", records[:2], "refused", 1)
    assert backend.dead_letters.purge_person("t", {gone}) == 5
    assert backend.dead_letters.purge_person("t", {"k1.u3"}) == 1
    left = sorted((d.destination, d.message_id) for d in backend.dead_letters.list(limit=100))
    assert left == [("a", "m4"), ("a", "m5"), ("a", "m7")]


def test_purge_removes_the_dedupe_entries_of_the_persons_events(backend: Backend) -> None:
    """Dedupe keys are digests of the message id scoped by the sender's pseudonyms: only the
    events lead to them, so the purge removes them with the events. The same message id can
    then be stored again (once the person is no longer suppressed), the others' cannot."""

    async def go() -> None:
        box = backend.outbox
        await box.register_destinations(["a"])
        gone, kept = person(1), person(2)
        records = [event(1, person=gone, user="k1.gone"), event(2, person=kept, user="k1.kept")]
        scoped = [claimed_as(r) for r in records]
        assert scoped[0] == scoped_message_id("m1", None, "k1.gone")
        claim = await box.claim("web", scoped)
        assert claim.statuses == [ClaimStatus.NEW, ClaimStatus.NEW]
        await box.append(records, claim=claim)
        assert (await box.claim("web", scoped)).statuses == [ClaimStatus.DUPLICATE] * 2

        purged = await box.purge_person("t", {gone})
        assert (purged.events, purged.dedupe_keys) == (1, 1)
        again = await box.claim("web", scoped)
        assert again.statuses == [ClaimStatus.NEW, ClaimStatus.DUPLICATE]
        await box.release(again)
        assert (await box.purge_person("t", {gone})).dedupe_keys == 0

    asyncio.run(go())


def test_the_person_index_forgets_a_person_released_at_commit(backend: Backend) -> None:
    async def go() -> None:
        box = backend.outbox
        await box.register_destinations(["a"])
        gone, kept = person(1), person(2)
        await backend.append([event(1, person=gone), event(2, person=kept)])
        queue = box.queue("a")
        await queue.open()
        batch = await queue.fetch(10)
        await queue.commit(batch, len(batch.records), {}, (gone, kept))
        assert await queue.received([gone, kept]) == {gone, kept}
        await backend.append([event(3, person=kept)])
        batch = await queue.fetch(10)
        await queue.commit(batch, len(batch.records), {}, (kept,), (gone,))
        assert await queue.received([gone, kept]) == {kept}

    asyncio.run(go())
