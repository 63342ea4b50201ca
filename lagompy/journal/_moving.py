"""Move slices from one database of a journal to another (``lagompy journal move-slices``).

A journal placed on several databases (``JournalSettings.databases``, see ``_placement.py``)
keeps everything about an entity in its slice's database. Giving a slice to another database is
therefore a copy of every per-entity row of that slice (events, their tags, snapshots, stored
command replies, deletions) into the new database, then their deletion from the old one::

    report = await move_slices(settings, "512-1023", source=HOME, target="b")

``settings`` are the journal's settings *after* the move (the ones the writers will start with):
they must place the moved slices on ``target``, so the move and the new settings cannot
disagree. The steps, each safe to run again:

1. check: the names and slices are right; no consumer holds a lease on a partition the move
   touches (read sides are stopped) and each consumer's position on the source's partition of
   every tag the moved events carry is at the source's head for that tag (it applied every
   event that moves), and on the target's partition at the target's head (before the move);
2. copy the events in the source's offset order, a batch per target transaction, with new
   offsets allocated in that order; an event already in the target (same entity and sequence
   number: a move interrupted and run again) is skipped, never written twice. Then the
   snapshots, stored replies and deletions of the moved entities (a key already there is kept);
3. verify: every moved row of the source is in the target, the events in the same order, and
   neither the source's nor the target's events changed meanwhile (a writer still running:
   refused, nothing deleted);
4. positions: each consumer that follows a moved tag gets a position on the target's partition
   (``partition_key(tag, target)``) at the target's head for that tag, so it neither misses
   nor applies again the moved events;
5. delete the moved rows from the source, a batch per transaction.

An interrupted move leaves either the source whole (steps 1-4: run it again) or the target whole
and verified (step 5: run it again to finish the deletion). Writers must be stopped for the
whole move: the move checks what it can (the heads of both databases), not every process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Table, delete, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import ConfigurationError, JournalError
from lagompy.journal._model import now_us
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.journal._postgres import _LOCK_EVENTS
from lagompy.journal._slices import slice_of
from lagompy.settings import JournalSettings, parse_slice_ranges
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema

__all__ = ["DEFAULT_BATCH", "MAX_BATCH", "MoveReport", "Progress", "move_slices", "parse_slices"]

#: Events per copy (and per deletion) transaction.
DEFAULT_BATCH = 1000
#: The most events per transaction: a batch's lookups take three parameters per event, and
#: SQLite takes at most 32,766 in a statement.
MAX_BATCH = 10_000
#: Entities per transaction when copying or deleting snapshots, replies and deletions (and
#: per lookup: ``(type, id) IN (...)`` keeps its parameters under SQLite's limit).
_ENTITY_CHUNK = 400

_E = schema.events
_TAGS = schema.event_tags
_OFFSETS = schema.readside_offsets
#: The offset rows of a topic's groups and producers (``topic:<topic>:<group>``,
#: ``topic-producer:<topic>``): positions in the topic, not in a database's journal. (The
#: topic layer's ``GROUP_PREFIX`` and ``PRODUCER_PREFIX``, which the journal cannot import:
#: a test keeps them equal.)
_TOPIC_POSITIONS = ("topic:", "topic-producer:")
#: The per-entity tables besides the events, with their key columns.
_ENTITY_TABLES: tuple[tuple[Table, tuple[str, ...]], ...] = (
    (schema.snapshots, ("entity_type", "entity_id", "seq_nr")),
    (schema.command_replies, ("entity_type", "entity_id", "command_id")),
    (schema.deletions, ("entity_type", "entity_id")),
)

#: ``progress(step, done, total)``: ``step`` is ``"copy"`` or ``"delete"``, counts in events.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class MoveReport:
    """What a move did (a move run again counts only what it did this time)."""

    source: str
    target: str
    slices: tuple[int, ...]
    #: Events of the moved slices the source held when the move started.
    events: int
    #: Events copied by this run (``events`` less those a former run copied).
    copied: int
    #: Snapshots, stored replies and deletions of the moved entities this run wrote to the
    #: target (those an interrupted run copied already are counted, and kept).
    other_rows: int
    #: Events deleted from the source.
    deleted: int
    #: (consumer, partition, offset) of each position written on the target's partitions.
    positions: tuple[tuple[str, str, int], ...] = field(default=())

    def describe(self) -> str:
        """One line for the command line."""
        where = f"{_name(self.source)} to {_name(self.target)}"
        if not self.events and not self.deleted and not self.other_rows:
            return f"nothing to move from {where}: the source holds no row of these slices"
        return (
            f"moved {self.events} events of {len(self.slices)} slices from {where} "
            f"({self.copied} copied by this run, {self.other_rows} snapshots, replies and "
            f"deletions; {len(self.positions)} consumer positions set on the target)"
        )


def _name(database: str) -> str:
    return "home" if database == HOME else repr(database)


def parse_slices(slices: str | Iterable[int]) -> tuple[int, ...]:
    """The slice numbers of ``"512-1023"`` (or of an iterable of ints), sorted; a
    ``ConfigurationError`` names what is wrong."""
    if isinstance(slices, str):
        try:
            ranges = parse_slice_ranges(slices)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        numbers = {s for first, last in ranges for s in range(first, last + 1)}
    else:
        numbers = set()
        for s in slices:
            if type(s) is not int or not 0 <= s <= 1023:
                raise ConfigurationError(f"slices: {s!r} is not a slice number (0-1023)")
            numbers.add(s)
    if not numbers:
        raise ConfigurationError("slices: no slice given")
    return tuple(sorted(numbers))


def _check_placement(
    placement: Placement, slices: Sequence[int], source: str, target: str, *, given: bool
) -> None:
    """The databases exist and differ, and the settings (the placement after the move) put
    every moved slice on the target. The source may be a database the settings no longer name
    (one that is being emptied) when its settings are ``given``."""
    for role, name in (("source", source), ("target", target)):
        if name not in placement.names and not (role == "source" and given):
            known = ", ".join("home" if n == HOME else n for n in placement.names)
            raise ConfigurationError(
                f"the {role} {_name(name)} is not a database of the journal (it has: {known}); "
                "name it in JournalSettings.databases (LAGOMPY_JOURNAL_DATABASES)"
            )
    if source == target:
        raise ConfigurationError(f"the source and the target are both {_name(source)}")
    elsewhere = [s for s in slices if placement.owners[s] != target]
    if elsewhere:
        owner = placement.owners[elsewhere[0]]
        raise ConfigurationError(
            f"the settings place slice {elsewhere[0]} ({len(elsewhere)} of the slices to move) "
            f"on {placement.describe(owner)}, not on {placement.describe(target)}: run the move "
            "with the settings the journal will have after it (the moved slices on the target)"
        )


# --------------------------------------------------------------------------- database flavours


class _Flavour(Protocol):
    """What differs per database when rows are copied into it."""

    def insert(self, table: Table) -> Any:
        """An INSERT that supports ``on_conflict_do_nothing``."""
        ...

    async def begin_append(self, conn: AsyncConnection) -> None:
        """The first statement of a transaction that appends events (the ordering fence)."""
        ...

    async def allocate(self, conn: AsyncConnection, count: int) -> list[int]:
        """``count`` new offsets, increasing, never used before."""
        ...


class _SqliteFlavour:
    """Writers take turns (``BEGIN IMMEDIATE``); offsets continue AUTOINCREMENT's counter."""

    _LAST = text(
        "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'lagompy_events'), 0),"
        " COALESCE((SELECT max(global_offset) FROM lagompy_events), 0))"
    )

    def insert(self, table: Table) -> Any:
        return sqlite.insert(table)

    async def begin_append(self, conn: AsyncConnection) -> None:
        return None

    async def allocate(self, conn: AsyncConnection, count: int) -> list[int]:
        last = int((await conn.execute(self._LAST)).scalar_one())
        return list(range(last + 1, last + 1 + count))


class _PostgresFlavour:
    """The journal's fence first (its marker keeps tailers from reading past a write in
    flight), then offsets from the events' sequence, in order."""

    _ALLOCATE = text(
        "SELECT array_agg(o ORDER BY o) FROM (SELECT nextval(pg_get_serial_sequence("
        "'lagompy_events', 'global_offset')::regclass) AS o FROM generate_series(1, :n)) s"
    )

    def insert(self, table: Table) -> Any:
        return postgresql.insert(table)

    async def begin_append(self, conn: AsyncConnection) -> None:
        await conn.execute(text(_LOCK_EVENTS))

    async def allocate(self, conn: AsyncConnection, count: int) -> list[int]:
        return [int(o) for o in (await conn.execute(self._ALLOCATE, {"n": count})).scalar_one()]


def _flavour(database: Database) -> _Flavour:
    return _PostgresFlavour() if database.dialect == "postgresql" else _SqliteFlavour()


# --------------------------------------------------------------------------- the move


@dataclass
class _Move:
    """One move's databases and what it found; the steps are its methods."""

    source_name: str
    target_name: str
    slices: tuple[int, ...]
    source: Database
    target: Database
    #: The projection databases that hold consumers' positions.
    projections: Sequence[Database]
    batch: int
    progress: Progress | None
    flavour: _Flavour = field(init=False)
    owner: str = field(init=False)

    def __post_init__(self) -> None:
        self.flavour = _flavour(self.target)
        self.owner = f"move-slices:{socket.gethostname()}:{os.getpid()}"

    @property
    def _in_slices(self) -> Any:
        return _E.c.slice.in_(self.slices)

    # ------------------------------------------------------------ what is where

    async def _event_stats(self, database: Database) -> tuple[int, int, int]:
        """(events of the moved slices, highest offset, number of events) of ``database``."""
        async with database.read() as conn:
            moved = (await conn.execute(select(func.count()).where(self._in_slices))).scalar()
            top, count = (
                await conn.execute(select(func.max(_E.c.global_offset), func.count()))
            ).one()
        return int(moved or 0), int(top or 0), int(count or 0)

    async def _moved_tags(self) -> dict[str, int]:
        """The tags the source's moved events carry, each with the source's head for it."""
        async with self.source.read() as conn:
            carried = (
                select(_TAGS.c.tag)
                .join(_E, _E.c.global_offset == _TAGS.c.global_offset)
                .where(self._in_slices)
            )
            tags = sorted(set((await conn.execute(carried.distinct())).scalars()))
            heads: dict[str, int] = {}
            for chunk in _chunks(tags, _ENTITY_CHUNK):
                rows = await conn.execute(
                    select(_TAGS.c.tag, func.max(_TAGS.c.global_offset))
                    .where(_TAGS.c.tag.in_(chunk))
                    .group_by(_TAGS.c.tag)
                )
                heads.update((t, int(o)) for t, o in rows)
        return heads

    async def _target_heads(self, tags: Sequence[str], *, moved: bool) -> dict[str, int]:
        """The target's head for each tag: over every event (``moved``) or only the events of
        the slices it held before the move."""
        query = select(_TAGS.c.tag, func.max(_TAGS.c.global_offset)).group_by(_TAGS.c.tag)
        if not moved:
            query = query.join(_E, _E.c.global_offset == _TAGS.c.global_offset).where(
                _E.c.slice.not_in(self.slices)
            )
        heads: dict[str, int] = {}
        async with self.target.read() as conn:
            for chunk in _chunks(list(tags), _ENTITY_CHUNK):
                rows = await conn.execute(query.where(_TAGS.c.tag.in_(chunk)))
                heads.update((t, int(o)) for t, o in rows)
        return heads

    @staticmethod
    async def _positions(projection: Database, keys: Sequence[str]) -> list[Any]:
        """The consumers' rows of these partitions in a projection database. A topic's groups
        and producers are left out: their partitions are named by tags, but their positions
        are the topic's (on a placed journal, the relay log's, which a move leaves alone;
        the relays themselves are read sides of the journal, and are in)."""
        found: list[Any] = []
        async with projection.read() as conn:
            for chunk in _chunks(list(keys), _ENTITY_CHUNK):
                query = select(
                    _OFFSETS.c.processor,
                    _OFFSETS.c.tag,
                    _OFFSETS.c.last_offset,
                    _OFFSETS.c.owner,
                    _OFFSETS.c.lease_expires_us,
                ).where(
                    _OFFSETS.c.tag.in_(chunk),
                    *(
                        ~_OFFSETS.c.processor.startswith(p, autoescape=True)
                        for p in _TOPIC_POSITIONS
                    ),
                )
                found += (await conn.execute(query)).all()
        return found

    # ------------------------------------------------------------ 1. check

    async def check_consumers(self, heads: dict[str, int]) -> None:
        """Refuse while a consumer runs on a partition the move touches, or is behind on the
        source's or the target's partition of a moved tag; name them all."""
        before = await self._target_heads(list(heads), moved=False)
        source_keys = {partition_key(t, self.source_name): t for t in heads}
        target_keys = {partition_key(t, self.target_name): t for t in heads}
        running: list[str] = []
        behind: list[str] = []
        for projection in self.projections:
            rows = await self._positions(projection, [*source_keys, *target_keys])
            running += self._running(rows)
            behind += self._behind(rows, {**source_keys, **target_keys}, heads, before)
        if running:
            raise JournalError(
                f"consumers are running on partitions the move touches: {', '.join(running)}; "
                "stop every read side, topic producer, process manager and workflow executor "
                "of the journal, then run the move again"
            )
        if behind:
            raise JournalError(
                f"consumers are behind on partitions the move touches: {', '.join(behind)}; "
                "let them catch up (start them with the writers stopped), stop them, and run "
                "the move again"
            )

    @staticmethod
    def _running(rows: Sequence[Any]) -> list[str]:
        """The consumers (and partitions) among ``rows`` whose lease is held."""
        now = now_us()
        return sorted(
            f"{r.processor} on {r.tag}"
            for r in rows
            if r.owner is not None and r.lease_expires_us > now
        )

    def _behind(
        self,
        rows: Sequence[Any],
        tag_of_key: dict[str, str],
        heads: dict[str, int],
        before: dict[str, int],
    ) -> list[str]:
        """The consumers (partition, position, head) among ``rows`` of one projection
        database that did not apply every event of the source's or the target's partition of
        a tag they follow."""
        offsets = {(r.processor, r.tag): int(r.last_offset) for r in rows}
        # The tags each consumer follows: those it has a position for, on either side (one
        # with none has not started, and will start from the beginning on both).
        follows = {(r.processor, tag_of_key[r.tag]) for r in rows}
        behind = []
        for processor, tag in sorted(follows):
            for key, head in (
                (partition_key(tag, self.source_name), heads.get(tag, 0)),
                (partition_key(tag, self.target_name), before.get(tag, 0)),
            ):
                at = offsets.get((processor, key), 0)
                if at < head:
                    behind.append(f"{processor} on {key} (at {at} of {head})")
        return behind

    # ------------------------------------------------------------ 2. copy

    async def copy_events(self, total: int) -> int:
        """Copy the moved events in the source's offset order; returns how many were new.

        A run copies a prefix of the source's order, so a run after an interruption finds the
        events a former run copied at the start: it looks for them (a lookup that costs as much
        as the copy) until a batch finds none there, and then no more. The target's unique key
        on (entity, seq_nr) refuses a copy twice anyway."""
        after, done, copied = 0, 0, 0
        resuming = (await self._event_stats(self.target))[0] > 0
        while True:
            async with self.source.read() as conn:
                rows = (
                    await conn.execute(
                        select(_E)
                        .where(self._in_slices, _E.c.global_offset > after)
                        .order_by(_E.c.global_offset)
                        .limit(self.batch)
                    )
                ).all()
                if not rows:
                    return copied
                offsets = [r.global_offset for r in rows]
                tag_rows = (
                    await conn.execute(
                        select(_TAGS.c.global_offset, _TAGS.c.tag).where(
                            _TAGS.c.global_offset.in_(offsets)
                        )
                    )
                ).all()
            tags: dict[int, list[str]] = {}
            for offset, tag in tag_rows:
                tags.setdefault(offset, []).append(tag)
            new = await self._append(rows, tags, resuming)
            resuming = resuming and new < len(rows)
            copied += new
            after = offsets[-1]
            done += len(rows)
            if self.progress is not None:
                self.progress("copy", done, total)

    async def _append(self, rows: Sequence[Any], tags: dict[int, list[str]], resuming: bool) -> int:
        """One target transaction: the rows not there yet (``resuming``: look), with new
        offsets in their order."""
        keys = [(r.entity_type, r.entity_id, r.seq_nr) for r in rows]
        async with self.target.write() as conn:
            await self.flavour.begin_append(conn)
            present: set[tuple[Any, ...]] = set()
            if resuming:
                key_columns = (_E.c.entity_type, _E.c.entity_id, _E.c.seq_nr)
                query = select(*key_columns).where(tuple_(*key_columns).in_(keys))
                present = {tuple(k) for k in (await conn.execute(query)).all()}
            new = [r for r, k in zip(rows, keys, strict=True) if k not in present]
            if not new:
                return 0
            offsets = await self.flavour.allocate(conn, len(new))
            events = []
            tag_rows = []
            for offset, row in zip(offsets, new, strict=True):
                values = row._asdict()
                values["global_offset"] = offset
                events.append(values)
                tag_rows += [
                    {"tag": t, "global_offset": offset} for t in tags.get(row.global_offset, ())
                ]
            await conn.execute(_E.insert(), events)
            if tag_rows:
                await conn.execute(_TAGS.insert(), tag_rows)
        return len(new)

    async def moved_entities(self) -> list[tuple[str, str]]:
        """Every entity of the moved slices that has a row in the source's other per-entity
        tables (they have no slice column: every key is looked at)."""
        found: set[tuple[str, str]] = set()
        async with self.source.read() as conn:
            for table, _ in _ENTITY_TABLES:
                query = select(table.c.entity_type, table.c.entity_id).distinct()
                for entity_type, entity_id in await conn.execute(query):
                    if slice_of(entity_id) in self._slice_set:
                        found.add((entity_type, entity_id))
        return sorted(found)

    async def source_holds_any(self) -> bool:
        """Whether the source holds any row of the moved slices."""
        return bool((await self._event_stats(self.source))[0] or await self.moved_entities())

    @property
    def _slice_set(self) -> frozenset[int]:
        return frozenset(self.slices)

    async def copy_entity_rows(self, entities: Sequence[tuple[str, str]]) -> int:
        """Copy the snapshots, stored replies and deletions of ``entities``; a key already in
        the target is kept (copied by an interrupted run: writers are stopped, so the source's
        row is still the same)."""
        copied = 0
        for chunk in _chunks(list(entities), _ENTITY_CHUNK):
            async with self.source.read() as conn:
                found = {
                    table.name: [
                        r._asdict() for r in (await conn.execute(_of_entities(table, chunk))).all()
                    ]
                    for table, _ in _ENTITY_TABLES
                }
            async with self.target.write() as conn:
                for table, _ in _ENTITY_TABLES:
                    rows = found[table.name]
                    if not rows:
                        continue
                    insert = self.flavour.insert(table).on_conflict_do_nothing()
                    await conn.execute(insert, rows)
                    copied += len(rows)
        return copied

    # ------------------------------------------------------------ 3. verify

    async def verify(self, entities: Sequence[tuple[str, str]]) -> int:
        """Every moved row of the source is in the target, the events in the same order;
        returns the number of moved events in the target."""
        order = select(_E.c.entity_type, _E.c.entity_id, _E.c.seq_nr).where(self._in_slices)
        order = order.order_by(_E.c.global_offset)
        async with self.source.read() as conn:
            source = (await conn.execute(order)).all()
        async with self.target.read() as conn:
            target = (await conn.execute(order)).all()
        position = {tuple(k): n for n, k in enumerate(target)}
        last = -1
        for key in source:
            at = position.get(tuple(key))
            if at is None:
                raise JournalError(
                    f"the move is incomplete: event {key[2]} of {key[0]}/{key[1]} is not in "
                    f"{_name(self.target_name)} after the copy; nothing was deleted, run it again"
                )
            if at < last:
                raise JournalError(
                    f"the target {_name(self.target_name)} holds event {key[2]} of "
                    f"{key[0]}/{key[1]} out of the source's order: it was written there by "
                    "something other than this move; nothing was deleted"
                )
            last = at
        for chunk in _chunks(list(entities), _ENTITY_CHUNK):
            for table, key_columns in _ENTITY_TABLES:
                keys = select(*(table.c[c] for c in key_columns))
                async with self.source.read() as conn:
                    wanted = set((await conn.execute(_of_entities(table, chunk, keys))).all())
                async with self.target.read() as conn:
                    there = set((await conn.execute(_of_entities(table, chunk, keys))).all())
                missing = wanted - there
                if missing:
                    raise JournalError(
                        f"the move is incomplete: {len(missing)} rows of {table.name} are not "
                        f"in {_name(self.target_name)}; nothing was deleted, run it again"
                    )
        return len(target)

    # ------------------------------------------------------------ 4. positions

    async def write_positions(self, heads: dict[str, int]) -> tuple[tuple[str, str, int], ...]:
        """Each consumer that has a position on the source's partition of a moved tag gets
        one on the target's partition at the target's head for the tag (a later position is
        kept); the epoch moves on, so a worker that still believed it held the lease cannot
        commit there."""
        after = await self._target_heads(list(heads), moved=True)
        written: list[tuple[str, str, int]] = []
        for projection in self.projections:
            written += await self._write_positions(projection, heads, after)
        return tuple(written)

    async def _write_positions(
        self, projection: Database, heads: dict[str, int], after: dict[str, int]
    ) -> list[tuple[str, str, int]]:
        """:meth:`write_positions` in one projection database, one transaction."""
        source_keys = {partition_key(t, self.source_name): t for t in heads}
        rows = await self._positions(projection, list(source_keys))
        written: list[tuple[str, str, int]] = []
        now = now_us()
        async with projection.write() as conn:
            for r in sorted(rows, key=lambda r: (r.processor, r.tag)):
                tag = source_keys[r.tag]
                key = partition_key(tag, self.target_name)
                offset = after.get(tag, 0)
                mine = (_OFFSETS.c.processor == r.processor, _OFFSETS.c.tag == key)
                there = (await conn.execute(select(_OFFSETS.c.last_offset).where(*mine))).scalar()
                if there is None:
                    await conn.execute(
                        _OFFSETS.insert().values(_fresh_position(r.processor, key, offset, now))
                    )
                else:
                    offset = max(offset, int(there))
                    await conn.execute(
                        update(_OFFSETS)
                        .where(*mine)
                        .values(
                            last_offset=offset,
                            epoch=_OFFSETS.c.epoch + 1,
                            owner=self.owner,
                            lease_expires_us=0,
                            updated_us=now,
                        )
                    )
                written.append((r.processor, key, offset))
        return written

    # ------------------------------------------------------------ 5. delete

    async def delete_source(self, total: int, entities: Sequence[tuple[str, str]]) -> int:
        """Delete the moved rows from the source, a batch per transaction."""
        deleted, after = 0, 0
        while True:
            async with self.source.write() as conn:
                offsets = list(
                    (
                        await conn.execute(
                            select(_E.c.global_offset)
                            .where(self._in_slices, _E.c.global_offset > after)
                            .order_by(_E.c.global_offset)
                            .limit(self.batch)
                        )
                    ).scalars()
                )
                if not offsets:
                    break
                after = offsets[-1]
                await conn.execute(delete(_TAGS).where(_TAGS.c.global_offset.in_(offsets)))
                await conn.execute(delete(_E).where(_E.c.global_offset.in_(offsets)))
            deleted += len(offsets)
            if self.progress is not None:
                self.progress("delete", deleted, total)
        for chunk in _chunks(list(entities), _ENTITY_CHUNK):
            async with self.source.write() as conn:
                for table, _ in _ENTITY_TABLES:
                    pairs = tuple_(table.c.entity_type, table.c.entity_id).in_(chunk)
                    await conn.execute(delete(table).where(pairs))
        return deleted


def _fresh_position(processor: str, tag: str, offset: int, now: int) -> dict[str, Any]:
    """A consumer's row as a read side creates it (no lease, not paused), at ``offset``."""
    return {
        "processor": processor,
        "tag": tag,
        "last_offset": offset,
        "owner": None,
        "epoch": 0,
        "lease_expires_us": 0,
        "paused": False,
        "state": "idle",
        "events_per_s": 0.0,
        "updated_us": now,
        "skipped": 0,
    }


def _of_entities(table: Table, entities: Sequence[tuple[str, str]], query: Any = None) -> Any:
    """``query`` (default: every column of ``table``) for the rows of ``entities``."""
    query = select(table) if query is None else query
    return query.where(tuple_(table.c.entity_type, table.c.entity_id).in_(entities))


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def move_slices(
    settings: JournalSettings,
    slices: str | Iterable[int],
    *,
    target: str,
    source: str = HOME,
    source_settings: JournalSettings | None = None,
    projections: Sequence[JournalSettings] = (),
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> MoveReport:
    """Move ``slices`` (``"512-1023"``, or slice numbers) of the journal from database
    ``source`` (default: the home one) to ``target`` (see the module's docstring).

    ``settings`` are the journal's settings after the move: they must place the slices on
    ``target``. A source they no longer name (a database being emptied: its last slices move)
    needs ``source_settings``, the settings of that one database. ``projections`` are the
    databases that hold the consumers' positions (default: the home database): each has its
    consumers checked and their positions written.
    Stop every writer and every consumer of the journal first. Run again after an
    interruption: it finishes the move, never writes an event twice.
    """
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigurationError(f"batch must be from 1 to {MAX_BATCH} events, got {batch}")
    numbers = parse_slices(slices)
    placement = Placement.of(settings)
    _check_placement(placement, numbers, source, target, given=source_settings is not None)
    if source_settings is not None and source_settings.databases:
        raise ConfigurationError("source_settings name one database: give it no databases")
    databases: list[Database] = []
    try:
        for one in (
            source_settings or placement.settings_of(source),
            placement.settings_of(target),
            *(projections or [placement.settings_of(HOME)]),
        ):
            database = Database.create(one)
            databases.append(database)
            await ensure_schema(database)
        source_db, target_db, *projection_dbs = databases
        move = _Move(source, target, numbers, source_db, target_db, projection_dbs, batch, progress)
        if not await move.source_holds_any():
            await _check_not_elsewhere(move, placement)
        return await _run(move)
    finally:
        for database in databases:
            await database.dispose()


async def _check_not_elsewhere(move: _Move, placement: Placement) -> None:
    """The source holds nothing of the slices: a move already done (the target holds them, or
    no database does), or the wrong source, which is refused naming the database that holds
    them."""
    if (await move._event_stats(move.target))[0]:
        return
    for name in placement.names:
        if name in (move.source_name, move.target_name):
            continue
        database = Database.create(placement.settings_of(name))
        try:
            await ensure_schema(database)
            async with database.read() as conn:
                found = (
                    await conn.execute(
                        select(_E.c.slice).where(_E.c.slice.in_(move.slices)).limit(1)
                    )
                ).scalar()
        finally:
            await database.dispose()
        if found is not None:
            raise ConfigurationError(
                f"the slices are not on the source {_name(move.source_name)}: slice {found} "
                f"is on {placement.describe(name)} (move it with --from "
                f"{name or 'home'}); nothing was moved"
            )


async def _run(move: _Move) -> MoveReport:
    events, source_top, source_count = await move._event_stats(move.source)
    positions: tuple[tuple[str, str, int], ...] = ()
    copied = 0
    if events:
        heads = await move._moved_tags()
        await move.check_consumers(heads)
        target_count = (await move._event_stats(move.target))[2]
        copied = await move.copy_events(events)
    entities = await move.moved_entities()
    other_rows = await move.copy_entity_rows(entities)
    in_target = await move.verify(entities)
    if events:
        if (await move._event_stats(move.source))[1:] != (source_top, source_count):
            raise JournalError(
                f"the events of the source {_name(move.source_name)} changed during the move: "
                "a writer is running; stop every writer of the journal and run the move again "
                "(nothing was deleted)"
            )
        if (await move._event_stats(move.target))[2] != target_count + copied:
            raise JournalError(
                f"the events of the target {_name(move.target_name)} changed during the move: "
                "a writer is running; stop every writer of the journal and run the move again "
                "(nothing was deleted from the source)"
            )
        positions = await move.write_positions(await move._moved_tags())
    deleted = await move.delete_source(in_target, entities)
    return MoveReport(
        source=move.source_name,
        target=move.target_name,
        slices=move.slices,
        events=events,
        copied=copied,
        other_rows=other_rows,
        deleted=deleted,
        positions=positions,
    )
