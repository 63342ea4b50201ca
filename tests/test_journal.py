"""The journal and snapshot store, on SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from examples.user_service.entity import NameChanged, NoUser, User, UserEntity, UserRegistered
from lagompy import (
    AtomicWrite,
    ConcurrencyConflict,
    ConfigurationError,
    JournalSettings,
    JournalUnavailable,
    Storage,
    open_storage,
)
from lagompy.database import normalize_url
from lagompy.errors import EncodeError, EventDecodeError, JournalError
from lagompy.serialization import Serializer


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


async def test_append_and_read_back_with_offsets_and_timestamps(storage: Storage) -> None:
    j = storage.journal
    envs = await j.append_one(write("1", 0, reg("1"), NameChanged("1", "B"), tags=("t1",)))
    assert [e.seq_nr for e in envs] == [1, 2]
    assert envs[0].offset < envs[1].offset
    read = await j.events("user", "1")
    assert [e.event for e in read] == [reg("1"), NameChanged("1", "B")]
    assert [e.offset for e in read] == [e.offset for e in envs]
    assert read[0].tags == ("t1",)
    assert abs(read[0].timestamp - datetime.now(UTC)) < timedelta(minutes=1)
    assert await j.highest_seq_nr("user", "1") == 2


async def test_batch_for_many_entities_commits_all_but_the_conflicting_one(
    storage: Storage,
) -> None:
    j = storage.journal
    await j.append_one(write("b", 0, reg("b")))
    results = await j.append(
        [
            write("a", 0, reg("a"), NameChanged("a", "x")),
            write("b", 0, reg("b")),  # stale: b is at 1
            write("c", 0, reg("c")),
        ]
    )
    assert results[0].ok and results[2].ok
    err = results[1].error
    assert isinstance(err, ConcurrencyConflict)
    assert (err.entity_id, err.expected_seq_nr, err.actual_seq_nr) == ("b", 0, 1)
    assert "user/b" in str(err)
    assert await j.highest_seq_nr("user", "a") == 2
    assert await j.highest_seq_nr("user", "b") == 1
    assert [e.event for e in await j.events("user", "c")] == [reg("c")]


async def test_a_stale_writer_is_rejected_never_merged(storage: Storage) -> None:
    j = storage.journal
    await j.append_one(write("z", 0, reg("z")))
    await j.append_one(write("z", 1, NameChanged("z", "first")))
    with pytest.raises(ConcurrencyConflict):
        await j.append_one(write("z", 1, NameChanged("z", "zombie")))
    # A writer that is ahead of the journal is rejected too.
    with pytest.raises(ConcurrencyConflict):
        await j.append_one(write("z", 5, NameChanged("z", "ahead")))
    assert [e.event for e in await j.events("user", "z")] == [reg("z"), NameChanged("z", "first")]


async def test_concurrent_writers_race_for_the_same_sequence_number(storage: Storage) -> None:
    j = storage.journal
    outcomes = await asyncio.gather(
        *(j.append([write("r", 0, reg(f"r{i}"))]) for i in range(8)), return_exceptions=True
    )
    oks = [o for o in outcomes if isinstance(o, list) and o[0].ok]
    conflicts = [
        o for o in outcomes if isinstance(o, list) and isinstance(o[0].error, ConcurrencyConflict)
    ]
    assert len(oks) == 1 and len(conflicts) == 7, outcomes
    assert len(await j.events("user", "r")) == 1


async def test_an_entity_whose_event_cannot_be_encoded_fails_alone(storage: Storage) -> None:
    @dataclass(frozen=True)
    class NotRegistered:
        x: int

    results = await storage.journal.append(
        [write("ok", 0, reg("ok")), write("bad", 0, reg("bad"), NotRegistered(1))]
    )
    assert results[0].ok
    assert isinstance(results[1].error, EncodeError)
    assert await storage.journal.highest_seq_nr("user", "bad") == 0  # nothing half-written


async def test_read_bounds_and_limits(storage: Storage) -> None:
    j = storage.journal
    events = [reg("e")] + [NameChanged("e", str(i)) for i in range(2, 11)]
    await j.append_one(write("e", 0, *events))
    seqs = lambda envs: [e.seq_nr for e in envs]  # noqa: E731
    assert seqs(await j.events("user", "e", from_seq_nr=3, to_seq_nr=5)) == [3, 4, 5]
    assert seqs(await j.events("user", "e", from_seq_nr=8)) == [8, 9, 10]
    assert seqs(await j.events("user", "e", limit=1)) == [1]
    assert await j.events("user", "e", limit=0) == []
    assert await j.events("user", "e", from_seq_nr=6, to_seq_nr=5) == []
    assert await j.events("user", "nobody") == []
    assert await j.highest_seq_nr("user", "nobody") == 0
    assert seqs(await j.replay("user", "e", from_seq_nr=2, page_size=3)) == list(range(2, 11))


async def test_delete_never_lowers_the_highest_sequence_number(storage: Storage) -> None:
    j = storage.journal
    await j.append_one(write("d", 0, reg("d"), NameChanged("d", "x"), NameChanged("d", "y")))
    assert await j.delete_events("user", "d", 2) == 2
    assert [e.seq_nr for e in await j.events("user", "d")] == [3]
    assert await j.delete_events("user", "d", 100) == 1
    assert await j.events("user", "d") == []
    assert await j.highest_seq_nr("user", "d") == 3
    with pytest.raises(ConcurrencyConflict):
        await j.append_one(write("d", 0, reg("d")))
    envs = await j.append_one(write("d", 3, NameChanged("d", "z")))
    assert envs[0].seq_nr == 4


async def test_offsets_are_never_reused_after_deleting_the_newest_events(
    storage: Storage,
) -> None:
    j = storage.journal
    (first,) = await j.append_one(write("o1", 0, reg("o1")))
    await j.delete_events("user", "o1", 1)
    (second,) = await j.append_one(write("o2", 0, reg("o2")))
    assert second.offset > first.offset


async def test_exact_tag_match_t1_never_matches_t12(storage: Storage) -> None:
    j = storage.journal
    await j.append_one(write("x1", 0, reg("x1"), tags=("t1",)))
    await j.append_one(write("x12", 0, reg("x12"), tags=("t12",)))
    await j.append_one(write("x2", 0, reg("x2"), tags=("t1", "all")))
    t1 = await j.events_by_tag("t1")
    assert [e.entity_id for e in t1] == ["x1", "x2"]
    assert [e.entity_id for e in await j.events_by_tag("t12")] == ["x12"]
    assert [e.entity_id for e in await j.events_by_tag("t1", after_offset=t1[0].offset)] == ["x2"]
    assert [e.entity_id for e in await j.all_events(limit=2)] == ["x1", "x12"]


async def test_undecodable_event_names_entity_sequence_number_and_type(
    journal_settings: JournalSettings,
) -> None:
    async with await open_storage(settings=journal_settings, entities=[UserEntity]) as s:
        await s.journal.append_one(write("u", 0, reg("u")))
    # A reader that does not know the event type:
    async with await open_storage(settings=journal_settings, serializer=Serializer()) as s:
        with pytest.raises(EventDecodeError) as info:
            await s.journal.events("user", "u")
    message = str(info.value)
    assert "user/u" in message and "sequence number 1" in message
    assert "UserRegistered" in message


# --------------------------------------------------------------------------- snapshots


async def test_snapshots_save_load_overwrite_and_delete(storage: Storage) -> None:
    snaps = storage.snapshots
    assert await snaps.load("user", "s") is None
    await snaps.save("user", "s", 5, User("s", "five", "s@x.org"))
    await snaps.save("user", "s", 10, User("s", "ten", "s@x.org"))
    loaded = await snaps.load("user", "s")
    assert loaded is not None and loaded.seq_nr == 10 and loaded.state.name == "ten"
    below = await snaps.load("user", "s", max_seq_nr=9)
    assert below is not None and below.seq_nr == 5
    assert await snaps.load("user", "s", max_seq_nr=4) is None
    await snaps.save("user", "s", 10, User("s", "ten again", "s@x.org"))
    again = await snaps.load("user", "s")
    assert again is not None and again.state.name == "ten again"
    past = datetime.now(UTC) - timedelta(days=1)
    assert await snaps.load("user", "s", max_timestamp=past) is None
    assert await snaps.load("user", "s", max_timestamp=datetime.now(UTC) + timedelta(seconds=5))
    assert await snaps.delete("user", "s", max_seq_nr=5) == 1
    assert await snaps.delete("user", "s") == 1
    assert await snaps.load("user", "s") is None
    await snaps.save("user", "n", 1, NoUser())
    n = await snaps.load("user", "n")
    assert n is not None and n.state == NoUser()


async def test_large_snapshot(storage: Storage) -> None:
    big = User("big", "x" * 1_500_000, "big@example.org")
    await storage.snapshots.save("user", "big", 1, big)
    loaded = await storage.snapshots.load("user", "big")
    assert loaded is not None and loaded.state == big


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
        ddl = con.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'lagompy_events'"
        ).fetchone()[0]
        assert "AUTOINCREMENT" in ddl
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
