"""The Python operations on workflows (:class:`WorkflowEngine`) and their opener
(:func:`start_workflows`): start, get, status, result, list, signal, cancel, resume, retry,
pause and unpause a workflow type. The HTTP routes, the CLI and the console are meant to be
thin layers over these.

    async with start_workflows(workflows, runtime=entities, journal_settings=journal) as engine:
        await engine.start("transfer", TransferRequest("a", "b", 10), id="t-1")
        print(await engine.result("t-1", timeout=10))
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lagompy.closing import AsyncClosing, opener
from lagompy.errors import (
    InvalidWorkflowInput,
    JournalError,
    RuntimeFailure,
    SerializationError,
    WorkflowFailed,
    WorkflowNotFound,
)
from lagompy.journal._journal import Journal, check_entity_id
from lagompy.journal._placement import HOME
from lagompy.journal._storage import PlacedStorage, Storage, open_placed_storage
from lagompy.readside._worker import default_owner
from lagompy.runtime._protocol import EntityRuntime
from lagompy.settings import JournalSettings
from lagompy.workflow._context import now_us
from lagompy.workflow._entity import (
    DeliverSignal,
    GetRun,
    ReopenRun,
    RequestCancel,
    Run,
    StartRun,
    WorkflowRun,
    started_run,
)
from lagompy.workflow._executor import WorkflowExecutor, WorkflowSettings, encode_input, end_of
from lagompy.workflow._index import RunRow, count_runs, list_runs, run_row, set_paused, types
from lagompy.workflow._registry import Workflows

__all__ = ["RunStatus", "WorkflowEngine", "start_workflows"]


@dataclass(frozen=True)
class RunStatus:
    """What a run is doing: its recorded state (the entity's) with the index's view of it.

    ``status``: ``queued`` (waiting for admission), ``running``, ``completed``, ``failed`` or
    ``cancelled``; ``steps``: the names of the recorded positions, in order; ``waiting``: what
    an unfinished run waits for, as far as its records say (``sleep until <us>``...)."""

    run_id: str
    workflow: str
    version: int
    key: str | None
    parent: str | None
    status: str
    steps: tuple[str, ...]
    failed_steps: tuple[str, ...]
    signals: tuple[str, ...]
    compensated: tuple[int, ...]
    cancel_reason: str | None
    error: str | None
    started_us: int
    finished_us: int | None
    wake_at_us: int | None


class WorkflowEngine(AsyncClosing):
    """Operations on the runs of ``workflows`` (see the module); with an executor (by default)
    this process also drives runs (the partitions whose leases it gets).

    ``storage`` is the journal's home database (the runs index and the types are there);
    ``placed``, every database of a journal placed on several (a run's events are on its
    own: :meth:`journal_of`). The engine closes ``placed`` when given, else ``storage``."""

    def __init__(
        self,
        workflows: Workflows,
        runtime: EntityRuntime,
        storage: Storage,
        executor: WorkflowExecutor | None,
        *,
        placed: PlacedStorage | None = None,
    ) -> None:
        self.workflows = workflows
        self.runtime = runtime
        self.storage = storage
        self.placed = placed
        self.database = storage.database
        self.executor = executor
        self.serializer = workflows.serializer
        self._closed = False

    async def close(self, *, release: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.executor is not None:
                await self.executor.close(release=release)
        finally:
            await (self.placed if self.placed is not None else self.storage).close()

    # ------------------------------------------------------------------ helpers

    def journal_of(self, run_id: str) -> Journal:
        """The journal that holds ``run_id``'s events (its database's, on a journal placed on
        several)."""
        if self.placed is None:
            return self.storage.journal
        return self.placed.of(run_id).journal

    async def _ask(self, run_id: str, command: Any, *, once: bool = False) -> Any:
        """Ask the run, again after a runtime failure (a shard host that died: the try may
        have committed, its reply lost). ``once``: an operation that changes the run (a
        signal, a cancel, a reopen), whose tries carry one command id: a try sent again gets
        the stored reply of one that committed, rather than delivering a signal twice or
        reopening a run twice (or being refused as reopened already)."""
        ref = self.runtime.ref_for(WorkflowRun, check_entity_id(run_id))
        command_id = uuid.uuid4().hex if once else None
        attempt = 0
        while True:
            try:
                return await ref.ask(command, command_id=command_id)
            except (RuntimeFailure, JournalError):
                attempt += 1
                if attempt >= 5:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)

    async def _run(self, run_id: str) -> Run:
        state = await self._ask(run_id, GetRun())
        if not isinstance(state, Run):
            raise WorkflowNotFound(f"no workflow run has id {run_id!r}")
        return state

    # ------------------------------------------------------------------ operations

    async def start(
        self,
        workflow: str,
        input: Any,
        *,
        id: str | None = None,
        key: str | None = None,
        version: int | None = None,
    ) -> Run:
        """Start a run of ``workflow`` (its latest version unless told) with ``input``;
        returns its recorded state. ``id`` is the idempotency key: a run with this id and the
        same workflow and input is returned as it is (started once); with another, it raises
        ``DuplicateWorkflowId``. ``key``: at most one run of the workflow with this key runs
        at a time (the others queue). Raises ``UnknownWorkflow``, ``InvalidWorkflowInput``,
        ``InvalidEntityId`` (a bad id) before anything is written."""
        definition = self.workflows.get(workflow, version)
        run_id = check_entity_id(id if id is not None else uuid.uuid4().hex)
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 255):
            raise InvalidWorkflowInput(
                f"a run's key must be a string of 1 to 255 characters, got {key!r}"
            )
        data = encode_input(self.serializer, definition, input)
        command = StartRun(definition.name, definition.version, data, key, None, now_us())
        executor = self.executor
        ahead = executor.lookahead(run_id) if executor and key is None else None
        reply: Run | None = await self._ask(run_id, command)
        run = started_run(command) if reply is None else reply
        if executor is not None:
            executor.started(run_id, run, ahead)
        return run

    async def get(self, run_id: str) -> Run:
        """The run's recorded state (``WorkflowNotFound`` if no run has this id)."""
        return await self._run(run_id)

    async def status(self, run_id: str) -> RunStatus:
        run = await self._run(run_id)
        row = await run_row(self.database, run_id)
        status = run.status
        if not run.finished and row is not None and row.status == "queued":
            status = "queued"
        last = run.steps[-1] if run.steps else None
        wake = last.wake_at_us if last is not None and not run.finished else None
        return RunStatus(
            run_id,
            run.name,
            run.version,
            run.key,
            run.parent,
            status,
            tuple(s.name for s in run.steps),
            tuple(s.name for s in run.steps if not s.ok),
            tuple(s.name for s in run.signals),
            run.compensated,
            run.cancel_reason,
            run.error,
            run.started_us,
            run.finished_us,
            wake,
        )

    async def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """Wait for the run to finish; its output (decoded), or ``WorkflowFailed`` carrying
        its status and error.

        A run this process drives and has not sent its ``FinishRun`` yet when the wait begins
        (or at one of its steps) is answered by its driver, with no request: the end its
        ``FinishRun`` committed (the reply said this command finished the run) happened
        during this wait, and is what the run's state held then. Any other case reads the
        run's state (``GetRun``): a run driven elsewhere, or not yet, or whose driver here had
        already sent its finish (another process may have reopened the run since: only a
        read can tell), stopped without finishing it, or found it finished before."""
        async with asyncio.timeout(timeout):
            end = await end_of(self.executor, run_id, lambda: self._run(run_id), longest=0.5)
        if end.status != "completed":
            raise WorkflowFailed(
                f"workflow run {run_id!r} {end.status}: {end.error}",
                run_id=run_id,
                status=end.status,
            )
        definition = self.workflows.for_run(end.name, end.version)
        return self.serializer.decode_value(end.output or b"", definition.output_type)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | Iterable[str] | None = None,
        key: str | None = None,
        parent: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRow]:
        """Runs from the index, by id, filtered (``after``: the previous page's last id)."""
        return await list_runs(
            self.database,
            workflow=workflow,
            status=status,
            key=key,
            parent=parent,
            limit=limit,
            after=after,
        )

    async def counts(self, workflow: str | None = None) -> dict[str, int]:
        return await count_runs(self.database, workflow)

    async def send_signal(self, run_id: str, name: str, payload: Any = None) -> int:
        """Deliver signal ``name`` with ``payload`` to the run (``ctx.receive(name)`` gets
        it); returns its index. An unfinished run takes signals; a finished one refuses."""
        if not isinstance(name, str) or not name:
            raise InvalidWorkflowInput(f"a signal needs a name, got {name!r}")
        try:
            data = self.serializer.encode_value(payload, Any)
        except SerializationError as e:
            raise InvalidWorkflowInput(
                f"the payload of signal {name!r} does not serialize: {e}"
            ) from e
        index: int = await self._ask(run_id, DeliverSignal(name, data), once=True)
        return index

    async def cancel(self, run_id: str, reason: str = "cancelled by an operator") -> Run:
        """Ask the run to stop: its code gets ``WorkflowCancelled`` (or a cancellation) at its
        next step, its compensations run, it finishes ``cancelled``."""
        run: Run = await self._ask(run_id, RequestCancel(reason), once=True)
        if isinstance(run, Run):
            return run
        raise WorkflowNotFound(f"no workflow run has id {run_id!r}")

    async def resume(self, run_id: str) -> Run:
        """Run a failed (or cancelled) run again from its failed step (the recorded steps
        before it are kept)."""
        run: Run = await self._ask(run_id, ReopenRun(None), once=True)
        return run

    async def retry(self, run_id: str, position: int) -> Run:
        """Run a finished run again from ``position``: the steps recorded from there on are
        dropped (their asks get new command ids)."""
        run: Run = await self._ask(run_id, ReopenRun(position), once=True)
        return run

    async def pause(self, workflow: str) -> None:
        """Admit no new run of ``workflow`` (they queue); running ones go on."""
        self.workflows.latest(workflow)
        await set_paused(self.database, workflow, True)

    async def unpause(self, workflow: str) -> None:
        self.workflows.latest(workflow)
        await set_paused(self.database, workflow, False)

    async def paused(self) -> dict[str, bool]:
        return {name: row.paused for name, row in (await types(self.database)).items()}


@opener
async def start_workflows(
    workflows: Workflows,
    *,
    runtime: EntityRuntime,
    journal_settings: JournalSettings | None = None,
    settings: WorkflowSettings | None = None,
    executor: bool = True,
    owner: str | None = None,
) -> WorkflowEngine:
    """Open the workflow operations on ``runtime`` (which must host :class:`WorkflowRun`) and
    the journal of ``journal_settings``; with ``executor`` this process drives runs too.

    A journal placed on several databases (``JournalSettings.databases``) is opened whole: the
    runs index stays in the home database, and the executor follows the runs' events on every
    database (a partition per shard and database)."""
    placed = await open_placed_storage(settings=journal_settings, entities=[WorkflowRun])
    storage = placed.parts[HOME]
    engine_executor: WorkflowExecutor | None = None
    try:
        if executor:
            engine_executor = WorkflowExecutor(
                workflows,
                runtime,
                storage.database,
                storage.journal,
                serializer=workflows.serializer,
                settings=settings or WorkflowSettings(),
                owner=owner or default_owner(),
                placement=placed.placement,
                journals={name: part.journal for name, part in placed.parts.items()},
            )
            await engine_executor.start()
    except BaseException:
        if engine_executor is not None:
            await engine_executor.close()
        await placed.close()
        raise
    return WorkflowEngine(workflows, runtime, storage, engine_executor, placed=placed)
