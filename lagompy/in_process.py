"""Entities hosted in the calling process, without Ray: for scripts, unit tests and small tools.

Asks are micro-batched exactly like the sharded runtime does it: asks made in the same tick of
the event loop are processed as one batch, and the events of all their entities are committed in
one journal transaction. One batch runs at a time, so each entity has a single writer.

::

    entities = await start_in_process(entities=[UserEntity], journal_url="sqlite:///users.db")
    user = await entities.ref_for(UserEntity, "42").ask(RegisterUser("Ada", "ada@example.org"))
    await entities.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

from lagompy.entity import Command, PersistentEntity
from lagompy.processing import EntityClass, EntityProcessor, Request
from lagompy.storage import Storage, open_storage

log = logging.getLogger("lagompy.in_process")

R = TypeVar("R")
C = TypeVar("C")


class EntityRef(Generic[C]):
    """A handle on one entity: send it commands with :meth:`ask` or :meth:`tell`."""

    def __init__(self, entities: InProcessEntities, entity_type: str, entity_id: str) -> None:
        self._entities = entities
        self.entity_type = entity_type
        self.entity_id = entity_id

    async def ask(self, command: Command[R], *, timeout: float | None = None) -> R:
        """Send a command and wait for the reply (returned only after its events committed).

        Raises the entity's rejection (a ``CommandRejected``), ``CommandHandlerFailed`` for a
        handler bug, or a ``JournalError``; ``TimeoutError`` after ``timeout`` seconds.
        """
        future = self._entities._submit(Request(self.entity_type, self.entity_id, command))
        if timeout is None:
            result: R = await future
            return result
        return await asyncio.wait_for(asyncio.shield(future), timeout)

    def tell(self, command: Command[Any]) -> None:
        """Send a command without waiting for its outcome (failures are logged)."""
        future = self._entities._submit(Request(self.entity_type, self.entity_id, command))
        future.add_done_callback(_log_failure)

    def __repr__(self) -> str:
        return f"EntityRef({self.entity_type!r}, {self.entity_id!r})"


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("told command failed: %s", future.exception())


class InProcessEntities:
    """Hosts entities in this process, on the given storage."""

    def __init__(
        self,
        storage: Storage,
        entities: Iterable[EntityClass],
        *,
        max_batch: int = 1000,
        owns_storage: bool = False,
    ) -> None:
        self.storage = storage
        self.processor = EntityProcessor(entities, storage.journal, storage.snapshots)
        self.max_batch = max_batch
        self._owns_storage = owns_storage
        self._queue: list[tuple[Request, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    def ref_for(
        self, entity: type[PersistentEntity[C, Any, Any]] | str, entity_id: str
    ) -> EntityRef[C]:
        type_name = entity if isinstance(entity, str) else entity.type_name
        self.processor.entity_class(type_name)  # fail fast on an unknown entity
        return EntityRef(self, type_name, str(entity_id))

    def _submit(self, request: Request) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("these entities are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        # Yield once so every ask made in this tick of the loop joins the batch.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                results = await self.processor.process([req for req, _ in batch])
            except Exception as e:  # a bug or an unexpected failure: answer everyone
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if result.error is not None:
                    future.set_exception(result.error)
                else:
                    future.set_result(result.reply)

    async def close(self) -> None:
        """Finish the asks already made, then release the storage if this object opened it."""
        self._closed = True
        if self._flusher is not None:
            await self._flusher
        if self._owns_storage:
            await self.storage.close()

    async def __aenter__(self) -> InProcessEntities:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_in_process(
    *,
    entities: Iterable[EntityClass],
    journal_url: str | None = None,
    max_batch: int = 1000,
    **journal_settings: Any,
) -> InProcessEntities:
    """Open the journal (``journal_url``, else ``LAGOMPY_JOURNAL_URL``, else ``./lagompy.db``)
    and host ``entities`` in this process."""
    entity_list = list(entities)
    storage = await open_storage(journal_url, entities=entity_list, **journal_settings)
    return InProcessEntities(storage, entity_list, max_batch=max_batch, owns_storage=True)
