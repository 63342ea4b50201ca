"""A journal placed on several databases: settings, routing of every entity to its slice's
database (in process and on Ray), recovery, stored replies, and a batch whose databases fail
apart.

SQLite places databases in files; PostgreSQL in schemas of the test database, and (for the
runtime on Ray) in real databases created on the local server.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POSTGRES_URL, Placed, require_postgres
from fastapi import FastAPI
from ray_entities import Add, CounterEntity, GetValue

from lagompy import (
    ConfigurationError,
    JournalUnavailable,
    ShardedEntities,
    start,
    start_in_process,
)
from lagompy.console import ConsoleSettings
from lagompy.journal import open_storage, slice_of, slice_ranges
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.journal._storage import open_placed_storage
from lagompy.runtime import shutdown_app
from lagompy.runtime._processing import recover
from lagompy.service import BreakerRegistry, EntitiesDep, Service
from lagompy.settings import JournalSettings, PlacedDatabase
from lagompy.testkit.server import serve_in_thread


def _placed(home: JournalSettings, others: list[tuple[str, str | None]]) -> JournalSettings:
    """``home`` with one more database per (url, schema) of ``others``, the slices cut into
    as many contiguous ranges as databases (the home one keeps the first)."""
    ranges = slice_ranges(len(others) + 1)
    databases = {
        f"d{n}": PlacedDatabase(url=url, postgres_schema=schema, slices=str(ranges[n]))
        for n, (url, schema) in enumerate(others, start=1)
    }
    return JournalSettings(**{**home.model_dump(), "databases": databases})


# ------------------------------------------------------------------------- settings


def test_settings_place_slice_ranges_on_named_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LAGOMPY_JOURNAL_DATABASES",
        '{"b": {"url": "postgresql://h/b", "slices": "512-767"}, '
        '"c": {"url": "postgresql://h/c", "slices": "768-1023,3"}}',
    )
    settings = JournalSettings(url="postgresql://h/a")
    placement = Placement.of(settings)
    assert placement.names == (HOME, "b", "c")
    assert placement.slices_of("b") == tuple(range(512, 768))
    assert placement.slices_of("c") == (3, *range(768, 1024))
    assert len(placement.slices_of(HOME)) == 512 - 1
    for entity_id in (f"e{i}" for i in range(200)):
        s = slice_of(entity_id)
        name = placement.database_of(entity_id)
        assert s in placement.slices_of(name)
    assert placement.settings_of("c").url == "postgresql://h/c"
    assert placement.settings_of("c").databases == {}
    assert placement.settings_of(HOME).url == "postgresql://h/a"


@pytest.mark.parametrize(
    ("databases", "message"),
    [
        ({"B": {"url": "x", "slices": "1"}}, "database name 'B'"),
        ({"b": {"url": "x", "slices": "0-1024"}}, "'0-1024' must run from a slice"),
        ({"b": {"url": "x", "slices": "9-3"}}, "'9-3' must run from a slice"),
        ({"b": {"url": "x", "slices": "a-b"}}, "'a-b' is not a slice range"),
        (
            {"b": {"url": "x", "slices": "0-10"}, "c": {"url": "y", "slices": "10-20"}},
            "slice 10 is placed on two databases, 'b' and 'c'",
        ),
        (
            {"b": {"url": "x", "slices": "0"}, "c": {"url": "x", "slices": "1"}},
            "'b' and 'c' have the same url and schema",
        ),
        ({"b": {"url": "x"}}, "databases.b.slices"),
    ],
)
def test_bad_placements_are_refused_naming_what_is_wrong(
    databases: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match="databases") as raised:
        JournalSettings(databases=databases)
    assert message in str(raised.value)


def test_a_database_on_the_home_database_s_tables_is_refused() -> None:
    given: dict[str, Any] = {"b": {"url": "postgresql://h/a", "slices": "1"}}
    with pytest.raises(ConfigurationError, match="'b' of the journal has the home database's"):
        Placement.of(JournalSettings(url="postgresql://h/a", databases=given))
    other_schema: dict[str, Any] = {"b": {**given["b"], "postgres_schema": "b"}}
    assert Placement.of(JournalSettings(url="postgresql://h/a", databases=other_schema)).several


def test_passwords_of_placed_databases_never_show_in_errors() -> None:
    with pytest.raises(ConfigurationError) as raised:
        given: dict[str, Any] = {"b": {"url": "postgresql://u:s3cret@h/b", "slices": "x"}}
        JournalSettings(databases=given)
    assert "s3cret" not in str(raised.value)


def test_partition_keys_keep_the_home_database_tags() -> None:
    settings = JournalSettings(databases={"b": PlacedDatabase(url="sqlite:///b.db", slices="0-9")})
    placement = Placement.of(settings)
    assert partition_key("user-events-2", HOME) == "user-events-2"
    assert list(placement.partitions("t")) == [("t", HOME), ("t@b", "b")]
    assert placement.split("t@b") == ("t", "b")
    assert placement.split("t") == ("t", HOME)
    assert placement.split("mail@example.org") == ("mail@example.org", HOME)
    with pytest.raises(ConfigurationError, match="rename the tag or the database"):
        list(placement.partitions("t@b"))


async def test_open_storage_refuses_a_placed_journal(placed: Placed) -> None:
    settings = await placed(2)
    with pytest.raises(ConfigurationError, match="open_placed_storage"):
        await open_storage(settings=settings)


# ------------------------------------------------------------------------- on Ray


@contextlib.asynccontextmanager
async def _on_ray(settings: JournalSettings, **kw: Any) -> AsyncIterator[ShardedEntities]:
    """The counters on Ray, in an app of their own, over ``settings``; stopped after."""
    app = f"t-{uuid.uuid4().hex[:8]}"
    kw.setdefault("hosts", 1)
    try:
        async with await start(
            app=app, entities=[CounterEntity], journal_settings=settings, shards=16, **kw
        ) as ents:
            yield ents
    finally:
        await shutdown_app(app)


async def test_the_in_process_runtime_writes_each_entity_to_its_slices_database(
    placed: Placed,
) -> None:
    """Entities hosted in this process on a journal placed on three databases: each one's
    events, stored replies and recovery are in the database of its slice, and one batch that
    spans the databases commits on each."""
    settings = await placed(3)
    placement = Placement.of(settings)
    ids = [f"p{i}" for i in range(60)]
    assert {placement.database_of(i) for i in ids} == set(placement.names)
    async with start_in_process(entities=[CounterEntity], settings=settings) as ents:
        assert ents.local_journal.databases == settings.databases
        await ents.check()
        await _add_then_answer_once(ents, ids)
    by_database = await _events_by_database(settings)
    for name, events in by_database.items():
        assert events, f"no event written to database {name!r}"
        assert all(placement.database_of(entity_id) == name for entity_id, _ in events)
    assert sum(len(e) for e in by_database.values()) == 61
    # A new runtime recovers every entity from its own database.
    async with start_in_process(entities=[CounterEntity], settings=settings) as ents:
        values = await asyncio.gather(
            *(ents.ref_for(CounterEntity, i).ask(GetValue()) for i in ids)
        )
        assert values == [n + 1 + (100 if i == "p7" else 0) for n, i in enumerate(ids)]
        elsewhere = next(i for i in ids if placement.database_of(i) != HOME)
        ents.processor.evict(CounterEntity.type_name, elsewhere)
        live = await ents.processor.activate(CounterEntity.type_name, elsewhere)
        assert live.state.value == ids.index(elsewhere) + 1


async def _add_then_answer_once(ents: Any, ids: list[str]) -> None:
    """Adds n + 1 to the n-th counter, then asks the eighth to add 100 twice under one command
    id: the second ask is answered from the stored reply, in its entity's database."""
    replies = await asyncio.gather(
        *(ents.ref_for(CounterEntity, i).ask(Add(n + 1)) for n, i in enumerate(ids))
    )
    assert replies == [n + 1 for n in range(len(ids))]
    ref = ents.ref_for(CounterEntity, ids[7])
    first = await ref.ask(Add(100), command_id="once")
    again = await ref.ask(Add(100), command_id="once")
    assert first == again == 108


async def _events_by_database(settings: JournalSettings) -> dict[str, list[tuple[str, int]]]:
    """(entity id, slice) of every event, per database, read from each database alone."""
    placement = Placement.of(settings)
    out: dict[str, list[tuple[str, int]]] = {}
    for name in placement.names:
        async with open_storage(
            settings=placement.settings_of(name), entities=[CounterEntity]
        ) as storage:
            page = await storage.journal.read_all(limit=100_000)
            out[name] = [(e.entity_id, e.slice) for e in page.envelopes]
    return out


async def test_each_entity_is_written_to_its_slices_database_and_recovers(
    ray_session: Any, placed: Placed
) -> None:
    settings = await placed(3)
    placement = Placement.of(settings)
    ids = [f"c{i}" for i in range(60)]
    async with _on_ray(settings) as ents:
        await _add_then_answer_once(ents, ids)
    by_database = await _events_by_database(settings)
    assert {name for name, events in by_database.items() if events} == set(placement.names)
    for name, events in by_database.items():
        for entity_id, s in events:
            assert s == slice_of(entity_id)
            assert placement.database_of(entity_id) == name
    assert sum(len(e) for e in by_database.values()) == 61
    # Recovered by a new process's storage: every entity from its own database.
    async with await open_placed_storage(entities=[CounterEntity], settings=settings) as storage:
        for n, entity_id in enumerate(ids):
            part = storage.of(entity_id)
            live = await recover(CounterEntity, entity_id, part.journal, part.snapshots)
            assert live.state.value == n + 1 + (100 if entity_id == "c7" else 0)


async def test_a_database_that_fails_fails_only_its_entities(
    ray_session: Any, tmp_path: Path
) -> None:
    """One batch over two databases, one of them locked by another writer (a SQLite file's
    write lock): the other's commands commit and answer; the locked one's get the error, and
    nothing of theirs is written."""
    home, other = tmp_path / "home.db", tmp_path / "other.db"
    settings = _placed(
        JournalSettings(url=f"sqlite:///{home}", sqlite_busy_timeout_ms=200),
        [(f"sqlite:///{other}", None)],
    )
    placement = Placement.of(settings)
    ids = [f"x{i}" for i in range(40)]
    on_other = [i for i in ids if placement.database_of(i) == "d1"]
    on_home = [i for i in ids if placement.database_of(i) == HOME]
    assert on_other and on_home
    async with _on_ray(settings) as ents:
        await ents.ref_for(CounterEntity, on_other[0]).ask(GetValue())  # tables made
        locker = sqlite3.connect(other, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            outcomes = await asyncio.gather(
                *(ents.ref_for(CounterEntity, i).ask(Add(1)) for i in ids),
                return_exceptions=True,
            )
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        by_id = dict(zip(ids, outcomes, strict=True))
        assert all(by_id[i] == 1 for i in on_home)
        assert all(isinstance(by_id[i], Exception) for i in on_other)
        # The failed ones were not applied: asked again, they count from zero.
        again = await asyncio.gather(*(ents.ref_for(CounterEntity, i).ask(Add(1)) for i in ids))
        assert again == [2 if i in on_home else 1 for i in ids]


# ------------------------------------------------------------------------- real databases


@pytest.fixture
async def pg_databases() -> AsyncIterator[Callable[[int], Awaitable[list[str]]]]:
    """Makes ``n`` fresh databases on the local PostgreSQL server; drops them after the test."""
    import asyncpg

    require_postgres()
    made: list[str] = []

    async def make(n: int) -> list[str]:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            names = [f"lagompy_t_{uuid.uuid4().hex[:10]}" for _ in range(n)]
            for name in names:
                await conn.execute(f'CREATE DATABASE "{name}"')
                made.append(name)
        finally:
            await conn.close()
        base = POSTGRES_URL.rsplit("/", 1)[0]
        return [f"{base}/{name}" for name in names]

    yield make
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        for name in made:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("databases", [2, 4])
async def test_shard_hosts_on_ray_write_each_entity_to_its_database(
    ray_session: Any,
    pg_databases: Callable[[int], Awaitable[list[str]]],
    databases: int,
) -> None:
    urls = await pg_databases(databases)
    settings = _placed(
        JournalSettings(url=urls[0], auto_migrate=True), [(u, None) for u in urls[1:]]
    )
    placement = Placement.of(settings)
    app = f"t-{uuid.uuid4().hex[:8]}"
    ids = [f"r{i}" for i in range(120)]
    try:
        ents = await start(
            app=app, entities=[CounterEntity], journal_settings=settings, hosts=2, shards=16
        )
        async with ents:
            for round_ in (1, 2):
                replies = await asyncio.gather(
                    *(ents.ref_for(CounterEntity, i).ask(Add(1)) for i in ids)
                )
                assert replies == [round_] * len(ids)
        stats = await _events_by_database(settings)
        assert sum(len(e) for e in stats.values()) == 2 * len(ids)
        assert all(stats[name] for name in placement.names)
        for name, events in stats.items():
            assert all(placement.database_of(i) == name for i, _ in events)
        # A new start (hosts recreated) recovers every entity from its own database.
        await shutdown_app(app)
        ents = await start(
            app=app, entities=[CounterEntity], journal_settings=settings, hosts=1, shards=16
        )
        async with ents:
            values = await asyncio.gather(
                *(ents.ref_for(CounterEntity, i).ask(GetValue()) for i in ids)
            )
            assert values == [2] * len(ids)
    finally:
        await shutdown_app(app)


# ------------------------------------------------------------------------- a service


def _counter_app(settings: JournalSettings, *, ray: bool = True) -> FastAPI:
    service = Service(
        name=f"placed-{uuid.uuid4().hex[:8]}",
        entities=[CounterEntity],
        journal_settings=settings,
        ray=ray,
        runtime_options={"hosts": 1, "shards": 8},
        breakers=BreakerRegistry(),
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=ConsoleSettings(show_payloads=True))

    @app.post("/counters/{counter_id}")
    async def add(counter_id: str, entities: EntitiesDep) -> int:
        reply: int = await entities.ref_for(CounterEntity, counter_id).ask(Add(1))
        return reply

    return app


@pytest.mark.parametrize("ray", [True, False], ids=["ray", "in-process"])
async def test_a_service_on_a_placed_journal_checks_each_database(
    ray_session: Any, placed: Placed, ray: bool
) -> None:
    settings = await placed(2)
    app = _counter_app(settings, ray=ray)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        for n in range(60):
            assert http.post(f"/counters/s{n}").json() == 1
        ready = http.get("/health/ready")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        if ray:  # the shard hosts write: the service checks each database itself
            assert (checks["journal"], checks["journal@b"]) == ("ok", "ok")
        else:  # the entities' own check reaches every database
            assert checks["journal"] == "ok"
        # The console finds each entity in its own database.
        placement = Placement.of(settings)
        for name in placement.names:
            entity_id = next(f"s{n}" for n in range(60) if placement.database_of(f"s{n}") == name)
            found = http.get(f"/console/api/entities/counter/{entity_id}").json()
            assert [e["payload"]["amount"] for e in found["events"]] == [1], name
            assert found["state"] == {"value": 1}, name
    by_database = await _events_by_database(settings)
    assert sum(len(e) for e in by_database.values()) == 60
    assert all(by_database.values())


@pytest.mark.postgres
async def test_a_host_waits_for_every_database_then_serves_them_all(
    ray_session: Any, pg_databases: Callable[[int], Awaitable[list[str]]]
) -> None:
    """One database of the journal does not exist yet when the app starts: the host answers
    every command JournalUnavailable ("not run", naming no database), and serves every entity
    once the database is there."""
    import asyncpg

    (home,) = await pg_databases(1)
    late = f"lagompy_t_{uuid.uuid4().hex[:10]}"
    base = POSTGRES_URL.rsplit("/", 1)[0]
    settings = _placed(JournalSettings(url=home, auto_migrate=True), [(f"{base}/{late}", None)])
    ids = [f"w{i}" for i in range(40)]
    try:
        async with _on_ray(settings) as ents:
            outcomes = await asyncio.gather(
                *(ents.ref_for(CounterEntity, i).ask(Add(1)) for i in ids),
                return_exceptions=True,
            )
            for failure in outcomes:
                assert isinstance(failure, JournalUnavailable), failure
                assert late not in str(failure)
            conn = await asyncpg.connect(POSTGRES_URL)
            try:
                await conn.execute(f'CREATE DATABASE "{late}"')
            finally:
                await conn.close()
            deadline = time.monotonic() + 30

            async def until_run(entity_id: str) -> int:
                while True:
                    try:
                        reply: int = await ents.ref_for(CounterEntity, entity_id).ask(Add(1))
                        return reply
                    except JournalUnavailable:  # not run: asked again
                        assert time.monotonic() < deadline, "the host never opened the journal"
                        await asyncio.sleep(0.2)

            replies = await asyncio.gather(*(until_run(i) for i in ids))
            assert replies == [1] * len(ids)  # the refused asks were not run
    finally:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{late}" WITH (FORCE)')
        finally:
            await conn.close()
