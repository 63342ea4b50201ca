"""The ``async with`` protocol of lagompy's objects that hold connections, tasks or actors:
leaving the block awaits their ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


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
