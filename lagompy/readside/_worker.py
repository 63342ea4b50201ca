"""One :class:`ReadSideWorker` per (processor, tag): the consumer core with the projection's
commit strategy.

The worker is an :class:`~lagompy.consumer.EventConsumer` (lease, prepare, catch up, tail,
backoff, status: see :mod:`lagompy.consumer`) whose :class:`~lagompy.consumer.CommitStrategy`
is :class:`ProjectionCommit`: each batch of handler writes *and* the new offset commit in one
transaction of the projection database, fenced by the lease's epoch, so a worker whose lease
another took can never commit (at most one worker per (processor, tag), exactly-once effect
across crashes). After the catch-up it waits for new events like every tailer (PostgreSQL: the
journal's NOTIFY through :class:`lagompy.journal.JournalNotifier`; SQLite: a short poll; see
``ReadSideSettings.tail``) and reads on at once: no fixed delay.

A handler that raises is retried with backoff; after ``max_attempts`` the worker either stops
(``on_failure="stop"``: the row is paused with the failure, ``resume`` retries) or skips the
event (``"skip"``: the offset moves past it without its writes) or parks it (``"park"``: the
event goes to ``lagompy_parked`` and the offset past it, in one fenced transaction; see
:mod:`lagompy.readside._parked`). Every failure is logged with
the processor, tag, offset, entity and sequence number and shows in the status.
:func:`run_global_prepare` runs a processor's ``global_prepare`` under its own lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError

from lagompy.consumer._core import ConsumerStopped as _Stopped
from lagompy.consumer._core import EventConsumer, Progress
from lagompy.consumer._members import Membership, member_ttl
from lagompy.errors import (
    ConfigurationError,
    EventDecodeError,
    JournalError,
    JournalUnavailable,
    LagompyError,
    LeaseLost,
    ReadSideDecodeFailed,
    ReadSideHandlerFailed,
    UnknownType,
)
from lagompy.journal._journal import EventEnvelope, Journal, TagPage
from lagompy.journal._placement import Placement
from lagompy.readside._batching import Learnt, deferring
from lagompy.readside._parked import ConsumerKind, ParkedEvent, ParkedStore
from lagompy.readside._processor import ReadSideProcessor, SqlReadSideProcessor
from lagompy.readside._settings import ReadSideSettings, _settings
from lagompy.readside._store import (
    FAILED,
    GLOBAL_TAG,
    Flags,
    Lease,
    OffsetStore,
)
from lagompy.serialization import Serializer
from lagompy.sql._database import Database, SqliteWritesFailed

log = logging.getLogger("lagompy.readside")

__all__ = [
    "JournalEvents",
    "ParkedSource",
    "Partition",
    "ProjectionCommit",
    "ReadSideWorker",
    "default_owner",
    "describe_error",
    "error_class_of",
    "membership_for",
    "partitions_of",
    "run_global_prepare",
]


def membership_for(
    name: str, tags: Sequence[str], database: Database, settings: ReadSideSettings, member: str
) -> Membership | None:
    """This process's membership (as ``member``) of consumer ``name`` on ``tags``, registered
    beside its offsets in ``database``; None when ``settings.rebalance`` is off."""
    if not settings.rebalance:
        return None
    return Membership(
        name,
        tags,
        OffsetStore(database),
        member=member,
        ttl=member_ttl(settings.lease_ttl, settings.renew_interval),
        interval=settings.renew_interval,
        logger=log,
    )


@dataclass(frozen=True)
class Partition:
    """One partition of a processor: the journal ``tag`` it reads on ``database`` (of a
    journal's :class:`~lagompy.journal._placement.Placement`), and its ``key`` (its offset
    row, lease and worker): the tag itself on the home database, ``tag@database`` elsewhere."""

    key: str
    tag: str
    database: str


def _takes_every_event(processor: ReadSideProcessor) -> bool:
    """Whether ``processor`` wants every event: no ``event_types`` and ``wants`` as the base
    class has it."""
    return processor.event_types is None and type(processor).wants is ReadSideProcessor.wants


def partitions_of(processor: ReadSideProcessor, placement: Placement) -> list[Partition]:
    """Every partition of ``processor`` on ``placement``'s databases: one per tag on a journal
    of one database (keyed by the tag, as ever), one per (tag, database) on several."""
    return [
        Partition(key, tag, database)
        for tag in processor.tags()
        for key, database in placement.partitions(tag)
    ]


def default_owner() -> str:
    """A worker name unique to this process and call: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _HookFailed(LagompyError):
    """Internal: a processor hook raised ``error`` inside a projection transaction. Raised
    inside the transaction, so that the database layer (which passes lagompy errors through)
    does not relabel the hook's own error as a failure of the transaction."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def describe_error(error: BaseException) -> str:
    """An error of a hook or of a projection transaction as failures show it: a database
    error by the driver's class, SQLSTATE and message (never the SQL text or its parameters,
    nor lagompy's own wrapping); anything else as ``Class: message``."""
    if isinstance(error, _HookFailed):
        error = error.error
    cause: BaseException = error
    if isinstance(error, JournalError) and error.__cause__ is not None:
        cause = error.__cause__  # the projection transaction itself failed (at commit)
    if isinstance(cause, DBAPIError) and cause.orig is not None:
        orig: BaseException = cause.orig
        driver = orig.__cause__ if orig.__cause__ is not None else orig
        code = getattr(orig, "sqlstate", None) or getattr(driver, "sqlstate", None)
        sqlstate = f" (SQLSTATE {code})" if code else ""
        return f"database error {type(driver).__name__}{sqlstate}: {orig}"
    return f"{type(error).__name__}: {error}"


def error_class_of(error: BaseException) -> str:
    """The class of an error as :func:`describe_error` names it: the hook's own exception's
    class, or ``database error <driver class>``."""
    if isinstance(error, _HookFailed):
        error = error.error
    cause: BaseException = error
    if isinstance(error, JournalError) and error.__cause__ is not None:
        cause = error.__cause__
    if isinstance(cause, DBAPIError) and cause.orig is not None:
        orig: BaseException = cause.orig
        driver = orig.__cause__ if orig.__cause__ is not None else orig
        return f"database error {type(driver).__name__}"
    if isinstance(error, EventDecodeError) and isinstance(error.__cause__, LagompyError):
        return type(error.__cause__).__name__
    return type(error).__name__


class ParkedSource(Protocol):
    """What a consumer's parked rows hold of an event, and how a retry gets the event back:
    a read side re-reads it from the journal (:class:`JournalEvents`); a topic subscriber
    keeps the message itself (``lagompy.topic``: HTTP and NATS messages are not in this
    database's journal)."""

    #: ``read-side`` or ``subscriber``.
    kind: ConsumerKind

    def event_type(self, envelope: EventEnvelope[Any]) -> str | None:
        """The stored type name of the envelope's event (or message)."""
        ...

    def message_of(self, envelope: EventEnvelope[Any]) -> str | None:
        """What to keep to retry the event later (None: nothing, it is re-read)."""
        ...

    async def envelope_of(self, row: ParkedEvent) -> EventEnvelope[Any]:
        """The parked event again, for a retry (raises when it cannot be had)."""
        ...


class JournalEvents:
    """A read side's :class:`ParkedSource`: a parked event is re-read from the journal by its
    offset."""

    kind: ConsumerKind = "read-side"

    def __init__(self, journal: Journal, tag: str | None = None) -> None:
        self.journal = journal
        #: The journal tag of the rows' events (None: a row's tag is it; a partition of a
        #: journal on several databases keys its rows ``tag@database``).
        self.tag = tag

    def event_type(self, envelope: EventEnvelope[Any]) -> str | None:
        try:
            return self.journal.serializer.type_name_of(type(envelope.event))
        except LagompyError:
            return type(envelope.event).__qualname__

    def message_of(self, envelope: EventEnvelope[Any]) -> str | None:
        return None

    async def envelope_of(self, row: ParkedEvent) -> EventEnvelope[Any]:
        tag = row.tag if self.tag is None else self.tag
        page = await self.journal.read_tag(tag, after_offset=row.offset - 1, limit=1)
        if page.error is not None:
            raise page.error
        if not page.envelopes or page.envelopes[0].offset != row.offset:
            raise ConfigurationError(
                f"the event at offset {row.offset} of tag {tag!r} is no longer in the "
                "journal (deleted): discard its parked row"
            )
        return page.envelopes[0]


def _wanted_type_names(
    processor: ReadSideProcessor, serializer: Serializer
) -> frozenset[str] | None:
    """The stored type names a processor with ``event_types`` wants (its classes and their
    registered subclasses); None: every event."""
    types = processor.event_types
    if types is None:
        return None
    for t in types:
        if not serializer.is_registered(t):
            serializer.register(t)
    return serializer.type_names_of(types)


_EventFailure = ReadSideHandlerFailed | ReadSideDecodeFailed


class ProjectionCommit:
    """The read side's :class:`~lagompy.consumer.CommitStrategy`: a processor's handler writes
    and the offset in one transaction of the projection database (exactly once).

    A page commits in as few transactions as ``max_batch_seconds`` allows; after a failing
    batch the rest of the page goes one event per transaction, so that the failing event is
    found and the ones before it commit. A failing event is retried ``max_attempts`` times,
    then ``on_failure`` applies: ``stop`` (the row is ``failed`` until resumed, skipped or
    set), ``skip`` (the offset moves past it, counted as skipped) or ``park`` (the event goes
    to the parked table and the offset past it, in one transaction). :meth:`idle` runs the
    retries operators asked for of parked events."""

    def __init__(
        self,
        processor: SqlReadSideProcessor,
        projection: Database,
        store: OffsetStore,
        settings: ReadSideSettings,
        source: ParkedSource | None = None,
    ) -> None:
        if source is None and settings.on_failure == "park":
            raise ConfigurationError(
                f"{processor.name!r}: on_failure='park' is for read-side processors and topic "
                "subscribers (whose events a retry can run again); choose 'stop' or 'skip'"
            )
        self.processor = processor
        self.projection = projection
        self.store = store
        self.settings = settings
        #: What parked rows keep of an event and how a retry gets it (None: no parking).
        self.source = source
        self.parked = ParkedStore(projection)
        self._batch_mode = type(processor).batch_mode()
        #: Handlers of several events get a deferring connection (until one defeats it).
        self._defer = True
        #: What the deferring connections learnt of the handlers' statements, batch to batch.
        self._learnt = Learnt(regroup=not getattr(processor, "keep_write_order", False))
        #: SQLite: a deferred batch's writes and its offset go to the driver in one call, so
        #: that the file's write lock is held for their own time (see
        #: ``OffsetStore.commit_in_one_call``).
        self._one_call = projection.dialect == "sqlite"
        #: (offset, attempts) of the undecodable event being retried.
        self._undecodable_at: tuple[int, int] | None = None

    # ------------------------------------------------------------------ the protocol

    async def prepare(self, consumer: EventConsumer, lease: Lease, *, clear_stall: bool) -> None:
        async with self.projection.write() as conn:
            try:
                await self.processor.prepare(conn, consumer.journal_tag)
            except Exception as e:
                raise _HookFailed(e) from e
            consumer.set_flags(
                await self.store.commit(
                    conn,
                    lease,
                    consumer.offset,
                    self.settings.lease_ttl,
                    state="preparing",
                    clear_failure=clear_stall,
                )
            )

    async def commit(
        self, consumer: EventConsumer, lease: Lease, page: TagPage, *, ignore_pause: bool
    ) -> None:
        """Commit the page in as few transactions as the bounds allow, up to its last offset
        (past the events not wanted)."""
        envelopes = page.envelopes
        pos = 0
        flags = consumer.flags
        while pos < len(envelopes):
            if flags.hold and not ignore_pause:
                return
            try:
                done, flags = await self.commit_batch(
                    consumer, lease, envelopes[pos:], upto=page.last_offset
                )
                pos += done
            except (LeaseLost, _Stopped, JournalUnavailable):
                raise
            except Exception as e:
                log.warning(
                    "%s: a batch of %d events from offset %d failed (%s); handling them one by one",
                    consumer.where(),
                    len(envelopes) - pos,
                    envelopes[pos].offset,
                    describe_error(e),
                )
                for envelope in envelopes[pos:]:
                    flags = await self._commit_one(consumer, lease, envelope)
                    if flags.hold and not ignore_pause:
                        return
                pos = len(envelopes)
        if consumer.offset < page.last_offset and (ignore_pause or not flags.hold):
            await self._commit_offset(consumer, lease, page.last_offset)

    async def undecodable(
        self, consumer: EventConsumer, lease: Lease, error: EventDecodeError
    ) -> None:
        """Retried like a failing handler (the consumer reads it again), then ``on_failure``
        applies."""
        offset = error.offset
        assert offset is not None  # read_tag sets it
        previous = self._undecodable_at
        attempt = previous[1] + 1 if previous is not None and previous[0] == offset else 1
        self._undecodable_at = (offset, attempt)
        consumer.failures += 1
        hint = ""
        if isinstance(error.__cause__, UnknownType):
            hint = (
                " (declare its entity in the processor's `entities`, or its class in "
                "`event_types` if the processor handles it)"
            )
        failure = ReadSideDecodeFailed(
            f"{consumer.where()}: the event at offset {offset} cannot be decoded, attempt "
            f"{attempt}/{self.settings.max_attempts}: {error}{hint}",
            processor=consumer.name,
            tag=consumer.tag,
            offset=offset,
            entity_type=error.entity_type,
            entity_id=error.entity_id,
            seq_nr=error.seq_nr,
            attempts=attempt,
        )
        consumer.last_error = str(failure)
        log.error("%s", failure)
        if attempt < self.settings.max_attempts:
            await self._record(consumer, lease, failure, "retrying")
            await consumer.sleep(consumer.backoff(attempt))
            return
        self._undecodable_at = None
        await self._give_up(consumer, lease, failure, error, None)

    # ------------------------------------------------------------------ transactions

    async def commit_batch(
        self,
        consumer: EventConsumer,
        lease: Lease,
        envelopes: list[EventEnvelope[Any]],
        *,
        upto: int | None = None,
    ) -> tuple[int, Flags]:
        """Handle ``envelopes`` (or as many as ``max_batch_seconds`` allows) and store the
        offset in one transaction; ``upto``: the offset to store once all are handled (the
        end of their page). Returns how many were handled and the row's flags.

        Several events (or, on SQLite, one event as well: the writes then go with the offset
        and the COMMIT in one call, so that the file's write lock is not held while the event
        loop gets round to each statement; an event retried alone after a failed batch always
        gets the plain connection): the handlers get a
        :class:`~lagompy.readside._batching.DeferringConnection` (writes sent as executemany
        runs at the end, or before a read). A handler that defeats
        it (reads a deferred write's result...) gets the batch again with the plain connection,
        and so do all its later batches."""
        defer = self._defer and (len(envelopes) > 1 or self._one_call)
        try:
            return await self._transaction(consumer, lease, envelopes, upto, defer=defer)
        except _HookFailed:
            if not defer or self._defer:
                raise
        return await self._transaction(consumer, lease, envelopes, upto, defer=False)

    def _defeated(self, why: str) -> None:
        self._defer = False
        log.info(
            "read-side processor %r: handlers run unbatched from now on: %s",
            self.processor.name,
            why,
        )

    async def _transaction(
        self,
        consumer: EventConsumer,
        lease: Lease,
        envelopes: list[EventEnvelope[Any]],
        upto: int | None,
        *,
        defer: bool,
    ) -> tuple[int, Flags]:
        s = self.settings
        processor = self.processor
        # Begun at the first statement: with deferred writes, after the handlers ran (they
        # hold no SQLite write lock while the other writers of the file wait for it).
        async with self.projection.write(lazy_begin=defer) as conn:
            handler_conn, deferred = conn, None
            if defer:
                handler_conn, deferred = deferring(conn, self._learnt, self._defeated)
            #: SQLite: the writes as driver statements, sent with the offset in one call.
            writes: list[tuple[str, list[Any]]] | None = None
            try:
                every = _takes_every_event(processor)
                if self._batch_mode:
                    done = len(envelopes)
                    wanted = (
                        list(envelopes) if every else [e for e in envelopes if processor.wants(e)]
                    )
                    if wanted:
                        await processor.handle_batch(handler_conn, wanted)
                else:
                    clock, limit = time.monotonic, s.max_batch_seconds
                    started = clock()
                    done = 0
                    # (the handler and the filter looked up once, and no filter called when
                    # it takes every event: per event, this loop is all the framework's work
                    # around a handler)
                    handle = processor.handle
                    wants = None if every else processor.wants
                    for envelope in envelopes:
                        if wants is None or wants(envelope):
                            await handle(handler_conn, envelope)
                        done += 1
                        if clock() - started >= limit:
                            break
                if deferred is not None:
                    if self._one_call and not conn.in_transaction():
                        writes = deferred.driver_writes()
                    if writes is None:
                        await deferred.finish()
            except Exception as e:
                raise _HookFailed(e) from e
            offset = envelopes[done - 1].offset if upto is None or done < len(envelopes) else upto
            rate = consumer.rate.add(done)
            clear = consumer.passes_failure(offset)
            flags = None
            if writes is not None:
                try:
                    flags = await self.store.commit_in_one_call(
                        conn, writes, lease, offset, s.lease_ttl, events_per_s=rate,
                        clear_failure=clear,
                    )  # fmt: skip
                except SqliteWritesFailed as e:
                    raise _HookFailed(e.error) from e.error
                if flags is None:  # no driver form of the offset's write: the usual way
                    for sql, rows in writes:
                        await conn.exec_driver_sql(sql, rows)
            if (
                flags is None
                and deferred is not None
                and not self._one_call
                and not conn.in_transaction()
            ):
                # PostgreSQL: the handlers sent nothing (a subscriber or a processor that
                # writes nothing for these events): the position alone, in one round trip.
                flags = await self.store.commit_alone(
                    conn, lease, offset, s.lease_ttl, events_per_s=rate, clear_failure=clear
                )
            if flags is None:
                flags = await self.store.commit(
                    conn, lease, offset, s.lease_ttl, events_per_s=rate, clear_failure=clear
                )
        consumer.moved(offset, clear, flags)
        consumer.events_handled += done
        consumer.transactions += 1
        return done, flags

    async def _commit_offset(
        self, consumer: EventConsumer, lease: Lease, offset: int, *, skipped: int = 0
    ) -> Flags:
        """Store ``offset`` with no handler (events not wanted, or a skipped event)."""
        clear = consumer.passes_failure(offset)
        async with self.projection.write() as conn:
            flags = await self.store.commit(
                conn,
                lease,
                offset,
                self.settings.lease_ttl,
                skipped=skipped,
                clear_failure=clear,
            )
        consumer.moved(offset, clear, flags)
        return flags

    async def commit_alone(
        self, consumer: EventConsumer, lease: Lease, envelope: EventEnvelope[Any]
    ) -> Flags:
        """One event in a transaction of its own, as it is retried after its batch failed:
        with the plain connection, so that a handler's own write errors reach it (it may catch
        them), as they would have without batching. A strategy that replaces the transaction
        (the process managers') replaces this too."""
        return (await self._transaction(consumer, lease, [envelope], None, defer=False))[1]

    async def _commit_one(
        self, consumer: EventConsumer, lease: Lease, envelope: EventEnvelope[Any]
    ) -> Flags:
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.commit_alone(consumer, lease, envelope)
            except (LeaseLost, _Stopped, JournalUnavailable):
                raise
            except Exception as e:
                consumer.failures += 1
                failure = self._failure(consumer, envelope, e, attempt)
                consumer.last_error = str(failure)
                # The hook's own traceback, once per event.
                original = e.error if isinstance(e, _HookFailed) else e
                log.error("%s", failure, exc_info=original if attempt == 1 else None)
                if attempt < s.max_attempts:
                    await self._record(consumer, lease, failure, "retrying")
                    await consumer.sleep(consumer.backoff(attempt))
                    continue
                return await self._give_up(consumer, lease, failure, e, envelope)

    # ------------------------------------------------------------------ failures

    async def _give_up(
        self,
        consumer: EventConsumer,
        lease: Lease,
        failure: _EventFailure,
        cause: BaseException,
        envelope: EventEnvelope[Any] | None,
    ) -> Flags:
        """``max_attempts`` ran out for the event of ``failure`` (``envelope``: None when it
        cannot be decoded): skip it, park it or stop (raises ``failure``)."""
        assert failure.offset is not None
        event = (
            f"the event at offset {failure.offset} ({failure.entity_type}/{failure.entity_id} "
            f"sequence number {failure.seq_nr})"
        )
        if self.settings.on_failure == "park":
            await self.park(consumer, lease, failure, cause, envelope)
            flags = await self._record(
                consumer,
                lease,
                failure,
                "running",
                prefix=f"parked after {failure.attempts} attempts: ",
            )
            command = (
                f"lagompy projections parked {consumer.name}"
                if self._source().kind == "read-side"
                else "lagompy topics parked " + " ".join(consumer.name.split(":", 2)[1:])
            )
            log.error(
                "%s: parked %s after %d attempts (`%s` lists it)",
                consumer.where(),
                event,
                failure.attempts,
                command,
            )
            return flags
        if self.settings.on_failure == "skip":
            await self._commit_offset(consumer, lease, failure.offset, skipped=1)
            flags = await self._record(
                consumer,
                lease,
                failure,
                "running",
                prefix=f"skipped after {failure.attempts} attempts: ",
            )
            log.error("%s: skipped %s after %d attempts", consumer.where(), event, failure.attempts)
            return flags
        await self._record(consumer, lease, failure, FAILED)
        consumer.state = FAILED
        log.error(
            "%s: stopped at %s after %d attempts: fix the cause and `lagompy projections resume "
            "%s` retries it, or `lagompy projections skip %s --tag %s` moves past it",
            consumer.where(),
            event,
            failure.attempts,
            consumer.name,
            consumer.name,
            consumer.tag,
        )
        raise failure from cause

    async def park(
        self,
        consumer: EventConsumer,
        lease: Lease,
        failure: _EventFailure,
        cause: BaseException,
        envelope: EventEnvelope[Any] | None,
    ) -> Flags:
        """Write the event of ``failure`` to the parked table and move the offset past it, in
        one transaction fenced by ``lease`` (a lease another took: ``LeaseLost``, neither)."""
        offset = failure.offset
        assert offset is not None
        event_type = None
        if envelope is not None:
            event_type = self._source().event_type(envelope)
        elif isinstance(cause, EventDecodeError):
            event_type = cause.type_name
        clear = consumer.passes_failure(offset)
        async with self.projection.write() as conn:
            await self.parked.park(
                conn,
                kind=self._source().kind,
                consumer=consumer.name,
                tag=consumer.tag,
                offset=offset,
                entity_type=failure.entity_type,
                entity_id=failure.entity_id,
                seq_nr=failure.seq_nr,
                event_type=event_type,
                error_class=error_class_of(cause),
                error=describe_error(cause) if envelope is not None else str(cause),
                attempts=failure.attempts or 0,
                message=None if envelope is None else self._source().message_of(envelope),
            )
            flags = await self.store.commit(
                conn, lease, offset, self.settings.lease_ttl, clear_failure=clear
            )
        consumer.moved(offset, clear, flags)
        return flags

    def _source(self) -> ParkedSource:
        if self.source is None:
            raise ConfigurationError(f"{self.processor.name!r} does not park events")
        return self.source

    # ------------------------------------------------------------------ parked retries

    async def hand_over(self, consumer: EventConsumer, lease: Lease) -> None:
        """Nothing runs under the lease between two batches."""

    async def idle(self, consumer: EventConsumer, lease: Lease) -> None:
        """Run the retries operators asked for of this (consumer, tag)'s parked events, when
        the row's flags say there are some (``Flags.retry``, which the lease renewals and
        commits return: no query of the parked table otherwise)."""
        if self.source is None or not consumer.flags.retry:
            return
        limit = 100
        while True:
            rows = await self.parked.due(consumer.name, consumer.tag, limit)
            for row in rows:
                await self.retry(consumer, lease, row)
            if len(rows) < limit:
                break
        # Done with what was asked until now; the next renewal or commit says if more was.
        consumer.set_flags(consumer.flags._replace(retry=False))

    async def retry(self, consumer: EventConsumer, lease: Lease, row: ParkedEvent) -> bool:
        """Run the handler on ``row``'s event again, delete the row and extend the lease
        (fenced) in one transaction: exactly once. A retry that fails keeps the row with the
        new error. True when it was applied."""
        try:
            envelope = await self._source().envelope_of(row)
            async with self.projection.write() as conn:
                if not await self.parked.take(conn, row):
                    return False  # discarded meanwhile
                try:
                    if self.processor.wants(envelope):
                        if self._batch_mode:
                            await self.processor.handle_batch(conn, [envelope])
                        else:
                            await self.processor.handle(conn, envelope)
                except Exception as e:
                    raise _HookFailed(e) from e
                flags = await self.store.fence(conn, lease, self.settings.lease_ttl)
        except (LeaseLost, _Stopped, JournalUnavailable):
            raise
        except Exception as e:
            consumer.failures += 1
            text = describe_error(e)
            await self.parked.retry_failed(row, error_class=error_class_of(e), error=text)
            log.error(
                "%s: the retry of the parked event at offset %d (%s/%s sequence number %s) "
                "failed: %s",
                consumer.where(),
                row.offset,
                row.entity_type,
                row.entity_id,
                row.seq_nr,
                text,
            )
            return False
        consumer.set_flags(flags)
        consumer.events_handled += 1
        consumer.transactions += 1
        log.warning(
            "%s: retried the parked event at offset %d (%s/%s sequence number %s), out of "
            "order: after the events the consumer handled since",
            consumer.where(),
            row.offset,
            row.entity_type,
            row.entity_id,
            row.seq_nr,
        )
        return True

    def _failure(
        self,
        consumer: EventConsumer,
        envelope: EventEnvelope[Any],
        error: BaseException,
        attempt: int,
    ) -> ReadSideHandlerFailed:
        return ReadSideHandlerFailed(
            f"{consumer.where()}: handler failed at offset {envelope.offset} "
            f"({envelope.entity_type}/{envelope.entity_id} sequence number {envelope.seq_nr}), "
            f"attempt {attempt}/{self.settings.max_attempts}: {describe_error(error)}",
            processor=consumer.name,
            tag=consumer.tag,
            offset=envelope.offset,
            entity_type=envelope.entity_type,
            entity_id=envelope.entity_id,
            seq_nr=envelope.seq_nr,
            attempts=attempt,
        )

    async def _record(
        self,
        consumer: EventConsumer,
        lease: Lease,
        failure: _EventFailure,
        state: str,
        *,
        prefix: str = "",
    ) -> Flags:
        """Store the failure line of ``failure`` (without the processor and tag, which the
        row names) and ``state``."""
        message = str(failure).removeprefix(f"{consumer.where()}: ")
        flags = await self.store.record_failure(
            lease,
            error=prefix + message,
            offset=failure.offset,
            entity_type=failure.entity_type,
            entity_id=failure.entity_id,
            seq_nr=failure.seq_nr,
            attempts=failure.attempts,
            state=state,
        )
        consumer.failed_at(failure.offset, flags)
        return flags


class ReadSideWorker(EventConsumer):
    """Runs one processor on one tag: the consumer core (lease, prepare, catch up, tail,
    backoff, status) committing through :class:`ProjectionCommit`.

    On a journal placed on several databases, one worker per (tag, database): ``tag`` is the
    partition's key (``tag@database``, its offset row), ``journal_tag`` the tag it reads from
    ``journal`` (that database's), which ``prepare`` and the handlers see.

    :meth:`run` goes on until :meth:`stop` (re-acquiring the lease if it is lost);
    :meth:`catch_up` handles what is in the journal now and returns (tests, rebuilds).
    Attributes for status: :attr:`state`, :attr:`offset`, :attr:`events_handled`,
    :attr:`transactions`, :attr:`failures`, :attr:`last_error`.

    A worker never retries silently: an event it cannot get past (its handler keeps failing,
    or it cannot be decoded) is retried ``max_attempts`` times, then ``on_failure`` applies
    (``stop``: the row is ``failed`` until resumed or skipped); anything else that keeps
    failing (reading the journal, ``prepare``) is retried on and, from ``max_attempts`` on,
    stored as ``stalled`` with the error until it succeeds.
    """

    settings: ReadSideSettings
    store: OffsetStore
    strategy: ProjectionCommit
    journal: Journal

    def __init__(
        self,
        processor: SqlReadSideProcessor,
        tag: str,
        *,
        journal: Journal,
        projection: Database,
        settings: ReadSideSettings | None = None,
        owner: str | None = None,
        membership: Membership | None = None,
        journal_tag: str | None = None,
    ) -> None:
        settings = settings or _settings(None, {})
        store = OffsetStore(projection)
        super().__init__(
            processor.name,
            tag,
            journal=journal,
            store=store,
            strategy=ProjectionCommit(
                processor, projection, store, settings, JournalEvents(journal, journal_tag)
            ),
            settings=settings,
            owner=owner or default_owner(),
            event_types=_wanted_type_names(processor, journal.serializer),
            kind="read-side processor",
            describe_error=describe_error,
            logger=log,
            membership=membership,
            journal_tag=journal_tag,
        )
        self.processor = processor
        self.projection = projection

    async def catch_up(self, *, force: bool = False, progress: Progress | None = None) -> int:
        """Take the lease (``force``: from whoever holds it), run ``prepare``, handle every
        event in the journal now, release the lease; returns the offset reached. Ignores the
        pause flag and a ``failed`` state. An event that still fails after ``max_attempts``
        raises ``ReadSideHandlerFailed`` (its handler) or ``ReadSideDecodeFailed`` (it cannot
        be decoded) with ``on_failure="stop"``."""
        return await super().catch_up(force=force, progress=progress)

    async def _commit_batch(
        self, lease: Lease, envelopes: list[EventEnvelope[Any]], *, upto: int | None = None
    ) -> tuple[int, Flags]:
        """One transaction of handler writes and offset under ``lease`` (the contract suite
        shows that a stale lease cannot commit)."""
        return await self.strategy.commit_batch(self, lease, envelopes, upto=upto)


async def run_global_prepare(
    processor: SqlReadSideProcessor,
    projection: Database,
    settings: ReadSideSettings,
    *,
    owner: str | None = None,
    timeout: float | None = None,
    stop: asyncio.Event | None = None,
    on_stall: Callable[[str | None], None] | None = None,
    keys: Sequence[str] | None = None,
    rows_ensured: bool = False,
) -> int:
    """Run ``processor.global_prepare`` under the processor's own lease, retried with backoff
    until it succeeds (or ``timeout`` seconds pass: ``ReadSideHandlerFailed``); returns the
    number of attempts. Also creates the processor's offset rows (one per partition key of
    ``keys``; default: its tags), unless ``rows_ensured`` says the caller just did.
    ``on_stall(error)`` is called after each failure from ``max_attempts`` on, and with None
    once it succeeds.

    The hook's writes, the ``prepared`` state and the lease's release commit in one
    transaction: every transaction before a new consumer's first page is one more wait for the
    file's write lock and one more flush on SQLite (see docs/benchmarks.md, topics)."""
    store = OffsetStore(projection)
    owner = owner or default_owner()
    name = processor.name
    if not rows_ensured:
        await store.ensure(name, [GLOBAL_TAG, *(processor.tags() if keys is None else keys)])
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    last: BaseException | None = None

    async def pause(seconds: float) -> None:
        if deadline is not None and time.monotonic() + seconds > deadline:
            raise ReadSideHandlerFailed(
                f"read-side processor {name!r}: global_prepare did not succeed within "
                f"{timeout} s ({attempt} attempts); last error: {last!r}",
                processor=name,
                attempts=attempt,
            ) from last
        if on_stall is not None and attempt >= settings.max_attempts and last is not None:
            on_stall(f"global_prepare failed (attempt {attempt}): {describe_error(last)}")
        if stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
        if stop.is_set():
            raise _Stopped

    while True:
        lease = await store.acquire(name, GLOBAL_TAG, owner, settings.lease_ttl)
        if lease is None:
            await pause(settings.renew_interval)
            continue
        released = False
        try:
            attempt += 1
            async with projection.write() as conn:
                try:
                    await processor.global_prepare(conn)
                except Exception as e:
                    raise _HookFailed(e) from e
                await store.commit(
                    conn, lease, 0, settings.lease_ttl, state="prepared", release=True
                )
            released = True
            if on_stall is not None:
                on_stall(None)
            return attempt
        except LeaseLost:
            continue
        except Exception as e:
            last = e.error if isinstance(e, _HookFailed) else e
            log.error(
                "read-side processor %r: global_prepare failed (attempt %d): %s",
                name,
                attempt,
                describe_error(e),
            )
            await pause(
                min(settings.retry_max_delay, settings.retry_initial_delay * 2 ** (attempt - 1))
            )
        finally:
            if not released:
                with contextlib.suppress(LagompyError):
                    await store.release(lease, state="prepared")
