"""Subscribers running in this process: :func:`start_subscribers` and :class:`Subscribers`.

One asyncio task per (group, partition), each a :class:`~lagompy.topic._worker.SubscriberWorker`
fed by the transport (by default the embedded one: the journal of ``journal_settings``, read in
place). The group's ``prepare`` runs first, under the group's own lease, retried until it
succeeds. A group that has no stored position yet starts where its ``start_from`` says; from
then on, from its stored position. Positions, leases, pause flags and failures live in the
subscriber's database (the read side's offset table, ``ReadSideSettings.url``, by default the
journal's database), so several processes may run the same subscribers: one holds each
(group, partition) and the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import update

from lagompy.closing import AsyncClosing, finish_tasks, opener
from lagompy.consumer import ConsumerStopped, Membership
from lagompy.errors import ConfigurationError, LagompyError
from lagompy.journal._journal import now_us
from lagompy.readside._parked import ParkedEvent, ParkedFilter
from lagompy.readside._projections import Projections, WorkerStatus
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import (
    ReadSideSettings,
    _journal_settings,
    _settings,
    projection_settings,
)
from lagompy.readside._store import GLOBAL_TAG, OffsetStore
from lagompy.readside._worker import (
    default_owner,
    describe_error,
    membership_for,
    run_global_prepare,
)
from lagompy.settings import JournalSettings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from lagompy.topic._embedded import EmbeddedTransport
from lagompy.topic._subscriber import Subscriber
from lagompy.topic._topic import StartFrom
from lagompy.topic._transport import MessageFeed, TopicTransport
from lagompy.topic._worker import SubscriberProcessor, SubscriberWorker, processor_for

log = logging.getLogger("lagompy.topic")

__all__ = ["SubscriberArg", "Subscribers", "start_subscribers"]

SubscriberArg = type[Subscriber[Any]] | Subscriber[Any]


def _instance(subscriber: SubscriberArg) -> Subscriber[Any]:
    if isinstance(subscriber, type):
        if not issubclass(subscriber, Subscriber):
            raise ConfigurationError(f"{subscriber.__qualname__} is not a Subscriber subclass")
        subscriber.validate()
        return subscriber()
    if not isinstance(subscriber, Subscriber):
        raise ConfigurationError(f"expected a Subscriber (class or instance), got {subscriber!r}")
    type(subscriber).validate()
    return subscriber


async def apply_start(
    database: Database, key: str, tag: str, feed: MessageFeed, start: StartFrom
) -> int | None:
    """Store the start position of a (group, partition) that never ran (no lease was ever
    taken and no operator set it: epoch 0); returns it, or None when the row had run."""
    if start.kind == "earliest":
        return None
    offset = await feed.start_offset(start)
    t = schema.readside_offsets
    async with database.write() as conn:
        done = await conn.execute(
            update(t)
            .where(t.c.processor == key, t.c.tag == tag, t.c.epoch == 0)
            .values(last_offset=offset, updated_us=now_us())
        )
    return offset if done.rowcount else None


class GroupOperations:
    """Operations by group on the rows of the groups' positions (``topic:<topic>:<group>``
    and each partition's tag) in the subscribers' database, whichever process or actor runs
    the workers: :class:`Subscribers` and the Ray handle share them."""

    projections: Projections

    def _groups(self) -> list[tuple[str, Subscriber[Any]]]:
        """(offset key, subscriber) of every group."""
        raise NotImplementedError

    def _key(self, group: str, topic: str | None) -> str:
        found = [
            key
            for key, subscriber in self._groups()
            if subscriber.group == group and topic in (None, subscriber.topic.name)
        ]
        if len(found) != 1:
            raise ConfigurationError(
                f"no subscriber group {group!r} here"
                if not found
                else f"group {group!r} reads several topics: name the topic"
            )
        return found[0]

    async def pause(self, group: str, *, topic: str | None = None) -> int:
        """Pause the group on every partition (persisted, seen within ``renew_interval``)."""
        return await self.projections.pause(self._key(group, topic))

    async def resume(self, group: str, *, topic: str | None = None) -> int:
        """Undo :meth:`pause`; a group stopped by a failing message retries it."""
        return await self.projections.resume(self._key(group, topic))

    async def skip(self, group: str, *, topic: str | None = None) -> int:
        """Move the group's failed partitions past the message they are stopped at."""
        return await self.projections.skip(self._key(group, topic))

    async def set_offset(
        self, group: str, partition: int, offset: int, *, topic: str | None = None
    ) -> None:
        """Make the group resume after ``offset`` on ``partition`` (replay from there)."""
        key = self._key(group, topic)
        subscriber = next(sub for k, sub in self._groups() if k == key)
        tag = subscriber.topic.partition_tag(partition)
        await self.projections.set_offset(key, tag, offset, force=True)

    def _parked_filter(
        self, group: str | None, topic: str | None, which: ParkedFilter | None
    ) -> ParkedFilter:
        which = which or ParkedFilter()
        if group is not None:
            return dataclasses.replace(which, consumer=self._key(group, topic))
        keys = {key for key, _ in self._groups()}
        if which.consumer is not None and which.consumer not in keys:
            raise ConfigurationError(f"no subscriber group {which.consumer!r} here")
        return dataclasses.replace(which, kind="subscriber")

    async def parked(
        self,
        group: str | None = None,
        *,
        topic: str | None = None,
        which: ParkedFilter | None = None,
        limit: int = 100,
        after_id: int = 0,
    ) -> list[ParkedEvent]:
        """The messages the groups (or ``group``) parked (``on_failure="park"``), each with
        its JSON form; ``which`` narrows it (partition tag, error class, entity, ids)."""
        return await self.projections.parked(
            self._parked_filter(group, topic, which), limit=limit, after_id=after_id
        )

    async def retry_parked(
        self, group: str, *, topic: str | None = None, which: ParkedFilter | None = None
    ) -> int:
        """Ask for a retry of the group's parked messages (those ``which`` matches): the
        worker of each partition runs ``handle`` on the stored message again and deletes the
        row in one transaction; how many were asked for."""
        return await self.projections.retry_parked(self._parked_filter(group, topic, which))

    async def discard_parked(
        self, group: str, *, topic: str | None = None, which: ParkedFilter | None = None
    ) -> int:
        """Delete the group's parked messages (those ``which`` matches); how many."""
        return await self.projections.discard_parked(self._parked_filter(group, topic, which))


class Subscribers(GroupOperations, AsyncClosing):
    """Subscriber workers running in this process. Build it with :func:`start_subscribers`;
    close it (or use ``async with``) to stop the workers, which release their leases.

    Operations by group (``pause``, ``resume``, ``skip``, ``set_offset``, ``status``) act on
    the rows of ``topic:<topic>:<group>`` in the subscriber's database, whichever process
    runs the workers."""

    def __init__(
        self,
        subscribers: list[Subscriber[Any]],
        *,
        transport: TopicTransport,
        database: Database,
        settings: ReadSideSettings,
        journal: Database | None = None,
        owned: Sequence[Database] = (),
        close_transport: bool = False,
        owner: str | None = None,
    ) -> None:
        self.subscribers = subscribers
        #: The workers' lease owner (None: one of their own, unique to this process).
        self.owner = owner
        #: This process's name as a member of its groups (the workers' lease owner).
        self.member = owner or default_owner()
        #: One per subscriber group when ``settings.rebalance``.
        self.memberships: list[Membership] = []
        self.transport = transport
        self.database = database
        self.settings = settings
        #: Operations on the groups' rows (the journal's database gives the lag, when the
        #: subscribers share it).
        self.projections = Projections(database, journal, settings=settings)
        self.processors = [processor_for(s) for s in subscribers]
        self.workers: list[SubscriberWorker] = []
        self.prepare_stalls: dict[str, str] = {}
        self._owned = list(owned)
        self._close_transport = close_transport
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        #: (offset key, tag) of the partitions whose start position is settled.
        self._placed: set[tuple[str, str]] = set()

    async def _start(self) -> None:
        keys = [p.name for p in self.processors]
        if len(set(keys)) != len(keys):
            raise ConfigurationError(f"two subscribers share a topic and group: {sorted(keys)}")
        store = OffsetStore(self.database)
        for processor in self.processors:
            subscriber = processor.subscriber
            topic = subscriber.topic
            await store.ensure(processor.name, [GLOBAL_TAG, *processor.tags()])
            membership = membership_for(
                processor.name, processor.tags(), self.database, self.settings, self.member
            )
            if membership is not None:
                self.memberships.append(membership)
            workers = []
            for partition in range(topic.partitions):
                feed = self.transport.feed(topic, partition, group=subscriber.group)
                tag = topic.partition_tag(partition)
                # Now, so that `latest` means "from the start of start_subscribers"; a
                # transport that cannot say yet is asked again in the background.
                with contextlib.suppress(Exception):
                    await self._start_position(processor, partition, tag, feed)
                workers.append(
                    SubscriberWorker(
                        processor,
                        partition,
                        feed,
                        database=self.database,
                        settings=self.settings,
                        owner=self.member,
                        membership=membership,
                    )
                )
            self.workers += workers
            self._tasks.append(
                asyncio.create_task(
                    self._run_group(processor, workers), name=f"subscriber {processor.name}"
                )
            )

    async def _run_group(
        self, processor: SubscriberProcessor, workers: list[SubscriberWorker]
    ) -> None:
        def stalled(error: str | None) -> None:
            if error is None:
                self.prepare_stalls.pop(processor.name, None)
            else:
                self.prepare_stalls[processor.name] = error

        try:
            await self._start_positions(processor, workers, stalled)
            await run_global_prepare(
                processor,
                self.database,
                self.settings,
                stop=self._stop,
                on_stall=stalled,
                rows_ensured=True,  # by _start
            )
        except ConsumerStopped:
            return
        async with asyncio.TaskGroup() as group:
            for w in workers:
                group.create_task(w.run(), name=f"subscriber {w.name} {w.tag}")

    async def _start_positions(
        self,
        processor: SubscriberProcessor,
        workers: list[SubscriberWorker],
        stalled: Callable[[str | None], None],
    ) -> None:
        """Store where a group that never ran starts, for the partitions whose start position
        could not be found at start; retried with backoff while the transport cannot say (the
        producer is down, say), so that the service starts anyway and the group says why."""
        for worker in workers:
            if (worker.name, worker.tag) in self._placed:
                continue
            attempt = 0
            while True:
                try:
                    await self._start_position(processor, worker.partition, worker.tag, worker.feed)
                    break
                except Exception as e:
                    attempt += 1
                    error = f"finding where it starts failed: {describe_error(e)}"
                    log.warning("subscriber %r: %s (attempt %d)", processor.name, error, attempt)
                    stalled(error)
                    await worker.sleep(worker.backoff(attempt))
            stalled(None)

    async def _start_position(
        self, processor: SubscriberProcessor, partition: int, tag: str, feed: MessageFeed
    ) -> None:
        subscriber = processor.subscriber
        started = await apply_start(self.database, processor.name, tag, feed, subscriber.start_from)
        self._placed.add((processor.name, tag))
        if started is not None:
            log.info(
                "subscriber group %r of topic %r, partition %d: starts after offset %d (%s)",
                subscriber.group,
                subscriber.topic.name,
                partition,
                started,
                subscriber.start_from.kind,
            )

    def worker(self, group: str, partition: int, *, topic: str | None = None) -> SubscriberWorker:
        """The worker of ``group`` on ``partition`` (``topic``: when groups of several topics
        share a name)."""
        for w in self.workers:
            sub = w.processor.subscriber
            if sub.group == group and w.partition == partition and topic in (None, sub.topic.name):
                return w
        raise ConfigurationError(f"no subscriber group {group!r} with partition {partition}")

    def _groups(self) -> list[tuple[str, Subscriber[Any]]]:
        return [(p.name, p.subscriber) for p in self.processors]

    async def status(self, group: str | None = None) -> list[WorkerStatus]:
        """Every (group, partition) of these subscribers: position, lag (when the journal is
        at hand), state, events/s, last failure. The rows are named ``topic:<topic>:<group>``
        and the partition's tag."""
        keys = {p.name for p in self.processors}
        if group is not None:
            keys = {self._key(group, None)}
        found = [s for s in await self.projections.status() if s.processor in keys]
        return [await self._with_lag(s) for s in found]

    async def _with_lag(self, status: WorkerStatus) -> WorkerStatus:
        """``status`` with its head and lag from the worker's feed, when the subscriber's
        database cannot tell them (the messages come from another service)."""
        if status.head_offset is not None:
            return status
        worker = next(
            (w for w in self.workers if (w.name, w.tag) == (status.processor, status.tag)), None
        )
        return status if worker is None else await with_feed_lag(status, worker.feed)

    def problems(self) -> list[str]:
        """What keeps groups of this process from making progress that their rows cannot show:
        a ``prepare`` that keeps failing, a task that died."""
        found = [f"subscriber {name!r}: {error}" for name, error in self.prepare_stalls.items()]
        for task in self._tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                found.append(f"{task.get_name()} ended: {describe_error(error)}")
        return found

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every (group, partition) of these subscribers has a stored position at
        its partition's head as the transport sees it when called, whichever process holds
        its lease (raises ``TimeoutError`` after ``timeout`` seconds)."""
        latest = StartFrom.latest()
        store = self.projections.store
        async with asyncio.timeout(timeout):
            targets = {(w.name, w.tag): await w.feed.start_offset(latest) for w in self.workers}
            while True:
                for task in self._tasks:
                    error = task.exception() if task.done() and not task.cancelled() else None
                    if error is not None:
                        raise error
                # A worker of this process that holds its lease knows its stored position:
                # while one is behind, the rows need not be read (reading them every 10 ms was
                # a tenth of the subscriber's time in an HTTP catch-up, 2026-12-05).
                if not any(
                    w.state == "running"
                    and w.lease is not None
                    and w.offset < targets[(w.name, w.tag)]
                    for w in self.workers
                ):
                    stored = {
                        (row.processor, row.tag): row.offset
                        for key in {name for name, _ in targets}
                        for row in await store.rows(key)
                    }
                    if all(stored.get(k, 0) >= head for k, head in targets.items()):
                        return
                for w in self.workers:
                    w.wake()
                await asyncio.sleep(0.01)

    async def close(self, *, stop: bool = True) -> None:
        """Stop every worker (after its current transaction; each releases its lease) and
        close the connections (and the transport, when :func:`start_subscribers` made it)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for w in self.workers:
            await w.stop()
        await finish_tasks(self._tasks, what="a subscriber task", logger=log)
        for m in self.memberships:
            await m.leave()
        if self._close_transport:
            await self.transport.close()
        for db in self._owned:
            await db.dispose()


async def with_feed_lag(status: WorkerStatus, feed: MessageFeed | None) -> WorkerStatus:
    """``status`` with its head and lag as ``feed`` sees them (a partition's messages counted
    by the topic's positions: another service's, or a placed journal's relay log), or as it
    is when the feed cannot say (none, no ``lag``, or the producer unreachable now)."""
    lag = getattr(feed, "lag", None)
    if lag is None:
        return status
    try:
        head, behind, seconds = await lag(status.offset)
    except LagompyError:
        return status  # the producer cannot say now: the status says what it knows
    return dataclasses.replace(status, head_offset=head, lag_events=behind, lag_seconds=seconds)


@opener
async def start_subscribers(
    subscribers: Iterable[SubscriberArg],
    *,
    transport: TopicTransport | None = None,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    owner: str | None = None,
    **overrides: Any,
) -> Subscribers:
    """Start the subscribers' workers in this process and return at once.

    ``transport`` carries the messages; by default the embedded one: the subscribers read the
    journal of ``journal_url`` / ``journal_settings`` (the producing service's database)
    directly. The subscribers' writes and positions go to the database of
    ``ReadSideSettings.url`` (keyword ``url=``), by default the journal's: with another
    transport (:class:`~lagompy.topic.HttpTransport`...), the ``journal_url`` is the
    subscribing service's own database. Keyword ``overrides`` set fields of
    :class:`~lagompy.readside.ReadSideSettings` (``max_batch=``, ``on_failure=``...).
    ``owner`` names the workers' leases (by default a name unique to this call): a process
    that restarts under the same owner takes its leases back at once."""
    instances = [_instance(s) for s in subscribers]
    if not instances:
        raise ConfigurationError("start_subscribers() needs at least one subscriber")
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    owned: list[Database] = []
    journal_db: Database | None = None
    try:
        if transport is None:
            from lagompy.journal._placement import HOME, Placement
            from lagompy.journal._storage import open_storage, serializer_for
            from lagompy.topic._log import partition_log

            serializer = serializer_for(list({s.topic.source for s in instances}))
            # On a journal placed on several databases, the relay log of the home database
            # (written by the producing service's relays: see _relay.py).
            placement = Placement.of(journal_settings)
            home = placement.settings_of(HOME) if placement.several else journal_settings
            storage = await open_storage(settings=home, serializer=serializer)
            owned.append(storage.database)
            log = partition_log(storage.journal, placed=placement.several, tail=settings.tail)
            transport = EmbeddedTransport(storage.journal, tail=settings.tail, log=log)
            # The journal's tags give the lag of a journal on one database; the relay
            # log's feeds give their own.
            journal_db = None if placement.several else storage.database
        database = Database.create(projection_settings(journal_settings, settings))
        owned.append(database)
        await ensure_schema(database)
    except BaseException:
        for db in owned:
            await db.dispose()
        raise
    running = Subscribers(
        instances,
        transport=transport,
        database=database,
        settings=settings,
        journal=journal_db,
        owned=owned,
        owner=owner,
    )
    try:
        await running._start()
    except BaseException:
        await running.close()
        raise
    return running
