"""10,000 sleeping workflow runs use no CPU while they wait (one waiting coroutine each, no
thread, no poll per run): the executor uses as much CPU with them as without them.

``LAGOMPY_TEST_SLEEPING_RUNS`` sets the number of runs (default 2,000, to keep the suite short:
creating a run costs an entity activation, ~5 ms here; 10,000 take ~60 s per backend)."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time

from sqlalchemy import func, select

import lagompy
from lagompy import JournalSettings
from lagompy.sql._schema import workflow_runs
from lagompy.workflow import WorkflowRun, WorkflowSettings, start_workflows
from tests.workflow_app import workflows

RUNS = int(os.environ.get("LAGOMPY_TEST_SLEEPING_RUNS", "2000"))
WINDOW = 3.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_sleeping_runs_use_no_cpu_while_they_wait(
    journal_settings: JournalSettings,
) -> None:
    async with lagompy.start(
        entities=[WorkflowRun], journal_settings=journal_settings, ray=False
    ) as entities:
        async with start_workflows(
            workflows,
            runtime=entities,
            journal_settings=journal_settings,
            settings=WorkflowSettings(max_batch=1000),
        ) as engine:
            await asyncio.sleep(0.5)
            gc.collect()
            before = _cpu()
            await asyncio.sleep(WINDOW)
            idle = _cpu() - before  # the executor alone: its partitions' tailers
            started = time.monotonic()
            for chunk in range(0, RUNS, 1000):
                ids = range(chunk, min(RUNS, chunk + 1000))
                await asyncio.gather(*(engine.start("sleeper", 3600.0, id=f"s{i}") for i in ids))
            while True:
                async with engine.database.read() as conn:
                    sleeping = (
                        await conn.execute(
                            select(func.count()).where(workflow_runs.c.wake_at_us.is_not(None))
                        )
                    ).scalar_one()
                if sleeping == RUNS:
                    break
                assert time.monotonic() - started < 120
                await asyncio.sleep(0.2)
            took = time.monotonic() - started
            assert engine.executor is not None
            assert len(engine.executor.drivers) == RUNS
            await asyncio.sleep(0.5)
            # The starts' garbage collected now, not by a full collection that happens to land
            # in the window (each walks every run's objects: 0.1-0.2 s here).
            gc.collect()
            before = _cpu()
            await asyncio.sleep(WINDOW)
            used = _cpu() - before
            print(
                f"{RUNS} runs started and asleep in {took:.1f} s; then {used:.3f} s of CPU in "
                f"{WINDOW} s of waiting, {idle:.3f} s without them"
            )
            assert (used - idle) / WINDOW < 0.05  # under 5% of a core more than idle
