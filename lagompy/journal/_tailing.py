"""Read the journal by global offset, in pages, and tail it live.

Two ways to read events after an offset, both thin layers over
:meth:`Journal.all_events <lagompy.journal.Journal.all_events>` and
:meth:`Journal.events_by_tag <lagompy.journal.Journal.events_by_tag>`:

* :func:`read_pages` reads what is there now, page by page, and stops (catch-up, rebuilds);
* :class:`EventTailer` (built by :func:`tail`) never stops: after reading everything it waits
  for new events and reads on, yielding each event once, in offset order.

Both tail loops of lagompy are one: :class:`PageTailer` reads a page after an offset and, after a
short page, waits; :class:`EventTailer` iterates over it event by event, and the consumer core
(:mod:`lagompy.consumer`, hence every read-side worker) drives it page by page between its lease
renewals. So one :class:`TailSettings` says how every reader of this process waits.

How a tailer learns that there is something new::

    PostgreSQL                                       SQLite
    writer transaction: ... pg_notify(...) COMMIT    writer transaction: ... COMMIT
            │ (delivered at commit)                          │ (the -wal file changes)
            ▼                                                ▼
    JournalNotifier: ONE raw asyncpg connection     SqliteWatcher: ONE task per process and
    per process and database, LISTEN lagompy_events file, a stat of the -wal file every 5 ms;
                                                    on a change, the journal's highest offset
            │ fan-out: wake every subscribed tailer          │ if it moved: the same fan-out
            ▼                                                ▼
    PageTailer: re-query after its offset           PageTailer: re-query after its offset
    (and every listen_poll_interval: a safety net)  (the same safety net)

A tailer queries, yields the page, and only when a page comes back short does it wait: for a
wake-up from the notifier or for its poll interval, whichever comes first. On PostgreSQL the
poll is a slow safety net (``listen_poll_interval``) while the LISTEN connection is healthy;
the notifier reconnects with capped exponential backoff when the connection is lost, and wakes
every tailer when it goes down (they poll every ``poll_interval`` meanwhile) and again when it
is back (they re-query, so events committed while it was down are read at once). No wake-up is
ever needed for correctness: the query by offset is the source of truth, a wake-up only makes
it happen sooner. The journal's ordering fence guarantees that reading by offset never skips an
event that commits late.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import pathlib
import sqlite3
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Self

import asyncpg  # type: ignore[import-untyped,unused-ignore]
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from lagompy.closing import AsyncClosing
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import (
    NOTIFY_CHANNEL,
    EventEnvelope,
    Journal,
    MakeFromEvent,
    TagPage,
)
from lagompy.settings import LagompySettings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database

log = logging.getLogger("lagompy.tailing")

__all__ = [
    "EventTailer",
    "JournalNotifier",
    "PageTailer",
    "SqliteWatcher",
    "Subscription",
    "TailSettings",
    "WakeReason",
    "read_pages",
    "tail",
]

#: Keys SQLAlchemy's asyncpg dialect accepts in a URL for itself, which ``asyncpg.connect``
#: does not know.
_SQLALCHEMY_ONLY_ARGS = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
    "async_fallback",
)


class TailSettings(LagompySettings):
    """How tailers wait for new events. Environment prefix ``LAGOMPY_TAIL_`` (for example
    ``LAGOMPY_TAIL_POLL_INTERVAL``). A keyword argument wins over the environment, which wins
    over the default.

    The notifier of a database (one per process) takes the settings of the tailer that created
    it; the per-tailer settings (``page_size`` and the two poll intervals) are each tailer's own.
    """

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_TAIL_", frozen=True, extra="forbid")

    page_size: int = Field(default=500, ge=1, description="Events read per query.")
    poll_interval: float = Field(
        default=0.05,
        gt=0,
        description=(
            "Seconds between queries while nothing wakes the tailer: on PostgreSQL while the "
            "LISTEN connection is down (or listen is off), on SQLite with the -wal watch off. "
            "The one default of tailers and read-side workers."
        ),
    )
    listen: bool = Field(
        default=True,
        description=(
            "On PostgreSQL, wake tailers with LISTEN/NOTIFY over one extra connection per "
            "process. Turn it off where LISTEN cannot work (PgBouncer in transaction mode): "
            "tailers then poll every poll_interval."
        ),
    )
    listen_poll_interval: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Seconds between safety-net queries while the LISTEN connection (PostgreSQL) or the "
            "-wal watch (SQLite) is up (a notification, not this poll, normally wakes a tailer)."
        ),
    )
    sqlite_watch_interval: float = Field(
        default=0.005,
        ge=0,
        description=(
            "On SQLite, seconds between looks at the journal's write-ahead log (one stat of "
            "its file): a change that brought new events (the journal's highest offset "
            "moved) wakes this process's tailers at once, where they would wait for their "
            "poll_interval. 0 turns it off (tailers only poll)."
        ),
    )
    listen_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for the LISTEN connection to connect or to answer a check.",
    )
    health_check_interval: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds between health checks (SELECT 1) on an idle LISTEN connection; catches a "
            "connection that died without closing (a lost network path)."
        ),
    )
    reconnect_initial_delay: float = Field(
        default=0.1,
        gt=0,
        description="Seconds before the second attempt to reconnect (the first is at once).",
    )
    reconnect_max_delay: float = Field(
        default=5.0,
        gt=0,
        description="Cap of the exponential backoff between reconnection attempts.",
    )
    application_name: str = Field(
        default="lagompy-listen",
        min_length=1,
        description="application_name of the LISTEN connection, as pg_stat_activity shows it.",
    )

    @model_validator(mode="after")
    def _check_delays(self) -> Self:
        if self.reconnect_max_delay < self.reconnect_initial_delay:
            raise ValueError(
                f"reconnect_max_delay ({self.reconnect_max_delay}) is below "
                f"reconnect_initial_delay ({self.reconnect_initial_delay})"
            )
        return self


class WakeReason(enum.Enum):
    """Why a subscriber was woken."""

    #: A NOTIFY arrived: some writer committed events (or :meth:`EventTailer.wake` was called).
    NOTIFICATION = "notification"
    #: The LISTEN connection is up (first connect or reconnect): events committed while it was
    #: down sent no notification that reached us, so query now.
    CONNECTED = "connected"
    #: The LISTEN connection was lost: switch to polling until it is back.
    DISCONNECTED = "disconnected"


WakeCallback = Callable[[WakeReason], None]


class Subscription:
    """A registration with a :class:`JournalNotifier`; :meth:`close` it when done."""

    def __init__(
        self, notifier: JournalNotifier, callback: WakeCallback, tag: str | None = None
    ) -> None:
        self._notifier: JournalNotifier | None = notifier
        self.callback = callback
        #: The tag its tailer reads (None: every event).
        self.tag = tag

    @property
    def closed(self) -> bool:
        return self._notifier is None

    def close(self) -> None:
        """Stop receiving wake-ups (idempotent)."""
        if self._notifier is not None:
            self._notifier._subscribers.discard(self)
            self._notifier = None


# --------------------------------------------------------------------------- the notifier

#: One notifier per event loop and database. asyncpg connections belong to one event loop, so
#: the key includes it; a process normally runs one loop, so this is one per process.
_notifiers: dict[tuple[asyncio.AbstractEventLoop, str], JournalNotifier] = {}
#: Shutdowns started where nobody can await them (a tailer garbage-collected unclosed).
_background: set[asyncio.Task[None]] = set()


def _listen_connect_args(database: Database, settings: TailSettings) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect``, derived from the database URL exactly as
    SQLAlchemy derives its own (user, password and query parameters unescaped, several hosts)."""
    _, opts = database.engine.dialect.create_connect_args(database.url)
    kwargs = {k: v for k, v in opts.items() if k not in _SQLALCHEMY_ONLY_ARGS}
    server_settings = dict(kwargs.pop("server_settings", None) or {})
    server_settings["application_name"] = settings.application_name
    kwargs["server_settings"] = server_settings
    kwargs["timeout"] = settings.listen_timeout
    return kwargs


class JournalNotifier:
    """The one LISTEN connection of this process to a PostgreSQL journal, fanned out.

    Get it with :meth:`acquire` (reference-counted: every ``acquire`` needs one
    :meth:`release`), then :meth:`subscribe` a callback that each notification calls. A
    background task holds a raw asyncpg connection (SQLAlchemy pools have no LISTEN API, and a
    pooled connection would keep its listeners when handed to someone else) that runs
    ``LISTEN lagompy_events``. The journal sends ``pg_notify('lagompy_events', <highest
    offset>)`` inside every write transaction, so the notification arrives when the events have
    committed. The payload is informational: every notification means "query again".

    When the connection is lost (the termination callback, or a failed health check), every
    subscriber is woken with :attr:`WakeReason.DISCONNECTED`; the task reconnects at once (after
    a backoff if the lost connection had lived less than ``health_check_interval``), then with
    capped exponential backoff while attempts fail; once ``LISTEN`` runs again every subscriber
    is woken with :attr:`WakeReason.CONNECTED`, so nothing committed in between is left waiting.

    The channel is database-wide: journals in other schemas of the same database wake these
    subscribers too. That costs a query, never an event.
    """

    def __init__(
        self,
        *,
        key: str,
        description: str,
        connect_args: dict[str, Any],
        settings: TailSettings,
    ) -> None:
        self._key = key
        self.description = description
        self.settings = settings
        self._connect_args = connect_args
        self._loop = asyncio.get_running_loop()
        self._references = 0
        self._subscribers: set[Subscription] = set()
        self._connection: Any = None
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False
        #: Successful connections (LISTEN running), the first one included.
        self.connects = 0
        #: Connections lost (terminated, or failing their health check).
        self.disconnects = 0
        #: Notifications received.
        self.notifications = 0
        #: Wake-ups not sent: a notification naming tags that a subscriber does not read.
        self.notifications_skipped = 0
        #: The payload of the latest notification (the highest offset a writer committed,
        #: then the tags it wrote, one per line).
        self.last_payload: str | None = None
        #: The server process id of the current LISTEN connection, None while down.
        self.backend_pid: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def acquire(
        cls, database: Database, settings: TailSettings | None = None
    ) -> JournalNotifier:
        """The notifier of ``database`` for this process (created and started if needed).

        Does not wait for the connection: until it is up, subscribers poll, and they are
        woken once it is. ``settings`` apply when this call creates the notifier.
        """
        if database.dialect != "postgresql":
            raise ConfigurationError(
                f"LISTEN/NOTIFY needs PostgreSQL; {database.describe()} is {database.dialect}"
            )
        settings = settings or TailSettings()
        key = database.url.render_as_string(hide_password=False)
        return cls._shared(
            key,
            lambda: cls(
                key=key,
                description=database.describe(),
                connect_args=_listen_connect_args(database, settings),
                settings=settings,
            ),
        )

    @classmethod
    def _shared(cls, key: str, make: Callable[[], Self]) -> Self:
        """This event loop's instance under ``key`` (made and started by ``make`` if needed),
        with one more reference."""
        loop = asyncio.get_running_loop()
        for stale in [k for k in _notifiers if k[0].is_closed()]:
            del _notifiers[stale]
        notifier = _notifiers.get((loop, key))
        if not isinstance(notifier, cls):
            notifier = make()
            _notifiers[(loop, key)] = notifier
            notifier._task = loop.create_task(
                notifier._run(), name=f"lagompy-wake {notifier.description}"
            )
            notifier._task.add_done_callback(notifier._on_task_done)
        notifier._references += 1
        return notifier

    async def release(self) -> None:
        """Give back one :meth:`acquire`; the last release closes the connection."""
        if self._drop_reference():
            await self._shutdown()

    def _drop_reference(self) -> bool:
        """One reference fewer; True when it was the last (the notifier is then unregistered)."""
        if self._references <= 0:
            return False
        self._references -= 1
        if self._references > 0:
            return False
        self._shutting_down = True
        if _notifiers.get((self._loop, self._key)) is self:
            del _notifiers[(self._loop, self._key)]
        return True

    def _release_soon(self) -> None:
        """:meth:`release` for callers that cannot await (finalizers); any thread."""
        if not self._drop_reference() or self._loop.is_closed():
            return

        def start() -> None:
            task = self._loop.create_task(self._shutdown())
            _background.add(task)
            task.add_done_callback(_background.discard)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(start)

    async def _shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait never raises the task's exception, and lets our own cancellation
            # through.
            await asyncio.wait([task])

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a lost connection (those are retried): tailers go on polling.
            log.error(
                "the LISTEN task for %s stopped; tailers poll from now on",
                self.description,
                exc_info=task.exception(),
            )
            self._up.clear()
            self._wake_all(WakeReason.DISCONNECTED)

    # ------------------------------------------------------------------ state

    @property
    def references(self) -> int:
        """How many :meth:`acquire` calls are not released yet."""
        return self._references

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up and listening."""
        return self._up.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the LISTEN connection is up; False if ``timeout`` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    def subscribe(self, callback: WakeCallback, tag: str | None = None) -> Subscription:
        """Call ``callback(reason)`` on every notification and connection change; with a
        ``tag``, only on the notifications of writes that carried it (or that do not say
        which tags they carried), and on every connection change.

        The callback runs in the event loop and must be quick and must not raise (set an
        ``asyncio.Event``, bump a counter).
        """
        subscription = Subscription(self, callback, tag)
        self._subscribers.add(subscription)
        return subscription

    def _wake_all(self, reason: WakeReason, tags: Collection[str] | None = None) -> None:
        """Wake every subscriber; with ``tags``, only those that read one of them (or every
        event)."""
        for subscription in list(self._subscribers):
            if tags is not None and subscription.tag is not None and subscription.tag not in tags:
                self.notifications_skipped += 1
                continue
            try:
                subscription.callback(reason)
            except Exception:
                log.exception("a journal notification subscriber raised")

    # ------------------------------------------------------------------ the connection task

    async def _open_connection(self) -> Any:
        """Connect and LISTEN; the connection's loss sets ``self._lost``."""
        connection = await asyncpg.connect(**self._connect_args)
        try:
            connection.add_termination_listener(self._on_terminated)
            await connection.add_listener(NOTIFY_CHANNEL, self._on_notification)
        except BaseException:
            connection.terminate()
            raise
        return connection

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        self.last_payload = payload
        # "<offset>\n<tag>\n<tag>...": the tags the write carried; "<offset>" alone (a write
        # of an older version, or too many tags to name): every subscriber reads again.
        _top, named, tags = payload.partition("\n")
        self._wake_all(WakeReason.NOTIFICATION, set(tags.split("\n")) if named else None)

    def _on_terminated(self, connection: Any) -> None:
        if connection is self._connection:
            self._lost.set()

    async def _run(self) -> None:
        failures = 0  # consecutive failed or short-lived connections
        while True:
            if failures:
                s = self.settings
                delay = min(s.reconnect_max_delay, s.reconnect_initial_delay * 2 ** (failures - 1))
                await asyncio.sleep(delay)
            try:
                connection = await self._open_connection()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                log.warning(
                    "LISTEN connection to %s failed (attempt %d): %r; tailers poll meanwhile",
                    self.description,
                    failures,
                    e,
                )
                continue
            started = time.monotonic()
            self._connection = connection
            self._lost = asyncio.Event()
            self.backend_pid = connection.get_server_pid()
            self.connects += 1
            self._up.set()
            if self.connects > 1:
                log.info("LISTEN connection to %s is back", self.description)
            self._wake_all(WakeReason.CONNECTED)
            try:
                await self._watch(connection)
            except asyncio.CancelledError:
                self._shutting_down = True  # released, or the event loop is closing
                raise
            finally:
                self._connection = None
                self.backend_pid = None
                self._up.clear()
                if not self._shutting_down:
                    self.disconnects += 1
                    log.warning("LISTEN connection to %s lost; reconnecting", self.description)
                    self._wake_all(WakeReason.DISCONNECTED)
                if self._shutting_down:
                    await _close_quietly(connection, self.settings.listen_timeout)
                else:
                    connection.terminate()  # lost or not answering: nothing to say goodbye to
            stable = time.monotonic() - started >= self.settings.health_check_interval
            failures = 0 if stable else failures + 1

    async def _watch(self, connection: Any) -> None:
        """Return when the connection is lost or fails a health check."""
        s = self.settings
        while not connection.is_closed():
            try:
                async with asyncio.timeout(s.health_check_interval):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            try:
                await connection.fetchval("SELECT 1", timeout=s.listen_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "LISTEN connection to %s failed its health check: %r", self.description, e
                )
                return


async def _close_quietly(connection: Any, timeout: float) -> None:
    if connection.is_closed():
        return
    try:
        await connection.close(timeout=timeout)
    except asyncio.CancelledError:
        connection.terminate()
        raise
    except Exception:
        connection.terminate()


# --------------------------------------------------------------------------- reading


_Read = Callable[[int, int], Awaitable[list[EventEnvelope[Any]]]]


def _reader(journal: Journal, tag: str | None) -> _Read:
    """Read a page after an offset: ``read(after_offset, limit)``."""
    if tag is None:
        return lambda after, limit: journal.all_events(after_offset=after, limit=limit)
    return lambda after, limit: journal.events_by_tag(tag, after_offset=after, limit=limit)


async def read_pages(
    journal: Journal,
    *,
    tag: str | None = None,
    after_offset: int = 0,
    page_size: int = 500,
) -> AsyncIterator[list[EventEnvelope[Any]]]:
    """The events after ``after_offset`` (all of them, or those carrying exactly ``tag``), in
    offset order, one page (a list of up to ``page_size`` envelopes) at a time.

    Stops after the first page that is not full: this reads what was committed by then (for a
    catch-up or a rebuild). Each page is one short read transaction; nothing is held between
    pages. To go on reading as events arrive, use :func:`tail`.
    """
    _check_arguments(after_offset, page_size)
    read = _reader(journal, tag)
    after = after_offset
    while True:
        page = await read(after, page_size)
        if page:
            yield page
            after = page[-1].offset
        if len(page) < page_size:
            return


def _check_arguments(after_offset: int, page_size: int) -> None:
    if after_offset < 0:
        raise ValueError(f"after_offset must be 0 or more, not {after_offset}")
    if page_size < 1:
        raise ValueError(f"page_size must be 1 or more, not {page_size}")


_ReadPage = Callable[[int, int], Awaitable[TagPage]]


def _page_reader(
    journal: Journal,
    tag: str | None,
    event_types: Collection[str] | None,
    make: MakeFromEvent | None = None,
) -> _ReadPage:
    """Read a page after an offset as a :class:`TagPage`: ``read(after_offset, limit)``."""
    if make is not None:
        if tag is None or event_types is not None:
            raise ValueError("make needs a tag, and reads every event of it")
        return lambda after, limit: journal.read_tag_made(
            tag, make, after_offset=after, limit=limit
        )
    if tag is not None:
        return lambda after, limit: journal.read_tag(
            tag, after_offset=after, limit=limit, event_types=event_types
        )
    if event_types is not None:
        raise ValueError("event_types needs a tag")

    return lambda after, limit: journal.read_all(after_offset=after, limit=limit)


class SqliteWatcher(JournalNotifier):
    """Wakes this process's tailers of a SQLite journal when events are committed to it.

    SQLite has no NOTIFY: a tailer would wait up to its ``poll_interval`` (50 ms) to see a
    commit. Every ``sqlite_watch_interval`` seconds (5 ms; 4 times less often after a second
    without a new event) one background task of the process looks at the ``-wal`` file beside
    the database (one ``stat``: its inode, size and modification time; no query, no lock). A
    change means that a writer in some process wrote *something* to the file: events, or a
    lease renewal, a membership heartbeat, a projection's rows... So the task then reads the
    journal's highest offset (:class:`_JournalHead`: one indexed query on a connection of its
    own, microseconds) and, only when that moved, reads the tags of the new events (one more
    index range) and wakes the tailers of those tags and those of every event, as a
    PostgreSQL notification naming its tags does. It keeps reading
    it at every look for ``_WATCH_SETTLE`` seconds after the change: a commit becomes visible
    only after its last write to the log (and, with ``synchronous=FULL``, its fsync), and a
    second commit within the same clock tick, after a checkpoint reset the log, leaves the
    file's state as it was. While it runs it is :attr:`connected`: the tailers' safety-net
    query comes every ``listen_poll_interval`` (2 s), as with a healthy LISTEN connection.
    Get it with :meth:`acquire_file`; it shares :class:`JournalNotifier`'s reference counting,
    subscriptions and shutdown.

    Attributes for metrics: :attr:`notifications` (wake-ups sent), :attr:`looks` (file
    changes and settling looks that read the head), :attr:`other_writes` (file changes with no
    new event: wake-ups spared)."""

    @classmethod
    async def acquire_file(
        cls, database: Database, settings: TailSettings | None = None
    ) -> SqliteWatcher:
        """The watcher of ``database``'s file for this process (created if needed)."""
        name = database.url.database
        if database.dialect != "sqlite" or not name or name == ":memory:":
            raise ConfigurationError(f"{database.describe()} is not a SQLite database file")
        settings = settings or TailSettings()
        path = os.path.abspath(name)
        key = f"sqlite-watch:{path}"
        return cls._shared(
            key,
            lambda: cls(path, key=key, description=database.describe(), settings=settings),
        )

    def __init__(self, path: str, *, key: str, description: str, settings: TailSettings) -> None:
        super().__init__(key=key, description=description, connect_args={}, settings=settings)
        self._path = path
        #: Reads of the journal's highest offset.
        self.looks = 0
        #: Changes of the file after which the journal's highest offset had not moved.
        self.other_writes = 0

    async def _run(self) -> None:
        # The look costs ~2.5% of a core at 5 ms (measured on the 2-core machine, loaded):
        # after a second without a new event it comes 4 times less often, until the next one.
        busy = self.settings.sqlite_watch_interval
        wal = self._path + "-wal"
        head = _JournalHead(self._path)
        last = _file_state(wal)
        top = head.read()
        changed = time.monotonic()
        settle_until = float("-inf")  # read the head at every look until then
        self._up.set()
        try:
            while True:
                idle = time.monotonic() - changed > _WATCH_IDLE_AFTER
                await asyncio.sleep(busy * _WATCH_IDLE_FACTOR if idle else busy)
                state = _file_state(wal)
                now = time.monotonic()
                written = state != last
                if written:
                    last, settle_until = state, now + _WATCH_SETTLE
                elif now >= settle_until:
                    continue
                self.looks += 1
                current = head.read()
                if current is not None and current == top:
                    self.other_writes += written
                    continue  # another table was written (a lease, a projection), or nothing
                # Moved: wake the tailers of the tags written since (and those of every
                # event); unknown (a query failed), or too far to name: wake them all.
                tags = (
                    head.tags_between(top, current)
                    if top is not None and current is not None
                    else None
                )
                top, changed = current, now
                self.notifications += 1
                self._wake_all(WakeReason.NOTIFICATION, tags)
        finally:
            head.close()
            self._up.clear()


#: Seconds without a new event after which a SQLite watch looks less often, and how much less.
_WATCH_IDLE_AFTER = 1.0
_WATCH_IDLE_FACTOR = 4
#: Seconds after a change of the file during which a SQLite watch reads the journal's highest
#: offset at every look (see ``SqliteWatcher``): a commit is visible once its fsync is done.
_WATCH_SETTLE = 0.2

_HEAD_QUERY = f"SELECT max(global_offset) FROM {schema.events.name}"
_TAGS_QUERY = (
    f"SELECT DISTINCT tag FROM {schema.event_tags.name} WHERE global_offset > ? "
    "AND global_offset <= ?"
)
#: The most events between two looks whose tags a SQLite watch names; past it (a bulk load),
#: it wakes every tailer rather than read the tags of that many events.
_TAGS_NAMED_MAX = 10_000


class _JournalHead:
    """The highest offset of a SQLite journal, read on a connection of its own (opened on first
    use, never creating the file, opened again when another file takes the path): the table's
    primary key, so one seek to its last entry, a read transaction of microseconds that waits
    for no lock. None when it cannot be read (no file or no journal in it yet, a locked file):
    the watch then wakes the tailers anyway."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._uri = pathlib.Path(path).as_uri() + "?mode=rw"
        self._connection: sqlite3.Connection | None = None
        self._inode = 0

    def read(self) -> int | None:
        try:
            inode = os.stat(self._path).st_ino
            if inode != self._inode:  # a new file at the path (or the first read)
                self.close()
            if self._connection is None:
                # timeout=0: a busy file answers at once (and the tailers are woken).
                self._connection = sqlite3.connect(
                    self._uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
                )
                self._inode = inode
            # fetchall: the statement ends, no read transaction stays open.
            rows = self._connection.execute(_HEAD_QUERY).fetchall()
        except (OSError, sqlite3.Error):
            self.close()
            return None
        return int(rows[0][0] or 0)

    def tags_between(self, low: int, high: int) -> set[str] | None:
        """The tags of the events after offset ``low`` up to ``high`` (an index range of
        ``lagompy_event_tags``), after :meth:`read` found ``high``: a SQLite journal commits
        its offsets in order, so nothing at or below ``high`` can still come. None when it
        cannot tell (more than ``_TAGS_NAMED_MAX`` events, the head went back, a failed
        query): the watch then wakes every tailer."""
        if not 0 < high - low <= _TAGS_NAMED_MAX or self._connection is None:
            return None
        try:
            rows = self._connection.execute(_TAGS_QUERY, (low, high)).fetchall()
        except sqlite3.Error:
            self.close()
            return None
        return {row[0] for row in rows}

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


#: After a page that a writer still in flight held back (``TagPage.held``), the longest wait
#: before the next query, whatever the poll interval: the writer's commit wakes the tailers
#: sooner (its NOTIFY), a rollback sends nothing.
HELD_RECHECK_INTERVAL = 0.02


async def unsubscribe(subscription: Subscription | None, notifier: JournalNotifier | None) -> None:
    """Close a reader's subscription to wake-ups and give its notifier back (the last
    reference closes the LISTEN connection or the SQLite watch)."""
    if subscription is not None:
        subscription.close()
    if notifier is not None:
        await notifier.release()


class PageTailer(AsyncClosing):
    """The tail loop, one page at a time: the one place that knows how to wait for new events.

    :meth:`next_page` queries the page after an offset (it never waits); :meth:`wait` returns at
    once after a full page, and after a short one waits for a wake-up (a NOTIFY through the
    process's :class:`JournalNotifier`, or :meth:`wake`) or for the poll interval, whichever
    comes first. A wake-up that arrives while a page is read or handled is kept: the next wait
    ends at once. The caller keeps its own position (it may move back, after a failure, or
    jump, after an operator's set-offset), and passes it to every :meth:`next_page`::

        async with PageTailer(journal, tag="user-events-0") as pages:
            while True:
                page = await pages.next_page(position)
                ...  # handle page.envelopes; position = page.last_offset
                await pages.wait()

    :class:`EventTailer` iterates over it event by event; the consumer core
    (:mod:`lagompy.consumer`) drives it for read-side workers, between lease renewals. Pages
    are :class:`~lagompy.journal.TagPage`: with a ``tag``, :meth:`Journal.read_tag
    <lagompy.journal.Journal.read_tag>` (only the ``event_types`` wanted are decoded, the page
    still moves past the others); without, every event. With ``make`` (and a tag), the
    pages hold what it makes of each event (:meth:`Journal.read_tag_made
    <lagompy.journal.Journal.read_tag_made>`) instead of envelopes.

    Attributes for metrics: :attr:`pages_read`, :attr:`notify_wakeups`, :attr:`poll_wakeups`,
    :attr:`reconnect_wakeups`, :attr:`waiting`.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        tag: str | None = None,
        event_types: Collection[str] | None = None,
        page_size: int | None = None,
        poll_interval: float | None = None,
        listen_poll_interval: float | None = None,
        settings: TailSettings | None = None,
        make: MakeFromEvent | None = None,
    ) -> None:
        settings = settings or TailSettings()
        self.journal = journal
        self.tag = tag
        self.settings = settings
        self.page_size = settings.page_size if page_size is None else page_size
        self.poll_interval = settings.poll_interval if poll_interval is None else poll_interval
        self.listen_poll_interval = (
            settings.listen_poll_interval if listen_poll_interval is None else listen_poll_interval
        )
        _check_arguments(0, self.page_size)
        if self.poll_interval <= 0 or self.listen_poll_interval <= 0:
            raise ValueError("poll intervals must be above 0 seconds")
        #: Queries run so far.
        self.pages_read = 0
        #: Wait ends caused by a notification (a writer committed) or by :meth:`wake`.
        self.notify_wakeups = 0
        #: Wait ends caused by the poll interval running out.
        self.poll_wakeups = 0
        #: Wait ends caused by the LISTEN connection going down or coming back.
        self.reconnect_wakeups = 0
        self._read_page = _page_reader(journal, tag, event_types, make)
        self._must_wait = False  # the last page was short: wait before the next query
        self._held = False  # ... and a writer in flight held it back
        self._woken = asyncio.Event()
        self._reason: WakeReason | None = None
        self._in_wait = False
        self._started = False
        self._closed = False
        self._notifier: JournalNotifier | None = None
        self._subscription: Subscription | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def notifier(self) -> JournalNotifier | None:
        """What wakes this tailer: the process's LISTEN connection on PostgreSQL, its
        :class:`SqliteWatcher` on a SQLite file; None with ``listen`` (or the watch) off."""
        return self._notifier

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> bool:
        """True while the tailer has read everything and waits (no wake-up pending)."""
        return self._in_wait and not self._woken.is_set()

    async def start(self) -> None:
        """Subscribe to wake-ups (done by the first iteration or ``async with`` otherwise).
        Without it (or on SQLite, or with ``listen`` off) :meth:`wait` polls."""
        if self._started or self._closed:
            return
        self._started = True
        database = self.journal.database
        notifier: JournalNotifier
        if database.dialect == "sqlite":
            name = database.url.database
            if self.settings.sqlite_watch_interval <= 0 or not name or name == ":memory:":
                return
            notifier = await SqliteWatcher.acquire_file(database, self.settings)
        elif self.settings.listen:
            notifier = await JournalNotifier.acquire(database, self.settings)
        else:
            return
        if self._closed:  # closed by another task while acquiring
            await notifier.release()
            return
        self._notifier = notifier
        # A weak reference: the notifier must not keep an abandoned tailer alive (its
        # finalizer gives the reference back).
        tailer = weakref.ref(self)

        def wake(reason: WakeReason) -> None:
            live = tailer()
            if live is not None:
                live._on_wake(reason)

        self._subscription = notifier.subscribe(wake, self.tag)

    async def close(self) -> None:
        """Stop: a pending :meth:`wait` ends; the notifier subscription is released."""
        if self._closed:
            return
        self._closed = True
        self._woken.set()
        subscription, self._subscription = self._subscription, None
        notifier, self._notifier = self._notifier, None
        await unsubscribe(subscription, notifier)

    def __del__(self) -> None:
        # An unclosed tailer (an `async for` left with `break`) still gives its reference back.
        subscription = getattr(self, "_subscription", None)
        notifier = getattr(self, "_notifier", None)
        if subscription is not None:
            subscription.close()
        if notifier is not None:
            notifier._release_soon()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    def wake(self) -> None:
        """Query now instead of waiting (for example right after this process wrote)."""
        self._on_wake(WakeReason.NOTIFICATION)

    def _on_wake(self, reason: WakeReason) -> None:
        self._reason = reason
        self._woken.set()

    # ------------------------------------------------------------------ the loop

    async def next_page(self, after: int) -> TagPage:
        """The page after offset ``after``, read now (a failing query raises: call again)."""
        # Cleared before the query: a wake-up that arrives while it runs (or while the page is
        # handled) is kept, and ends the next wait at once.
        self._woken.clear()
        self._reason = None
        page = await self._read_page(after, self.page_size)
        self.pages_read += 1
        self._must_wait = not page.full
        self._held = page.held
        return page

    async def wait(self, limit: float | None = None) -> None:
        """Before the next query: nothing after a full page; after a short one, wait for a
        wake-up or the poll interval (at most ``limit`` seconds, for a caller with other
        duties such as renewing a lease)."""
        if not self._must_wait or self._closed:
            return
        interval = self._current_poll_interval()
        if self._held:
            # A writer in flight held the read back: its commit NOTIFYs, but a rollback does
            # not, and what others committed above it must not wait for the safety net.
            interval = min(interval, HELD_RECHECK_INTERVAL)
        timeout = interval if limit is None else max(0.0, min(interval, limit))
        self._in_wait = True
        try:
            async with asyncio.timeout(timeout):
                await self._woken.wait()
        except TimeoutError:
            self.poll_wakeups += 1
        else:
            if self._reason is WakeReason.NOTIFICATION:
                self.notify_wakeups += 1
            elif self._reason is not None:
                self.reconnect_wakeups += 1
        finally:
            self._in_wait = False
        self._must_wait = False

    def _current_poll_interval(self) -> float:
        if self._notifier is not None and self._notifier.connected:
            return self.listen_poll_interval
        return self.poll_interval


class EventTailer(PageTailer):
    """Every event after an offset, in offset order, each once, then the new ones as they
    commit; an endless async iterator over a :class:`PageTailer`. Build it with :func:`tail`.

    ::

        async with tail(journal, tag="user-events-0", after_offset=saved) as events:
            async for envelope in events:
                ...  # handle it; remember envelope.offset to resume from there

    Use it as an async context manager, or call :meth:`close`: that releases its
    subscription to the process's LISTEN connection (the last tailer's close closes the
    connection). :meth:`close` from another task also ends a pending ``async for``.

    A failing query raises out of the iteration (``JournalUnavailable`` when the database
    cannot be reached, ``EventDecodeError`` for an event that cannot be decoded);
    :attr:`offset` is where to resume with a new tailer.

    Attributes for metrics: :attr:`offset`, :attr:`events_yielded`, :attr:`pages_read`,
    :attr:`notify_wakeups`, :attr:`poll_wakeups`, :attr:`reconnect_wakeups`, :attr:`waiting`.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        tag: str | None = None,
        after_offset: int = 0,
        page_size: int | None = None,
        poll_interval: float | None = None,
        listen_poll_interval: float | None = None,
        settings: TailSettings | None = None,
    ) -> None:
        super().__init__(
            journal,
            tag=tag,
            page_size=page_size,
            poll_interval=poll_interval,
            listen_poll_interval=listen_poll_interval,
            settings=settings,
        )
        _check_arguments(after_offset, self.page_size)
        #: The offset of the last event yielded (``after_offset`` before the first): resume here.
        self.offset = after_offset
        #: Events yielded so far.
        self.events_yielded = 0
        self._fetched = after_offset  # the highest offset read into the buffer
        self._buffer: deque[EventEnvelope[Any]] = deque()

    async def close(self) -> None:
        """Stop: a pending or later iteration ends; the notifier subscription is released."""
        self._buffer.clear()
        await super().close()

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EventEnvelope[Any]:
        if not self._started:
            await self.start()
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self.wait()
            if self._closed:
                raise StopAsyncIteration
            await self._fetch()
        envelope = self._buffer.popleft()
        self.offset = envelope.offset
        self.events_yielded += 1
        return envelope

    async def _fetch(self) -> None:
        page = await self.next_page(self._fetched)
        if page.error is not None:
            self._must_wait = False  # the same query again on the next iteration
            raise page.error
        if self._closed:
            return
        self._buffer.extend(page.envelopes)
        self._fetched = page.last_offset


def tail(
    journal: Journal,
    *,
    tag: str | None = None,
    after_offset: int = 0,
    page_size: int | None = None,
    poll_interval: float | None = None,
    listen_poll_interval: float | None = None,
    settings: TailSettings | None = None,
) -> EventTailer:
    """Tail the journal: every event after ``after_offset`` (those carrying exactly ``tag``,
    or all of them), in offset order, then each new one as it commits. See
    :class:`EventTailer`; arguments left out come from ``settings`` (default
    :class:`TailSettings`, read from ``LAGOMPY_TAIL_*``)."""
    return EventTailer(
        journal,
        tag=tag,
        after_offset=after_offset,
        page_size=page_size,
        poll_interval=poll_interval,
        listen_poll_interval=listen_poll_interval,
        settings=settings,
    )
