"""Entities hosted in the calling process, without Ray: for scripts, unit tests and small tools.

Asks are micro-batched exactly like the sharded runtime does it: asks made in the same tick of
the event loop are processed as one batch, and the events of all their entities are committed in
one journal transaction. One batch runs at a time, so each entity has a single writer.

::

    async with start_in_process(entities=[UserEntity], journal_url="sqlite:///u.db") as entities:
        user = await entities.ref_for(UserEntity, "42").ask(RegisterUser("Ada", "ada@example.org"))

A journal placed on several databases (``JournalSettings.databases``) works as on the shard
hosts: each entity is written to, and recovered from, the database of its slice, and a batch's
parts for several databases commit side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from sqlalchemy import text

from lagompy.closing import AsyncClosing, opener
from lagompy.entity import PersistentEntity
from lagompy.errors import ConfigurationError, Overloaded
from lagompy.journal._placement import HOME
from lagompy.journal._storage import PlacedStorage, Storage
from lagompy.runtime._defaults import runtime_default
from lagompy.runtime._loading import EntityClass
from lagompy.runtime._placed import (
    open_entity_storage,
    processor_for,
)
from lagompy.runtime._processing import Request
from lagompy.runtime._refs import EntityRef
from lagompy.settings import JournalSettings, make_settings

log = logging.getLogger("lagompy.in_process")

R = TypeVar("R")
C = TypeVar("C")

#: The passivation sweep runs every ``idle_timeout / 4`` seconds, but not more often than this.
MIN_PASSIVATE_INTERVAL = 0.05


class InProcessEntities(AsyncClosing):
    """Hosts entities in this process, on the given storage (one database's, or a
    :class:`~lagompy.journal._storage.PlacedStorage` for a journal placed on several).

    Settings (keyword arguments; their defaults are those of
    :class:`~lagompy.settings.RuntimeSettings`):

    ``max_batch`` (1000)
        Most asks processed as one batch (one journal transaction).
    ``max_entities`` (100,000; None: no bound)
        Most entities kept in memory; after each batch the least recently used beyond it are
        passivated (dropped from memory; their next command recovers them from the journal).
    ``idle_timeout`` (600 s; None: never)
        Entities without a command for this long are passivated, by a background sweep every
        ``idle_timeout / 4`` seconds (at least 0.05 s) that runs while these entities are open,
        whether or not asks arrive.
    ``conflict_retries`` (2)
        When the journal refuses a write because another writer appended to the entity first,
        the entity reloads and the refused commands run again on its new state, up to this many
        times; then they get ``ConcurrencyConflict``.
    ``max_pending`` (10,000)
        Most asks outstanding (queued or being processed); beyond it ``ask`` and ``tell`` raise
        ``Overloaded`` at once and the command is not run.
    """

    #: ``/health/ready`` names the check "journal": entities in this process need nothing else.
    check_name = "journal"

    def __init__(
        self,
        storage: Storage | PlacedStorage,
        entities: Iterable[EntityClass],
        *,
        max_batch: int = runtime_default("max_batch"),
        max_entities: int | None = runtime_default("max_entities"),
        idle_timeout: float | None = runtime_default("idle_timeout"),
        conflict_retries: int = runtime_default("conflict_retries"),
        max_pending: int = runtime_default("max_pending"),
        owns_storage: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ConfigurationError(f"max_batch must be at least 1, got {max_batch}")
        if max_pending < 1:
            raise ConfigurationError(f"max_pending must be at least 1, got {max_pending}")
        #: Every database's storage (one :class:`Storage`, or a placed journal's).
        self.placed_storage = storage
        #: The journal's storage: the home database's when it is placed on several.
        self.storage: Storage = storage.parts[HOME]
        self.processor = processor_for(
            entities,
            storage,
            max_entities=max_entities,
            idle_timeout=idle_timeout,
            conflict_retries=conflict_retries,
        )
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._owns_storage = owns_storage
        self._queue: list[tuple[Request, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._flusher: asyncio.Task[None] | None = None
        self._passivator: asyncio.Task[None] | None = None
        self._closed = False

    def ref_for(
        self, entity: type[PersistentEntity[C, Any, Any]] | str, entity_id: str
    ) -> EntityRef[C]:
        """A ref to the entity ``entity_id`` of this type. Raises ``InvalidEntityId`` (a
        ``ValueError``) for an id that is not a ``str`` of 1 to 255 characters without NUL or
        lone surrogates (other types are refused, never turned into text), and
        ``ConfigurationError`` for an entity type that is not registered."""
        type_name = entity if isinstance(entity, str) else entity.type_name
        self.processor.entity_class(type_name)  # fail fast on an unknown entity
        return EntityRef(self._submit, type_name, entity_id)

    @property
    def pending(self) -> int:
        """Asks outstanding: queued, or in the batch being processed."""
        return len(self._queue) + self._in_flight

    def _submit(self, request: Request) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("these entities are closed")
        if self.pending >= self.max_pending:
            raise Overloaded(
                f"{self.pending} asks are outstanding, the limit (max_pending) is "
                f"{self.max_pending}: {type(request.command).__qualname__} for "
                f"{request.entity_type}/{request.entity_id} was not run; retry later"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        if self._passivator is None and self.processor.idle_timeout is not None:
            self._passivator = loop.create_task(self._passivate_idle_entities())
        return future

    async def _flush(self) -> None:
        # Yield once so every ask made in this tick of the loop joins the batch.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            # An ask that timed out before its batch left the queue is not run at all.
            batch = [(req, future) for req, future in batch if not future.done()]
            if not batch:
                continue
            self._in_flight = len(batch)
            try:
                results = await self.processor.process([req for req, _ in batch])
            except Exception as e:  # a bug or an unexpected failure: answer everyone
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:
                self._in_flight = 0
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if result.error is not None:
                    future.set_exception(result.error)
                else:
                    future.set_result(result.reply)

    async def _passivate_idle_entities(self) -> None:
        timeout = self.processor.idle_timeout
        assert timeout is not None
        interval = max(timeout / 4, MIN_PASSIVATE_INTERVAL)
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                passivated = self.processor.passivate_idle()
            except Exception:  # never let the sweep die silently
                log.exception("passivating idle entities failed")
            else:
                if passivated:
                    log.debug("passivated %d idle entities", passivated)

    def stats(self) -> dict[str, int | float]:
        """The processor's counters (see :meth:`EntityProcessor.stats`) plus ``pending``."""
        counters = self.processor.stats()
        counters["pending"] = self.pending
        return counters

    async def host_stats(self, *, require_journal: bool = True) -> list[dict[str, Any]]:
        """:meth:`stats` as the one host of these entities (no ``index``: ``/metrics`` labels
        it ``host="local"``). ``require_journal`` is for the sharded runtime's hosts: this
        process's journal is checked by :meth:`check`."""
        return [dict(self.stats())]

    @property
    def local_journal(self) -> JournalSettings:
        """The settings of the journal these entities write (all its databases)."""
        return self.placed_storage.settings

    async def check(self) -> None:
        """Return when each database of the journal answers (raise the first error if not)."""
        for part in self.placed_storage.parts.values():
            async with part.database.read() as conn:
                await conn.execute(text("SELECT 1"))

    async def close(self, *, shutdown: bool = False) -> None:
        """Finish the asks already made, stop the passivation sweep, then release the storage
        if this object opened it. The entities run in this process, so they stop here
        whatever ``shutdown`` says (it is for the sharded runtime's shard hosts)."""
        self._closed = True
        if self._flusher is not None:
            await self._flusher
        if self._passivator is not None:
            self._passivator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._passivator
        if self._owns_storage:
            await self.placed_storage.close()


@opener
async def start_in_process(
    *,
    entities: Iterable[EntityClass],
    journal_url: str | None = None,
    max_batch: int = runtime_default("max_batch"),
    max_entities: int | None = runtime_default("max_entities"),
    idle_timeout: float | None = runtime_default("idle_timeout"),
    conflict_retries: int = runtime_default("conflict_retries"),
    max_pending: int = runtime_default("max_pending"),
    **journal_settings: Any,
) -> InProcessEntities:
    """Open the journal (``journal_url``, else ``LAGOMPY_JOURNAL_URL``, else ``./lagompy.db``;
    every database of it when it is placed on several) and host ``entities`` in this process
    (settings: see :class:`InProcessEntities`). ``journal_settings``: a ``settings``
    (:class:`~lagompy.settings.JournalSettings`) and keyword fields of it, combined by
    :func:`~lagompy.settings.make_settings`."""
    entity_list = list(entities)
    base = journal_settings.pop("settings", None)
    if journal_url is not None:
        journal_settings["url"] = journal_url
    settings = make_settings(JournalSettings, base, **journal_settings)
    storage = await open_entity_storage(entity_list, settings)
    try:
        return InProcessEntities(
            storage,
            entity_list,
            max_batch=max_batch,
            max_entities=max_entities,
            idle_timeout=idle_timeout,
            conflict_retries=conflict_retries,
            max_pending=max_pending,
            owns_storage=True,
        )
    except BaseException:
        await storage.close()
        raise
