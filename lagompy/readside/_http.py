"""The read side's status over HTTP: an ``APIRouter`` a service mounts.

::

    projections = await open_projections(journal_url=url)
    app.include_router(readside_router(projections))     # GET /readside, GET /readside/{name}

Each entry is :meth:`WorkerStatus.to_dict <lagompy.readside.WorkerStatus.to_dict>`: processor,
tag, state (``failed`` and ``paused`` apart), offset, head offset, lag in events and seconds,
paused, owner, epoch, events/s, skipped events, parked events and the failure line.
``GET {prefix}/{processor}/members`` lists the processes running the processor and the tags
each holds (:meth:`ConsumerMember.to_dict <lagompy.readside.ConsumerMember.to_dict>`).
``GET {prefix}/{processor}/parked`` lists the processor's parked events (read only: retrying
and discarding them are operators' actions, authorised and audited by the console's action
route, or the ``lagompy projections retry|discard`` commands).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query

from lagompy.errors import ConfigurationError
from lagompy.journal._journal import MAX_POSITION
from lagompy.readside._parked import MAX_LIST, ParkedFilter
from lagompy.readside._projections import Projections

__all__ = ["readside_router"]


def readside_router(
    projections: Projections | Callable[[], Projections],
    *,
    prefix: str = "/readside",
    tags: list[str] | None = None,
) -> APIRouter:
    """Routes ``GET {prefix}`` (every processor and tag), ``GET {prefix}/{processor}`` (one
    processor; 404 if unknown, naming the processor and nothing of the database), ``GET
    {prefix}/{processor}/members`` (the processes running it, and the tags each holds) and
    ``GET {prefix}/{processor}/parked?tag=&error=&entity=&limit=100&after=0`` (its parked events,
    oldest first, and how many match: ``{"total", "parked"}``).
    ``projections`` may be a callable, called per request (for a
    :class:`~lagompy.readside.Projections` opened in the service's lifespan)."""
    router = APIRouter(prefix=prefix, tags=list(tags or ["read side"]))

    def current() -> Projections:
        return projections if isinstance(projections, Projections) else projections()

    @router.get("", summary="Status of every read-side processor and tag")
    async def all_status() -> list[dict[str, Any]]:
        return [s.to_dict() for s in await current().status()]

    @router.get("/{processor}", summary="Status of one read-side processor's tags")
    async def one_status(processor: str) -> list[dict[str, Any]]:
        try:
            return [s.to_dict() for s in await current().status(processor)]
        except ConfigurationError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @router.get(
        "/{processor}/members",
        summary="The processes running one read-side processor, and the tags each holds",
    )
    async def members(processor: str) -> list[dict[str, Any]]:
        projections = current()
        try:
            await projections.status(processor)  # 404 for an unknown processor
        except ConfigurationError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        return [m.to_dict() for m in await projections.members(processor)]

    @router.get("/{processor}/parked", summary="Parked events of one read-side processor")
    async def parked(
        processor: str,
        tag: str | None = Query(default=None, max_length=255),
        error: str | None = Query(default=None, max_length=255),
        entity: str | None = Query(default=None, max_length=255),
        limit: int = Query(default=100, ge=1, le=MAX_LIST),
        after: int = Query(default=0, ge=0, le=MAX_POSITION),
    ) -> dict[str, Any]:
        projections = current()
        try:
            await projections.status(processor)  # 404 for an unknown processor
        except ConfigurationError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        which = ParkedFilter(
            consumer=processor, tag=tag or None, error_class=error or None, entity=entity or None
        )
        rows = await projections.parked(which, limit=limit, after_id=after)
        return {
            "total": await projections.count_parked(which),
            "parked": [r.to_dict() for r in rows],
        }

    return router
