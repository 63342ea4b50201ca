"""Moving slices between the databases of a journal (``lagompy.journal._moving``).

A journal on one database gets more (two, and four): its entities' events (some with
snapshots, stored replies and deletions) move to the databases the new settings place their
slices on, and every entity then recovers the same state through the placed journal; nothing
is lost or doubled, and the moved events' offsets in their new database are gap-free and in the
source's order. A move interrupted (while copying, while deleting) finishes when run again; a
move is refused while a read side is behind (or running), and bad input gets a clear error. On
SQLite files and on real PostgreSQL databases of the local server.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from lagompy import Command, Effect, JournalSettings, PersistentEntity, open_storage
from lagompy.cli import build_app
from lagompy.errors import ConfigurationError, JournalError
from lagompy.journal import AtomicWrite, SnapshotToSave
from lagompy.journal._moving import _TOPIC_POSITIONS, move_slices
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.journal._slices import slice_of
from lagompy.journal._storage import open_placed_storage
from lagompy.runtime._processing import recover
from lagompy.settings import PlacedDatabase
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.topic._subscriber import GROUP_PREFIX, PRODUCER_PREFIX, offset_key, producer_key
from tests.conftest import POSTGRES_URL, require_postgres

# --------------------------------------------------------------------------- the entity


@dataclass(frozen=True)
class Add(Command[tuple[int, ...]]):
    value: int


@dataclass(frozen=True)
class Added:
    value: int


@dataclass(frozen=True)
class Values:
    """Every value in order: a state that depends on every event and on their order."""

    values: tuple[int, ...] = ()


class ListEntity(PersistentEntity[Add, Added, Values]):
    type_name = "move-list"
    initial_state = Values()
    snapshot_every: ClassVar[int | None] = 1000  # the tests save the snapshots

    def on_command(self, state: Values, command: Add) -> Effect[Values]:
        return Effect.persist(Added(command.value)).then_reply(lambda s: s.values)

    def on_event(self, state: Values, event: Added) -> Values:
        return Values((*state.values, event.value))


T = ListEntity.type_name
TAGS = 4


def tag_of(entity_id: str) -> str:
    return f"move-things-{slice_of(entity_id) % TAGS}"


# --------------------------------------------------------------------------- databases


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def urls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Four empty databases: SQLite files, or databases of the local PostgreSQL server
    (created on a maintenance connection, dropped after the test)."""
    if request.param == "sqlite":
        yield [f"sqlite:///{tmp_path / f'journal{n}.db'}" for n in range(4)]
        return
    require_postgres()
    import asyncpg

    names = [f"lagompy_t_{uuid.uuid4().hex[:10]}_{n}" for n in range(4)]
    conn = await asyncpg.connect(POSTGRES_URL)  # asyncpg runs each statement in autocommit
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_URL.rsplit("/", 1)[0]
        yield [f"{base}/{name}" for name in names]
    finally:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def journal(urls: list[str], **placed: str) -> JournalSettings:
    """The journal on ``urls[0]`` (home) and ``b``, ``c``, ``d`` on the next ones, each given
    the slices named for it."""
    databases = {
        name: PlacedDatabase(url=urls[n], slices=slices)
        for n, name in enumerate("bcd", 1)
        if (slices := placed.get(name))
    }
    return JournalSettings(url=urls[0], auto_migrate=True, databases=databases)


IDS = [f"e{n}" for n in range(60)]


async def fill(settings: JournalSettings) -> dict[str, tuple[Values, int]]:
    """Write the entities on the one database ``settings`` name, with snapshots, stored
    replies, partial and whole deletions; return each one's recovered (state, seq_nr)."""
    async with await open_storage(settings=settings, entities=[ListEntity]) as storage:
        j = storage.journal
        # Interleaved, so that one entity's events are not together in offset order.
        for round_ in range(3):
            writes = []
            for n, entity_id in enumerate(IDS):
                values = [100 * n + 10 * round_ + k for k in range(1 + n % 3)]
                writes.append(
                    AtomicWrite(
                        T,
                        entity_id,
                        sum(1 + n % 3 for _ in range(round_)),
                        [Added(v) for v in values],
                        tags=[(tag_of(entity_id),)] * len(values),
                        replies=[(f"cmd-{round_}", len(values) * (round_ + 1), b"reply")],
                    )
                )
            results = await j.append(writes)
            assert all(r.error is None for r in results)
        for n, entity_id in enumerate(IDS):
            if n % 5 == 0:  # a snapshot, then the events under it deleted
                live = await recover(ListEntity, entity_id, j, storage.snapshots)
                await storage.snapshots.save_many(
                    [SnapshotToSave(T, entity_id, live.seq_nr, live.state)]
                )
                await j.delete_events(T, entity_id, live.seq_nr - 1)
            elif n % 7 == 0:  # forgotten: every event deleted
                await j.delete_events(T, entity_id, 1000)
        return await states(storage.journal, storage.snapshots)


async def states(j: Any, snapshots: Any) -> dict[str, tuple[Values, int]]:
    out = {}
    for entity_id in IDS:
        live = await recover(ListEntity, entity_id, j, snapshots)
        out[entity_id] = (live.state, live.seq_nr)
    return out


async def placed_states(settings: JournalSettings) -> dict[str, tuple[Values, int]]:
    async with await open_placed_storage(settings=settings, entities=[ListEntity]) as placed:
        out = {}
        for entity_id in IDS:
            part = placed.of(entity_id)
            out.update(
                {
                    entity_id: (await states_of(part.journal, part.snapshots, entity_id)),
                }
            )
        return out


async def states_of(j: Any, snapshots: Any, entity_id: str) -> tuple[Values, int]:
    live = await recover(ListEntity, entity_id, j, snapshots)
    return live.state, live.seq_nr


async def rows(url: str, table: Any) -> list[Any]:
    database = Database.create(url=url)
    try:
        async with database.read() as conn:
            return list((await conn.execute(select(table))).all())
    finally:
        await database.dispose()


async def events_by_key(url: str) -> dict[tuple[str, str, int], int]:
    """Every event of the database: (type, id, seq_nr) -> offset."""
    return {
        (r.entity_type, r.entity_id, r.seq_nr): r.global_offset
        for r in await rows(url, schema.events)
    }


async def check_placed(settings: JournalSettings, urls: list[str]) -> None:
    """Every per-entity row is in its slice's database, and only there."""
    placement = Placement.of(settings)
    where = {name: placement.settings_of(name).url for name in placement.names}
    for name, url in where.items():
        for table in (schema.events, schema.snapshots, schema.command_replies, schema.deletions):
            for r in await rows(url, table):
                assert placement.database_of(r.entity_id) == name, (table.name, r.entity_id)
        offsets = {r.global_offset for r in await rows(url, schema.events)}
        tagged = {r.global_offset for r in await rows(url, schema.event_tags)}
        assert tagged == offsets


# --------------------------------------------------------------------------- the moves


async def test_one_database_becomes_two(urls: list[str]) -> None:
    one = journal(urls)
    before = await fill(one)
    source_events = await events_by_key(urls[0])
    replies_before = len(await rows(urls[0], schema.command_replies))
    two = journal(urls, b="512-1023")
    lines: list[tuple[str, int, int]] = []
    report = await move_slices(
        two, "512-1023", target="b", batch=7, progress=lambda *a: lines.append(a)
    )
    moved = {k: o for k, o in source_events.items() if slice_of(k[1]) >= 512}
    assert moved and len(moved) < len(source_events)
    assert (report.events, report.copied, report.deleted) == (len(moved),) * 3
    assert lines[-1] == ("delete", len(moved), len(moved))
    assert ("copy", len(moved), len(moved)) in lines

    assert await placed_states(two) == before
    await check_placed(two, urls)
    home, b = await events_by_key(urls[0]), await events_by_key(urls[1])
    assert home.keys() | b.keys() == source_events.keys()
    assert not home.keys() & b.keys()
    assert b.keys() == moved.keys()
    # Gap-free in the target, in the source's order.
    assert sorted(b.values()) == list(range(1, len(b) + 1))
    assert sorted(b, key=b.__getitem__) == sorted(moved, key=moved.__getitem__)
    replies_after = len(await rows(urls[0], schema.command_replies)) + len(
        await rows(urls[1], schema.command_replies)
    )
    assert replies_after == replies_before

    again = await move_slices(two, "512-1023", target="b")
    assert (again.events, again.copied, again.deleted, again.other_rows) == (0, 0, 0, 0)
    assert "nothing to move" in again.describe()


async def test_one_database_becomes_four_then_moves_between_them(urls: list[str]) -> None:
    before = await fill(journal(urls))
    total = len(await events_by_key(urls[0]))
    four = journal(urls, b="256-511", c="512-767", d="768-1023")
    for name, slices in (("b", "256-511"), ("c", "512-767"), ("d", "768-1023")):
        await move_slices(four, slices, target=name, batch=50)
    assert await placed_states(four) == before
    await check_placed(four, urls)
    counts = [len(await events_by_key(url)) for url in urls]
    assert sum(counts) == total and all(counts)

    # Then c's slices go to d: from a database that is not the home one.
    three = journal(urls, b="256-511", d="512-1023")
    with pytest.raises(ConfigurationError, match="source 'c' is not a database"):
        await move_slices(three, "512-767", source="c", target="d")
    c = JournalSettings(url=urls[2], auto_migrate=True)
    report = await move_slices(three, "512-767", source="c", source_settings=c, target="d", batch=9)
    assert report.events == counts[2]
    assert await placed_states(three) == before
    await check_placed(three, urls)
    d = await events_by_key(urls[3])
    assert sorted(d.values()) == list(range(1, len(d) + 1))


class Interrupted(Exception):
    pass


def interrupt_at(step: str, after: int) -> Any:
    def progress(at: str, done: int, total: int) -> None:
        if at == step and done >= after:
            raise Interrupted(f"{at} {done}/{total}")

    return progress


@pytest.mark.parametrize("step", ["copy", "delete"])
async def test_an_interrupted_move_finishes_when_run_again(urls: list[str], step: str) -> None:
    before = await fill(journal(urls))
    source_events = await events_by_key(urls[0])
    moved = {k: o for k, o in source_events.items() if slice_of(k[1]) < 512}
    two = journal(urls, b="0-511")
    with pytest.raises(Interrupted):
        await move_slices(two, "0-511", target="b", batch=10, progress=interrupt_at(step, 20))
    report = await move_slices(two, "0-511", target="b", batch=10)
    assert report.copied == (len(moved) - 20 if step == "copy" else 0)
    assert report.deleted == (len(moved) if step == "copy" else len(moved) - 20)
    assert await placed_states(two) == before
    await check_placed(two, urls)
    b = await events_by_key(urls[1])
    assert b.keys() == moved.keys()
    assert sorted(b.values()) == list(range(1, len(b) + 1))
    assert sorted(b, key=b.__getitem__) == sorted(moved, key=moved.__getitem__)


# --------------------------------------------------------------------------- read sides


async def set_position(url: str, processor: str, tag: str, offset: int, **more: Any) -> None:
    database = Database.create(url=url)
    try:
        async with database.write() as conn:
            await conn.execute(
                schema.readside_offsets.delete().where(
                    schema.readside_offsets.c.processor == processor,
                    schema.readside_offsets.c.tag == tag,
                )
            )
            await conn.execute(
                schema.readside_offsets.insert().values(
                    processor=processor,
                    tag=tag,
                    last_offset=offset,
                    owner=more.get("owner"),
                    epoch=0,
                    lease_expires_us=more.get("lease_expires_us", 0),
                    paused=False,
                    state="idle",
                    events_per_s=0.0,
                    updated_us=0,
                    skipped=0,
                )
            )
    finally:
        await database.dispose()


async def heads(url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in await rows(url, schema.event_tags):
        out[r.tag] = max(out.get(r.tag, 0), r.global_offset)
    return out


async def test_a_read_side_behind_refuses_the_move_then_gets_its_position(urls: list[str]) -> None:
    await fill(journal(urls))
    source_heads = await heads(urls[0])
    assert len(source_heads) == TAGS
    for tag, head in source_heads.items():
        await set_position(urls[0], "totals", tag, head)
    # Another consumer follows another tag only: not behind on the moved tags.
    await set_position(urls[0], "others", "other-tag", 0)
    lagging = sorted(source_heads)[1]
    await set_position(urls[0], "totals", lagging, source_heads[lagging] - 1)
    two = journal(urls, b="512-1023")
    with pytest.raises(JournalError, match=f"totals on {lagging} \\(at ") as refused:
        await move_slices(two, "512-1023", target="b")
    assert "others" not in str(refused.value)
    assert await events_by_key(urls[1]) == {}  # nothing was copied

    await set_position(
        urls[0], "totals", lagging, source_heads[lagging], owner="w1", lease_expires_us=2**62
    )
    with pytest.raises(JournalError, match=f"running .*totals on {lagging}"):
        await move_slices(two, "512-1023", target="b")

    await set_position(urls[0], "totals", lagging, source_heads[lagging])
    report = await move_slices(two, "512-1023", target="b")
    target_heads = await heads(urls[1])
    assert {(p, k) for p, k, _ in report.positions} == {
        ("totals", partition_key(t, "b")) for t in target_heads
    }
    stored = {
        (r.processor, r.tag): r.last_offset for r in await rows(urls[0], schema.readside_offsets)
    }
    for tag, head in target_heads.items():
        assert stored["totals", f"{tag}@b"] == head
        assert stored["totals", tag] == source_heads[tag]  # the source's positions stay


async def test_a_read_side_behind_on_the_target_refuses(urls: list[str]) -> None:
    """The target held slices already: a consumer must be at its head there too."""
    half = journal(urls, b="900-1023")
    await fill(journal(urls))
    await move_slices(half, "900-1023", target="b")
    # No positions were written (no consumer had one); now one follows home but not b.
    for tag, head in (await heads(urls[0])).items():
        await set_position(urls[0], "totals", tag, head)
    more = journal(urls, b="512-1023")
    with pytest.raises(JournalError, match=r"totals on move-things-\d@b \(at 0 of"):
        await move_slices(more, "512-899", target="b")


# --------------------------------------------------------------------------- bad input


async def test_bad_input_gets_a_clear_error(urls: list[str]) -> None:
    two = journal(urls, b="512-1023")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"slices": "512-1023", "target": "x"}, "target 'x' is not a database of the journal"),
        ({"slices": "512-1023", "target": "b", "source": "y"}, "source 'y' is not a database"),
        ({"slices": "512-2000", "target": "b"}, "within 0-1023"),
        ({"slices": "600-512", "target": "b"}, "'600-512'"),
        ({"slices": "abc", "target": "b"}, "not a slice range"),
        ({"slices": "0-600", "target": "b"}, "place slice 0 \\(512 of the slices.*home"),
        ({"slices": "512-1023", "target": "b", "source": "b"}, "both 'b'"),
        ({"slices": [5000], "target": "b"}, "not a slice number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            await move_slices(two, **kwargs)
    with pytest.raises(ConfigurationError, match="batch"):
        await move_slices(two, "512-1023", target="b", batch=0)
    with pytest.raises(ConfigurationError, match="batch must be from 1 to 10000"):
        await move_slices(two, "512-1023", target="b", batch=10_001)


# --------------------------------------------------------------------------- the command


def test_the_command_moves_with_the_settings_of_the_environment(
    urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    before = asyncio.run(fill(journal(urls)))
    monkeypatch.setenv("LAGOMPY_JOURNAL_URL", urls[0])
    monkeypatch.setenv("LAGOMPY_JOURNAL_AUTO_MIGRATE", "true")
    monkeypatch.setenv(
        "LAGOMPY_JOURNAL_DATABASES", f'{{"b": {{"url": "{urls[1]}", "slices": "512-1023"}}}}'
    )
    runner = CliRunner()
    app = build_app()
    result = runner.invoke(
        app, ["journal", "move-slices", "--slices", "512-1023", "--to", "b", "--batch", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "copied 5/" in result.output
    assert "moved " in result.output.splitlines()[-1]
    assert asyncio.run(placed_states(journal(urls, b="512-1023"))) == before

    refused = runner.invoke(app, ["journal", "move-slices", "--slices", "0-10", "--to", "b"])
    assert refused.exit_code == 1
    assert "error: the settings place slice 0" in refused.output
    assert os.environ["LAGOMPY_JOURNAL_URL"] == urls[0]


def test_a_placed_database_set_in_the_environment_opens_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``placed_on`` gives one database's settings even when the placement comes from the
    environment (pydantic-settings would merge it back into a new instance)."""
    monkeypatch.setenv(
        "LAGOMPY_JOURNAL_DATABASES", '{"b": {"url": "sqlite:///b.db", "slices": "512-1023"}}'
    )
    settings = JournalSettings(url="sqlite:///home.db")
    assert list(settings.databases) == ["b"]
    for name in (HOME, "b"):
        assert settings.placed_on(name).databases == {}
    assert settings.placed_on("b").url == "sqlite:///b.db"


# --------------------------------------------------------------------------- lagompy migrate


def test_migrate_upgrades_every_database_home_first(
    urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from lagompy.sql import current_revision, head_revision

    monkeypatch.setenv("LAGOMPY_JOURNAL_URL", urls[0])
    monkeypatch.setenv("LAGOMPY_JOURNAL_AUTO_MIGRATE", "false")
    placed = {"b": {"url": urls[1], "slices": "0-9"}, "c": {"url": urls[2], "slices": "10-19"}}
    monkeypatch.setenv("LAGOMPY_JOURNAL_DATABASES", json.dumps(placed))
    runner, app = CliRunner(), build_app()

    only = runner.invoke(app, ["migrate", "--database", "c"])
    assert only.exit_code == 0, only.output
    assert only.stdout.startswith("upgraded lagompy's tables in ") and "from none" in only.stdout
    current = runner.invoke(app, ["migrate", "current"])
    head = head_revision()
    assert current.stdout.splitlines() == [
        f"home: none (head is {head}: run lagompy migrate)",
        f"b: none (head is {head}: run lagompy migrate)",
        f"c: {head} (head)",
    ]
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["home", "b", "c"]
    assert "from none to" in lines[0] and "from none to" in lines[1]
    assert "up to date" in lines[2]
    current = runner.invoke(app, ["migrate", "current"])
    assert current.stdout.splitlines() == [f"{n}: {head} (head)" for n in ("home", "b", "c")]

    async def revisions() -> list[str | None]:
        out = []
        for url in urls[:3]:
            database = Database.create(url=url)
            try:
                out.append(await current_revision(database))
            finally:
                await database.dispose()
        return out

    assert asyncio.run(revisions()) == [head] * 3

    unknown = runner.invoke(app, ["migrate", "--database", "x"])
    assert unknown.exit_code == 1
    assert "no database named 'x' (it has: home, b, c)" in unknown.stderr


def test_migrate_sql_prints_each_database_under_a_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 1: nothing listens there, so any connection attempt would fail.
    home = "postgresql://postgres:pw@127.0.0.1:1/home"
    monkeypatch.setenv("LAGOMPY_JOURNAL_URL", home)
    placed = {"b": {"url": "postgresql://postgres@127.0.0.1:1/b", "slices": "512-1023"}}
    monkeypatch.setenv("LAGOMPY_JOURNAL_DATABASES", json.dumps(placed))
    result = CliRunner().invoke(build_app(), ["migrate", "--sql"])
    assert result.exit_code == 0, result.output
    sql = result.stdout
    headers = [line for line in sql.splitlines() if line.startswith("-- lagompy migrate:")]
    assert headers == [
        "-- lagompy migrate: database home (postgresql://postgres@127.0.0.1:1/home)",
        "-- lagompy migrate: database b (postgresql://postgres@127.0.0.1:1/b)",
    ]
    first, second = sql.split(headers[1])
    for script in (first, second):
        assert "CREATE TABLE lagompy_events" in script
        assert script.rstrip().endswith("COMMIT;")
    assert "pw" not in sql


# --------------------------------------------------------------------------- wrong moves


async def test_slices_not_on_the_source_are_refused(urls: list[str]) -> None:
    await fill(journal(urls))
    await move_slices(journal(urls, b="512-1023"), "512-1023", target="b")
    wrong = journal(urls, b="768-1023", c="512-767")
    with pytest.raises(
        ConfigurationError,
        match=r"not on the source home: slice \d+ is on database 'b' \(move it with --from b\)",
    ):
        await move_slices(wrong, "512-767", target="c")
    report = await move_slices(wrong, "512-767", source="b", target="c")
    assert report.events > 0
    # Done already: the target holds them, the source nothing.
    again = await move_slices(wrong, "512-767", source="b", target="c")
    assert again.events == again.copied == again.deleted == 0


async def test_a_writer_during_the_move_stops_it_before_anything_is_deleted(
    urls: list[str],
) -> None:
    import asyncio

    one = journal(urls)
    await fill(one)
    late = next(f"late{n}" for n in range(1000) if slice_of(f"late{n}") >= 512)
    source_events = await events_by_key(urls[0])
    written: list[asyncio.Task[Any]] = []
    async with await open_storage(settings=one, entities=[ListEntity]) as writer:

        def progress(step: str, done: int, total: int) -> None:
            if not written:  # a writer that was not stopped writes during the copy
                written.append(
                    asyncio.get_running_loop().create_task(
                        writer.journal.append_one(
                            AtomicWrite(T, late, 0, [Added(1)], tags=[(tag_of(late),)])
                        )
                    )
                )

        two = journal(urls, b="512-1023")
        with pytest.raises(JournalError, match="changed during the move: a writer is running"):
            await move_slices(two, "512-1023", target="b", batch=5, progress=progress)
        await written[0]
    home = await events_by_key(urls[0])
    assert home.keys() == source_events.keys() | {(T, late, 1)}  # nothing deleted
    report = await move_slices(two, "512-1023", target="b", batch=5)
    # The first run copied all it saw (the late event too, if it came before the copy got
    # there): this one copies what is left, and nothing twice.
    assert report.copied in (0, 1)
    b = await events_by_key(urls[1])
    assert (T, late, 1) in b
    assert sorted(b.values()) == list(range(1, len(b) + 1))


async def test_positions_in_several_projection_databases(urls: list[str]) -> None:
    """Consumers keep positions in more than one database: each is checked and gets its
    positions on the target."""
    await fill(journal(urls))
    source_heads = await heads(urls[0])
    other = JournalSettings(url=urls[3], auto_migrate=True)
    async with await open_storage(settings=other):  # lagompy's tables, for the positions
        pass
    for tag, head in source_heads.items():
        await set_position(urls[0], "totals", tag, head)
        await set_position(urls[3], "mailer", tag, head)
    lagging = sorted(source_heads)[0]
    await set_position(urls[3], "mailer", lagging, 0)
    two = journal(urls, b="512-1023")
    projections = [two.placed_on(HOME), other]
    with pytest.raises(JournalError, match=f"behind .*mailer on {lagging} \\(at 0 of") as refused:
        await move_slices(two, "512-1023", target="b", projections=projections)
    assert "totals" not in str(refused.value)
    await set_position(urls[3], "mailer", lagging, source_heads[lagging])
    report = await move_slices(two, "512-1023", target="b", projections=projections)
    target_heads = await heads(urls[1])
    assert {(p, k, o) for p, k, o in report.positions} == {
        (p, f"{t}@b", h) for p in ("totals", "mailer") for t, h in target_heads.items()
    }
    for url, processor in ((urls[0], "totals"), (urls[3], "mailer")):
        stored = {
            r.tag: r.last_offset
            for r in await rows(url, schema.readside_offsets)
            if r.processor == processor
        }
        assert {t: stored[f"{t}@b"] for t in target_heads} == target_heads


def test_moving_knows_the_topic_rows_as_the_topics_name_them() -> None:
    """The journal layer spells the topics' offset-row prefixes itself (it cannot import the
    topic layer): they stay the ones the topics' naming makes."""
    assert _TOPIC_POSITIONS == (GROUP_PREFIX, PRODUCER_PREFIX)
    assert offset_key("orders", "billing").startswith(_TOPIC_POSITIONS[0])
    assert producer_key("orders").startswith(_TOPIC_POSITIONS[1])
