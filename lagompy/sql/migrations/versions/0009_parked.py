"""Parked events and messages (dead letters of consumers with ``on_failure="park"``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

``lagompy_parked``
    One row per event (read side) or message (topic subscriber) a consumer gave up on after
    ``max_attempts``, written in the fenced transaction that moves its offset past it: who
    (``consumer_kind``, ``consumer``, ``tag``), where (``event_offset``, unique per consumer
    and tag), what (``entity_type``, ``entity_id``, ``seq_nr``, ``event_type``, and for a
    subscriber the ``message`` as JSON), why (``error_class``, ``error``, ``attempts``), when
    (``parked_at_us``), and an operator's pending retry (``retry_requested_us``, ``retries``).

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "lagompy_parked",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("consumer_kind", sa.String(32), nullable=False),
        sa.Column("consumer", NAME, nullable=False),
        sa.Column("tag", NAME, nullable=False),
        sa.Column("event_offset", sa.BigInteger(), nullable=False),
        sa.Column("entity_type", NAME, nullable=True),
        sa.Column("entity_id", NAME, nullable=True),
        sa.Column("seq_nr", sa.BigInteger(), nullable=True),
        sa.Column("event_type", NAME, nullable=True),
        sa.Column("error_class", NAME, nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("parked_at_us", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("retry_requested_us", sa.BigInteger(), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.UniqueConstraint("consumer", "tag", "event_offset", name="uq_lagompy_parked_position"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_lagompy_parked_error_class", "lagompy_parked", ["error_class"])
    op.create_index("ix_lagompy_parked_entity", "lagompy_parked", ["entity_type", "entity_id"])


def downgrade() -> None:
    op.drop_index("ix_lagompy_parked_entity", table_name="lagompy_parked")
    op.drop_index("ix_lagompy_parked_error_class", table_name="lagompy_parked")
    op.drop_table("lagompy_parked")
