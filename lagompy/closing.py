"""The ``async with`` protocol of lagompy's objects that hold connections, tasks or actors:
leaving the block awaits their ``close()``.

Functions that open such an object (``open_storage``, ``start``, ``start_in_process``,
``start_readside``, ``open_projections``...) are :func:`opener` functions: their result is
used either way, like httpx's clients or asyncpg's ``create_pool``::

    async with open_storage(url) as storage:     # closed at the end of the block
        ...

    storage = await open_storage(url)            # closed by you
    try:
        ...
    finally:
        await storage.close()
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar


class AsyncClosing:
    """Base class: ``async with obj:`` gives ``obj`` and awaits ``obj.close()`` at the end.
    Subclasses that must start something on entry override ``__aenter__``."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


R = TypeVar("R", bound=AsyncClosing, covariant=True)
P = ParamSpec("P")


class Opening(Coroutine[Any, Any, R]):
    """What an opener returns before it has run: ``await`` it for the opened object (then
    close it yourself), or ``async with`` it to have the object closed when the block ends,
    on an exception too. Either way the opener runs once, when awaited or entered.

    It is the opener's coroutine too (``asyncio.create_task``, ``asyncio.run`` and
    ``asyncio.wait_for`` take it), so code written for the plain coroutine keeps working."""

    __slots__ = ("_coro", "_opened")

    def __init__(self, coro: Coroutine[Any, Any, R]) -> None:
        self._coro = coro
        self._opened: R | None = None

    def __await__(self) -> Generator[Any, None, R]:
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> R:
        opened = await self._coro
        self._opened = opened
        return await opened.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.__aexit__(exc_type, exc, tb)


def opener(open_: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Opening[R]]:
    """Make the coroutine function ``open_`` (which opens and returns an :class:`AsyncClosing`)
    usable both as ``await open_(...)`` and as ``async with open_(...) as obj:``, with the
    same parameters."""

    @functools.wraps(open_)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Opening[R]:
        return Opening(open_(*args, **kwargs))

    return wrapper


async def finish_tasks(
    tasks: Sequence[asyncio.Task[Any]], *, what: str, logger: logging.Logger, timeout: float = 30
) -> None:
    """Wait for ``tasks`` (told to stop already) to end, cancel those still running after
    ``timeout`` seconds, and log each that ended with an error as ``what`` failing."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            logger.error("%s failed", what, exc_info=result)
