"""Read sides as a whole: their status (:class:`WorkerStatus`), the operations on them
(:class:`Projections`: pause, resume, skip, set an offset, rebuild, parked events) and the
workers of a process (:class:`ReadSide`, from :func:`start_readside`)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, select

from lagompy.closing import AsyncClosing, finish_tasks, opener
from lagompy.consumer import ConsumerStopped, EventConsumer, Membership, describe_taken
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import Journal, from_us, now_us
from lagompy.journal._placement import HOME, Placement
from lagompy.journal._storage import PlacedStorage, open_placed_storage
from lagompy.readside._parked import ParkedEvent, ParkedFilter, ParkedStore
from lagompy.readside._processor import (
    ProcessorArg,
    SqlReadSideProcessor,
    _instance,
    serializer_for_processors,
)
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import (
    ReadSideSettings,
    _journal_settings,
    _settings,
    projection_settings,
)
from lagompy.readside._store import (
    FAILED,
    GLOBAL_TAG,
    SET_OFFSET_OWNER,
    SKIP_OWNER,
    STALLED,
    OffsetRow,
    OffsetStore,
    check_offset,
    unknown_offsets,
)
from lagompy.readside._worker import (
    Partition,
    ReadSideWorker,
    default_owner,
    describe_error,
    membership_for,
    partitions_of,
    run_global_prepare,
)
from lagompy.serialization import Serializer
from lagompy.settings import JournalSettings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema

log = logging.getLogger("lagompy.readside")

__all__ = [
    "STUCK_STATES",
    "ConsumerMember",
    "Failure",
    "Projections",
    "ReadSide",
    "WorkerStatus",
    "open_projections",
    "start_readside",
]


@dataclass(frozen=True)
class Failure:
    """The failure line of a (processor, tag): the last event it could not get past (or the
    step it is stalled at), kept until the worker commits past ``offset``."""

    error: str
    #: The failing event's offset (for a stall: the offset the worker is stuck after).
    offset: int | None
    entity_type: str | None
    entity_id: str | None
    seq_nr: int | None
    attempts: int | None
    at: datetime | None


@dataclass(frozen=True)
class WorkerStatus:
    """One (processor, tag) as the projection database and the journal see it now."""

    processor: str
    tag: str
    #: ``failed`` (stopped by an event it could not get past, until resumed or skipped: see
    #: ``failure``), ``paused`` (by an operator), ``stalled`` (retrying something that keeps
    #: failing: see ``failure``), ``stopped`` (no worker holds the lease), or what the worker
    #: holding it does: ``running``, ``preparing``, ``retrying``, ``rebuilding``...
    state: str
    offset: int
    #: The highest offset of the tag in the journal (None: the journal was not consulted).
    head_offset: int | None
    #: Events of the tag not handled yet; negative when the offset was forced past the head.
    lag_events: int | None
    #: Age of the oldest event not handled yet (0 when caught up).
    lag_seconds: float | None
    #: An operator paused it (a failure does not set this: see ``state``).
    paused: bool
    owner: str | None
    epoch: int
    events_per_s: float
    skipped: int
    failure: Failure | None
    #: Events parked (``on_failure="park"``) and not retried or discarded yet.
    parked: int = 0
    #: The journal's database the partition follows: ``""`` (the home one, the only one of a
    #: journal on one database), else its name in ``JournalSettings.databases``; ``tag`` is
    #: then the partition's key, ``<tag>@<database>``.
    database: str = HOME

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.failure is not None and self.failure.at is not None:
            out["failure"]["at"] = self.failure.at.isoformat()
        return out


@dataclass(frozen=True)
class ConsumerMember:
    """One running instance (a process) of a processor, as it registered itself: the tags
    whose leases it holds now. With ``rebalance`` on (the default), the tags spread over the
    live members: see ``docs/readside.md``."""

    processor: str
    member: str
    joined: datetime
    #: Its last heartbeat; it counts as live until ``expires`` unless it beats again.
    heartbeat: datetime
    expires: datetime
    tags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor": self.processor,
            "member": self.member,
            "joined": self.joined.isoformat(),
            "heartbeat": self.heartbeat.isoformat(),
            "expires": self.expires.isoformat(),
            "tags": list(self.tags),
        }


def _state(row: OffsetRow) -> str:
    if row.state == FAILED:
        return FAILED
    if row.paused:
        return "paused"
    if row.state == STALLED:
        return STALLED
    if not row.leased:
        return "stopped"
    return row.state


#: The states in which a worker makes no progress by itself (readiness fails).
STUCK_STATES = frozenset({FAILED, STALLED})


_C = TypeVar("_C", bound=EventConsumer)


async def behind(store: OffsetStore, targets: Sequence[tuple[_C, int]]) -> list[tuple[_C, int]]:
    """The (worker, head) of ``targets`` whose tag is not at ``head`` yet: as the worker knows
    while it holds the lease, else as stored (another process may hold the tag: its worker
    here stands by)."""
    late = [(w, head) for w, head in targets if w.offset < head]
    if not any(w.lease is None for w, _ in late):
        return late
    stored = {
        (row.processor, row.tag): row.offset
        for name in {w.name for w, _ in late}
        for row in await store.rows(name)
    }
    return [
        (w, head)
        for w, head in late
        if w.lease is not None or stored.get((w.name, w.tag), 0) < head
    ]


async def _journal_lag(journal: Database, tag: str, offset: int) -> tuple[int, int, float]:
    tg, ev = schema.event_tags, schema.events
    head = select(func.max(tg.c.global_offset)).where(tg.c.tag == tag).scalar_subquery()
    behind = (
        select(func.count())
        .select_from(tg)
        .where(tg.c.tag == tag, tg.c.global_offset > offset)
        .scalar_subquery()
    )
    first = (
        select(func.min(tg.c.global_offset))
        .where(tg.c.tag == tag, tg.c.global_offset > offset)
        .scalar_subquery()
    )
    oldest = select(ev.c.written_at_us).where(ev.c.global_offset == first).scalar_subquery()
    async with journal.read() as conn:
        row = (await conn.execute(select(head, behind, oldest))).one()
    lag_s = 0.0 if row[2] is None else max(0.0, (now_us() - int(row[2])) / 1e6)
    head_offset = int(row[0] or 0)
    # An offset forced past the head: negative, never a reassuring 0.
    lag = int(row[1] or 0) if offset <= head_offset else head_offset - offset
    return head_offset, lag, round(lag_s, 3)


# --------------------------------------------------------------------------- management


class Projections(AsyncClosing):
    """Manage read sides from Python (the CLI and the HTTP route use it too): status, pause,
    resume, set an offset, rebuild. ``journal`` is needed for the lag and for rebuilds.

    On a journal placed on several databases, ``journal`` is the home database and
    ``placement`` with ``journals`` (the other databases, by name) say where each partition's
    events are: a partition key ``tag@name`` is measured against database ``name``. Every
    operation takes a partition key where it takes a tag."""

    def __init__(
        self,
        projection: Database,
        journal: Database | None = None,
        *,
        settings: ReadSideSettings | None = None,
        owns: Sequence[Database] = (),
        placement: Placement | None = None,
        journals: Mapping[str, Database] | None = None,
    ) -> None:
        self.projection = projection
        self.journal = journal
        self.placement = placement
        #: The journal's databases other than the home one, by name.
        self.journals = dict(journals or {})
        self.settings = settings or _settings(None, {})
        self.store = OffsetStore(projection)
        self.parked_store = ParkedStore(projection)
        self._owns = list(owns)

    async def close(self) -> None:
        for db in self._owns:
            await db.dispose()
        self._owns = []

    @classmethod
    def following(
        cls,
        projection: Database,
        journal: Journal,
        placed: PlacedStorage | None,
        settings: ReadSideSettings,
    ) -> Projections:
        """The operations of consumers that follow ``journal`` (the home database's), and
        every database of ``placed`` when the journal is placed on several."""
        if placed is None or not placed.placement.several:
            return cls(projection, journal.database, settings=settings)
        others = {n: part.database for n, part in placed.parts.items() if n != HOME}
        return cls(
            projection,
            journal.database,
            settings=settings,
            placement=placed.placement,
            journals=others,
        )

    @property
    def journal_settings(self) -> JournalSettings | None:
        """The settings of the whole journal, every database of it (None: opened without
        it): what a rebuild opens with ``open_placed_storage``."""
        if self.placement is not None:
            return self.placement.settings
        return None if self.journal is None else self.journal.settings

    def journal_of(self, key: str) -> tuple[Database | None, str, str]:
        """(journal database, tag, database name) of partition ``key``: the home database and
        the key itself unless the journal is placed on several and the key names another
        (None when that database is not open here)."""
        if self.placement is None:
            return self.journal, key, HOME
        tag, name = self.placement.split(key)
        return (self.journal if name == HOME else self.journals.get(name)), tag, name

    async def status(self, processor: str | None = None) -> list[WorkerStatus]:
        """Every (processor, partition) known in the projection database (or those of one
        processor): offset, lag in events and seconds (against the partition's own database
        of the journal), state, events/s, last failure."""
        rows = await self.store.rows(processor)
        if processor is not None and not rows:
            raise ConfigurationError(
                f"no read-side processor {processor!r}: it has no offsets in the projection "
                "database (a processor's rows appear when it first starts)"
            )
        parked = await self.parked_store.counts(processor)
        out = []
        for row in rows:
            head = lag = None
            lag_s: float | None = None
            journal, tag, database = self.journal_of(row.tag)
            if journal is not None:
                head, lag, lag_s = await _journal_lag(journal, tag, row.offset)
            failure = None
            if row.error is not None:
                failure = Failure(
                    row.error,
                    row.error_offset,
                    row.error_entity_type,
                    row.error_entity_id,
                    row.error_seq_nr,
                    row.error_attempts,
                    None if row.error_at_us is None else from_us(row.error_at_us),
                )
            state = _state(row)
            out.append(
                WorkerStatus(
                    processor=row.processor,
                    tag=row.tag,
                    state=state,
                    offset=row.offset,
                    head_offset=head,
                    lag_events=lag,
                    lag_seconds=lag_s,
                    paused=row.paused,
                    owner=row.owner if row.leased else None,
                    epoch=row.epoch,
                    events_per_s=row.events_per_s if state == "running" else 0.0,
                    skipped=row.skipped,
                    failure=failure,
                    parked=parked.get((row.processor, row.tag), 0),
                    database=database,
                )
            )
        return out

    async def members(self, processor: str | None = None) -> list[ConsumerMember]:
        """The live members (running instances) of every processor (or of ``processor``),
        each with the tags it holds. Empty when none registered (``rebalance`` off, or
        nothing runs)."""
        rows = await self.store.members(processor)
        return [
            ConsumerMember(
                processor=r.consumer,
                member=r.member,
                joined=from_us(r.joined_us),
                heartbeat=from_us(r.heartbeat_us),
                expires=from_us(r.expires_us),
                tags=r.tags,
            )
            for r in rows
        ]

    async def pause(self, processor: str, tag: str | None = None) -> int:
        """Pause every worker of ``processor`` (or one tag's): persisted, seen by the workers
        within ``renew_interval``; returns how many (processor, tag) rows were paused."""
        count = await self.store.set_paused(processor, tag, True)
        log.info("read-side processor %r%s: paused by an operator", processor, _of_tag(tag))
        return count

    async def resume(self, processor: str, tag: str | None = None) -> int:
        """Undo :meth:`pause`, and let a worker stopped by a failing event (``failed``) retry
        it; returns how many (processor, tag) rows were resumed."""
        count = await self.store.set_paused(processor, tag, False)
        log.info("read-side processor %r%s: resumed by an operator", processor, _of_tag(tag))
        return count

    async def skip(self, processor: str, tag: str | None = None) -> int:
        """Move every ``failed`` worker of ``processor`` (or ``tag``'s) past the event it is
        stopped at, without its writes (counted in ``skipped``; the failure line stays,
        marked as skipped, until the worker commits past it); the worker holding the lease
        loses it and the next holder resumes after the event. Returns how many were skipped;
        ``ConfigurationError`` when none is failed."""
        owner = _operator(SKIP_OWNER)
        skipped = await self.store.skip(processor, tag, owner=owner)
        for row in skipped:
            log.warning(
                "read-side processor %r, tag %r: %r skipped the event at offset %s "
                "(%s/%s sequence number %s) that stopped it: %s",
                processor,
                row.tag,
                owner,
                row.error_offset,
                row.error_entity_type,
                row.error_entity_id,
                row.error_seq_nr,
                row.error,
            )
        return len(skipped)

    async def set_offset(
        self, processor: str, tag: str, offset: int, *, force: bool = False
    ) -> None:
        """Make (processor, tag) resume after ``offset``. The worker holding its lease loses
        it (it cannot commit any more) and the next holder starts from ``offset``; a
        ``failed`` worker retries from there.

        An offset beyond the tag's head in the journal is refused (the worker would pass
        over every event up to it as they are written) unless ``force``: the status then
        shows a negative lag until the journal gets there."""
        check_offset(offset)
        if tag == GLOBAL_TAG or await self.store.row(processor, tag) is None:
            raise ConfigurationError(unknown_offsets(processor, tag))
        if not force:
            journal, journal_tag, database = self.journal_of(tag)
            if journal is None:
                raise ConfigurationError(
                    "set_offset checks the offset against the tag's head in the journal: open "
                    "Projections with the journal, or pass force=True"
                )
            head = (await _journal_lag(journal, journal_tag, 0))[0]
            if offset > head:
                where = ""
                if self.placement is not None and database != HOME:
                    where = f" on {self.placement.describe(database)}"
                raise ConfigurationError(
                    f"offset {offset} is beyond the head of tag {journal_tag!r}{where} in the "
                    "journal "
                    f"(offset {head}): the worker would pass over every event up to it as they "
                    "are written; set it anyway with force=True (`--force`), the status then "
                    "shows a negative lag"
                )
        owner = _operator(SET_OFFSET_OWNER)
        before = await self.store.set_offset(processor, tag, offset, owner=owner)
        log.warning(
            "read-side processor %r, tag %r: %r set the offset from %d to %d%s",
            processor,
            tag,
            owner,
            before.offset,
            offset,
            f"; the lease of {before.owner!r} (epoch {before.epoch}) ends" if before.leased else "",
        )

    async def parked(
        self, which: ParkedFilter | None = None, *, limit: int = 100, after_id: int = 0
    ) -> list[ParkedEvent]:
        """The parked events (and subscribers' messages) ``which`` matches, in parking order:
        ``limit`` of them after id ``after_id`` (the last id of the previous page)."""
        return await self.parked_store.find(which or ParkedFilter(), limit=limit, after_id=after_id)

    async def count_parked(self, which: ParkedFilter | None = None) -> int:
        """How many parked events ``which`` matches."""
        return await self.parked_store.count(which or ParkedFilter())

    async def retry_parked(self, which: ParkedFilter) -> int:
        """Ask for a retry of the parked events ``which`` matches; returns how many. The
        worker holding each one's (processor, tag) lease runs its handler again within
        ``renew_interval`` (once it runs: not while paused or failed), deleting the row in
        the same transaction (exactly once); a retry that fails again keeps the row with the
        new error. A retried event runs out of order: after the later events of its entity.
        ``ConfigurationError`` when none matches."""
        count = await self.parked_store.request_retry(which)
        if not count:
            raise ConfigurationError(f"no parked event matches ({which.describe()})")
        log.warning(
            "%r asked for a retry of %d parked event(s) (%s)",
            _operator(""),
            count,
            which.describe(),
        )
        return count

    async def discard_parked(self, which: ParkedFilter) -> int:
        """Delete the parked events ``which`` matches, for good; returns how many
        (``ConfigurationError`` when none matches)."""
        count = await self.parked_store.discard(which)
        if not count:
            raise ConfigurationError(f"no parked event matches ({which.describe()})")
        log.warning("%r discarded %d parked event(s) (%s)", _operator(""), count, which.describe())
        return count

    async def rebuild(
        self,
        processor: ProcessorArg,
        *,
        journal: Journal | PlacedStorage,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Empty the projection (``reset``) and replay every event of the processor's tags.

        Takes every lease of the processor (running workers can no longer commit), runs
        ``global_prepare`` and ``reset`` and zeroes the offsets in one transaction, replays
        the tags concurrently, then releases the leases: running workers take them back and
        go on live. ``progress(done, total)`` is called as events are handled. Returns the
        number of events replayed.

        A journal placed on several databases (``journal``: from ``open_placed_storage``)
        resets and replays every partition, one per (tag, database)."""
        p = _instance(processor)
        if not type(p).can_reset():
            raise ConfigurationError(
                f"read-side processor {p.name!r} defines no reset(conn): a rebuild needs it to "
                "empty the projection before replaying"
            )
        if self.placement is not None and isinstance(journal, Journal):
            # Replaying one database after ``reset`` emptied the projection would leave out
            # every other database's events.
            raise ConfigurationError(
                f"rebuilding {p.name!r}: the journal is placed on several databases (home, "
                f"{', '.join(n for n in self.placement.names if n != HOME)}), and a rebuild "
                "replays them all: pass the storage of every database "
                "(open_placed_storage(...)) as journal="
            )
        journals, parts = _partitions(p, journal)
        keys = [part.key for part in parts]
        s = self.settings
        owner = f"rebuild:{default_owner()}"
        await self.store.ensure(p.name, [GLOBAL_TAG, *keys])
        leases = []
        for t in [GLOBAL_TAG, *keys]:
            lease = await self.store.acquire(p.name, t, owner, s.lease_ttl, force=True)
            assert lease is not None  # forced
            level = logging.WARNING if lease.previous_live else logging.INFO
            log.log(level, "read-side processor %r, tag %r: %s", p.name, t, describe_taken(lease))
            leases.append(lease)
        try:
            async with self.projection.write() as conn:
                await p.global_prepare(conn)  # the tables exist even if it never ran
                await p.reset(conn)
                await self.store.reset_offsets(conn, leases[1:])
                await self.store.commit(conn, leases[0], 0, s.lease_ttl, state="prepared")
        finally:
            await self.store.release(leases[0], state="prepared")
        total = 0
        for part in parts:
            total += (await _journal_lag(journals[part.database].database, part.tag, 0))[1]
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        workers = [
            ReadSideWorker(
                p,
                part.key,
                journal=journals[part.database],
                projection=self.projection,
                settings=s,
                owner=owner,
                journal_tag=part.tag,
            )
            for part in parts
        ]
        await asyncio.gather(*(w.catch_up(force=True, progress=step) for w in workers))
        return done


@opener
async def open_projections(
    *,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    with_journal: bool = True,
    **overrides: Any,
) -> Projections:
    """:class:`Projections` on the projection database of these settings (and the journal's,
    each of its databases, for lag and rebuilds, unless ``with_journal=False``); close it when
    done."""
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    placement = Placement.of(journal_settings)
    projection = Database.create(projection_settings(journal_settings, settings))
    owned = [projection]
    journals: dict[str, Database] = {}
    try:
        await ensure_schema(projection)
        if with_journal:
            for name in placement.names:
                journals[name] = Database.create(placement.settings_of(name))
                owned.append(journals[name])
    except BaseException:
        for db in owned:
            await db.dispose()
        raise
    home = journals.pop(HOME, None)
    return Projections(
        projection,
        home,
        settings=settings,
        owns=owned,
        placement=placement if placement.several else None,
        journals=journals,
    )


def _partitions(
    processor: SqlReadSideProcessor, journal: Journal | PlacedStorage
) -> tuple[dict[str, Journal], list[Partition]]:
    """The journal of each database by name, and the processor's partitions on them."""
    if isinstance(journal, Journal):
        return {HOME: journal}, [Partition(t, t, HOME) for t in processor.tags()]
    journals = {name: part.journal for name, part in journal.parts.items()}
    return journals, partitions_of(processor, journal.placement)


def _of_tag(tag: str | None) -> str:
    return "" if tag is None else f", tag {tag!r}"


def _operator(kind: str) -> str:
    """The lease owner an operator's operation writes: ``set-offset:<host>:<pid>``..."""
    return f"{kind}{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- in process


class ReadSide(AsyncClosing):
    """Read-side workers running in this process (one asyncio task per (processor, tag), or
    per (processor, tag, database) when the journal is placed on several databases).

    Build it with :func:`start_readside`; close it (or use ``async with``) to stop the workers,
    which release their leases."""

    def __init__(
        self,
        processors: list[SqlReadSideProcessor],
        *,
        journal: Journal,
        projection: Database,
        settings: ReadSideSettings,
        owned: Sequence[Database] = (),
        placed: PlacedStorage | None = None,
    ) -> None:
        self.processors = processors
        #: The journal of the home database (the only one unless ``placed``).
        self.journal = journal
        #: Every database's storage, when the journal is placed on several.
        self.placed = placed if placed is not None and placed.placement.several else None
        self.projection = projection
        self.settings = settings
        self.projections = Projections.following(projection, journal, self.placed, settings)
        self.workers: list[ReadSideWorker] = []
        #: This process's name as a member of its processors (and its workers' lease owner).
        self.member = default_owner()
        #: One per processor when ``settings.rebalance``.
        self.memberships: list[Membership] = []
        self.global_prepares: dict[str, int] = {}
        #: Processors whose global_prepare keeps failing (from max_attempts on): the error.
        self.prepare_stalls: dict[str, str] = {}
        self._owned = list(owned)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def partitions(self, processor: SqlReadSideProcessor) -> list[Partition]:
        """The partitions of ``processor`` this read side runs: its tags on each database."""
        journal = self.journal if self.placed is None else self.placed
        return _partitions(processor, journal)[1]

    def _journal(self, database: str) -> Journal:
        return self.journal if self.placed is None else self.placed.parts[database].journal

    def _start(self) -> None:
        s = self.settings
        for p in self.processors:
            parts = self.partitions(p)
            keys = [part.key for part in parts]
            membership = membership_for(p.name, keys, self.projection, s, self.member)
            if membership is not None:
                self.memberships.append(membership)
            workers = [
                ReadSideWorker(
                    p,
                    part.key,
                    journal=self._journal(part.database),
                    projection=self.projection,
                    settings=s,
                    owner=self.member,
                    membership=membership,
                    journal_tag=part.tag,
                )
                for part in parts
            ]
            self.workers += workers
            self._tasks.append(
                asyncio.create_task(self._run_processor(p, workers), name=f"readside {p.name}")
            )

    async def _run_processor(
        self, processor: SqlReadSideProcessor, workers: list[ReadSideWorker]
    ) -> None:
        def stalled(error: str | None) -> None:
            if error is None:
                self.prepare_stalls.pop(processor.name, None)
            else:
                self.prepare_stalls[processor.name] = error

        try:
            attempts = await run_global_prepare(
                processor,
                self.projection,
                self.settings,
                stop=self._stop,
                on_stall=stalled,
                keys=[w.tag for w in workers],
                rows_ensured=True,  # by start_readside
            )
        except ConsumerStopped:
            return
        self.global_prepares[processor.name] = attempts
        async with asyncio.TaskGroup() as group:
            for w in workers:
                group.create_task(w.run(), name=f"readside {w.name} {w.tag}")

    def worker(self, processor: str, tag: str) -> ReadSideWorker:
        for w in self.workers:
            if w.name == processor and w.tag == tag:
                return w
        raise ConfigurationError(f"no worker for processor {processor!r}, tag {tag!r}")

    async def status(self, processor: str | None = None) -> list[WorkerStatus]:
        return await self.projections.status(processor)

    def problems(self) -> list[str]:
        """What keeps processors of this process from making progress that the projection
        database cannot show: a global_prepare that keeps failing, a task that died."""
        found = [
            f"read-side processor {name!r}: {error}" for name, error in self.prepare_stalls.items()
        ]
        for task in self._tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                found.append(f"{task.get_name()} ended: {describe_error(error)}")
        return found

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every tag of these workers is handled up to where it was when called,
        whichever process holds it (raises ``TimeoutError`` after ``timeout`` seconds)."""
        targets = []
        for w in self.workers:
            head, _, _ = await _journal_lag(w.journal.database, w.journal_tag, 0)
            targets.append((w, head))
        store = self.projections.store
        async with asyncio.timeout(timeout):
            while late := await behind(store, targets):
                for task in self._tasks:
                    error = task.exception() if task.done() and not task.cancelled() else None
                    if error is not None:
                        raise error
                for w, _ in late:
                    w.wake()
                await asyncio.sleep(0.01)

    async def close(self, *, stop: bool = True) -> None:
        """Stop every worker (after its current transaction; each releases its lease) and
        close the connections. The workers run in this process, so they stop whatever
        ``stop`` says (it is for workers on Ray, see :class:`ReadSideRunner`)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for w in self.workers:
            await w.stop()
        await finish_tasks(self._tasks, what="a read-side task", logger=log)
        for m in self.memberships:
            await m.leave()
        for db in self._owned:
            await db.dispose()


@opener
async def start_readside(
    processors: Iterable[ProcessorArg],
    *,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    serializer: Serializer | None = None,
    settings: ReadSideSettings | None = None,
    **overrides: Any,
) -> ReadSide:
    """Start the processors' workers in this process and return at once: each processor runs
    ``global_prepare`` (retried until it succeeds), then one worker per tag (per tag and
    database, on a journal placed on several: ``JournalSettings.databases``). Keyword
    ``overrides`` set fields of :class:`ReadSideSettings` (``url=`` for a separate projection
    database, ``max_batch=``, ``on_failure=``...)."""
    instances = [_instance(p) for p in processors]
    if not instances:
        raise ConfigurationError("start_readside() needs at least one processor")
    names = [p.name for p in instances]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"two read-side processors share a name: {sorted(names)}")
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    serializer = serializer or serializer_for_processors(instances)
    storage = await open_placed_storage(settings=journal_settings, serializer=serializer)
    home = storage.parts[HOME]
    projection = Database.create(projection_settings(journal_settings, settings))
    try:
        await ensure_schema(projection)
        store = OffsetStore(projection)
        for p in instances:
            _, parts = _partitions(p, storage)
            await store.ensure(p.name, [GLOBAL_TAG, *(part.key for part in parts)])
    except BaseException:
        await projection.dispose()
        await storage.close()
        raise
    readside = ReadSide(
        instances,
        journal=home.journal,
        projection=projection,
        settings=settings,
        owned=[projection, *(part.database for part in storage.parts.values())],
        placed=storage,
    )
    readside._start()
    return readside
