"""The workflow run entity: one persistent entity per run, whose events are its checkpoints.

A run is an ordinary lagompy entity (``type_name`` ``"lagompy-workflow"``, sharded tag
``"lagompy-workflows"``): it is hosted like any entity (on Ray, sharded), its events are in the
journal (read sides and topics may follow them), and recovery is the entity's recovery. Its
commands are the executor's (and the operations'); its events::

    RunStarted        name, version, input (lagompy-serialized bytes), key, parent
    StepCompleted     position, step name, output (bytes)
    StepFailed        position, step name, error type and message
    SignalReceived    index, signal name, payload (bytes)
    CancelRequested   reason
    Compensated       index of the compensation, its name, ok or the error
    RunFinished       status (completed, failed, cancelled), output or error, and the steps
                      recorded with the finish (those the executor had not sent yet: the
                      records of a run's last applied asks), in position order
    RunReopened       an operator's resume / retry: steps from ``position`` on are dropped and
                      a new ``generation`` starts (the asks of the retried steps get new ids)

A position is recorded once: recording it again answers with the first record, so two
executors that briefly overlap on a run (a lease changing hands) agree on every result.

The executor's commands (``RecordStep``, ``RecordSteps``, ``RecordCompensated``,
``FinishRun``) carry the generation of the run they were decided for, and apply to that
generation only: one sent again after a runtime failure (its first try may have committed,
its reply lost), or sent late by an executor whose lease lapsed, finds the run reopened
since and changes nothing (records are refused, a compensation or a finish answers as for
a finished run). Without a generation (``None``: an executor of an earlier version, during
a deploy) a command applies to the run's current generation, as it did.
Values travel as bytes already encoded by the executor's serializer (which knows the
workflows' types), so the shard hosts need no user type to store them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lagompy.entity import Command, Effect, PersistentEntity, sharded_tag
from lagompy.errors import DuplicateWorkflowId, InvalidCommand, WorkflowNotFound
from lagompy.serialization import serializable

__all__ = [
    "ACTIVE",
    "FINISHED",
    "WORKFLOW_ENTITY",
    "WORKFLOW_TAG",
    "CancelRequested",
    "Compensated",
    "DeliverSignal",
    "FinishRun",
    "GetRun",
    "NoRun",
    "RecordCompensated",
    "RecordStep",
    "RecordSteps",
    "ReopenRun",
    "RequestCancel",
    "Run",
    "RunFinished",
    "RunReopened",
    "RunStarted",
    "SignalReceived",
    "SignalRecord",
    "StartRun",
    "StepCompleted",
    "StepFailed",
    "StepRecord",
    "WorkflowRun",
    "started_run",
]

WORKFLOW_ENTITY = "lagompy-workflow"
#: The runs' tag: partition i of the executor is shard i of this tag.
WORKFLOW_TAG = sharded_tag("lagompy-workflows", shards=4)

#: Statuses of a run that is not finished / that is.
ACTIVE = "running"
FINISHED = frozenset({"completed", "failed", "cancelled"})


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class StepRecord:
    """What a position holds: the step's name, and its output or its error."""

    position: int
    name: str
    ok: bool
    output: bytes = b""
    error_type: str = ""
    error: str = ""
    #: A durable timer's wake time (sleep, receive with a timeout), microseconds since 1970.
    wake_at_us: int | None = None


@dataclass(frozen=True)
class SignalRecord:
    index: int
    name: str
    payload: bytes


@dataclass(frozen=True)
class NoRun:
    """No run has this id (yet)."""


@dataclass(frozen=True)
class Run:
    name: str
    version: int
    input: bytes
    key: str | None
    parent: str | None
    started_us: int
    status: str = ACTIVE
    steps: tuple[StepRecord, ...] = ()
    signals: tuple[SignalRecord, ...] = ()
    cancel_reason: str | None = None
    #: Indexes (in registration order) of the compensations that ran.
    compensated: tuple[int, ...] = ()
    output: bytes | None = None
    error: str | None = None
    finished_us: int | None = None
    #: 0, then one more per reopen: part of the command ids of the run's asks, and carried
    #: by the executor's records, compensations and finish (see the module).
    generation: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


RunState = NoRun | Run


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class StartRun(Command[Run | None]):
    """Start the run. The answer is ``None`` when this command started it (its state is then
    the command's: :func:`started_run`), else the run as it is: a persisting command's reply
    is stored with its events, so the reply of the start that writes is kept small."""

    name: str
    version: int
    input: bytes
    key: str | None = None
    parent: str | None = None
    at_us: int = 0


@dataclass(frozen=True)
class GetRun(Command[RunState]):
    pass


@dataclass(frozen=True)
class RecordStep(Command[StepRecord]):
    """Record ``record`` at its position, or answer with what the position holds already."""

    record: StepRecord
    #: The run's generation the record is of (None: whichever is current; see the module).
    generation: int | None = None


@dataclass(frozen=True)
class RecordSteps(Command[tuple[StepRecord, ...]]):
    """Record ``records`` (consecutive positions) in one transaction; the answer holds the
    records of the positions recorded before (the first record of a position stays): empty
    when every one is recorded as sent."""

    records: tuple[StepRecord, ...]
    generation: int | None = None


@dataclass(frozen=True)
class DeliverSignal(Command[int]):
    name: str
    payload: bytes


@dataclass(frozen=True)
class RequestCancel(Command[Run]):
    reason: str


@dataclass(frozen=True)
class RecordCompensated(Command[None]):
    index: int
    name: str
    ok: bool
    error: str = ""
    generation: int | None = None


@dataclass(frozen=True)
class FinishRun(Command[Run | None]):
    """Finish the run, recording ``records`` first (the steps recorded in the background
    that were not written yet), in one transaction. The answer is ``None`` when this command
    finished the run (as it says), else the run as it is (finished before): the stored reply
    of the finish that writes stays small. A finish of an earlier generation than the run's
    (reopened since) answers the run as it is, as for a run finished before."""

    status: str
    output: bytes | None = None
    error: str | None = None
    at_us: int = 0
    records: tuple[StepRecord, ...] = ()
    generation: int | None = None


@dataclass(frozen=True)
class ReopenRun(Command[Run]):
    """Reopen a finished run (``resume``: from where it failed; ``retry``: from ``position``,
    dropping the steps recorded from there on)."""

    position: int | None = None


WorkflowCommand = (
    StartRun
    | GetRun
    | RecordStep
    | RecordSteps
    | DeliverSignal
    | RequestCancel
    | RecordCompensated
    | FinishRun
    | ReopenRun
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RunStarted:
    name: str
    version: int
    input: bytes
    key: str | None
    parent: str | None
    started_us: int


@dataclass(frozen=True)
class StepCompleted:
    position: int
    name: str
    output: bytes
    wake_at_us: int | None = None


@dataclass(frozen=True)
class StepFailed:
    position: int
    name: str
    error_type: str
    error: str


@dataclass(frozen=True)
class SignalReceived:
    index: int
    name: str
    payload: bytes


@dataclass(frozen=True)
class CancelRequested:
    reason: str


@dataclass(frozen=True)
class Compensated:
    index: int
    name: str
    ok: bool
    error: str = ""


def _no_steps(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "steps": []}


@serializable(version=2, upcasters={1: _no_steps})
@dataclass(frozen=True)
class RunFinished:
    """The run's end; ``steps``: the records written with it (version 1 had none: its steps
    were StepCompleted / StepFailed events before it), recorded before the finish."""

    status: str
    output: bytes | None
    error: str | None
    finished_us: int
    steps: tuple[StepRecord, ...] = ()


@dataclass(frozen=True)
class RunReopened:
    position: int
    generation: int


WorkflowEvent = (
    RunStarted
    | StepCompleted
    | StepFailed
    | SignalReceived
    | CancelRequested
    | Compensated
    | RunFinished
    | RunReopened
)


def started_run(command: StartRun) -> Run:
    """The state of the run that ``command`` started (what it answers ``None`` for)."""
    c = command
    return Run(c.name, c.version, c.input, c.key, c.parent, c.at_us)


def _stale(state: Run, generation: int | None) -> bool:
    """Whether a command of ``generation`` was decided for an earlier generation of the run
    (see the module)."""
    return generation is not None and generation != state.generation


def _record_event(record: StepRecord) -> StepCompleted | StepFailed:
    if record.ok:
        return StepCompleted(record.position, record.name, record.output, record.wake_at_us)
    return StepFailed(record.position, record.name, record.error_type, record.error)


class WorkflowRun(PersistentEntity[WorkflowCommand, WorkflowEvent, RunState]):
    """One workflow run (add it to the app's entities to run workflows)."""

    type_name = WORKFLOW_ENTITY
    initial_state = NoRun()
    tag = WORKFLOW_TAG
    snapshot_every = 50

    def on_command(self, state: RunState, command: WorkflowCommand) -> Effect[RunState]:
        match state, command:
            case _, GetRun():
                return Effect.reply(state)
            case NoRun(), StartRun(name=name, version=version, input=data, key=key, parent=p):
                return Effect.persist(RunStarted(name, version, data, key, p, command.at_us))
            case Run(), StartRun():
                if state.name != command.name or state.input != command.input:
                    what = "workflow" if state.name != command.name else "input"
                    raise DuplicateWorkflowId(
                        f"workflow run {self.entity_id!r} exists already ({state.name!r} "
                        f"version {state.version}, {state.status}) with another {what}: "
                        "a run id names one run; start another id for another run"
                    )
                return Effect.reply(state)
            case NoRun(), _:
                raise WorkflowNotFound(f"no workflow run has id {self.entity_id!r}")
            case Run(), RecordStep(record=record, generation=generation):
                self._check_generation(state, generation)
                return self._record(state, record)
            case Run(), RecordSteps(records=records, generation=generation):
                self._check_generation(state, generation)
                return self._record_all(state, records)
            case Run(), DeliverSignal(name=name, payload=payload):
                if state.finished:
                    raise InvalidCommand(
                        f"workflow run {self.entity_id!r} is {state.status}: it takes no signal"
                    )
                index = len(state.signals)
                return Effect.persist(SignalReceived(index, name, payload)).then_reply(index)
            case Run(), RequestCancel(reason=reason):
                if state.finished or state.cancel_reason is not None:
                    return Effect.reply(state)
                return Effect.persist(CancelRequested(reason)).then_reply(lambda s: s)
            case Run(), RecordCompensated(index=index, name=name, ok=ok, error=error):
                if (
                    index in state.compensated
                    or state.finished
                    or _stale(state, command.generation)
                ):
                    return Effect.reply(None)
                return Effect.persist(Compensated(index, name, ok, error))
            case Run(), FinishRun(status=status, output=output, error=error, records=records):
                if state.finished or _stale(state, command.generation):
                    return Effect.reply(state)
                if status not in FINISHED:
                    raise InvalidCommand(f"a run cannot finish as {status!r}")
                new, held = self._new_records(state, records)
                for record in held:
                    if record.name != records[record.position - records[0].position].name:
                        raise InvalidCommand(
                            f"workflow run {self.entity_id!r}: position {record.position} "
                            f"holds {record.name!r}, not the step this executor ran: it does "
                            "not finish the run"
                        )
                # One event: the records go with the finish (a 3-ask run writes 2 events).
                return Effect.persist(RunFinished(status, output, error, command.at_us, new))
            case Run(), ReopenRun(position=position):
                if not state.finished:
                    raise InvalidCommand(
                        f"workflow run {self.entity_id!r} is {state.status}: only a finished "
                        "run can be resumed or retried"
                    )
                keep = self._reopen_position(state, position)
                reopened = RunReopened(keep, state.generation + 1)
                return Effect.persist(reopened).then_reply(lambda s: s)
        return Effect.unhandled()

    def _check_generation(self, state: Run, generation: int | None) -> None:
        if _stale(state, generation):
            raise InvalidCommand(
                f"workflow run {self.entity_id!r} was reopened (generation "
                f"{state.generation}): it records no step of generation {generation}"
            )

    def _record(self, state: Run, record: StepRecord) -> Effect[RunState]:
        steps = state.steps
        if record.position < len(steps):
            return Effect.reply(steps[record.position])
        if record.position > len(steps) or state.finished:
            raise InvalidCommand(
                f"workflow run {self.entity_id!r} cannot record position {record.position}: "
                f"it holds {len(steps)} steps and is {state.status}"
            )
        return Effect.persist(_record_event(record)).then_reply(record)

    def _record_all(self, state: Run, records: tuple[StepRecord, ...]) -> Effect[RunState]:
        if state.finished and records:
            raise InvalidCommand(
                f"workflow run {self.entity_id!r} is {state.status}: it records no more steps"
            )
        new, held = self._new_records(state, records)
        return Effect.persist_all([_record_event(r) for r in new]).then_reply(held)

    def _new_records(
        self, state: Run, records: tuple[StepRecord, ...]
    ) -> tuple[tuple[StepRecord, ...], tuple[StepRecord, ...]]:
        """The ``records`` not recorded yet, and what the positions recorded before hold;
        consecutive positions from at most the next one, or InvalidCommand."""
        steps = state.steps
        new: list[StepRecord] = []
        held: list[StepRecord] = []
        for record in records:
            count = len(steps) + len(new)
            if record.position < len(steps):
                held.append(steps[record.position])
            elif record.position == count:
                new.append(record)
            else:
                raise InvalidCommand(
                    f"workflow run {self.entity_id!r} cannot record position "
                    f"{record.position}: it holds {count} steps"
                )
        return tuple(new), tuple(held)

    def _reopen_position(self, state: Run, position: int | None) -> int:
        steps = state.steps
        if position is None:
            # Resume: drop a final failed step, so that it runs again.
            failed = [s.position for s in steps if not s.ok]
            return failed[-1] if failed else len(steps)
        if not 0 <= position <= len(steps):
            raise InvalidCommand(
                f"workflow run {self.entity_id!r} has {len(steps)} recorded steps: cannot "
                f"retry from position {position}"
            )
        return position

    def on_event(self, state: RunState, event: WorkflowEvent) -> RunState:
        match state, event:
            case NoRun(), RunStarted(name=name, version=version, input=data, key=key, parent=p):
                return Run(name, version, data, key, p, event.started_us)
            case Run(), StepCompleted(position=pos, name=name, output=out, wake_at_us=wake):
                return replace(
                    state, steps=(*state.steps, StepRecord(pos, name, True, out, wake_at_us=wake))
                )
            case Run(), StepFailed(position=pos, name=name, error_type=etype, error=err):
                failed = StepRecord(pos, name, False, error_type=etype, error=err)
                return replace(state, steps=(*state.steps, failed))
            case Run(), SignalReceived(index=index, name=name, payload=payload):
                return replace(state, signals=(*state.signals, SignalRecord(index, name, payload)))
            case Run(), CancelRequested(reason=reason):
                return replace(state, cancel_reason=reason)
            case Run(), Compensated(index=index):
                return replace(state, compensated=(*state.compensated, index))
            case Run(), RunFinished(status=status, output=output, error=error, steps=steps):
                return replace(
                    state,
                    steps=(*state.steps, *steps) if steps else state.steps,
                    status=status,
                    output=output,
                    error=error,
                    finished_us=event.finished_us,
                )
            case Run(), RunReopened(position=position, generation=generation):
                return replace(
                    state,
                    status=ACTIVE,
                    steps=state.steps[:position],
                    output=None,
                    error=None,
                    finished_us=None,
                    cancel_reason=None,
                    compensated=(),
                    generation=generation,
                )
        self.unhandled_event(state, event)
