"""The openers (``open_storage``, ``start_in_process``, ``start``, ``start_readside``,
``open_projections``) are used either way, like httpx's clients or asyncpg's ``create_pool``:

    async with open_storage(url) as storage: ...     # closed when the block ends
    storage = await open_storage(url)                # closed by the caller

and both forms type-check in a user's ``mypy --strict`` code
(``tests/test_settings_typing.py``, beside the other strict checks of users' code, which share
one mypy cache per test process).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray_entities import Add, CounterEntity

from lagompy import InProcessEntities, Storage, open_storage, start, start_in_process
from lagompy.closing import AsyncClosing, Opening, opener
from lagompy.readside import Projections, ReadSide, open_projections, start_readside
from lagompy.testkit.readside import CreditsProjection

Open = Callable[[str], Any]

OPENERS: dict[str, tuple[Open, type[AsyncClosing]]] = {
    "open_storage": (lambda url: open_storage(url, entities=[CounterEntity]), Storage),
    "start_in_process": (
        lambda url: start_in_process(entities=[CounterEntity], journal_url=url),
        InProcessEntities,
    ),
    "start": (
        lambda url: start(entities=[CounterEntity], journal_url=url, ray=False),
        InProcessEntities,
    ),
    "start_readside": (
        lambda url: start_readside([CreditsProjection], journal_url=url),
        ReadSide,
    ),
    "open_projections": (lambda url: open_projections(journal_url=url), Projections),
}


class Boom(Exception):
    pass


@pytest.fixture(params=sorted(OPENERS))
def opener_case(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Callable[[], Any], type[AsyncClosing], list[object]]]:
    """(a call of the opener, the class it opens, the objects of that class closed so far)."""
    open_, cls = OPENERS[request.param]
    closed: list[object] = []
    original = cls.close

    async def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        closed.append(self)
        await original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "close", spy)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    yield (lambda: open_(url)), cls, closed


async def test_async_with_gives_the_object_and_closes_it_at_the_end(
    opener_case: tuple[Callable[[], Any], type[AsyncClosing], list[object]],
) -> None:
    call, cls, closed = opener_case
    async with call() as opened:
        assert isinstance(opened, cls)
        assert closed == []
        if isinstance(opened, InProcessEntities):  # it works inside the block
            assert await opened.ref_for(CounterEntity, "a").ask(Add(2)) == 2
    assert closed == [opened]


async def test_async_with_closes_the_object_on_an_exception(
    opener_case: tuple[Callable[[], Any], type[AsyncClosing], list[object]],
) -> None:
    call, cls, closed = opener_case
    with pytest.raises(Boom):
        async with call() as opened:
            raise Boom
    assert closed == [opened]
    assert isinstance(opened, cls)


async def test_await_gives_the_object_open(
    opener_case: tuple[Callable[[], Any], type[AsyncClosing], list[object]],
) -> None:
    call, cls, closed = opener_case
    opened = await call()
    try:
        assert isinstance(opened, cls)
        assert closed == []
    finally:
        await opened.close()
    assert closed == [opened]
    # and the old spelling still works
    async with await call() as again:
        assert isinstance(again, cls)
    assert closed == [opened, again]


def test_openers_keep_their_parameters_and_docs() -> None:
    for function in (open_storage, start_in_process, start, start_readside, open_projections):
        wrapped = getattr(function, "__wrapped__", None)
        assert inspect.iscoroutinefunction(wrapped)
        assert inspect.signature(function) == inspect.signature(wrapped)
        assert function.__doc__ and function.__doc__ == wrapped.__doc__
    assert "url" in inspect.signature(open_storage).parameters


class Resource(AsyncClosing):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def __aenter__(self) -> Resource:
        self.log.append("enter")
        return self

    async def close(self) -> None:
        self.log.append("close")


async def test_an_opening_runs_its_opener_once_and_enters_what_it_opened() -> None:
    log: list[str] = []

    @opener
    async def open_resource(name: str) -> Resource:
        log.append(f"open {name}")
        return Resource(log)

    opening = open_resource("a")
    assert isinstance(opening, Opening)
    assert log == []  # nothing runs before it is awaited or entered
    async with opening as resource:
        assert log == ["open a", "enter"]
    assert log == ["open a", "enter", "close"]
    assert isinstance(resource, Resource)

    log.clear()
    awaited = await open_resource("b")
    assert log == ["open b"]  # awaited: opened, not entered, not closed
    await awaited.close()

    # what took the opener's coroutine takes its Opening
    for wrap in (asyncio.create_task, asyncio.ensure_future, lambda c: asyncio.wait_for(c, 5)):
        log.clear()
        got = await wrap(open_resource("c"))
        assert isinstance(got, Resource) and log == ["open c"]

    @opener
    async def fail_to_open() -> Resource:
        raise Boom

    log.clear()
    with pytest.raises(Boom):
        async with fail_to_open():
            pass  # pragma: no cover
    assert log == []
