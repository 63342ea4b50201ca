"""The relay log of topics on a journal placed on several databases.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06

``lagompy_topic_messages``
    One row per message of a topic partition, relayed from the journal's databases into the
    home one: ``(topic, partition, message_offset)`` is the key, the offset gap-free from 1 per
    partition; the message's key, its source event's entity, sequence number and time
    (``written_at_us``), its payload as lagompy's serializer encodes it (``type_name``,
    ``version``, ``payload``), and the event it came from (``source_database``,
    ``source_offset``).
``lagompy_topic_heads``
    Per (topic, partition), the last offset allocated in ``lagompy_topic_messages``: relays
    move it with ``UPDATE ... RETURNING``, whose row lock orders their commits.

Every database gets the tables (each holds lagompy's whole schema); only the home one's are
written. A journal on one database never writes them.

Written by hand, and frozen: a later change to the tables is a new revision, never an edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision: str | None = "0014"
branch_labels: str | None = None
depends_on: str | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "lagompy_topic_messages",
        sa.Column("topic", NAME, nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("message_offset", sa.BigInteger(), nullable=False),
        sa.Column("message_key", sa.Text(), nullable=False),
        sa.Column("entity_type", NAME, nullable=False),
        sa.Column("entity_id", NAME, nullable=False),
        sa.Column("seq_nr", sa.BigInteger(), nullable=False),
        sa.Column("written_at_us", sa.BigInteger(), nullable=False),
        sa.Column("type_name", NAME, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("source_database", NAME, nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "topic", "partition", "message_offset", name="pk_lagompy_topic_messages"
        ),
    )
    op.create_table(
        "lagompy_topic_heads",
        sa.Column("topic", NAME, nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", name="pk_lagompy_topic_heads"),
    )


def downgrade() -> None:
    op.drop_table("lagompy_topic_heads")
    op.drop_table("lagompy_topic_messages")
