"""The management console's audit log.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

``lagompy_console_audit``
    One row per action taken in the console: when (``at_us``), in which service, by whom
    (``actor``), what (``action``, ``target``) and how it ended (``result``, ``detail``).
    ``id`` is assigned by the database and orders the rows.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "lagompy_console_audit",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("at_us", sa.BigInteger(), nullable=False),
        sa.Column("service", NAME, nullable=False),
        sa.Column("actor", NAME, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("result", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("lagompy_console_audit")
