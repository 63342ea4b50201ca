"""``lagompy migrate`` and ``lagompy migrate current``, over :mod:`lagompy.sql._migrate`.

Kept apart from the migrations so that ``lagompy --help`` (which imports every command module)
does not import SQLAlchemy, Alembic or pydantic: the commands import them when they run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from lagompy.settings import JournalSettings
    from lagompy.sql._database import Database

__all__ = ["register_cli"]

T = TypeVar("T")


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Database URL (default: LAGOMPY_JOURNAL_URL, else sqlite:///lagompy.db).",
        show_default=False,
    ),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema",
        help="PostgreSQL schema of lagompy's tables (default: LAGOMPY_JOURNAL_POSTGRES_SCHEMA).",
        show_default=False,
    ),
]


DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        help=(
            "Only this database of a journal placed on several ('home', or a name in "
            "LAGOMPY_JOURNAL_DATABASES; default: every one, home first)."
        ),
        show_default=False,
    ),
]


def _settings(url: str | None, schema: str | None) -> JournalSettings:
    from lagompy.settings import JournalSettings

    given: dict[str, Any] = {"url": url, "postgres_schema": schema}
    return JournalSettings(**{k: v for k, v in given.items() if v is not None})


def _under(name: str, several: bool, line: str) -> str:
    """``line`` as the command prints it for database ``name`` (its name first when the
    journal has several)."""
    return f"{name}: {line}" if several else line


async def _with_database(
    settings: JournalSettings, action: Callable[[Database], Awaitable[T]]
) -> T:
    from lagompy.sql._database import Database

    database = Database.create(settings)
    try:
        return await action(database)
    finally:
        await database.dispose()


async def _current_schema(database: Database) -> str | None:
    """The PostgreSQL schema lagompy's tables are in (the first of the search path when no
    schema is configured); None on SQLite."""
    if database.dialect != "postgresql":
        return None
    from sqlalchemy import text

    async with database.read() as conn:
        schema = await conn.scalar(text("SELECT current_schema()"))
    return None if schema is None else str(schema)


def _migrate(
    ctx: typer.Context,
    url: UrlOption = None,
    schema: SchemaOption = None,
    database: DatabaseOption = None,
    revision: Annotated[
        str, typer.Option("--revision", "-r", help="Revision to upgrade to.")
    ] = "head",
    sql: Annotated[
        bool,
        typer.Option("--sql", help="Print the SQL instead of running it (nothing is connected)."),
    ] = False,
) -> None:
    """Create or upgrade lagompy's tables (see _MIGRATE_HELP)."""
    ctx.obj = {"url": url, "schema": schema, "database": database}
    if ctx.invoked_subcommand is not None:
        return
    from lagompy.sql._migrate import _place, each_database, upgrade, upgrade_sql

    databases = each_database(_settings(url, schema), database)
    several = len(databases) > 1
    if sql:
        for name, settings in databases:
            if several:
                typer.echo(f"-- lagompy migrate: database {name} ({_place(settings)})")
            typer.echo(upgrade_sql(settings, revision), nl=False)
        return

    import asyncio

    # Home first, one at a time: a failure stops there, naming the database, and running the
    # command again finishes (an up-to-date database is left alone).
    for name, settings in databases:

        async def run(db: Database, settings: JournalSettings = settings) -> str:
            result = await upgrade(db, revision)
            where = _place(settings, await _current_schema(db))
            if not result.changed:
                return f"lagompy's tables in {where} are up to date at revision {result.after}"
            before = result.before or "none"
            return f"upgraded lagompy's tables in {where} from {before} to {result.after}"

        typer.echo(_under(name, several, asyncio.run(_with_database(settings, run))))


def _show_current(
    ctx: typer.Context,
    url: UrlOption = None,
    schema: SchemaOption = None,
    database: DatabaseOption = None,
) -> None:
    """Show the revision of lagompy's tables: '0001 (head)', or 'none' if never migrated
    (of each database of a journal placed on several)."""
    from lagompy.sql._migrate import current_revision, each_database, head_revision

    parent: dict[str, str | None] = (ctx.parent.obj if ctx.parent is not None else None) or {}
    databases = each_database(
        _settings(url or parent.get("url"), schema or parent.get("schema")),
        database or parent.get("database"),
    )

    async def run(db: Database) -> str:
        current = await current_revision(db)
        head = head_revision()
        if current == head:
            return f"{current} (head)"
        return f"{current or 'none'} (head is {head}: run lagompy migrate)"

    import asyncio

    for name, settings in databases:
        typer.echo(_under(name, len(databases) > 1, asyncio.run(_with_database(settings, run))))


_MIGRATE_HELP = (
    "Create or upgrade lagompy's tables to this version's newest revision.\n\n"
    "Run it once per deploy, before starting the processes; it is safe to run again and from "
    "several places at once. A journal placed on several databases (LAGOMPY_JOURNAL_DATABASES) "
    "has every one migrated, the home one first. SQLite journals migrate themselves when they "
    "open. "
    "'lagompy migrate current' shows the revision a database is at."
)


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy migrate`` (and ``lagompy migrate current``) to ``app``."""
    migrate_app = typer.Typer(
        help=_MIGRATE_HELP,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    migrate_app.callback(invoke_without_command=True)(_migrate)
    migrate_app.command("current")(_show_current)
    app.add_typer(migrate_app, name="migrate")
