"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs on SQLite and PostgreSQL alike: change existing tables inside
``with op.batch_alter_table(...)`` (SQLite cannot ALTER most things), and describe what the
revision does in this docstring. Change ``lagompy/sql/_schema.py`` to match in the same commit:
tests/test_migrations.py fails while the two differ.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "${up_revision}"
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | None = ${repr(branch_labels)}
depends_on: str | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
