"""The console's Workflows page: the runs of the service's :class:`~lagompy.workflow.
WorkflowsComponent` (list with filters, one run in detail) and their actions (cancel, resume,
retry from a step, signal, the same over a filter, pause and unpause a type).

The pages are views of the workflow operations (``lagompy.workflow._ops``, the same as the
service's ``/workflows`` routes and ``lagompy workflows``); the actions follow the console's
rules exactly as its other actions do (``_router.py``): read-only unless the console has a
token, a bearer token or a logged-in session with its CSRF token, a confirmation for what
cannot be undone (cancel, retry, every bulk action), every action in the audit log (action
``workflow-<name>``). Values (input, output, payloads) are shown only with ``show_payloads``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from lagompy.console._backend import ActionError
from lagompy.errors import (
    CommandRejected,
    ConfigurationError,
    InvalidId,
    InvalidWorkflowInput,
    LagompyError,
    UnknownWorkflow,
    WorkflowNotFound,
)

if TYPE_CHECKING:
    from lagompy.console._router import Console
    from lagompy.workflow import WorkflowEngine
    from lagompy.workflow._ops import RunFilter

__all__ = ["WORKFLOW_ACTIONS", "workflow_routes"]

log = logging.getLogger("lagompy.console")

#: Every workflow action of the console, and whether it is destructive (a confirmation).
WORKFLOW_ACTIONS: dict[str, bool] = {
    "cancel": True,
    "resume": False,
    "retry": True,
    "signal": False,
    "bulk-cancel": True,
    "bulk-resume": True,
    "bulk-retry": True,
    "bulk-signal": True,
    "pause": False,
    "unpause": False,
}

#: Runs per page of the list.
PAGE = 100

_YES = {"yes", "true", "1", "on"}

_FILTER_FIELDS = ("workflow", "status", "since", "until", "id_prefix", "key")


def _engine(console: Console) -> WorkflowEngine:
    from lagompy.workflow import WorkflowsComponent

    for component in console.backend.service.components:
        if isinstance(component, WorkflowsComponent):
            try:
                return component.engine
            except ConfigurationError:
                raise ActionError(503, "the workflows are not started") from None
    raise ActionError(404, "this service runs no workflows (no WorkflowsComponent)")


def _refusal(e: LagompyError) -> ActionError:
    """A workflow operation's refusal as the console's (404 unknown, 409 refused by the
    run's state, 400 bad input)."""
    match e:
        case WorkflowNotFound() | UnknownWorkflow():
            return ActionError(404, str(e))
        case InvalidWorkflowInput() | InvalidId():
            return ActionError(400, str(e))
        case CommandRejected():
            return ActionError(409, str(e))
    raise e


def _filter_of(params: dict[str, str]) -> RunFilter:
    from lagompy.workflow._ops import RunFilter

    try:
        return RunFilter.of(**{k: params.get(k) or None for k in _FILTER_FIELDS})
    except InvalidWorkflowInput as e:
        raise ActionError(400, str(e)) from None


def _text(params: dict[str, str], key: str, *, required: bool, most: int = 255) -> str | None:
    value = params.get(key, "").strip()
    if not value:
        if required:
            raise ActionError(400, f"{key} is required")
        return None
    if len(value) > most or any(ord(c) < 32 for c in value):
        raise ActionError(400, f"{key} must be at most {most} printable characters")
    return value


def _position(params: dict[str, str]) -> int:
    raw = params.get("position", "").strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ActionError(400, f"position must be a whole number of 0 or more (got {raw[:30]!r})")
    return int(raw)


def _payload(params: dict[str, str]) -> Any:
    raw = params.get("payload", "").strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ActionError(400, "payload must be JSON (a string in quotes)") from None


Run = Callable[[], Awaitable[str]]


def _prepare(console: Console, action: str, params: dict[str, str]) -> tuple[str, Run]:
    """The audit target and the operation of an action, its parameters checked (400 naming
    the wrong one)."""
    from lagompy.workflow._ops import bulk, cancel_run

    def engine() -> WorkflowEngine:
        return _engine(console)

    async def guarded(call: Callable[[], Awaitable[str]]) -> str:
        try:
            return await call()
        except LagompyError as e:
            raise _refusal(e) from None

    if action in ("pause", "unpause"):
        workflow = _text(params, "workflow", required=True)
        assert workflow is not None

        async def flip() -> str:
            if action == "pause":
                await engine().pause(workflow)
                return f"workflow {workflow!r} paused: it admits no new run"
            await engine().unpause(workflow)
            return f"workflow {workflow!r} admits runs again"

        return f"workflow {workflow}", lambda: guarded(flip)
    if action.startswith("bulk-"):
        which = _filter_of(params)
        kind = action.removeprefix("bulk-")
        from lagompy.workflow._ops import RunFilter

        if which == RunFilter():
            raise ActionError(400, "a bulk action needs a filter (an empty one matches every run)")
        arguments: dict[str, Any] = {"reason": _text(params, "reason", required=False, most=1000)}
        if kind == "retry":
            arguments["position"] = _position(params)
        if kind == "signal":
            arguments["signal"] = _text(params, "signal", required=True)
            arguments["payload"] = _payload(params)

        async def many() -> str:
            result = await bulk(engine(), kind, which, **arguments)
            refused = "".join(
                f"; {run_id}: {why[:200]}" for run_id, why in list(result.refused.items())[:5]
            )
            return f"{kind}: {result.done} of {result.matched} runs{refused}"

        return f"workflow runs ({which.describe()})", lambda: guarded(many)
    run_id = _text(params, "run_id", required=True)
    assert run_id is not None
    target = f"workflow run {run_id}"
    if action == "cancel":
        reason = _text(params, "reason", required=False, most=1000) or "cancelled from the console"

        async def stop() -> str:
            await cancel_run(engine(), run_id, reason)
            return f"cancel requested ({reason})"

        return target, lambda: guarded(stop)
    if action == "resume":

        async def again() -> str:
            run = await engine().resume(run_id)
            return f"resumed, {len(run.steps)} recorded steps kept"

        return target, lambda: guarded(again)
    if action == "retry":
        position = _position(params)

        async def retry() -> str:
            await engine().retry(run_id, position)
            return f"retried from step {position}"

        return f"{target}, from step {position}", lambda: guarded(retry)
    name = _text(params, "signal", required=True)
    assert name is not None
    payload = _payload(params)

    async def send() -> str:
        index = await engine().send_signal(run_id, name, payload)
        return f"signal {name!r} delivered (index {index})"

    return target, lambda: guarded(send)


async def act(console: Console, request: Request, action: str) -> Response:
    """A workflow action, authorised, confirmed and audited as the console's others
    (:meth:`Console.perform`), audited as ``workflow-<action>``."""
    if action not in WORKFLOW_ACTIONS:
        raise HTTPException(404, f"no workflow action {action[:50]!r}")
    return await console.perform(
        request,
        action,
        audited=f"workflow-{action}",
        destructive=WORKFLOW_ACTIONS[action],
        confirm_template="workflow_confirm.html",
        prepare=lambda params, _actor: _prepare(console, action, params),
    )


def workflow_routes(console: Console) -> APIRouter:
    """The Workflows page, its JSON views and its action route (under the console's prefix,
    included by :meth:`Console.router`)."""
    from lagompy.workflow._ops import STATUSES, find_runs, inspect_run, row_dict, type_summaries

    router = APIRouter(include_in_schema=False)

    async def listing(request: Request) -> dict[str, Any]:
        q = request.query_params
        params = {k: q.get(k, "") for k in (*_FILTER_FIELDS, "after")}
        which = _filter_of(params)
        engine = _engine(console)
        after = _text(params, "after", required=False)
        rows = await find_runs(engine, which, limit=PAGE, after=after)
        return {
            "filter": {k: params[k] for k in _FILTER_FIELDS},
            "query": urlencode({k: v for k, v in params.items() if v and k != "after"}),
            "types": await type_summaries(engine),
            "runs": [row_dict(r) for r in rows],
            "next": rows[-1].run_id if len(rows) == PAGE else None,
        }

    async def detail(run_id: str) -> dict[str, Any]:
        engine = _engine(console)
        try:
            return await inspect_run(engine, run_id, values=console.settings.show_payloads)
        except LagompyError as e:
            raise _refusal(e) from None

    @router.get("/api/workflows")
    async def api_workflows(request: Request) -> dict[str, Any]:
        try:
            return await listing(request)
        except ActionError as e:
            raise HTTPException(e.status, e.detail) from None

    @router.get("/api/workflows/{run_id:path}")
    async def api_workflow(run_id: str) -> dict[str, Any]:
        try:
            return await detail(run_id)
        except ActionError as e:
            raise HTTPException(e.status, e.detail) from None

    @router.post("/workflows/actions/{action}")
    async def workflow_action(request: Request, action: str) -> Response:
        return await act(console, request, action)

    @router.get("/workflows", response_class=HTMLResponse)
    async def workflows_page(request: Request) -> Response:
        try:
            found, message, status = await listing(request), None, 200
        except ActionError as e:  # no workflows here (503), a bad filter (400)
            empty = {k: request.query_params.get(k, "") for k in _FILTER_FIELDS}
            found = {"filter": empty, "query": "", "types": [], "runs": [], "next": None}
            message, status = e.detail, e.status
        here = request.url.path + (f"?{found['query']}" if found["query"] else "")
        return console._page(
            request, "workflows.html", status, statuses=STATUSES, next_url=here,
            masked=not console.settings.show_payloads, message=message, **found,
        )  # fmt: skip

    @router.get("/workflows/{run_id:path}", response_class=HTMLResponse)
    async def workflow_page(request: Request, run_id: str) -> Response:
        try:
            run = await detail(run_id)
        except ActionError as e:
            return console._page(
                request, "error.html", e.status, action="show", target=f"workflow run {run_id}",
                detail=e.detail,
            )  # fmt: skip
        return console._page(
            request, "workflow_run.html", run=run, next_url=request.url.path,
            masked=not console.settings.show_payloads,
        )  # fmt: skip

    return router
