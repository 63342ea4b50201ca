"""Durable workflows: an ``async def`` whose steps are the recorded events of a workflow entity.

::

    workflows = Workflows()

    @workflows.workflow("transfer", version=1)
    async def transfer(ctx: WorkflowContext, t: Transfer) -> str:
        ctx.compensate_ask(AccountEntity, t.source, Deposit(t.amount))   # undoes the next step
        await ctx.ask(AccountEntity, t.source, Withdraw(t.amount))        # exactly once
        await ctx.ask(AccountEntity, t.target, Deposit(t.amount))         # a rejection raises
        return "done"                                                     #   StepFailed

    # WorkflowRun among the app's entities; then, in a service or a script:
    async with start_workflows(workflows, runtime=entities, journal_settings=journal) as engine:
        await engine.start("transfer", Transfer("a", "b", 10), id="t-1")  # the id is idempotent
        await engine.result("t-1", timeout=10)

Modules:

* ``_registry.py``: :class:`Workflows` (name + explicit version), :class:`RetryPolicy`.
* ``_context.py``: :class:`WorkflowContext`: ``ask``, ``step``, ``sleep``, ``receive``,
  ``child``, ``patched``, ``compensate``, ``compensate_ask``; replay by position.
* ``_entity.py``: :class:`WorkflowRun`, the run entity (its events are the checkpoints).
* ``_index.py``: the runs index and flow control (``max_running``, keys, pause) in SQL.
* ``_executor.py``: :class:`WorkflowExecutor`: one consumer per partition of the runs' tag
  (fenced leases), a :class:`RunDriver` per run.
* ``_engine.py``: :class:`WorkflowEngine` (the Python operations) and :func:`start_workflows`.
* ``_component.py``: :class:`WorkflowsComponent`, the same as a part of a service.
* ``_ops.py``: operating runs: :class:`RunFilter`, :func:`find_runs`, :func:`inspect_run`,
  :func:`bulk`; ``_http.py`` (the ``/workflows`` routes), ``_cli.py`` (``lagompy
  workflows``) and ``_metrics.py`` (``/metrics``) are views of them.

See ``docs/workflows.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.workflow._component import WorkflowsComponent
    from lagompy.workflow._context import WorkflowContext
    from lagompy.workflow._engine import RunStatus, WorkflowEngine, start_workflows
    from lagompy.workflow._entity import WORKFLOW_ENTITY, WORKFLOW_TAG, Run, WorkflowRun
    from lagompy.workflow._executor import WorkflowExecutor, WorkflowSettings
    from lagompy.workflow._index import RunRow
    from lagompy.workflow._ops import BulkResult, RunFilter, bulk, find_runs, inspect_run
    from lagompy.workflow._registry import RetryPolicy, WorkflowDef, Workflows

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.workflow._component": ("WorkflowsComponent",),
    "lagompy.workflow._context": ("WorkflowContext",),
    "lagompy.workflow._engine": (
        "RunStatus",
        "WorkflowEngine",
        "start_workflows",
    ),
    "lagompy.workflow._entity": (
        "WORKFLOW_ENTITY",
        "WORKFLOW_TAG",
        "Run",
        "WorkflowRun",
    ),
    "lagompy.workflow._executor": (
        "WorkflowExecutor",
        "WorkflowSettings",
    ),
    "lagompy.workflow._index": ("RunRow",),
    "lagompy.workflow._ops": (
        "BulkResult",
        "RunFilter",
        "bulk",
        "find_runs",
        "inspect_run",
    ),
    "lagompy.workflow._registry": (
        "RetryPolicy",
        "WorkflowDef",
        "Workflows",
    ),
}

__all__ = [
    "WORKFLOW_ENTITY",
    "WORKFLOW_TAG",
    "BulkResult",
    "RetryPolicy",
    "Run",
    "RunFilter",
    "RunRow",
    "RunStatus",
    "WorkflowContext",
    "WorkflowDef",
    "WorkflowEngine",
    "WorkflowExecutor",
    "WorkflowRun",
    "WorkflowSettings",
    "Workflows",
    "WorkflowsComponent",
    "bulk",
    "find_runs",
    "inspect_run",
    "start_workflows",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
