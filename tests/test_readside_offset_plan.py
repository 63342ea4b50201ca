"""The read side's usual offset commit goes to the driver as planned once (no statement built
and compiled per transaction), on PostgreSQL as on SQLite, and still stores the offset."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import POSTGRES_URL
from sqlalchemy import text

from examples.user_service.entity import NameChanged, UserEntity, UserRegistered
from examples.user_service.projection import UsersProjection
from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy.readside import open_projections
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
