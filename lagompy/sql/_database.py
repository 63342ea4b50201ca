"""Connections to the journal's database: URL handling, engine set-up, transactions, errors.

SQLite is written by several processes (shard hosts, read-side workers, the CLI), so every SQLite
connection runs in WAL mode with a busy timeout, and write transactions start with
``BEGIN IMMEDIATE``: a transaction that would read first and write later takes the write lock up
front instead of failing with "database is locked" when it tries to upgrade. A
``BEGIN IMMEDIATE`` that finds the lock taken retries every millisecond rather than in SQLite's
own busy-handler steps (see :func:`sqlite_begin_immediate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import asyncpg
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import await_only

from lagompy.errors import ConfigurationError, JournalError, JournalUnavailable, LagompyError
from lagompy.settings import JournalSettings, make_settings

log = logging.getLogger("lagompy.database")

#: The read transaction the current task holds open, per database (see ``Database.read``).
_HELD_READ: contextvars.ContextVar[tuple[Database, asyncio.Task[Any], AsyncConnection] | None] = (
    contextvars.ContextVar("lagompy_held_read", default=None)
)

Dialect = Literal["sqlite", "postgresql"]

_BEGIN_OPTION = "lagompy_sqlite_begin"

#: How a transaction on a driver connection begins: SQL (which may carry further statements,
#: sent in the same round trip: asyncpg), or a coroutine function of the driver connection
#: (SQLite's :func:`sqlite_begin_immediate`).
T = TypeVar("T")

Begin = str | Callable[[Any], Awaitable[None]]


def normalize_url(url: str | URL) -> URL:
    """Pick the async driver for the URL's database and make SQLite file paths absolute.

    ``sqlite:///x.db`` becomes ``sqlite+aiosqlite:////abs/path/x.db``; ``postgresql://`` (or
    ``postgres://``) becomes ``postgresql+asyncpg://``. Other databases are refused.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except exc.ArgumentError as e:
        raise ConfigurationError(f"invalid database URL {str(url)!r}: {e}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return parsed.set(database=database or ":memory:")
        path = Path(database).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.parent.is_dir():
            raise ConfigurationError(
                f"SQLite database {str(path)!r}: directory {str(path.parent)!r} does not exist"
            )
        return parsed.set(database=str(path))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigurationError(
        f"unsupported database {backend!r} in URL {parsed.render_as_string(hide_password=True)!r}: "
        "lagompy's journal runs on sqlite:// or postgresql://"
    )


def dialect_of(url: URL) -> Dialect:
    """The journal backend a database URL names: ``"sqlite"`` or ``"postgresql"``."""
    return "sqlite" if url.get_backend_name() == "sqlite" else "postgresql"


class Database:
    """An async SQLAlchemy engine set up for lagompy, with write and read transactions."""

    def __init__(self, engine: AsyncEngine, settings: JournalSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.url: URL = engine.url
        self.dialect: Dialect = dialect_of(engine.url)
        #: What write() asks of its connection: SQLite's BEGIN IMMEDIATE (see _configure_sqlite)
        self._write_options: dict[str, Any] = (
            {_BEGIN_OPTION: "IMMEDIATE"} if self.dialect == "sqlite" else {}
        )
        #: SQLite: how a write transaction on a driver connection begins (``pooled_transaction``
        #: and ``driver_transaction`` take it), waiting as long as this database's busy timeout,
        #: the one every connection gets when it connects
        self.begin_immediate: Callable[[Any], Awaitable[None]] = functools.partial(
            sqlite_begin_immediate, timeout_ms=settings.sqlite_busy_timeout_ms
        )
        #: PostgreSQL: the connection kept_transaction keeps checked out between transactions
        #: (with its driver connection), and the lock that makes writers take turns on it
        self._writer: tuple[AsyncConnection, Any, Any] | None = None
        self._writer_lock: asyncio.Lock | None = None
        #: SQLite: the turn of this process's one-call write transactions (see write_turn)
        self._write_turn: asyncio.Lock | None = None

    @classmethod
    def create(cls, settings: JournalSettings | None = None, **overrides: Any) -> Database:
        """Build the engine (no connection is opened yet) for ``settings`` with ``overrides``
        (:func:`~lagompy.settings.make_settings`: each keyword replaces its field)."""
        settings = make_settings(JournalSettings, settings, **overrides)
        url = normalize_url(settings.url)
        kwargs: dict[str, Any] = {"echo": settings.echo}
        if dialect_of(url) == "sqlite":
            kwargs["connect_args"] = {
                "timeout": settings.sqlite_busy_timeout_ms / 1000,
                "factory": RollbackOnClose,
            }
            if url.database == ":memory:":
                kwargs["poolclass"] = StaticPool
            else:
                kwargs.update(pool_size=settings.pool_size, max_overflow=settings.max_overflow)
                kwargs["pool_timeout"] = settings.pool_timeout
        else:
            server_settings = {
                "application_name": "lagompy",
                "lock_timeout": str(settings.lock_timeout_ms),
            }
            if settings.postgres_schema:
                server_settings["search_path"] = settings.postgres_schema
            kwargs["connect_args"] = {"server_settings": server_settings}
            kwargs.update(
                pool_size=settings.pool_size,
                max_overflow=settings.max_overflow,
                pool_timeout=settings.pool_timeout,
            )
        engine = create_async_engine(url, **kwargs)
        if dialect_of(url) == "sqlite":
            _configure_sqlite(engine, settings)
        return cls(engine, settings)

    @contextlib.asynccontextmanager
    async def write(self, *, lazy_begin: bool = False) -> AsyncIterator[AsyncConnection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit.

        With ``lazy_begin`` the transaction begins with the connection's first statement
        rather than on entry, so that work done before it (a read side's handlers whose writes
        are deferred to the end of their batch) does not hold SQLite's write lock, which every
        other writer of the file waits for. Nothing changes on PostgreSQL but when ``BEGIN``
        is sent."""
        with translate_errors("write transaction"):
            async with self.engine.connect() as conn:
                if self._write_options:
                    conn = await conn.execution_options(**self._write_options)
                if not lazy_begin:
                    async with conn.begin():
                        yield conn
                    return
                # SQLAlchemy begins at the first statement (autobegin; the begin hook sends
                # SQLite's BEGIN IMMEDIATE then). Closing the connection rolls back on error.
                yield conn
                if conn.in_transaction():
                    await conn.commit()

    def write_turn(self) -> asyncio.Lock:
        """SQLite: the lock this process's write transactions sent in one call to the
        driver's thread (:func:`sqlite_commit_in_one_call`) take around that call, one at a
        time, in the order they came.

        The file has one write lock; a ``BEGIN IMMEDIATE`` that finds it taken polls every
        millisecond in its connection's thread (:func:`sqlite_begin_immediate`), taking the GIL
        each time, and the transaction that holds the lock needs the GIL back after each of its
        statements' steps. A rebuild's four workers on one file had three threads polling
        beside the one writing: its transactions of 1,000 rows held the lock 13-16 ms (median)
        for 3-4.5 ms of their thread's CPU, the waits for it added up to 4-5.5 s per rebuild of
        100,000 events. Queued here they wait in the event loop: the lock was held 6-10 ms,
        the waits came to 0.5 s, and the process used ~20% less CPU (docs' users projection,
        2026-12-06, alternated runs). Other processes (and this process's other writers) are
        still waited for by ``BEGIN IMMEDIATE`` as before."""
        if self._write_turn is None:
            self._write_turn = asyncio.Lock()
        return self._write_turn

    @contextlib.asynccontextmanager
    async def pooled_transaction(self, begin: Begin = "BEGIN") -> AsyncIterator[Any]:
        """A transaction begun with ``begin`` (SQLite's journal: :func:`sqlite_begin_immediate`)
        on the driver connection (aiosqlite or asyncpg) of a connection from the pool, for hot
        paths that SQLAlchemy would slow down. Commits on exit, rolls back on error (or invalidates
        the connection when the error says it is broken); errors are translated into the
        ``JournalError`` tree."""
        with translate_errors("write transaction"):
            async with self.engine.connect() as conn:
                fairy = await conn.get_raw_connection()
                async with driver_transaction(fairy, begin) as driver:
                    yield driver

    @contextlib.asynccontextmanager
    async def kept_transaction(self, begin: str = "BEGIN") -> AsyncIterator[Any]:
        """A transaction begun with ``begin`` (which may carry further statements, sent in the
        same round trip) on the kept write connection of :meth:`raw_writer` (asyncpg): the
        connection stays checked out for the next write (this database's writers take turns
        on it), as a pool checkout and return cost ~0.1-0.2 ms of CPU per transaction, as much
        as a round trip. It is dropped when it fails or is cancelled mid transaction, and
        released by :meth:`dispose`. Commits on exit, rolls back on error; errors are
        translated into the ``JournalError`` tree."""
        async with self._kept_writer("write transaction") as fairy:
            async with driver_transaction(fairy, begin) as driver:
                yield driver

    @contextlib.asynccontextmanager
    async def raw_writer(self) -> AsyncIterator[Any]:
        """The kept write connection (asyncpg: PostgreSQL only, see :meth:`kept_transaction`),
        outside a transaction, for a statement that is a transaction of its own. It is dropped
        when the statement fails or is cancelled; errors are translated into the
        ``JournalError`` tree and a broken connection is invalidated."""
        async with self._kept_writer("write") as fairy:
            try:
                yield fairy.driver_connection
            except BaseException as e:
                _invalidate_if_broken(fairy, e)
                raise

    @contextlib.asynccontextmanager
    async def _kept_writer(self, what: str) -> AsyncIterator[Any]:
        """The PostgreSQL write connection kept between writes (its pool fairy), held by one
        writer of this database at a time."""
        if self._writer_lock is None:
            self._writer_lock = asyncio.Lock()
        with translate_errors(what):
            async with self._writer_lock:
                if self._writer is not None and self._writer[2].is_closed():
                    # The server closed it since (a restart, an idle timeout, a terminated
                    # backend): the pool must not hand it out again either.
                    stale, self._writer = self._writer, None
                    stale[1].invalidate()
                    with contextlib.suppress(Exception):
                        await stale[0].close()
                if self._writer is None:
                    conn = await self.engine.connect()
                    try:
                        fairy = await conn.get_raw_connection()
                    except BaseException:
                        await conn.close()
                        raise
                    self._writer = (conn, fairy, fairy.driver_connection)
                conn, fairy, _ = self._writer
                healthy = False
                try:
                    yield fairy
                    healthy = True
                finally:
                    if not healthy:
                        # Failed or cancelled: the next write takes a fresh connection (from
                        # the pool, which keeps this one unless it was invalidated).
                        self._writer = None
                        with contextlib.suppress(Exception):
                            await conn.close()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction for all its statements. A read opened inside another read of the
        same database, by the same task, joins it: recovering an entity reads its snapshot, its
        later events and its deletions in one transaction instead of three (each costs a pool
        checkout, a BEGIN and a COMMIT; on SQLite through aiosqlite's thread). Recovery of an
        entity of 10,000 events from a snapshot, medians of three runs interleaved with the
        code before, 2026-12-04 (CPU reference 14.5 ms): SQLite 4.6 -> 3.5 ms, PostgreSQL
        3.3 -> 2.3 ms. Only the task that opened it joins (tasks it spawns inherit the
        context, not the connection)."""
        task = asyncio.current_task()
        held = _HELD_READ.get()
        if held is not None and held[0] is self and held[1] is task and task is not None:
            yield held[2]
            return
        with translate_errors("read"):
            async with self.engine.connect() as conn:
                async with conn.begin():
                    token = _HELD_READ.set((self, task, conn)) if task is not None else None
                    try:
                        yield conn
                    finally:
                        if token is not None:
                            _HELD_READ.reset(token)

    async def dispose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer[0].close()
        await self.engine.dispose()

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)


@contextlib.asynccontextmanager
async def driver_transaction(fairy: Any, begin: Begin) -> AsyncIterator[Any]:
    """``begin`` ... COMMIT on the fairy's driver connection; ROLLBACK on error, or invalidate
    the connection when the error says it is broken."""
    driver: Any = fairy.driver_connection
    try:
        if isinstance(begin, str):
            await driver.execute(begin)
        else:
            await begin(driver)
        yield driver
        await driver.execute("COMMIT")
    except BaseException as e:
        if not _invalidate_if_broken(fairy, e):
            with contextlib.suppress(Exception):
                await driver.execute("ROLLBACK")
        raise


def _invalidate_if_broken(fairy: Any, error: BaseException) -> bool:
    """Invalidate the pooled connection when ``error`` says it is broken (the pool must not
    hand it out again); return whether it did."""
    if not _is_disconnect(error):
        return False
    fairy.invalidate(error if isinstance(error, Exception) else None)
    return True


class RollbackOnClose(sqlite3.Connection):
    """The SQLite driver connection: rolls its open transaction back before it closes.

    SQLAlchemy closes the driver connection of a statement that a cancellation interrupted (it
    cannot tell whether the connection is still usable), without a ROLLBACK. Since Python 3.11,
    ``sqlite3``'s close no longer finalizes the statements of live cursors, so a statement whose
    rows were never fetched (the one the cancellation interrupted) made the closed connection a
    zombie that kept its transaction, and the database's write lock, until that cursor was
    freed: as long as the cancelled task's traceback lived. Every other writer of the file, in
    any process, then waited out its busy timeout and failed with "database is locked" (a
    workflow executor replaced after a host kill, 1 run in 3 on a loaded machine; reproduced by
    tests/test_sqlite_cancel.py). A ROLLBACK first ends the transaction whatever the cursors."""

    def close(self) -> None:
        try:
            if self.in_transaction:
                self.rollback()
        except sqlite3.Error:
            pass  # closed already, or the file is gone: close() says what it has to
        super().close()


#: SQLite's primary result code SQLITE_BUSY (the low byte of its extended codes SQLITE_BUSY_*).
_SQLITE_BUSY = 5
#: Seconds between the tries of a ``BEGIN IMMEDIATE`` that found the write lock taken.
_BEGIN_RETRY_INTERVAL = 0.001


async def in_sqlite_thread(driver: Any, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` in the thread of the aiosqlite connection ``driver``, ``conn`` being
    its sqlite3 connection: one hop to that thread for work that would otherwise take one per
    statement.

    aiosqlite has no public way to run a function in its thread: this uses its ``_execute`` and
    ``_conn``, as SQLAlchemy's own aiosqlite adapter uses its ``_conn`` and ``_tx``; every use
    in lagompy goes through here."""
    return cast("T", await driver._execute(fn, driver._conn, *args))


async def sqlite_begin_immediate(driver: Any, *, timeout_ms: int) -> None:
    """``BEGIN IMMEDIATE`` on an aiosqlite connection, retried every millisecond while another
    connection holds the database's write lock, for ``timeout_ms`` (the connection's busy
    timeout: :attr:`Database.begin_immediate` passes its settings'); then it fails as SQLite's
    own wait does ("database is locked").

    SQLite's busy handler sleeps between its tries in steps of 1, 2, 5, 10, 15, 20, 25, 25, 25,
    50, 50 and then 100 ms: a waiter missed the brief moments when the lock was free between
    busy writers' transactions and got it up to ~100 ms after it was freed; that was most of the
    same-database read-side lag on SQLite, p99 236-793 ms at 2,000 events/s, 41-101 ms since
    (docs/benchmarks.md). Here the wait runs in the driver's thread (one hop, as the plain
    statement took: :func:`in_sqlite_thread`), with the busy timeout at 0 for the BEGIN only.
    Uncontended, it costs two PRAGMAs in that thread (~2 us each, against ~25 us for the
    hop)."""
    await in_sqlite_thread(driver, _begin_immediate, int(timeout_ms))


def _begin_immediate(conn: sqlite3.Connection, timeout_ms: int) -> None:
    """The wait of :func:`sqlite_begin_immediate`, in the driver's thread."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        deadline: float | None = None
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode & 0xFF != _SQLITE_BUSY:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout_ms / 1000
                if now >= deadline:
                    raise
            time.sleep(_BEGIN_RETRY_INTERVAL)
    finally:
        conn.execute(f"PRAGMA busy_timeout={timeout_ms}")


class SqliteWritesFailed(Exception):
    """Raised by :func:`sqlite_commit_in_one_call` when one of its ``writes`` failed (the
    transaction is rolled back): ``error`` is the driver's error, told apart from a failure of
    the transaction's last statement."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


async def sqlite_commit_in_one_call(
    driver: Any,
    *,
    timeout_ms: int,
    writes: Sequence[tuple[str, Sequence[Any]]],
    last: tuple[str, Sequence[Any]],
) -> list[Any] | None:
    """One write transaction in one call to an aiosqlite connection's thread: ``BEGIN
    IMMEDIATE`` (as :func:`sqlite_begin_immediate` waits for it), each of ``writes`` (SQL and
    its rows, one executemany each), then ``last`` (SQL and its parameters, with RETURNING):
    committed when it returns rows, which are returned; rolled back (and None returned) when
    it returns none. ``SqliteWritesFailed`` when a write fails; the driver's error when the
    begin or ``last`` does.

    Why: SQLite has one write lock per file, held from ``BEGIN IMMEDIATE`` to ``COMMIT``, and
    every other writer of the file (the journal's shard hosts, other read sides) waits for it.
    Sent statement by statement from a busy event loop, each statement's result waits for
    the loop's turn: a read side's transaction of three or four statements held the lock for
    4.8-5.8 ms p50 (8.5-15.9 ms at worst) while the workflow runs index was written beside
    running workflows (measured 2026-12-06 with a trace of every statement's time); in one call
    it holds it for the statements' own time."""
    return await in_sqlite_thread(driver, _commit_in_one_call, int(timeout_ms), writes, last)


def _commit_in_one_call(
    conn: sqlite3.Connection,
    timeout_ms: int,
    writes: Sequence[tuple[str, Sequence[Any]]],
    last: tuple[str, Sequence[Any]],
) -> list[Any] | None:
    """The transaction of :func:`sqlite_commit_in_one_call`, in the driver's thread."""
    _begin_immediate(conn, timeout_ms)
    try:
        for sql, rows in writes:
            try:
                conn.executemany(sql, rows)
            except sqlite3.Error as e:
                raise SqliteWritesFailed(e) from e
        # Every row fetched: a statement still stepping would keep COMMIT from running.
        returned = conn.execute(last[0], last[1]).fetchall()
        if not returned:
            conn.execute("ROLLBACK")
            return None
        conn.execute("COMMIT")
        return returned
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _configure_sqlite(engine: AsyncEngine, settings: JournalSettings) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (the driver's implicit BEGIN is
        # deferred and only happens before DML).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(settings.sqlite_busy_timeout_ms)}")
            if engine.url.database != ":memory:":
                _switch_to_wal(cursor, settings.sqlite_busy_timeout_ms / 1000)
            cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        if mode != "IMMEDIATE":
            conn.exec_driver_sql(f"BEGIN {mode}")
            return
        try:
            await_only(
                sqlite_begin_immediate(
                    conn.connection.driver_connection,
                    timeout_ms=settings.sqlite_busy_timeout_ms,
                )
            )
        except sqlite3.Error as e:
            # As the statement through SQLAlchemy would have raised it.
            raise exc.DBAPIError.instance("BEGIN IMMEDIATE", (), e, sqlite3.Error) from e


def _switch_to_wal(cursor: Any, timeout: float) -> None:
    """Put the database file in WAL mode (a no-op once it is: the mode is stored in the file).

    The first switch of a new file is a write in the old journal mode, and SQLite answers a
    concurrent connection's switch "database is locked" at once, without its busy handler
    (measured: 4 processes opening one new file, 1 in 4 rounds failed). So the switch is retried,
    with short sleeps, for as long as the busy timeout would have waited; a mode other than
    ``wal`` after that is a configuration error (a read-only or network file system)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            row = cursor.fetchone()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        else:
            mode = str(row[0]).lower() if row else "unknown"
            if mode == "wal":
                return
            if time.monotonic() >= deadline:
                raise ConfigurationError(
                    f"SQLite could not switch the database to WAL mode (it stays in {mode!r})"
                )
        await_only(asyncio.sleep(delay))
        delay = min(delay * 2, 0.05)


_UNAVAILABLE_HINTS = (
    "connection refused",
    "could not connect",
    "connection was closed",
    "connection is closed",
    "unable to open database",
    "timeout",
    "accepting connections",
    "terminating connection",
    # PostgreSQL starting, stopping or recovering (CannotConnectNowError, AdminShutdownError,
    # CrashShutdownError): it will answer again, so the outcome is "unreachable", not a bug.
    "the database system is",
)


def _is_disconnect(error: BaseException) -> bool:
    if isinstance(error, asyncpg.exceptions._base.DataError):
        return False  # a parameter the driver could not encode: the connection is fine
    return isinstance(
        error,
        (
            OSError,
            ConnectionError,
            asyncpg.InterfaceError,
            asyncpg.ConnectionDoesNotExistError,
            asyncpg.PostgresConnectionError,
            # The driver's protocol state is broken (seen when the server terminated the
            # connection while it was idle and it is used before the close is noticed).
            asyncpg.InternalClientError,
        ),
    )


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn database and driver errors into lagompy's ``JournalError`` tree, cause attached."""
    try:
        yield
    except LagompyError:
        raise
    except (OSError, ConnectionError) as e:
        raise JournalUnavailable(f"{what}: the database cannot be reached: {e}") from e
    except asyncpg.exceptions._base.DataError as e:
        # The driver could not encode a parameter: the data is wrong, the connection is fine
        # (an InterfaceError too, which would otherwise read as an outage).
        raise JournalError(f"{what} failed: {e}") from e
    except (
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.InternalClientError,
    ) as e:
        raise JournalUnavailable(f"{what}: the database connection failed: {e}") from e
    except asyncpg.PostgresError as e:
        if any(h in str(e).lower() for h in _UNAVAILABLE_HINTS):
            raise JournalUnavailable(f"{what}: the database cannot be reached: {e}") from e
        raise JournalError(f"{what} failed: {e}") from e
    except sqlite3.Error as e:
        if any(h in str(e).lower() for h in _UNAVAILABLE_HINTS):
            raise JournalUnavailable(f"{what}: the database cannot be reached: {e}") from e
        raise JournalError(f"{what} failed: {e}") from e
    except exc.DBAPIError as e:
        message = str(e.orig) if e.orig is not None else str(e)
        if e.connection_invalidated or any(h in message.lower() for h in _UNAVAILABLE_HINTS):
            raise JournalUnavailable(f"{what}: the database cannot be reached: {message}") from e
        raise JournalError(f"{what} failed: {message}") from e
    except exc.SQLAlchemyError as e:
        raise JournalError(f"{what} failed: {e}") from e
