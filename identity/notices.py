"""Notices about persons that go downstream: merges, splits, deletions and withdrawals.

A notice tells a destination that the person it knows by a unified ID changed: two persons
became one (``identity.merged``), one fell apart (``identity.split``), or identifiers of a
person were erased (``identity.deleted``). They are typed structs, tagged on ``type``, shared
by the identity domain (which produces them from graph changes and erasures) and export
(which routes them to the destinations that received the person's data, re-keys their IDs
for each destination's pseudonym domain and turns them into each sink's own calls).

The wire form is JSON with the Segment-style names (``messageId``, ``receivedAt``,
``unifiedId``) and ``context.idgate`` naming the tenant, like every event idgate forwards.
Message ids are stable (a redelivered notice dedupes) and opaque: a keyed-free hash of the
tenant-domain IDs, which destinations only ever see re-keyed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Self

import msgspec

from identity.graph import GraphChange, Merged, NodeRekeyed, Split
from identity.identifiers import Identifier


class NoticeMeta(msgspec.Struct, frozen=True):
    tenant: str
    notice: bool = True


class NoticeContext(msgspec.Struct, frozen=True):
    idgate: NoticeMeta


class NoticeIdentifier(msgspec.Struct, frozen=True):
    """An erased identifier as a deletion notice names it (type and pseudonym)."""

    type: str
    id: str


class _Notice(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, rename="camel"):
    message_id: str
    received_at: datetime
    context: NoticeContext

    @property
    def tenant(self) -> str:
        return self.context.idgate.tenant

    def subjects(self) -> tuple[str, ...]:
        """The unified IDs a destination must have received data of for this notice to
        concern it."""
        raise NotImplementedError

    def named(self) -> tuple[str, ...]:
        """Every unified ID the notice names (the destination knows them afterwards)."""
        raise NotImplementedError

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        """The same notice with every unified ID and pseudonym mapped through ``value``
        (a destination's pseudonym domain)."""
        raise NotImplementedError


class IdentityMerged(_Notice, frozen=True, tag="identity.merged"):
    """``merged`` is now an alias of ``survivor`` (the ID downstream received first)."""

    survivor: str
    merged: str

    def subjects(self) -> tuple[str, ...]:
        return (self.survivor, self.merged)

    def named(self) -> tuple[str, ...]:
        return (self.survivor, self.merged)

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, survivor=value(self.survivor), merged=value(self.merged))


class IdentitySplit(_Notice, frozen=True, tag="identity.split"):
    """The person ``previous`` fell apart into ``parts`` (one of them keeps ``previous``)."""

    previous: str
    parts: tuple[str, ...]

    def subjects(self) -> tuple[str, ...]:
        return (self.previous,)

    def named(self) -> tuple[str, ...]:
        return (self.previous, *self.parts)

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self, previous=value(self.previous), parts=tuple(value(p) for p in self.parts)
        )


class IdentityDeleted(_Notice, frozen=True, tag="identity.deleted"):
    """These identifiers of the person ``unified_id`` were erased: recipients delete what
    they hold under them."""

    unified_id: str
    # empty: the whole person
    identifiers: tuple[NoticeIdentifier, ...] = ()

    def subjects(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def named(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self,
            unified_id=value(self.unified_id),
            identifiers=tuple(NoticeIdentifier(i.type, value(i.id)) for i in self.identifiers),
        )


class IdentityRekeyed(_Notice, frozen=True, tag="identity.rekeyed"):
    """A key rotation: the identifier recipients know as ``old_identifier`` is now
    ``new_identifier`` (same person, same ``unified_id``); recipients re-key what they hold."""

    unified_id: str
    old_identifier: NoticeIdentifier
    new_identifier: NoticeIdentifier

    def subjects(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def named(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        old, new = self.old_identifier, self.new_identifier
        return msgspec.structs.replace(
            self,
            unified_id=value(self.unified_id),
            old_identifier=NoticeIdentifier(old.type, value(old.id)),
            new_identifier=NoticeIdentifier(new.type, value(new.id)),
        )


class ConsentWithdrawn(_Notice, frozen=True, tag="consent.withdrawn"):
    """The person ``unified_id`` withdrew these purposes at ``received_at`` (the ledger
    records ``ledger_seqs``): recipients stop processing their data for them (PIPL Art. 15,
    47). Not retroactive: what was received before stays lawfully received."""

    unified_id: str
    purposes: tuple[str, ...]
    ledger_seqs: tuple[int, ...]

    def subjects(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def named(self) -> tuple[str, ...]:
        return (self.unified_id,)

    def rekeyed(self, value: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, unified_id=value(self.unified_id))


Notice = IdentityMerged | IdentitySplit | IdentityDeleted | IdentityRekeyed | ConsentWithdrawn
NOTICE_TYPES: tuple[str, ...] = (
    "identity.merged",
    "identity.split",
    "identity.deleted",
    "identity.rekeyed",
    "consent.withdrawn",
)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Notice).decode


def encode_notice(notice: Notice) -> bytes:
    return _encode(notice)


def decode_notice(payload: bytes) -> Notice:
    """A notice from its wire form; msgspec.ValidationError when it is not one."""
    return _decode(payload)


def notice_message_id(kind: str, *parts: str) -> str:
    """A notice's message id: stable (a redelivery dedupes) and opaque (it must not carry
    the tenant-domain unified IDs, which destinations only see re-keyed)."""
    return f"{kind}:" + hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def _context(tenant: str) -> NoticeContext:
    return NoticeContext(NoticeMeta(tenant))


def notices_for_changes(tenant: str, changes: Iterable[GraphChange]) -> list[Notice]:
    """The merge and split notices of a run of graph changes (other changes say nothing
    downstream needs)."""
    out: list[Notice] = []
    for c in changes:
        at = c.at.astimezone(UTC)
        if isinstance(c, Merged):
            out.append(
                IdentityMerged(
                    message_id=notice_message_id("identity.merged", c.merged),
                    received_at=at,
                    context=_context(tenant),
                    survivor=c.survivor,
                    merged=c.merged,
                )
            )
        elif isinstance(c, Split):
            out.append(
                IdentitySplit(
                    message_id=notice_message_id("identity.split", c.old_unified_id, str(at.timestamp())),
                    received_at=at,
                    context=_context(tenant),
                    previous=c.old_unified_id,
                    parts=tuple(sorted(set(c.parts.values()))),
                )
            )
        elif isinstance(c, NodeRekeyed):
            out.append(rekey_notice(tenant, c))
    return out


def rekey_notice(tenant: str, change: NodeRekeyed) -> IdentityRekeyed:
    """``identity.rekeyed`` for one identifier moved to a new key version."""
    old_type, _, old_value = change.old.partition(":")
    new_type, _, new_value = change.new.partition(":")
    return IdentityRekeyed(
        message_id=notice_message_id("identity.rekeyed", change.old, change.new),
        received_at=change.at.astimezone(UTC),
        context=_context(tenant),
        unified_id=change.unified_id,
        old_identifier=NoticeIdentifier(old_type, old_value),
        new_identifier=NoticeIdentifier(new_type, new_value),
    )


def deletion_notice(
    tenant: str, unified_id: str, identifiers: Sequence[Identifier], at: datetime
) -> IdentityDeleted:
    """``identity.deleted`` for the erased identifiers of one person."""
    ordered = sorted(identifiers, key=lambda i: i.node)
    return IdentityDeleted(
        message_id=notice_message_id("identity.deleted", unified_id, *(i.node for i in ordered)),
        received_at=at.astimezone(UTC),
        context=_context(tenant),
        unified_id=unified_id,
        identifiers=tuple(NoticeIdentifier(i.type, i.value) for i in ordered),
    )


def withdrawal_notice(
    tenant: str, unified_id: str, purposes: Sequence[str], ledger_seqs: Sequence[int], at: datetime
) -> ConsentWithdrawn:
    """``consent.withdrawn`` for one person's withdrawal (one ledger call, its records)."""
    seqs = tuple(sorted(ledger_seqs))
    return ConsentWithdrawn(
        message_id=notice_message_id("consent.withdrawn", unified_id, *map(str, seqs)),
        received_at=at.astimezone(UTC),
        context=_context(tenant),
        unified_id=unified_id,
        purposes=tuple(sorted(set(purposes))),
        ledger_seqs=seqs,
    )
