"""Request and response bodies of the admin API (typed, so the OpenAPI document has them)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from consent.access_log import AccessEntry
from consent.audit import LedgerEntry

Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$", description="64 lowercase hex characters")]
TenantId = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]


NodeId = Annotated[
    str,
    msgspec.Meta(
        min_length=3,
        max_length=128,
        description="a pseudonymised identifier as the graph names it: `<type>:<pseudonym>`",
    ),
]


class IdentifierRef(msgspec.Struct, forbid_unknown_fields=True):
    """An identifier as an officer names it: a node id (``node``: ``<type>:<pseudonym>``,
    as the quarantine list, explain and the access log show them), or raw (``type``,
    ``id``, ``appid``), which only the compliance role may look up (pseudonymised on the
    server, and access-logged)."""

    type: str | None = None
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    appid: str | None = None
    node: NodeId | None = None


class RecordsPage(msgspec.Struct, rename="camel"):
    subject: str | None
    records: list[LedgerEntry]
    next_after_seq: int | None


class NoticeRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tenant: TenantId
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    content_sha256: Sha256Hex
    material: bool = False
    purposes_changed: list[str] = []


class NoticePublished(msgspec.Struct, rename="camel"):
    notice_id: str
    seq: int
    record_id: str
    material: bool


class UnlinkRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: TenantId
    a: IdentifierRef
    b: IdentifierRef


class EraseRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: TenantId
    identifiers: Annotated[list[IdentifierRef], msgspec.Meta(min_length=1, max_length=100)]


class LinkHop(msgspec.Struct, rename={"a": "from", "b": "to", "event_id": "eventId"}):
    a: str
    b: str
    source: str
    event_id: str
    at: datetime
    rule: str


class Explained(msgspec.Struct, rename="camel"):
    a: str
    b: str
    linked: bool
    unified_id: str | None
    unified_id_by_destination: dict[str, str | None]
    path: list[LinkHop]


class UnlinkResult(msgspec.Struct, rename="camel"):
    removed: bool
    split: bool
    unified_ids: dict[str, str]
    # what each destination received the parts as (its pseudonym domain)
    unified_ids_by_destination: dict[str, dict[str, str]]


class ErasureResult(msgspec.Struct, rename="camel"):
    erased: int
    not_in_graph: int
    unified_ids: list[str]
    notices: int


class QuarantinedMerge(msgspec.Struct, rename="camel"):
    a: str
    b: str
    reason: str
    source: str
    event_id: str
    at: datetime


class QuarantineList(msgspec.Struct):
    quarantined: list[QuarantinedMerge]


class AccessLogPage(msgspec.Struct):
    entries: list[AccessEntry]
