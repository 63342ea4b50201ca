"""A SQLite write transaction that finds the write lock taken starts soon after it is freed.

SQLite's own busy handler sleeps between its tries in steps of 1, 2, 5, 10, 15, 20, 25, 25, 25,
50, 50 and then 100 ms: a waiter that had tried 228 ms after it started waiting tries next at
328 ms, whenever the lock is freed in between. That was most of the read-side lag's p99 on
SQLite when the read side and the journal's writer share the file (docs/benchmarks.md).
lagompy's ``BEGIN IMMEDIATE`` retries every millisecond instead, for as long as the busy
timeout, then fails as before; both ways a write transaction begins (``Database.write``, through
SQLAlchemy, and the journal's ``pooled_transaction``) are tested."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from lagompy.errors import JournalError
from lagompy.sql import Database

#: Seconds the other connection holds the lock: 17 ms after SQLite's busy handler's try at
#: 228 ms, 83 ms before its next one.
HOLD = 0.245
#: The most a waiter may take to start its transaction once the lock is free: a fifth of what
#: SQLite's own wait took in this test, with room for a loaded machine's scheduling.
BOUND = 0.020

Begin = Callable[[Database], AbstractAsyncContextManager[Any]]


def _write(db: Database) -> AbstractAsyncContextManager[Any]:
    return db.write()


def _pooled(db: Database) -> AbstractAsyncContextManager[Any]:
    return db.pooled_transaction(db.begin_immediate)


WAYS = pytest.mark.parametrize("begin", [_write, _pooled], ids=["write", "pooled_transaction"])


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database.create(url=f"sqlite:///{tmp_path / 'lock.db'}", sqlite_busy_timeout_ms=2000)
    async with db.write() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    try:
        yield db
    finally:
        await db.dispose()


@contextlib.contextmanager
def _holder(db: Database) -> Any:
    """Another connection to the file, holding its write lock until the block's end."""
    assert db.url.database is not None
    other = sqlite3.connect(db.url.database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield other
        finally:
            if other.in_transaction:
                other.execute("COMMIT")
    finally:
        other.close()


async def _busy_timeout(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(text("PRAGMA busy_timeout"))).scalar_one())


async def _latency_after_release(db: Database, begin: Begin) -> float:
    """Seconds from the other connection's COMMIT to the start of a transaction that had been
    waiting for the lock since the other took it."""
    acquired = 0.0
    with _holder(db) as other:

        async def wait() -> None:
            nonlocal acquired
            async with begin(db) as tx:
                acquired = time.perf_counter()
                if hasattr(tx, "dialect"):
                    await tx.execute(text("INSERT INTO t VALUES (1)"))
                else:
                    await tx.execute("INSERT INTO t VALUES (1)")

        waiter = asyncio.create_task(wait())
        await asyncio.sleep(HOLD)
        assert not waiter.done(), "the waiter started its transaction while the lock was held"
        other.execute("COMMIT")
        released = time.perf_counter()
        await asyncio.wait_for(waiter, 10)
    return acquired - released


@WAYS
async def test_a_waiting_write_starts_within_milliseconds_of_the_lock_being_freed(
    database: Database, begin: Begin
) -> None:
    # Several tries: one that the machine's load delayed does not fail the test; SQLite's
    # own wait took ~83 ms in each.
    latencies = []
    for _ in range(3):
        latencies.append(await _latency_after_release(database, begin))
        if latencies[-1] < BOUND:
            break
    assert min(latencies) < BOUND, [f"{s * 1000:.1f} ms" for s in latencies]
    assert await _busy_timeout(database) == 2000


@WAYS
async def test_a_write_that_waits_out_the_busy_timeout_fails_as_before(
    tmp_path: Path, begin: Begin
) -> None:
    db = Database.create(url=f"sqlite:///{tmp_path / 'lock.db'}", sqlite_busy_timeout_ms=150)
    try:
        await _busy_timeout(db)  # the file exists, in WAL mode
        with _holder(db):
            started = time.monotonic()
            with pytest.raises(JournalError, match="database is locked") as raised:
                async with begin(db):
                    pass
            waited = time.monotonic() - started
        assert 0.15 <= waited < 2.0, waited
        cause = raised.value.__cause__
        assert cause is not None
        orig = getattr(cause, "orig", cause)
        assert isinstance(orig, sqlite3.OperationalError)
        assert orig.sqlite_errorcode == 5  # SQLITE_BUSY
        # The busy timeout is the configured one again, and the lock is free.
        assert await _busy_timeout(db) == 150
        async with begin(db):
            pass
    finally:
        await db.dispose()


@WAYS
async def test_an_uncontended_write_keeps_the_busy_timeout(
    database: Database, begin: Begin
) -> None:
    async with begin(database) as tx:
        if hasattr(tx, "dialect"):
            inside = (await tx.execute(text("PRAGMA busy_timeout"))).scalar_one()
        else:
            inside = (await tx.execute_fetchall("PRAGMA busy_timeout"))[0][0]
    assert inside == 2000
    assert await _busy_timeout(database) == 2000


@WAYS
async def test_a_write_cancelled_while_it_waits_for_the_lock_leaves_it_free(
    database: Database, begin: Begin
) -> None:
    with _holder(database) as other:

        async def wait() -> None:
            async with begin(database):
                pass

        waiter = asyncio.create_task(wait())
        await asyncio.sleep(0.05)
        waiter.cancel()
        await asyncio.sleep(0.05)
        other.execute("COMMIT")
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # Not the busy timeout (2 s): the wait went on in the driver's thread and got the lock
        # once it was freed; the rollback (or close) queued behind it freed it again.
        assert time.monotonic() - started < 1.0
    # Another connection writes at once.
    assert database.url.database is not None
    other = sqlite3.connect(database.url.database, isolation_level=None, timeout=2)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t VALUES (3)")
        other.execute("COMMIT")
    finally:
        other.close()
    async with database.write() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1


async def test_the_idempotency_key_stores_lone_statements_wait_the_same_way(
    database: Database,
) -> None:
    """The key store's calls of one statement (a sweep, one claim) run in the database's
    ``BEGIN IMMEDIATE`` too, not in autocommit mode, where SQLite's busy handler waits."""
    from lagompy.service._idempotency import _SqliteKeys
    from lagompy.sql._schema import idempotency_keys

    async with database.write() as conn:
        await conn.run_sync(lambda sync: idempotency_keys.create(sync))
    keys = _SqliteKeys(database)

    latencies = []
    for _ in range(3):
        # From the other's COMMIT to the end of the sweep that waited for the lock.
        with _holder(database) as other:
            waiter = asyncio.create_task(keys.sweep("scope", 0, 10))
            await asyncio.sleep(HOLD)
            assert not waiter.done(), "the sweep ran while the lock was held"
            other.execute("COMMIT")
            started = time.perf_counter()
            await asyncio.wait_for(waiter, 10)
        latencies.append(time.perf_counter() - started)
        if latencies[-1] < BOUND:
            break
    assert min(latencies) < BOUND, [f"{s * 1000:.1f} ms" for s in latencies]
