"""Operating runs: which runs (:class:`RunFilter`), one run in detail (:func:`inspect_run`),
an action over every run of a filter (:func:`bulk`) and the types (:func:`type_summaries`).

The HTTP routes (``_http.py``), the CLI (``_cli.py``) and the console's Workflows page are
views of these; they are built on :class:`~lagompy.workflow.WorkflowEngine`'s operations, the
runs index and the run's own events (whose journal timestamps give the steps' timings)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from sqlalchemy import and_, func, select

from lagompy.errors import (
    InvalidCommand,
    InvalidWorkflowInput,
    LagompyError,
    SerializationError,
)
from lagompy.sql._schema import workflow_runs
from lagompy.workflow._entity import (
    WORKFLOW_ENTITY,
    CancelRequested,
    Compensated,
    Run,
    RunFinished,
    RunReopened,
    RunStarted,
    SignalReceived,
    StepCompleted,
    StepFailed,
    StepRecord,
)
from lagompy.workflow._index import RunRow, _row, types

if TYPE_CHECKING:
    from lagompy.workflow._engine import WorkflowEngine

__all__ = [
    "BULK_ACTIONS",
    "STATUSES",
    "BulkResult",
    "RunFilter",
    "bulk",
    "cancel_run",
    "find_runs",
    "inspect_run",
    "parse_time",
    "row_dict",
    "type_summaries",
]

#: The statuses a run has in the index.
STATUSES = ("queued", "running", "completed", "failed", "cancelled")

#: The actions :func:`bulk` takes over a filter.
BULK_ACTIONS = ("cancel", "resume", "retry", "signal")

#: At most this many runs per bulk action (a filter matching more is refused: narrow it).
MAX_BULK = 10_000

#: Runs acted on at once by a bulk action.
BULK_CONCURRENCY = 16


def parse_time(value: str | datetime | None, what: str) -> int | None:
    """Microseconds since 1970 of an ISO 8601 time (UTC unless it says otherwise);
    ``InvalidWorkflowInput`` naming ``what`` if it is not one."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidWorkflowInput(
                f"{what} must be an ISO 8601 time such as 2026-12-04T10:00:00Z, got {text[:40]!r}"
            ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1_000_000)


def _iso(us: int | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, UTC).isoformat()


_PREFIX_CHARS = re.compile(r"^[^\x00-\x1f%_\\]*$")


@dataclass(frozen=True)
class RunFilter:
    """Which runs an operation lists or acts on.

    Runs of ``workflow``, in one of ``statuses``, started at or after ``since_us`` and before
    ``until_us`` (microseconds since 1970), whose id starts with ``id_prefix``, of ``key``,
    children of ``parent``. None (or empty) matches any."""

    workflow: str | None = None
    statuses: tuple[str, ...] = ()
    since_us: int | None = None
    until_us: int | None = None
    id_prefix: str | None = None
    key: str | None = None
    parent: str | None = None

    def __post_init__(self) -> None:
        for status in self.statuses:
            if status not in STATUSES:
                raise InvalidWorkflowInput(
                    f"status must be one of {', '.join(STATUSES)}, got {status[:40]!r}"
                )
        if self.id_prefix is not None and (
            len(self.id_prefix) > 255 or not _PREFIX_CHARS.match(self.id_prefix)
        ):
            raise InvalidWorkflowInput(
                "id_prefix must be at most 255 printable characters other than %, _ and \\"
            )
        for name in ("workflow", "key", "parent"):
            value = getattr(self, name)
            if value is not None and (len(value) > 255 or not value.isprintable()):
                raise InvalidWorkflowInput(f"{name} must be at most 255 printable characters")

    @classmethod
    def of(
        cls,
        *,
        workflow: str | None = None,
        status: str | Iterable[str] | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        id_prefix: str | None = None,
        key: str | None = None,
        parent: str | None = None,
    ) -> RunFilter:
        """A filter from text (the HTTP, CLI and console parameters): ``status`` may be a
        comma-separated list, ``since``/``until`` ISO 8601 times."""
        if isinstance(status, str):
            statuses = tuple(s.strip() for s in status.split(",") if s.strip())
        else:
            statuses = tuple(status or ())
        return cls(
            workflow=workflow or None,
            statuses=statuses,
            since_us=parse_time(since, "since"),
            until_us=parse_time(until, "until"),
            id_prefix=id_prefix or None,
            key=key or None,
            parent=parent or None,
        )

    def describe(self) -> str:
        """The filter in a line (the audit log's target of a bulk action)."""
        parts = [
            f"workflow={self.workflow or '*'}",
            f"status={','.join(self.statuses) or '*'}",
        ]
        if self.since_us is not None:
            parts.append(f"since={_iso(self.since_us)}")
        if self.until_us is not None:
            parts.append(f"until={_iso(self.until_us)}")
        for name in ("id_prefix", "key", "parent"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        return ", ".join(parts)

    def query_params(self) -> dict[str, str]:
        """The filter as HTTP query parameters (what :meth:`of` reads)."""
        params = {
            "workflow": self.workflow or "",
            "status": ",".join(self.statuses),
            "since": _iso(self.since_us) or "",
            "until": _iso(self.until_us) or "",
            "id_prefix": self.id_prefix or "",
            "key": self.key or "",
            "parent": self.parent or "",
        }
        return {k: v for k, v in params.items() if v}


async def find_runs(
    engine: WorkflowEngine, which: RunFilter, *, limit: int = 100, after: str | None = None
) -> list[RunRow]:
    """The runs of the index that ``which`` matches, ordered by id.

    ``after``: the previous page's last id."""
    t = workflow_runs
    conditions: list[Any] = []
    if which.workflow is not None:
        conditions.append(t.c.workflow == which.workflow)
    if which.statuses:
        conditions.append(t.c.status.in_(which.statuses))
    if which.since_us is not None:
        conditions.append(t.c.created_us >= which.since_us)
    if which.until_us is not None:
        conditions.append(t.c.created_us < which.until_us)
    if which.id_prefix:
        conditions.append(t.c.run_id.startswith(which.id_prefix, autoescape=True))
    if which.key is not None:
        conditions.append(t.c.run_key == which.key)
    if which.parent is not None:
        conditions.append(t.c.parent == which.parent)
    if after is not None:
        conditions.append(t.c.run_id > after)
    query = select(t).order_by(t.c.run_id).limit(limit)
    if conditions:
        query = query.where(and_(*conditions))
    async with engine.database.read() as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]


def row_dict(row: RunRow) -> dict[str, Any]:
    """A run of the index as JSON-able data."""
    duration = None
    if row.finished_us is not None:
        duration = round((row.finished_us - row.created_us) / 1e6, 6)
    return {
        "run_id": row.run_id,
        "workflow": row.workflow,
        "version": row.version,
        "key": row.key,
        "parent": row.parent,
        "status": row.status,
        "steps": row.steps,
        "cancel_requested": row.cancel_requested,
        "started_at": _iso(row.created_us),
        "updated_at": _iso(row.updated_us),
        "finished_at": _iso(row.finished_us),
        "duration_s": duration,
        "wake_at": _iso(row.wake_at_us),
        "error": row.error,
    }


def plain(value: Any) -> Any:
    """A decoded value as JSON-able data (a dataclass by its fields...), else its repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        return TypeAdapter(type(value)).dump_python(value, mode="json")
    except Exception:
        return repr(value)[:1000]


def _value(engine: WorkflowEngine, data: bytes | None, annotation: Any) -> Any:
    if data is None or data == b"":
        return None
    try:
        return plain(engine.serializer.decode_value(data, annotation))
    except (SerializationError, LagompyError, ValueError, TypeError):
        return f"<{len(data)} bytes that do not decode here>"


def _positions(records: tuple[StepRecord, ...]) -> str:
    """The positions of ``records`` (consecutive): ``2`` or ``2-4``."""
    first, last = records[0].position, records[-1].position
    return str(first) if first == last else f"{first}-{last}"


async def inspect_run(
    engine: WorkflowEngine, run_id: str, *, values: bool = True
) -> dict[str, Any]:
    """One run in detail: what the index and the entity say (status, input, output, error,
    cancel reason), its current steps with their times (each step's seconds are from the
    run's previous event to its own, by the journal's timestamps), signals, compensations,
    and its whole history (every event, across resumes and retries). ``values``: False
    leaves out the input, the output and the signals' and steps' values
    (``WorkflowNotFound`` if no run has this id)."""
    status = await engine.status(run_id)
    run = await engine.get(run_id)
    try:
        definition = engine.workflows.for_run(run.name, run.version)
        input_type, output_type = definition.input_type, definition.output_type
    except LagompyError:
        input_type = output_type = Any
    envelopes = await engine.journal_of(run_id).events(WORKFLOW_ENTITY, run_id)
    history: list[dict[str, Any]] = []
    step_at: dict[int, tuple[str, float | None]] = {}
    signals: list[dict[str, Any]] = []
    compensations: list[dict[str, Any]] = []
    previous: datetime | None = None
    for envelope in envelopes:
        at = envelope.timestamp
        since = None if previous is None else round((at - previous).total_seconds(), 6)
        previous = at
        event = envelope.event
        what: str
        match event:
            case RunStarted(name=name, version=version):
                what = f"started {name} version {version}"
            case StepCompleted(position=p, name=name):
                step_at[p] = (at.isoformat(), since)
                what = f"step {p} {name!r} completed"
            case StepFailed(position=p, name=name, error_type=etype, error=error):
                step_at[p] = (at.isoformat(), since)
                what = f"step {p} {name!r} failed: {etype}: {error}"
            case SignalReceived(index=index, name=name):
                signals.append({"index": index, "name": name, "at": at.isoformat()})
                what = f"signal {index} {name!r} received"
            case CancelRequested(reason=reason):
                what = f"cancel requested: {reason}"
            case Compensated(index=index, name=name, ok=ok, error=error):
                compensations.append(
                    {"index": index, "name": name, "ok": ok, "error": error or None,
                     "at": at.isoformat()}
                )  # fmt: skip
                what = f"compensation {index} {name!r} " + ("ran" if ok else f"failed: {error}")
            case RunFinished(status=finished, error=error, steps=recorded):
                for i, record in enumerate(recorded):  # the last steps, written with it
                    step_at[record.position] = (at.isoformat(), since if i == 0 else 0.0)
                what = f"finished {finished}" + (f": {error}" if error else "")
                if recorded:
                    what += f", with steps {_positions(recorded)}"
            case RunReopened(position=p, generation=generation):
                compensations = []  # a reopened run's compensations are the new attempt's
                what = f"reopened from position {p} (generation {generation})"
            case _:
                what = type(event).__name__
        history.append(
            {"seq_nr": envelope.seq_nr, "at": at.isoformat(), "since_previous_s": since,
             "event": type(event).__name__, "what": what}
        )  # fmt: skip
    steps = []
    for record in run.steps:
        at_text, seconds = step_at.get(record.position, (None, None))
        step: dict[str, Any] = {
            "position": record.position,
            "name": record.name,
            "ok": record.ok,
            "at": at_text,
            "seconds": seconds,
            "error_type": record.error_type or None,
            "error": record.error or None,
            "wake_at": _iso(record.wake_at_us),
        }
        if values:
            step["output"] = _value(engine, record.output, Any) if record.ok else None
        steps.append(step)
    detail: dict[str, Any] = {
        "run_id": run_id,
        "workflow": run.name,
        "version": run.version,
        "key": run.key,
        "parent": run.parent,
        "status": status.status,
        "generation": run.generation,
        "started_at": _iso(run.started_us),
        "finished_at": _iso(run.finished_us),
        "duration_s": None
        if run.finished_us is None
        else round((run.finished_us - run.started_us) / 1e6, 6),
        "cancel_reason": run.cancel_reason,
        "error": run.error,
        "steps": steps,
        "signals": signals,
        "compensations": compensations,
        "history": history,
    }
    if values:
        detail["input"] = _value(engine, run.input, input_type)
        detail["output"] = _value(engine, run.output, output_type)
        for signal, received in zip(signals, run.signals, strict=False):
            signal["payload"] = _value(engine, received.payload, Any)
    return detail


async def cancel_run(engine: WorkflowEngine, run_id: str, reason: str) -> Run:
    """:meth:`~lagompy.workflow.WorkflowEngine.cancel`, refused (``InvalidCommand``) for a run
    that finished otherwise (a cancelled one answers as it is: a cancel is idempotent)."""
    run = await engine.cancel(run_id, reason)
    if run.finished and run.status != "cancelled":
        raise InvalidCommand(f"workflow run {run_id!r} is {run.status}: there is nothing to cancel")
    return run


@dataclass(frozen=True)
class BulkResult:
    """What a bulk action did: how many runs the filter matched, how many took the action,
    and why each of the others refused it (by run id)."""

    action: str
    matched: int
    done: int
    refused: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "matched": self.matched,
            "done": self.done,
            "refused": self.refused,
        }


def action_of(
    engine: WorkflowEngine,
    action: str,
    *,
    reason: str | None = None,
    position: int | None = None,
    signal: str | None = None,
    payload: Any = None,
) -> Callable[[str], Awaitable[Any]]:
    """The operation ``action`` (cancel, resume, retry, signal) on one run id, with its
    arguments checked (``InvalidWorkflowInput`` naming what is missing or wrong)."""
    match action:
        case "cancel":
            text = reason or "cancelled by an operator"
            return lambda run_id: cancel_run(engine, run_id, text)
        case "resume":
            return engine.resume
        case "retry":
            if position is None or position < 0:
                raise InvalidWorkflowInput("retry needs a position of 0 or more")
            at = position
            return lambda run_id: engine.retry(run_id, at)
        case "signal":
            if not signal:
                raise InvalidWorkflowInput("signal needs the signal's name")
            name = signal
            return lambda run_id: engine.send_signal(run_id, name, payload)
    raise InvalidWorkflowInput(
        f"the action must be one of {', '.join(BULK_ACTIONS)}, got {action[:40]!r}"
    )


async def bulk(
    engine: WorkflowEngine,
    action: str,
    which: RunFilter,
    **arguments: Any,
) -> BulkResult:
    """Take ``action`` (cancel, resume, retry, signal) on every run that ``which`` matches.

    At most :data:`MAX_BULK` runs: a filter matching more is refused before anything is done.
    A run that refuses (a running run asked to resume...) is listed with its reason; the
    others go on. The arguments are :func:`action_of`'s."""
    operate = action_of(engine, action, **arguments)
    ids: list[str] = []
    after: str | None = None
    while True:
        page = await find_runs(engine, which, limit=1000, after=after)
        ids += [r.run_id for r in page]
        if len(ids) > MAX_BULK:
            raise InvalidWorkflowInput(
                f"the filter ({which.describe()}) matches more than {MAX_BULK} runs: narrow it"
            )
        if len(page) < 1000:
            break
        after = page[-1].run_id
    gate = asyncio.Semaphore(BULK_CONCURRENCY)
    refused: dict[str, str] = {}

    async def one(run_id: str) -> None:
        async with gate:
            try:
                await operate(run_id)
            except LagompyError as e:
                refused[run_id] = f"{type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in ids))
    return BulkResult(action, len(ids), len(ids) - len(refused), dict(sorted(refused.items())))


async def type_summaries(engine: WorkflowEngine) -> list[dict[str, Any]]:
    """Each registered workflow (and any other the index knows): its latest version,
    ``max_running``,
    ``paused``, and how many runs it has in each status."""
    t = workflow_runs
    query = select(t.c.workflow, t.c.status, func.count()).group_by(t.c.workflow, t.c.status)
    async with engine.database.read() as conn:
        rows = (await conn.execute(query)).all()
    counts: dict[str, dict[str, int]] = {}
    for name, status, n in rows:
        counts.setdefault(name, {})[status] = int(n)
    flow = await types(engine.database)
    names = sorted(set(engine.workflows.names()) | set(counts) | set(flow))
    found = []
    for name in names:
        try:
            latest: int | None = engine.workflows.latest(name).version
        except LagompyError:
            latest = None  # runs of a workflow this process does not register
        row = flow.get(name)
        found.append(
            {
                "workflow": name,
                "latest_version": latest,
                "max_running": None if row is None else row.max_running,
                "paused": False if row is None else row.paused,
                "counts": {s: counts.get(name, {}).get(s, 0) for s in STATUSES},
            }
        )
    return found
