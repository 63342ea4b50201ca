"""Read-side workers on Ray: one named, detached actor per (app, processor, tag), replaced when
it dies.

::

    readside = await start_readside_on_ray([UsersProjection], app="users", journal_url=url)
    await readside.wait_until_caught_up()
    print(await readside.status())
    await readside.close()                    # detach; the workers go on running
    await stop_readside_on_ray("users")       # stop them (they release their leases)

The actors live in the app's Ray namespace (``lagompy-<app>``, beside its shard hosts) under the
names ``readside:<processor>:<tag>`` (on a journal placed on several databases, one per partition:
``readside:<processor>:<tag>@<database>`` for each database but the home one, each actor opening its
own database of the journal alone), with ``max_restarts=-1``: Ray restarts a worker whose process
died, and the restarted worker (same name, hence same lease owner) takes its lease back at once and
resumes after the stored offset. An actor killed for good is created again by
:meth:`RayReadSide.ensure` (which the handle runs every ``supervise_interval`` seconds) or by the
next :func:`start_readside_on_ray`. Two copies of a worker can briefly coexist after a node failure:
the lease epoch keeps the stale one from committing. ``global_prepare`` runs in the calling process,
under the processor's lease, before any worker starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lagompy._collector import collector_state, tune_collector
from lagompy.closing import opener
from lagompy.errors import ConfigurationError
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.readside._processor import SqlReadSideProcessor, serializer_for_processors
from lagompy.readside._projections import Projections, WorkerStatus
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import (
    ReadSideSettings,
    _journal_settings,
    _settings,
    projection_settings,
)
from lagompy.readside._worker import (
    Partition,
    ReadSideWorker,
    partitions_of,
    run_global_prepare,
)
from lagompy.runtime._defaults import runtime_default
from lagompy.runtime._loading import check_importable, resolve_class
from lagompy.runtime._ray_cluster import (
    ActorLoop,
    SupervisedActors,
    actor_journal,
    actor_runtime_env,
    attach,
    namespace_of,
    release,
    start_named_actors,
    stop_actors,
)
from lagompy.settings import JournalSettings, RuntimeSettings, make_settings
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema

log = logging.getLogger("lagompy.readside_ray")

__all__ = [
    "RayReadSide",
    "ReadSideWorkerActor",
    "actor_name",
    "start_readside_on_ray",
    "stop_readside_on_ray",
]

ACTOR_PREFIX = "readside:"


def actor_name(processor: str, tag: str) -> str:
    return f"{ACTOR_PREFIX}{processor}:{tag}"


class ReadSideWorkerActor:
    """A :class:`~lagompy.readside.ReadSideWorker` in an actor process, on an event loop of its
    own (a thread), started in ``__init__`` so that a restart by Ray restarts the worker."""

    def __init__(
        self,
        processor_path: str,
        tag: str,
        journal: dict[str, Any],
        readside: dict[str, Any],
        owner: str,
        database: str = HOME,
    ) -> None:
        cls = resolve_class(processor_path)
        self.processor: SqlReadSideProcessor = cls()
        self._actor_loop = ActorLoop("lagompy-readside")
        self.worker: ReadSideWorker = self._call(
            self._open(
                JournalSettings(**journal), ReadSideSettings(**readside), tag, owner, database
            )
        )
        self._running: concurrent.futures.Future[None] = self._actor_loop.submit(self.worker.run())
        tune_collector()  # a process of its own, opened: see lagompy/_collector.py

    def _call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        return self._actor_loop.call(coroutine, timeout)

    async def _open(
        self,
        journal: JournalSettings,
        settings: ReadSideSettings,
        tag: str,
        owner: str,
        database: str,
    ) -> ReadSideWorker:
        """The worker of ``tag`` on ``database`` of the journal, which it opens alone; the
        projection database is the one of the whole journal's settings (the home one's by
        default)."""
        from lagompy.journal._storage import open_storage

        serializer = serializer_for_processors([self.processor])
        placement = Placement.of(journal)
        self._storage = await open_storage(
            settings=placement.settings_of(database), serializer=serializer
        )
        self._projection = Database.create(projection_settings(journal, settings))
        await ensure_schema(self._projection)
        return ReadSideWorker(
            self.processor,
            partition_key(tag, database),
            journal=self._storage.journal,
            projection=self._projection,
            settings=settings,
            owner=owner,
            journal_tag=tag,
        )

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "owner": self.worker.owner, "collector": collector_state()}

    def status(self) -> dict[str, Any]:
        w = self.worker
        error = None
        if self._running.done() and not self._running.cancelled():
            failure = self._running.exception()
            error = None if failure is None else repr(failure)
        return {
            "processor": w.name,
            "tag": w.tag,
            "journal_tag": w.journal_tag,
            "owner": w.owner,
            "pid": os.getpid(),
            "state": w.state,
            "offset": w.offset,
            "events_handled": w.events_handled,
            "transactions": w.transactions,
            "failures": w.failures,
            "last_error": w.last_error or error,
            "events_per_s": w.events_per_s,
        }

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker (it releases its lease; its current transaction gets ``timeout``
        seconds, default ``RuntimeSettings.stop_timeout``) and close its connections."""
        self._call(self.worker.stop())
        with contextlib.suppress(Exception):
            self._running.result(runtime_default("stop_timeout") if timeout is None else timeout)
        self._call(self._close())

    def close(self) -> None:
        """:meth:`stop`: what every actor of an app answers before it is stopped
        (``shutdown_app``, :func:`stop_readside_on_ray`), so its lease is free at once."""
        self.stop()

    async def _close(self) -> None:
        await self._projection.dispose()
        await self._storage.close()


class RayReadSide(SupervisedActors):
    """The read-side workers of some processors on Ray, as seen from this process."""

    kind = "read-side worker"

    def __init__(
        self,
        app: str,
        specs: list[tuple[str, str, str]],
        creators: dict[str, Callable[[], Any]],
        projections: Projections,
        *,
        owns_ray: bool,
        supervise_interval: float | None,
    ) -> None:
        super().__init__(app, creators, owns_ray=owns_ray, supervise_interval=supervise_interval)
        #: (processor name, partition key, actor name) of every worker.
        self.specs = specs
        self.projections = projections

    async def worker_stats(self) -> list[dict[str, Any]]:
        """What each worker actor reports from memory (state, offset, events handled...)."""
        handles = self.handles()
        results = await asyncio.gather(
            *(h.status.remote() for h in handles.values()), return_exceptions=True
        )
        return [
            r if not isinstance(r, BaseException) else {"actor": n, "error": repr(r)}
            for n, r in zip(handles, results, strict=True)
        ]

    async def status(self, processor: str | None = None) -> list[WorkerStatus]:
        return await self.projections.status(processor)

    def problems(self) -> list[str]:
        """Nothing beyond what the projection database shows: each worker actor records its
        state there (a replaced actor is the supervisor's job)."""
        return []

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every worker's stored offset reaches its partition's head (its tag's in
        its database) at the time of the call (``TimeoutError`` after ``timeout`` seconds)."""
        ours = {(p, t) for p, t, _ in self.specs}
        targets = {
            (s.processor, s.tag): s.head_offset or 0
            for s in await self.projections.status()
            if (s.processor, s.tag) in ours
        }
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.projections.store.rows()
                offsets = {(r.processor, r.tag): r.offset for r in rows}
                if all(offsets.get(k, 0) >= head for k, head in targets.items()):
                    return
                await asyncio.sleep(0.02)

    async def close(self, *, stop: bool = False) -> None:
        """Detach from the workers (they go on running); ``stop=True`` stops them first
        (each releases its lease)."""
        if not await self._detach():
            return
        if stop:
            await stop_readside_on_ray(self.app, [p for p, _, _ in self.specs])
        await self.projections.close()
        self._release_ray()


@opener
async def start_readside_on_ray(
    processors: Iterable[type[SqlReadSideProcessor]],
    *,
    app: str = "default",
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    runtime_settings: RuntimeSettings | None = None,
    supervise_interval: float | None = 5.0,
    start_timeout: float | None = None,
    **overrides: Any,
) -> RayReadSide:
    """Run ``global_prepare`` of each processor here, then get or create one worker actor per
    (processor, tag) in the app's namespace (per (processor, tag, database) on a journal
    placed on several databases), and wait until they answer. They get
    ``start_timeout`` seconds (None: ``runtime_settings.start_timeout``). Processor classes
    must be importable by module name in Ray's workers (not defined in ``__main__``); each
    worker decodes events with the processor's ``entities`` and ``event_types``."""
    classes = list(processors)
    if not classes:
        raise ConfigurationError("start_readside_on_ray() needs at least one processor class")
    paths = []
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, SqlReadSideProcessor)):
            raise ConfigurationError(
                f"start_readside_on_ray() takes SqlReadSideProcessor classes, got {cls!r}"
            )
        cls.validate()
        paths.append(check_importable(cls, "read-side processor class"))
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"two read-side processors share a name: {sorted(names)}")
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    instances = [cls() for cls in classes]
    serializer_for_processors(instances)  # fail here, not in the actors
    placement = Placement.of(journal_settings)
    parts = {p.name: partitions_of(p, placement) for p in instances}
    projection = Database.create(projection_settings(journal_settings, settings))
    journals = {name: Database.create(placement.settings_of(name)) for name in placement.names}
    projections = Projections(
        projection,
        journals[HOME],
        settings=settings,
        owns=[projection, *journals.values()],
        placement=placement if placement.several else None,
        journals={name: db for name, db in journals.items() if name != HOME},
    )
    try:
        await ensure_schema(projection)
        for p in instances:
            keys = [part.key for part in parts[p.name]]
            await run_global_prepare(
                p, projection, settings, timeout=settings.prepare_timeout, keys=keys
            )
    except BaseException:
        await projections.close()
        raise

    runtime_settings = runtime_settings or RuntimeSettings()
    if start_timeout is None:
        start_timeout = runtime_settings.start_timeout
    owns_ray = attach(runtime_settings)
    try:
        import ray

        namespace = namespace_of(app)
        journal = actor_journal(journal_settings)
        readside = settings.model_dump()
        runtime_env = actor_runtime_env([*classes, *(e for c in classes for e in c.entities)])
        by_name = {c.name: path for c, path in zip(classes, paths, strict=True)}
        actor_cls: Any = ray.remote(ReadSideWorkerActor)

        def create(processor: str, part: Partition) -> Any:
            name = actor_name(processor, part.key)
            return actor_cls.options(
                name=name,
                namespace=namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=0,
                num_cpus=0,
                runtime_env=runtime_env,
            ).remote(
                by_name[processor], part.tag, journal, readside, f"ray:{app}/{name}", part.database
            )

        specs = []
        creators: dict[str, Callable[[], Any]] = {}
        for c in classes:
            for part in parts[c.name]:
                name = actor_name(c.name, part.key)
                specs.append((c.name, part.key, name))
                creators[name] = functools.partial(create, c.name, part)
        await start_named_actors(
            app,
            creators,
            start_timeout,
            "read-side worker",
            lambda _: stop_readside_on_ray(app, names),
        )
    except BaseException:
        await projections.close()
        if owns_ray:
            release()
        raise
    return RayReadSide(
        app,
        specs,
        creators,
        projections,
        owns_ray=owns_ray,
        supervise_interval=supervise_interval,
    )


async def stop_readside_on_ray(
    app: str, processors: Sequence[str] | None = None, *, timeout: float | None = None
) -> int:
    """Stop the read-side worker actors of ``app`` (of the named processors, or all): each
    releases its lease (within ``timeout`` seconds; default: ``RuntimeSettings.stop_timeout``),
    then the actor is killed. Returns how many were stopped."""
    prefixes = [ACTOR_PREFIX] if processors is None else [f"{ACTOR_PREFIX}{p}:" for p in processors]
    if timeout is None:
        timeout = make_settings(RuntimeSettings).stop_timeout
    return await stop_actors(app, timeout, lambda name: any(name.startswith(p) for p in prefixes))
