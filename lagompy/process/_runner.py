"""Process managers running in this process: :func:`start_process_managers` and
:class:`ProcessManagers`.

One asyncio task per (manager, partition of its source), each a
:class:`~lagompy.process._worker.ProcessWorker`. Positions, leases, pause flags and failures
are rows of the read sides' offset table named ``process:<name>`` (so ``lagompy projections``
sees them too); states and timers live beside them, in the database of
``ReadSideSettings.url`` (by default the journal's). Several processes may run the same
managers: one holds each partition and the others stand by.

On a journal placed on several databases (``JournalSettings.databases``) a manager whose source
is an entity has one partition per (tag, database), keyed like the read sides' (the tag on the
home database, ``tag@database`` on another: :func:`~lagompy.journal._placement.partition_key`),
each reading its own database's journal. A manager whose source is a topic on the embedded
transport reads the topic's relay log there (the producing service's relays write it in the
home database: see ``lagompy/topic/_relay.py``), its partitions the topic's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lagompy.closing import AsyncClosing, finish_tasks, opener
from lagompy.consumer import Membership
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import Journal
from lagompy.journal._placement import HOME
from lagompy.journal._storage import PlacedStorage, open_placed_storage
from lagompy.process._manager import ProcessManager, RefSource, offset_key
from lagompy.process._store import ProcessStore, drop_stopping_timers
from lagompy.process._worker import ManagerProcessor, ProcessWorker, processor_for
from lagompy.readside._processor import serializer_for_processors
from lagompy.readside._projections import Projections, WorkerStatus, _journal_lag, behind
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import (
    ReadSideSettings,
    _journal_settings,
    _settings,
    projection_settings,
)
from lagompy.readside._store import GLOBAL_TAG, OffsetStore
from lagompy.readside._worker import (
    Partition,
    default_owner,
    describe_error,
    membership_for,
    partitions_of,
)
from lagompy.settings import JournalSettings
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from lagompy.topic._embedded import EmbeddedTransport
from lagompy.topic._log import partition_log
from lagompy.topic._runner import with_feed_lag
from lagompy.topic._transport import TopicTransport

log = logging.getLogger("lagompy.process")

__all__ = ["ManagerArg", "ManagerStatus", "ProcessManagers", "start_process_managers"]

ManagerArg = type[ProcessManager[Any]] | ProcessManager[Any]


def _instance(manager: ManagerArg) -> ProcessManager[Any]:
    if isinstance(manager, type):
        if not issubclass(manager, ProcessManager):
            raise ConfigurationError(f"{manager.__qualname__} is not a ProcessManager subclass")
        manager.validate()
        return manager()
    if not isinstance(manager, ProcessManager):
        raise ConfigurationError(f"expected a ProcessManager (class or instance), got {manager!r}")
    type(manager).validate()
    return manager


@dataclass(frozen=True)
class ManagerStatus:
    """One partition of a process manager: its position and state (``worker``: the offset
    row as ``lagompy projections`` shows it, named ``process:<name>``), and how many keys
    have a state and how many timers are pending there."""

    manager: str
    worker: WorkerStatus
    active_keys: int
    pending_timers: int

    @property
    def tag(self) -> str:
        """The partition's key: its tag, or ``tag@database`` on another database than the
        home one of a journal placed on several."""
        return self.worker.tag

    @property
    def database(self) -> str:
        """The journal's database the partition follows (``""``: the home one)."""
        return self.worker.database

    @property
    def state(self) -> str:
        return self.worker.state

    @property
    def offset(self) -> int:
        return self.worker.offset

    def to_dict(self) -> dict[str, Any]:
        out = self.worker.to_dict()
        out.pop("processor")
        return {
            "manager": self.manager,
            **out,
            "active_keys": self.active_keys,
            "pending_timers": self.pending_timers,
        }


class ProcessManagers(AsyncClosing):
    """Process manager workers running in this process. Build it with
    :func:`start_process_managers`; close it (or use ``async with``) to stop the workers, which
    release their leases.

    Operations by manager name (``pause``, ``resume``, ``skip``, ``set_offset``, ``status``,
    ``state``) act on the rows in the database, whichever process runs the workers."""

    def __init__(
        self,
        processors: list[ManagerProcessor],
        *,
        journal: Journal,
        database: Database,
        entities: RefSource,
        settings: ReadSideSettings,
        owned: Sequence[Database] = (),
        transport: TopicTransport | None = None,
        close_transport: bool = False,
        placed: PlacedStorage | None = None,
    ) -> None:
        self.processors = processors
        #: Carries the messages of the managers whose source is a topic.
        self.transport = transport
        self._close_transport = close_transport
        self.managers = [p.manager for p in processors]
        #: The journal of the home database (the only one unless ``placed``).
        self.journal = journal
        #: Every database's storage, when the journal is placed on several.
        self.placed = placed if placed is not None and placed.placement.several else None
        self.database = database
        self.entities = entities
        self.settings = settings
        self.projections = Projections.following(database, journal, self.placed, settings)
        self.stores = {
            type(m).name: ProcessStore(database, type(m).name, journal.serializer)
            for m in self.managers
        }
        self.workers: list[ProcessWorker] = []
        #: This process's name as a member of its managers (the workers' lease owner).
        self.member = default_owner()
        #: One per manager when ``settings.rebalance``.
        self.memberships: list[Membership] = []
        self._owned = list(owned)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def partitions(self, processor: ManagerProcessor) -> list[Partition]:
        """The partitions of ``processor``: its source's tags, on each database of a journal
        placed on several when the source is an entity (a topic's partitions are its own)."""
        return _partitions(processor, self.placed)

    def _siblings(self, part: Partition) -> frozenset[str]:
        """The partitions of ``part``'s journal tag on the other databases (none on one)."""
        if self.placed is None:
            return frozenset()
        return frozenset(k for k, _ in self.placed.placement.partitions(part.tag)) - {part.key}

    def _journal(self, database: str) -> Journal:
        return self.journal if self.placed is None else self.placed.parts[database].journal

    def _workers(self) -> None:
        for processor in self.processors:
            manager = type(processor.manager)
            topic = manager.topic()
            parts = self.partitions(processor)
            membership = membership_for(
                processor.name,
                [part.key for part in parts],
                self.database,
                self.settings,
                self.member,
            )
            if membership is not None:
                self.memberships.append(membership)
            for partition, part in enumerate(parts):
                feed = None
                if topic is not None:
                    assert self.transport is not None
                    feed = self.transport.feed(topic, partition, group=f"process-{manager.name}")
                self.workers.append(
                    ProcessWorker(
                        processor,
                        part.key,
                        journal=self._journal(part.database),
                        database=self.database,
                        entities=self.entities,
                        settings=self.settings,
                        feed=feed,
                        owner=self.member,
                        membership=membership,
                        journal_tag=part.tag,
                        placed_on=part.database,
                        siblings=frozenset() if topic is not None else self._siblings(part),
                    )
                )

    def _start(self) -> None:
        for w in self.workers:
            self._tasks.append(asyncio.create_task(w.run(), name=f"process {w.name} {w.tag}"))

    def _name(self, manager: str) -> str:
        if manager not in self.stores:
            raise ConfigurationError(
                f"no process manager {manager!r} here (known: {sorted(self.stores)})"
            )
        return offset_key(manager)

    def worker(self, manager: str, tag: str) -> ProcessWorker:
        """The worker of ``manager`` on partition ``tag`` (a partition key: ``tag@database``
        on another database than the home one of a journal placed on several)."""
        name = self._name(manager)
        for w in self.workers:
            if w.name == name and w.tag == tag:
                return w
        raise ConfigurationError(f"process manager {manager!r} has no partition tag {tag!r}")

    async def status(self, manager: str | None = None) -> list[ManagerStatus]:
        """Every partition of these managers (or of one): position, lag, state, failures,
        keys with a state and pending timers."""
        names = list(self.stores) if manager is None else [manager]
        out = []
        for name in names:
            rows = await self.projections.status(self._name(name))
            counts = await self.stores[name].counts()
            for row in rows:
                if row.tag == GLOBAL_TAG:
                    continue
                keys, timers = counts.get(row.tag, (0, 0))
                out.append(ManagerStatus(name, await self._with_feed_lag(row), keys, timers))
        return out

    async def _with_feed_lag(self, row: WorkerStatus) -> WorkerStatus:
        """``row`` with its head and lag from its worker's feed when the manager follows a
        topic's relay log (a journal placed on several databases): the journal's tags do not
        count its positions there."""
        worker = next(
            (w for w in self.workers if (w.name, w.tag) == (row.processor, row.tag)), None
        )
        if worker is None or self.placed is None:
            return row
        return await with_feed_lag(row, worker.feed)

    async def _feed_head(self, worker: ProcessWorker) -> int | None:
        """The head of a topic-sourced worker's partition as its feed sees it, on a journal
        placed on several databases (the relay log's, not a journal's tag); None elsewhere."""
        lag = getattr(worker.feed, "lag", None) if self.placed is not None else None
        if lag is None:
            return None
        head, _, _ = await lag(0)
        return int(head)

    async def state(self, manager: str, key: str) -> Any | None:
        """The stored state of ``key`` (None: no state: never handled, or ended)."""
        self._name(manager)
        return await self.stores[manager].state(key)

    async def pause(self, manager: str, tag: str | None = None) -> int:
        """Pause the manager on every partition (or one): persisted, seen within
        ``renew_interval``; neither events nor timers are handled meanwhile."""
        return await self.projections.pause(self._name(manager), tag)

    async def resume(self, manager: str, tag: str | None = None) -> int:
        """Undo :meth:`pause`; a partition stopped by a failing event or timer retries it."""
        return await self.projections.resume(self._name(manager), tag)

    async def skip(self, manager: str, tag: str | None = None) -> int:
        """Move the failed partitions past the event they are stopped at; a partition stopped
        by a timer drops that timer (its position stays)."""
        name = self._name(manager)
        await drop_stopping_timers(self.projections.store, self.stores[manager], tag)
        return await self.projections.skip(name, tag)

    async def set_offset(self, manager: str, tag: str, offset: int) -> None:
        """Make the manager resume after ``offset`` on partition ``tag`` (its states stay:
        a replay re-sends commands with the same ids, answered from the stored replies)."""
        await self.projections.set_offset(self._name(manager), tag, offset, force=True)

    def problems(self) -> list[str]:
        """Tasks of this process that died (their rows cannot say)."""
        found = []
        for task in self._tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                found.append(f"{task.get_name()} ended: {describe_error(error)}")
        return found

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every partition of these workers is handled up to where it was when
        called, whichever process holds it (raises ``TimeoutError`` after ``timeout``
        seconds)."""
        targets = []
        for w in self.workers:
            head = await self._feed_head(w)
            if head is None:
                journal = self.journal if w.journal is None else w.journal
                head, _, _ = await _journal_lag(journal.database, w.journal_tag, 0)
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

    async def close(self) -> None:
        """Stop every worker (after its current transaction; each releases its lease) and
        close the connections."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            await w.stop()
        await finish_tasks(self._tasks, what="a process manager task", logger=log)
        for m in self.memberships:
            await m.leave()
        for w in self.workers:
            if w.feed is not None:
                await w.feed.close()
        if self._close_transport and self.transport is not None:
            await self.transport.close()
        for db in self._owned:
            await db.dispose()


def _partitions(processor: ManagerProcessor, placed: PlacedStorage | None) -> list[Partition]:
    """The partitions of ``processor``: its source's tags, on each database of a journal placed
    on several when the source is an entity (a topic's partitions are its own)."""
    if placed is None or type(processor.manager).topic() is not None:
        return [Partition(t, t, HOME) for t in processor.tags()]
    return partitions_of(processor, placed.placement)


@opener
async def start_process_managers(
    managers: Iterable[ManagerArg],
    *,
    entities: RefSource,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    transport: TopicTransport | None = None,
    run: bool = True,
    **overrides: Any,
) -> ProcessManagers:
    """Start the managers' workers in this process and return at once (``run=False``: make
    the workers without running them, for :meth:`ProcessWorker.catch_up` in tests).

    ``entities`` is where the commands go (``lagompy.start``'s runtime, or a service's
    ``entities``); ``journal_url`` / ``journal_settings`` the journal whose events drive the
    managers. ``transport`` carries the messages of managers whose source is a topic (by
    default the embedded one: the topic's partitions read in that journal). States, timers
    and positions go to the database of ``ReadSideSettings.url`` (keyword ``url=``), by
    default the journal's. Keyword ``overrides`` set fields of
    :class:`~lagompy.readside.ReadSideSettings` (``max_batch=``, ``on_failure=``...).

    A journal placed on several databases (``JournalSettings.databases``) has every database
    opened, and a worker per (manager, tag, database) (see the module's docs)."""
    instances = [_instance(m) for m in managers]
    if not instances:
        raise ConfigurationError("start_process_managers() needs at least one process manager")
    names = [type(m).name for m in instances]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"two process managers share a name: {sorted(names)}")
    if not callable(getattr(entities, "ref_for", None)):
        raise ConfigurationError(
            f"start_process_managers(entities=...) needs an entity runtime (lagompy.start's, "
            f"or a service's entities), got {entities!r}"
        )
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    processors = [processor_for(m) for m in instances]
    serializer = serializer_for_processors(processors)
    for m in instances:
        topic = type(m).topic()
        if topic is not None:
            serializer.register(topic.message_type)
        serializer.register(type(m).state_annotation())
        for t in type(m).timer_messages:
            serializer.register(t)
    storage = await open_placed_storage(settings=journal_settings, serializer=serializer)
    home = storage.parts[HOME]
    database = Database.create(projection_settings(journal_settings, settings))
    try:
        await ensure_schema(database)
        store = OffsetStore(database)
        for p in processors:
            await store.ensure(p.name, [part.key for part in _partitions(p, storage)])
    except BaseException:
        await database.dispose()
        await storage.close()
        raise
    made = None
    if transport is None and any(type(m).topic() is not None for m in instances):
        # On a journal placed on several databases, the relay log of the home database.
        log = partition_log(home.journal, placed=storage.placement.several, tail=settings.tail)
        made = transport = EmbeddedTransport(home.journal, tail=settings.tail, log=log)
    running = ProcessManagers(
        processors,
        journal=home.journal,
        database=database,
        entities=entities,
        settings=settings,
        owned=[database, *(part.database for part in storage.parts.values())],
        transport=transport,
        close_transport=made is not None,
        placed=storage,
    )
    try:
        running._workers()  # a bad setting (on_failure="park"...) is refused here
        if run:
            running._start()
    except BaseException:
        await running.close()  # the databases opened above, and any worker made
        raise
    return running
