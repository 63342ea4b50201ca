"""Read-side offsets, leases, pause flags and failures.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

``lagompy_readside_offsets``
    One row per (read-side processor, tag), in the projection database (which may be the
    journal's): the offset of the last event whose handlers' writes committed; the lease that
    lets one worker at a time commit (``owner``, ``epoch``, ``lease_expires_us``: a batch
    updates the offset only where the epoch is still the worker's, in the handlers'
    transaction); the persisted pause flag; the state, events/s and last failure a worker
    reports. Tag ``*`` is the processor's own lease (held during ``global_prepare``).

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_readside_offsets",
        sa.Column("processor", NAME, nullable=False),
        sa.Column("tag", NAME, nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        sa.Column("owner", NAME, nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("lease_expires_us", sa.BigInteger(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("events_per_s", sa.Float(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_offset", sa.BigInteger(), nullable=True),
        sa.Column("error_entity_type", NAME, nullable=True),
        sa.Column("error_entity_id", NAME, nullable=True),
        sa.Column("error_seq_nr", sa.BigInteger(), nullable=True),
        sa.Column("error_attempts", sa.Integer(), nullable=True),
        sa.Column("error_at_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("processor", "tag", name="pk_lagompy_readside_offsets"),
    )


def downgrade() -> None:
    op.drop_table("lagompy_readside_offsets")
