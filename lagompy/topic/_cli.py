"""``lagompy topics``: status and operations of topic subscriber groups and broker producers.

Their positions, leases and pause flags are rows of the read sides' offset table (a group's in
the subscribing service's database, named ``topic:<topic>:<group>``; a NATS producer's in the
producing service's journal database, ``topic-producer:<topic>``), so the options are those of
``lagompy projections``::

    lagompy topics status [TOPIC] [--json]
    lagompy topics pause TOPIC [GROUP] [--tag TAG]       # no GROUP: the topic's producers
    lagompy topics resume TOPIC [GROUP] [--tag TAG]
    lagompy topics skip TOPIC GROUP [--tag TAG]
    lagompy topics reset TOPIC GROUP (--to-offset N | --to-time ISO) [--tag TAG]
    lagompy topics parked [TOPIC GROUP] [--tag TAG] [--error CLASS] [--entity TYPE[/ID]] [--json]
    lagompy topics retry TOPIC GROUP [--id N ...] [--tag TAG] [--error CLASS] [--entity E]
    lagompy topics discard TOPIC GROUP [--id N ...] [--tag TAG] [--error CLASS] [--entity E]

``reset --to-time`` finds each partition's offset in the producing service's journal
(``--journal-url``): the group then handles the messages written at or after that time. When
that journal is placed on several databases, the offset is the partition's in its relay log
(the home database's ``lagompy_topic_messages``, see ``_relay.py``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from lagompy.errors import ConfigurationError
from lagompy.readside._cli import (
    EntityOption,
    ErrorOption,
    IdsOption,
    JournalSchemaOption,
    JournalUrlOption,
    LimitOption,
    SchemaOption,
    TagOption,
    UrlOption,
    _run,
    format_status,
    operate_parked,
    parked_filter,
    show_parked,
)

if TYPE_CHECKING:
    from lagompy.readside._projections import Projections, WorkerStatus

__all__ = ["register_cli"]

TopicArg = Annotated[str, typer.Argument(help="The topic's name.")]


def _name(topic: str, group: str | None) -> str:
    # Imported here: lagompy.topic._subscriber loads SQLAlchemy and pydantic, which
    # `lagompy --help` does not need.
    from lagompy.topic._subscriber import offset_key, producer_key

    return offset_key(topic, group) if group is not None else producer_key(topic)


def _what(topic: str, group: str | None) -> str:
    return f"group {group!r} of topic {topic!r}" if group else f"the producers of topic {topic!r}"


def status(
    topic: Annotated[
        str | None, typer.Argument(help="Only this topic.", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Show groups' and producers' partitions: state, position, lag, owner, failure."""

    from lagompy.topic._subscriber import GROUP_PREFIX, PRODUCER_PREFIX

    async def action(p: Projections) -> list[WorkerStatus]:
        found = [
            s
            for s in await p.status()
            if s.processor.startswith((GROUP_PREFIX, PRODUCER_PREFIX))
            and (topic is None or s.processor.split(":")[1] == topic)
        ]
        return found

    statuses = _run(url, schema, journal_url, journal_schema, action)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
    elif not statuses:
        typer.echo("no topic subscriber groups or producers here yet")
    else:
        typer.echo(format_status(statuses))


GroupOrProducers = Annotated[
    str | None, typer.Argument(help="The group (none: the topic's producers).")
]


def _operate(
    verb: str,
    operation: str,
    topic: str,
    group: str | None,
    tag: str | None,
    urls: tuple[str | None, str | None, str | None, str | None],
) -> None:
    """Run ``Projections.<operation>`` on the rows of a group (or of a topic's producers);
    ``urls``: the commands' --url, --schema, --journal-url and --journal-schema."""

    async def action(p: Projections) -> int:
        n: int = await getattr(p, operation)(_name(topic, group), tag)
        return n

    n = _run(*urls, action, with_journal=False)
    typer.echo(f"{verb} {_what(topic, group)} ({n} partition{'s' if n != 1 else ''})")


def pause(
    topic: TopicArg,
    group: GroupOrProducers = None,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Pause a subscriber group, or a topic's producers (persisted across restarts)."""
    _operate("paused", "pause", topic, group, tag, (url, schema, journal_url, journal_schema))


def resume(
    topic: TopicArg,
    group: GroupOrProducers = None,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Resume a paused group or producers; a partition stopped at a message retries it."""
    _operate("resumed", "resume", topic, group, tag, (url, schema, journal_url, journal_schema))


def skip(
    topic: TopicArg,
    group: Annotated[str, typer.Argument(help="The group.")],
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Move a failed group's partition past the message it is stopped at."""
    urls = (url, schema, journal_url, journal_schema)
    _operate("skipped the failing message of", "skip", topic, group, tag, urls)


def reset(
    topic: TopicArg,
    group: Annotated[str, typer.Argument(help="The group.")],
    to_offset: Annotated[
        int | None,
        typer.Option("--to-offset", help="Handle the messages after this journal offset.", min=0),
    ] = None,
    to_time: Annotated[
        str | None,
        typer.Option(
            "--to-time",
            help="Handle the messages written at or after this time (ISO 8601 with a zone); "
            "needs the producing service's journal (--journal-url).",
        ),
    ] = None,
    tag: TagOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Move a group's position back (replay) or forward, on every partition or one (--tag).

    The workers holding the partitions lose their leases; the next resume from there."""
    if (to_offset is None) == (to_time is None):
        raise ConfigurationError("give exactly one of --to-offset and --to-time")
    when: datetime | None = None
    if to_time is not None:
        try:
            when = datetime.fromisoformat(to_time)
        except ValueError:
            raise ConfigurationError(f"--to-time must be ISO 8601, got {to_time!r}") from None
        if when.tzinfo is None:
            raise ConfigurationError(f"--to-time needs a zone (e.g. {to_time}Z), got {to_time!r}")
    name = _name(topic, group)

    async def action(p: Projections) -> list[tuple[str, int]]:
        from lagompy.topic._embedded import partition_position
        from lagompy.topic._relay import relay_position, relayed_partitions
        from lagompy.topic._topic import StartFrom

        every = [s.tag for s in await p.status(name)]
        tags = [t for t in every if tag is None or t == tag]
        if not tags:
            raise ConfigurationError(f"{_what(topic, group)} has no partition {tag!r}")
        # A producing journal placed on several databases relays the topic: its positions
        # are the relay log's (the partitions numbered by their tags' shard numbers).
        relayed = 0
        if when is not None:
            assert p.journal is not None
            relayed = await relayed_partitions(p.journal, topic)
        done = []
        for t in tags:
            if when is not None and relayed:
                assert p.journal is not None
                partition = _partition_of(t, every, relayed)
                offset = await relay_position(p.journal, topic, partition, when)
            elif when is not None:
                assert p.journal is not None
                offset = await partition_position(p.journal, t, StartFrom.at_time(when))
            else:
                assert to_offset is not None
                offset = to_offset
            await p.set_offset(name, t, offset, force=True)
            done.append((t, offset))
        return done

    done = _run(url, schema, journal_url, journal_schema, action, with_journal=when is not None)
    for t, offset in done:
        typer.echo(f"{_what(topic, group)}, partition {t}: resumes after offset {offset}")


def _partition_of(tag: str, tags: list[str], partitions: int) -> int:
    """The partition number of ``tag`` among a group's ``tags``: a sharded tag's shards are
    its name followed by 0, 1, 2... (``orders0``, ``orders1``)."""
    for i in range(partitions):
        suffix = str(i)
        name = tag[: -len(suffix)]
        if tag.endswith(suffix) and {f"{name}{j}" for j in range(partitions)} == set(tags):
            return i
    raise ConfigurationError(
        f"partition {tag!r} is not one of the {partitions} partitions the producing service "
        f"relays (its group has {', '.join(sorted(tags))})"
    )


def parked(
    topic: Annotated[
        str | None, typer.Argument(help="Only this topic.", show_default=False)
    ] = None,
    group: Annotated[
        str | None, typer.Argument(help="Only this group.", show_default=False)
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
    """List the messages subscriber groups parked (on_failure park): the oldest first."""
    if (topic is None) != (group is None):
        raise ConfigurationError("name both the topic and the group, or neither (every group)")
    which = parked_filter(
        None if group is None or topic is None else _name(topic, group),
        tag,
        error,
        entity,
        kind="subscriber",
    )
    urls = (url, schema, journal_url, journal_schema)
    show_parked(which, limit, as_json, urls)


def retry(
    topic: TopicArg,
    group: Annotated[str, typer.Argument(help="The group.")],
    ids: IdsOption = None,
    tag: TagOption = None,
    error: ErrorOption = None,
    entity: EntityOption = None,
    url: UrlOption = None,
    schema: SchemaOption = None,
    journal_url: JournalUrlOption = None,
    journal_schema: JournalSchemaOption = None,
) -> None:
    """Retry a group's parked messages (all, or those --id / the filters name): the worker of
    each partition handles the stored message again, out of order, and deletes it once
    handled; one that fails again stays parked with the new error."""
    which = parked_filter(_name(topic, group), tag, error, entity, ids, kind="subscriber")
    n = operate_parked("retry_parked", which, (url, schema, journal_url, journal_schema))
    typer.echo(
        f"asked for a retry of {n} parked message{'s' if n != 1 else ''} of {_what(topic, group)}"
    )


def discard(
    topic: TopicArg,
    group: Annotated[str, typer.Argument(help="The group.")],
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
    """Delete a group's parked messages (all, or those --id / the filters name) for good."""
    which = parked_filter(_name(topic, group), tag, error, entity, ids, kind="subscriber")
    if not yes:
        typer.confirm(f"Discard the parked messages of {_what(topic, group)}?", abort=True)
    n = operate_parked("discard_parked", which, (url, schema, journal_url, journal_schema))
    typer.echo(f"discarded {n} parked message{'s' if n != 1 else ''} of {_what(topic, group)}")


_HELP = (
    "Inspect and operate topic subscriber groups and broker producers: status, pause, resume, "
    "skip, reset, parked messages (parked, retry, discard).\n\nA group's rows live in its "
    "service's database (--url, default "
    "LAGOMPY_READSIDE_URL, else the journal's); a NATS producer's in the producing service's "
    "journal database; lags and --to-time use the producing journal (--journal-url)."
)


def register_cli(app: typer.Typer) -> None:
    """Add ``lagompy topics ...`` to ``app``."""
    sub = typer.Typer(
        help=_HELP, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}
    )
    sub.command("status")(status)
    sub.command("pause")(pause)
    sub.command("resume")(resume)
    sub.command("skip")(skip)
    sub.command("reset")(reset)
    sub.command("parked")(parked)
    sub.command("retry")(retry)
    sub.command("discard")(discard)
    app.add_typer(sub, name="topics")
