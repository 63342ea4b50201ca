"""What every way of running read-side workers offers: :class:`ReadSideRunner`.

Two runners implement it, one module each: :class:`~lagompy.readside.ReadSide`
(``_projections.py``: one asyncio task per (processor, tag) in this process, from
:func:`~lagompy.readside.start_readside`) and :class:`~lagompy.readside.RayReadSide`
(``_ray.py``: one detached Ray actor per (processor, tag), from
:func:`~lagompy.readside.start_readside_on_ray`). A service's
:class:`~lagompy.readside.ReadSideComponent` holds either through this protocol and never asks
which one it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lagompy.readside._projections import Projections, WorkerStatus

__all__ = ["CAUGHT_UP_TIMEOUT", "ReadSideRunner"]

#: Seconds every runner's ``wait_until_caught_up`` waits by default (one default for both
#: flavours: a worker on Ray answers through an actor call, so the longer of the two it had).
CAUGHT_UP_TIMEOUT = 60.0


@runtime_checkable
class ReadSideRunner(Protocol):
    """Read-side workers as this process sees them, wherever they run.

    ``projections`` are the operations on their rows (status, pause, resume, skip, set an
    offset, rebuild) in the projection database, where every worker records its state."""

    @property
    def projections(self) -> Projections: ...

    async def status(self, processor: str | None = None) -> list[WorkerStatus]:
        """Every (processor, tag) of the projection database (of ``processor``)."""
        ...

    def problems(self) -> list[str]:
        """What keeps workers from making progress that the projection database cannot
        show (a ``global_prepare`` that keeps failing, a task that died); empty if nothing."""
        ...

    async def wait_until_caught_up(self, timeout: float = ...) -> None:
        """Wait until every worker has handled the events its tag had when called (raise
        ``TimeoutError`` after ``timeout`` seconds, :data:`CAUGHT_UP_TIMEOUT` by default)."""
        ...

    async def close(self, *, stop: bool = ...) -> None:
        """Let go of this process's connections and tasks. Workers that run elsewhere (on
        Ray) go on unless ``stop=True``, which stops them (each releases its lease);
        workers of this process stop with ``close()`` either way."""
        ...
