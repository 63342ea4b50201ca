"""Process managers as a part of a service: started and stopped with it, their commands sent
through the service's entities, their status route mounted, their lag, keys and timers in
``/metrics`` and their health in ``/health/ready``::

    managers = ProcessManagersComponent([Fulfilment])
    service = Service(name="orders", entities=[OrderEntity, PaymentEntity],
                      journal_settings=journal, components=[managers])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)            # also mounts GET /process-managers

``/health/ready`` fails while a partition is ``failed`` (stopped by an event or a timer it
could not get past) or ``stalled``, naming the manager, partition, offset and error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

from lagompy.errors import ConfigurationError
from lagompy.process._manager import RefSource
from lagompy.process._runner import (
    ManagerArg,
    ManagerStatus,
    ProcessManagers,
    _instance,
    start_process_managers,
)
from lagompy.readside._projections import STUCK_STATES, WorkerStatus
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import ReadSideSettings
from lagompy.settings import JournalSettings
from lagompy.topic._component import status_samples
from lagompy.topic._transport import TopicTransport

if TYPE_CHECKING:
    from lagompy.service._metrics import Sample
    from lagompy.service._service import Service

__all__ = ["ProcessManagersComponent"]


class ProcessManagersComponent:
    """A :class:`~lagompy.service.Component` that runs process managers in the service's
    process: their commands go to the service's entities (or ``entities``, an entity runtime),
    their events come from the service's journal (or ``journal_settings``; ``transport``: what
    carries the messages of topic sources, by default that journal). Keyword ``overrides`` set
    fields of :class:`~lagompy.readside.ReadSideSettings`."""

    name = "process-managers"

    def __init__(
        self,
        managers: Iterable[ManagerArg],
        *,
        entities: RefSource | None = None,
        journal_settings: JournalSettings | None = None,
        transport: TopicTransport | None = None,
        prefix: str = "/process-managers",
        settings: ReadSideSettings | None = None,
        **overrides: Any,
    ) -> None:
        self.managers = [_instance(m) for m in managers]
        if not self.managers:
            raise ConfigurationError("ProcessManagersComponent needs at least one process manager")
        self.entities = entities
        self.journal_settings = journal_settings
        self.transport = transport
        self.settings = settings
        self.overrides = overrides
        self._service: Service | None = None
        self._running: ProcessManagers | None = None
        self.router = APIRouter(include_in_schema=False)

        @self.router.get(prefix)
        async def status() -> list[dict[str, Any]]:
            return [s.to_dict() for s in await self.running.status()]

    def bind(self, service: Service) -> None:
        """The service this component is part of (its entities and journal are the
        defaults)."""
        self._service = service

    @property
    def running(self) -> ProcessManagers:
        """The running process managers (pause, resume, status, state...), once started."""
        if self._running is None:
            raise HTTPException(status_code=503, detail="the process managers are not running")
        return self._running

    async def start(self) -> None:
        service = self._service
        entities = self.entities
        if entities is None:
            if service is None:
                raise ConfigurationError(
                    "ProcessManagersComponent needs entities=... (an entity runtime) when it "
                    "is not part of a Service"
                )
            entities = service.entities
        journal = self.journal_settings
        if journal is None:
            journal = service.journal_settings if service is not None else JournalSettings()
        self._running = await start_process_managers(
            self.managers,
            entities=entities,
            journal_settings=journal,
            settings=self.settings,
            transport=self.transport,
            **self.overrides,
        )

    async def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            await running.close()

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        await self.running.wait_until_caught_up(timeout)

    async def metric_samples(self) -> list[Sample]:
        """Per (manager, partition): position, lag in events and seconds, state, keys with a
        state and pending timers."""
        if self._running is None:
            return []
        statuses = await self._running.status()
        by_row = {(s.worker.processor, s.tag): s for s in statuses}

        def labels(w: WorkerStatus) -> dict[str, str]:
            return {"manager": by_row[(w.processor, w.tag)].manager, "partition": w.tag}

        samples = status_samples(
            "manager",
            "the process manager",
            [s.worker for s in statuses],
            labels,
            prefix="lagompy_process_",
        )
        for s in statuses:
            labelled = {"manager": s.manager, "partition": s.tag}
            samples.append(
                (
                    "lagompy_process_manager_active_keys",
                    "Keys of the process manager's partition that have a state.",
                    "gauge",
                    labelled,
                    float(s.active_keys),
                )
            )
            samples.append(
                (
                    "lagompy_process_manager_pending_timers",
                    "Timers of the process manager's partition not fired yet.",
                    "gauge",
                    labelled,
                    float(s.pending_timers),
                )
            )
        return samples

    async def ready(self) -> bool | str:
        """True while every partition can make progress; else which cannot, and why."""
        running = self._running
        if running is None:
            return "the process managers are not running"
        problems = [_problem(s) for s in await running.status() if s.state in STUCK_STATES]
        problems += running.problems()
        return True if not problems else "; ".join(problems[:5])


def _problem(s: ManagerStatus) -> str:
    failure = s.worker.failure
    at = s.offset if failure is None or failure.offset is None else failure.offset
    text = f"process manager {s.manager!r}, partition tag {s.tag!r}: {s.state} at offset {at}"
    return text if failure is None else f"{text}: {failure.error[:300]}"
