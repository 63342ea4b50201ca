"""The journal and snapshot store, on SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from examples.user_service.entity import UserEntity, UserRegistered
from lagompy import (
    AtomicWrite,
    ConfigurationError,
    JournalSettings,
    JournalUnavailable,
    Storage,
    open_storage,
)
from lagompy.errors import JournalError
from lagompy.sql import Database, normalize_url


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    s = await open_storage(settings=journal_settings, entities=[UserEntity])
    try:
        yield s
    finally:
        await s.close()


def reg(uid: str) -> UserRegistered:
    return UserRegistered(uid, f"name-{uid}", f"{uid}@example.org")


def write(uid: str, expected: int, *events: object, tags: tuple[str, ...] = ()) -> AtomicWrite:
    return AtomicWrite("user", uid, expected, list(events), [tags] * len(events) if tags else [])


# The journal's and snapshot store's behaviour is covered by the contract suites
# (lagompy.testkit.contracts, run in tests/test_contracts.py); these tests cover configuration.


# --------------------------------------------------------------------------- configuration


def test_sqlite_paths_are_made_absolute_and_drivers_chosen(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(str(tmp_path))
    url = normalize_url("sqlite:///rel.db")
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == f"{tmp_path}/rel.db"
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+asyncpg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+asyncpg"
    with pytest.raises(ConfigurationError, match="unsupported database 'mysql'"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ConfigurationError, match="does not exist"):
        normalize_url("sqlite:///no/such/dir/x.db")


def test_journal_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_JOURNAL_URL", "postgresql://env@h/db")
    monkeypatch.setenv("LAGOMPY_JOURNAL_POOL_SIZE", "3")
    assert JournalSettings().url == "postgresql://env@h/db"
    assert JournalSettings().pool_size == 3
    assert JournalSettings(url="sqlite:///x.db").url == "sqlite:///x.db"


async def test_sqlite_runs_in_wal_mode_with_autoincrement(tmp_path: object) -> None:
    path = f"{tmp_path}/wal.db"
    async with await open_storage(f"sqlite:///{path}", entities=[UserEntity]) as s:
        await s.journal.append_one(write("w", 0, reg("w")))
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        query = "SELECT sql FROM sqlite_master WHERE name = 'lagompy_events'"
        ddl = con.execute(query).fetchone()[0]
        assert "AUTOINCREMENT" in ddl
    finally:
        con.close()


async def test_connections_opening_a_new_sqlite_file_at_once_all_switch_it_to_wal(
    tmp_path: object,
) -> None:
    # The first WAL switch of a new file is a write; SQLite answered a concurrent switch
    # "database is locked" at once, without waiting (about 1 round in 8 before the retry).
    for round_ in range(50):
        url = f"sqlite:///{tmp_path}/new{round_}.db"
        databases = [Database.create(url=url) for _ in range(4)]

        async def first_write(db: Database) -> None:
            async with db.write() as conn:
                await conn.execute(text("SELECT 1"))

        try:
            await asyncio.gather(*(first_write(db) for db in databases))
        finally:
            for db in databases:
                await db.dispose()
        con = sqlite3.connect(f"{tmp_path}/new{round_}.db")
        try:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            con.close()


async def test_unreachable_database_is_journal_unavailable() -> None:
    with pytest.raises(JournalUnavailable) as info:
        await open_storage("postgresql://postgres@127.0.0.1:1/none", entities=[UserEntity])
    assert info.value.__cause__ is not None


async def test_database_errors_are_journal_errors_with_the_cause(tmp_path: object) -> None:
    s = await open_storage(f"sqlite:///{tmp_path}/x.db", entities=[UserEntity])
    try:
        async with s.database.write() as conn:  # break the database under the journal
            await conn.exec_driver_sql("DROP TABLE lagompy_events")
        with pytest.raises(JournalError) as info:
            await s.journal.events("user", "1")
        assert "no such table" in str(info.value)
        assert info.value.__cause__ is not None
    finally:
        await s.close()


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("noticed", [False, True], ids=["at-once", "after-the-close-is-seen"])
async def test_a_write_connection_killed_between_writes_fails_one_write_then_recovers(
    storage: Storage, noticed: bool
) -> None:
    # PostgreSQL writes keep their connection between transactions: when the server drops it,
    # a write fails clearly (JournalUnavailable) and writes nothing, or runs on a new one.
    import asyncpg

    from tests.conftest import POSTGRES_URL

    journal = storage.journal
    await journal.append_one(write("k", 0, reg("k")))
    held = storage.database._writer
    assert held is not None, "the write connection is kept between transactions"
    pid = held[2].get_server_pid()
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    if noticed:  # the driver has seen the connection close: the write takes a new one
        await asyncio.sleep(0.5)
    try:  # fails if the driver has not noticed the close yet, else runs on a new connection
        await journal.append_one(write("k", 1, reg("k")))
    except JournalUnavailable:
        assert not noticed
        assert [e.seq_nr for e in await journal.events("user", "k")] == [1]
        await journal.append_one(write("k", 1, reg("k")))
    assert [e.seq_nr for e in await journal.events("user", "k")] == [1, 2]
    assert storage.database._writer is not None
    assert storage.database._writer[2].get_server_pid() != pid


# --------------------------------------------------------------------------- refused data


async def refuse_poison(storage: Storage) -> None:
    """Make the database itself refuse the events of entities whose id starts with "poison"
    (a trigger on SQLite, a CHECK constraint on PostgreSQL): data the journal's own checks let
    through, refused by the database in the middle of a batch."""
    from sqlalchemy import text

    if storage.database.dialect == "sqlite":
        ddl = (
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON lagompy_events "
            "WHEN NEW.entity_id LIKE 'poison%' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned entities are refused'); END"
        )
    else:
        ddl = (
            "ALTER TABLE lagompy_events ADD CONSTRAINT poisoned_entities_are_refused "
            "CHECK (entity_id NOT LIKE 'poison%')"
        )
    async with storage.database.write() as conn:
        await conn.execute(text(ddl))


@pytest.mark.parametrize("events_per_write", [1, 3], ids=["small-batch", "large-batch"])
async def test_a_write_the_database_refuses_fails_alone_and_the_others_commit(
    storage: Storage, events_per_write: int
) -> None:
    # A small batch takes PostgreSQL's one-statement path, a large one (>= 64 events) its
    # COPY path; SQLite has one path. Either way, the database refusing one entity's rows
    # fails that write alone (WriteRefused, naming the entity and the reason): before, every
    # write of the batch failed with the database's error.
    from lagompy.errors import WriteRefused

    journal = storage.journal
    await refuse_poison(storage)
    ids = [f"u{n}" for n in range(30)]
    ids[3], ids[17], ids[29] = "poison-a", "poison-b", "poison-c"
    writes = [
        AtomicWrite(
            "user",
            uid,
            0,
            [reg(uid)] * events_per_write,
            [("users",)] * events_per_write,
            replies=[(f"cmd-{uid}", events_per_write, b"\xc0")],
        )
        for uid in ids
    ]
    results = await journal.append(writes)
    for uid, result in zip(ids, results, strict=True):
        if uid.startswith("poison"):
            assert isinstance(result.error, WriteRefused), result
            assert (result.error.entity_type, result.error.entity_id) == ("user", uid)
            assert f"write for user/{uid} refused by the database" in str(result.error)
            assert "poison" in str(result.error.__cause__)
            assert "\n" not in str(result.error)  # not the row the database repeats
            assert result.envelopes == ()
        else:
            assert result.ok, result
            assert [e.seq_nr for e in result.envelopes] == list(range(1, events_per_write + 1))
    good = [uid for uid in ids if not uid.startswith("poison")]
    tagged = await journal.events_by_tag("users", limit=1000)
    assert sorted({e.entity_id for e in tagged}) == sorted(good)
    assert len(tagged) == len(good) * events_per_write
    offsets = [e.offset for e in tagged]
    assert offsets == sorted(set(offsets))
    stored = await journal.stored_replies([("user", uid, f"cmd-{uid}") for uid in ids])
    assert sorted(k[1] for k in stored) == sorted(good)
    for uid in ("poison-a", "poison-b", "poison-c"):
        assert await journal.highest_seq_nr("user", uid) == 0
    # The journal goes on: a good write commits, a poisoned one is refused again, alone.
    again = await journal.append(
        [write("u0", events_per_write, reg("u0")), write("poison-a", 0, reg("p"))]
    )
    assert again[0].ok and isinstance(again[1].error, WriteRefused)


# --------------------------------------------------------------------------- command replies


async def test_replies_that_cannot_belong_to_their_write_are_refused_before_any_write(
    storage: Storage,
) -> None:
    """One reply per write is the usual case, checked on a short path; every refusal of the
    long one holds there too, and nothing of the batch is written."""
    journal = storage.journal

    def with_reply(uid: str, reply: object) -> AtomicWrite:
        return AtomicWrite("user", uid, 0, [reg(uid)], replies=[reply])  # type: ignore[list-item]

    refused = {
        "a command id": ("", 1, b"\xc0"),
        "NUL": ("c\x00", 1, b"\xc0"),
        "seq_nr 2": ("c", 2, b"\xc0"),
        "seq_nr 0": ("c", 0, b"\xc0"),
        "seq_nr '1'": ("c", "1", b"\xc0"),
        "must be encoded bytes": ("c", 1, "text"),
    }
    for why, reply in refused.items():
        with pytest.raises(ValueError, match=re.escape(why)):
            await journal.append([write("ok", 0, reg("ok")), with_reply("bad", reply)])
    two = AtomicWrite("user", "two", 0, [reg("two")] * 2, replies=[("c", 1, b"1"), ("c", 2, b"2")])
    with pytest.raises(ValueError, match="two replies for command id 'c'"):
        await journal.append([two])
    assert await journal.events("user", "ok") == []

    class Id(str):
        pass

    # A str subclass is a command id; a reply of a later event of the write belongs to it.
    (result,) = await journal.append([with_reply("sub", (Id("c-1"), 1, b"\xc0"))])
    assert result.ok
    stored = await journal.stored_replies([("user", "sub", "c-1")])
    assert stored == {("user", "sub", "c-1"): b"\xc0"}
