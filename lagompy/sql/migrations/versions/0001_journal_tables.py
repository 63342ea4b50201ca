"""The journal's tables: events, event tags, deletions and snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

``lagompy_events``
    One row per event. ``global_offset`` is assigned by the database and never reused: on
    SQLite it is an ``INTEGER PRIMARY KEY AUTOINCREMENT`` (SQLite gives never-reuse semantics
    only to that exact form), on PostgreSQL a ``BIGSERIAL``. ``(entity_type, entity_id,
    seq_nr)`` is unique, so a second writer can never merge into an entity's history.
``lagompy_event_tags``
    One row per (tag, event), keyed in offset order for read sides; a second index finds the
    tags of an offset (deletions).
``lagompy_deletions``
    Per entity, the highest sequence number ever deleted.
``lagompy_snapshots``
    Saved states, one row per (entity, sequence number).

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# BIGINT everywhere, except the SQLite offset column: AUTOINCREMENT needs INTEGER there.
OFFSET = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_events",
        sa.Column("global_offset", OFFSET, primary_key=True, autoincrement=True),
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("seq_nr", sa.BigInteger(), nullable=False),
        sa.Column("event_type", NAME, nullable=False),
        sa.Column("event_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("tags", sa.LargeBinary(), nullable=True),
        sa.Column("written_at_us", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint(
            "entity_type", "entity_id", "seq_nr", name="uq_lagompy_events_entity_seq"
        ),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "lagompy_event_tags",
        sa.Column("tag", NAME, nullable=False),
        sa.Column("global_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tag", "global_offset", name="pk_lagompy_event_tags"),
    )
    op.create_index("ix_lagompy_event_tags_offset", "lagompy_event_tags", ["global_offset"])

    op.create_table(
        "lagompy_deletions",
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("deleted_to", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", name="pk_lagompy_deletions"),
    )

    op.create_table(
        "lagompy_snapshots",
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("seq_nr", sa.BigInteger(), nullable=False),
        sa.Column("written_at_us", sa.BigInteger(), nullable=False),
        sa.Column("state_type", NAME, nullable=False),
        sa.Column("state_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", "seq_nr", name="pk_lagompy_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("lagompy_snapshots")
    op.drop_table("lagompy_deletions")
    op.drop_index("ix_lagompy_event_tags_offset", table_name="lagompy_event_tags")
    op.drop_table("lagompy_event_tags")
    op.drop_table("lagompy_events")
