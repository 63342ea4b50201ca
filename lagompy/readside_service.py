"""Read-side workers as a part of a service: started and stopped with it, their status route
mounted, their lag in ``/metrics`` and their health in ``/health/ready``::

    readside = ReadSideComponent([UsersProjection], journal_settings=journal)
    service = Service(name="users", entities=[UserEntity], journal_settings=journal,
                      components=[readside])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)            # also mounts GET /readside and GET /readside/{processor}

    async with readside.projection.read() as conn:      # in a route: query the projection
        ...

The workers run in the service's process (``ray=False``, the default: one asyncio task per
(processor, tag)) or as detached actors on Ray (``ray=True``, :mod:`lagompy.readside_ray`).
Either way the leases of the offset store keep one worker per (processor, tag): with several
service processes, one holds each lease and the others stand by.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, HTTPException

from lagompy.database import Database
from lagompy.metrics import Sample
from lagompy.readside import (
    Projections,
    ReadSide,
    ReadSideSettings,
    SqlReadSideProcessor,
    start_readside,
)
from lagompy.readside_http import readside_router
from lagompy.readside_ray import RayReadSide, start_readside_on_ray
from lagompy.settings import JournalSettings

__all__ = ["ReadSideComponent"]

#: Pulled at scrape time, per (processor, tag): name -> (WorkerStatus field, help).
LAG_METRICS: dict[str, tuple[str, str]] = {
    "lagompy_readside_lag_events": (
        "lag_events",
        "Events of the tag in the journal that the read-side processor has not handled yet.",
    ),
    "lagompy_readside_lag_seconds": (
        "lag_seconds",
        "Age in seconds of the oldest event the read-side processor has not handled yet.",
    ),
    "lagompy_readside_offset": (
        "offset",
        "The journal offset up to which the read-side processor has handled the tag.",
    ),
}


class ReadSideComponent:
    """A :class:`~lagompy.service.Component` that runs read-side processors with a service.

    ``journal_settings`` (default: from the environment, like ``Service``'s) name the journal
    the workers read; the projections live in the same database unless ``settings.url`` (or
    ``url=``) names another. ``app`` is the Ray namespace's app name (``ray=True`` only);
    ``stop_on_close=True`` stops the Ray workers when the service stops (by default they run on
    for the next start, like the shard hosts). Other keyword arguments set fields of
    :class:`~lagompy.readside.ReadSideSettings`."""

    name = "readside"

    def __init__(
        self,
        processors: Iterable[type[SqlReadSideProcessor]],
        *,
        journal_settings: JournalSettings | None = None,
        ray: bool = False,
        app: str = "default",
        stop_on_close: bool = False,
        prefix: str = "/readside",
        settings: ReadSideSettings | None = None,
        **overrides: Any,
    ) -> None:
        self.processors = list(processors)
        self.journal_settings = journal_settings
        self.ray = ray
        self.app = app
        self.stop_on_close = stop_on_close
        self.settings = settings
        self.overrides = overrides
        self._running: ReadSide | RayReadSide | None = None
        #: ``GET {prefix}`` and ``GET {prefix}/{processor}``, out of the OpenAPI schema like
        #: the service's other status routes.
        self.router = APIRouter()
        self.router.include_router(
            readside_router(self._projections, prefix=prefix), include_in_schema=False
        )

    def _projections(self) -> Projections:
        if self._running is None:
            raise HTTPException(status_code=503, detail="the read side is not running")
        return self._running.projections

    @property
    def projection(self) -> Database:
        """The projection database (to query the projections), once started."""
        return self._projections().projection

    async def start(self) -> None:
        journal = self.journal_settings or JournalSettings(**{})
        if self.ray:
            self._running = await start_readside_on_ray(
                self.processors,
                app=self.app,
                journal_settings=journal,
                settings=self.settings,
                **self.overrides,
            )
        else:
            self._running = await start_readside(
                self.processors, journal_settings=journal, settings=self.settings, **self.overrides
            )

    async def stop(self) -> None:
        running, self._running = self._running, None
        if isinstance(running, RayReadSide):
            await running.close(stop=self.stop_on_close)
        elif running is not None:
            await running.close()

    async def wait_until_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until every worker has handled the events its tag had when called."""
        if self._running is None:
            raise RuntimeError("the read side is not running")
        await self._running.wait_until_caught_up(timeout)

    async def ready(self) -> bool:
        """Ready while the projection database answers and no worker is stopped by a failing
        handler (a worker that stands by for another process's lease is fine)."""
        statuses = await self._projections().status()
        return not any(s.state == "failed" for s in statuses)

    async def metric_samples(self) -> list[Sample]:
        """Lag in events and seconds, and the offset, of every (processor, tag)."""
        if self._running is None:
            return []
        wanted = {p.name for p in self.processors}
        return _lag_samples([s for s in await self._running.status() if s.processor in wanted])


def _lag_samples(statuses: Sequence[Any]) -> list[Sample]:
    samples: list[Sample] = []
    for status in statuses:
        labels = {"processor": status.processor, "tag": status.tag}
        for name, (field, help_text) in LAG_METRICS.items():
            value = getattr(status, field)
            if value is not None:
                samples.append((name, help_text, "gauge", labels, float(value)))
    return samples
