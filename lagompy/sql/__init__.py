"""The SQL layer under the journal and the read sides: connections, lagompy's tables and their
migrations.

* :class:`Database` (``_database.py``): one engine on SQLite or PostgreSQL, read and write
  transactions (``BEGIN IMMEDIATE`` on SQLite), and the translation of driver errors into
  :mod:`lagompy.errors`.
* ``_schema.py``: lagompy's tables as SQLAlchemy Core metadata.
* :func:`upgrade`, :func:`current_revision`, :func:`ensure_schema` (``_migrate.py``): the tables
  under Alembic, whose scripts ship in ``migrations/`` beside this file; ``_cli.py``: the
  ``lagompy migrate`` command, which imports them only when it runs.

Nothing here knows about events or entities: the journal (:mod:`lagompy.journal`) and the read
sides (:mod:`lagompy.readside`) build on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.sql._database import Database, Dialect, dialect_of, normalize_url, translate_errors
    from lagompy.sql._migrate import (
        UpgradeResult,
        alembic_config,
        current_revision,
        ensure_schema,
        head_revision,
        script_location,
        upgrade,
        upgrade_every_database,
        upgrade_sql,
    )

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.sql._database": (
        "Database",
        "Dialect",
        "dialect_of",
        "normalize_url",
        "translate_errors",
    ),
    "lagompy.sql._migrate": (
        "UpgradeResult",
        "alembic_config",
        "current_revision",
        "ensure_schema",
        "head_revision",
        "script_location",
        "upgrade",
        "upgrade_every_database",
        "upgrade_sql",
    ),
}

__all__ = [
    "Database",
    "Dialect",
    "UpgradeResult",
    "alembic_config",
    "current_revision",
    "dialect_of",
    "ensure_schema",
    "head_revision",
    "normalize_url",
    "script_location",
    "translate_errors",
    "upgrade",
    "upgrade_every_database",
    "upgrade_sql",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
