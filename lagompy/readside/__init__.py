"""Read sides: processors that tail the journal by offset and build SQL projections, exactly once.

You write a :class:`SqlReadSideProcessor`: a ``name`` (its offset key), the ``tag`` (or sharded
tag) it reads, ``entities`` (whose events it decodes), and handlers that write with the SQLAlchemy
async connection they are given::

    class UsersProjection(SqlReadSideProcessor):
        name = "users"
        tag = UserEntity.tag                 # sharded: one worker per tag shard
        entities = (UserEntity,)

        async def global_prepare(self, conn): ...   # CREATE TABLE IF NOT EXISTS ...
        async def handle(self, conn, envelope): ...  # INSERT / UPDATE
        async def reset(self, conn): ...             # DELETE FROM ... (for rebuilds)

    async with start_readside([UsersProjection], journal_url="sqlite:///app.db") as rs:
        ...

The path of an event, module by module:

* ``_processor.py``: what a processor declares (:class:`ReadSideProcessor`) and its SQL hooks
  (:class:`SqlReadSideProcessor`).
* ``_worker.py``: one :class:`ReadSideWorker` per (processor, tag) holds that pair's lease, reads
  the events after its stored offset in pages and commits each batch of handler writes *and*
  the new offset in one transaction, fenced by the lease's epoch (at most one worker per
  (processor, tag), exactly-once effect across crashes); then it waits for new events
  (PostgreSQL's NOTIFY, or a short poll on SQLite) and reads on at once.
* ``_store.py``: the offsets, leases, pause flags and failures in the projection database;
  ``_parked.py``: the events parked by ``on_failure="park"`` (:class:`ParkedEvent`,
  :class:`ParkedFilter`), retried or discarded by operators.
* ``_projections.py``: the workers of this process (:func:`start_readside`), their status
  (:class:`WorkerStatus`) and the operators' actions (:class:`Projections`: pause, resume, skip,
  set an offset, rebuild); ``_settings.py``: :class:`ReadSideSettings`, which all of them read.
* ``_ray.py``: the same workers as detached Ray actors (:func:`start_readside_on_ray`);
  ``_runner.py``: :class:`ReadSideRunner`, what both ways of running workers offer.
* ``_component.py`` and ``_http.py``: a service's part (:class:`ReadSideComponent`: started
  with the service, in ``/health/ready`` and ``/metrics``) and its status route
  (:func:`readside_router`); ``_cli.py``: ``lagompy projections``.

A handler that raises is retried with backoff; after ``max_attempts`` the worker either stops
(``on_failure="stop"``: the row is paused with the failure, ``resume`` retries), skips the event
(``"skip"``: the offset moves past it without its writes) or parks it (``"park"``: the event goes
to the parked table and the offset past it, in one transaction). Every failure is logged with the
processor, tag, offset, entity and sequence number and shows in :meth:`Projections.status`.

The read sides build on :mod:`lagompy.journal`; :mod:`lagompy.service` hosts them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.readside._component import ReadSideComponent
    from lagompy.readside._http import readside_router
    from lagompy.readside._parked import ParkedEvent, ParkedFilter
    from lagompy.readside._processor import ReadSideProcessor, SqlReadSideProcessor
    from lagompy.readside._projections import (
        ConsumerMember,
        Failure,
        Projections,
        ReadSide,
        WorkerStatus,
        open_projections,
        start_readside,
    )
    from lagompy.readside._ray import RayReadSide, start_readside_on_ray, stop_readside_on_ray
    from lagompy.readside._runner import ReadSideRunner
    from lagompy.readside._settings import ReadSideSettings, projection_settings
    from lagompy.readside._worker import ReadSideWorker

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.readside._parked": (
        "ParkedEvent",
        "ParkedFilter",
    ),
    "lagompy.readside._processor": (
        "ReadSideProcessor",
        "SqlReadSideProcessor",
    ),
    "lagompy.readside._projections": (
        "ConsumerMember",
        "Failure",
        "Projections",
        "ReadSide",
        "WorkerStatus",
        "open_projections",
        "start_readside",
    ),
    "lagompy.readside._ray": (
        "RayReadSide",
        "start_readside_on_ray",
        "stop_readside_on_ray",
    ),
    "lagompy.readside._runner": ("ReadSideRunner",),
    "lagompy.readside._settings": (
        "ReadSideSettings",
        "projection_settings",
    ),
    "lagompy.readside._worker": ("ReadSideWorker",),
    "lagompy.readside._component": ("ReadSideComponent",),
    "lagompy.readside._http": ("readside_router",),
}

__all__ = [
    "ConsumerMember",
    "Failure",
    "ParkedEvent",
    "ParkedFilter",
    "Projections",
    "RayReadSide",
    "ReadSide",
    "ReadSideComponent",
    "ReadSideProcessor",
    "ReadSideRunner",
    "ReadSideSettings",
    "ReadSideWorker",
    "SqlReadSideProcessor",
    "WorkerStatus",
    "open_projections",
    "projection_settings",
    "readside_router",
    "start_readside",
    "start_readside_on_ray",
    "stop_readside_on_ray",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
