"""Read sides: processors that tail the journal by offset and build SQL projections, exactly once.

You write a :class:`SqlReadSideProcessor`: a ``name`` (its offset key), the ``tag`` (or sharded
tag) it reads, ``entities`` (whose events it decodes), and handlers that write with the SQLAlchemy
async connection they are given::

    class UsersProjection(SqlReadSideProcessor):
        name = "users"
        tag = UserEntity.tag                 # sharded: one worker per tag shard
        entities = (UserEntity,)

        async def global_prepare(self, conn): ...   # CREATE TABLE IF NOT EXISTS ...
        async def handle(self, conn, envelope): ...  # INSERT / UPDATE
        async def reset(self, conn): ...             # DELETE FROM ... (for rebuilds)

    async with await start_readside([UsersProjection], journal_url="sqlite:///app.db") as rs:
        ...

One :class:`ReadSideWorker` runs per (processor, tag). It holds the lease of its row in the
projection database (:mod:`lagompy.readside_store`), reads the events after its stored offset in
pages, and commits each batch of handler writes *and* the new offset in one transaction, fenced by
the lease's epoch: a worker whose lease another took can never commit (at most one worker per
(processor, tag), exactly-once effect across crashes). After the catch-up it waits for new events
(PostgreSQL: the journal's NOTIFY through :class:`lagompy.journal.JournalNotifier`; SQLite: a short
poll) and reads on at once: no fixed delay.

A handler that raises is retried with backoff; after ``max_attempts`` the worker either stops
(``on_failure="stop"``: the row is paused with the failure, ``resume`` retries) or skips the event
(``"skip"``: the offset moves past it without its writes). Every failure is logged with the
processor, tag, offset, entity and sequence number and shows in :meth:`Projections.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.closing import AsyncClosing
from lagompy.entity import PersistentEntity, ShardedTag, Tag
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
from lagompy.journal._journal import EventEnvelope, Journal, TagPage, from_us, now_us
from lagompy.journal._tailing import JournalNotifier, Subscription, TailSettings
from lagompy.readside_store import (
    FAILED,
    GLOBAL_TAG,
    SET_OFFSET_OWNER,
    SKIP_OWNER,
    STALLED,
    Flags,
    Lease,
    OffsetRow,
    OffsetStore,
    check_offset,
    describe_owner,
    unknown_offsets,
)
from lagompy.serialization import Serializer
from lagompy.settings import JournalSettings, make_settings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema

log = logging.getLogger("lagompy.readside")

__all__ = [
    "Failure",
    "Projections",
    "ReadSide",
    "ReadSideProcessor",
    "ReadSideSettings",
    "ReadSideWorker",
    "SqlReadSideProcessor",
    "WorkerStatus",
    "open_projections",
    "projection_settings",
    "start_readside",
]


# --------------------------------------------------------------------------- settings


class ReadSideSettings(BaseSettings):
    """How read-side workers connect, batch, hold leases and handle failures. Environment prefix
    ``LAGOMPY_READSIDE_`` (for example ``LAGOMPY_READSIDE_URL``, ``LAGOMPY_READSIDE_MAX_BATCH``).
    A keyword argument wins over the environment, which wins over the default."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_READSIDE_", frozen=True, extra="forbid")

    url: str | None = Field(
        None,
        description=(
            "The projection database (sqlite:///... or postgresql://...): projections and the "
            "read side's offsets live there. None: the journal's database."
        ),
    )
    postgres_schema: str | None = Field(
        None,
        description="PostgreSQL schema of the projection database (None: the journal's, "
        "when url is None).",
    )
    pool_size: int = Field(2, ge=1, description="Projection connections kept open per process.")
    auto_migrate: bool | None = Field(
        None,
        description=(
            "Create lagompy's tables in the projection database when it opens. None: as the "
            "journal's auto_migrate (yes on SQLite, no on PostgreSQL: run `lagompy migrate "
            "--url <projection db>`)."
        ),
    )
    max_batch: int = Field(
        500, ge=1, description="Most events read per query and committed per transaction."
    )
    max_batch_seconds: float = Field(
        0.5,
        gt=0,
        description=(
            "A transaction of per-event handlers commits once its handlers have run this long, "
            "even short of max_batch events."
        ),
    )
    lease_ttl: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds a worker's lease lasts without renewal; then another worker may take it. "
            "Every commit and every renewal extends it."
        ),
    )
    renew_interval: float = Field(
        1.0,
        gt=0,
        description=(
            "Seconds between lease renewals of an idle worker; also how soon a worker sees a "
            "pause or a resume, and how often a waiting worker tries to get a lease."
        ),
    )
    poll_interval: float = Field(
        0.05,
        gt=0,
        description=(
            "Seconds between queries of an idle worker on SQLite (and on PostgreSQL while the "
            "LISTEN connection is down)."
        ),
    )
    listen: bool = Field(
        True, description="On PostgreSQL, wake idle workers with the journal's NOTIFY."
    )
    listen_poll_interval: float = Field(
        2.0, gt=0, description="Safety-net query interval while LISTEN is up (PostgreSQL)."
    )
    max_attempts: int = Field(
        5,
        ge=1,
        description=(
            "Tries of a failing handler (or of decoding an event) before on_failure applies; "
            "also how many failed tries of reading the journal or of prepare make a worker "
            "show as stalled."
        ),
    )
    retry_initial_delay: float = Field(
        0.1, ge=0, description="Seconds before the second try; doubled for each next one."
    )
    retry_max_delay: float = Field(5.0, ge=0, description="Cap of the delay between tries.")
    on_failure: Literal["stop", "skip"] = Field(
        "stop",
        description=(
            "After max_attempts at one event (its handler keeps failing, or it cannot be "
            "decoded): 'stop' marks the worker failed, with the failure in its status, until "
            "an operator resumes (the event is retried) or skips it; 'skip' moves the offset "
            "past the event without its writes (counted as skipped in the status)."
        ),
    )
    prepare_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds start_readside_on_ray waits for global_prepare to succeed.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.renew_interval >= self.lease_ttl:
            raise ValueError(
                f"renew_interval ({self.renew_interval}) must be below lease_ttl "
                f"({self.lease_ttl}), or leases expire between renewals"
            )
        return self


def _settings(settings: ReadSideSettings | None, overrides: dict[str, Any]) -> ReadSideSettings:
    if settings is not None and not overrides:
        return settings
    return make_settings(ReadSideSettings, settings, **overrides)


def projection_settings(journal: JournalSettings, settings: ReadSideSettings) -> JournalSettings:
    """Connection settings of the projection database: ``settings.url`` (and its schema), or
    the journal's database when it is None."""
    same = settings.url is None
    values: dict[str, Any] = {
        "url": journal.url if same else settings.url,
        "postgres_schema": (settings.postgres_schema or journal.postgres_schema)
        if same
        else settings.postgres_schema,
        "pool_size": settings.pool_size,
        "max_overflow": settings.pool_size,
        "auto_migrate": (
            journal.auto_migrate if settings.auto_migrate is None else settings.auto_migrate
        ),
        "sqlite_busy_timeout_ms": journal.sqlite_busy_timeout_ms,
        "lock_timeout_ms": journal.lock_timeout_ms,
    }
    return make_settings(JournalSettings, **values)


# --------------------------------------------------------------------------- processors


class ReadSideProcessor:
    """What every read-side processor declares: ``name`` (the key of its offsets: renaming it
    starts from scratch), ``tag`` (a :func:`~lagompy.tag`, a :func:`~lagompy.sharded_tag`, whose
    shards get one worker each, or a tag name), and ``entities`` (the entity classes whose
    events it reads, for decoding). ``event_types``, when set, limits the events handed to the
    handlers (the others only move the offset); they are registered for decoding too."""

    name: ClassVar[str]
    tag: ClassVar[Tag | ShardedTag | str]
    entities: ClassVar[Sequence[type[PersistentEntity[Any, Any, Any]]]] = ()
    event_types: ClassVar[tuple[type, ...] | None] = None

    @classmethod
    def tags(cls) -> tuple[str, ...]:
        """The tags this processor reads: one worker each."""
        t = getattr(cls, "tag", None)
        if isinstance(t, (Tag, ShardedTag)):
            return t.all_tags
        if isinstance(t, str) and t:
            return (t,)
        raise ConfigurationError(
            f"read-side processor {cls.__qualname__} needs a tag: a tag(...), a "
            f"sharded_tag(...) or a tag name, got {t!r}"
        )

    @classmethod
    def validate(cls) -> None:
        """Raise ``ConfigurationError`` naming what is wrong with this processor class."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or len(name) > 255 or name == GLOBAL_TAG:
            raise ConfigurationError(
                f"read-side processor {cls.__qualname__} needs a name (a non-empty string of "
                f"at most 255 characters, its offset key), got {name!r}"
            )
        for t in cls.tags():
            if len(t) > 255 or t == GLOBAL_TAG:
                raise ConfigurationError(f"read-side processor {name!r}: unusable tag {t!r}")
        if cls.event_types is not None and not all(isinstance(t, type) for t in cls.event_types):
            raise ConfigurationError(
                f"read-side processor {name!r}: event_types must be a tuple of classes"
            )

    def wants(self, envelope: EventEnvelope[Any]) -> bool:
        types = self.event_types
        return types is None or isinstance(envelope.event, types)


class SqlReadSideProcessor(ReadSideProcessor):
    """A processor that writes a SQL projection in the projection database.

    Every hook gets ``conn``, a SQLAlchemy ``AsyncConnection`` inside an open transaction that
    lagompy commits (with the offset, for handlers) or rolls back: never commit it yourself.
    Override ``handle`` (one event) or ``handle_batch`` (the events of one transaction, for
    set-based writes such as executemany).
    """

    async def global_prepare(self, conn: AsyncConnection) -> None:
        """Once per start, before any handler, under the processor's lease; retried with
        backoff until it succeeds, so make it idempotent (``CREATE TABLE IF NOT EXISTS``)."""

    async def prepare(self, conn: AsyncConnection, tag: str) -> None:
        """Once per worker start for ``tag``, before its first handler (retried likewise)."""

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        """Write the effect of one event."""
        raise NotImplementedError

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[Any]]
    ) -> None:
        """Write the effect of several events, in offset order (default: ``handle`` each)."""
        for envelope in envelopes:
            await self.handle(conn, envelope)

    async def reset(self, conn: AsyncConnection) -> None:
        """Empty the projection before a rebuild (in the transaction that zeroes the offsets)."""
        raise ConfigurationError(
            f"read-side processor {self.name!r} defines no reset(conn): a rebuild needs it to "
            "empty the projection before replaying"
        )

    @classmethod
    def validate(cls) -> None:
        super().validate()
        base = SqlReadSideProcessor
        if cls.handle is base.handle and cls.handle_batch is base.handle_batch:
            raise ConfigurationError(
                f"read-side processor {cls.name!r} overrides neither handle(conn, envelope) "
                "nor handle_batch(conn, envelopes)"
            )

    @classmethod
    def batch_mode(cls) -> bool:
        return cls.handle_batch is not SqlReadSideProcessor.handle_batch

    @classmethod
    def can_reset(cls) -> bool:
        return cls.reset is not SqlReadSideProcessor.reset


ProcessorArg = type[SqlReadSideProcessor] | SqlReadSideProcessor


def _instance(processor: ProcessorArg) -> SqlReadSideProcessor:
    if isinstance(processor, type):
        if not issubclass(processor, SqlReadSideProcessor):
            raise ConfigurationError(
                f"{processor.__qualname__} is not a SqlReadSideProcessor subclass"
            )
        processor.validate()
        return processor()
    if not isinstance(processor, SqlReadSideProcessor):
        raise ConfigurationError(
            f"expected a SqlReadSideProcessor (class or instance), got {processor!r}"
        )
    type(processor).validate()
    return processor


def serializer_for_processors(processors: Iterable[ReadSideProcessor]) -> Serializer:
    """A serializer for the events of every processor: those of its ``entities``, and its
    ``event_types``."""
    from lagompy.journal._storage import serializer_for

    entities: list[type[PersistentEntity[Any, Any, Any]]] = []
    extra: list[type] = []
    for p in processors:
        if not p.entities and not p.event_types:
            raise ConfigurationError(
                f"read-side processor {p.name!r} declares no entities (the entity classes "
                "whose events it reads) and no event_types; declare them or pass serializer="
            )
        entities += [e for e in p.entities if e not in entities]
        extra += [t for t in p.event_types or () if t not in extra]
    serializer = serializer_for(entities)
    for t in extra:
        serializer.register(t)
    return serializer


def default_owner() -> str:
    """A worker name unique to this process and call: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- the worker


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


def _operator(kind: str) -> str:
    """The lease owner an operator's operation writes: ``set-offset:<host>:<pid>``..."""
    return f"{kind}{socket.gethostname()}:{os.getpid()}"


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


# --------------------------------------------------------------------------- status


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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.failure is not None and self.failure.at is not None:
            out["failure"]["at"] = self.failure.at.isoformat()
        return out


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
    resume, set an offset, rebuild. ``journal`` is needed for the lag and for rebuilds."""

    def __init__(
        self,
        projection: Database,
        journal: Database | None = None,
        *,
        settings: ReadSideSettings | None = None,
        owns: Sequence[Database] = (),
    ) -> None:
        self.projection = projection
        self.journal = journal
        self.settings = settings or _settings(None, {})
        self.store = OffsetStore(projection)
        self._owns = list(owns)

    async def close(self) -> None:
        for db in self._owns:
            await db.dispose()
        self._owns = []



    async def status(self, processor: str | None = None) -> list[WorkerStatus]:
        """Every (processor, tag) known in the projection database (or those of one
        processor): offset, lag in events and seconds, state, events/s, last failure."""
        rows = await self.store.rows(processor)
        if processor is not None and not rows:
            raise ConfigurationError(
                f"no read-side processor {processor!r}: it has no offsets in the projection "
                "database (a processor's rows appear when it first starts)"
            )
        out = []
        for row in rows:
            head = lag = None
            lag_s: float | None = None
            if self.journal is not None:
                head, lag, lag_s = await _journal_lag(self.journal, row.tag, row.offset)
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
                )
            )
        return out

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
            if self.journal is None:
                raise ConfigurationError(
                    "set_offset checks the offset against the tag's head in the journal: open "
                    "Projections with the journal, or pass force=True"
                )
            head = (await _journal_lag(self.journal, tag, 0))[0]
            if offset > head:
                raise ConfigurationError(
                    f"offset {offset} is beyond the head of tag {tag!r} in the journal "
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
            f"; the lease of {before.owner!r} (epoch {before.epoch}) ends"
            if before.leased
            else "",
        )

    async def rebuild(
        self,
        processor: ProcessorArg,
        *,
        journal: Journal,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Empty the projection (``reset``) and replay every event of the processor's tags.

        Takes every lease of the processor (running workers can no longer commit), runs
        ``global_prepare`` and ``reset`` and zeroes the offsets in one transaction, replays
        the tags concurrently, then releases the leases: running workers take them back and
        go on live. ``progress(done, total)`` is called as events are handled. Returns the
        number of events replayed."""
        p = _instance(processor)
        if not type(p).can_reset():
            raise ConfigurationError(
                f"read-side processor {p.name!r} defines no reset(conn): a rebuild needs it to "
                "empty the projection before replaying"
            )
        tags = list(p.tags())
        s = self.settings
        owner = f"rebuild:{default_owner()}"
        await self.store.ensure(p.name, [GLOBAL_TAG, *tags])
        leases = []
        for t in [GLOBAL_TAG, *tags]:
            lease = await self.store.acquire(p.name, t, owner, s.lease_ttl, force=True)
            assert lease is not None  # forced
            level = logging.WARNING if lease.previous_live else logging.INFO
            log.log(level, "read-side processor %r, tag %r: %s", p.name, t, _taken(lease))
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
        for t in tags:
            total += (await _journal_lag(journal.database, t, 0))[1]
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
                p, t, journal=journal, projection=self.projection, settings=s, owner=owner
            )
            for t in tags
        ]
        await asyncio.gather(*(w.catch_up(force=True, progress=step) for w in workers))
        return done


async def open_projections(
    *,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    with_journal: bool = True,
    **overrides: Any,
) -> Projections:
    """:class:`Projections` on the projection database of these settings (and the journal's,
    for lag and rebuilds, unless ``with_journal=False``); close it when done."""
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    projection = Database.create(projection_settings(journal_settings, settings))
    owned = [projection]
    journal_db = None
    try:
        await ensure_schema(projection)
        if with_journal:
            journal_db = Database.create(journal_settings)
            owned.append(journal_db)
    except BaseException:
        for db in owned:
            await db.dispose()
        raise
    return Projections(projection, journal_db, settings=settings, owns=owned)


def _of_tag(tag: str | None) -> str:
    return "" if tag is None else f", tag {tag!r}"


def _journal_settings(url: str | None, settings: JournalSettings | None) -> JournalSettings:
    if settings is not None:
        if url is not None:
            raise ConfigurationError("pass journal_url or journal_settings, not both")
        return settings
    return make_settings(JournalSettings, **({} if url is None else {"url": url}))


# --------------------------------------------------------------------------- in process


class ReadSide(AsyncClosing):
    """Read-side workers running in this process (one asyncio task per (processor, tag)).

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
    ) -> None:
        self.processors = processors
        self.journal = journal
        self.projection = projection
        self.settings = settings
        self.projections = Projections(projection, journal.database, settings=settings)
        self.workers: list[ReadSideWorker] = []
        self.global_prepares: dict[str, int] = {}
        #: Processors whose global_prepare keeps failing (from max_attempts on): the error.
        self.prepare_stalls: dict[str, str] = {}
        self._owned = list(owned)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _start(self) -> None:
        for p in self.processors:
            workers = [
                ReadSideWorker(
                    p, t, journal=self.journal, projection=self.projection, settings=self.settings
                )
                for t in p.tags()
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
                processor, self.projection, self.settings, stop=self._stop, on_stall=stalled
            )
        except _Stopped:
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

    async def wait_until_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until every worker has handled every event its tag had when called (raises
        ``TimeoutError`` after ``timeout`` seconds)."""
        targets = []
        for w in self.workers:
            head, _, _ = await _journal_lag(self.journal.database, w.tag, 0)
            targets.append((w, head))
        async with asyncio.timeout(timeout):
            while any(w.offset < head for w, head in targets):
                for task in self._tasks:
                    error = task.exception() if task.done() and not task.cancelled() else None
                    if error is not None:
                        raise error
                for w, _ in targets:
                    w.wake()
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop every worker (after its current transaction) and close the connections."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for w in self.workers:
            await w.stop()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("a read-side task failed", exc_info=task.exception())
        for db in self._owned:
            await db.dispose()




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
    ``global_prepare`` (retried until it succeeds), then one worker per tag. Keyword
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
    from lagompy.journal._storage import open_storage

    storage = await open_storage(settings=journal_settings, serializer=serializer)
    projection = Database.create(projection_settings(journal_settings, settings))
    try:
        await ensure_schema(projection)
        store = OffsetStore(projection)
        for p in instances:
            await store.ensure(p.name, [GLOBAL_TAG, *p.tags()])
    except BaseException:
        await projection.dispose()
        await storage.close()
        raise
    readside = ReadSide(
        instances,
        journal=storage.journal,
        projection=projection,
        settings=settings,
        owned=[projection, storage.database],
    )
    readside._start()
    return readside
