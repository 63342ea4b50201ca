"""One :class:`ProcessWorker` per (process manager, partition of its source): the consumer
core with the process manager's commit strategy, and the partition's durable timers.

The worker is an :class:`~lagompy.consumer.EventConsumer` (fenced lease, stored position,
catch up then live, backoff, stalls, pause/resume, status) whose strategy,
:class:`ProcessCommit`, is the read side's :class:`~lagompy.readside._worker.ProjectionCommit`
(retries, ``on_failure`` stop or skip, failure lines, one-by-one after a failing batch) with
its transaction replaced::

    for each event of the batch:        (outside any transaction)
        key = associate(event)          None: ignored (the position still advances)
        state = the key's state         (stored, or initial_state; cached within the batch)
        state = await handle(ctx, state, event)     commands sent here, ids from the offset
    one transaction: the new states, the timers scheduled or cancelled, the position,
                     fenced by the lease's epoch

A worker that dies between the sends and the commit re-runs the events: the same command ids,
answered from the entities' stored replies (exactly-once effect).

On a journal placed on several databases, a manager whose source is an entity has one worker
per (tag, database): its ``tag`` is the partition's key (``tag@database`` beyond the home
database: its lease, position, states, timers and failures), ``journal_tag`` the tag it reads
from that database's journal; the command and timer ids of an event of a database other than
the home one name it (offsets of two databases collide). The worker's timer loop
fires the partition's due timers while it holds the lease and runs: ``on_timer``, then the
timer's deletion, the key's new state and the (unchanged) position in one transaction; a
failing timer follows the same retry, stop or skip path as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from lagompy.consumer._core import ConsumerStopped, EventConsumer, PageSource
from lagompy.consumer._members import Membership
from lagompy.errors import (
    JournalUnavailable,
    LagompyError,
    LeaseLost,
    ReadSideHandlerFailed,
)
from lagompy.journal._journal import EventEnvelope, Journal, TagPage, now_us
from lagompy.journal._placement import HOME
from lagompy.journal._tailing import PageTailer
from lagompy.process._manager import (
    ProcessContext,
    ProcessManager,
    RefSource,
    check_key,
    event_origin,
    offset_key,
    timer_base,
    timer_base_of_timer,
)
from lagompy.process._store import TIMER, KeyEntry, ProcessStore, TimerRow
from lagompy.readside._processor import SqlReadSideProcessor
from lagompy.readside._settings import ReadSideSettings
from lagompy.readside._store import FAILED, Flags, Lease, OffsetStore
from lagompy.readside._worker import (
    ProjectionCommit,
    _HookFailed,
    _wanted_type_names,
    default_owner,
    describe_error,
)
from lagompy.sql._database import Database
from lagompy.topic._topic import Message
from lagompy.topic._transport import MessageFeed
from lagompy.topic._worker import FeedPages

log = logging.getLogger("lagompy.process")

__all__ = ["ManagerProcessor", "ProcessCommit", "ProcessWorker", "processor_for"]

#: Events whose handlers run together (each key's in order, the keys concurrently) before
#: the batch checks ``max_batch_seconds``.
CHUNK = 256
#: Timers fired per query of the due ones.
TIMER_PAGE = 100
#: The longest a timer loop sleeps before it looks for due timers again (a timer another
#: process scheduled for this partition, or one a restart left behind).
TIMER_POLL = 1.0


class ManagerProcessor(SqlReadSideProcessor):
    """A process manager as the read side's machinery sees it: its offsets named
    ``process:<name>``, its source's tags and entities (its ``handle`` is never called: the
    strategy runs the manager itself)."""

    manager: ProcessManager[Any]

    async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
        raise NotImplementedError  # ProcessCommit replaces the transaction


def processor_for(manager: ProcessManager[Any]) -> ManagerProcessor:
    cls = type(manager)
    cls.validate()
    processor_cls = type(
        f"{cls.__name__}Processor",
        (ManagerProcessor,),
        {
            "name": offset_key(cls.name),
            "tag": cls.tag_of(),
            "entities": cls.source_entities(),
            "__module__": __name__,
        },
    )
    processor: ManagerProcessor = processor_cls()
    processor.manager = manager
    return processor


def _first(error: BaseException) -> BaseException:
    """``error``, or the first error of a task group's (the handler that failed first)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _check_state(manager: str, hook: str, state: object, ctx: ProcessContext) -> None:
    """A handler returns the new state: a dataclass instance (anything after ``end()``)."""
    if ctx.ended or (dataclasses.is_dataclass(state) and not isinstance(state, type)):
        return
    raise TypeError(
        f"process manager {manager!r}: {hook}() returned {state!r:.80} for key {ctx.key!r}; "
        "it must return the new state (a dataclass instance), or call ctx.end()"
    )


class _Watched:
    """A page source that tells its worker whether the last page reached the head (a short
    page), for the timers (see ``ProcessWorker.horizon_us``)."""

    def __init__(self, source: PageSource, worker: ProcessWorker) -> None:
        self.source = source
        self.worker = worker
        self.reading: str = getattr(source, "reading", "reading the journal")

    async def start(self) -> None:
        await self.source.start()

    async def next_page(self, after: int) -> TagPage:
        page = await self.source.next_page(after)
        short = not page.full and page.error is None
        worker = self.worker
        # At the head once this page is committed (not before: a cancelling event in it must
        # be handled before the timer it cancels may fire).
        worker.head_at = page.last_offset if short else None
        if short and not page.envelopes:
            worker.strategy.timers_changed.set()
        return page

    async def wait(self, limit: float | None = None) -> None:
        await self.source.wait(limit)

    def wake(self) -> None:
        self.source.wake()

    async def close(self) -> None:
        await self.source.close()


class ProcessCommit(ProjectionCommit):
    """The process manager's :class:`~lagompy.consumer.CommitStrategy` (see the module docs).
    Commits of events and firings of timers take turns (one lock), so that each writes the
    position the other left."""

    processor: ManagerProcessor

    def __init__(
        self,
        processor: ManagerProcessor,
        database: Database,
        store: OffsetStore,
        settings: ReadSideSettings,
        *,
        states: ProcessStore,
        entities: RefSource,
        placed_on: str = HOME,
        siblings: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(processor, database, store, settings)
        #: The partitions of the same journal tag on the journal's other databases: a key one
        #: of them stored moved here with its entity (see :mod:`lagompy.process._store`).
        self.siblings = siblings
        #: The journal's database the events come from (:data:`HOME` unless the journal is
        #: placed on several): named in the command and timer ids of its events.
        self.placed_on = placed_on
        self.manager = processor.manager
        self.states = states
        self.entities = entities
        self.lock = asyncio.Lock()
        #: The source is a topic: the pages hold its messages (the event is the payload, the
        #: entity id the message's key), not envelopes.
        self.messages = type(self.manager).topic() is not None
        #: The time of the last event committed (microseconds): see ``horizon_us``.
        self.handled_until_us = 0
        #: Set when a commit stored a timer (the timer loop looks again at once).
        self.timers_changed = asyncio.Event()

    def _context(self, key: str, **kwargs: Any) -> ProcessContext:
        return ProcessContext(
            type(self.manager).name,
            key,
            entities=self.entities,
            timer_messages=type(self.manager).timer_messages,
            **kwargs,
        )

    # ------------------------------------------------------------------ events

    async def commit_batch(
        self,
        consumer: EventConsumer,
        lease: Lease,
        envelopes: list[EventEnvelope[Any]],
        *,
        upto: int | None = None,
    ) -> tuple[int, Flags]:
        async with self.lock:
            return await self._handle(consumer, lease, envelopes, upto)

    async def commit_alone(
        self, consumer: EventConsumer, lease: Lease, envelope: EventEnvelope[Any]
    ) -> Flags:
        """An event retried alone: the manager's own transaction, as for a batch."""
        return (await self.commit_batch(consumer, lease, [envelope]))[1]

    async def _handle(
        self,
        consumer: EventConsumer,
        lease: Lease,
        envelopes: list[EventEnvelope[Any]],
        upto: int | None,
    ) -> tuple[int, Flags]:
        """Handle a prefix of ``envelopes`` (chunk by chunk, until ``max_batch_seconds``), then
        store the keys' states, their timers and the position in one transaction."""
        entries: dict[str, KeyEntry] = {}
        started = time.monotonic()
        done = 0
        try:
            while done < len(envelopes):
                chunk = envelopes[done : done + CHUNK]
                await self._handle_chunk(consumer.tag, chunk, entries)
                done += len(chunk)
                if time.monotonic() - started >= self.settings.max_batch_seconds:
                    break
        except Exception as e:  # a handler's error (the first of the keys' tasks)
            error = _first(e)
            if isinstance(error, (LeaseLost, ConsumerStopped, JournalUnavailable)):
                raise error from None
            raise _HookFailed(error) from error
        offset = envelopes[done - 1].offset if upto is None or done < len(envelopes) else upto
        rate = consumer.rate.add(done)
        clear = consumer.passes_failure(offset)
        async with self.projection.write() as conn:
            await self.states.write(conn, consumer.tag, entries.values())
            flags = await self.store.commit(
                conn, lease, offset, self.settings.lease_ttl, events_per_s=rate, clear_failure=clear
            )
        consumer.moved(offset, clear, flags)
        consumer.events_handled += done
        consumer.transactions += 1
        last = int(envelopes[done - 1].timestamp.timestamp() * 1_000_000)
        self.handled_until_us = max(self.handled_until_us, last)
        self.timers_changed.set()  # new timers, or further in time: the timer loop looks
        return done, flags

    async def _handle_chunk(
        self, tag: str, chunk: list[EventEnvelope[Any]], entries: dict[str, KeyEntry]
    ) -> None:
        """Run the handlers of ``chunk``: each key's events in offset order, the keys
        concurrently (their commands reach the entities together, in the runtime's batches)."""
        manager = self.manager
        name = type(manager).name
        chains: dict[str, list[tuple[EventEnvelope[Any], Any, str]]] = {}
        for envelope in chunk:
            if self.messages:  # a Message (see FeedPages)
                message = cast(Message[Any], envelope)
                event, entity_id = message.payload, message.key
            else:
                event, entity_id = envelope.event, envelope.entity_id
            key = manager.associate(event, entity_id)
            if key is not None:
                chains.setdefault(check_key(name, key), []).append((envelope, event, entity_id))
        missing = [k for k in chains if k not in entries]
        if missing:
            entries.update(
                await self.states.load_many(
                    missing, tag, type(manager).initial_state, siblings=self.siblings
                )
            )

        async def chain(entry: KeyEntry, events: list[tuple[EventEnvelope[Any], Any, str]]) -> None:
            for envelope, event, entity_id in events:
                offset = envelope.offset
                # A message's offset is unique in its partition only (see event_origin).
                partition = cast(Message[Any], envelope).partition if self.messages else None
                ctx = self._context(
                    entry.key,
                    origin=event_origin(name, offset, self.placed_on, partition),
                    timer_base=timer_base(offset, self.placed_on, partition),
                    now_us=int(envelope.timestamp.timestamp() * 1_000_000),
                    offset=offset,
                    entity_id=entity_id,
                )
                state = await manager.handle(ctx, entry.current(), event)
                _check_state(name, "handle", state, ctx)
                entry.apply(state, ctx)

        if len(chains) == 1:  # no task needed
            ((key, events),) = chains.items()
            await chain(entries[key], events)
            return
        async with asyncio.TaskGroup() as group:
            for key, events in chains.items():
                group.create_task(chain(entries[key], events))

    async def _commit_offset(
        self, consumer: EventConsumer, lease: Lease, offset: int, *, skipped: int = 0
    ) -> Flags:
        async with self.lock:
            return await super()._commit_offset(consumer, lease, offset, skipped=skipped)

    # ------------------------------------------------------------------ timers

    async def fire(self, consumer: EventConsumer, lease: Lease, timer: TimerRow) -> Flags:
        """Fire one due timer: ``on_timer``, then its deletion, the key's state and the
        position (unchanged) in one transaction."""
        manager = self.manager
        name = type(manager).name
        async with self.lock:
            try:
                entry = await self.states.load(
                    timer.key, consumer.tag, type(manager).initial_state, siblings=self.siblings
                )
                if entry.moved_from is not None:
                    # The key moved to this partition's sibling with its entity after this
                    # timer was listed here: that partition's worker fires it.
                    return consumer.flags
                ctx = self._context(
                    timer.key,
                    origin=f"{name}:timer:{timer.timer_id}",
                    timer_base=timer_base_of_timer(timer.timer_id),
                    now_us=timer.due_us,
                    offset=consumer.offset,
                    timer_id=timer.timer_id,
                )
                state = await manager.on_timer(ctx, entry.current(), timer.message)
                _check_state(name, "on_timer", state, ctx)
            except (LeaseLost, ConsumerStopped, JournalUnavailable):
                raise
            except Exception as e:
                raise _HookFailed(e) from e
            entry.apply(state, ctx)
            offset = consumer.offset
            clear = consumer.passes_failure(offset)  # a timer that stopped it, fired now
            async with self.projection.write() as conn:
                await self.states.fired(conn, timer.timer_id)
                await self.states.write(conn, consumer.tag, [entry])
                flags = await self.store.commit(
                    conn, lease, offset, self.settings.lease_ttl, clear_failure=clear
                )
            consumer.moved(offset, clear, flags)
            consumer.transactions += 1
            if ctx.scheduled:
                self.timers_changed.set()
            return flags

    async def fire_one(
        self, consumer: EventConsumer, lease: Lease, timer: TimerRow, *, raising: bool = False
    ) -> Flags:
        """Fire ``timer``, retried with backoff ``max_attempts`` times; then ``on_failure``:
        ``skip`` drops the timer, ``stop`` records the failure (the partition is ``failed``
        until resumed, which retries the timer) and, when ``raising``, raises it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.fire(consumer, lease, timer)
            except (LeaseLost, ConsumerStopped, JournalUnavailable):
                raise
            except Exception as e:
                consumer.failures += 1
                where = consumer.where()
                failure = ReadSideHandlerFailed(
                    f"{where}: on_timer failed for timer {timer.timer_id!r} of key "
                    f"{timer.key!r}, attempt {attempt}/{self.settings.max_attempts}: "
                    f"{describe_error(e)}",
                    processor=consumer.name,
                    tag=consumer.tag,
                    offset=consumer.offset,
                    entity_type=TIMER,
                    entity_id=timer.timer_id,
                    attempts=attempt,
                )
                consumer.last_error = str(failure)
                original = e.error if isinstance(e, _HookFailed) else e
                log.error("%s", failure, exc_info=original if attempt == 1 else None)
                if attempt < self.settings.max_attempts:
                    await self._record(consumer, lease, failure, "retrying")
                    await consumer.sleep(consumer.backoff(attempt))
                    continue
                if self.settings.on_failure == "skip":
                    async with self.lock, self.projection.write() as conn:
                        await self.states.fired(conn, timer.timer_id)
                        await self.store.commit(
                            conn, lease, consumer.offset, self.settings.lease_ttl, skipped=1
                        )
                    return await self._record(
                        consumer, lease, failure, "running", prefix="timer dropped: "
                    )
                flags = await self._record(consumer, lease, failure, FAILED)
                consumer.state = FAILED
                log.error(
                    "%s: stopped at timer %r after %d attempts: fix the cause and `lagompy "
                    "process-managers resume %s` retries it, or `lagompy process-managers "
                    "skip %s --tag %s` drops it",
                    where,
                    timer.timer_id,
                    attempt,
                    type(self.manager).name,
                    type(self.manager).name,
                    consumer.tag,
                )
                if raising:
                    raise failure from e
                return flags


class ProcessWorker(EventConsumer):
    """Runs one process manager on one partition of its source (see the module's docs): on a
    journal placed on several databases, ``tag`` is the partition's key, ``journal_tag`` the
    tag it reads from ``journal`` (database ``placed_on``'s).
    :meth:`run` goes on until :meth:`stop` (with the timer loop beside the tail);
    :meth:`catch_up` handles the events in the journal now, :meth:`fire_due_timers` the
    timers due now."""

    settings: ReadSideSettings
    store: OffsetStore
    strategy: ProcessCommit

    def __init__(
        self,
        processor: ManagerProcessor,
        tag: str,
        *,
        journal: Journal,
        database: Database,
        entities: RefSource,
        settings: ReadSideSettings,
        owner: str | None = None,
        feed: MessageFeed | None = None,
        membership: Membership | None = None,
        journal_tag: str | None = None,
        placed_on: str = HOME,
        siblings: frozenset[str] = frozenset(),
    ) -> None:
        store = OffsetStore(database)
        name = type(processor.manager).name
        self.states = ProcessStore(database, name, journal.serializer)
        event_types = None
        if feed is not None:  # a topic source: its partition's messages, like a subscriber's
            topic = type(processor.manager).topic()
            assert topic is not None
            reading = f"reading topic {topic.name!r} partition tag {tag!r}"
            source: Callable[[], PageSource] = functools.partial(
                FeedPages, feed, settings.max_batch, reading
            )
        else:
            event_types = _wanted_type_names(processor, journal.serializer)
            source = functools.partial(
                PageTailer,
                journal,
                tag=tag if journal_tag is None else journal_tag,
                event_types=event_types,
                page_size=settings.max_batch,
                settings=settings.tail,
            )
        super().__init__(
            processor.name,
            tag,
            pages=lambda: _Watched(source(), self),
            journal=journal if feed is None else None,
            store=store,
            strategy=ProcessCommit(
                processor,
                database,
                store,
                settings,
                states=self.states,
                entities=entities,
                placed_on=placed_on,
                siblings=siblings,
            ),
            settings=settings,
            owner=owner or default_owner(),
            event_types=event_types,
            kind="process manager",
            describe_error=describe_error,
            logger=log,
            membership=membership,
            journal_tag=journal_tag,
        )
        self.processor = processor
        #: The journal's database this worker follows (:data:`HOME` unless placed on several).
        self.placed_on = placed_on
        self.manager = processor.manager
        self.feed = feed
        #: Timers this worker fired.
        self.timers_fired = 0
        #: The position at which the worker is at its partition's head (the end of the last
        #: page it read, when that page was short), or None.
        self.head_at: int | None = None

    async def run(self) -> None:
        timers = asyncio.create_task(self._timer_loop(), name=f"process timers {self.tag}")
        try:
            await super().run()
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConsumerStopped):
                await timers

    async def fire_due_timers(self, *, force: bool = False) -> int:
        """Fire the timers of this partition due now and return how many fired: under the
        running worker's lease, or else (a worker that is not running: tests, tools) under
        the lease it takes for the call (``force``: from whoever holds it), as
        :meth:`catch_up` does. A timer that keeps failing raises with ``on_failure="stop"``."""
        lease = self.lease
        if lease is not None:
            return await self._fire_due(lease, raising=False)
        lease = await self._hold(force=force)
        self.lease = lease
        try:
            return await self._fire_due(lease, raising=True)
        finally:
            with contextlib.suppress(LagompyError):
                await self.store.release(lease, state="idle")
            self.lease = None

    def horizon_us(self) -> int:
        """Up to when timers may fire: now once the worker has caught up with its partition,
        else the time of the last event it handled (an event that cancels a timer is handled
        before that timer fires, after a restart or behind a backlog alike)."""
        now = now_us()
        return now if self.caught_up else min(now, self.strategy.handled_until_us)

    @property
    def caught_up(self) -> bool:
        """The worker has committed up to its partition's head (as its last read saw it)."""
        return self.head_at is not None and self.offset >= self.head_at

    async def _fire_due(self, lease: Lease, *, raising: bool, until_us: int | None = None) -> int:
        fired = 0
        while True:
            due = await self.states.due(
                self.tag, now_us() if until_us is None else until_us, TIMER_PAGE
            )
            for timer in due:
                if self.flags.hold and not raising:
                    return fired
                await self.strategy.fire_one(self, lease, timer, raising=raising)
                fired += 1
                self.timers_fired += 1
            if len(due) < TIMER_PAGE:
                return fired

    async def _timer_loop(self) -> None:
        changed = self.strategy.timers_changed
        while True:
            wait = TIMER_POLL
            lease = self.lease
            changed.clear()
            if lease is not None and self.state == "running" and not self.flags.hold:
                try:
                    await self._fire_due(lease, raising=False, until_us=self.horizon_us())
                    due = await self.states.next_due(self.tag)
                    if due is not None and self.caught_up:
                        wait = min(wait, max(0.0, (due - now_us()) / 1e6))
                except ConsumerStopped:
                    return
                except Exception as e:  # the lease moved on, the database is away...
                    log.warning(
                        "%s: timers: %s",
                        self.where(),
                        describe_error(e),
                        exc_info=not isinstance(e, LagompyError),
                    )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()
