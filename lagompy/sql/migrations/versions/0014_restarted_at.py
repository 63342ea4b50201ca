"""Forgotten entities: a deletion that leaves an entity no event records where it restarted.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06

``lagompy_deletions.restarted_at``
    New, ``BIGINT NOT NULL DEFAULT 0``: the highest sequence number at which a deletion left
    the entity with no events at all (0: none ever did). The entity was forgotten there:
    recovery starts it again from its initial state at that number and replays the events it
    wrote since, where it used to meet the first of them as a gap (``EventsMissing``) once the
    entity had written again. A deletion that leaves events behind (events deleted up to a
    snapshot) does not change it: a gap above it is still ``EventsMissing``.

    Existing rows: an entity with a deletions row and no event left was forgotten (it recovers
    from its initial state at ``deleted_to`` today), so this revision sets its ``restarted_at``
    to ``deleted_to``; every other row gets 0. An entity forgotten *and written again* before
    this revision cannot be told from one whose events were deleted only in part (both have
    their events from ``deleted_to + 1`` on and none below): it keeps 0 and still fails with
    ``EventsMissing``; if you know it was forgotten, set its ``restarted_at`` to its
    ``deleted_to`` by hand.

On PostgreSQL the column is added (the default fills the existing rows), then the forgotten
entities' rows are updated. On SQLite the table is rebuilt (renamed away, created again with
the column, the rows copied, dropped), so that it reads exactly as a new database's; the table
holds a row per entity whose events were ever deleted, not per event. All of it is SQL, so
``lagompy migrate --sql`` prints it. A writer of an earlier lagompy version keeps working: its
deletions write the default, 0, as before.

The downgrade drops the column (on SQLite, rebuilds the table of revision 0001).

Written by hand, and frozen: a later change is a new revision, never an edit here.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)

#: The rows of the deletions whose entity has no event left: those entities were forgotten.
_FORGOTTEN = (
    "NOT EXISTS (SELECT 1 FROM lagompy_events e WHERE e.entity_type = {t}.entity_type "
    "AND e.entity_id = {t}.entity_id)"
)


def _deletions_table(restarted_at: bool) -> list[Any]:
    """The deletions table of revision 0001, with this revision's column or without."""
    columns: list[Any] = [
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("deleted_to", sa.BigInteger(), nullable=False),
    ]
    if restarted_at:
        columns.append(
            sa.Column("restarted_at", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
    columns.append(sa.PrimaryKeyConstraint("entity_type", "entity_id", name="pk_lagompy_deletions"))
    return columns


def _rebuild_sqlite(restarted_at: bool, select: str) -> None:
    """Rename SQLite's deletions table away, create it again (with the column or without: the
    same text as a new database's) and copy the rows with ``select`` (from ``old``)."""
    op.execute("ALTER TABLE lagompy_deletions RENAME TO lagompy_deletions_0014")
    op.create_table("lagompy_deletions", *_deletions_table(restarted_at))
    op.execute(f"INSERT INTO lagompy_deletions {select} FROM lagompy_deletions_0014 old")
    op.execute("DROP TABLE lagompy_deletions_0014")


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.add_column(
            "lagompy_deletions",
            sa.Column("restarted_at", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        )
        op.execute(
            "UPDATE lagompy_deletions SET restarted_at = deleted_to WHERE "
            + _FORGOTTEN.format(t="lagompy_deletions")
        )
        return
    _rebuild_sqlite(
        True,
        "(entity_type, entity_id, deleted_to, restarted_at) SELECT old.entity_type, "
        "old.entity_id, old.deleted_to, CASE WHEN "
        + _FORGOTTEN.format(t="old")
        + " THEN old.deleted_to ELSE 0 END",
    )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("lagompy_deletions", "restarted_at")
        return
    _rebuild_sqlite(
        False,
        "(entity_type, entity_id, deleted_to) SELECT old.entity_type, old.entity_id, "
        "old.deleted_to",
    )
