"""Process managers: their state per association key, and their durable timers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

``lagompy_process_states``
    One row per (process manager, association key): the state (type name, schema version,
    msgpack payload), the partition tag whose worker owns it, and a ``version`` that every
    write checks and counts up.
``lagompy_process_timers``
    One row per pending durable timer: its id (derived from the position that scheduled it),
    partition tag, key, due time (``due_us``) and message (type name, version, payload). The
    index on (manager, tag, due_us) finds a partition's next due timers; the one on
    (manager, key) the timers an ended key cancels.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_process_states",
        sa.Column("manager", NAME, nullable=False),
        sa.Column("key", NAME, nullable=False),
        sa.Column("tag", NAME, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state_type", NAME, nullable=False),
        sa.Column("state_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("manager", "key", name="pk_lagompy_process_states"),
    )
    op.create_table(
        "lagompy_process_timers",
        sa.Column("manager", NAME, nullable=False),
        sa.Column("timer_id", NAME, nullable=False),
        sa.Column("tag", NAME, nullable=False),
        sa.Column("key", NAME, nullable=False),
        sa.Column("due_us", sa.BigInteger(), nullable=False),
        sa.Column("message_type", NAME, nullable=False),
        sa.Column("message_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("manager", "timer_id", name="pk_lagompy_process_timers"),
    )
    op.create_index(
        "ix_lagompy_process_timers_due", "lagompy_process_timers", ["manager", "tag", "due_us"]
    )
    op.create_index("ix_lagompy_process_timers_key", "lagompy_process_timers", ["manager", "key"])


def downgrade() -> None:
    op.drop_index("ix_lagompy_process_timers_key", table_name="lagompy_process_timers")
    op.drop_index("ix_lagompy_process_timers_due", table_name="lagompy_process_timers")
    op.drop_table("lagompy_process_timers")
    op.drop_table("lagompy_process_states")
