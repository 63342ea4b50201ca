"""Handlers' writes deferred and sent as executemany runs (lagompy.readside._batching) leave the
same tables as one event per transaction, on SQLite and PostgreSQL.

The property: random events, each a list of operations (Core and text inserts, upserts,
updates whose result depends on the order, deletes, reads whose values feed later writes, a
read of a write's ``rowcount``, a handler that catches its own insert's error, failures), run
by a real worker twice: once one event per transaction (``max_batch=1``: the plain
connection), once in batches (the deferring connection). Failing events are skipped
(``on_failure="skip"``) both times; the final tables must be equal."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy import (
    AtomicWrite,
    EventEnvelope,
    JournalSettings,
    Storage,
    open_storage,
    sharded_tag,
)
from lagompy.journal import TailSettings
from lagompy.readside import ReadSideSettings, SqlReadSideProcessor
from lagompy.readside._settings import projection_settings
from lagompy.readside._worker import ProjectionCommit, ReadSideWorker, run_global_prepare
from lagompy.serialization import Serializer, serializable
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from tests.conftest import (
    POSTGRES_URL,
    _copy_migrated_sqlite,
    _create_schema,
    _drop_schema,
    _empty_schema,
    require_postgres,
)


@serializable("tests.batching.Ops")
@dataclass(frozen=True)
class Ops:
    """An event: the operations its handler runs, as JSON."""

    ops: str


metadata = MetaData()
kv = Table(
    "batching_kv",
    metadata,
    Column("k", Integer, primary_key=True),
    Column("v", Integer),
    # Typed columns whose values go through bind processors (SQLite: 0/1 and text).
    Column("on", Boolean),
    Column("at", DateTime),
)
seen = Table(
    "batching_seen", metadata, Column("id", Integer, primary_key=True), Column("v", Integer)
)
UPSERT = text(
    "INSERT INTO batching_kv (k, v) VALUES (:k, :v) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
)
DOUBLE = text("UPDATE batching_kv SET v = v * 2 + :d WHERE k = :k")
#: A Core statement built once, each event bringing its values (the docs' simple way).
SET_V = update(kv).where(kv.c.k == bindparam("kk")).values(v=bindparam("vv"))
#: Built once too, with a constant bound in the statement beside the event's values.
STAMP = update(kv).where(kv.c.k == bindparam("kk")).values(on=True, at=bindparam("at"))
EPOCH = datetime(2026, 1, 1)


class Boom(Exception):
    pass


class OpsProjection(SqlReadSideProcessor):
    name = "batching-ops"
    tag = "batching"
    event_types = (Ops,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.run_sync(metadata.create_all)

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        base = envelope.offset * 100
        for i, (op, k, v) in enumerate(json.loads(envelope.event.ops)):
            if op == "ins":  # fails on a duplicate key
                await conn.execute(insert(kv).values(k=k, v=v))
            elif op == "put":
                await conn.execute(UPSERT, {"k": k, "v": v})
            elif op == "tput":  # the same SQL, a text() of its own (docs/readside.md's way)
                await conn.execute(text(UPSERT.text), {"k": k, "v": v})
            elif op == "add":
                await conn.execute(update(kv).where(kv.c.k == k).values(v=kv.c.v + v))
            elif op == "double":
                await conn.execute(DOUBLE, {"k": k, "d": v})
            elif op == "set":
                await conn.execute(SET_V, {"kk": k, "vv": v})
            elif op == "stamp":
                await conn.execute(STAMP, {"kk": k, "at": EPOCH + timedelta(seconds=v)})
            elif op == "mark":  # built per event, typed values bound in it (joined runs)
                at = EPOCH + timedelta(seconds=v)
                await conn.execute(update(kv).where(kv.c.k == k).values(on=v % 2 == 0, at=at))
            elif op == "del":
                await conn.execute(delete(kv).where(kv.c.k == k))
            elif op == "many":  # an executemany, as handle_batch's set-based writes send
                await conn.execute(SET_V, [{"kk": k, "vv": v}, {"kk": (k + 1) % 4, "vv": -v}])
            elif op == "tmany":  # the same with text(), the upsert of two keys
                await conn.execute(UPSERT, [{"k": k, "v": v}, {"k": (k + 2) % 4, "v": v + 1}])
            elif op == "read":  # what it reads is written on
                found = await conn.scalar(select(kv.c.v).where(kv.c.k == k))
                await conn.execute(insert(seen).values(id=base + i, v=found))
            elif op == "readrow":
                row = (await conn.execute(select(kv.c.v).where(kv.c.k == k))).first()
                await conn.execute(UPSERT, {"k": k + 1, "v": -1 if row is None else row[0]})
            elif op == "rowcount":  # the result of a write: not deferrable
                result = await conn.execute(update(kv).where(kv.c.k == k).values(v=v))
                if result.rowcount == 0:
                    await conn.execute(insert(seen).values(id=base + i, v=v))
            elif op == "tryins":  # its own error, caught (SQLite goes on, PostgreSQL cannot)
                try:
                    await conn.execute(insert(kv).values(k=k, v=v))
                except IntegrityError:
                    pass
            elif op == "tryread":  # catches the error of any write sent before the read
                try:
                    await conn.scalar(select(kv.c.v).where(kv.c.k == k))
                except IntegrityError:
                    pass
            elif op == "fail":
                raise Boom(f"event {envelope.offset} fails")

    async def reset(self, conn: AsyncConnection) -> None:
        await conn.execute(delete(kv))
        await conn.execute(delete(seen))


keys = st.integers(0, 3)
values = st.integers(-5, 5)
write = st.tuples(
    st.sampled_from(
        ["put", "tput", "add", "double", "set", "stamp", "mark", "del", "many", "tmany"]
    ),
    keys,
    values,
)
read = st.tuples(st.sampled_from(["read", "readrow"]), keys, st.just(0))
failing = st.one_of(
    st.tuples(st.sampled_from(["ins", "tryins"]), keys, values),
    st.tuples(st.just("tryread"), keys, st.just(0)),
    st.tuples(st.just("fail"), keys, st.just(0)),
)
#: Writes in long runs (what gets batched), reads whose values are written on.
event = st.lists(st.one_of(write, write, write, read), max_size=4)
#: The same, sometimes failing: a handler that raises, an insert of a key that may exist
#: (whose error a handler may catch, at its own statement or at the read that sends it).
risky_event = st.lists(st.one_of(write, write, write, read, failing), max_size=4)


async def _tables(projection: Database) -> tuple[list[Any], list[Any]]:
    async with projection.read() as conn:
        rows = (await conn.execute(select(kv).order_by(kv.c.k))).all()
        logged = (await conn.execute(select(seen).order_by(seen.c.id))).all()
    return [tuple(r) for r in rows], [tuple(r) for r in logged]


def _settings(max_batch: int) -> ReadSideSettings:
    return ReadSideSettings(
        max_batch=max_batch,
        max_attempts=1,
        on_failure="skip",
        retry_initial_delay=0.001,
        retry_max_delay=0.001,
        tail=TailSettings(poll_interval=0.02),
    )


async def _run(
    storage: Storage,
    projection: Database,
    events: list[list[Any]],
    max_batch: int,
    *,
    plain: bool = False,
) -> tuple[list[Any], list[Any], int]:
    """``plain``: every event with the plain connection (on SQLite a page of one event is
    deferred too, for its commit in one call). The projection's tables and offsets start
    empty."""
    rs = _settings(max_batch)
    processor = OpsProjection()
    async with projection.write() as conn:
        await conn.execute(text("DELETE FROM lagompy_readside_offsets"))
    await run_global_prepare(processor, projection, rs)
    async with projection.write() as conn:
        await processor.reset(conn)
    worker = ReadSideWorker(
        processor, "batching", journal=storage.journal, projection=projection, settings=rs
    )
    if plain:
        assert isinstance(worker.strategy, ProjectionCommit)
        worker.strategy._one_call = False
    await worker.catch_up(force=True)
    assert worker.offset == len(events)
    return (*await _tables(projection), worker.transactions)


async def _fresh_sqlite_journal(directory: Path) -> JournalSettings:
    """An empty, migrated SQLite journal for one example: a copy of the session's template."""
    await _copy_migrated_sqlite(directory / "j.db")
    return JournalSettings(url=f"sqlite:///{directory / 'j.db'}")


#: A PostgreSQL schema created and migrated once for the module, emptied for each example
#: (every table but the migrations' version, sequences restarted: what a new schema holds
#: after its first open, without the ~0.5 s of creating and migrating one per example).
_pg_schema: str | None = None


async def _fresh_postgres_journal() -> JournalSettings:
    global _pg_schema
    if _pg_schema is None:
        _pg_schema = await _create_schema()
    else:
        await _empty_schema(_pg_schema)
    return JournalSettings(url=POSTGRES_URL, postgres_schema=_pg_schema, auto_migrate=True)


@pytest.fixture(scope="module", autouse=True)
def _drop_the_postgres_journal() -> Iterator[None]:
    global _pg_schema
    yield
    if _pg_schema is not None:
        asyncio.run(_drop_schema(_pg_schema))
        _pg_schema = None


async def _same_tables(
    backend: str, events: list[list[Any]], max_batch: int, *, unbroken: bool = False
) -> None:
    """``unbroken``: no batch may fail or fall back (one transaction per page)."""
    tmp = None
    if backend == "sqlite":
        tmp = tempfile.mkdtemp(prefix="lagompy-batching-")
        js = await _fresh_sqlite_journal(Path(tmp))
    else:
        js = await _fresh_postgres_journal()
    try:
        async with await open_storage(settings=js, serializer=Serializer([Ops])) as storage:
            await storage.journal.append(
                [
                    AtomicWrite("ops", f"e{i}", 0, [Ops(json.dumps(ops))], [("batching",)])
                    for i, ops in enumerate(events)
                ]
            )
            projection = Database.create(projection_settings(js, _settings(1)))
            try:
                await ensure_schema(projection)
                # The same journal twice: once one event per transaction, once in batches
                # (the tables and the offsets emptied in between).
                one_by_one = await _run(storage, projection, events, max_batch=1, plain=True)
                batched = await _run(storage, projection, events, max_batch=max_batch)
            finally:
                await projection.dispose()
        assert batched[:2] == one_by_one[:2]
        if unbroken:
            assert batched[2] == -(-len(events) // max_batch)
    finally:
        if tmp is not None:  # one directory per example: not left in /tmp
            shutil.rmtree(tmp, ignore_errors=True)


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(events=st.lists(event, min_size=1, max_size=30))
def test_deferred_writes_leave_the_tables_of_one_by_one(
    backend: str, events: list[list[Any]]
) -> None:
    """Writes and reads, no failure: every page commits in one transaction, and the tables are
    those of one event per transaction."""
    if backend == "postgres":
        require_postgres()
    asyncio.run(_same_tables(backend, events, 50, unbroken=True))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(events=st.lists(risky_event, min_size=1, max_size=30))
def test_failing_events_are_skipped_alone(backend: str, events: list[list[Any]]) -> None:
    """With failures (a handler raising; an insert of an existing key, at the flush, possibly
    caught by the handler): the failing event's writes never commit, the others do, as one
    event per transaction has it. Pages of 5: the pages after a failing one batch again."""
    if backend == "postgres":
        require_postgres()
    asyncio.run(_same_tables(backend, events, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_a_deferred_result_runs_the_batch_unbatched(backend: str) -> None:
    """``rowcount`` of a deferred write cannot be known: the batch runs again with the plain
    connection (and later ones too), with the tables of one event per transaction."""
    if backend == "postgres":
        require_postgres()
    events = [
        [["put", 1, 1], ["rowcount", 2, 7]],
        [["add", 1, 2], ["rowcount", 1, 3], ["read", 1, 0]],
        [["double", 1, 1], ["rowcount", 3, 4]],
    ] * 4
    asyncio.run(_same_tables(backend, events, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_failing_at_a_later_read_fails_the_batch(backend: str) -> None:
    """The duplicate insert of the second event fails when the fourth event's read sends it
    (with the third event's write after it), and the fourth event catches the error: the batch
    must still fail and go one by one, or the third event's write would be lost."""
    if backend == "postgres":
        require_postgres()
    events = [[["put", 1, 1]], [["ins", 1, 5]], [["put", 2, 2]], [["tryread", 1, 0]]]
    asyncio.run(_same_tables(backend, events, 5))


def test_sqlite_a_single_event_whose_handler_catches_its_write_error_commits_the_rest() -> None:
    """A page of one event is deferred on SQLite (one call); when its flush fails, the event
    runs again alone with the plain connection, where the handler catches its own insert's
    error and its other write commits, as before."""
    events = [[["put", 1, 1]], [["tryins", 1, 5], ["put", 2, 2]], [["put", 3, 3]]]
    asyncio.run(_same_tables("sqlite", events, 1))


class _Recording:
    """A connection that records what a deferring connection sends."""

    def __init__(self) -> None:
        from sqlalchemy.dialects import sqlite

        self.dialect = sqlite.dialect()
        self.sent: list[tuple[Any, Any]] = []

    async def execute(self, statement: Any, parameters: Any = None, **_: Any) -> None:
        self.sent.append((statement, parameters))

    async def exec_driver_sql(self, sql: str, parameters: Any = None, **_: Any) -> None:
        self.sent.append((sql, parameters))


def test_an_executemany_is_deferred_as_writes_of_its_statement() -> None:
    """A list of parameter dicts with the same keys (handle_batch's set-based write) is kept
    like that many writes of the statement, in order: it joins the writes of the same
    statement around it into one run, and nothing goes out before the end of the batch. A
    list whose dicts differ in their keys is not deferred: what is pending goes first, then
    the list as SQLAlchemy's executemany."""
    from lagompy.readside import _batching

    async def batch(writes: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        recording = _Recording()
        conn = _batching.DeferringConnection(recording, _batching.Learnt(), lambda _: None)  # type: ignore[arg-type]
        for statement, parameters in writes:
            await conn.execute(statement, parameters)
            if isinstance(parameters, list) and _batching._uniform(parameters):
                assert recording.sent == []  # kept, not sent
        await conn.finish()
        return recording.sent

    sql = "UPDATE batching_kv SET v=? WHERE batching_kv.k = ?"
    rows = [{"kk": 1, "vv": 10}, {"kk": 2, "vv": 20}]
    sent = asyncio.run(
        batch([(SET_V, {"kk": 0, "vv": 0}), (SET_V, rows), (UPSERT, [{"k": 5, "v": 5}])])
    )
    assert sent == [
        (sql, [(0, 0), (10, 1), (20, 2)]),
        ("INSERT INTO batching_kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = "
         "excluded.v", [(5, 5)]),
    ]  # fmt: skip
    uneven = [{"kk": 1, "vv": 10}, {"kk": 2}]
    sent = asyncio.run(batch([(SET_V, {"kk": 0, "vv": 0}), (SET_V, uneven)]))
    assert sent == [(sql, [(0, 0)]), (SET_V, uneven)]
    assert asyncio.run(batch([(SET_V, [])])) == [(SET_V, [])]


def test_runs_of_one_statement_object_need_no_work_per_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Consecutive writes of the same statement object with the same parameter names are one
    executemany, sent to the driver as the statement's SQL and each write's values in their
    places, planned once per statement and names; whether a statement object can be deferred
    is checked once for all batches (remembered by identity); a change of parameter names
    starts a new run (one the plan cannot cover, a required value missing, goes through
    SQLAlchemy); statements built per event with one cache key still join."""
    from lagompy.readside import _batching

    checked: list[Any] = []
    check = _batching.deferrable

    def counting(statement: Any) -> bool:
        checked.append(statement)
        return check(statement)

    monkeypatch.setattr(_batching, "deferrable", counting)
    learnt = _batching.Learnt()

    async def batch(writes: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        recording = _Recording()
        conn = _batching.DeferringConnection(recording, learnt, lambda _: None)  # type: ignore[arg-type]
        for statement, parameters in writes:
            await conn.execute(statement, parameters)
        await conn.finish()
        return recording.sent

    planned: list[Any] = []
    plan = _batching._plan

    def counting_plans(statement: Any, names: Any, dialect: Any) -> Any:
        planned.append((statement, names))
        return plan(statement, names, dialect)

    monkeypatch.setattr(_batching, "_plan", counting_plans)
    first = [(SET_V, {"kk": i, "vv": i}) for i in range(3)]
    sent = asyncio.run(batch([*first, (SET_V, {"kk": 9}), (SET_V, {"kk": 8})]))
    assert sent == [
        ("UPDATE batching_kv SET v=? WHERE batching_kv.k = ?", [(0, 0), (1, 1), (2, 2)]),
        (SET_V, [{"kk": 9}, {"kk": 8}]),
    ]
    assert checked == [SET_V]
    assert planned == [(SET_V, ("kk", "vv")), (SET_V, ("kk",))]
    assert asyncio.run(batch(first)) == sent[:1] and checked == [SET_V]  # the next batch
    assert len(planned) == 2
    built = [update(kv).where(kv.c.k == i).values(v=i) for i in range(3)]
    sent = asyncio.run(batch([(b, None) for b in built]))
    assert sent == [
        ("UPDATE batching_kv SET v=? WHERE batching_kv.k = ?", [(0, 0), (1, 1), (2, 2)])
    ]
    assert checked == [SET_V, *built]
    # Joined too, their values through the columns' bind processors (SQLite: 0/1, text).
    marks = [
        update(kv).where(kv.c.k == i).values(on=i == 0, at=EPOCH + timedelta(seconds=i))
        for i in range(2)
    ]
    assert asyncio.run(batch([(m, None) for m in marks])) == [
        (
            'UPDATE batching_kv SET "on"=?, at=? WHERE batching_kv.k = ?',
            [(1, "2026-01-01 00:00:00.000000", 0), (0, "2026-01-01 00:00:01.000000", 1)],
        )
    ]
    # text() built for each event (docs/readside.md's way): the first one of its SQL stands
    # for the others, one statement's run and plan, its deferrability checked once.
    sql = "UPDATE batching_kv SET v = :v WHERE k = :k"
    texts = [text(sql) for _ in range(3)]
    checked.clear()
    sent = asyncio.run(batch([(t, {"k": i, "v": -i}) for i, t in enumerate(texts)]))
    assert sent == [("UPDATE batching_kv SET v = ? WHERE k = ?", [(0, 0), (-1, 1), (-2, 2)])]
    assert checked == [texts[0]]
    again = text(sql)
    assert asyncio.run(batch([(again, {"k": 7, "v": 7})] * 2)) == [
        ("UPDATE batching_kv SET v = ? WHERE k = ?", [(7, 7), (7, 7)])
    ]
    assert checked == [texts[0]]  # a later batch's text() too
    # A text() whose parameters carry types or values of their own stands for itself.
    typed = [text(sql).bindparams(bindparam("v", type_=Integer)) for _ in range(2)]
    valued = text(sql).bindparams(v=3)
    asyncio.run(batch([(typed[0], {"k": 1, "v": 1}), (typed[1], {"k": 2, "v": 2})]))
    asyncio.run(batch([(valued, {"k": 1})]))
    assert checked[1:] == [*typed, valued]


def test_text_for_each_event_and_once_leave_the_same_tables() -> None:
    """The same SQL as a text() built for each event, mixed with the statement built once
    and with typed text(): one batch leaves what one statement at a time leaves."""
    events = [
        [["tput", k % 3, v], ["put", k % 3 + 1, v], ["tput", k % 3, v + 1]]
        for k, v in enumerate(range(-5, 6))
    ]
    asyncio.run(_same_tables("sqlite", events, 50, unbroken=True))


#: The SQLite file a :class:`LockProbe`'s handlers look at.
_probed: dict[str, Any] = {}


class LockProbe(SqlReadSideProcessor):
    """Each handler defers an insert and looks whether the file's write lock is free while it
    runs: with the batch's transaction begun at its first statement, it is."""

    name = "batching-lock-probe"
    tag = "batching"
    event_types = (Ops,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.run_sync(metadata.create_all)

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        await conn.execute(insert(seen).values(id=envelope.offset, v=0))
        other = sqlite3.connect(_probed["path"], timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            _probed["free"].append(True)
        except sqlite3.OperationalError:
            _probed["free"].append(False)
        finally:
            other.close()


def test_sqlite_handlers_run_before_the_batch_takes_the_write_lock(tmp_path: Path) -> None:
    # Every other writer of the file (the journal's shard hosts, the other workers) waits for
    # SQLite's one write lock: a batch holds it only from its first statement (its deferred
    # writes, sent after its handlers ran) to its commit.
    path = tmp_path / "j.db"
    js = JournalSettings(url=f"sqlite:///{path}")
    rs = ReadSideSettings(max_batch=20, tail=TailSettings(poll_interval=0.02))
    _probed.update(path=str(path), free=[])

    async def main() -> None:
        serializer = Serializer([Ops])
        async with await open_storage(settings=js, serializer=serializer) as storage:
            await storage.journal.append(
                [AtomicWrite("ops", f"e{i}", 0, [Ops("[]")], [("batching",)]) for i in range(20)]
            )
            projection = Database.create(projection_settings(js, rs))
            try:
                await ensure_schema(projection)
                processor = LockProbe()
                await run_global_prepare(processor, projection, rs)
                worker = ReadSideWorker(
                    processor,
                    "batching",
                    journal=storage.journal,
                    projection=projection,
                    settings=rs,
                )
                await worker.catch_up(force=True)
                assert worker.offset == 20 and worker.transactions == 1
                assert len((await _tables(projection))[1]) == 20
            finally:
                await projection.dispose()

    asyncio.run(main())
    assert _probed["free"] == [True] * 20


@pytest.mark.parametrize("pages", [[20], [1, 1]], ids=["a-batch", "single-events"])
def test_sqlite_writes_offset_and_commit_go_to_the_driver_in_one_call(
    tmp_path: Path, pages: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write lock is held from BEGIN IMMEDIATE to COMMIT: a page's deferred writes, its
    # offset and the COMMIT go to the driver's thread in one call, so that the lock is not held
    # while the event loop gets round to each statement's result. A page of one event too (a
    # quiet tag: the workflow runs index while runs go one at a time held the lock 5.6 ms p50
    # beside running workflows, statement by statement, where one call held it 1.0 ms).
    from lagompy.sql import _database

    path = tmp_path / "j.db"
    js = JournalSettings(url=f"sqlite:///{path}")
    rs = ReadSideSettings(max_batch=20, tail=TailSettings(poll_interval=0.02))
    calls: list[int] = []
    one_call = _database._commit_in_one_call

    def counting(conn: Any, timeout_ms: int, writes: Any, last: Any) -> Any:
        calls.append(sum(len(rows) for _, rows in writes))
        return one_call(conn, timeout_ms, writes, last)

    async def main() -> None:
        serializer = Serializer([Ops])
        async with await open_storage(settings=js, serializer=serializer) as storage:
            projection = Database.create(projection_settings(js, rs))
            try:
                await ensure_schema(projection)
                processor = OpsProjection()
                await run_global_prepare(processor, projection, rs)
                worker = ReadSideWorker(
                    processor, "batching", journal=storage.journal, projection=projection,
                    settings=rs,
                )  # fmt: skip
                written = 0
                for size in pages:
                    await storage.journal.append(
                        [
                            AtomicWrite(
                                "ops", f"e{i}", 0, [Ops(json.dumps([["put", i, i]]))],
                                [("batching",)],
                            )
                            for i in range(written, written + size)
                        ]
                    )  # fmt: skip
                    written += size
                    await worker.catch_up(force=True)
                assert worker.offset == written and worker.transactions == len(pages)
                assert len((await _tables(projection))[0]) == written
            finally:
                await projection.dispose()

    monkeypatch.setattr(_database, "_commit_in_one_call", counting)
    asyncio.run(main())
    assert calls == pages  # one call per page, every event's write in it


def test_sqlite_one_call_commits_of_one_process_take_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers of one process on one file (a rebuild's: one per tag shard) send their one-call
    # commits to the driver's threads one at a time (Database.write_turn): waiting in the
    # event loop, not polling BEGIN IMMEDIATE in their threads beside the one that writes.
    import threading

    from lagompy.sql import _database

    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    rs = ReadSideSettings(max_batch=50)
    tags = list(sharded_tag("turns", shards=4).all_tags)
    guard = threading.Lock()
    inside = [0]
    most = [0]
    one_call = _database._commit_in_one_call

    def counting(conn: Any, timeout_ms: int, writes: Any, last: Any) -> Any:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return one_call(conn, timeout_ms, writes, last)
        finally:
            with guard:
                inside[0] -= 1

    class Sharded(OpsProjection):
        name = "batching-turns"

        @classmethod
        def tags(cls) -> tuple[str, ...]:
            return tuple(tags)

    async def main() -> None:
        serializer = Serializer([Ops])
        async with await open_storage(settings=js, serializer=serializer) as storage:
            for t, tag in enumerate(tags):
                await storage.journal.append(
                    [
                        AtomicWrite(
                            "ops", f"e{t}-{i}", 0, [Ops(json.dumps([["put", t * 1000 + i, i]]))],
                            [(tag,)],
                        )
                        for i in range(500)
                    ]
                )  # fmt: skip
            projection = Database.create(projection_settings(js, rs))
            try:
                await ensure_schema(projection)
                processor = Sharded()  # one worker per tag of `tags`
                await run_global_prepare(processor, projection, rs)
                workers = [
                    ReadSideWorker(
                        processor, t, journal=storage.journal, projection=projection, settings=rs
                    )
                    for t in tags
                ]
                await asyncio.gather(*(w.catch_up(force=True) for w in workers))
                assert [w.transactions for w in workers] == [10] * 4
                assert len((await _tables(projection))[0]) == 2000
            finally:
                await projection.dispose()

    monkeypatch.setattr(_database, "_commit_in_one_call", counting)
    asyncio.run(main())
    assert most[0] == 1


@pytest.mark.parametrize("clear", [False, True])
@pytest.mark.parametrize("rate", [None, 12.5])
def test_the_one_call_commit_sends_the_fenced_write_commit_builds(
    clear: bool, rate: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The offset's write of the one-call commit (SQLite) is planned once per shape; it must be
    # the statement, and the values, that commit() builds for each transaction.
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from lagompy.consumer._lease import Lease
    from lagompy.readside import _store

    monkeypatch.setattr(_store, "now_us", lambda: 1_000_000)
    store = _store.OffsetStore.__new__(_store.OffsetStore)
    store._commit_plans = {}
    lease = Lease("proj", "tag-1", "me", 3, 0, False)
    dialect = sqlite_dialect.dialect()
    values = store._commit_values(42, 2.5, "running", events_per_s=rate, clear=clear)
    compiled: Any = store._fenced_statement(lease, values).compile(dialect=dialect)
    params = compiled.construct_params()
    expected = (compiled.string, tuple(params[name] for name in compiled.positiontup))
    plan = store._commit_plan(dialect, clear, rate is not None)
    assert plan is not None
    given = {
        "f_processor": "proj", "f_tag": "tag-1", "f_epoch": 3, "v_offset": 42,
        "v_expires": 1_000_000 + 2_500_000, "v_now": 1_000_000, "v_rate": rate,
    }  # fmt: skip
    assert (plan.sql, plan.rows([given])[0]) == expected


# --------------------------------------------------------------------------- regrouping

regroup_meta = MetaData()
#: A table whose rows stand alone (a primary key, nothing else that ties rows together).
pairs = Table(
    "regroup_pairs",
    regroup_meta,
    Column("k", Integer, primary_key=True),
    Column("v", Integer),
)
#: Tables whose metadata ties rows together: a unique column, a foreign key (both ends).
uniques = Table(
    "regroup_uniques",
    regroup_meta,
    Column("k", Integer, primary_key=True),
    Column("v", Integer, unique=True),
)
fk_meta = MetaData()
parents = Table("regroup_parents", fk_meta, Column("k", Integer, primary_key=True))
children = Table(
    "regroup_children",
    fk_meta,
    Column("k", Integer, primary_key=True),
    Column("parent", Integer, ForeignKey("regroup_parents.k")),
)
PUT = sqlite_insert(pairs).on_conflict_do_update(
    index_elements=[pairs.c.k], set_={"v": sqlite_insert(pairs).excluded.v}
)
BUMP = update(pairs).where(pairs.c.k == bindparam("kk")).values(v=pairs.c.v + bindparam("d"))


def _sent(writes: list[tuple[Any, Any]], *, regroup: bool = True) -> list[tuple[Any, Any]]:
    from lagompy.readside import _batching

    async def batch() -> list[tuple[Any, Any]]:
        recording = _Recording()
        learnt = _batching.Learnt(regroup=regroup)
        conn = _batching.DeferringConnection(recording, learnt, lambda _: None)  # type: ignore[arg-type]
        for statement, parameters in writes:
            await conn.execute(statement, parameters)
        await conn.finish()
        return recording.sent

    return asyncio.run(batch())


def test_writes_to_different_rows_go_in_fewer_runs_and_one_row_s_keep_their_order() -> None:
    """Alternating upserts and updates of other rows are two runs; an update of a row upserted
    in the batch stays after that upsert; a write without a known row (a text()) is a barrier
    nothing crosses; keep_write_order (regroup=False) sends them as they came."""
    put_sql = (
        "INSERT INTO regroup_pairs (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = "
        "excluded.v"
    )
    bump_sql = "UPDATE regroup_pairs SET v=(regroup_pairs.v + ?) WHERE regroup_pairs.k = ?"
    writes: list[tuple[Any, Any]] = [
        (PUT, {"k": 1, "v": 10}),
        (BUMP, {"kk": 7, "d": 1}),
        (PUT, {"k": 2, "v": 20}),
        (BUMP, {"kk": 8, "d": 1}),
        (PUT, {"k": 3, "v": 30}),
    ]
    assert _sent(writes) == [
        (put_sql, [(1, 10), (2, 20), (3, 30)]),
        (bump_sql, [(1, 7), (1, 8)]),
    ]
    assert len(_sent(writes, regroup=False)) == 5
    # The update of row 2 stays after its upsert; the upsert of row 3 (another row) joins
    # the first run, row 2's second upsert comes after its update.
    writes = [
        (PUT, {"k": 2, "v": 20}),
        (BUMP, {"kk": 2, "d": 1}),
        (PUT, {"k": 3, "v": 30}),
        (PUT, {"k": 2, "v": 5}),
    ]
    assert _sent(writes) == [
        (put_sql, [(2, 20), (3, 30)]),
        (bump_sql, [(1, 2)]),
        (put_sql, [(2, 5)]),
    ]
    # A barrier: nothing moves across it.
    barrier = text("UPDATE regroup_pairs SET v = 0")
    writes = [(PUT, {"k": 1, "v": 1}), (barrier, None), (PUT, {"k": 2, "v": 2})]
    assert _sent(writes) == [(put_sql, [(1, 1)]), (barrier, None), (put_sql, [(2, 2)])]
    # A key of another type than its column's could be the same row: a barrier too.
    writes = [(PUT, {"k": 1, "v": 1}), (BUMP, {"kk": "1", "d": 1}), (PUT, {"k": 2, "v": 2})]
    assert [sql for sql, _ in _sent(writes)] == [put_sql, bump_sql, put_sql]


def test_only_writes_whose_effect_is_their_own_row_have_a_footprint() -> None:
    from lagompy.readside._footprint import footprint_of

    assert footprint_of(PUT) is not None and footprint_of(BUMP) is not None
    assert footprint_of(delete(pairs).where(pairs.c.k == 3)) is not None
    assert footprint_of(insert(pairs).values(k=bindparam("k"), v=1)) is not None
    others = [
        text("UPDATE regroup_pairs SET v = 1 WHERE k = :k"),  # what it touches is unknown
        update(pairs).values(v=1),  # every row
        update(pairs).where(pairs.c.v == bindparam("v")).values(v=1),  # not by its key
        update(pairs).where((pairs.c.k == 1) | (pairs.c.k == 2)).values(v=1),  # two rows
        update(pairs).where(pairs.c.k == 1).values(k=2),  # moves the row to another key
        update(pairs)  # reads another row
        .where(pairs.c.k == 1)
        .values(v=select(pairs.c.v).where(pairs.c.k == 2).scalar_subquery()),
        sqlite_insert(pairs).on_conflict_do_nothing(),  # any constraint: other rows decide
        insert(pairs).returning(pairs.c.k),  # its result is read
        insert(uniques).values(k=1, v=1),  # a unique column ties rows together
        update(pairs).where(pairs.c.k == 1).values(v=2).with_hint("x"),
        insert(children).values(k=1, parent=1),  # a foreign key
        delete(parents).where(parents.c.k == 1),  # ...and the table it points to
    ]
    assert [footprint_of(s) for s in others] == [None] * len(others)


def test_keep_write_order_on_a_processor_class_turns_regrouping_off(tmp_path: Path) -> None:
    """A processor's ``keep_write_order`` reaches the connections its worker's handlers get."""
    from lagompy.readside._store import OffsetStore

    class Ordered(OpsProjection):
        keep_write_order = True

    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    projection = Database.create(projection_settings(js, _settings(1)))
    try:
        store = OffsetStore(projection)
        learnt = {
            p.__name__: ProjectionCommit(p(), projection, store, _settings(1))._learnt
            for p in (OpsProjection, Ordered)
        }
    finally:
        asyncio.run(projection.dispose())
    assert learnt["OpsProjection"].regroup and not learnt["Ordered"].regroup
