"""Idempotency keys bound to the request they first came with.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

``lagompy_idempotency_keys``
    One row per (service, ``Idempotency-Key``): the request the key was first used with
    (``method``, the route's path template, and a ``fingerprint`` of method, route, path and
    query parameters and body), when it was bound (``created_us``), until when that first
    request counts as in flight (``in_flight_until_us``, 0 once it answered), and how many later
    requests repeated it (``repeats``). The index on ``created_us`` serves the sweep of expired
    keys (and only the primary key leads with ``scope``, so that every plan finds a key's row
    through it).

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_idempotency_keys",
        sa.Column("scope", NAME, nullable=False),
        sa.Column("idempotency_key", NAME, nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("in_flight_until_us", sa.BigInteger(), nullable=False),
        sa.Column("repeats", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key", "scope", name="pk_lagompy_idempotency_keys"),
    )
    op.create_index(
        "ix_lagompy_idempotency_keys_created", "lagompy_idempotency_keys", ["created_us"]
    )


def downgrade() -> None:
    op.drop_index("ix_lagompy_idempotency_keys_created", table_name="lagompy_idempotency_keys")
    op.drop_table("lagompy_idempotency_keys")
