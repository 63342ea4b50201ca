"""Settings: keyword arguments with documented defaults, overridable from the environment.

Each settings class reads environment variables with its own prefix; a keyword argument given in
code wins over the environment, which wins over the default::

    JournalSettings()                          # url from LAGOMPY_JOURNAL_URL, else ./lagompy.db
    JournalSettings(url="postgresql://...")    # explicit
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_JOURNAL_URL = "sqlite+aiosqlite:///lagompy.db"


class JournalSettings(BaseSettings):
    """Where and how the journal and snapshot store connect. Environment prefix
    ``LAGOMPY_JOURNAL_`` (e.g. ``LAGOMPY_JOURNAL_URL``, ``LAGOMPY_JOURNAL_POOL_SIZE``)."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_JOURNAL_", frozen=True, extra="forbid")

    url: str = Field(
        DEFAULT_JOURNAL_URL,
        description=(
            "Database URL. sqlite:///path.db (made absolute against the working directory) or "
            "postgresql://user@host/db; the async drivers (aiosqlite, asyncpg) are chosen for you."
        ),
    )
    pool_size: int = Field(5, ge=1, description="Connections kept open per process.")
    max_overflow: int = Field(5, ge=0, description="Extra connections opened under load.")
    pool_timeout: float = Field(30.0, gt=0, description="Seconds to wait for a free connection.")
    postgres_schema: str | None = Field(
        None, description="PostgreSQL schema for lagompy's tables (sets search_path)."
    )
    sqlite_busy_timeout_ms: int = Field(
        30_000, ge=0, description="How long a SQLite writer waits for another writer's lock."
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="SQLite PRAGMA synchronous; FULL makes every commit durable."
    )
    lock_timeout_ms: int = Field(
        10_000,
        ge=0,
        description=(
            "PostgreSQL lock_timeout for lagompy's connections: how long a write transaction "
            "waits for the journal's ordering lock before failing (0 waits forever)."
        ),
    )
    echo: bool = Field(False, description="Log every SQL statement (SQLAlchemy echo).")
    auto_migrate: bool | None = Field(
        None,
        description=(
            "Create or upgrade lagompy's tables when the journal opens. None (the default) means "
            "yes on SQLite and no on PostgreSQL, where `lagompy migrate` runs once per deploy and "
            "a journal whose tables are missing or outdated refuses to start."
        ),
    )
