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
(PostgreSQL: the journal's NOTIFY through :class:`lagompy.tailing.JournalNotifier`; SQLite: a short
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
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy import schema
from lagompy.closing import AsyncClosing
from lagompy.database import Database
from lagompy.entity import PersistentEntity, ShardedTag, Tag
from lagompy.errors import (
    ConfigurationError,
    LagompyError,
    LeaseLost,
    ReadSideHandlerFailed,
)
from lagompy.journal import EventEnvelope, Journal, from_us, now_us
from lagompy.migrate import ensure_schema
from lagompy.readside_store import GLOBAL_TAG, Lease, OffsetRow, OffsetStore
from lagompy.serialization import Serializer
from lagompy.settings import JournalSettings, make_settings
from lagompy.tailing import JournalNotifier, Subscription, TailSettings

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
        5, ge=1, description="Tries of a failing handler before on_failure applies."
    )
    retry_initial_delay: float = Field(
        0.1, ge=0, description="Seconds before the second try; doubled for each next one."
    )
    retry_max_delay: float = Field(5.0, ge=0, description="Cap of the delay between tries.")
    on_failure: Literal["stop", "skip"] = Field(
        "stop",
        description=(
            "After max_attempts: 'stop' pauses the worker with the failure in its status "
            "(resume retries the event); 'skip' moves the offset past the event without its "
            "writes (counted as skipped in the status)."
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
    from lagompy.storage import serializer_for

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
        self._rate = _Rate()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._failed = False
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
        try:
            while True:
                lease = None
                try:
                    lease = await self._hold()
                    self.lease = lease
                    await self._prepare(lease)
                    trouble = 0
                    await self._consume(lease)
                except LeaseLost as e:
                    log.warning("%s; waiting to get it back", e)
                    self.state = "standby"
                    lease = None
                except _Stopped:
                    raise
                except LagompyError as e:  # the database is unreachable, for instance
                    trouble += 1
                    self.last_error = str(e)
                    self.state = "retrying"
                    log.warning("%s: %s (retrying)", self.where(), e)
                    await self._release(lease, "retrying")
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
        pause flag. A handler failing past ``max_attempts`` raises ``ReadSideHandlerFailed``
        (``on_failure="stop"``)."""
        lease = await self._hold(force=force)
        self.lease = lease
        try:
            await self._prepare(lease)
            self.state = "running"
            page = await self._read()
            while page:
                # Read the next page while this one's transaction runs (the journal read and
                # the decoding overlap the projection's writes).
                ahead = None
                if len(page) == self.settings.max_batch:
                    ahead = asyncio.create_task(self._read(after=page[-1].offset))
                try:
                    await self._handle_page(lease, page, ignore_pause=True)
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                        await asyncio.gather(ahead, return_exceptions=True)
                    raise
                if progress is not None:
                    progress(len(page))
                page = [] if ahead is None else await ahead
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
                log.info("%s: lease taken by %s (epoch %d)", self.where(), self.owner, lease.epoch)
                return lease
            self.state = "standby"
            await self._sleep(self.settings.renew_interval)

    async def _prepare(self, lease: Lease) -> None:
        self.state = "preparing"
        attempt = 0
        while True:
            try:
                async with self.projection.write() as conn:
                    await self.processor.prepare(conn, self.tag)
                    await self.store.commit(
                        conn, lease, self.offset, self.settings.lease_ttl, state="preparing"
                    )
                return
            except (LeaseLost, _Stopped):
                raise
            except Exception as e:
                attempt += 1
                self.failures += 1
                self.last_error = f"prepare failed: {e!r}"
                log.error(
                    "%s: prepare(%r) failed (attempt %d): %r", self.where(), self.tag, attempt, e
                )
                await self._sleep(self._backoff(attempt))

    async def _read(self, after: int | None = None) -> list[EventEnvelope[Any]]:
        attempt = 0
        while True:
            try:
                return await self.journal.events_by_tag(
                    self.tag,
                    after_offset=self.offset if after is None else after,
                    limit=self.settings.max_batch,
                )
            except LagompyError as e:
                attempt += 1
                self.last_error = f"reading the journal failed: {e}"
                log.warning(
                    "%s: reading the journal after offset %d failed (attempt %d): %s",
                    self.where(),
                    self.offset,
                    attempt,
                    e,
                )
                await self._sleep(self._backoff(attempt))

    async def _consume(self, lease: Lease) -> None:
        s = self.settings
        paused = lease.paused
        next_renew = time.monotonic() + s.renew_interval
        while True:
            if self._stop.is_set():
                raise _Stopped
            if paused:
                self.state = "failed" if self._failed else "paused"
                await self._sleep(min(s.renew_interval, max(0.0, next_renew - time.monotonic())))
                paused = await self.store.renew(lease, s.lease_ttl, state=self.state)
                next_renew = time.monotonic() + s.renew_interval
                if not paused:
                    self._failed = False
                continue
            self.state = "running"
            self._wake.clear()
            page = await self._read()
            if page:
                try:
                    paused = await self._handle_page(lease, page)
                except ReadSideHandlerFailed:
                    paused = True  # stored with the failure: `resume` retries the event
                next_renew = time.monotonic() + s.renew_interval
                if len(page) == s.max_batch:
                    continue
            if paused:
                continue
            timeout = max(0.0, min(next_renew - time.monotonic(), self._poll_interval()))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            if time.monotonic() >= next_renew:
                paused = await self.store.renew(
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
        self, lease: Lease, page: list[EventEnvelope[Any]], *, ignore_pause: bool = False
    ) -> bool:
        """Commit the page in as few transactions as the bounds allow; returns the pause flag.
        After a failing batch, the rest of the page goes one event per transaction, so that
        the failing event is found and the ones before it commit."""
        pos = 0
        paused = False
        while pos < len(page):
            if paused and not ignore_pause:
                return True
            try:
                done, paused = await self._commit_batch(lease, page[pos:])
                pos += done
            except (LeaseLost, _Stopped):
                raise
            except Exception as e:
                log.warning(
                    "%s: a batch of %d events from offset %d failed (%r); handling them one by one",
                    self.where(),
                    len(page) - pos,
                    page[pos].offset,
                    e,
                )
                for envelope in page[pos:]:
                    paused = await self._commit_one(lease, envelope)
                    if paused and not ignore_pause:
                        return True
                return paused
        return paused

    async def _commit_batch(
        self, lease: Lease, envelopes: list[EventEnvelope[Any]]
    ) -> tuple[int, bool]:
        s = self.settings
        processor = self.processor
        async with self.projection.write() as conn:
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
            rate = self._rate.add(done)
            paused = await self.store.commit(
                conn, lease, envelopes[done - 1].offset, s.lease_ttl, events_per_s=rate
            )
        self.offset = envelopes[done - 1].offset
        self.events_handled += done
        self.transactions += 1
        return done, paused

    async def _commit_one(self, lease: Lease, envelope: EventEnvelope[Any]) -> bool:
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            try:
                return (await self._commit_batch(lease, [envelope]))[1]
            except (LeaseLost, _Stopped):
                raise
            except Exception as e:
                self.failures += 1
                failure = self._failure(envelope, e, attempt)
                self.last_error = str(failure)
                log.error("%s", failure, exc_info=attempt == 1)
                if attempt < s.max_attempts:
                    await self._record(lease, failure, envelope, "retrying")
                    await self._sleep(self._backoff(attempt))
                    continue
                if s.on_failure == "skip":
                    async with self.projection.write() as conn:
                        paused = await self.store.commit(
                            conn, lease, envelope.offset, s.lease_ttl, skipped=1
                        )
                    await self._record(lease, failure, envelope, "running")
                    log.error(
                        "%s: skipped the event at offset %d (%s/%s #%d) after %d attempts",
                        self.where(),
                        envelope.offset,
                        envelope.entity_type,
                        envelope.entity_id,
                        envelope.seq_nr,
                        attempt,
                    )
                    self.offset = envelope.offset
                    return paused
                await self._record(lease, failure, envelope, "failed", pause=True)
                self._failed = True
                self.state = "failed"
                log.error(
                    "%s: stopped at offset %d after %d attempts; `lagompy projections resume "
                    "%s` retries it",
                    self.where(),
                    envelope.offset,
                    attempt,
                    self.name,
                )
                raise failure from e

    def _failure(
        self, envelope: EventEnvelope[Any], error: BaseException, attempt: int
    ) -> ReadSideHandlerFailed:
        return ReadSideHandlerFailed(
            f"{self.where()}: handler failed at offset {envelope.offset} "
            f"({envelope.entity_type}/{envelope.entity_id} sequence number {envelope.seq_nr}), "
            f"attempt {attempt}/{self.settings.max_attempts}: {type(error).__name__}: {error}",
            processor=self.name,
            tag=self.tag,
            offset=envelope.offset,
            entity_type=envelope.entity_type,
            entity_id=envelope.entity_id,
            seq_nr=envelope.seq_nr,
            attempts=attempt,
        )

    async def _record(
        self,
        lease: Lease,
        failure: ReadSideHandlerFailed,
        envelope: EventEnvelope[Any],
        state: str,
        *,
        pause: bool = False,
    ) -> None:
        await self.store.record_failure(
            lease,
            error=str(failure),
            offset=envelope.offset,
            entity_type=envelope.entity_type,
            entity_id=envelope.entity_id,
            seq_nr=envelope.seq_nr,
            attempts=failure.attempts,
            state=state,
            pause=pause,
        )


async def run_global_prepare(
    processor: SqlReadSideProcessor,
    projection: Database,
    settings: ReadSideSettings,
    *,
    owner: str | None = None,
    timeout: float | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``processor.global_prepare`` under the processor's own lease, retried with backoff
    until it succeeds (or ``timeout`` seconds pass: ``ReadSideHandlerFailed``); returns the
    number of attempts. Also creates the processor's offset rows."""
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
                await processor.global_prepare(conn)
                await store.commit(conn, lease, 0, settings.lease_ttl, state="prepared")
            return attempt
        except LeaseLost:
            continue
        except Exception as e:
            last = e
            log.error(
                "read-side processor %r: global_prepare failed (attempt %d): %r", name, attempt, e
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
    """The last handler failure of a worker."""

    error: str
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
    #: running, paused, failed, stopped (no worker holds the lease), standby, retrying,
    #: preparing, rebuilding
    state: str
    offset: int
    #: The highest offset of the tag in the journal (None: the journal was not consulted).
    head_offset: int | None
    lag_events: int | None
    #: Age of the oldest event not handled yet (0 when caught up).
    lag_seconds: float | None
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
    if row.paused:
        return "failed" if row.state == "failed" else "paused"
    if not row.leased:
        return "stopped"
    return row.state


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
    return int(row[0] or 0), int(row[1] or 0), round(lag_s, 3)


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
                f"no read-side processor {processor!r} in {self.projection.describe()}"
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
        return await self.store.set_paused(processor, tag, True)

    async def resume(self, processor: str, tag: str | None = None) -> int:
        """Undo :meth:`pause`; a worker stopped by a failing handler retries the event."""
        return await self.store.set_paused(processor, tag, False)

    async def set_offset(self, processor: str, tag: str, offset: int) -> None:
        """Make (processor, tag) resume after ``offset``. The worker holding its lease loses
        it (it cannot commit any more) and the next holder starts from ``offset``."""
        await self.store.set_offset(processor, tag, offset)

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
        try:
            attempts = await run_global_prepare(
                processor, self.projection, self.settings, stop=self._stop
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
    from lagompy.storage import open_storage

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
