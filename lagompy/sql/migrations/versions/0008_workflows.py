"""Durable workflows: the runs index and the workflow types' flow control.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

``lagompy_workflow_runs``
    One row per workflow run, written by the workflow executor with its position: workflow,
    version, key, parent, status, tag (partition), steps, wake time, cancel flag, timestamps
    and error.
``lagompy_workflow_types``
    One row per workflow name: ``max_running`` and the operator's ``paused`` flag.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_workflow_runs",
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("workflow", NAME, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("run_key", NAME, nullable=True),
        sa.Column("parent", NAME, nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("tag", NAME, nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("wake_at_us", sa.BigInteger(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.Column("finished_us", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name="pk_lagompy_workflow_runs"),
    )
    op.create_index("ix_lagompy_workflow_runs_tag", "lagompy_workflow_runs", ["tag", "status"])
    op.create_index(
        "ix_lagompy_workflow_runs_workflow",
        "lagompy_workflow_runs",
        ["workflow", "status", "created_us"],
    )
    op.create_table(
        "lagompy_workflow_types",
        sa.Column("workflow", NAME, nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("workflow", name="pk_lagompy_workflow_types"),
    )


def downgrade() -> None:
    op.drop_table("lagompy_workflow_types")
    op.drop_index("ix_lagompy_workflow_runs_workflow", "lagompy_workflow_runs")
    op.drop_index("ix_lagompy_workflow_runs_tag", "lagompy_workflow_runs")
    op.drop_table("lagompy_workflow_runs")
