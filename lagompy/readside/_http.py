"""The read side's status over HTTP: an ``APIRouter`` a service mounts.

::

    projections = await open_projections(journal_url=url)
    app.include_router(readside_router(projections))     # GET /readside, GET /readside/{name}

Each entry is :meth:`WorkerStatus.to_dict <lagompy.readside.WorkerStatus.to_dict>`: processor,
tag, state (``failed`` and ``paused`` apart), offset, head offset, lag in events and seconds,
paused, owner, epoch, events/s, skipped events and the failure line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException

from lagompy.errors import ConfigurationError
from lagompy.readside._projections import Projections

__all__ = ["readside_router"]


def readside_router(
    projections: Projections | Callable[[], Projections],
    *,
    prefix: str = "/readside",
    tags: list[str] | None = None,
) -> APIRouter:
    """Routes ``GET {prefix}`` (every processor and tag) and ``GET {prefix}/{processor}`` (one
    processor; 404 if unknown, naming the processor and nothing of the database).
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

    return router
