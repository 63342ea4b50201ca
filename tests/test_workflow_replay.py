"""Replay, as a property: for random workflow programs, an operator's retry from any position
replays the records before it (their steps do not run again, their asks are not sent again)
and runs the rest live once more (new command ids), and the output is the same."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lagompy
from lagompy import JournalSettings
from lagompy.workflow import (
    WorkflowContext,
    WorkflowEngine,
    WorkflowRun,
    Workflows,
    WorkflowSettings,
    start_workflows,
)
from tests.workflow_app import AccountEntity, Deposit

executions: Counter[str] = Counter()
programs = Workflows()


def remember(key: str, value: int) -> int:
    executions[key] += 1
    return value


@programs.workflow("program", version=1)
async def program(ctx: WorkflowContext, ops: list[str]) -> list[int]:
    out: list[int] = []
    for i, op in enumerate(ops):
        match op:
            case "step":
                out.append(await ctx.step(remember, f"{ctx.run_id}:{i}", i * 10, name=f"s{i}"))
            case "sleep":
                await ctx.sleep(0)
            case "patch":
                out.append(int(await ctx.patched(f"p{i}")))
            case "ask":
                await ctx.ask(AccountEntity, ctx.run_id, Deposit(1))
    return out


OPS = st.lists(st.sampled_from(["step", "sleep", "patch", "ask"]), min_size=1, max_size=8)


def test_a_retry_from_any_position_replays_what_is_before_it(
    journal_settings: JournalSettings,
) -> None:
    with asyncio.Runner() as runner:
        entities = runner.run(
            lagompy.start(
                entities=[AccountEntity, WorkflowRun],
                journal_settings=journal_settings,
                ray=False,
            )
        )
        engine: WorkflowEngine = runner.run(
            start_workflows(
                programs,
                runtime=entities,
                journal_settings=journal_settings,
                settings=WorkflowSettings(admission_interval=0.05),
            )
        )
        counter = iter(range(10**6))
        prefix = uuid.uuid4().hex[:8]  # run ids (and execution counts) of this test only

        async def example(ops: list[str], cut: int) -> None:
            run_id = f"{prefix}-{next(counter)}"
            await engine.start("program", ops, id=run_id)
            first = await engine.result(run_id, timeout=10)
            position = min(cut, len(ops))
            await engine.retry(run_id, position)
            again = await engine.result(run_id, timeout=10)
            assert again == first
            for i, op in enumerate(ops):
                if op == "step":
                    assert executions[f"{run_id}:{i}"] == (1 if i < position else 2)
            asks = [i for i, op in enumerate(ops) if op == "ask"]
            balance = await entities.ref_for(AccountEntity, run_id).ask(Deposit(0))
            assert balance == len(asks) + sum(1 for i in asks if i >= position)

        @settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow], deadline=None)
        @given(OPS, st.integers(min_value=0, max_value=8))
        def check(ops: list[str], cut: int) -> None:
            runner.run(example(ops, cut))

        try:
            check()
        finally:
            runner.run(engine.close())
            runner.run(entities.close())
