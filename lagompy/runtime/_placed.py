"""A shard host's entities on a journal placed on several databases.

An entity's events, snapshots and stored replies live in the database of its slice
(:class:`~lagompy.journal._placement.Placement`), so the host keeps one
:class:`~lagompy.runtime._processing.EntityProcessor` per database, each over that database's
storage, and gives each the requests of its entities. A batch that touches several databases
runs their parts at once (one transaction per database, in parallel); each request's result is
its database's: a database that fails fails only the requests of its entities.

With one database (the default) the host uses the one processor directly: nothing here runs.
:func:`open_entity_storage` and :func:`processor_for` make that choice for every runtime (the
shard hosts on Ray and the entities in one process).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lagompy.journal._placement import HOME
from lagompy.journal._storage import (
    PlacedStorage,
    Storage,
    open_placed_storage,
    open_storage,
)
from lagompy.runtime._loading import EntityClass
from lagompy.runtime._processing import EntityProcessor, LiveEntity, Request, Result
from lagompy.settings import JournalSettings


async def open_entity_storage(
    classes: list[EntityClass], settings: JournalSettings
) -> Storage | PlacedStorage:
    """The journal's storage for hosting ``classes``: one database's, or each database's when
    the journal is placed on several (``JournalSettings.databases``)."""
    if settings.databases:
        return await open_placed_storage(entities=classes, settings=settings)
    return await open_storage(entities=classes, settings=settings)


def processor_for(
    classes: Iterable[EntityClass], storage: Storage | PlacedStorage, **options: Any
) -> EntityProcessor | PlacedProcessor:
    """The processor of ``classes`` over ``storage``: one database's :class:`EntityProcessor`,
    or a :class:`PlacedProcessor` over each database of a placed journal."""
    if isinstance(storage, PlacedStorage):
        return PlacedProcessor(classes, storage, **options)
    return EntityProcessor(classes, storage.journal, storage.snapshots, **options)


class PlacedProcessor:
    """One :class:`EntityProcessor` per database of the journal, behind the processor's
    interface a shard host uses (``process``, ``passivate_idle``, ``stats``, the snapshots
    due after a batch)."""

    def __init__(
        self,
        entities: Iterable[EntityClass],
        storage: PlacedStorage,
        *,
        max_entities: int | None = None,
        **options: Any,
    ) -> None:
        classes = list(entities)
        self.placement = storage.placement
        self._database_of = self.placement.database_of
        count = len(storage.parts)
        # The bound on entities in memory is the host's: each database's processor gets its
        # share (entities spread evenly over slices, hence over databases by their slices).
        share = None
        if max_entities is not None:
            slices = {n: len(self.placement.slices_of(n)) for n in storage.parts}
            total = sum(slices.values())
            share = {n: max(1, max_entities * slices[n] // total) for n in storage.parts}
        self.parts: dict[str, EntityProcessor] = {
            name: EntityProcessor(
                classes,
                part.journal,
                part.snapshots,
                max_entities=None if share is None else share[name],
                **options,
            )
            for name, part in storage.parts.items()
        }
        assert len(self.parts) == count
        home = self.parts[HOME]
        self.entity_classes = home.entity_classes
        self.idle_timeout = home.idle_timeout

    def entity_class(self, entity_type: str) -> EntityClass:
        return self.parts[HOME].entity_class(entity_type)

    def _database(self, entity_id: Any) -> str:
        try:
            return self._database_of(entity_id)
        except Exception:  # not an id: the home processor refuses it, naming what is wrong
            return HOME

    async def process(self, requests: Sequence[Request]) -> list[Result]:
        """Each request processed by its entity's database's processor; the parts of a batch
        that touches several databases at once. One result per request, in order."""
        groups: dict[str, list[int]] = {}
        database = self._database
        for i, request in enumerate(requests):
            name = database(request.entity_id)
            group = groups.get(name)
            if group is None:
                groups[name] = [i]
            else:
                group.append(i)
        if len(groups) == 1:
            (name,) = groups
            return await self.parts[name].process(requests)
        names = list(groups)
        outs = await asyncio.gather(
            *(self.parts[n].process([requests[i] for i in groups[n]]) for n in names),
            return_exceptions=True,
        )
        results: list[Result] = [Result()] * len(requests)
        for name, out in zip(names, outs, strict=True):
            indices = groups[name]
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out  # a cancellation or an exit, not a failure of the batch
                for i in indices:
                    results[i] = Result(error=out)
                continue
            for i, result in zip(indices, out, strict=True):
                results[i] = result
        return results

    def part_of(self, entity_id: str) -> EntityProcessor:
        """The processor of the database that holds ``entity_id``."""
        return self.parts[self._database(entity_id)]

    async def activate(self, entity_type: str, entity_id: str) -> LiveEntity:
        """:meth:`EntityProcessor.activate` on the entity's database."""
        return await self.part_of(entity_id).activate(entity_type, entity_id)

    def evict(self, entity_type: str, entity_id: str) -> None:
        """:meth:`EntityProcessor.evict` on the entity's database."""
        self.part_of(entity_id).evict(entity_type, entity_id)

    def passivate_idle(self, now: float | None = None) -> int:
        return sum(p.passivate_idle(now) for p in self.parts.values())

    def stats(self) -> dict[str, int | float]:
        """The processors' counters, summed over the databases."""
        total: Counter[str] = Counter()
        for part in self.parts.values():
            total.update(part.stats())
        return dict(total)

    @property
    def due_snapshots(self) -> bool:
        return any(p.due_snapshots for p in self.parts.values())

    async def save_due_snapshots(self) -> int:
        saved = 0
        for part in self.parts.values():
            if part.due_snapshots:
                saved += await part.save_due_snapshots()
        return saved
