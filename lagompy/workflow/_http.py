"""The HTTP routes of workflow operations (mounted by :class:`WorkflowsComponent` under
``/workflows``): list and filter runs, inspect one, start, cancel, resume, retry, signal,
the same actions over a filter, and the types with their counts, pause and unpause::

    GET  /workflows?workflow=&status=&since=&until=&id_prefix=&key=&parent=&limit=&after=
    POST /workflows                         {"workflow", "input", "id"?, "key"?, "version"?}
    GET  /workflows/types
    POST /workflows/types/{workflow}/pause  (and /unpause)
    POST /workflows/_bulk/{action}?<filter> {"reason"?, "position"?, "signal"?, "payload"?}
    GET  /workflows/{run_id}?values=true        (a child's id, parent/position, has a slash)
    POST /workflows/{run_id}/cancel         {"reason"?}
    POST /workflows/{run_id}/resume
    POST /workflows/{run_id}/retry?position=N
    POST /workflows/{run_id}/signal/{name}  (the body, any JSON, is the payload)

Errors are problem documents: an unknown run or workflow 404, a run whose state refuses the
action (resume a running run, signal a finished one) 409, bad input 400/422 naming what is
wrong (the input is validated against the workflow's input type before anything is written).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from lagompy.errors import (
    CommandRejected,
    ConfigurationError,
    DuplicateWorkflowId,
    InvalidId,
    InvalidWorkflowInput,
    UnknownWorkflow,
    WorkflowNotFound,
)
from lagompy.workflow._ops import (
    BULK_ACTIONS,
    RunFilter,
    bulk,
    cancel_run,
    find_runs,
    inspect_run,
    row_dict,
    type_summaries,
)

if TYPE_CHECKING:
    from lagompy.workflow._engine import WorkflowEngine

__all__ = ["workflows_router"]

T = TypeVar("T")

#: The largest signal payload or action body read, in bytes.
MAX_BODY = 1_048_576


class StartRequest(BaseModel):
    """The body of ``POST /workflows``."""

    workflow: str = Field(min_length=1, max_length=255)
    input: Any = None
    id: str | None = Field(default=None, min_length=1, max_length=255)
    key: str | None = Field(default=None, min_length=1, max_length=255)
    version: int | None = Field(default=None, ge=1)


class ActionBody(BaseModel):
    """The optional body of a bulk action (and of ``cancel``)."""

    reason: str | None = Field(default=None, max_length=1000)
    position: int | None = Field(default=None, ge=0)
    signal: str | None = Field(default=None, min_length=1, max_length=255)
    payload: Any = None


def input_of(engine: WorkflowEngine, workflow: str, version: int | None, data: Any) -> Any:
    """``data`` (JSON) as the workflow's input type; ``InvalidWorkflowInput`` naming the
    first field that does not fit, ``UnknownWorkflow`` for an unknown workflow."""
    definition = engine.workflows.get(workflow, version)
    try:
        return TypeAdapter(definition.input_type).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the input"
        raise InvalidWorkflowInput(
            f"the input of workflow {workflow!r} does not fit its type "
            f"{getattr(definition.input_type, '__qualname__', definition.input_type)}: "
            f"{where}: {first.get('msg', 'invalid')}"
        ) from None
    except Exception as e:  # an annotation pydantic cannot validate: name it, no internals
        raise InvalidWorkflowInput(
            f"the input of workflow {workflow!r} cannot be read from JSON ({type(e).__name__})"
        ) from None


async def operate(call: Callable[[], Awaitable[T]], *, unknown_workflow: int = 404) -> T:
    """Run an operation, its refusals as HTTP errors (the service answers them as problem
    documents): unknown 404, the run's state refuses 409, bad input 400/422."""
    try:
        return await call()
    except WorkflowNotFound as e:
        raise HTTPException(404, str(e)) from None
    except UnknownWorkflow as e:
        raise HTTPException(unknown_workflow, str(e)) from None
    except InvalidWorkflowInput as e:
        raise HTTPException(422, str(e)) from None
    except InvalidId as e:
        raise HTTPException(400, str(e)) from None
    except DuplicateWorkflowId as e:
        raise HTTPException(409, str(e)) from None
    except CommandRejected as e:  # the run's state refuses the action
        raise HTTPException(409, str(e)) from None


def workflows_router(
    engine: Callable[[], WorkflowEngine],
    *,
    prefix: str = "/workflows",
    dependencies: Sequence[Depends] = (),
) -> APIRouter:
    """The routes (see the module) over the engine ``engine()`` returns (503 while it is not
    started); ``dependencies``: FastAPI dependencies of every route (the app's own
    authentication, say: these routes act on runs)."""
    router = APIRouter(prefix=prefix, dependencies=list(dependencies), tags=["workflows"])

    def the_engine() -> WorkflowEngine:
        try:
            return engine()
        except ConfigurationError:
            raise HTTPException(503, "the workflows are not started") from None

    def the_filter(request: Request) -> RunFilter:
        q = request.query_params
        try:
            return RunFilter.of(
                workflow=q.get("workflow"),
                status=",".join(q.getlist("status")),
                since=q.get("since"),
                until=q.get("until"),
                id_prefix=q.get("id_prefix"),
                key=q.get("key"),
                parent=q.get("parent"),
            )
        except InvalidWorkflowInput as e:
            raise HTTPException(422, str(e)) from None

    async def body_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPException(413, f"the body is larger than {MAX_BODY} bytes")
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None

    async def action_body(request: Request) -> ActionBody:
        data = await body_json(request)
        try:
            return ActionBody.model_validate(data or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "the body"
            raise HTTPException(422, f"{where}: {first.get('msg', 'invalid')}") from None

    @router.get("")
    async def list_runs(
        request: Request,
        limit: int = Query(default=100, ge=1, le=1000),
        after: str | None = Query(default=None, max_length=255),
    ) -> dict[str, Any]:
        """Runs by id, filtered (``status`` may repeat or be comma-separated; ``since`` and
        ``until`` are ISO 8601 times of the start); ``next`` is the ``after`` of the next
        page (null on the last)."""
        which = the_filter(request)
        rows = await find_runs(the_engine(), which, limit=limit, after=after or None)
        return {
            "runs": [row_dict(r) for r in rows],
            "next": rows[-1].run_id if len(rows) == limit else None,
        }

    @router.post("", status_code=202)
    async def start(body: StartRequest) -> dict[str, Any]:
        """Start a run (``id`` is the idempotency key: the same id and input return the
        existing run); the input is checked against the workflow's input type first."""
        e = the_engine()
        value = await operate(
            _async(lambda: input_of(e, body.workflow, body.version, body.input)),
            unknown_workflow=422,
        )
        run_id = body.id or uuid.uuid4().hex
        run = await operate(
            lambda: e.start(body.workflow, value, id=run_id, key=body.key, version=body.version),
            unknown_workflow=422,
        )
        return {
            "run_id": run_id,
            "workflow": run.name,
            "version": run.version,
            "status": run.status,
        }

    @router.get("/types")
    async def list_types() -> list[dict[str, Any]]:
        """Each workflow: latest version, ``max_running``, ``paused`` and runs per status."""
        return await type_summaries(the_engine())

    @router.post("/types/{workflow}/pause")
    async def pause(workflow: str) -> dict[str, Any]:
        """Admit no new run of ``workflow`` (they queue); running runs go on."""
        await operate(lambda: the_engine().pause(workflow))
        return {"workflow": workflow, "paused": True}

    @router.post("/types/{workflow}/unpause")
    async def unpause(workflow: str) -> dict[str, Any]:
        await operate(lambda: the_engine().unpause(workflow))
        return {"workflow": workflow, "paused": False}

    @router.post("/_bulk/{action}")
    async def bulk_action(request: Request, action: str) -> dict[str, Any]:
        """``action`` (cancel, resume, retry, signal) on every run the filter (query
        parameters, as for the list) matches; an empty filter needs ``all=true``."""
        if action not in BULK_ACTIONS:
            raise HTTPException(
                404, f"no bulk action {action[:40]!r} (actions: {', '.join(BULK_ACTIONS)})"
            )
        which = the_filter(request)
        if which == RunFilter() and request.query_params.get("all") != "true":
            raise HTTPException(
                422, "an empty filter matches every run: give a filter, or all=true"
            )
        args = await action_body(request)
        e = the_engine()
        result = await operate(
            lambda: bulk(
                e,
                action,
                which,
                reason=args.reason,
                position=args.position,
                signal=args.signal,
                payload=args.payload,
            )
        )
        return {**result.to_dict(), "filter": which.describe()}

    @router.get("/{run_id:path}")
    async def get_run(run_id: str, values: bool = True) -> dict[str, Any]:
        """The run in detail: status, input, output, error, steps with their times, signals,
        compensations and its history (``values=false``: without the values)."""
        return await operate(lambda: inspect_run(the_engine(), run_id, values=values))

    @router.post("/{run_id:path}/cancel")
    async def cancel(request: Request, run_id: str) -> dict[str, Any]:
        """Ask the run to stop: it finishes ``cancelled`` after its compensations."""
        args = await action_body(request)
        reason = args.reason or "cancelled by an operator"
        run = await operate(lambda: cancel_run(the_engine(), run_id, reason))
        return {"run_id": run_id, "status": run.status, "cancel_reason": run.cancel_reason}

    @router.post("/{run_id:path}/resume")
    async def resume(run_id: str) -> dict[str, Any]:
        """Run a failed or cancelled run again from its failed step (409 if unfinished)."""
        run = await operate(lambda: the_engine().resume(run_id))
        return {"run_id": run_id, "status": run.status, "steps_kept": len(run.steps)}

    @router.post("/{run_id:path}/retry")
    async def retry(run_id: str, position: int = Query(ge=0)) -> dict[str, Any]:
        """Run a finished run again from step ``position`` (the steps from there on are
        dropped; 409 if unfinished or the run has fewer steps)."""
        run = await operate(lambda: the_engine().retry(run_id, position))
        return {"run_id": run_id, "status": run.status, "steps_kept": len(run.steps)}

    @router.post("/{run_id:path}/signal/{name}")
    async def signal(request: Request, run_id: str, name: str) -> JSONResponse:
        """Deliver signal ``name``; the body (any JSON, or none) is its payload (409 if the
        run is finished)."""
        payload = await body_json(request)
        index = await operate(lambda: the_engine().send_signal(run_id, name, payload))
        return JSONResponse({"run_id": run_id, "signal": name, "index": index})

    return router


def _async(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return fn()

    return call
