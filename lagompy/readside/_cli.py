"""``lagompy projections``: status, pause, resume, rebuild and set-offset of read sides.

Every command works on the projection database (``--url``, default ``LAGOMPY_READSIDE_URL``, else
the journal's database) and, for lag and rebuilds, on the journal (``--journal-url``, default
``LAGOMPY_JOURNAL_URL``, else ``sqlite:///lagompy.db``)::

    lagompy projections status [PROCESSOR] [--json]
    lagompy projections pause PROCESSOR [--tag TAG]
    lagompy projections resume PROCESSOR [--tag TAG]
    lagompy projections skip PROCESSOR [--tag TAG]
    lagompy projections set-offset PROCESSOR TAG OFFSET [--force]
    lagompy projections rebuild package.module:ProcessorClass [--yes]
    lagompy projections parked [PROCESSOR] [--tag T] [--error CLASS] [--entity TYPE[/ID]] [--json]
    lagompy projections retry PROCESSOR [--id N ...] [--tag T] [--error CLASS] [--entity E]
    lagompy projections discard PROCESSOR [--id N ...] [--tag T] [--error CLASS] [--entity E]

A SQLite database named by ``--url`` or ``--journal-url`` (or their defaults) that does not
exist is refused (one ``error:`` line), never created.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from lagompy.errors import ConfigurationError

if TYPE_CHECKING:
    from lagompy.readside._parked import ParkedEvent, ParkedFilter
    from lagompy.readside._projections import ConsumerMember, Projections, WorkerStatus

__all__ = ["format_parked", "format_status", "parked_filter", "register_cli"]

T = TypeVar("T")

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Projection database URL (default: LAGOMPY_READSIDE_URL, else the journal's).",
        show_default=False,
    ),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema", help="PostgreSQL schema of the projection database.", show_default=False
    ),
]
JournalUrlOption = Annotated[
    str | None,
    typer.Option(
        "--journal-url",
        help="Journal database URL (default: LAGOMPY_JOURNAL_URL, else sqlite:///lagompy.db).",
        show_default=False,
    ),
]
JournalSchemaOption = Annotated[
    str | None,
    typer.Option("--journal-schema", help="PostgreSQL schema of the journal.", show_default=False),
]
TagOption = Annotated[
    str | None,
    typer.Option(
        "--tag",
        help="Only this tag (default: every tag); on a journal placed on several databases, "
        "one partition: TAG (the home database's) or TAG@DATABASE.",
        show_default=False,
    ),
]


def _run(
    url: str | None,
    schema: str | None,
    journal_url: str | None,
    journal_schema: str | None,
    action: Callable[[Projections], Awaitable[T]],
    *,
    with_journal: bool = True,
) -> T:
    from lagompy.readside._projections import open_projections
    from lagompy.readside._settings import ReadSideSettings
    from lagompy.settings import JournalSettings

    journal: dict[str, Any] = {"url": journal_url, "postgres_schema": journal_schema}
    readside: dict[str, Any] = {"url": url, "postgres_schema": schema}
    journal_settings = JournalSettings(**{k: v for k, v in journal.items() if v is not None})
    settings = ReadSideSettings(**{k: v for k, v in readside.items() if v is not None})
    # An operator's typo must not leave an empty database behind (SQLite creates a missing
    # file on first connect) nor report an empty one as "no read-side processors yet".
    if settings.url is not None:
        _require_existing(settings.url, "projection", "--url or LAGOMPY_READSIDE_URL")
    if with_journal or settings.url is None:  # (the journal's is the projection database)
        _require_existing(journal_settings.url, "journal", "--journal-url or LAGOMPY_JOURNAL_URL")

    import asyncio

    async def main() -> T:
        async with await open_projections(
            journal_settings=journal_settings, settings=settings, with_journal=with_journal
        ) as projections:
            return await action(projections)

    return asyncio.run(main())


def _require_existing(url: str, what: str, option: str) -> None:
    """Refuse a SQLite database file that does not exist."""
    from lagompy.sql._database import normalize_url

    parsed = normalize_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return
    if database.startswith("file:"):
        return
    if not Path(database).is_file():
        raise ConfigurationError(
            f"the {what} database {database} does not exist (check {option}); nothing was created"
        )


def format_status(statuses: list[WorkerStatus]) -> str:
    """The status as an aligned text table, one line per (processor, tag), failures below.
    STATE is ``failed`` (stopped by an event it could not get past), ``paused`` (by an
    operator; ``failed,paused`` when both), ``stalled``, ``stopped``, ``running``..."""
    header = (
        "PROCESSOR",
        "TAG",
        "STATE",
        "OFFSET",
        "LAG",
        "LAG S",
        "EVENTS/S",
        "SKIPPED",
        "PARKED",
        "OWNER",
    )
    rows = [
        (
            s.processor,
            s.tag,
            s.state if not s.paused or s.state == "paused" else f"{s.state},paused",
            str(s.offset),
            "-" if s.lag_events is None else str(s.lag_events),
            "-" if s.lag_seconds is None else f"{s.lag_seconds:.3f}",
            f"{s.events_per_s:.1f}",
            str(s.skipped),
            str(s.parked),
            s.owner or "-",
        )
        for s in statuses
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    for s in statuses:
        f = s.failure
        if f is not None:
            label = s.state if s.state in ("failed", "stalled") else "last failure"
            lines.append(f"{s.processor} {s.tag} {label}: {f.error}")
    return "\n".join(lines)


def format_members(members: list[ConsumerMember]) -> str:
    """The live members of the processors (the processes running them), one line each, with
    the tags each holds."""
    lines = ["", "MEMBERS"]
    for m in members:
        tags = ", ".join(m.tags) or "(none yet)"
        lines.append(f"{m.processor}  {m.member}  holds {tags}")
    return "\n".join(lines)


def status(
    processor: Annotated[
        str | None, typer.Argument(help="Only this processor.", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Show every processor and tag: state, offset, lag in events and seconds, events/s."""

    async def action(p: Projections) -> tuple[list[WorkerStatus], list[ConsumerMember]]:
        return await p.status(processor), await p.members(processor)

    statuses, members = _run(url, schema, journal_url, journal_schema, action)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
    elif not statuses:
        typer.echo("no read-side processors yet")
    else:
        typer.echo(format_status(statuses))
        if members:
            typer.echo(format_members(members))


def pause(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Pause a processor's workers (persisted: it stays paused across restarts)."""

    async def action(p: Projections) -> int:
        return await p.pause(processor, tag)

    n = _run(url, schema, journal_url, journal_schema, action, with_journal=False)
    typer.echo(f"paused {processor} ({n} tag{'s' if n != 1 else ''})")


def resume(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Resume a paused processor; a worker stopped by a failing event (failed) retries it."""

    async def action(p: Projections) -> int:
        return await p.resume(processor, tag)

    n = _run(url, schema, journal_url, journal_schema, action, with_journal=False)
    typer.echo(f"resumed {processor} ({n} tag{'s' if n != 1 else ''})")


def skip(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Move a failed processor past the event it is stopped at, without its writes (counted
    as skipped); its worker goes on after it."""

    async def action(p: Projections) -> int:
        return await p.skip(processor, tag)

    n = _run(url, schema, journal_url, journal_schema, action, with_journal=False)
    typer.echo(f"skipped the failing event of {processor} ({n} tag{'s' if n != 1 else ''})")


def set_offset(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    tag: Annotated[
        str,
        typer.Argument(help="The tag (TAG@DATABASE: its partition on another database)."),
    ],
    offset: Annotated[int, typer.Argument(help="Resume after this offset (0: from the start).")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Accept an offset beyond the tag's head in the journal (the lag shows "
            "negative until the journal gets there).",
        ),
    ] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Make a processor's tag resume after OFFSET; its running worker loses its lease. An
    offset beyond the tag's head in the journal is refused unless --force."""

    async def action(p: Projections) -> None:
        await p.set_offset(processor, tag, offset, force=force)

    _run(url, schema, journal_url, journal_schema, action, with_journal=not force)
    typer.echo(f"{processor} {tag}: resumes after offset {offset}")


def _processor_class(path: str) -> Any:
    from lagompy.readside._processor import SqlReadSideProcessor
    from lagompy.runtime._loading import resolve_class

    if ":" not in path:
        raise ConfigurationError(
            f"name the processor class as package.module:ClassName, got {path!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules beside the caller
    cls = resolve_class(path)
    if not (isinstance(cls, type) and issubclass(cls, SqlReadSideProcessor)):
        raise ConfigurationError(f"{path} is not a SqlReadSideProcessor subclass")
    return cls


def rebuild(
    processor: Annotated[
        str, typer.Argument(help="The processor class, as package.module:ClassName.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Empty a projection (its reset hook) and replay every event of its tags, with a progress
    bar. Running workers are fenced off meanwhile and go on live afterwards."""
    cls = _processor_class(processor)
    if not yes:
        typer.confirm(f"Empty projection {cls.name!r} and replay every event?", abort=True)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from lagompy.journal._storage import open_placed_storage
    from lagompy.readside._processor import serializer_for_processors

    instance = cls()

    async def action(p: Projections) -> int:
        settings = p.journal_settings
        assert settings is not None
        serializer = serializer_for_processors([instance])
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(f"rebuilding {cls.name}", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            async with await open_placed_storage(
                settings=settings, serializer=serializer
            ) as storage:
                return await p.rebuild(instance, journal=storage, progress=progress)

    n = _run(url, schema, journal_url, journal_schema, action)
    typer.echo(f"rebuilt {cls.name} from {n} events")


# --------------------------------------------------------------------------- parked events

ErrorOption = Annotated[
    str | None,
    typer.Option("--error", help="Only this error class (e.g. ValueError).", show_default=False),
]
EntityOption = Annotated[
    str | None,
    typer.Option("--entity", help="Only this entity type, or TYPE/ID.", show_default=False),
]
IdsOption = Annotated[
    list[int] | None,
    typer.Option("--id", help="Only this parked event (repeat for several).", show_default=False),
]
LimitOption = Annotated[
    int, typer.Option("--limit", help="Show at most this many.", min=1, max=1000)
]


def parked_filter(
    consumer: str | None,
    tag: str | None,
    error: str | None,
    entity: str | None,
    ids: list[int] | None = None,
    *,
    kind: str | None = None,
) -> ParkedFilter:
    from lagompy.readside._parked import ParkedFilter

    return ParkedFilter(
        consumer=consumer,
        tag=tag,
        error_class=error,
        entity=entity,
        ids=tuple(ids) if ids else None,
        kind=kind,
    )


def format_parked(rows: list[ParkedEvent], total: int) -> str:
    """Parked events as an aligned text table, the error of each below it."""
    header = ("ID", "PROCESSOR", "TAG", "OFFSET", "ENTITY", "SEQ", "ERROR CLASS", "TRIES", "PARKED")
    lines_ = [
        (
            str(r.id),
            r.consumer,
            r.tag,
            str(r.offset),
            f"{r.entity_type}/{r.entity_id}",
            "-" if r.seq_nr is None else str(r.seq_nr),
            r.error_class,
            f"{r.attempts}+{r.retries}" + (" retry asked" if r.retry_requested else ""),
            r.parked_at.isoformat(timespec="seconds"),
        )
        for r in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines_]) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *lines_]
    ]
    out += [f"{r.id}: {r.error}" for r in rows]
    if total > len(rows):
        out.append(f"({len(rows)} of {total} shown: narrow the filter, or raise --limit)")
    return "\n".join(out)


def parked(
    processor: Annotated[
        str | None, typer.Argument(help="Only this processor.", show_default=False)
    ] = None,
    tag: TagOption = None,
    error: ErrorOption = None,
    entity: EntityOption = None,
    limit: LimitOption = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """List the events read sides parked (on_failure park): the oldest first."""
    which = parked_filter(processor, tag, error, entity, kind="read-side")
    show_parked(which, limit, as_json, (url, schema, journal_url, journal_schema))


def show_parked(
    which: ParkedFilter,
    limit: int,
    as_json: bool,
    urls: tuple[str | None, str | None, str | None, str | None],
) -> None:
    async def action(p: Projections) -> tuple[list[ParkedEvent], int]:
        return await p.parked(which, limit=limit), await p.count_parked(which)

    rows, total = _run(*urls, action, with_journal=False)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    elif not rows:
        typer.echo("no parked events")
    else:
        typer.echo(format_parked(rows, total))


def operate_parked(
    operation: str,
    which: ParkedFilter,
    urls: tuple[str | None, str | None, str | None, str | None],
) -> int:
    """Run ``Projections.<operation>`` (``retry_parked`` or ``discard_parked``) on ``which``."""

    async def action(p: Projections) -> int:
        n: int = await getattr(p, operation)(which)
        return n

    return _run(*urls, action, with_journal=False)


def retry(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    ids: IdsOption = None,
    tag: TagOption = None,
    error: ErrorOption = None,
    entity: EntityOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Retry a processor's parked events (all, or those --id / the filters name): its running
    worker handles each again within renew_interval, out of order, and deletes it once
    handled; one that fails again stays parked with the new error."""
    which = parked_filter(processor, tag, error, entity, ids, kind="read-side")
    n = operate_parked("retry_parked", which, (url, schema, journal_url, journal_schema))
    typer.echo(f"asked for a retry of {n} parked event{'s' if n != 1 else ''} of {processor}")


def discard(
    processor: Annotated[str, typer.Argument(help="The processor's name.")],
    ids: IdsOption = None,
    tag: TagOption = None,
    error: ErrorOption = None,
    entity: EntityOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Delete a processor's parked events (all, or those --id / the filters name) for good."""
    which = parked_filter(processor, tag, error, entity, ids, kind="read-side")
    if not yes:
        typer.confirm(f"Discard the parked events of {processor} ({which.describe()})?", abort=True)
    n = operate_parked("discard_parked", which, (url, schema, journal_url, journal_schema))
    typer.echo(f"discarded {n} parked event{'s' if n != 1 else ''} of {processor}")


_HELP = (
    "Inspect and operate read-side processors: status, pause, resume, rebuild, set-offset, "
    "parked events (parked, retry, discard).\n\n"
    "Offsets, leases and pause flags live in the projection database (--url, default "
    "LAGOMPY_READSIDE_URL, else the journal's); the lag is measured against the journal "
    "(--journal-url, default LAGOMPY_JOURNAL_URL)."
)


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy projections ...`` to ``app``."""
    sub = typer.Typer(
        help=_HELP, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}
    )
    sub.command("status")(status)
    sub.command("pause")(pause)
    sub.command("resume")(resume)
    sub.command("skip")(skip)
    sub.command("rebuild")(rebuild)
    sub.command("set-offset")(set_offset)
    sub.command("parked")(parked)
    sub.command("retry")(retry)
    sub.command("discard")(discard)
    app.add_typer(sub, name="projections")
