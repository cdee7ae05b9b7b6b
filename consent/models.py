"""Tables of the consent store: the hash-chained ledger and its signed checkpoints, the officer
access log, the deliveries with the consent records they relied on, the state projection.

The schema is created by the Alembic migrations in ``consent/migrations`` (never by
``create_all``), and ``tests/test_schema_migrations.py`` checks that the migrated schema
matches these classes on SQLite and PostgreSQL. Times are stored as UTC: timezone-aware on
PostgreSQL, naive UTC with microseconds on SQLite, and always handed back timezone-aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from identity.db import dialect_insert

# "retention_run": what one retention run removed from the stores (consent.retention).
RecordType = Literal["consent", "notice", "rights_request", "subject_flag", "retention_run"]
# "cleared" undoes a subject flag (a subject no longer flagged as a minor).
RecordState = Literal[
    "given",
    "withdrawn",
    "expired",
    "invalidated",
    "published",
    "requested",
    "refused",
    "completed",
    "flagged",
    "cleared",
]
ConsentKind = Literal["general", "separate", "guardian"]
LegalBasis = Literal["consent", "contract"]

RECORD_TYPES: frozenset[str] = frozenset(RecordType.__args__)  # type: ignore[attr-defined]
RECORD_STATES: frozenset[str] = frozenset(RecordState.__args__)  # type: ignore[attr-defined]
CONSENT_KINDS: frozenset[str] = frozenset(ConsentKind.__args__)  # type: ignore[attr-defined]
LEGAL_BASES: frozenset[str] = frozenset(LegalBasis.__args__)  # type: ignore[attr-defined]


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that only accepts timezone-aware values and always returns UTC-aware ones.

    SQLite has no time zones: SQLAlchemy would store an aware value's wall clock and drop
    the offset, so values are converted to UTC first."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("consent store times must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LedgerRecordBase(SQLModel):
    """What a ledger record says, before the appender numbers and chains it."""

    # Indexed by ix_consent_ledger_tenant_at, whose prefix serves tenant-only lookups too.
    tenant: str
    record_type: str
    subject: str | None = Field(default=None, index=True)
    notice_id: str | None = Field(default=None, index=True)
    notice_hash: str | None = None
    state: str
    consent_kind: str
    legal_basis: str
    source: str | None = None
    platform: str | None = None
    sdk: str | None = None
    evidence_hash: str | None = None


class LedgerRecord(LedgerRecordBase, table=True):
    """One append-only ledger record, hash-chained to the one before it (``seq`` - 1)."""

    __tablename__ = "consent_ledger"
    __table_args__ = (
        sa.UniqueConstraint("record_id", name="uq_consent_ledger_record_id"),
        sa.Index("ix_consent_ledger_tenant_at", "tenant", "at"),
    )

    # Assigned by the appender under the ledger lock, never by the database: contiguous from 1.
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False))
    record_id: str
    identifiers: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False))
    purposes: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False))
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False))
    prev_hash: str
    hash: str


class LedgerCheckpoint(SQLModel, table=True):
    """A signed Merkle root over the records ``from_seq``..``to_seq`` (chained to the previous root)."""

    __tablename__ = "consent_checkpoint"
    __table_args__ = (sa.UniqueConstraint("to_seq", name="uq_consent_checkpoint_to_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    from_seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    to_seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    root: str
    signature: str
    public_key: str
    key_id: str
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class AccessLogEntry(SQLModel, table=True):
    """Who (officer, role) looked at or exported consent data, with what parameters and result size."""

    __tablename__ = "admin_access_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    officer: str = Field(index=True)
    role: str
    action: str
    tenant: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False))
    result_count: int


class DeliveryProof(SQLModel, table=True):
    """One forwarded event and a consent record it relied on: "what we sent to whom, and why".

    Kept in the consent store (shared by every replica) so an officer's point-in-time view
    sees the deliveries of all replicas."""

    __tablename__ = "consent_delivery"
    # retention runs and breach queries select by destination and time
    __table_args__ = (sa.Index("ix_consent_delivery_destination_at", "destination", "delivered_at"),)

    ledger_seq: int = Field(sa_column=sa.Column(sa.BigInteger(), primary_key=True))
    destination: str = Field(primary_key=True)
    message_id: str = Field(primary_key=True)
    delivered_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


# -- the consent state projection (consent.state): derived from the ledger, rebuildable from it --


class ConsentStateRow(SQLModel, table=True):
    """The latest record of one purpose (or the minor flag) for one identifier pseudonym."""

    __tablename__ = "consent_state"

    tenant: str = Field(primary_key=True)
    identifier: str = Field(primary_key=True)
    purpose: str = Field(primary_key=True)
    state: str
    seq: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    notice_seq: int = Field(default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False))
    kind: str = "general"


class NoticeRow(SQLModel, table=True):
    """A published notice (privacy policy version) of a tenant."""

    __tablename__ = "consent_notice"

    tenant: str = Field(primary_key=True)
    notice_id: str = Field(primary_key=True)
    content_hash: str
    seq: int = Field(
        sa_column=sa.Column(sa.BigInteger(), nullable=False)
    )  # the ledger seq of its publication
    material: bool = False
    purposes: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False))
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class ProjectionRow(SQLModel, table=True):
    """The projection's watermark: the last ledger seq applied."""

    __tablename__ = "consent_projection"

    name: str = Field(primary_key=True)
    applied_seq: int = Field(default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False))


def projection_mark(conn: sa.Connection, name: str) -> int | None:
    """The ``consent_projection`` row ``name``'s seq; None while there is none."""
    table = ProjectionRow.__table__  # type: ignore[attr-defined]
    value = conn.execute(sa.select(table.c.applied_seq).where(table.c.name == name)).scalar()
    return None if value is None else int(value)


def advance_projection_mark(conn: sa.Connection, name: str, seq: int) -> None:
    """Move the ``consent_projection`` row ``name`` forward to ``seq`` in ``conn``'s
    transaction (created at ``seq`` when missing; never moved back)."""
    table = ProjectionRow.__table__  # type: ignore[attr-defined]
    stmt = dialect_insert(conn.engine)(table).values(name=name, applied_seq=seq)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"applied_seq": stmt.excluded.applied_seq},
            where=table.c.applied_seq < stmt.excluded.applied_seq,
        )
    )


class SubjectAliasRow(SQLModel, table=True):
    """Key rotation: ``old`` (a subject pseudonym under an older key version) is the same
    identifier as ``new`` (under a newer one), learned from an event that carried the raw
    identifier. ``idgate keys rotate`` moves the projection's entries from old to new in
    ``id`` order (its cursor), so a chain of rotations is followed."""

    __tablename__ = "consent_subject_alias"
    __table_args__ = (sa.UniqueConstraint("tenant", "old", name="uq_consent_subject_alias_old"),)

    id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    tenant: str
    old: str
    new: str
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


# Every table of the consent store, i.e. every table class above.
CONSENT_TABLES: tuple[str, ...] = (
    "consent_ledger",
    "consent_checkpoint",
    "admin_access_log",
    "consent_delivery",
    "consent_state",
    "consent_notice",
    "consent_projection",
    "consent_subject_alias",
)
