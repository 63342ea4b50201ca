"""The runs index (``lagompy_workflow_runs``) and the types' flow control
(``lagompy_workflow_types``), in the journal's database.

:class:`RunsIndex` is the read-side processor of the runs' tag that the executor's consumers
run: each run's events become its row, committed with the consumer's position in one
transaction (exactly once). :func:`admit` moves queued runs to ``running`` within the limits
(the one write outside the consumer): one transaction per batch, the type's row locked on
PostgreSQL (``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` serializes writers anyway), so that
the limits hold across executors:

* ``max_running`` of the workflow (a queue: the oldest queued runs go first),
* at most one running run per (workflow, key),
* a ``paused`` workflow admits nothing (its running runs go on).

A run with no key of a workflow with no limit that is not paused needs no admission: its row
starts ``running`` and the executor of the process that started it drives it at once
(:func:`unlimited`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, case, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.journal._journal import EventEnvelope
from lagompy.readside._processor import SqlReadSideProcessor
from lagompy.sql._database import Database
from lagompy.sql._schema import workflow_runs, workflow_types
from lagompy.workflow._context import now_us
from lagompy.workflow._entity import (
    WORKFLOW_TAG,
    CancelRequested,
    RunFinished,
    RunReopened,
    RunStarted,
    StepCompleted,
    StepFailed,
    WorkflowRun,
)

__all__ = ["INDEX_NAME", "RunRow", "RunsIndex", "TypeRow", "admit", "list_runs", "run_row"]

#: The consumer name of the executor (its offsets row in ``lagompy_readside_offsets``).
INDEX_NAME = "lagompy-workflows"

QUEUED = "queued"
RUNNING = "running"


@dataclass(frozen=True)
class RunRow:
    """A run as the index shows it."""

    run_id: str
    workflow: str
    version: int
    key: str | None
    parent: str | None
    status: str
    tag: str
    steps: int
    wake_at_us: int | None
    cancel_requested: bool
    created_us: int
    updated_us: int
    finished_us: int | None
    error: str | None


@dataclass(frozen=True)
class TypeRow:
    workflow: str
    max_running: int | None
    paused: bool


def _row(r: Any) -> RunRow:
    return RunRow(
        r.run_id,
        r.workflow,
        r.version,
        r.run_key,
        r.parent,
        r.status,
        r.tag,
        r.steps,
        r.wake_at_us,
        bool(r.cancel_requested),
        r.created_us,
        r.updated_us,
        r.finished_us,
        r.error,
    )


def _set(*bound: str, **constants: Any) -> Any:
    """``UPDATE lagompy_workflow_runs SET ... WHERE run_id = :rid``: each ``bound`` column to
    the value ``:v_<column>``, each of ``constants`` to its value."""
    t = workflow_runs
    values = {name: bindparam(f"v_{name}", type_=t.c[name].type) for name in bound}
    return (
        update(t)
        .where(t.c.run_id == bindparam("rid", type_=t.c.run_id.type))
        .values(**values, **constants)
    )


def _insert(status: Any) -> Any:
    t = workflow_runs
    values: dict[str, Any] = {
        c.name: bindparam(f"v_{c.name}", type_=c.type) for c in t.c if c.name != "status"
    }
    return t.insert().values(status=status, **values)


_types = workflow_types
#: A started run's row (statements built once: the read side sends a batch's rows of one
#: statement as one executemany, see docs/readside.md): queued when it has a key, else
#: running when its workflow has no limit and is not paused (see ``unlimited``), queued
#: otherwise. The lookup is a subquery of the INSERT, not a SELECT of the handler (a read in
#: the handler would send every write before it, one run at a time).
_INSERT_KEYED = _insert(QUEUED)
_INSERT = _insert(
    case(
        (
            exists()
            .where(_types.c.workflow == bindparam("v_workflow", type_=_types.c.workflow.type))
            .where(_types.c.max_running.is_(None))
            .where(_types.c.paused.is_(False)),
            RUNNING,
        ),
        else_=QUEUED,
    )
)
_STEPPED = _set("steps", "wake_at_us", "updated_us")
_CANCEL_REQUESTED = _set("updated_us", cancel_requested=True)
#: A run's end; ``steps`` is the count of its steps when it carries the last ones (NULL: as
#: it is), so that every finish is one statement (one executemany per run of finishes).
_FINISHED = _set(
    "status",
    "error",
    "finished_us",
    "updated_us",
    wake_at_us=None,
    steps=func.coalesce(
        bindparam("v_steps", type_=workflow_runs.c.steps.type), workflow_runs.c.steps
    ),
)
_REOPENED = _set(
    "steps",
    "updated_us",
    status=QUEUED,
    error=None,
    finished_us=None,
    cancel_requested=False,
    wake_at_us=None,
)


class RunsIndex(SqlReadSideProcessor):
    """Keeps ``lagompy_workflow_runs`` (one row per run) from the runs' events."""

    name = INDEX_NAME
    tag = WORKFLOW_TAG
    entities = (WorkflowRun,)

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        run_id = envelope.entity_id
        at = int(envelope.timestamp.timestamp() * 1_000_000)
        match envelope.event:
            case RunStarted(name=name, version=version, key=key, parent=parent):
                await conn.execute(
                    _INSERT if key is None else _INSERT_KEYED,
                    {
                        "v_run_id": run_id,
                        "v_workflow": name,
                        "v_version": version,
                        "v_run_key": key,
                        "v_parent": parent,
                        "v_tag": WORKFLOW_TAG.for_entity(run_id),
                        "v_steps": 0,
                        "v_wake_at_us": None,
                        "v_cancel_requested": False,
                        "v_created_us": at,
                        "v_updated_us": at,
                        "v_finished_us": None,
                        "v_error": None,
                    },
                )
            case StepCompleted(position=p, wake_at_us=wake):
                await conn.execute(
                    _STEPPED,
                    {"rid": run_id, "v_steps": p + 1, "v_wake_at_us": wake, "v_updated_us": at},
                )
            case StepFailed(position=p):
                await conn.execute(
                    _STEPPED,
                    {"rid": run_id, "v_steps": p + 1, "v_wake_at_us": None, "v_updated_us": at},
                )
            case CancelRequested():
                await conn.execute(_CANCEL_REQUESTED, {"rid": run_id, "v_updated_us": at})
            case RunFinished(status=status, error=error, steps=steps):
                await conn.execute(
                    _FINISHED,
                    {
                        "rid": run_id,
                        "v_steps": steps[-1].position + 1 if steps else None,
                        "v_status": status,
                        "v_error": error,
                        "v_finished_us": at,
                        "v_updated_us": at,
                    },
                )
            case RunReopened(position=p):
                await conn.execute(_REOPENED, {"rid": run_id, "v_steps": p, "v_updated_us": at})
            case _:
                pass  # signals and compensations change no column


def unlimited(max_running: int | None, paused: bool) -> bool:
    """Whether a new run with no key of a workflow with this limit and pause flag runs at
    once: no limit and not paused. Such a run started in an executor's process runs without
    an admission (its row starts ``running``): nothing could make it wait."""
    return max_running is None and not paused


async def run_row(database: Database, run_id: str) -> RunRow | None:
    async with database.read() as conn:
        r = (
            await conn.execute(select(workflow_runs).where(workflow_runs.c.run_id == run_id))
        ).first()
    return None if r is None else _row(r)


async def list_runs(
    database: Database,
    *,
    workflow: str | None = None,
    status: str | Iterable[str] | None = None,
    key: str | None = None,
    tag: str | None = None,
    parent: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> list[RunRow]:
    """Runs by id order (``after``: the last id of the previous page), filtered."""
    t = workflow_runs
    query = select(t).order_by(t.c.run_id).limit(limit)
    if workflow is not None:
        query = query.where(t.c.workflow == workflow)
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        query = query.where(t.c.status.in_(statuses))
    if key is not None:
        query = query.where(t.c.run_key == key)
    if tag is not None:
        query = query.where(t.c.tag == tag)
    if parent is not None:
        query = query.where(t.c.parent == parent)
    if after is not None:
        query = query.where(t.c.run_id > after)
    async with database.read() as conn:
        return [_row(r) for r in (await conn.execute(query)).all()]


async def count_runs(database: Database, workflow: str | None = None) -> dict[str, int]:
    """How many runs per status (of ``workflow``, or all)."""
    t = workflow_runs
    query = select(t.c.status, func.count()).group_by(t.c.status)
    if workflow is not None:
        query = query.where(t.c.workflow == workflow)
    async with database.read() as conn:
        return {status: int(n) for status, n in (await conn.execute(query)).all()}


def _upsert(database: Database, values: dict[str, Any], keep: Sequence[str]) -> Any:
    dialect = postgresql if database.dialect == "postgresql" else sqlite
    stmt = dialect.insert(workflow_types).values(**values)
    return stmt.on_conflict_do_update(
        index_elements=[workflow_types.c.workflow],
        set_={k: stmt.excluded[k] for k in values if k not in keep and k != "workflow"},
    )


async def declare_types(database: Database, limits: dict[str, int | None]) -> None:
    """Store each workflow's ``max_running`` (from the code); ``paused`` stays as it is."""
    if not limits:
        return
    at = now_us()
    async with database.write() as conn:
        for name, limit in limits.items():
            values = {"workflow": name, "max_running": limit, "paused": False, "updated_us": at}
            await conn.execute(_upsert(database, values, keep=("paused",)))


async def set_paused(database: Database, workflow: str, paused: bool) -> None:
    values = {"workflow": workflow, "max_running": None, "paused": paused, "updated_us": now_us()}
    async with database.write() as conn:
        await conn.execute(_upsert(database, values, keep=("max_running",)))


async def types(database: Database) -> dict[str, TypeRow]:
    async with database.read() as conn:
        rows = (await conn.execute(select(workflow_types))).all()
    return {r.workflow: TypeRow(r.workflow, r.max_running, bool(r.paused)) for r in rows}


async def admit(database: Database, run_ids: Sequence[str]) -> set[str]:
    """Move the queued runs among ``run_ids`` to ``running`` as far as their workflows'
    limits allow, in one transaction; returns the ids now running (admitted now or before)."""
    if not run_ids:
        return set()
    t = workflow_runs
    admitted: set[str] = set()
    async with database.write() as conn:
        rows = [
            _row(r)
            for r in (await conn.execute(select(t).where(t.c.run_id.in_(list(run_ids))))).all()
        ]
        admitted.update(r.run_id for r in rows if r.status == RUNNING)
        queued = [r for r in rows if r.status == QUEUED]
        names = sorted({r.workflow for r in queued})
        if not names:
            return admitted
        tq = select(workflow_types).where(workflow_types.c.workflow.in_(names))
        if database.dialect == "postgresql":
            tq = tq.with_for_update()
        limits = {
            r.workflow: TypeRow(r.workflow, r.max_running, bool(r.paused))
            for r in (await conn.execute(tq)).all()
        }
        go: list[str] = []
        for name in names:
            kind = limits.get(name, TypeRow(name, None, False))
            if kind.paused:
                continue
            mine = sorted((r for r in queued if r.workflow == name), key=lambda r: r.created_us)
            keyed = [r for r in mine if r.key is not None]
            busy_keys: set[str] = set()
            if keyed:
                keys = sorted({r.key for r in keyed if r.key is not None})
                busy_keys = {
                    k
                    for (k,) in (
                        await conn.execute(
                            select(t.c.run_key).where(
                                and_(
                                    t.c.workflow == name,
                                    t.c.status == RUNNING,
                                    t.c.run_key.in_(keys),
                                )
                            )
                        )
                    ).all()
                }
            free: int | None = None
            if kind.max_running is not None:
                running = (
                    await conn.execute(
                        select(func.count()).where(
                            and_(t.c.workflow == name, t.c.status == RUNNING)
                        )
                    )
                ).scalar_one()
                oldest = min(r.created_us for r in mine)
                older = (
                    await conn.execute(
                        select(func.count()).where(
                            and_(
                                t.c.workflow == name, t.c.status == QUEUED, t.c.created_us < oldest
                            )
                        )
                    )
                ).scalar_one()
                free = max(0, kind.max_running - int(running) - int(older))
            for r in mine:
                if free is not None and free <= 0:
                    break
                if r.key is not None:
                    if r.key in busy_keys:
                        continue
                    busy_keys.add(r.key)
                go.append(r.run_id)
                if free is not None:
                    free -= 1
        if go:
            await conn.execute(
                update(t)
                .where(and_(t.c.run_id.in_(go), t.c.status == QUEUED))
                .values(status=RUNNING, updated_us=now_us())
            )
            admitted.update(go)
    return admitted
