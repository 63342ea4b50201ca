"""The workflow executor: who drives which run, and how.

One consumer per partition (shard ``i`` of the runs' tag ``lagompy-workflows``; on a journal
placed on several databases, per shard and database, keyed like a read side's partitions:
``lagompy-workflows-<i>`` on the home database, ``lagompy-workflows-<i>@<name>`` on another,
each reading its own database's journal), built on the consumer core with the read side's
commit strategy (:class:`~lagompy.readside.ReadSideWorker` running
:class:`~lagompy.workflow._index.RunsIndex`): a fenced lease per partition (one executor drives
a partition's runs at a time), the runs index (in the home database, fed by every partition)
written with the position in one transaction. On top of that strategy (:class:`_ExecutorCommit`):

* taking a partition's lease (``prepare``) resumes the partition's unfinished runs (queued or
  running in the index, of its shard and, on several databases, whose ids fall on its database:
  :meth:`~lagompy.journal._placement.Placement.database_of`): a run whose host died is resumed
  by another executor within a lease expiry (``lease_ttl``);
* a committed ``RunStarted`` (or ``RunReopened``) starts driving its run, a ``SignalReceived``
  wakes it, a ``CancelRequested`` cancels it;
* losing the lease (the consumer stands by) stops driving the partition's runs, without
  compensating: the next owner replays them.

A :class:`RunDriver` drives one run: its recorded state (``GetRun``), admission (flow control:
:func:`~lagompy.workflow._index.admit`, batched per tick), then the workflow's ``async def``
with a :class:`~lagompy.workflow.WorkflowContext` that replays the recorded positions and
records the new ones; then compensation (when it failed or was cancelled) and ``FinishRun``.
Asks to entities retry runtime failures (a shard host that died: ``OutcomeUnknown``,
``AskTimeout``...) with the same command id, so an entity step stays exactly once. The run's
own records, compensations and finish are retried too: they carry the run's generation, so
one whose first try committed unseen never applies to the run reopened meanwhile (see
:mod:`~lagompy.workflow._entity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lagompy.closing import finish_tasks
from lagompy.consumer._core import EventConsumer
from lagompy.consumer._lease import Lease
from lagompy.consumer._members import Membership
from lagompy.entity import PersistentEntity
from lagompy.errors import (
    CommandRejected,
    ConfigurationError,
    EventDecodeError,
    InvalidWorkflowInput,
    JournalError,
    RuntimeFailure,
    SerializationError,
    UnknownWorkflow,
    WorkflowCancelled,
    WorkflowNonDeterminism,
)
from lagompy.journal._journal import EventEnvelope, Journal, TagPage
from lagompy.journal._placement import HOME, Placement, partition_key
from lagompy.readside._settings import ReadSideSettings
from lagompy.readside._store import OffsetStore
from lagompy.readside._worker import (
    Partition,
    ProjectionCommit,
    ReadSideWorker,
    membership_for,
    partitions_of,
)
from lagompy.runtime._processing import Receipt
from lagompy.runtime._protocol import EntityRuntime
from lagompy.serialization import Serializer
from lagompy.sql._database import Database
from lagompy.workflow._context import WorkflowContext, now_us
from lagompy.workflow._entity import (
    WORKFLOW_TAG,
    CancelRequested,
    FinishRun,
    GetRun,
    RecordCompensated,
    RecordSteps,
    RequestCancel,
    Run,
    RunFinished,
    RunReopened,
    RunStarted,
    SignalReceived,
    SignalRecord,
    StartRun,
    StepRecord,
    WorkflowRun,
    started_run,
)
from lagompy.workflow._index import (
    INDEX_NAME,
    RunsIndex,
    TypeRow,
    admit,
    declare_types,
    list_runs,
    types,
    unlimited,
)
from lagompy.workflow._metrics import WorkflowMetrics
from lagompy.workflow._registry import WorkflowDef, Workflows

log = logging.getLogger("lagompy.workflow")

__all__ = ["RunDriver", "RunEnd", "WorkflowExecutor", "WorkflowSettings"]

#: Errors after which an ask is sent again with the same command id (exactly once).
RETRIED = (RuntimeFailure, JournalError)


@dataclass(frozen=True)
class WorkflowSettings:
    """How the executor holds partitions and reaches entities.

    ``lease_ttl``: seconds after which another executor takes a silent executor's partitions
    (and resumes their runs); ``renew_interval``: how often a lease is renewed (and lost ones
    noticed); ``ask_timeout``: per try of an ask (then it is sent again, same command id);
    ``admission_interval``: how often queued runs try again to be admitted;
    ``max_batch``: events per transaction of the runs index; ``rebalance`` (on by default):
    the executors of one journal share its partitions, about evenly (the read side's
    membership, see ``ReadSideSettings.rebalance``): an executor that joins gets its share,
    handed over between two batches with the runs it drove stopped first; off, the first
    executor takes every partition and the others stand by until it stops."""

    lease_ttl: float = 10.0
    renew_interval: float = 2.0
    ask_timeout: float = 30.0
    admission_interval: float = 0.5
    max_batch: int = 500
    retry_max_delay: float = 2.0
    rebalance: bool = True

    def __post_init__(self) -> None:
        for name in (
            "lease_ttl",
            "renew_interval",
            "ask_timeout",
            "admission_interval",
            "retry_max_delay",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigurationError(
                    f"WorkflowSettings: {name} must be a finite number of seconds, got {value!r}"
                )
        if not 0 < self.renew_interval < self.lease_ttl:
            raise ConfigurationError(
                f"WorkflowSettings: renew_interval ({self.renew_interval}) must be above 0 and "
                f"below lease_ttl ({self.lease_ttl}), or leases expire between renewals"
            )
        for name in ("ask_timeout", "admission_interval", "retry_max_delay"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"WorkflowSettings: {name} must be above 0")
        if self.max_batch < 1:
            raise ConfigurationError("WorkflowSettings: max_batch must be at least 1")

    def consumer(self) -> ReadSideSettings:
        return ReadSideSettings(
            lease_ttl=self.lease_ttl,
            renew_interval=self.renew_interval,
            max_batch=self.max_batch,
            retry_max_delay=self.retry_max_delay,
            retry_initial_delay=0.05,
            rebalance=self.rebalance,
        )


class Superseded(Exception):
    """The run moved on without this driver (another executor finished it, an operator
    reopened it): the driver stops."""


# --------------------------------------------------------------------------- one run


class RunDriver:
    """Drives one run (see the module)."""

    def __init__(
        self,
        executor: WorkflowExecutor,
        run_id: str,
        tag: str,
        run: Run | None = None,
        types_read: asyncio.Future[dict[str, TypeRow]] | None = None,
    ) -> None:
        self.executor = executor
        self.run_id = run_id
        self.tag = tag
        #: The run's recorded state when the driver starts with it (a run started here).
        self.initial = run
        #: The workflows' types (does its workflow run without admission?), read while it
        #: was being started.
        self._types_read = types_read
        #: Set once the run is seen finished (by this driver's FinishRun or before).
        self.done = False
        #: Set just before the driver sends its FinishRun; then ``ended``: the end it
        #: committed, when the reply said that this command finished the run (the answer of
        #: a ``WorkflowEngine.result`` that began before the send: see there).
        self.finishing = False
        self.ended: RunEnd | None = None
        self.serializer = executor.serializer
        self.workflows = executor.workflows
        self.definition: WorkflowDef = WorkflowDef("", 0, _never, Any, Any)
        #: The generation of the run this driver drives (its commands apply to it only).
        self.generation = 0
        self.ctx: WorkflowContext | None = None
        self.task: asyncio.Task[None] | None = None
        #: The workflow's code runs in the driver's task (no task of its own): while it does,
        #: a cancel of the run cancels the task; ``_stopped``: the executor stops driving the
        #: run (lease lost, closing), which no code that swallows the cancel survives.
        self._in_code = False
        self._stopped = False
        self._pending_signals: list[SignalRecord] = []
        self._cancel: str | None = None
        self._cancelled = asyncio.Event()
        self._mark = time.monotonic()  # the run's last checkpoint here (step metrics)
        #: Records not yet sent to the run's entity, in position order; the task sending them
        #: (one RecordSteps at a time, so positions arrive in order); what each position got.
        self._unsent: list[StepRecord] = []
        self._recorder: asyncio.Task[None] | None = None
        self._stored: dict[int, StepRecord] = {}
        self._record_error: BaseException | None = None
        #: Child runs this driver started (cancelled with the run).
        self._children: set[str] = set()

    # ------------------------------------------------------------------ events

    def add_signal(self, signal: SignalRecord) -> None:
        if self.ctx is not None:
            self.ctx.add_signal(signal)
        else:
            self._pending_signals.append(signal)

    def cancel(self, reason: str) -> None:
        self._cancel = reason
        self._cancelled.set()
        ctx = self.ctx
        if ctx is not None and ctx.cancel_reason is None:
            ctx.cancel_reason = reason
            if self._in_code and self.task is not None:
                self.task.cancel()

    def stop(self) -> asyncio.Task[None] | None:
        """Stop driving the run (no compensation, no finish): its task, cancelled. Code that
        swallows the cancel goes no further: its next step raises."""
        self._stopped = True
        if self.ctx is not None and self.ctx.fatal is None:
            self.ctx.fatal = Superseded(f"this executor stopped driving run {self.run_id!r}")
        if self.task is not None:
            self.task.cancel()
        return self.task

    # ------------------------------------------------------------------ entity calls

    async def _retrying(self, what: str, call: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await call()
            except RETRIED as e:
                attempt += 1
                delay = min(self.executor.settings.retry_max_delay, 0.05 * 2**attempt)
                log.warning("run %r: %s failed (%s), again in %.2f s", self.run_id, what, e, delay)
                await asyncio.sleep(delay)

    async def ask_run(self, command: Any, run_id: str | None = None) -> Any:
        ref = self.executor.runtime.ref_for(WorkflowRun, run_id or self.run_id)
        timeout = self.executor.settings.ask_timeout
        return await self._retrying(
            type(command).__name__, lambda: ref.ask(command, timeout=timeout)
        )

    async def ask_entity(
        self,
        entity: type[PersistentEntity[Any, Any, Any]] | str,
        entity_id: str,
        command: Any,
        command_id: str,
    ) -> Any:
        ref = self.executor.runtime.ref_for(entity, entity_id)
        timeout = self.executor.settings.ask_timeout
        return await self._retrying(
            f"ask {ref.entity_type}/{entity_id}",
            lambda: ref.ask(command, timeout=timeout, command_id=command_id),
        )

    async def ask_step(
        self,
        entity: type[PersistentEntity[Any, Any, Any]] | str,
        entity_id: str,
        command: Any,
        command_id: str,
    ) -> Receipt:
        """An entity step's ask: its reply, and whether the command is applied (its reply
        stored under ``command_id``)."""
        ref = self.executor.runtime.ref_for(entity, entity_id)
        timeout = self.executor.settings.ask_timeout
        return await self._retrying(  # type: ignore[no-any-return]
            f"ask {ref.entity_type}/{entity_id}",
            lambda: ref.ask_with_receipt(command, timeout=timeout, command_id=command_id),
        )

    # ------------------------------------------------------------------ records

    def defer(self, record: StepRecord) -> None:
        """Record ``record`` in the background (the run goes on): for an entity step whose
        command is applied, whose reply its command id gives back if the record is lost (a
        replay asks again and gets the stored reply). Records go out in position order,
        those that wait together in one transaction; every other record, the run's finish and
        its compensation wait for them (:meth:`flush`)."""
        self._unsent.append(record)
        mark, self._mark = self._mark, time.monotonic()
        self.executor.metrics.step(self.definition.name, record.name, record.ok, self._mark - mark)
        if len(self._unsent) >= RECORD_BATCH:
            self.send_records()

    def send_records(self) -> None:
        """Send the records not sent yet, without waiting for them (the run's code goes
        into something else than an entity ask: an external call, a wait)."""
        if self._unsent and (self._recorder is None or self._recorder.done()):
            self._recorder = asyncio.create_task(
                self._send_records(), name=f"workflow run {self.run_id} records"
            )

    async def _send_records(self) -> None:
        while self._unsent and self._record_error is None:
            batch = tuple(self._unsent)
            self._unsent = []
            try:
                held: tuple[StepRecord, ...] = await self.ask_run(
                    RecordSteps(batch, self.generation)
                )
            except CommandRejected as e:
                self._failed_record(Superseded(str(e)))
                return
            except Exception as e:
                self._failed_record(e)
                return
            first = batch[0].position
            for got in held:
                sent = batch[got.position - first]
                self._stored[sent.position] = got
                if got.name != sent.name:
                    self._failed_record(
                        WorkflowNonDeterminism(
                            f"workflow run {self.run_id!r}: position {sent.position} holds "
                            f"{got.name!r}, recorded by another executor, where this one ran "
                            f"{sent.name!r}",
                            run_id=self.run_id,
                            position=sent.position,
                            recorded=got.name,
                            called=sent.name,
                        )
                    )
                    return

    def _failed_record(self, error: BaseException) -> None:
        self._record_error = error
        self._unsent = []
        if self.ctx is not None and self.ctx.fatal is None:
            self.ctx.fatal = error

    async def flush(self) -> None:
        """Wait until every record so far is written; raise what stopped them."""
        while True:
            recorder = self._recorder
            if recorder is not None and not recorder.done():
                await asyncio.shield(recorder)
            elif self._unsent and self._record_error is None:
                self.send_records()
            else:
                break
        if self._record_error is not None:
            raise self._record_error

    async def record(self, record: StepRecord) -> StepRecord:
        """Record ``record`` and wait for it (with the deferred ones before it); the answer is
        what its position holds."""
        self.defer(record)
        await self.flush()
        return self._stored.pop(record.position, record)

    async def _settle(self) -> None:
        """Wait for the records on their way (not sending the others: the run's finish
        carries them)."""
        recorder = self._recorder
        if recorder is not None and not recorder.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(recorder)

    def stop_recording(self) -> None:
        if self._recorder is not None and not self._recorder.done():
            self._recorder.cancel()

    async def run_child(
        self, child_id: str, workflow: str, value: Any, version: int | None
    ) -> Run | RunEnd:
        """Start the child run (driven here at once when its partition is this executor's, as
        a run ``WorkflowEngine.start`` started) and wait for its end."""
        definition = self.workflows.get(workflow, version)
        data = encode_input(self.serializer, definition, value)
        self._children.add(child_id)
        command = StartRun(workflow, definition.version, data, None, self.run_id, now_us())
        if await self.ask_run(command, child_id) is None:  # started by this command
            self.executor.started(child_id, started_run(command))
        return await self._finished_child(child_id)

    async def _finished_child(self, child_id: str) -> Run | RunEnd:
        async def read() -> Any:
            return await self.ask_run(GetRun(), child_id)

        return await end_of(self.executor, child_id, read, longest=1.0)

    async def _cancel_children(self, reason: str) -> None:
        """Cancel the run's unfinished child runs (the one its code waits for, and any the
        index lists) and wait for them to finish (their compensations run first)."""
        ids = set(self._children)
        with contextlib.suppress(Exception):  # the index is a help here, not the truth
            rows = await list_runs(
                self.executor.database,
                parent=self.run_id,
                status=("queued", "running"),
                limit=10_000,
            )
            ids.update(row.run_id for row in rows)
        why = f"its parent {self.run_id!r} was cancelled: {reason}"
        waiting: list[str] = []
        for child_id in sorted(ids):
            try:
                run = await self.ask_run(RequestCancel(why), child_id)
            except CommandRejected:
                continue  # no such run (its start never happened)
            if isinstance(run, Run) and not run.finished:
                waiting.append(child_id)
        for child_id in waiting:
            await self._finished_child(child_id)

    # ------------------------------------------------------------------ the run

    async def drive(self) -> None:
        started_here = self.initial is not None
        run = self.initial if self.initial is not None else await self.ask_run(GetRun())
        self.initial = None
        if not isinstance(run, Run) or run.finished:
            self.done = isinstance(run, Run)
            return
        self.generation = run.generation
        if not await self._admitted(run, started_here):
            await self._finish(run, "cancelled", None, f"cancelled: {self._cancel}")
            return
        self._mark = time.monotonic()
        try:
            self.definition = self.workflows.for_run(run.name, run.version)
        except UnknownWorkflow as e:
            # A process deployed without this workflow (a rolling deploy): the run waits for
            # an executor that knows it (the partition's next owner), it is not failed.
            log.error("run %r cannot be driven by this executor: %s", self.run_id, e)
            return
        ctx = WorkflowContext(self, run)
        self.ctx = ctx
        for signal in self._pending_signals:
            ctx.add_signal(signal)
        if self._cancel is not None and ctx.cancel_reason is None:
            ctx.cancel_reason = self._cancel
        try:
            value = self.serializer.decode_value(run.input, self.definition.input_type)
        except SerializationError as e:
            await self._finish(run, "failed", None, f"the input does not decode: {e}")
            return
        outcome = await self._run_code(ctx, value)
        await self._outcome(run, ctx, outcome)

    async def _run_code(self, ctx: WorkflowContext, value: Any) -> _Outcome:
        """Run the workflow's code in this task (one task per run): its result, its error, or
        that it was cancelled (by a cancel of the run, or by its own CancelledError). Raises
        CancelledError when the executor stopped driving the run meanwhile, whatever the
        code did with the cancel."""
        task = self.task
        self._in_code = True
        try:
            result = await self.definition.fn(ctx, value)
            outcome = _Outcome(result=result)
        except asyncio.CancelledError:
            outcome = _Outcome(cancelled=True)
        except BaseException as e:
            outcome = _Outcome(error=e)
        finally:
            self._in_code = False
        if self._stopped:
            raise asyncio.CancelledError
        if task is not None:
            while task.cancelling():  # a cancel of the run, handled here
                task.uncancel()
        return outcome

    async def _admitted(self, run: Run, started_here: bool) -> bool:
        """Wait for admission; False when the run is cancelled first (a queued run that never
        ran: nothing to compensate)."""
        if run.steps:
            await self.executor.admission(self.run_id)  # it ran before: the code decides
            return True
        if run.cancel_reason is not None:
            self.cancel(run.cancel_reason)
        if self._cancelled.is_set():
            return False
        if started_here and run.key is None:
            ahead, self._types_read = self._types_read, None
            if await self.executor.unlimited(run.name, ahead):
                return True  # its index row starts running (see _index.unlimited)
        admission = asyncio.ensure_future(self.executor.admission(self.run_id))
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({admission, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not admission.done():
                admission.cancel()
        return admission.done() and not admission.cancelled()

    async def _outcome(self, run: Run, ctx: WorkflowContext, outcome: _Outcome) -> None:
        await self._settle()  # the records on their way (an error: ctx.fatal)
        fatal = ctx.fatal
        if isinstance(fatal, Superseded):
            log.info("run %r: %s; this executor stops driving it", self.run_id, fatal)
            return
        if isinstance(fatal, WorkflowNonDeterminism):
            log.error("run %r: %s", self.run_id, fatal)
            await self._finish(run, "failed", None, f"WorkflowNonDeterminism: {fatal}")
            return
        if fatal is not None and fatal is self._record_error:
            # Its steps could not be recorded: the run stays as recorded, for the next owner.
            log.error("run %r: recording its steps failed: %r", self.run_id, fatal)
            return
        error: BaseException | None
        if outcome.cancelled:
            error = WorkflowCancelled(ctx.cancel_reason or "cancelled")
        else:
            error = outcome.error
        if error is None:
            try:
                output = self.serializer.encode_value(outcome.result, self.definition.output_type)
            except SerializationError as e:
                with contextlib.suppress(Exception):
                    await self.flush()
                await self._compensate(run, ctx)
                await self._finish(run, "failed", None, f"the output does not encode: {e}")
                return
            await self._finish(run, "completed", output, None)
            return
        if not isinstance(error, Exception):  # KeyboardInterrupt and the like
            raise error
        try:
            await self.flush()  # the steps before the compensations
        except Exception as e:
            log.error("run %r: recording its steps failed: %r", self.run_id, e)
            return
        cancelled = ctx.cancel_reason is not None and (
            isinstance(error, (WorkflowCancelled, asyncio.CancelledError)) or outcome.cancelled
        )
        if cancelled:
            await self._cancel_children(ctx.cancel_reason or "cancelled")
        failures = await self._compensate(run, ctx)
        text = (
            f"cancelled: {ctx.cancel_reason}" if cancelled else f"{type(error).__name__}: {error}"
        )
        if failures:
            text += "; compensation failed: " + "; ".join(failures)
        await self._finish(run, "cancelled" if cancelled else "failed", None, text)

    async def _compensate(self, run: Run, ctx: WorkflowContext) -> list[str]:
        done = set(run.compensated)
        failures: list[str] = []
        for comp in reversed(ctx.compensations):
            if comp.index in done:
                continue
            try:
                await comp.run()
                ok, error = True, ""
            except Exception as e:
                ok, error = False, f"{type(e).__name__}: {e}"
                failures.append(f"{comp.name}: {error}")
                log.error("run %r: compensation %r failed: %s", self.run_id, comp.name, error)
            await self.ask_run(RecordCompensated(comp.index, comp.name, ok, error, run.generation))
        return failures

    async def _finish(self, run: Run, status: str, output: bytes | None, error: str | None) -> None:
        records, self._unsent = tuple(self._unsent), []  # recorded with the finish
        command = FinishRun(status, output, error, now_us(), records, run.generation)
        self.finishing = True
        try:
            reply: Run | None = await self.ask_run(command)
        except CommandRejected as e:
            log.info("run %r: %s; this executor stops driving it", self.run_id, e)
            return
        if reply is not None:  # finished before (by another executor), or reopened since
            self.done = reply.finished
            return
        self.done = True  # finished by this command, as it says
        self.ended = RunEnd(run.name, run.version, status, output, error)
        seconds = (command.at_us - run.started_us) / 1e6
        self.executor.metrics.run_finished(run.name, status, seconds)


@dataclass(frozen=True)
class RunEnd:
    """The end a driver's ``FinishRun`` committed (the reply said this command finished the
    run): what the run's state then holds, for ``WorkflowEngine.result``."""

    name: str
    version: int
    status: str
    output: bytes | None
    error: str | None


@dataclass(frozen=True)
class _Outcome:
    """How the workflow's code ended: its ``result``, its ``error``, or ``cancelled``."""

    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False


def _running(executor: WorkflowExecutor | None, run_id: str) -> RunDriver | None:
    """``executor``'s driver of ``run_id`` while its task runs."""
    driver = executor.drivers.get(run_id) if executor is not None else None
    if driver is None or driver.task is None or driver.task.done():
        return None
    return driver


def watchable(executor: WorkflowExecutor | None, run_id: str) -> RunDriver | None:
    """``executor``'s driver of ``run_id`` while it runs and has not sent its finish."""
    driver = _running(executor, run_id)
    return None if driver is None or driver.finishing else driver


async def end_of(
    executor: WorkflowExecutor | None,
    run_id: str,
    read: Callable[[], Awaitable[Any]],
    *,
    longest: float,
) -> Run | RunEnd:
    """Wait for the end of run ``run_id``: the end that ``executor``'s driver of it commits,
    when that driver had not sent its ``FinishRun`` when the wait began or at one of its
    steps (the run finished during the wait, as this command said: no request); else the
    run's state, ``read()`` at each step of a backoff (from 20 ms up to ``longest`` seconds)
    or when the executor's driver of it ends (see ``WorkflowEngine.result``).

    Not the end of a driver that had sent its finish already: the run may have been
    reopened since by another process, which only a read can tell. While a watched driver
    runs, the run's state is still read every :data:`WATCH_READS` seconds (a run finished
    elsewhere, by an executor that took its partition, is seen then)."""
    watched = watchable(executor, run_id)
    delay = 0.02
    while True:
        if watched is not None and watched.task is not None:
            task = watched.task
            await asyncio.wait({task}, timeout=WATCH_READS)
            if watched.ended is not None:
                return watched.ended
            if not task.done():  # a long run: its state now and then
                state = await read()
                if isinstance(state, Run) and state.finished:
                    return state
                continue
            watched = None  # it ended without finishing the run: its state says
        running = _running(executor, run_id)
        driving = running.task if running is not None else None
        if driving is not None:  # woken by its driver's end here, or the backoff step
            await asyncio.wait({driving}, timeout=delay)
        state = await read()
        if isinstance(state, Run) and state.finished:
            return state
        watched = watchable(executor, run_id)
        if driving is None and watched is None:
            await asyncio.sleep(delay)
        delay = min(longest, delay * 2)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _never(*_: Any) -> Any:  # the placeholder definition's function
    raise AssertionError("no workflow definition")


def encode_input(serializer: Serializer, definition: WorkflowDef, value: Any) -> bytes:
    try:
        return serializer.encode_value(value, definition.input_type)
    except SerializationError as e:
        raise InvalidWorkflowInput(
            f"the input of workflow {definition.name!r} does not serialize: {e}"
        ) from e


# --------------------------------------------------------------------------- partitions


class _ExecutorCommit:
    """The read side's commit strategy (runs index + position, exactly once), telling the
    executor what it committed and when it took the partition's lease."""

    def __init__(self, inner: ProjectionCommit, executor: WorkflowExecutor, tag: str) -> None:
        self.inner = inner
        self.executor = executor
        self.tag = tag

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def prepare(self, consumer: EventConsumer, lease: Lease, *, clear_stall: bool) -> None:
        await self.inner.prepare(consumer, lease, clear_stall=clear_stall)
        await self.executor.took(self.tag, lease)

    async def commit(
        self, consumer: EventConsumer, lease: Lease, page: TagPage, *, ignore_pause: bool
    ) -> None:
        await self.inner.commit(consumer, lease, page, ignore_pause=ignore_pause)
        upto = consumer.offset
        self.executor.committed(self.tag, [e for e in page.envelopes if e.offset <= upto])

    async def undecodable(
        self, consumer: EventConsumer, lease: Lease, error: EventDecodeError
    ) -> None:
        await self.inner.undecodable(consumer, lease, error)

    async def hand_over(self, consumer: EventConsumer, lease: Lease) -> None:
        await self.executor.handing_over(self.tag)


def index_database(database: Database) -> Database:
    """Where the runs index and its partitions' positions are written: ``database``, but for
    a SQLite file whose commits are synced (``sqlite_synchronous`` FULL or EXTRA, FULL by
    default): there, connections of their own to the same file that commit without an fsync
    (``synchronous=NORMAL``).

    Why: SQLite has one write lock per file, and a commit in FULL holds it through its fsync
    of the log (0.6 ms p50, 3 ms p90 on the 2-core machine under load): the index's
    transactions (one per page of runs' events and partition) held it 25% of the time while
    runs went on, and the runs' own commands (their entities' writes on the shard hosts) waited
    for it. What it costs: after a crash of the machine (not of a process: a process killed
    loses nothing in WAL mode), the last index transactions may be gone with the positions
    they committed (a transaction is never torn: each one's rows go with its position); the
    partitions then read those events again from the journal, whose commits stay synced, and
    write the same rows. A run the index lost is still driven: its ``RunStarted`` read again
    launches it (the executor resumes from the index first, then from what it reads)."""
    if database.dialect != "sqlite" or database.settings.sqlite_synchronous not in (
        "FULL",
        "EXTRA",
    ):
        return database
    name = database.url.database or ""
    if name in ("", ":memory:") or name.startswith("file:"):
        return database  # an engine of its own would not see the same database
    return Database.create(database.settings, sqlite_synchronous="NORMAL")


@dataclass
class _Partition:
    worker: ReadSideWorker
    task: asyncio.Task[None]
    #: Which shard of the runs' tag, on which database of the journal.
    where: Partition
    #: The epoch of the lease the drivers run under (None: not held).
    epoch: int | None = None


#: Records of applied entity asks a run keeps before it sends them without waiting for a
#: step that must wait for its record (every other kind of step, and the run's end).
RECORD_BATCH = 32

#: Seconds between two reads of a run's state while a wait for its end watches its driver in
#: this process (:func:`end_of`; the driver's end wakes the wait): as the backoff's longest
#: step of ``WorkflowEngine.result``.
WATCH_READS = 0.5

#: How many finished runs an executor remembers (see ``WorkflowExecutor._finished``).
FINISHED_KEPT = 10_000

#: Consumer states in which the partition's lease is not (or no longer) this executor's.
NOT_HELD = frozenset({"standby", "stopped", "retrying", "stalled", "starting"})


class WorkflowExecutor:
    """Drives the runs of the partitions whose leases it holds (see the module).

    ``database`` holds the runs index, the types and the partitions' positions and leases (the
    home database of the journal); ``journal`` is the journal the runs' events are read from.
    On a journal placed on several databases, ``placement`` says which database holds each run
    and ``journals`` is each database's journal by name (the home one too): the executor then
    has a partition per (shard, database), keyed by
    :func:`~lagompy.journal._placement.partition_key`."""

    def __init__(
        self,
        workflows: Workflows,
        runtime: EntityRuntime,
        database: Database,
        journal: Journal,
        *,
        serializer: Serializer,
        settings: WorkflowSettings,
        owner: str,
        placement: Placement | None = None,
        journals: Mapping[str, Journal] | None = None,
    ) -> None:
        self.workflows = workflows
        self.runtime = runtime
        self.database = database
        self.journal = journal
        #: Which database of the journal holds each run (one: the home one).
        self.placement = placement or Placement.of(journal.database.settings)
        #: Each database's journal, by name.
        self.journals: dict[str, Journal] = {HOME: journal, **(journals or {})}
        missing = [n for n in self.placement.names if n not in self.journals]
        if missing:
            raise ConfigurationError(
                "WorkflowExecutor: the journal is placed on several databases and no journal "
                f"was given for {', '.join(map(repr, missing))}: pass journals= (by name), "
                "as start_workflows does"
            )
        self.serializer = serializer
        self.settings = settings
        self.owner = owner
        self.drivers: dict[str, RunDriver] = {}
        self.partitions: dict[str, _Partition] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._admitting: dict[str, asyncio.Future[None]] = {}
        self._admit_wake = asyncio.Event()
        self._types_read: asyncio.Future[dict[str, TypeRow]] | None = None
        #: Runs this executor drove to their end (most recent last): a late RunStarted from
        #: the tail does not start them again.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._closing = False
        #: Counters of the runs this executor drove (the service's /metrics).
        self.metrics = WorkflowMetrics()
        #: This executor as a member of the executors of its journal (None: rebalance off).
        self.membership: Membership | None = None
        #: SQLite: where the runs index is written (see :func:`index_database`), when it is
        #: not ``database`` itself (closed with the executor).
        self._index_database: Database | None = None

    async def start(self) -> None:
        await declare_types(
            self.database, {n: self.workflows.max_running(n) for n in self.workflows.names()}
        )
        consumer = self.settings.consumer()
        index = RunsIndex()
        parts = partitions_of(index, self.placement)
        keys = [part.key for part in parts]
        await OffsetStore(self.database).ensure(INDEX_NAME, keys)
        self.membership = membership_for(INDEX_NAME, keys, self.database, consumer, self.owner)
        projection = index_database(self.database)
        if projection is not self.database:
            self._index_database = projection
        for part in parts:
            worker = ReadSideWorker(
                index,
                part.key,
                journal=self.journals[part.database],
                projection=projection,
                settings=consumer,
                owner=self.owner,
                membership=self.membership,
                journal_tag=part.tag,
            )
            worker.strategy = _ExecutorCommit(worker.strategy, self, part.key)  # type: ignore[assignment]
            task = asyncio.create_task(worker.run(), name=f"workflow partition {part.key}")
            self.partitions[part.key] = _Partition(worker, task, part)
        self._tasks.append(asyncio.create_task(self._watch(), name="workflow leases"))
        self._tasks.append(asyncio.create_task(self._admit_loop(), name="workflow admission"))

    async def close(self, *, release: bool = True) -> None:
        """Stop driving (no compensation: the runs stay where they are, for the next owner)
        and release the partitions (``release=False``: keep the leases until they expire, as a
        crashed process would)."""
        self._closing = True
        stopped = [d.stop() for d in self.drivers.values()]
        await asyncio.gather(*(t for t in stopped if t is not None), return_exceptions=True)
        self.drivers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        parts = list(self.partitions.values())
        if release:
            for part in parts:
                await part.worker.stop()
            await finish_tasks([p.task for p in parts], what="workflow partition", logger=log)
        else:
            for part in parts:
                part.task.cancel()
            await asyncio.gather(*(p.task for p in parts), return_exceptions=True)
        if self.membership is not None and release:
            await self.membership.leave()  # (not released: it expires, as a crashed one would)
        for future in self._admitting.values():
            future.cancel()
        if self._types_read is not None:
            self._types_read.cancel()
        if self._index_database is not None:
            await self._index_database.dispose()
            self._index_database = None

    # ------------------------------------------------------------------ partitions

    def partition_of(self, run_id: str) -> str:
        """The key of the partition that drives ``run_id``: its shard of the runs' tag, on the
        database that holds it."""
        tag = WORKFLOW_TAG.for_entity(run_id)
        return partition_key(tag, self.placement.database_of(run_id))

    async def took(self, tag: str, lease: Lease) -> None:
        """Partition ``tag`` (its key) is this executor's: drive its unfinished runs. The index
        keeps a run's shard, not its database: on several databases, the runs of the shard
        whose ids fall on the partition's database are its runs."""
        part = self.partitions[tag]
        if part.epoch is not None and part.epoch != lease.epoch:
            self._drop(tag)
        part.epoch = lease.epoch
        shard, database = part.where.tag, part.where.database
        after: str | None = None
        while True:
            rows = await list_runs(
                self.database, tag=shard, status=("queued", "running"), limit=1000, after=after
            )
            for row in rows:
                if self.placement.database_of(row.run_id) == database:
                    self.launch(row.run_id, tag)
            if len(rows) < 1000:
                break
            after = rows[-1].run_id
        log.info("workflow partition %s: taken (epoch %d)", tag, lease.epoch)

    def committed(self, tag: str, envelopes: Iterable[EventEnvelope[Any]]) -> None:
        for envelope in envelopes:
            run_id = envelope.entity_id
            match envelope.event:
                case RunStarted():
                    if run_id in self._admitting:
                        self._admit_wake.set()  # its row is in the index now
                    if run_id not in self._finished:
                        self.launch(run_id, tag)
                case RunReopened():
                    self._finished.pop(run_id, None)
                    self.relaunch(run_id, tag)
                case SignalReceived(index=index, name=name, payload=payload):
                    driver = self.drivers.get(run_id)
                    if driver is not None:
                        driver.add_signal(SignalRecord(index, name, payload))
                case CancelRequested(reason=reason):
                    driver = self.drivers.get(run_id)
                    if driver is not None:
                        driver.cancel(reason)
                case RunFinished():
                    self._admit_wake.set()  # a slot may be free

    def lookahead(self, run_id: str) -> asyncio.Future[dict[str, TypeRow]] | None:
        """The read of the workflows' types (:meth:`unlimited`) for a run about to be started
        here, in flight while its start is written (handed to :meth:`started`): its driver
        does not wait for a read of its own after the start (a read that overlaps the start
        sees what one just after it would, but for a change made in those milliseconds, as a
        read in flight always could). One read shared by the runs of a tick, not a task per
        run. None when this executor would not drive the run (another holds its partition)."""
        if self._closing or self.partitions[self.partition_of(run_id)].epoch is None:
            return None
        return self._read_types()

    def started(
        self,
        run_id: str,
        run: Run,
        types_read: asyncio.Future[dict[str, TypeRow]] | None = None,
    ) -> None:
        """A run started in this process (``WorkflowEngine.start``): driven at once from its
        state when this executor holds its partition, rather than when the partition's tail
        brings its ``RunStarted`` (which then finds it driven). The records are the same.
        ``types_read``: :meth:`lookahead` of the run."""
        if not run.finished:
            self.launch(run_id, self.partition_of(run_id), run, types_read)

    def launch(
        self,
        run_id: str,
        tag: str,
        run: Run | None = None,
        types_read: asyncio.Future[dict[str, TypeRow]] | None = None,
    ) -> None:
        if self._closing or self.partitions[tag].epoch is None:
            return
        existing = self.drivers.get(run_id)
        if existing is not None and existing.task is not None and not existing.task.done():
            return
        driver = RunDriver(self, run_id, tag, run, types_read)
        self.drivers[run_id] = driver
        driver.task = asyncio.create_task(self._drive(driver), name=f"workflow run {run_id}")

    def relaunch(self, run_id: str, tag: str) -> None:
        """Drive a reopened run: now, or once the driver of its previous end has ended. The
        tail can read the reopen while that driver's task is still ending (its finish's reply
        on its way), and :meth:`launch` leaves a run alone while a driver of it runs."""
        ending = self.drivers.get(run_id)
        if ending is not None and ending.task is not None and not ending.task.done():
            ending.task.add_done_callback(lambda _: self._reopened(run_id, tag))
            return
        self.launch(run_id, tag)

    def _reopened(self, run_id: str, tag: str) -> None:
        self._finished.pop(run_id, None)  # its ending driver marked it finished
        self.launch(run_id, tag)

    async def _drive(self, driver: RunDriver) -> None:
        try:
            await driver.drive()
            if driver.done:
                self._finished[driver.run_id] = None
                if len(self._finished) > FINISHED_KEPT:
                    self._finished.popitem(last=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("workflow run %r: its driver failed", driver.run_id)
        finally:
            driver.stop_recording()
            if self.drivers.get(driver.run_id) is driver:
                del self.drivers[driver.run_id]
            self._admitting.pop(driver.run_id, None)

    def _drop(
        self, tag: str, why: str = "lease lost", level: int = logging.WARNING
    ) -> list[asyncio.Task[Any]]:
        """Stop driving the runs of ``tag`` (its lease is gone, or going): no compensation.
        Returns the drivers' tasks, cancelled."""
        part = self.partitions[tag]
        part.epoch = None
        dropped = [d for d in self.drivers.values() if d.tag == tag]
        tasks = []
        for driver in dropped:
            task = driver.stop()
            if task is not None:
                tasks.append(task)
            del self.drivers[driver.run_id]
        if dropped:
            log.log(
                level, "workflow partition %s: %s, stopped driving %d runs", tag, why, len(dropped)
            )
        return tasks

    async def handing_over(self, tag: str) -> None:
        """The partition goes to another executor (its target member): the runs driven here
        stop before its lease is released, so the next owner replays them alone."""
        tasks = self._drop(tag, "handed over", logging.INFO)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.settings.renew_interval / 2))
            for tag, part in self.partitions.items():
                if part.epoch is None:
                    continue
                lease = part.worker.lease
                if part.worker.state in NOT_HELD or lease is None or lease.epoch != part.epoch:
                    self._drop(tag)

    # ------------------------------------------------------------------ admission

    def _read_types(self) -> asyncio.Future[dict[str, TypeRow]]:
        """The types' rows: the read in flight, or a new one (its callers await it shielded:
        one caller cancelled does not cancel the others' read)."""
        reading = self._types_read
        if reading is None or reading.done():
            reading = self._types_read = asyncio.ensure_future(types(self.database))
            reading.add_done_callback(_retrieved)  # its error is each caller's (logged there)
        return reading

    async def unlimited(
        self, workflow: str, reading: asyncio.Future[dict[str, TypeRow]] | None = None
    ) -> bool:
        """Whether a new run (with no key) of ``workflow`` runs at once: no limit, not paused
        (the types' rows, read once for the callers of a tick; ``reading``: a read started
        before, by :meth:`lookahead`)."""
        if reading is None:
            reading = self._read_types()
        try:
            kind = (await asyncio.shield(reading)).get(workflow)
        except Exception as e:
            log.warning("workflow types could not be read (%s): admission decides", e)
            return False
        return kind is not None and unlimited(kind.max_running, kind.paused)

    async def admission(self, run_id: str) -> None:
        """Return once the run is admitted (flow control in the index)."""
        future = self._admitting.get(run_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._admitting[run_id] = future
        self._admit_wake.set()
        await asyncio.shield(future)

    async def _admit_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.admission_interval):
                    await self._admit_wake.wait()
            self._admit_wake.clear()
            await asyncio.sleep(0)  # the ids asked in this tick go in one transaction
            waiting = [r for r, f in self._admitting.items() if not f.done()]
            if not waiting:
                continue
            try:
                admitted = await admit(self.database, waiting)
            except Exception as e:
                log.warning("workflow admission failed (%s); trying again", e)
                continue
            for run_id in admitted:
                future = self._admitting.pop(run_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
