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
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import POSTGRES_URL
from sqlalchemy import func, make_url, select

import lagompy
from lagompy import JournalSettings
from lagompy.sql._schema import workflow_runs
from lagompy.workflow import WorkflowEngine, WorkflowRun, WorkflowSettings, start_workflows
from tests.workflow_app import workflows

RUNS = int(os.environ.get("LAGOMPY_TEST_SLEEPING_RUNS", "2000"))
#: Two renew intervals: every partition renews its lease, and the executor its membership, as
#: often in every window (3 s windows held one or two renewals each: +-1% of a core).
WINDOW = 2 * WorkflowSettings().renew_interval
#: Windows measured at most, until one is quiet.
TRIES = 4


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _notifications(engine: WorkflowEngine) -> int:
    """Wake-ups the executor's tailers were sent (by the SQLite watch, or PostgreSQL NOTIFYs)."""
    assert engine.executor is not None
    notifiers = {
        id(n): n
        for p in engine.executor.partitions.values()
        if p.worker.tailer is not None and (n := p.worker.tailer.notifier) is not None
    }
    assert notifiers  # the tailers wait for wake-ups, they do not poll
    return sum(n.notifications for n in notifiers.values())


async def _quiet_cpu(engine: WorkflowEngine) -> tuple[float, int]:
    """Seconds of CPU used in WINDOW seconds in which no tailer was woken (nothing wrote the
    journal), the least of up to TRIES windows (of them all if none was quiet); and how many
    windows were measured."""
    used: list[tuple[bool, float]] = []
    while len(used) < TRIES and not any(quiet for quiet, _ in used):
        gc.collect()  # the garbage of the previous step now, not in the window
        woken, before = _notifications(engine), _cpu()
        await asyncio.sleep(WINDOW)
        used.append((_notifications(engine) == woken, _cpu() - before))
    quiet = [cpu for q, cpu in used if q]
    return min(quiet or [cpu for _, cpu in used]), len(used)


@pytest.fixture
async def own_database(journal_settings: JournalSettings) -> AsyncIterator[JournalSettings]:
    """The journal's settings; on PostgreSQL in a database of its own: NOTIFY is database-wide,
    so a journal of another test in the same database (another schema) would wake these
    tailers (a query per partition each time), and the test would measure that test."""
    if journal_settings.postgres_schema is None:
        yield journal_settings
        return
    name = f"lagompy_sleep_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        yield JournalSettings(url=url, auto_migrate=True)
    finally:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def test_sleeping_runs_use_no_cpu_while_they_wait(own_database: JournalSettings) -> None:
    journal_settings = own_database
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
            idle, tries = await _quiet_cpu(engine)  # the executor alone: its partitions' tailers
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
            # (_quiet_cpu collects the starts' garbage first, not a full collection that
            # happens to land in the window: each walks every run's objects, 0.1-0.2 s here.)
            used, more = await _quiet_cpu(engine)
            print(
                f"{RUNS} runs started and asleep in {took:.1f} s; then {used:.3f} s of CPU in "
                f"{WINDOW} s of waiting, {idle:.3f} s without them ({tries}, {more} windows)"
            )
            assert (used - idle) / WINDOW < 0.05  # under 5% of a core more than idle
