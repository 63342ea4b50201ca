"""Stored replies of commands, for safe retries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

``lagompy_command_replies``
    The encoded reply of every command (with a command id) that persisted events, written in the
    same transaction as its events, keyed by ``(entity_type, entity_id, command_id)``. A command
    asked again with a known id is answered from here instead of being applied twice. ``seq_nr``
    is the highest sequence number of the command's events: deleting an entity's events up to a
    sequence number deletes its replies up to it too.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_command_replies",
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("command_id", NAME, nullable=False),
        sa.Column("seq_nr", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint(
            "entity_type", "entity_id", "command_id", name="pk_lagompy_command_replies"
        ),
    )


def downgrade() -> None:
    op.drop_table("lagompy_command_replies")
