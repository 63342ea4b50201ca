"""The journal's pages of a tag on PostgreSQL: read on the driver (asyncpg), the fence's bound
then the page, with no SQLAlchemy statement, the same pages SQLAlchemy's path reads; a writer
in flight still holds them back."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_URL
from sqlalchemy import event
from test_sqlite_reads import _all_pages, _writes

from examples.user_service.entity import NameChanged, UserEntity, UserRegistered
from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy.journal._journal import _LOCK_EVENTS

pytestmark = pytest.mark.postgres

_NEXT_OFFSET = "SELECT nextval(pg_get_serial_sequence('lagompy_events', 'global_offset'))"


async def test_postgres_tag_pages_are_read_on_the_driver_and_match_sqlalchemy(
    postgres_schema: str,
) -> None:
    settings = JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)
    async with await open_storage(settings=settings, entities=[UserEntity]) as storage:
        journal = storage.journal
        await journal.append(_writes())
        through_sqlalchemy: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            through_sqlalchemy.append(statement)

        engine = journal.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        renamed = journal.serializer.type_names_of([NameChanged])
        try:
            for tag in ("left", "right"):
                for wanted in (None, renamed):
                    through_sqlalchemy.clear()
                    fast = await _all_pages(journal, tag, wanted)
                    assert len(fast) == 7  # 45 events of the tag, pages of 7
                    assert through_sqlalchemy == []
                    backend = journal.backend

                    async def the_front_reads(*_: Any) -> None:
                        return None

                    backend.read_page = the_front_reads  # type: ignore[method-assign, assignment]
                    try:
                        slow = await _all_pages(journal, tag, wanted)
                    finally:
                        del backend.read_page
                    assert through_sqlalchemy  # the front's path: SQLAlchemy's statements
                    assert fast == slow
                    events = [e.event for p in fast for e in p.envelopes]
                    assert len(events) == (45 if wanted is None else 15)
        finally:
            event.remove(engine, "before_cursor_execute", seen)

        # A writer in flight (its marker placed, an offset taken) holds the page below it.
        start = (await journal.read_tag("left", after_offset=0, limit=1000)).last_offset
        other = await asyncpg.connect(
            POSTGRES_URL, server_settings={"search_path": postgres_schema}
        )
        try:
            async with other.transaction():
                await other.execute(_LOCK_EVENTS)
                await other.fetchval(_NEXT_OFFSET)
                user = UserRegistered("late", "Late", "late@x.org")
                await journal.append_one(AtomicWrite("user", "late", 0, [user], [("left",)]))
                page = await journal.read_tag("left", after_offset=start)
                assert (page.envelopes, page.held) == ([], True)
            page = await journal.read_tag("left", after_offset=start)
            assert [e.entity_id for e in page.envelopes] == ["late"]
            assert not page.held
        finally:
            await other.close()
