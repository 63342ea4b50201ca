"""A task cancelled in the middle of a SQLite write transaction leaves the write lock free.

SQLAlchemy treats a cancellation during a statement as the end of the connection: it closes
the driver connection instead of rolling back. Python's ``sqlite3`` (3.11 on) no longer
finalizes a cursor's statement on close, so a statement whose rows were never fetched (the one
the cancellation interrupted) turned the closed connection into a zombie that kept its
transaction, and the database's write lock, for as long as the cancelled task's traceback kept
that cursor alive: the next ``BEGIN IMMEDIATE`` of any process waited out its busy timeout and
failed with "database is locked" (seen after the twenty kills of tests/test_workflow_ray.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from lagompy.sql import Database


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[Database, threading.Event]]:
    """A SQLite database with a table ``t`` and a function ``slow(seconds)`` that sleeps in the
    driver's thread (set: it started)."""
    started = threading.Event()

    def slow(seconds: float) -> int:
        started.set()
        time.sleep(seconds)
        return 1

    db = Database.create(url=f"sqlite:///{tmp_path / 'locks.db'}")

    @event.listens_for(db.engine.sync_engine, "connect")
    def _register(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("slow", 1, slow)

    async with db.write() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    try:
        yield db, started
    finally:
        await db.dispose()


async def _cancel_when_started(task: asyncio.Task[Any], started: threading.Event) -> None:
    assert await asyncio.to_thread(started.wait, 10), "the statement never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _another_writer_gets_the_lock(tmp_path: Path) -> list[int]:
    """A second engine (another process would do the same) writes within 2 s; the rows."""
    other = Database.create(url=f"sqlite:///{tmp_path / 'locks.db'}", sqlite_busy_timeout_ms=2000)
    try:
        async with other.write() as conn:
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        async with other.read() as conn:
            return [r[0] for r in (await conn.execute(text("SELECT x FROM t ORDER BY x")))]
    finally:
        await other.dispose()


async def test_a_write_cancelled_during_a_statement_rolls_back_and_frees_the_lock(
    database: tuple[Database, threading.Event], tmp_path: Path
) -> None:
    db, started = database

    async def write() -> None:
        async with db.write() as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            await conn.execute(text("SELECT slow(0.3)"))

    task = asyncio.create_task(write())
    await _cancel_when_started(task, started)
    # `task` (a cancelled task keeps its CancelledError and traceback) is still referenced here,
    # as the cancelled tasks of a closed consumer were: the lock must be free all the same.
    assert await _another_writer_gets_the_lock(tmp_path) == [2]
    assert task.cancelled()


async def test_a_pooled_transaction_cancelled_during_a_statement_frees_the_lock(
    database: tuple[Database, threading.Event], tmp_path: Path
) -> None:
    db, started = database

    async def write() -> None:
        async with db.pooled_transaction(db.begin_immediate) as driver:
            await driver.execute("INSERT INTO t VALUES (1)")
            await driver.execute("SELECT slow(0.3)")

    task = asyncio.create_task(write())
    await _cancel_when_started(task, started)
    assert await _another_writer_gets_the_lock(tmp_path) == [2]
    assert task.cancelled()
