"""The journal's pages of a tag on SQLite: read in one call to the driver's thread, the same
pages SQLAlchemy's path reads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from examples.user_service.entity import EmailChanged, NameChanged, UserEntity, UserRegistered
from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy.journal import _sqlite
from lagompy.journal._journal import Journal, TagPage


def _writes() -> list[AtomicWrite]:
    """Users of two tags, each registered, renamed and given a new email, in turn."""
    out = []
    for i in range(30):
        tag = ("left",) if i % 2 else ("right",)
        out.append(
            AtomicWrite(
                "user",
                f"u{i}",
                0,
                [
                    UserRegistered(f"u{i}", f"User {i}", f"u{i}@x.org"),
                    NameChanged(f"u{i}", f"Renamed {i}"),
                    EmailChanged(f"u{i}", f"v{i}@x.org"),
                ],
                [tag, tag, tag],
            )
        )
    return out


async def _all_pages(journal: Journal, tag: str, event_types: Any) -> list[TagPage]:
    pages, after = [], 0
    while True:
        page = await journal.read_tag(tag, after_offset=after, limit=7, event_types=event_types)
        pages.append(page)
        after = page.last_offset
        if not page.full:
            return pages


def test_sqlite_tag_pages_are_read_in_one_call_and_match_sqlalchemy(tmp_path: Path) -> None:
    # Each page is one call to the driver's thread (the statement compiled once, executed and
    # fetched there); its pages are those the SQLAlchemy path reads, with and without a filter
    # on event types (whose payloads stay in the database).
    calls: list[str] = []
    fetch_all = _sqlite._fetch_all

    def counting(conn: Any, sql: str, args: Any) -> Any:
        calls.append(sql)
        return fetch_all(conn, sql, args)

    async def main() -> None:
        settings = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
        async with await open_storage(settings=settings, entities=[UserEntity]) as storage:
            journal = storage.journal
            await journal.append(_writes())
            renamed = journal.serializer.type_names_of([NameChanged])
            for tag in ("left", "right"):
                for wanted in (None, renamed):
                    calls.clear()
                    fast = await _all_pages(journal, tag, wanted)
                    assert len(calls) == len(fast) == 7  # 45 events of the tag, pages of 7
                    backend = journal.backend

                    async def through_sqlalchemy(*_: Any) -> None:
                        return None

                    backend.read_page = through_sqlalchemy  # type: ignore[method-assign, assignment]
                    try:
                        slow = await _all_pages(journal, tag, wanted)
                    finally:
                        del backend.read_page
                    assert fast == slow
                    events = [e.event for p in fast for e in p.envelopes]
                    assert len(events) == (45 if wanted is None else 15)
                    if wanted is not None:
                        assert all(isinstance(e, NameChanged) for e in events)

    _sqlite._fetch_all = counting
    try:
        asyncio.run(main())
    finally:
        _sqlite._fetch_all = fetch_all
