"""Read-side workers as a part of a service: started and stopped with it, their status route
mounted, their lag in ``/metrics`` and their health in ``/health/ready``::

    readside = ReadSideComponent([UsersProjection], journal_settings=journal)
    service = Service(name="users", entities=[UserEntity], journal_settings=journal,
                      components=[readside])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)            # also mounts GET /readside and GET /readside/{processor}

    async with readside.projection.read() as conn:      # in a route: query the projection
        ...

``/health/ready`` fails while a worker of these processors is ``failed`` (stopped by an event
it could not get past) or ``stalled``, naming the processor, tag, offset and error; ``/metrics``
also carries ``lagompy_readside_paused``, ``lagompy_readside_failed`` and
``lagompy_readside_state``, so that an operator's pause and a failure-stop look different.

The workers run in the service's process (``ray=False``, the default: one asyncio task per
(processor, tag)) or as detached actors on Ray (``ray=True``, ``_ray.py``).
Either way the leases of the offset store keep one worker per (processor, tag): with several
service processes, one holds each lease and the others stand by.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

from lagompy.readside._http import readside_router
from lagompy.readside._processor import SqlReadSideProcessor
from lagompy.readside._projections import (
    STUCK_STATES,
    Projections,
    WorkerStatus,
    start_readside,
)
from lagompy.readside._ray import start_readside_on_ray
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT, ReadSideRunner
from lagompy.readside._settings import ReadSideSettings
from lagompy.settings import JournalSettings
from lagompy.sql._database import Database

if TYPE_CHECKING:  # the service's type of a metric sample: the read side does not import it
    from lagompy.service._metrics import Sample

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
    "lagompy_readside_parked": (
        "parked",
        "Events of the tag the read-side processor parked (on_failure park) and that are not "
        "retried or discarded yet.",
    ),
}
#: (name, help) of the flags and the state, per (processor, tag).
PAUSED_METRIC = (
    "lagompy_readside_paused",
    "1 while an operator has paused the read-side processor's tag, else 0.",
)
FAILED_METRIC = (
    "lagompy_readside_failed",
    "1 while the read-side processor's worker of the tag makes no progress: stopped by an "
    "event it could not get past (state failed, until resumed or skipped) or stalled "
    "(retrying something that keeps failing), else 0.",
)
STATE_METRIC = (
    "lagompy_readside_state",
    "1 for the current state of the read-side processor's tag (label state: running, paused, "
    "failed, stalled, stopped...).",
)


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
        self._running: ReadSideRunner | None = None
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
        journal = self.journal_settings or JournalSettings()
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
        if running is not None:
            await running.close(stop=self.stop_on_close)

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every worker has handled the events its tag had when called."""
        if self._running is None:
            raise RuntimeError("the read side is not running")
        await self._running.wait_until_caught_up(timeout)

    async def ready(self) -> bool | str:
        """True while the projection database answers and every worker of these processors
        can make progress; otherwise why not: each (processor, tag) that is ``failed`` (stopped
        by an event it could not get past) or ``stalled`` (retrying something that keeps
        failing), with its offset and error, and a ``global_prepare`` that keeps failing. A
        worker that stands by for another process's lease, or that an operator paused, is
        fine. The same truth whether the workers run here or on Ray: it is read from the
        projection database."""
        running = self._running
        if running is None:
            return "the read side is not running"
        wanted = {p.name for p in self.processors}
        # States and failure lines only: read without the journal's lag, which costs a query
        # per tag (with 1,600 tags, 2 s: beyond ready_timeout; bench/console_bench.py).
        rows = Projections(running.projections.projection, settings=running.projections.settings)
        problems = [
            f"read-side processor {s.processor!r}, tag {s.tag!r}: {s.state} at offset "
            f"{s.offset if s.failure is None else s.failure.offset}"
            + ("" if s.failure is None else f": {s.failure.error}")
            for s in await rows.status()
            if s.processor in wanted and s.state in STUCK_STATES
        ]
        problems += running.problems()
        if not problems:
            return True
        if len(problems) > _READY_PROBLEMS:
            more = len(problems) - _READY_PROBLEMS
            problems = [*problems[:_READY_PROBLEMS], f"and {more} more (see GET /readside)"]
        return "; ".join(p if len(p) <= 600 else p[:597] + "..." for p in problems)

    async def metric_samples(self) -> list[Sample]:
        """Lag in events and seconds, the offset, the pause and failure flags and the state
        of every (processor, tag)."""
        if self._running is None:
            return []
        wanted = {p.name for p in self.processors}
        return _lag_samples([s for s in await self._running.status() if s.processor in wanted])


#: How many stuck workers /health/ready names (the status route has them all).
_READY_PROBLEMS = 5


def _lag_samples(statuses: Sequence[WorkerStatus]) -> list[Sample]:
    samples: list[Sample] = []
    for status in statuses:
        labels = {"processor": status.processor, "tag": status.tag}
        for name, (field, help_text) in LAG_METRICS.items():
            value = getattr(status, field)
            if value is not None:
                samples.append((name, help_text, "gauge", labels, float(value)))
        samples.append(
            (*PAUSED_METRIC, "gauge", labels, 1.0 if status.paused else 0.0),
        )
        samples.append(
            (*FAILED_METRIC, "gauge", labels, 1.0 if status.state in STUCK_STATES else 0.0),
        )
        samples.append((*STATE_METRIC, "gauge", {**labels, "state": status.state}, 1.0))
    return samples
