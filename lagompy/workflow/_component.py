"""Workflows as a part of a service: :class:`WorkflowsComponent` runs an executor with the
service and offers the operations (:attr:`engine`)::

    workflows_component = WorkflowsComponent(workflows)
    service = Service(name="bank", entities=[AccountEntity, WorkflowRun],
                      journal_settings=journal, components=[workflows_component])

    # in a route:
    run = await workflows_component.engine.start("transfer", request, id=transfer_id)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lagompy.errors import ConfigurationError
from lagompy.settings import JournalSettings
from lagompy.workflow._engine import WorkflowEngine, start_workflows
from lagompy.workflow._executor import WorkflowSettings
from lagompy.workflow._metrics import workflow_samples
from lagompy.workflow._registry import Workflows

if TYPE_CHECKING:
    from lagompy.service._metrics import Sample
    from lagompy.service._service import Service

__all__ = ["WorkflowsComponent"]

log = logging.getLogger("lagompy.workflow")


class WorkflowsComponent:
    """Starts the workflow executor with the service (its runtime must host ``WorkflowRun``)
    and stops it with the service; :attr:`engine` holds the operations once started.
    ``journal_settings``: where the runs index lives (default: the service's journal)."""

    name = "workflows"

    def __init__(
        self,
        workflows: Workflows,
        *,
        journal_settings: JournalSettings | None = None,
        settings: WorkflowSettings | None = None,
        executor: bool = True,
        routes: bool = True,
        prefix: str = "/workflows",
        route_dependencies: Sequence[Any] = (),
    ) -> None:
        self.workflows = workflows
        self.journal_settings = journal_settings
        self.settings = settings
        self.executor = executor
        self._service: Service | None = None
        self._engine: WorkflowEngine | None = None
        #: The operations over HTTP (``_http.py``; ``routes=False``: none), each route with
        #: ``route_dependencies`` (FastAPI ``Depends(...)``: the app's authentication).
        if routes:
            from lagompy.workflow._http import workflows_router  # (FastAPI: not for the CLI)

            if not route_dependencies:
                log.warning(
                    "the workflow routes under %s take no authentication: whoever reaches "
                    "this service can start, cancel, resume, retry and signal runs and pause "
                    "workflows; pass route_dependencies=[Depends(<your check>)] (or "
                    "routes=False) unless something in front of the service guards them",
                    prefix,
                )

            self.router = workflows_router(
                lambda: self.engine, prefix=prefix, dependencies=route_dependencies
            )

    def bind(self, service: Service) -> None:
        """Called by the service before :meth:`start`: the runtime and journal to use."""
        self._service = service

    @property
    def engine(self) -> WorkflowEngine:
        if self._engine is None:
            raise ConfigurationError("the workflows component is not started")
        return self._engine

    async def start(self) -> None:
        service = self._service
        if service is None:
            raise ConfigurationError(
                "WorkflowsComponent needs its service: pass it in Service(components=[...])"
            )
        journal = self.journal_settings or service.journal_settings
        self._engine = await start_workflows(
            self.workflows,
            runtime=service.entities,
            journal_settings=journal,
            settings=self.settings,
            executor=self.executor,
        )

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    async def ready(self) -> bool | str:
        return self._engine is not None or "not started"

    async def metric_samples(self) -> list[Sample]:
        """Per workflow: runs per status, started, paused; per step: recorded, failed,
        seconds (``_metrics.py``)."""
        return [] if self._engine is None else await workflow_samples(self._engine)
