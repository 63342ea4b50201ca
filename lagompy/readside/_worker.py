"""One :class:`ReadSideWorker` per (processor, tag): lease, prepare, catch up, tail, commit.

The worker holds the lease of its row in the projection database (``_store.py``), reads the
events after its stored offset in pages, and commits each batch of handler writes *and* the new
offset in one transaction, fenced by the lease's epoch: a worker whose lease another took can
never commit (at most one worker per (processor, tag), exactly-once effect across crashes).
After the catch-up it waits for new events (PostgreSQL: the journal's NOTIFY through
:class:`lagompy.journal.JournalNotifier`; SQLite: a short poll) and reads on at once: no fixed
delay.

A handler that raises is retried with backoff; after ``max_attempts`` the worker either stops
(``on_failure="stop"``: the row is paused with the failure, ``resume`` retries) or skips the
event (``"skip"``: the offset moves past it without its writes). Every failure is logged with
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
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError

from lagompy.errors import (
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
from lagompy.journal._tailing import JournalNotifier, Subscription, TailSettings
from lagompy.readside._processor import ReadSideProcessor, SqlReadSideProcessor
from lagompy.readside._settings import ReadSideSettings, _settings
from lagompy.readside._store import (
    FAILED,
    GLOBAL_TAG,
    SET_OFFSET_OWNER,
    SKIP_OWNER,
    STALLED,
    Flags,
    Lease,
    OffsetStore,
    describe_owner,
)
from lagompy.serialization import Serializer
from lagompy.sql._database import Database

log = logging.getLogger("lagompy.readside")

__all__ = [
    "ReadSideWorker",
    "default_owner",
    "describe_error",
    "run_global_prepare",
]


def default_owner() -> str:
    """A worker name unique to this process and call: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Stopped(Exception):
    """Internal: the worker was asked to stop."""


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


def _taken(lease: Lease) -> str:
    """How a lease was taken, for the log."""
    text = f"lease taken by {lease.owner!r} (epoch {lease.epoch})"
    previous = lease.previous_owner
    if previous is None or previous == lease.owner:
        return text
    if previous.startswith((SET_OFFSET_OWNER, SKIP_OWNER)):
        return f"{text} after {describe_owner(previous)}"
    if lease.previous_live:
        return f"{text} from {describe_owner(previous)}, which still held it"
    return f"{text} from {describe_owner(previous)}, whose lease had expired"


_EventFailure = ReadSideHandlerFailed | ReadSideDecodeFailed


class _Rate:
    """Events per second over the last few seconds."""

    WINDOW = 5.0

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()

    def add(self, n: int) -> float:
        now = time.monotonic()
        self._marks.append((now, n))
        while self._marks and self._marks[0][0] < now - self.WINDOW:
            self._marks.popleft()
        return self.value(now)

    def value(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        span = min(self.WINDOW, max(now - self._started, 1e-3))
        return round(sum(n for t, n in self._marks if t >= now - self.WINDOW) / span, 1)


Progress = Callable[[int], None]


class ReadSideWorker:
    """Runs one processor on one tag: lease, prepare, catch up, tail, commit batches.

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

    def __init__(
        self,
        processor: SqlReadSideProcessor,
        tag: str,
        *,
        journal: Journal,
        projection: Database,
        settings: ReadSideSettings | None = None,
        owner: str | None = None,
    ) -> None:
        self.processor = processor
        self.name = processor.name
        self.tag = tag
        self.journal = journal
        self.projection = projection
        self.settings = settings or _settings(None, {})
        self.store = OffsetStore(projection)
        self.owner = owner or default_owner()
        self.state = "starting"
        self.offset = 0
        self.lease: Lease | None = None
        self.events_handled = 0
        self.transactions = 0
        self.failures = 0
        self.last_error: str | None = None
        self._batch_mode = type(processor).batch_mode()
        #: Stored type names of the events the processor wants (None: all): the others are
        #: never decoded.
        self._wanted = _wanted_type_names(processor, journal.serializer)
        self._rate = _Rate()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        #: The row's flags as the last fenced write saw them.
        self._flags = Flags(False, False)
        #: The offset of the row's failure line (cleared once the worker commits past it).
        self._error_offset: int | None = None
        #: The row holds a stall (cleared once the failing step succeeds).
        self._stalled = False
        #: (offset, attempts) of the undecodable event being retried.
        self._undecodable_at: tuple[int, int] | None = None
        self._notifier: JournalNotifier | None = None
        self._subscription: Subscription | None = None

    # ------------------------------------------------------------------ control

    async def stop(self) -> None:
        """Ask :meth:`run` to end after the current transaction (it releases the lease)."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Query the journal now instead of at the next poll."""
        self._wake.set()

    @property
    def events_per_s(self) -> float:
        return self._rate.value()

    def where(self) -> str:
        return f"read-side processor {self.name!r}, tag {self.tag!r}"

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or raise _Stopped as soon as stop() is called."""
        if self._stop.is_set():
            raise _Stopped
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        if self._stop.is_set():
            raise _Stopped

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return float(min(s.retry_max_delay, s.retry_initial_delay * 2 ** max(0, attempt - 1)))

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Hold the lease and process events until :meth:`stop`."""
        await self._subscribe()
        trouble = 0
        last_trouble = 0.0
        try:
            while True:
                lease = None
                try:
                    lease = await self._hold()
                    self.lease = lease
                    await self._prepare(lease)
                    await self._consume(lease)
                except LeaseLost as e:
                    log.warning("%s; waiting to get it back", e)
                    self.state = "standby"
                    lease = None
                except _Stopped:
                    raise
                except Exception as e:  # the database is unreachable, for instance
                    # Consecutive troubles count towards `stalled`, even when the worker gets
                    # as far as consuming in between; a quiet lease_ttl starts the count over.
                    now = time.monotonic()
                    if now - last_trouble > self.settings.lease_ttl + self.settings.retry_max_delay:
                        trouble = 0
                    last_trouble = now
                    trouble += 1
                    self.last_error = describe_error(e)
                    self.state = "retrying"
                    log.warning(
                        "%s: %s (attempt %d, retrying)",
                        self.where(),
                        self.last_error,
                        trouble,
                        exc_info=not isinstance(e, LagompyError),
                    )
                    state = "retrying"
                    if trouble >= self.settings.max_attempts:
                        state = STALLED
                        await self._stall(lease, self.last_error, trouble)
                    await self._release(lease, state)
                    await self._sleep(self._backoff(trouble))
        except _Stopped:
            await self._release(self.lease, "stopped")
        finally:
            self.state = "stopped"
            await self._unsubscribe()

    async def _release(self, lease: Lease | None, state: str) -> None:
        if lease is None:
            return
        try:
            await self.store.release(lease, state=state)
        except LagompyError as e:
            log.warning("%s: could not release the lease: %s", self.where(), e)
        if self.lease is lease:
            self.lease = None

    async def catch_up(self, *, force: bool = False, progress: Progress | None = None) -> int:
        """Take the lease (``force``: from whoever holds it), run ``prepare``, handle every
        event in the journal now, release the lease; returns the offset reached. Ignores the
        pause flag and a ``failed`` state. An event that still fails after ``max_attempts``
        raises ``ReadSideHandlerFailed`` (its handler) or ``ReadSideDecodeFailed`` (it cannot
        be decoded) with ``on_failure="stop"``."""
        lease = await self._hold(force=force)
        self.lease = lease
        try:
            await self._prepare(lease)
            self.state = "running"
            page = await self._read(lease)
            while True:
                # Read the next page while this one's transaction runs (the journal read and
                # the decoding overlap the projection's writes).
                ahead = None
                if page.full:
                    ahead = asyncio.create_task(self._read(lease, after=page.last_offset))
                try:
                    await self._handle_page(lease, page, ignore_pause=True)
                    if page.error is not None:
                        await self._undecodable(lease, page.error)
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                        await asyncio.gather(ahead, return_exceptions=True)
                    raise
                if progress is not None and page.scanned:
                    progress(page.scanned)
                if ahead is not None:
                    page = await ahead
                elif page.error is not None:
                    page = await self._read(lease)  # the undecodable event again, or past it
                else:
                    return self.offset
        except _Stopped:
            return self.offset
        finally:
            await self._release(lease, "idle")

    async def _hold(self, *, force: bool = False) -> Lease:
        while True:
            lease = await self.store.acquire(
                self.name, self.tag, self.owner, self.settings.lease_ttl, force=force
            )
            if lease is not None:
                self.offset = lease.offset
                self._flags = lease.flags
                self._error_offset = lease.error_offset
                self._stalled = lease.state == STALLED
                level = logging.WARNING if lease.previous_live else logging.INFO
                log.log(level, "%s: %s", self.where(), _taken(lease))
                return lease
            self.state = "standby"
            await self._sleep(self.settings.renew_interval)

    async def _prepare(self, lease: Lease) -> None:
        self.state = "preparing"
        attempt = 0
        while True:
            try:
                stalled = self._stalled
                async with self.projection.write() as conn:
                    try:
                        await self.processor.prepare(conn, self.tag)
                    except Exception as e:
                        raise _HookFailed(e) from e
                    self._flags = await self.store.commit(
                        conn,
                        lease,
                        self.offset,
                        self.settings.lease_ttl,
                        state="preparing",
                        clear_failure=stalled,
                    )
                if stalled:
                    self._stalled = False
                    self._error_offset = None
                return
            except (LeaseLost, _Stopped, JournalUnavailable):
                raise
            except Exception as e:
                attempt += 1
                self.failures += 1
                self.last_error = f"prepare({self.tag!r}) failed: {describe_error(e)}"
                log.error("%s: %s (attempt %d)", self.where(), self.last_error, attempt)
                if attempt >= self.settings.max_attempts:
                    await self._stall(lease, self.last_error, attempt)
                await self._sleep(self._backoff(attempt))

    async def _read(self, lease: Lease | None = None, after: int | None = None) -> TagPage:
        attempt = 0
        while True:
            start = self.offset if after is None else after
            try:
                page = await self.journal.read_tag(
                    self.tag,
                    after_offset=start,
                    limit=self.settings.max_batch,
                    event_types=self._wanted,
                )
            except Exception as e:
                attempt += 1
                self.last_error = (
                    f"reading the journal after offset {start} failed: {describe_error(e)}"
                )
                log.warning(
                    "%s: %s (attempt %d)",
                    self.where(),
                    self.last_error,
                    attempt,
                    exc_info=not isinstance(e, LagompyError),
                )
                if attempt >= self.settings.max_attempts:
                    await self._stall(lease, self.last_error, attempt)
                await self._sleep(self._backoff(attempt))
                continue
            if self._stalled and lease is not None and not self._flags.failed:
                self._stalled = False
                self._error_offset = None
                self._flags = await self.store.clear_failure(lease, state="running")
                log.info("%s: reads the journal again", self.where())
            return page

    async def _stall(self, lease: Lease | None, error: str, attempts: int) -> None:
        """Store that the worker cannot make progress (``stalled``, with the error), unless
        it is stopped by a failing event already. Best effort: the projection database may
        be what fails."""
        self.state = STALLED
        if lease is None or self._flags.failed:
            return
        try:
            self._flags = await self.store.record_failure(
                lease,
                error=error,
                offset=self.offset,
                entity_type=None,
                entity_id=None,
                seq_nr=None,
                attempts=attempts,
                state=STALLED,
            )
            self._stalled = True
            self._error_offset = self.offset
        except LagompyError as e:
            log.warning("%s: could not store the stall: %s", self.where(), e)

    async def _consume(self, lease: Lease) -> None:
        s = self.settings
        next_renew = time.monotonic() + s.renew_interval
        while True:
            if self._stop.is_set():
                raise _Stopped
            if self._flags.hold:
                self.state = FAILED if self._flags.failed else "paused"
                await self._sleep(min(s.renew_interval, max(0.0, next_renew - time.monotonic())))
                state = "paused" if self._flags.paused else "running"
                self._flags = await self.store.renew(lease, s.lease_ttl, state=state)
                next_renew = time.monotonic() + s.renew_interval
                continue
            self.state = "running"
            self._wake.clear()
            page = await self._read(lease)
            try:
                if page.envelopes or page.last_offset > self.offset:
                    await self._handle_page(lease, page)
                    next_renew = time.monotonic() + s.renew_interval
                if page.error is not None and not self._flags.hold:
                    await self._undecodable(lease, page.error)
                    continue
            except (ReadSideHandlerFailed, ReadSideDecodeFailed):
                continue  # stored as failed: `resume` or `skip` moves it on
            if page.full or self._flags.hold:
                continue
            timeout = max(0.0, min(next_renew - time.monotonic(), self._poll_interval()))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            if time.monotonic() >= next_renew:
                self._flags = await self.store.renew(
                    lease, s.lease_ttl, state="running", events_per_s=self._rate.value()
                )
                next_renew = time.monotonic() + s.renew_interval

    def _poll_interval(self) -> float:
        n = self._notifier
        if n is not None and n.connected:
            return self.settings.listen_poll_interval
        return self.settings.poll_interval

    async def _subscribe(self) -> None:
        database = self.journal.database
        if database.dialect != "postgresql" or not self.settings.listen:
            return
        self._notifier = await JournalNotifier.acquire(database, TailSettings())
        self._subscription = self._notifier.subscribe(lambda _reason: self._wake.set())

    async def _unsubscribe(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.release()

    # ------------------------------------------------------------------ batches

    async def _handle_page(
        self, lease: Lease, page: TagPage, *, ignore_pause: bool = False
    ) -> Flags:
        """Commit the page in as few transactions as the bounds allow, up to its last offset
        (past the events not wanted); returns the row's flags. After a failing batch, the rest
        of the page goes one event per transaction, so that the failing event is found and the
        ones before it commit."""
        envelopes = page.envelopes
        pos = 0
        flags = self._flags
        while pos < len(envelopes):
            if flags.hold and not ignore_pause:
                return flags
            try:
                done, flags = await self._commit_batch(
                    lease, envelopes[pos:], upto=page.last_offset
                )
                pos += done
            except (LeaseLost, _Stopped, JournalUnavailable):
                raise
            except Exception as e:
                log.warning(
                    "%s: a batch of %d events from offset %d failed (%s); handling them one by one",
                    self.where(),
                    len(envelopes) - pos,
                    envelopes[pos].offset,
                    describe_error(e),
                )
                for envelope in envelopes[pos:]:
                    flags = await self._commit_one(lease, envelope)
                    if flags.hold and not ignore_pause:
                        return flags
                pos = len(envelopes)
        if self.offset < page.last_offset and (ignore_pause or not flags.hold):
            flags = await self._commit_offset(lease, page.last_offset)
        return flags

    def _passes_failure(self, offset: int) -> bool:
        return self._error_offset is not None and offset >= self._error_offset

    async def _commit_batch(
        self, lease: Lease, envelopes: list[EventEnvelope[Any]], *, upto: int | None = None
    ) -> tuple[int, Flags]:
        """Handle ``envelopes`` (or as many as ``max_batch_seconds`` allows) and store the
        offset in one transaction; ``upto``: the offset to store once all are handled (the
        end of their page). Returns how many were handled and the row's flags."""
        s = self.settings
        processor = self.processor
        async with self.projection.write() as conn:
            try:
                if self._batch_mode:
                    done = len(envelopes)
                    wanted = [e for e in envelopes if processor.wants(e)]
                    if wanted:
                        await processor.handle_batch(conn, wanted)
                else:
                    started = time.monotonic()
                    done = 0
                    for envelope in envelopes:
                        if processor.wants(envelope):
                            await processor.handle(conn, envelope)
                        done += 1
                        if time.monotonic() - started >= s.max_batch_seconds:
                            break
            except Exception as e:
                raise _HookFailed(e) from e
            offset = envelopes[done - 1].offset if upto is None or done < len(envelopes) else upto
            rate = self._rate.add(done)
            clear = self._passes_failure(offset)
            flags = await self.store.commit(
                conn, lease, offset, s.lease_ttl, events_per_s=rate, clear_failure=clear
            )
        self._moved(offset, clear, flags)
        self.events_handled += done
        self.transactions += 1
        return done, flags

    async def _commit_offset(self, lease: Lease, offset: int, *, skipped: int = 0) -> Flags:
        """Store ``offset`` with no handler (events not wanted, or a skipped event)."""
        clear = self._passes_failure(offset)
        async with self.projection.write() as conn:
            flags = await self.store.commit(
                conn,
                lease,
                offset,
                self.settings.lease_ttl,
                skipped=skipped,
                clear_failure=clear,
            )
        self._moved(offset, clear, flags)
        return flags

    def _moved(self, offset: int, cleared: bool, flags: Flags) -> None:
        self.offset = offset
        self._flags = flags
        if cleared:
            self._error_offset = None

    async def _commit_one(self, lease: Lease, envelope: EventEnvelope[Any]) -> Flags:
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            try:
                return (await self._commit_batch(lease, [envelope]))[1]
            except (LeaseLost, _Stopped, JournalUnavailable):
                raise
            except Exception as e:
                self.failures += 1
                failure = self._failure(envelope, e, attempt)
                self.last_error = str(failure)
                # The hook's own traceback, once per event.
                original = e.error if isinstance(e, _HookFailed) else e
                log.error("%s", failure, exc_info=original if attempt == 1 else None)
                if attempt < s.max_attempts:
                    await self._record(lease, failure, "retrying")
                    await self._sleep(self._backoff(attempt))
                    continue
                return await self._give_up(lease, failure, e)

    async def _undecodable(self, lease: Lease, error: EventDecodeError) -> Flags:
        """The next event of the tag cannot be decoded: retried like a failing handler (the
        caller reads it again), then ``on_failure`` applies."""
        offset = error.offset
        assert offset is not None  # read_tag sets it
        previous = self._undecodable_at
        attempt = previous[1] + 1 if previous is not None and previous[0] == offset else 1
        self._undecodable_at = (offset, attempt)
        self.failures += 1
        hint = ""
        if isinstance(error.__cause__, UnknownType):
            hint = (
                " (declare its entity in the processor's `entities`, or its class in "
                "`event_types` if the processor handles it)"
            )
        failure = ReadSideDecodeFailed(
            f"{self.where()}: the event at offset {offset} cannot be decoded, attempt "
            f"{attempt}/{self.settings.max_attempts}: {error}{hint}",
            processor=self.name,
            tag=self.tag,
            offset=offset,
            entity_type=error.entity_type,
            entity_id=error.entity_id,
            seq_nr=error.seq_nr,
            attempts=attempt,
        )
        self.last_error = str(failure)
        log.error("%s", failure)
        if attempt < self.settings.max_attempts:
            flags = await self._record(lease, failure, "retrying")
            await self._sleep(self._backoff(attempt))
            return flags
        self._undecodable_at = None
        return await self._give_up(lease, failure, error)

    async def _give_up(self, lease: Lease, failure: _EventFailure, cause: BaseException) -> Flags:
        """``max_attempts`` ran out for the event of ``failure``: skip it or stop (raises
        ``failure``)."""
        assert failure.offset is not None
        event = (
            f"the event at offset {failure.offset} ({failure.entity_type}/{failure.entity_id} "
            f"sequence number {failure.seq_nr})"
        )
        if self.settings.on_failure == "skip":
            await self._commit_offset(lease, failure.offset, skipped=1)
            flags = await self._record(
                lease, failure, "running", prefix=f"skipped after {failure.attempts} attempts: "
            )
            log.error("%s: skipped %s after %d attempts", self.where(), event, failure.attempts)
            return flags
        await self._record(lease, failure, FAILED)
        self.state = FAILED
        log.error(
            "%s: stopped at %s after %d attempts: fix the cause and `lagompy projections resume "
            "%s` retries it, or `lagompy projections skip %s --tag %s` moves past it",
            self.where(),
            event,
            failure.attempts,
            self.name,
            self.name,
            self.tag,
        )
        raise failure from cause

    def _failure(
        self, envelope: EventEnvelope[Any], error: BaseException, attempt: int
    ) -> ReadSideHandlerFailed:
        return ReadSideHandlerFailed(
            f"{self.where()}: handler failed at offset {envelope.offset} "
            f"({envelope.entity_type}/{envelope.entity_id} sequence number {envelope.seq_nr}), "
            f"attempt {attempt}/{self.settings.max_attempts}: {describe_error(error)}",
            processor=self.name,
            tag=self.tag,
            offset=envelope.offset,
            entity_type=envelope.entity_type,
            entity_id=envelope.entity_id,
            seq_nr=envelope.seq_nr,
            attempts=attempt,
        )

    async def _record(
        self, lease: Lease, failure: _EventFailure, state: str, *, prefix: str = ""
    ) -> Flags:
        """Store the failure line of ``failure`` (without the processor and tag, which the
        row names) and ``state``."""
        message = str(failure).removeprefix(f"{self.where()}: ")
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
        self._flags = flags
        self._error_offset = failure.offset
        return flags


async def run_global_prepare(
    processor: SqlReadSideProcessor,
    projection: Database,
    settings: ReadSideSettings,
    *,
    owner: str | None = None,
    timeout: float | None = None,
    stop: asyncio.Event | None = None,
    on_stall: Callable[[str | None], None] | None = None,
) -> int:
    """Run ``processor.global_prepare`` under the processor's own lease, retried with backoff
    until it succeeds (or ``timeout`` seconds pass: ``ReadSideHandlerFailed``); returns the
    number of attempts. Also creates the processor's offset rows. ``on_stall(error)`` is
    called after each failure from ``max_attempts`` on, and with None once it succeeds."""
    store = OffsetStore(projection)
    owner = owner or default_owner()
    name = processor.name
    await store.ensure(name, [GLOBAL_TAG, *processor.tags()])
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
        try:
            attempt += 1
            async with projection.write() as conn:
                try:
                    await processor.global_prepare(conn)
                except Exception as e:
                    raise _HookFailed(e) from e
                await store.commit(conn, lease, 0, settings.lease_ttl, state="prepared")
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
            with contextlib.suppress(LagompyError):
                await store.release(lease, state="prepared")
