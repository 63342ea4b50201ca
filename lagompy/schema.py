"""lagompy's journal tables, as SQLAlchemy Core metadata (SQLite and PostgreSQL).

``lagompy_events``
    One row per event. ``global_offset`` is assigned by the database and never reused, even after
    deletes (``AUTOINCREMENT`` on SQLite, an identity column on PostgreSQL). ``(entity_type,
    entity_id, seq_nr)`` is unique: a second writer can never merge into an entity's history.
``lagompy_event_tags``
    One row per (tag, event): exact tag lookup in offset order for read sides.
``lagompy_deletions``
    Per entity, the highest sequence number ever deleted, so that deleting events never lowers
    the entity's highest sequence number.
``lagompy_snapshots``
    Saved states, one row per (entity, sequence number).
``lagompy_command_replies``
    The encoded reply of every command (with a command id) that persisted events, written in the
    same transaction as its events and keyed by ``(entity_type, entity_id, command_id)``:
    a retried command is answered from here instead of being applied twice. ``seq_nr`` is the
    highest sequence number of the command's events; deleting events up to a sequence number
    deletes the replies up to it too.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only gives AUTOINCREMENT semantics (never reuse a rowid) to an INTEGER PRIMARY KEY.
_OffsetType = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "lagompy_events",
    metadata,
    Column("global_offset", _OffsetType, primary_key=True, autoincrement=True),
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("event_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("tags", LargeBinary, nullable=True),
    Column("written_at_us", BigInteger, nullable=False),
    Column("metadata", LargeBinary, nullable=True),
    UniqueConstraint("entity_type", "entity_id", "seq_nr", name="uq_lagompy_events_entity_seq"),
    sqlite_autoincrement=True,
)

event_tags = Table(
    "lagompy_event_tags",
    metadata,
    Column("tag", String(255), nullable=False),
    Column("global_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("tag", "global_offset", name="pk_lagompy_event_tags"),
)
Index("ix_lagompy_event_tags_offset", event_tags.c.global_offset)

deletions = Table(
    "lagompy_deletions",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("deleted_to", BigInteger, nullable=False),
    PrimaryKeyConstraint("entity_type", "entity_id", name="pk_lagompy_deletions"),
)

snapshots = Table(
    "lagompy_snapshots",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("written_at_us", BigInteger, nullable=False),
    Column("state_type", String(255), nullable=False),
    Column("state_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    PrimaryKeyConstraint("entity_type", "entity_id", "seq_nr", name="pk_lagompy_snapshots"),
)

command_replies = Table(
    "lagompy_command_replies",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("command_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    PrimaryKeyConstraint(
        "entity_type", "entity_id", "command_id", name="pk_lagompy_command_replies"
    ),
)
