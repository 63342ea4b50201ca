"""What a workflow's code calls: :class:`WorkflowContext`.

Every call that has an outcome takes the run's next *position*. When the run is replayed (after
a crash, a lease changing hands, a deploy), a position that holds a record returns it: the
recorded output, or the recorded failure raised again, never running the step twice; its
recorded step name must be the one the code calls now, else :class:`WorkflowNonDeterminism`
names both. A position with no record runs live and is recorded.

* ``ask``: a command to an entity, with command id ``{run}:{generation}:{position}``: exactly
  once (a re-run gets the entity's stored reply). A rejection is recorded and raised as
  :class:`StepFailed`.
* ``step``: external work (an HTTP call...), at least once, retried by its policy; its result
  (or final failure) is recorded once.
* ``sleep``: a durable timer (its wake time is recorded, a restart sleeps what is left).
* ``receive``: the next signal of a name (``send_signal`` from outside), with a durable timeout.
* ``child``: start another workflow (id ``{run}/{position}`` unless given) and wait for it.
* ``patched``: a change marker that lets one code path serve runs recorded before the change.
* ``compensate`` / ``compensate_ask``: undo actions registered before the step they undo; run
  in reverse order when the workflow fails or is cancelled (shielded from the cancellation),
  each recorded once done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from lagompy.entity import Command, PersistentEntity, reply_type_of
from lagompy.errors import (
    CommandRejected,
    HandlerFailed,
    SerializationError,
    StepFailed,
    WorkflowCancelled,
    WorkflowNonDeterminism,
)
from lagompy.workflow._entity import Run, SignalRecord, StepRecord
from lagompy.workflow._registry import RetryPolicy, return_annotation

if TYPE_CHECKING:
    from lagompy.workflow._executor import RunDriver

__all__ = ["Compensation", "WorkflowContext"]

R = TypeVar("R")


def now_us() -> int:
    return int(time.time() * 1_000_000)


@dataclass(frozen=True)
class Compensation:
    index: int
    name: str
    run: Callable[[], Awaitable[Any]]
    retry: RetryPolicy


class WorkflowContext:
    """The run's side of the engine, given to the workflow's ``async def`` (see the module)."""

    def __init__(self, driver: RunDriver, run: Run) -> None:
        self._driver = driver
        self.run_id = driver.run_id
        self.workflow = run.name
        self.version = run.version
        self._generation = run.generation
        self._steps: list[StepRecord] = list(run.steps)
        self._signals: dict[int, SignalRecord] = {s.index: s for s in run.signals}
        self._signal_arrived = asyncio.Event()
        self._position = 0
        self._consumed: set[int] = set()
        self.compensations: list[Compensation] = []
        #: Set when a cancel was asked: the next live call raises WorkflowCancelled.
        self.cancel_reason: str | None = run.cancel_reason
        #: What stopped the run for good regardless of what its code catches.
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ status

    @property
    def replaying(self) -> bool:
        """True while the code is at a position that holds a record."""
        return self._position < len(self._steps)

    @property
    def position(self) -> int:
        return self._position

    # ------------------------------------------------------------------ positions

    def _fail(self, error: BaseException) -> BaseException:
        self.fatal = error
        return error

    def _replayed(self, name: str) -> StepRecord | None:
        """The record at the current position (checked against ``name``), or None when live."""
        if self.fatal is not None:
            raise self.fatal
        p = self._position
        if p < len(self._steps):
            record = self._steps[p]
            if record.name != name:
                raise self._fail(
                    WorkflowNonDeterminism(
                        f"workflow run {self.run_id!r} ({self.workflow} version {self.version}) "
                        f"recorded step {record.name!r} at position {p}, but the code now "
                        f"calls {name!r} there: the code changed in a way recorded runs cannot "
                        "follow (put the change behind ctx.patched(...))",
                        run_id=self.run_id,
                        position=p,
                        recorded=record.name,
                        called=name,
                    )
                )
            self._position += 1
            return record
        if self.cancel_reason is not None:
            raise WorkflowCancelled(
                f"workflow run {self.run_id!r} was cancelled: {self.cancel_reason}"
            )
        return None

    async def _record(self, record: StepRecord) -> StepRecord:
        """Record ``record`` at its position; the answer is what the position holds (the first
        record, if another executor got there first)."""
        stored = await self._driver.record(record)
        if stored.name != record.name:
            raise self._fail(
                WorkflowNonDeterminism(
                    f"workflow run {self.run_id!r}: position {record.position} holds "
                    f"{stored.name!r}, recorded by another executor, where this one ran "
                    f"{record.name!r}",
                    run_id=self.run_id,
                    position=record.position,
                    recorded=stored.name,
                    called=record.name,
                )
            )
        if record.position == len(self._steps):
            self._steps.append(stored)
        self._position = record.position + 1
        return stored

    def _command_id(self, position: int | str) -> str:
        return f"{self.run_id}:{self._generation}:{position}"

    def _encode(self, value: Any, annotation: Any) -> bytes:
        return self._driver.serializer.encode_value(value, annotation)

    def _decode(self, data: bytes, annotation: Any) -> Any:
        return self._driver.serializer.decode_value(data, annotation)

    @staticmethod
    def _raise_failed(record: StepRecord) -> None:
        if record.error_type == "WorkflowCancelled":
            raise WorkflowCancelled(record.error)
        raise StepFailed(
            f"step {record.name!r} failed: {record.error_type}: {record.error}",
            step=record.name,
            error_type=record.error_type,
            error=record.error,
        )

    def _result(self, record: StepRecord, annotation: Any) -> Any:
        if not record.ok:
            self._raise_failed(record)
        return self._decode(record.output, annotation)

    # ------------------------------------------------------------------ entity asks

    async def ask(
        self,
        entity: type[PersistentEntity[Any, Any, Any]] | str,
        entity_id: str,
        command: Command[R],
    ) -> R:
        """Send ``command`` to an entity, exactly once (its command id derives from the run
        and the position); a rejection raises :class:`StepFailed` (``error_type`` names the
        rejection's class), now and on every replay."""
        type_name = entity if isinstance(entity, str) else entity.type_name
        name = f"ask {type_name} {type(command).__name__}"
        annotation = reply_type_of(type(command))
        recorded = self._replayed(name)
        if recorded is not None:
            result: R = self._result(recorded, annotation)
            return result
        p = self._position
        try:
            receipt = await self._driver.ask_step(entity, entity_id, command, self._command_id(p))
            record = StepRecord(p, name, True, self._encode(receipt.reply, annotation))
        except (CommandRejected, HandlerFailed, SerializationError) as e:
            record = StepRecord(p, name, False, error_type=type(e).__name__, error=str(e))
        else:
            if receipt.committed:
                # Applied: its command id gives this reply back if the record is lost, so the
                # run goes on while the record is written (the next record waits for it).
                self._steps.append(record)
                self._position = p + 1
                self._driver.defer(record)
                deferred: R = self._result(record, annotation)
                return deferred
        stored = await self._record(record)
        value: R = self._result(stored, annotation)
        return value

    # ------------------------------------------------------------------ external steps

    @overload
    async def step(
        self,
        fn: Callable[..., Awaitable[R]],
        *args: Any,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> R: ...

    @overload
    async def step(
        self,
        fn: Callable[..., R],
        *args: Any,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> R: ...

    async def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``fn(*args)`` (a coroutine function or a plain one) at least once, retried by
        ``retry`` (default: the workflow's policy) with ``timeout`` seconds per try; its result
        is recorded once (serialized by ``fn``'s return annotation) and replayed after."""
        step_name = name or getattr(fn, "__qualname__", None) or repr(fn)
        annotation = return_annotation(fn)
        recorded = self._replayed(step_name)
        if recorded is not None:
            return self._result(recorded, annotation)
        p = self._position
        policy = retry or self._driver.definition.retry
        self._driver.send_records()  # the asks before it, recorded while it runs
        try:
            value = await _attempts(fn, args, policy, timeout)
            record = StepRecord(p, step_name, True, self._encode(value, annotation))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            record = StepRecord(p, step_name, False, error_type=type(e).__name__, error=str(e))
        stored = await self._record(record)
        return self._result(stored, annotation)

    # ------------------------------------------------------------------ time and signals

    async def _timer(self, name: str, seconds: float) -> StepRecord:
        recorded = self._replayed(name)
        if recorded is None:
            wake = now_us() + int(max(0.0, seconds) * 1_000_000)
            recorded = await self._record(StepRecord(self._position, name, True, wake_at_us=wake))
        return recorded

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake time is recorded, a resumed run sleeps only what is left.
        A sleeping run holds no thread and no CPU (one waiting coroutine)."""
        record = await self._timer("sleep", seconds)
        assert record.wake_at_us is not None
        await _sleep_until(record.wake_at_us)

    def add_signal(self, signal: SignalRecord) -> None:
        if signal.index not in self._signals:
            self._signals[signal.index] = signal
            self._signal_arrived.set()

    async def receive(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal ``name`` sent to this run (``send_signal``), waiting
        for it; ``TimeoutError`` after ``timeout`` seconds (a durable deadline)."""
        deadline: int | None = None
        if timeout is not None:
            deadline = (await self._timer(f"receive-timeout {name}", timeout)).wake_at_us
        step_name = f"receive {name}"
        recorded = self._replayed(step_name)
        if recorded is None:
            p = self._position
            while True:
                signal = self._next_signal(name)
                if signal is not None:
                    output = self._encode((signal.index, signal.payload), tuple[int, bytes])
                    recorded = await self._record(StepRecord(p, step_name, True, output))
                    break
                if deadline is not None and now_us() >= deadline:
                    recorded = await self._record(
                        StepRecord(
                            p,
                            step_name,
                            False,
                            error_type="TimeoutError",
                            error=f"no signal {name!r} within {timeout} s",
                        )
                    )
                    break
                self._signal_arrived.clear()
                self._driver.send_records()  # the asks before it, recorded while it waits
                wait = None if deadline is None else max(0.0, (deadline - now_us()) / 1e6)
                try:
                    async with asyncio.timeout(wait):
                        await self._signal_arrived.wait()
                except TimeoutError:
                    pass
        if not recorded.ok:
            if recorded.error_type == "TimeoutError":
                raise TimeoutError(recorded.error)
            self._raise_failed(recorded)
        index, payload = self._decode(recorded.output, tuple[int, bytes])
        self._consumed.add(index)
        return self._decode(payload, Any)

    def _next_signal(self, name: str) -> SignalRecord | None:
        for index in sorted(self._signals):
            signal = self._signals[index]
            if signal.name == name and index not in self._consumed:
                return signal
        return None

    # ------------------------------------------------------------------ versions

    async def patched(self, change_id: str) -> bool:
        """True for runs that reach this point with the changed code (new runs, and old runs
        past the end of what they recorded), False for runs whose recorded history went on
        without the change: ``if await ctx.patched("add-audit"): await ctx.step(audit)``."""
        if self.fatal is not None:
            raise self.fatal
        name = f"patch {change_id}"
        p = self._position
        if p < len(self._steps):
            if self._steps[p].name == name:
                self._position += 1
                return True
            return False
        await self._record(StepRecord(p, name, True))
        return True

    # ------------------------------------------------------------------ children

    async def child(
        self, workflow: str, input: Any, *, id: str | None = None, version: int | None = None
    ) -> Any:
        """Start workflow ``workflow`` with ``input`` as a child run (id ``{run}/{position}``
        unless given) and wait for its output; its failure raises :class:`StepFailed`."""
        step_name = f"child {workflow}"
        recorded = self._replayed(step_name)
        if recorded is None:
            p = self._position
            child_id = id or f"{self.run_id}/{p}"
            self._driver.send_records()  # the asks before it, recorded while it runs
            try:
                run = await self._driver.run_child(child_id, workflow, input, version)
                if run.status == "completed":
                    record = StepRecord(p, step_name, True, run.output or b"")
                else:
                    record = StepRecord(
                        p, step_name, False, error_type=f"child {run.status}", error=run.error or ""
                    )
            except (CommandRejected, SerializationError, ValueError) as e:
                record = StepRecord(p, step_name, False, error_type=type(e).__name__, error=str(e))
            recorded = await self._record(record)
        if not recorded.ok:
            self._raise_failed(recorded)
        definition = self._driver.workflows.latest(workflow)
        return self._decode(recorded.output, definition.output_type)

    # ------------------------------------------------------------------ compensation

    def compensate(
        self,
        fn: Callable[..., Awaitable[Any]] | Callable[..., Any],
        *args: Any,
        name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Register ``fn(*args)`` to undo the next step(s), before calling them: when the
        workflow fails or is cancelled, the registered compensations run in reverse order
        (at least once each, retried by ``retry``), shielded from the cancellation."""
        index = len(self.compensations)
        label = name or getattr(fn, "__qualname__", None) or repr(fn)
        policy = retry or self._driver.definition.retry

        async def run() -> Any:
            return await _attempts(fn, args, policy, None)

        self.compensations.append(Compensation(index, label, run, policy))

    def compensate_ask(
        self,
        entity: type[PersistentEntity[Any, Any, Any]] | str,
        entity_id: str,
        command: Command[Any],
    ) -> None:
        """Register a command to an entity as a compensation (exactly once: its command id
        derives from the run and the compensation's index)."""
        index = len(self.compensations)
        type_name = entity if isinstance(entity, str) else entity.type_name
        cid = self._command_id(f"c{index}")

        async def run() -> Any:
            return await self._driver.ask_entity(entity, entity_id, command, cid)

        label = f"ask {type_name} {type(command).__name__}"
        self.compensations.append(Compensation(index, label, run, RetryPolicy(max_attempts=1)))


async def _attempts(
    fn: Callable[..., Any], args: tuple[Any, ...], policy: RetryPolicy, timeout: float | None
) -> Any:
    attempt = 0
    while True:
        attempt += 1
        try:
            async with asyncio.timeout(timeout):
                result = fn(*args)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
            return result
        except asyncio.CancelledError:
            raise
        except policy.retry_on:
            if attempt >= policy.max_attempts:
                raise
        await asyncio.sleep(policy.delay(attempt))


async def _sleep_until(wake_at_us: int) -> None:
    while True:
        left = (wake_at_us - now_us()) / 1e6
        if left <= 0:
            return
        await asyncio.sleep(left)
