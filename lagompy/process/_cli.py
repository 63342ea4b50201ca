"""``lagompy process-managers``: status and operations of process managers.

Their positions, leases and pause flags are rows of the read sides' offset table named
``process:<name>`` (states and timers beside them), so the options are those of ``lagompy
projections``::

    lagompy process-managers status [MANAGER] [--json]
    lagompy process-managers pause MANAGER [--tag TAG]
    lagompy process-managers resume MANAGER [--tag TAG]
    lagompy process-managers skip MANAGER [--tag TAG]

On a journal placed on several databases (``LAGOMPY_JOURNAL_DATABASES``) a manager has one
partition per (tag, database): ``status`` lists each (with its ``database`` and its lag against
it) and ``--tag`` takes a partition key, ``TAG`` (the home database's) or ``TAG@DATABASE``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lagompy.readside._cli import (
    JournalSchemaOption,
    JournalUrlOption,
    SchemaOption,
    TagOption,
    UrlOption,
    _run,
    format_status,
)

if TYPE_CHECKING:
    from lagompy.process._store import ProcessStore
    from lagompy.readside._projections import Projections

__all__ = ["register_cli"]

ManagerArg = Annotated[str, typer.Argument(help="The process manager's name.")]


def _store(p: Projections, manager: str) -> ProcessStore:
    """The manager's states and timers, to count and drop (nothing to decode)."""
    from lagompy.process._store import ProcessStore
    from lagompy.serialization import Serializer

    return ProcessStore(p.projection, manager, Serializer())


def status(
    manager: Annotated[
        str | None, typer.Argument(help="Only this process manager.", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Show process managers' partitions: state, position, lag, owner, failure, keys and
    pending timers."""
    from lagompy.process._manager import PREFIX

    async def action(p: Projections) -> list[dict[str, Any]]:
        rows = []
        counts: dict[str, dict[str, tuple[int, int]]] = {}
        for s in await p.status():
            if not s.processor.startswith(PREFIX):
                continue
            name = s.processor.removeprefix(PREFIX)
            if manager is not None and name != manager:
                continue
            if name not in counts:
                counts[name] = await _store(p, name).counts()
            keys, timers = counts[name].get(s.tag, (0, 0))
            rows.append({"status": s, "active_keys": keys, "pending_timers": timers})
        return rows

    rows = _run(url, schema, journal_url, journal_schema, action)
    if as_json:
        out = []
        for r in rows:
            d = r["status"].to_dict()
            d["manager"] = d.pop("processor").removeprefix(PREFIX)
            out.append(
                {**d, "active_keys": r["active_keys"], "pending_timers": r["pending_timers"]}
            )
        typer.echo(json.dumps(out, indent=2))
    elif not rows:
        typer.echo("no process managers here yet" if manager is None else f"no {manager!r} here")
    else:
        typer.echo(format_status([r["status"] for r in rows]))
        for r in rows:
            s = r["status"]
            typer.echo(
                f"{s.processor} {s.tag}: {r['active_keys']} active keys, "
                f"{r['pending_timers']} pending timers"
            )


def _operate(
    verb: str,
    operation: str,
    manager: str,
    tag: str | None,
    urls: tuple[str | None, str | None, str | None, str | None],
) -> None:
    from lagompy.process._manager import offset_key
    from lagompy.process._store import drop_stopping_timers

    async def action(p: Projections) -> int:
        if operation == "skip":  # a partition stopped by a timer drops it
            await drop_stopping_timers(p.store, _store(p, manager), tag)
        n: int = await getattr(p, operation)(offset_key(manager), tag)
        return n

    n = _run(*urls, action, with_journal=False)
    typer.echo(f"{verb} process manager {manager!r} ({n} partition{'s' if n != 1 else ''})")


def pause(
    manager: ManagerArg,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Pause a process manager: neither events nor timers are handled (persisted)."""
    _operate("paused", "pause", manager, tag, (url, schema, journal_url, journal_schema))


def resume(
    manager: ManagerArg,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Resume a paused process manager; a partition stopped at an event or timer retries it."""
    _operate("resumed", "resume", manager, tag, (url, schema, journal_url, journal_schema))


def skip(
    manager: ManagerArg,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Move a failed partition past the event it is stopped at (or drop the timer)."""
    urls = (url, schema, journal_url, journal_schema)
    _operate("skipped what stopped", "skip", manager, tag, urls)


_HELP = (
    "Inspect and operate process managers: status, pause, resume, skip.\n\nTheir rows live in "
    "the database of their states (--url, default LAGOMPY_READSIDE_URL, else the journal's); "
    "lags use the journal (--journal-url; each database's, for a journal placed on several "
    "by LAGOMPY_JOURNAL_DATABASES)."
)


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy process-managers ...`` to ``app``."""
    sub = typer.Typer(
        help=_HELP, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}
    )
    sub.command("status")(status)
    sub.command("pause")(pause)
    sub.command("resume")(resume)
    sub.command("skip")(skip)
    app.add_typer(sub, name="process-managers")
