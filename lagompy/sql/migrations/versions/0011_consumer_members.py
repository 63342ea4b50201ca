"""Consumer members: the running instances of each consumer, for spreading its partitions.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

``lagompy_consumer_members``
    One row per (``consumer``, ``member``): a running instance (a process, or a Ray actor) of a
    consumer (a read-side processor, a process manager...) and until when it counts as live
    (``expires_us``, pushed forward by its heartbeat every renew interval). The live members
    sorted by name give every partition a target member; a member holding a partition whose
    target is another live member hands it over at a batch boundary.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_consumer_members",
        sa.Column("consumer", NAME, nullable=False),
        sa.Column("member", NAME, nullable=False),
        sa.Column("joined_us", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_us", sa.BigInteger(), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "member", name="pk_lagompy_consumer_members"),
    )


def downgrade() -> None:
    op.drop_table("lagompy_consumer_members")
