"""The read side's usual offset commit goes to the driver as planned once (no statement built
and compiled per transaction), on PostgreSQL as on SQLite, and still stores the offset; on
PostgreSQL a batch whose handlers wrote nothing stores it in one statement of its own."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import POSTGRES_URL
from sqlalchemy import event, text

from examples.user_service.entity import NameChanged, UserEntity, UserRegistered
from examples.user_service.projection import UsersProjection
from lagompy import AtomicWrite, EventEnvelope, JournalSettings, open_storage
from lagompy.consumer._lease import Lease
from lagompy.errors import LeaseLost
from lagompy.readside import SqlReadSideProcessor, open_projections
from lagompy.readside._store import OffsetStore

pytestmark = pytest.mark.postgres


async def test_running_commits_use_the_planned_statement(
    postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    fenced = OffsetStore._fenced

    async def counting(self: OffsetStore, conn: Any, lease: Any, values: dict[str, Any]) -> Any:
        built.append(values.get("last_offset", -1))
        return await fenced(self, conn, lease, values)

    monkeypatch.setattr(OffsetStore, "_fenced", counting)
    settings = JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)
    tag = UserEntity.tag
    async with await open_storage(settings=settings, entities=[UserEntity]) as storage:
        for i in range(20):
            events = [UserRegistered(f"u{i}", f"User {i}", "x@y.org"), NameChanged(f"u{i}", "R")]
            t = (tag.for_entity(f"u{i}"),)
            await storage.journal.append([AtomicWrite("user", f"u{i}", 0, events, [t, t])])
        async with await open_projections(journal_settings=settings) as projections:
            assert await projections.rebuild(UsersProjection, journal=storage.journal) == 40
            async with projections.projection.read() as conn:
                renamed = await conn.scalar(text("SELECT count(*) FROM users WHERE name = 'R'"))
            rows = await projections.store.rows("users")
    assert renamed == 20
    # Only the reset's commit (offset 0, state "prepared") built its statement.
    assert [o for o in built if o != 0] == []
    assert len(rows) == 4 and sum(r.offset for r in rows) > 0


class Quiet(SqlReadSideProcessor):
    """Writes nothing (as a topic subscriber that keeps only its positions): counts events."""

    name = "quiet"
    tag = UserEntity.tag
    entities = (UserEntity,)
    seen = 0

    async def handle(self, conn: Any, envelope: EventEnvelope[Any]) -> None:
        Quiet.seen += 1

    async def reset(self, conn: Any) -> None:
        Quiet.seen = 0


async def test_a_batch_whose_handlers_wrote_nothing_stores_its_position_in_one_statement(
    postgres_schema: str,
) -> None:
    """PostgreSQL: the fenced position write alone, outside a transaction (one round trip, no
    BEGIN and COMMIT around it), still fenced: a stale lease's is refused, writing nothing."""
    settings = JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)
    tag = UserEntity.tag
    # (connection, query, its first argument) as each asyncpg connection of the projection
    # database sent them.
    sent: list[tuple[int, str, Any]] = []
    logged: set[int] = set()

    def log_queries(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        driver = record.driver_connection
        if id(driver) not in logged:
            logged.add(id(driver))
            driver.add_query_logger(
                lambda q: sent.append((id(driver), q.query, q.args[0] if q.args else None))
            )

    async with await open_storage(settings=settings, entities=[UserEntity]) as storage:
        for i in range(40):
            events = [UserRegistered(f"u{i}", f"User {i}", "x@y.org"), NameChanged(f"u{i}", "R")]
            t = (tag.for_entity(f"u{i}"),)
            await storage.journal.append([AtomicWrite("user", f"u{i}", 0, events, [t, t])])
        async with await open_projections(journal_settings=settings, max_batch=7) as projections:
            event.listen(projections.projection.engine.sync_engine, "checkout", log_queries)
            assert await projections.rebuild(Quiet, journal=storage.journal) == 80
            rows = await projections.store.rows("quiet")
            store = projections.store
            stale = Lease("quiet", rows[0].tag, "gone", epoch=0, offset=0, paused=False)
            async with projections.projection.write(lazy_begin=True) as conn:
                with pytest.raises(LeaseLost):
                    await store.commit_alone(conn, stale, 10**9, 30.0)
            after = await projections.store.rows("quiet")
    assert Quiet.seen == 80
    assert sum(r.offset for r in rows) > 0 and after == rows
    before: dict[int, str] = {}
    positions = []
    for driver, query, first in sent:
        # A page's position (the rebuild's reset stores 0 through SQLAlchemy).
        if query.startswith("UPDATE lagompy_readside_offsets SET last_offset=") and first:
            positions.append(before.get(driver, ""))
        before[driver] = query
    # The pages of 7 (or fewer, at a tag's end) stored their positions alone, outside BEGIN
    # (a batch of one event, its handler on the plain connection, commits the usual way: a
    # tag's last page can be one, and the runs of pages vary with the workers' timing).
    alone = [q for q in positions if not q.startswith("BEGIN")]
    # Every tag's pages stored positions (how many pages a tag's 20-odd events make varies with
    # the timing too: 10 of them once, on a starved machine).
    assert len(positions) >= len(tag.all_tags), positions
    assert len(alone) >= 2 * len(positions) // 3, positions
