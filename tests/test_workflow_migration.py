"""Revision 0008 adds the workflow tables to a journal migrated by the release before it."""

from __future__ import annotations

import pytest

from lagompy.sql import _schema as schema
from lagompy.sql import upgrade
from lagompy.sql._database import Database
from tests.test_migrations import DELETED, HEAD, database, differences, table_names

__all__ = ["database"]  # the fixture, shared with tests/test_migrations.py

#: The fixture's database starts unmigrated, as in tests/test_migrations.py.
pytestmark = pytest.mark.unmigrated


async def test_0008_adds_the_workflow_tables_to_a_database_at_0006(database: Database) -> None:
    assert (await upgrade(database, "0006")).after == "0006"
    assert "lagompy_workflow_runs" not in await table_names(database)
    async with database.write() as conn:
        await conn.execute(
            schema.deletions.insert().values(entity_type="t", entity_id="1", deleted_to=3)
        )
    result = await upgrade(database)
    assert (result.before, result.after) == ("0006", HEAD)
    assert await differences(database) == []
    async with database.write() as conn:
        await conn.execute(
            schema.workflow_types.insert().values(
                workflow="w", max_running=None, paused=False, updated_us=1
            )
        )
    async with database.read() as conn:
        assert (await conn.execute(DELETED)).all() == [("t", "1", 3)]
        assert len((await conn.execute(schema.workflow_types.select())).all()) == 1
