"""``lagompy journal``: operate the journal's databases.

::

    lagompy journal move-slices --slices 512-1023 --to b [--from home]

The journal's settings come from the environment as everywhere (``LAGOMPY_JOURNAL_URL``,
``LAGOMPY_JOURNAL_DATABASES``...), and they are the settings *after* the move: they place the
moved slices on ``--to``. The work is :func:`lagompy.journal._moving.move_slices`'s; this is its
command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lagompy.errors import ConfigurationError

if TYPE_CHECKING:
    from lagompy.settings import JournalSettings

__all__ = ["register_cli"]

#: Seconds between two progress lines of one step (the last line of a step always shows).
PROGRESS_EVERY = 1.0

_MOVE_HELP = (
    "Move slices of the journal from one of its databases to another.\n\n"
    "The journal's settings (LAGOMPY_JOURNAL_URL, LAGOMPY_JOURNAL_DATABASES...) must be the "
    "ones it will run with AFTER the move: they place the moved slices on --to. Every event of "
    "those slices (with new offsets, in the source's order), their snapshots, stored replies and "
    "deletions are copied to the target, one transaction per batch, verified, then deleted from "
    "the source. Consumers' positions on the target's partitions are set at its head.\n\n"
    "STOP EVERY WRITER (the services and shard hosts) first, let the read sides, topic "
    "producers, process managers and workflow executors catch up, and stop them too: the move "
    "refuses while one is behind or running, and stops (deleting nothing) if the source's events "
    "change meanwhile. Safe to run again: an interrupted move finishes, never copying an event "
    "twice. Migrate the target first (lagompy migrate). See docs/howto/add-a-database.md."
)


def _move_slices(
    slices: Annotated[
        str,
        typer.Option(
            "--slices", help="The slices to move: ranges first-last, comma-separated (512-1023)."
        ),
    ],
    to: Annotated[
        str, typer.Option("--to", help="The database that will hold them (a name in the settings).")
    ],
    source: Annotated[
        str,
        typer.Option(
            "--from", help="The database that holds them now ('home': the journal's url)."
        ),
    ] = "home",
    source_url: Annotated[
        str | None,
        typer.Option(
            "--from-url",
            help="The source's URL, when the settings no longer name it (it is being emptied).",
            show_default=False,
        ),
    ] = None,
    source_schema: Annotated[
        str | None,
        typer.Option("--from-schema", help="The source's PostgreSQL schema, with --from-url."),
    ] = None,
    projection_urls: Annotated[
        list[str] | None,
        typer.Option(
            "--projection-url",
            help=(
                "A database that holds consumers' positions (projections, topic producers, "
                "process managers...); repeat it for each (default: LAGOMPY_READSIDE_URL, else "
                "the journal's url)."
            ),
            show_default=False,
        ),
    ] = None,
    projection_schema: Annotated[
        str | None,
        typer.Option(
            "--projection-schema", help="The PostgreSQL schema of the --projection-url databases."
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="Events per transaction.", min=1)] = 1000,
) -> None:
    from lagompy.journal._moving import move_slices
    from lagompy.journal._placement import HOME
    from lagompy.settings import JournalSettings

    settings = JournalSettings()
    name = HOME if source == "home" else source
    from_settings = None
    if source_url is not None:
        _require_existing(source_url, "--from-url")
        from_settings = _one(settings, source_url, source_schema)
    elif name in settings.databases or name == HOME:
        _require_existing(settings.placed_on(name).url, "the source")
    projections = _projections(settings, projection_urls or [], projection_schema)
    for projection in projections:
        _require_existing(projection.url, "the projection database")
    import asyncio

    shown = _Progress()
    report = asyncio.run(
        move_slices(
            settings,
            slices,
            source=name,
            source_settings=from_settings,
            target=HOME if to == "home" else to,
            projections=projections,
            batch=batch,
            progress=shown,
        )
    )
    typer.echo(report.describe())


class _Progress:
    """Prints ``copied 1000/52000 events``, at most every :data:`PROGRESS_EVERY` seconds per
    step, and the last line of each step."""

    def __init__(self) -> None:
        self.shown = 0.0
        self.step = ""

    def __call__(self, step: str, done: int, total: int) -> None:
        now = time.monotonic()
        if step == self.step and done < total and now - self.shown < PROGRESS_EVERY:
            return
        self.step, self.shown = step, now
        verb = "copied" if step == "copy" else "deleted from the source"
        typer.echo(f"{verb} {done}/{total} events")


def _one(settings: JournalSettings, url: str, schema: str | None) -> JournalSettings:
    """``settings`` for the one database at ``url``."""
    # (A copy: a new instance would merge LAGOMPY_JOURNAL_DATABASES back in.)
    return settings.model_copy(update={"url": url, "postgres_schema": schema, "databases": {}})


def _projections(
    settings: JournalSettings, urls: list[str], schema: str | None
) -> list[JournalSettings]:
    """The projection databases' settings (none: the journal's home database)."""
    if not urls:
        from lagompy.readside._settings import ReadSideSettings

        readside = ReadSideSettings()
        if readside.url is None:
            return []
        urls, schema = [readside.url], schema or readside.postgres_schema
    return [_one(settings, url, schema) for url in urls]


def _require_existing(url: str, what: str) -> None:
    """Refuse a SQLite database file that does not exist (connecting would create it)."""
    from lagompy.sql._database import normalize_url

    parsed = normalize_url(url)
    database: Any = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return
    if not database.startswith("file:") and not Path(database).is_file():
        raise ConfigurationError(
            f"{what}: the SQLite database {database} does not exist; nothing was moved"
        )


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy journal move-slices`` to ``app``."""
    sub = typer.Typer(
        help="Operate the journal's databases (move slices between them).",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    sub.command("move-slices", help=_MOVE_HELP)(_move_slices)
    app.add_typer(sub, name="journal")
