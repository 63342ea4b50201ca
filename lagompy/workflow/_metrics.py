"""Workflow metrics for the service's ``/metrics``: per workflow type and per step.

Two sources: the runs index (read at scrape time: runs per status, runs started, paused) and
:class:`WorkflowMetrics`, the counters of the runs this process's executor drove (steps
recorded, failed, their seconds; runs finished per status, their seconds). A step's seconds
are from the previous checkpoint of its run in this process (the run's admission, or the
previous step's record) to its own record: for a sequential workflow, the step's time
including the code around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lagompy.workflow._ops import STATUSES, type_summaries

if TYPE_CHECKING:  # the service's type of a metric sample: workflows do not import it
    from lagompy.service._metrics import Sample
    from lagompy.workflow._engine import WorkflowEngine

__all__ = ["WorkflowMetrics", "workflow_samples"]


@dataclass
class WorkflowMetrics:
    """Counters of the runs an executor drove in this process (see the module)."""

    #: (workflow, step, "ok" or "failed") -> steps recorded.
    steps: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: (workflow, step) -> seconds of the recorded steps, summed.
    step_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    #: (workflow, status) -> runs finished.
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    #: workflow -> seconds from start to finish of the finished runs, summed.
    run_seconds: dict[str, float] = field(default_factory=dict)

    def step(self, workflow: str, step: str, ok: bool, seconds: float) -> None:
        key = (workflow, step, "ok" if ok else "failed")
        self.steps[key] = self.steps.get(key, 0) + 1
        self.step_seconds[workflow, step] = self.step_seconds.get((workflow, step), 0.0) + max(
            0.0, seconds
        )

    def run_finished(self, workflow: str, status: str, seconds: float) -> None:
        self.finished[workflow, status] = self.finished.get((workflow, status), 0) + 1
        self.run_seconds[workflow] = self.run_seconds.get(workflow, 0.0) + max(0.0, seconds)

    def samples(self) -> list[Sample]:
        samples: list[Sample] = []
        for (workflow, step, outcome), n in sorted(self.steps.items()):
            samples.append(
                (
                    "lagompy_workflow_steps_total",
                    "Steps recorded by this process's executor (outcome ok or failed).",
                    "counter",
                    {"workflow": workflow, "step": step, "outcome": outcome},
                    float(n),
                )
            )
        for (workflow, step), seconds in sorted(self.step_seconds.items()):
            samples.append(
                (
                    "lagompy_workflow_step_seconds_total",
                    "Seconds of the steps recorded by this process's executor (from the run's "
                    "previous checkpoint), summed: divide by lagompy_workflow_steps_total.",
                    "counter",
                    {"workflow": workflow, "step": step},
                    seconds,
                )
            )
        for (workflow, status), n in sorted(self.finished.items()):
            samples.append(
                (
                    "lagompy_workflow_runs_finished_total",
                    "Runs this process's executor finished, by status.",
                    "counter",
                    {"workflow": workflow, "status": status},
                    float(n),
                )
            )
        for workflow, seconds in sorted(self.run_seconds.items()):
            samples.append(
                (
                    "lagompy_workflow_run_seconds_total",
                    "Seconds from start to finish of the runs this process's executor "
                    "finished, summed: divide by lagompy_workflow_runs_finished_total.",
                    "counter",
                    {"workflow": workflow},
                    seconds,
                )
            )
        return samples


async def workflow_samples(engine: WorkflowEngine) -> list[Sample]:
    """The index's figures per workflow type (every process reports the same: take one) and
    this process's executor's counters."""
    samples: list[Sample] = []
    for kind in await type_summaries(engine):
        labels = {"workflow": kind["workflow"]}
        counts: dict[str, Any] = kind["counts"]
        for status in STATUSES:
            samples.append(
                (
                    "lagompy_workflow_runs",
                    "Runs of each workflow in each status, as the runs index shows them.",
                    "gauge",
                    {**labels, "status": status},
                    float(counts.get(status, 0)),
                )
            )
        samples.append(
            (
                "lagompy_workflow_started_total",
                "Runs of each workflow started (rows of the runs index).",
                "counter",
                labels,
                float(sum(counts.values())),
            )
        )
        samples.append(
            (
                "lagompy_workflow_paused",
                "1 while the workflow admits no new run (paused by an operator).",
                "gauge",
                labels,
                1.0 if kind["paused"] else 0.0,
            )
        )
    executor = engine.executor
    if executor is not None:
        samples += executor.metrics.samples()
    return samples
