"""What every entity runtime offers its callers: :class:`EntityRuntime`.

Two runtimes implement it, one module each: :class:`~lagompy.runtime.InProcessEntities`
(``_in_process.py``: the entities run in this process) and
:class:`~lagompy.runtime.ShardedEntities` (``_ray.py``: on the app's shard hosts on Ray). A
service, a script or a test holds either through this protocol and never asks which one it has.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from lagompy.entity import PersistentEntity
from lagompy.runtime._refs import EntityRef
from lagompy.settings import JournalSettings

__all__ = ["EntityRuntime"]

C = TypeVar("C")


@runtime_checkable
class EntityRuntime(Protocol):
    """An app's entities as this process reaches them, wherever they run.

    ``check_name`` is how ``/health/ready`` names :meth:`check`: ``"runtime"`` when the
    entities run elsewhere (the check asks the shard hosts), ``"journal"`` when they run in
    this process (then all they need is their journal's database). ``local_journal`` is the
    journal this process writes through the runtime (in-process: its storage's), or None when
    other processes write it (the shard hosts)."""

    check_name: str

    @property
    def local_journal(self) -> JournalSettings | None: ...

    def ref_for(
        self, entity: type[PersistentEntity[C, Any, Any]] | str, entity_id: str
    ) -> EntityRef[C]:
        """A ref to one entity (see :class:`EntityRef`)."""
        ...

    def stats(self) -> dict[str, Any]:
        """This process's counters (asks, batches, pending...)."""
        ...

    async def host_stats(self, *, require_journal: bool = True) -> list[dict[str, Any]]:
        """The counters of every place entities run (each shard host; in-process, this
        process as one host without an ``index``)."""
        ...

    async def check(self) -> None:
        """Return when the entities can take asks now; else raise, saying why
        (``JournalUnavailable``, ``RuntimeFailure``, a database error)."""
        ...

    async def close(self, *, shutdown: bool = False) -> None:
        """Finish the asks already made and let go of this process's resources;
        ``shutdown=True`` also stops what runs elsewhere (the app's shard hosts). Entities
        hosted in this process stop with ``close()`` either way."""
        ...
