"""lagompy's own tables under Alembic: upgrade them, see where a database stands, and the
``lagompy migrate`` command.

The revisions live in ``migrations/`` beside this module (the package ``lagompy.sql.migrations``,
shipped in the wheel). Their version table is ``lagompy_alembic_version``, so they never meet an
application's own Alembic history in the same database.

::

    database = Database.create(url="postgresql://app@db/app")
    await upgrade(database)                  # to the newest revision ("head")
    await current_revision(database)         # "0001", or None before the first upgrade

One upgrade is one transaction: every pending revision and the version-table update commit
together, or nothing does. Concurrent migrators (several processes starting at once) take turns:
the transaction starts with ``BEGIN IMMEDIATE`` on SQLite (the database's write lock) and takes
``pg_advisory_xact_lock(ADVISORY_LOCK_KEY)`` on PostgreSQL, so the second one finds the work done.

:func:`lagompy.open_storage` calls :func:`ensure_schema`: the journal upgrades itself when
``JournalSettings.auto_migrate`` says so (by default on SQLite only), and otherwise refuses to
start on missing or outdated tables with the command that fixes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import logging
import shlex
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import inspect, text
from sqlalchemy.engine import URL

from lagompy.errors import ConfigurationError
from lagompy.settings import JournalSettings
from lagompy.sql._database import Database, Dialect, dialect_of, normalize_url

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "ADVISORY_LOCK_KEY",
    "VERSION_TABLE",
    "UpgradeResult",
    "alembic_config",
    "current_revision",
    "each_database",
    "ensure_schema",
    "head_revision",
    "migrate_command",
    "offline_prelude",
    "script_location",
    "upgrade",
    "upgrade_every_database",
    "upgrade_sql",
]

log = logging.getLogger("lagompy.migrate")

T = TypeVar("T")

#: lagompy's Alembic version table (an application's own Alembic keeps ``alembic_version``).
VERSION_TABLE = "lagompy_alembic_version"

#: Key of the PostgreSQL advisory lock held by a migration's transaction: the bytes of
#: ``b"lagompy"`` read as a big-endian integer (0x6C61676F6D7079).
ADVISORY_LOCK_KEY = int.from_bytes(b"lagompy", "big")

#: The first revision, and the tables it creates. A database that has exactly these tables but
#: no version table was set up by lagompy 0.1's ``create_tables``: it is stamped, not recreated.
FIRST_REVISION = "0001"
_FIRST_REVISION_TABLES = frozenset(
    {"lagompy_events", "lagompy_event_tags", "lagompy_deletions", "lagompy_snapshots"}
)

_PACKAGE = "lagompy.sql.migrations"


@dataclass(frozen=True)
class UpgradeResult:
    """The revision of lagompy's tables before and after :func:`upgrade` (None: no tables)."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


# --------------------------------------------------------------------------- Alembic set-up


def script_location() -> Path:
    """The directory of the shipped Alembic scripts (``env.py``, ``versions/``)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        if (Path(location) / "env.py").is_file():
            return Path(location)
    raise ConfigurationError(
        f"lagompy's migration scripts are missing (no package {_PACKAGE!r} with an env.py): "
        "reinstall lagompy"
    )


def alembic_config(
    *,
    connection: Connection | None = None,
    dialect: Dialect | None = None,
    postgres_schema: str | None = None,
    output_buffer: io.StringIO | None = None,
) -> Config:
    """An Alembic ``Config`` for lagompy's scripts; no ``alembic.ini`` is involved.

    ``connection`` (a connection already in a transaction) is what ``env.py`` migrates online;
    ``dialect`` and ``postgres_schema`` shape the offline (``--sql``) script.
    """
    from alembic.config import Config

    config = Config(output_buffer=output_buffer)
    # The value goes through configparser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(script_location()).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    if dialect is not None:
        config.attributes["dialect"] = dialect
    if postgres_schema is not None:
        config.attributes["postgres_schema"] = postgres_schema
    return config


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    """(head, every known revision) of the shipped scripts, read once per process."""
    from alembic.script import ScriptDirectory

    with _alembic_errors("reading lagompy's migration scripts"):
        scripts = ScriptDirectory.from_config(alembic_config())
        head = scripts.get_current_head()
        known = frozenset(script.revision for script in scripts.walk_revisions())
    if head is None:
        raise ConfigurationError(f"lagompy's migration scripts in {script_location()} are empty")
    return head, known


def head_revision() -> str:
    """The newest revision this version of lagompy ships."""
    return _revisions()[0]


def _quote(name: str) -> str:
    """A PostgreSQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def offline_prelude(dialect: str, postgres_schema: str | None) -> list[str]:
    """Statements that open an offline (``--sql``) upgrade script, inside its transaction."""
    if dialect != "postgresql":
        return []
    statements = [f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"]
    if postgres_schema:
        schema = _quote(postgres_schema)
        statements += [
            f"CREATE SCHEMA IF NOT EXISTS {schema}",
            f"SET LOCAL search_path TO {schema}",
        ]
    return statements


@contextlib.contextmanager
def _alembic_errors(what: str) -> Iterator[None]:
    """Alembic's errors about revisions (unknown, ambiguous, not reachable) are configuration
    problems: turn them into ``ConfigurationError``."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        yield
    except (CommandError, RevisionError) as e:
        raise ConfigurationError(f"{what}: {e}") from e


# Alembic keeps its ``context`` and ``op`` proxies in module globals, so two migrations that
# interleave in one process (two tasks, or two threads) would run each other's operations on each
# other's connections. One at a time per process; polled, so that it works across event loops and
# threads and a cancelled waiter leaves nothing behind. Always taken before the database's lock.
_ALEMBIC_IN_USE = threading.Lock()


@contextlib.asynccontextmanager
async def _one_migration_per_process() -> AsyncIterator[None]:
    while not _ALEMBIC_IN_USE.acquire(blocking=False):
        await asyncio.sleep(0.005)
    try:
        yield
    finally:
        _ALEMBIC_IN_USE.release()


# --------------------------------------------------------------------------- the API


def _current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def current_revision(database: Database) -> str | None:
    """The revision of lagompy's tables in ``database``; None if they were never migrated."""
    with _alembic_errors(f"reading the revision of {_place(database.settings)}"):
        async with database.read() as conn:
            return await conn.run_sync(_current)


async def upgrade(database: Database, revision: str = "head") -> UpgradeResult:
    """Upgrade lagompy's tables in ``database`` to ``revision`` (default: the newest).

    Safe to run concurrently and repeatedly: migrators take turns, and an up-to-date database is
    left alone. On PostgreSQL with ``postgres_schema`` set, the schema is created if missing, and
    the tables (and the version table) land in it.
    """
    settings = database.settings
    with _alembic_errors(f"migrating {_place(settings)}"):
        async with _one_migration_per_process(), database.write() as conn:
            if database.dialect == "postgresql":
                await _take_advisory_lock(conn)
                if settings.postgres_schema:
                    await _create_schema_if_missing(conn, settings.postgres_schema)
            return await conn.run_sync(
                _upgrade, revision, database.dialect, settings.postgres_schema
            )


async def upgrade_every_database(
    settings: JournalSettings, revision: str = "head"
) -> list[tuple[str, UpgradeResult]]:
    """:func:`upgrade` each database of the journal (``JournalSettings.databases``: every one,
    the home one first, as ``lagompy migrate`` does); (name, result) of each."""
    results = []
    for name, one in each_database(settings):
        database = Database.create(one)
        try:
            results.append((name, await upgrade(database, revision)))
        finally:
            await database.dispose()
    return results


async def _take_advisory_lock(conn: AsyncConnection) -> None:
    """Wait for the migration lock as long as another migrator holds it (its migration ends),
    then give the DDL back the connection's own ``lock_timeout``."""
    configured = await conn.scalar(text("SELECT current_setting('lock_timeout')"))
    await conn.execute(text("SET LOCAL lock_timeout = 0"))
    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    await conn.execute(
        text("SELECT set_config('lock_timeout', :value, true)"), {"value": configured}
    )


async def _create_schema_if_missing(conn: AsyncConnection, name: str) -> None:
    found = await conn.scalar(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": name}
    )
    if found is None:
        await conn.execute(text(f"CREATE SCHEMA {_quote(name)}"))


def _upgrade(
    connection: Connection, revision: str, dialect: Dialect, postgres_schema: str | None
) -> UpgradeResult:
    from alembic import command

    config = alembic_config(connection=connection, dialect=dialect, postgres_schema=postgres_schema)
    before = _current(connection)
    if before is None:
        existing = _FIRST_REVISION_TABLES & set(inspect(connection).get_table_names())
        if existing == _FIRST_REVISION_TABLES:
            log.info("stamping tables created before migrations at revision %s", FIRST_REVISION)
            command.stamp(config, FIRST_REVISION)
            before = FIRST_REVISION
        elif existing:
            raise ConfigurationError(
                f"some of lagompy's tables exist ({', '.join(sorted(existing))}) but not the "
                f"others, and there is no {VERSION_TABLE} table, so lagompy did not create them: "
                "drop them or use another database"
            )
    command.upgrade(config, revision)
    after = _current(connection)
    if after != before:
        log.info("upgraded lagompy's tables from %s to %s", before, after)
    return UpgradeResult(before, after)


async def ensure_schema(database: Database, *, auto_migrate: bool | None = None) -> None:
    """Make sure lagompy's tables are at this version's head revision before using them.

    ``auto_migrate`` (default: ``JournalSettings.auto_migrate``; None means yes on SQLite, no on
    PostgreSQL) upgrades them when needed. Otherwise missing or outdated tables raise
    ``ConfigurationError`` naming the ``lagompy migrate`` command that fixes it.
    """
    if auto_migrate is None:
        auto_migrate = database.settings.auto_migrate
    if auto_migrate is None:
        auto_migrate = database.dialect == "sqlite"
    head, known = _revisions()
    current = await current_revision(database)
    if current == head:
        return
    if current is not None and current not in known:
        raise ConfigurationError(
            f"lagompy's tables in {_place(database.settings)} are at revision {current!r}, which "
            f"this version of lagompy does not know (its newest is {head!r}): a newer lagompy "
            "migrated them; upgrade lagompy"
        )
    if auto_migrate:
        await upgrade(database)
        return
    state = "are missing" if current is None else f"are at revision {current}, not {head}"
    raise ConfigurationError(
        f"lagompy's tables in {_place(database.settings)} {state} and auto_migrate is off: "
        f"run `{migrate_command(database.settings)}`"
    )


def _shown_url(settings: JournalSettings) -> str:
    """The database URL without its password (nor the async driver's name)."""
    url = normalize_url(settings.url)
    shown = URL.create(
        url.get_backend_name(), url.username, None, url.host, url.port, url.database, url.query
    )  # (URL.set(password=None) would keep the password)
    return shown.render_as_string(hide_password=False)


def _place(settings: JournalSettings, schema: str | None = None) -> str:
    """Where lagompy's tables are, for messages: the database without its password, and on
    PostgreSQL the schema (``schema``, else the configured one)."""
    schema = schema or settings.postgres_schema
    url = _shown_url(settings)
    if schema and dialect_of(normalize_url(settings.url)) == "postgresql":
        return f"{url} (schema {schema})"
    return url


def migrate_command(settings: JournalSettings) -> str:
    """The ``lagompy migrate`` command line for these settings, without the password."""
    words = ["lagompy", "migrate", "--url", _shown_url(settings)]
    if settings.postgres_schema and dialect_of(normalize_url(settings.url)) == "postgresql":
        words += ["--schema", settings.postgres_schema]
    return shlex.join(words)


def upgrade_sql(settings: JournalSettings, revision: str = "head") -> str:
    """The SQL that upgrades an empty database (or from ``"start:end"``) to ``revision``, for
    a DBA to review or run; no connection is opened."""
    from alembic import command

    dialect = dialect_of(normalize_url(settings.url))
    buffer = io.StringIO()
    config = alembic_config(
        dialect=dialect, postgres_schema=settings.postgres_schema, output_buffer=buffer
    )
    with _alembic_errors("writing the migration SQL"):
        command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


def each_database(
    settings: JournalSettings, only: str | None = None
) -> list[tuple[str, JournalSettings]]:
    """(name, settings of that one database) of every database of the journal, the home one
    (``"home"``) first, then those of ``JournalSettings.databases``; ``only``: that one."""
    names = ["home", *settings.databases]
    if only is not None:
        if only not in names:
            raise ConfigurationError(
                f"the journal has no database named {only!r} (it has: {', '.join(names)})"
            )
        names = [only]
    return [(name, settings.placed_on("" if name == "home" else name)) for name in names]
