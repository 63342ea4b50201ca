"""Durable workflows (lagompy.workflow) on both journal backends, entities in this process:
transfers that complete or compensate, replay after an executor dies, deploys with patch
markers, non-determinism, signals, cancellation, flow control, and bad input."""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

import lagompy
from examples.user_service.entity import GetUser, RegisterUser, UserEntity
from lagompy import InvalidEntityId, JournalSettings
from lagompy.errors import (
    DuplicateWorkflowId,
    InvalidWorkflowInput,
    OutcomeUnknown,
    UnknownWorkflow,
    WorkflowFailed,
    WorkflowNotFound,
)
from lagompy.journal import AtomicWrite, EventEnvelope, open_storage
from lagompy.runtime import InProcessEntities
from lagompy.serialization import Serializer, serializable
from lagompy.sql._schema import command_replies
from lagompy.workflow import (
    WORKFLOW_ENTITY,
    WORKFLOW_TAG,
    WorkflowContext,
    WorkflowEngine,
    WorkflowRun,
    Workflows,
    WorkflowSettings,
    inspect_run,
    start_workflows,
)
from lagompy.workflow import _executor as workflow_executor
from lagompy.workflow._entity import (
    DeliverSignal,
    FinishRun,
    GetRun,
    RecordCompensated,
    RecordStep,
    RecordSteps,
    ReopenRun,
    Run,
    RunReopened,
    RunStarted,
    StartRun,
    StepCompleted,
    StepRecord,
)
from lagompy.workflow._executor import RunDriver
from lagompy.workflow._index import run_row
from tests.workflow_app import AccountEntity, CloseAccount, Deposit, Transfer, Withdraw, workflows

FAST = WorkflowSettings(lease_ttl=1.0, renew_interval=0.25, admission_interval=0.1)


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


@dataclass
class Env:
    entities: InProcessEntities
    journal: JournalSettings
    engines: list[WorkflowEngine]
    settings: WorkflowSettings = FAST

    async def balance(self, account: str) -> int:
        return await self.entities.ref_for(AccountEntity, account).ask(Deposit(0))

    async def engine_for(self, registry: Workflows, owner: str) -> WorkflowEngine:
        """An engine with its executor (one registry at a time: executors of one journal
        share its runs, so each must know every workflow it may be handed)."""
        engine = await start_workflows(
            registry,
            runtime=self.entities,
            journal_settings=self.journal,
            settings=self.settings,
            owner=owner,
        )
        self.engines.append(engine)
        return engine

    @property
    def engine(self) -> WorkflowEngine:
        return self.engines[0]


@pytest.fixture
async def env(journal_settings: JournalSettings) -> AsyncIterator[Env]:
    async with lagompy.start(
        entities=[AccountEntity, WorkflowRun], journal_settings=journal_settings, ray=False
    ) as entities:
        env = Env(entities, journal_settings, [])
        try:
            yield env
        finally:
            for engine in env.engines:
                await engine.close()


@pytest.fixture
async def bank(env: Env) -> Env:
    """The env with an engine of the shared test workflows (``env.engine``)."""
    await env.engine_for(workflows, "bank")
    return env


async def test_a_transfer_completes_and_a_rejected_deposit_compensates_the_withdrawal(
    bank: Env,
) -> None:
    await bank.entities.ref_for(AccountEntity, "a").ask(Deposit(100))
    await bank.entities.ref_for(AccountEntity, "closed").ask(CloseAccount())
    await bank.engine.start("transfer", Transfer("a", "b", 30), id="t-ok")
    assert await bank.engine.result("t-ok", timeout=10) == "done"
    await bank.engine.start("transfer", Transfer("a", "closed", 30), id="t-bad")
    with pytest.raises(WorkflowFailed, match="account closed is closed") as failed:
        await bank.engine.result("t-bad", timeout=10)
    assert failed.value.status == "failed"
    assert (await bank.balance("a"), await bank.balance("b")) == (70, 30)
    status = await bank.engine.status("t-bad")
    assert status.steps == ("ask wf-account Withdraw", "ask wf-account Deposit")
    assert status.failed_steps == ("ask wf-account Deposit",) and status.compensated == (0,)
    expected = {"t-ok": "completed", "t-bad": "failed"}
    await until(lambda: _index_is(bank.engine, "transfer", expected))  # the index follows


async def test_the_run_id_is_the_idempotency_key_and_bad_input_gets_a_clear_error(
    bank: Env,
) -> None:
    await bank.entities.ref_for(AccountEntity, "a").ask(Deposit(10))
    first = await bank.engine.start("transfer", Transfer("a", "b", 5), id="same")
    again = await bank.engine.start("transfer", Transfer("a", "b", 5), id="same")
    assert again.started_us == first.started_us
    await bank.engine.result("same", timeout=10)
    assert await bank.balance("a") == 5  # started (and run) once
    with pytest.raises(DuplicateWorkflowId, match=r"'same' exists already .* another input"):
        await bank.engine.start("transfer", Transfer("a", "b", 6), id="same")
    with pytest.raises(DuplicateWorkflowId, match="another workflow"):
        await bank.engine.start("sleeper", 0.0, id="same")
    with pytest.raises(UnknownWorkflow, match=r"'nope'.*registered: 'approval'"):
        await bank.engine.start("nope", 1)
    with pytest.raises(UnknownWorkflow, match="no version 7"):
        await bank.engine.start("transfer", Transfer("a", "b", 1), version=7)
    with pytest.raises(InvalidWorkflowInput, match="input of workflow 'transfer'"):
        await bank.engine.start("transfer", {"source": object()})
    with pytest.raises(InvalidWorkflowInput, match="input of workflow 'sleeper'"):
        await bank.engine.start("sleeper", "not a number")
    with pytest.raises(InvalidEntityId):
        await bank.engine.start("sleeper", 1.0, id="")
    with pytest.raises(InvalidWorkflowInput, match="signal 'x' does not serialize"):
        await bank.engine.send_signal("same", "x", object())
    with pytest.raises(WorkflowNotFound, match="'ghost'"):
        await bank.engine.status("ghost")
    assert [r.run_id for r in await bank.engine.list()] == ["same"]  # nothing else written


async def test_signals_child_runs_and_durable_sleep(bank: Env) -> None:
    await bank.engine.start("approval", "ada", id="ap")
    await bank.engine.start("parent", 3, id="p")
    started = time.monotonic()
    await bank.engine.start("sleeper", 0.3, id="s")
    await until(lambda: _has_steps(bank.engine, "ap", 1))  # its receive timer is recorded
    await bank.engine.send_signal("ap", "decision", "yes")
    assert await bank.engine.result("ap", timeout=10) == "ada: yes"
    assert await bank.engine.result("p", timeout=10) == 12
    # The runs index follows the journal: the children show there soon after, not at once.
    await until(lambda: _children_are(bank.engine, "p", {"p/0", "p/1"}))
    assert await bank.engine.result("s", timeout=10) == 1
    assert time.monotonic() - started >= 0.3


async def _index_is(engine: WorkflowEngine, workflow: str, expected: dict[str, str]) -> bool:
    return await _statuses(engine, workflow) == expected


async def _children_are(engine: WorkflowEngine, parent: str, expected: set[str]) -> bool:
    return {r.run_id for r in await engine.list(parent=parent)} == expected


async def _has_steps(engine: WorkflowEngine, run_id: str, n: int) -> bool:
    return len((await engine.get(run_id)).steps) >= n


# --------------------------------------------------------------------------- rebalance


def _held(engine: WorkflowEngine) -> int:
    """How many partitions the engine's executor holds now."""
    assert engine.executor is not None
    return sum(1 for p in engine.executor.partitions.values() if p.worker.lease is not None)


async def test_a_joining_executor_takes_half_the_partitions_and_every_run_finishes_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Executors share the runs' partitions (WorkflowSettings.rebalance, on by default): one
    that joins gets half, handed over between batches with the runs driven there stopped first;
    the new owner replays them from their records, and every ask is applied once."""
    a = await env.engine_for(workflows, "exec-a")
    await until(lambda: _async(_held(a) == 4))
    runs = [f"rb-{i}" for i in range(12)]
    for run in runs:
        await env.entities.ref_for(AccountEntity, f"{run}-from").ask(Deposit(100))
        await a.start("gated-transfer", Transfer(f"{run}-from", f"{run}-to", 30), id=run)
    for run in runs:  # every run has withdrawn and waits for "go"
        await until(functools.partial(_has_steps, a, run, 1))
    caplog.set_level(logging.INFO, logger="lagompy.workflow")
    b = await env.engine_for(workflows, "exec-b")
    await until(lambda: _async(_held(a) == 2 and _held(b) == 2))
    # a stopped its drivers of the partitions it gave (before releasing their leases), and
    # never found a lease gone under it
    handed = [r.getMessage() for r in caplog.records if "handed over" in r.getMessage()]
    assert len(handed) == 2, handed
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]
    for _ in range(2):
        for run in runs:
            await b.send_signal(run, "go")
    for run in runs:
        assert await b.result(run, timeout=15) == "done"
        assert await env.balance(f"{run}-from") == 70  # withdrawn once
        assert await env.balance(f"{run}-to") == 30  # deposited once
    assert a.executor is not None and b.executor is not None
    by_a = a.executor.metrics.finished.get(("gated-transfer", "completed"), 0)
    by_b = b.executor.metrics.finished.get(("gated-transfer", "completed"), 0)
    assert by_a + by_b == len(runs) and by_a > 0 and by_b > 0  # each finished once, both drove


async def _async(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- cancel


cancellable = Workflows()
undone: list[str] = []


@cancellable.workflow("hold", version=1)
async def hold(ctx: WorkflowContext, account: str) -> str:
    ctx.compensate_ask(AccountEntity, account, Deposit(1))
    await ctx.ask(AccountEntity, account, Withdraw(1))
    ctx.compensate(undone.append, account, name="note")
    await ctx.receive("never")
    return "unreachable"


async def test_a_cancelled_run_runs_its_compensations_in_reverse_order(env: Env) -> None:
    undone.clear()
    await env.entities.ref_for(AccountEntity, "h").ask(Deposit(5))
    engine = await env.engine_for(cancellable, "cancel-test")
    try:
        await engine.start("hold", "h", id="hold-1")
        await until(lambda: _has_steps(engine, "hold-1", 1))
        assert await env.balance("h") == 4
        await engine.cancel("hold-1", "the customer changed their mind")
        with pytest.raises(WorkflowFailed, match="changed their mind") as failed:
            await engine.result("hold-1", timeout=10)
        assert failed.value.status == "cancelled"
        assert await env.balance("h") == 5 and undone == ["h"]
        assert (await engine.status("hold-1")).compensated == (1, 0)  # reverse order
    finally:
        await engine.close()


family = Workflows()


@family.workflow("hold-child", version=1)
async def hold_child(ctx: WorkflowContext, account: str) -> str:
    ctx.compensate_ask(AccountEntity, account, Deposit(2))
    await ctx.ask(AccountEntity, account, Withdraw(2))
    await ctx.receive("never")
    return "unreachable"


@family.workflow("hold-parent", version=1)
async def hold_parent(ctx: WorkflowContext, account: str) -> str:
    ctx.compensate_ask(AccountEntity, account, Deposit(1))
    await ctx.ask(AccountEntity, account, Withdraw(1))
    result: str = await ctx.child("hold-child", account)
    return result


async def test_cancelling_a_parent_cancels_its_running_child_and_both_compensate(
    env: Env,
) -> None:
    await env.entities.ref_for(AccountEntity, "fam").ask(Deposit(10))
    engine = await env.engine_for(family, "family-test")
    await engine.start("hold-parent", "fam", id="fam-1")
    await until(lambda: _holds(env, engine, "fam-1/1", "fam", 7))
    await engine.cancel("fam-1", "the order was withdrawn")
    with pytest.raises(WorkflowFailed, match="withdrawn") as parent:
        await engine.result("fam-1", timeout=10)
    assert parent.value.status == "cancelled"
    with pytest.raises(WorkflowFailed, match="its parent 'fam-1' was cancelled") as child:
        await engine.result("fam-1/1", timeout=10)
    assert child.value.status == "cancelled"
    assert await env.balance("fam") == 10  # the child's compensation and the parent's
    assert (await engine.status("fam-1/1")).compensated == (0,)
    assert (await engine.status("fam-1")).compensated == (0,)


deferring = Workflows()
gates: dict[str, asyncio.Event] = {}
seen: list[int] = []


@deferring.workflow("withdraw-then-wait", version=1)
async def withdraw_then_wait(ctx: WorkflowContext, account: str) -> int:
    first: int = await ctx.ask(AccountEntity, account, Withdraw(1))
    seen.append(first)
    await gates[account].wait()  # a plain await, not a step: nothing sends the record
    second: int = await ctx.ask(AccountEntity, account, Withdraw(1))
    return first * 100 + second


async def test_an_applied_ask_goes_on_before_its_record_and_a_crash_asks_it_again_by_its_id(
    env: Env,
) -> None:
    seen.clear()
    gates["d"] = asyncio.Event()
    await env.entities.ref_for(AccountEntity, "d").ask(Deposit(10))
    a = await env.engine_for(deferring, "defer-a")
    await a.start("withdraw-then-wait", "d", id="defer-1")
    await until(lambda: _true(len(seen) == 1))
    assert (await a.get("defer-1")).steps == ()  # the run went on; its record waits
    assert await env.balance("d") == 9
    await a.close(release=False)  # as a crash, the record unsent
    env.engines.remove(a)
    b = await env.engine_for(deferring, "defer-b")
    await until(lambda: _true(len(seen) == 2))
    assert seen == [9, 9]  # replayed live with its command id: the stored reply
    assert await env.balance("d") == 9  # not applied twice
    gates["d"].set()
    assert await b.result("defer-1", timeout=15) == 908
    assert await env.balance("d") == 8
    assert (await b.status("defer-1")).steps == ("ask wf-account Withdraw",) * 2


async def test_a_runs_last_asks_are_recorded_with_its_finish_in_one_event(bank: Env) -> None:
    await bank.entities.ref_for(AccountEntity, "f").ask(Deposit(100))
    await bank.engine.start("transfer", Transfer("f", "g", 30), id="folded")
    assert await bank.engine.result("folded", timeout=10) == "done"
    events = await bank.engine.journal_of("folded").events(WORKFLOW_ENTITY, "folded")
    assert [type(e.event).__name__ for e in events] == ["RunStarted", "RunFinished"]
    finished = events[-1].event
    assert [(r.position, r.name) for r in finished.steps] == [
        (0, "ask wf-account Withdraw"),
        (1, "ask wf-account Deposit"),
    ]
    run = await bank.engine.get("folded")
    assert run.status == "completed" and run.steps == finished.steps
    await until(lambda: _index_row_is(bank.engine, "folded", "completed", 2))
    detail = await inspect_run(bank.engine, "folded")
    assert [(s["position"], s["output"]) for s in detail["steps"]] == [(0, 70), (1, 30)]
    assert all(s["at"] == events[-1].timestamp.isoformat() for s in detail["steps"])
    assert detail["history"][-1]["what"] == "finished completed, with steps 0-1"


async def test_a_runs_start_and_finish_store_no_run_as_their_replies(bank: Env) -> None:
    # Every persisting command's reply is stored with its events: the start and the finish
    # that write answer None (the caller knows the state they make), not the whole run.
    await bank.entities.ref_for(AccountEntity, "s").ask(Deposit(100))
    run = await bank.engine.start("transfer", Transfer("s", "t", 30), id="small")
    assert run == await bank.engine.get("small")  # as recorded, though not sent back
    assert await bank.engine.result("small", timeout=10) == "done"
    replies = command_replies
    async with bank.engine.database.read() as conn:
        stored = (
            await conn.execute(
                select(replies.c.seq_nr, replies.c.payload)
                .where(replies.c.entity_type == WORKFLOW_ENTITY)
                .where(replies.c.entity_id == "small")
                .order_by(replies.c.seq_nr)
            )
        ).all()
    assert [(r.seq_nr, bytes(r.payload)) for r in stored] == [(1, b"\xc0"), (2, b"\xc0")]


async def _index_row_is(engine: WorkflowEngine, run_id: str, status: str, steps: int) -> bool:
    row = await run_row(engine.database, run_id)
    return row is not None and (row.status, row.steps) == (status, steps)


@serializable(name="RunFinished")  # as it was stored before its steps went into it
@dataclass(frozen=True)
class RunFinishedV1:
    status: str
    output: bytes | None
    error: str | None
    finished_us: int


async def test_a_run_stored_with_a_step_per_event_replays_and_retries(bank: Env) -> None:
    """Runs written before a finish carried its last steps (StepCompleted events, then
    RunFinished version 1) read as they did: state, index, inspection, and a retry."""
    await bank.entities.ref_for(AccountEntity, "o").ask(Deposit(100))
    encode = bank.engine.serializer.encode_value
    run_id = "old-run"
    old = [
        RunStarted("transfer", 1, encode(Transfer("o", "p", 10), Transfer), None, None, 1),
        StepCompleted(0, "ask wf-account Withdraw", encode(90, int)),
        StepCompleted(1, "ask wf-account Deposit", encode(10, int)),
        RunFinishedV1("completed", encode("done", str), None, 2),
    ]
    serializer = Serializer([RunStarted, StepCompleted, RunFinishedV1])
    async with await open_storage(settings=bank.journal, serializer=serializer) as storage:
        tags = [(WORKFLOW_TAG.for_entity(run_id),)] * len(old)
        write = AtomicWrite(WORKFLOW_ENTITY, run_id, 0, old, tags=tags)
        await storage.journal.append_one(write)
    run = await bank.engine.get(run_id)
    assert run.status == "completed" and [s.name for s in run.steps] == [
        "ask wf-account Withdraw",
        "ask wf-account Deposit",
    ]
    await until(lambda: _index_row_is(bank.engine, run_id, "completed", 2))
    detail = await inspect_run(bank.engine, run_id)
    assert [s["output"] for s in detail["steps"]] == [90, 10]
    await bank.engine.retry(run_id, 1)  # the deposit again (a new command id), not the withdraw
    assert await bank.engine.result(run_id, timeout=10) == "done"
    assert (await bank.balance("o"), await bank.balance("p")) == (100, 10)
    await until(lambda: _index_row_is(bank.engine, run_id, "completed", 2))


async def _true(value: bool) -> bool:
    return value


async def _holds(env: Env, engine: WorkflowEngine, run_id: str, account: str, left: int) -> bool:
    """The run exists and the account's balance is down to ``left``."""
    try:
        await engine.get(run_id)
    except WorkflowNotFound:
        return False
    return await env.balance(account) == left


async def test_an_ask_with_a_receipt_says_whether_its_reply_comes_back_by_its_id(
    journal_settings: JournalSettings,
) -> None:
    async with lagompy.start(
        entities=[UserEntity], journal_settings=journal_settings, ray=False
    ) as entities:
        ref = entities.ref_for(UserEntity, "receipt")
        first = await ref.ask_with_receipt(RegisterUser("Ada", "ada@example.org"), command_id="r1")
        assert first.committed and first.reply.name == "Ada"
        again = await ref.ask_with_receipt(RegisterUser("Bob", "bob@example.org"), command_id="r1")
        assert again == first  # the stored reply: not run again
        read = await ref.ask_with_receipt(GetUser(), command_id="r2")
        assert not read.committed and read.reply == first.reply  # read-only: it would run again
        with pytest.raises(lagompy.CommandRejected):
            await ref.ask_with_receipt(RegisterUser("Cy", "cy@example.org"), command_id="r3")


# --------------------------------------------------------------------------- crashes


crashy = Workflows()
calls: list[str] = []


async def external(name: str) -> str:
    calls.append(name)
    return name.upper()


@crashy.workflow("two-steps", version=1)
async def two_steps(ctx: WorkflowContext, name: str) -> str:
    first = await ctx.step(external, name)
    await ctx.sleep(0.5)
    second = await ctx.step(external, name + "-2")
    return f"{first}+{second}"


async def test_an_executor_that_dies_mid_run_is_replaced_and_no_completed_step_runs_again(
    env: Env,
) -> None:
    calls.clear()
    a = await env.engine_for(crashy, "exec-a")
    await a.start("two-steps", "x", id="crash-1")
    # Waiting on a's driver, which stops without finishing the run: the run's end is read.
    waiting = asyncio.create_task(a.result("crash-1", timeout=15))
    await until(lambda: _has_steps(a, "crash-1", 2))  # the first step and the timer
    await a.close(release=False)
    env.engines.remove(a)  # as a crash: the leases stay until they expire
    died = time.monotonic()
    b = await env.engine_for(crashy, "exec-b")
    try:
        assert await b.result("crash-1", timeout=15) == "X+X-2"
        took = time.monotonic() - died
        assert await waiting == "X+X-2"
        print(f"resumed and finished {took:.2f} s after the executor died")
        assert took < 5
        assert calls == ["x", "x-2"]
    finally:
        await b.close()


stubborn = Workflows()


@stubborn.workflow("stubborn", version=1)
async def swallows_cancels(ctx: WorkflowContext, name: str) -> str:
    await ctx.step(external, name)
    try:
        await ctx.receive("never")
    except asyncio.CancelledError:
        pass  # carries on, as code should not
    await ctx.step(external, name + "-after")
    return "went on"


async def test_code_that_swallows_the_cancel_of_an_executor_stopping_goes_no_further(
    env: Env,
) -> None:
    calls.clear()
    engine = await env.engine_for(stubborn, "exec-stubborn")
    await engine.start("stubborn", "s", id="stubborn-1")
    await until(lambda: _has_steps(engine, "stubborn-1", 1))
    await engine.close()  # it stops driving its runs: the next owner replays them
    assert calls == ["s"]  # no step after the swallowed cancel
    run = await env.entities.ref_for(WorkflowRun, "stubborn-1").ask(GetRun())
    assert isinstance(run, Run) and run.status == "running" and len(run.steps) == 1


# --------------------------------------------------------------------------- deploys


def deploy(version: str) -> Workflows:
    """The same workflow as three deploys would have it: v1, v2 (a new step behind a patch
    marker) and v3 (the same step added without one)."""
    registry = Workflows()

    @registry.workflow("order", version=1)
    async def order(ctx: WorkflowContext, name: str) -> list[str]:
        done: list[str] = [await ctx.step(external, f"{name}:a", name="a")]
        if version == "v2" and await ctx.patched("add-x"):
            done.append(await ctx.step(external, f"{name}:x", name="x"))
        if version == "v3":
            done.append(await ctx.step(external, f"{name}:x", name="x"))
        done.append(await ctx.step(external, f"{name}:b", name="b"))
        await ctx.receive("go")
        done.append(await ctx.step(external, f"{name}:c", name="c"))
        return done

    return registry


async def test_a_deploy_with_a_patched_change_finishes_old_runs_and_new_runs_take_it(
    env: Env,
) -> None:
    calls.clear()
    old = await env.engine_for(deploy("v1"), "deploy-v1")
    await old.start("order", "old", id="old")
    await until(lambda: _has_steps(old, "old", 2))  # a and b recorded, waiting for "go"
    await old.close()
    env.engines.remove(old)
    new = await env.engine_for(deploy("v2"), "deploy-v2")
    try:
        await new.start("order", "new", id="new")
        await until(lambda: _has_steps(new, "new", 3))
        for run_id in ("old", "new"):
            await new.send_signal(run_id, "go")
        assert await new.result("old", timeout=10) == ["OLD:A", "OLD:B", "OLD:C"]
        assert await new.result("new", timeout=10) == ["NEW:A", "NEW:X", "NEW:B", "NEW:C"]
        assert calls.count("old:a") == 1 and "old:x" not in calls
        status = await new.status("new")
        assert status.steps[:2] == ("a", "patch add-x")
    finally:
        await new.close()


async def test_a_non_deterministic_change_fails_the_run_naming_both_steps(env: Env) -> None:
    old = await env.engine_for(deploy("v1"), "nd-v1")
    await old.start("order", "nd", id="nd")
    await until(lambda: _has_steps(old, "nd", 2))
    await old.close()
    env.engines.remove(old)
    changed = await env.engine_for(deploy("v3"), "nd-v3")
    try:
        await changed.send_signal("nd", "go")
        with pytest.raises(WorkflowFailed) as failed:
            await changed.result("nd", timeout=10)
        message = str(failed.value)
        assert "WorkflowNonDeterminism" in message
        assert "recorded step 'b' at position 1" in message and "now calls 'x'" in message
    finally:
        await changed.close()


# --------------------------------------------------------------------------- flow control


gated = Workflows()


@gated.workflow("gate", version=1, max_running=2)
async def gate(ctx: WorkflowContext, n: int) -> int:
    await ctx.receive("open")
    return n


@gated.workflow("keyed", version=1)
async def keyed(ctx: WorkflowContext, n: int) -> int:
    await ctx.receive("open")
    return n


async def _statuses(engine: WorkflowEngine, workflow: str) -> dict[str, str]:
    return {r.run_id: r.status for r in await engine.list(workflow=workflow)}


async def test_flow_control_limits_keys_and_pause(env: Env) -> None:
    engine = await env.engine_for(gated, "flow")
    try:
        for i in range(4):
            await engine.start("gate", i, id=f"g{i}")
        await until(lambda: _running(engine, "gate", 2))
        await asyncio.sleep(0.3)
        statuses = await _statuses(engine, "gate")
        assert sorted(statuses.values()) == ["queued", "queued", "running", "running"]
        running = [r for r, status in statuses.items() if status == "running"]
        queued = [r for r, status in statuses.items() if status == "queued"]
        assert (await engine.status(queued[0])).status == "queued"
        for run_id in running:
            await engine.send_signal(run_id, "open")
        await until(lambda: _finished(engine, "gate", 2))
        await until(lambda: _running(engine, "gate", 2))  # the queue moved on
        after = await _statuses(engine, "gate")
        assert [after[r] for r in queued] == ["running", "running"]

        await engine.start("keyed", 1, id="k1", key="acct-1")
        await engine.start("keyed", 2, id="k2", key="acct-1")
        await engine.start("keyed", 3, id="k3", key="acct-2")
        await until(lambda: _running(engine, "keyed", 2))
        await until(lambda: _listed(engine, "keyed", 3))
        await asyncio.sleep(0.3)
        keyed_now = await _statuses(engine, "keyed")
        same_key = sorted((keyed_now["k1"], keyed_now["k2"]))
        assert same_key == ["queued", "running"], keyed_now  # one run per key at a time
        first, second = ("k1", "k2") if keyed_now["k1"] == "running" else ("k2", "k1")
        await engine.send_signal(first, "open")
        await until(lambda: _status_is(engine, second, "running"))

        await engine.pause("keyed")
        await engine.start("keyed", 4, id="k4")
        await asyncio.sleep(0.4)
        assert (await engine.status("k4")).status == "queued"
        assert await engine.paused() == {"gate": False, "keyed": True}
        await engine.start("keyed", 5, id="k5")
        await engine.cancel("k5", "not needed")  # queued: cancelled without running
        with pytest.raises(WorkflowFailed, match="not needed") as cancelled:
            await engine.result("k5", timeout=10)
        assert cancelled.value.status == "cancelled"
        assert (await engine.get("k5")).steps == ()
        await engine.unpause("keyed")
        await until(lambda: _status_is(engine, "k4", "running"))
        with pytest.raises(UnknownWorkflow):
            await engine.pause("nope")
    finally:
        await engine.close()


async def _running(engine: WorkflowEngine, workflow: str, n: int) -> bool:
    return list((await _statuses(engine, workflow)).values()).count("running") >= n


async def _listed(engine: WorkflowEngine, workflow: str, n: int) -> bool:
    return len(await _statuses(engine, workflow)) >= n


async def _finished(engine: WorkflowEngine, workflow: str, n: int) -> bool:
    return list((await _statuses(engine, workflow)).values()).count("completed") >= n


async def _status_is(engine: WorkflowEngine, run_id: str, status: str) -> bool:
    return (await engine.status(run_id)).status == status


async def test_an_operator_resumes_a_failed_run_and_retries_from_a_step(bank: Env) -> None:
    await bank.entities.ref_for(AccountEntity, "r").ask(Deposit(10))
    await bank.entities.ref_for(AccountEntity, "shut").ask(CloseAccount())
    await bank.engine.start("transfer", Transfer("r", "shut", 4), id="r1")
    with pytest.raises(WorkflowFailed):
        await bank.engine.result("r1", timeout=10)
    assert await bank.balance("r") == 10  # compensated
    with pytest.raises(lagompy.InvalidCommand, match="only a finished run"):
        await bank.engine.start("approval", "x", id="busy")
        await bank.engine.resume("busy")
    await bank.engine.retry("r1", 0)  # from the start: a new generation, new command ids
    with pytest.raises(WorkflowFailed):
        await bank.engine.result("r1", timeout=10)
    assert await bank.balance("r") == 10
    await until(lambda: _index_is(bank.engine, "transfer", {"r1": "failed"}))


async def test_a_run_reopened_while_its_last_driver_ends_is_driven_again(
    bank: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail can read a run's RunReopened while the driver of its previous end is still
    ending (its task not done: the finish's reply on its way). The run is driven again once
    that task has ended, not left reopened with no driver."""
    await bank.entities.ref_for(AccountEntity, "q").ask(Deposit(10))
    await bank.entities.ref_for(AccountEntity, "gone").ask(CloseAccount())
    engine = bank.engine
    await engine.start("transfer", Transfer("q", "gone", 4), id="q1")
    with pytest.raises(WorkflowFailed):
        await engine.result("q1", timeout=10)
    executor = engine.executor
    assert executor is not None
    # A driver still ending when the tail reads the reopen: its task runs until set.
    ending = asyncio.Event()

    async def end() -> None:
        await ending.wait()

    still_ending = RunDriver(executor, "q1", executor.partition_of("q1"))
    still_ending.task = asyncio.create_task(end())
    executor.drivers["q1"] = still_ending
    read = asyncio.Event()
    committed = executor.committed

    def watched(tag: str, envelopes: Iterable[EventEnvelope[Any]]) -> None:
        envelopes = list(envelopes)
        committed(tag, envelopes)
        if any(isinstance(e.event, RunReopened) and e.entity_id == "q1" for e in envelopes):
            read.set()

    monkeypatch.setattr(executor, "committed", watched)
    await engine.retry("q1", 0)
    await asyncio.wait_for(read.wait(), 10)  # the tail read the reopen, the driver still ending
    ending.set()
    with pytest.raises(WorkflowFailed):  # driven again: it fails again, compensated again
        await engine.result("q1", timeout=10)
    assert (await engine.status("q1")).status == "failed"
    assert await bank.balance("q") == 10


def _lose_a_reply(
    monkeypatch: pytest.MonkeyPatch,
    entities: InProcessEntities,
    run_id: str,
    kind: type[Any],
    meanwhile: Callable[[Any], Awaitable[None]],
) -> list[Any]:
    """The first ``kind`` command sent to run ``run_id`` is applied, then ``meanwhile(ref)``
    runs (what other processes do while its reply is lost), and its sender gets
    ``OutcomeUnknown`` (a shard host that died with the reply): the driver asks again, as it
    does after a runtime failure. Returns the command whose reply was lost, once sent."""
    ref_for = entities.ref_for
    lost: list[Any] = []

    class LosingRef:
        def __init__(self, ref: Any) -> None:
            self.ref = ref

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ref, name)

        async def ask(self, command: Any, **options: Any) -> Any:
            reply = await self.ref.ask(command, **options)
            if isinstance(command, kind) and not lost:
                lost.append(command)
                await meanwhile(self.ref)
                raise OutcomeUnknown("lost-reply", "the shard host died with the reply")
            return reply

    def losing(entity: Any, entity_id: str) -> Any:
        ref = ref_for(entity, entity_id)
        if ref.entity_type == WORKFLOW_ENTITY and entity_id == run_id:
            return LosingRef(ref)
        return ref

    monkeypatch.setattr(entities, "ref_for", losing)
    return lost


async def test_a_finish_sent_again_after_its_run_was_reopened_does_not_end_the_new_generation(
    bank: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's FinishRun commits but its reply is lost (OutcomeUnknown); before the
    driver sends it again, an operator retries the run from the deposit (generation 1). The
    finish sent again is generation 0's: it does not end the reopened run, which is driven
    again and deposits again."""
    await bank.entities.ref_for(AccountEntity, "rf").ask(Deposit(100))

    async def retried_from_the_deposit(ref: Any) -> None:
        assert (await ref.ask(ReopenRun(1))).generation == 1

    lost = _lose_a_reply(
        monkeypatch, bank.entities, "refinish", FinishRun, retried_from_the_deposit
    )
    await bank.engine.start("transfer", Transfer("rf", "rg", 10), id="refinish")
    assert await bank.engine.result("refinish", timeout=10) == "done"
    assert len(lost) == 1
    await until(lambda: _holds(bank, bank.engine, "refinish", "rg", 20))  # deposited again
    await until(lambda: _status_is(bank.engine, "refinish", "completed"))
    run = await bank.engine.get("refinish")
    assert run.generation == 1
    decode = bank.engine.serializer.decode_value
    assert [decode(s.output, int) for s in run.steps] == [90, 20]  # generation 1's deposit
    events = await bank.engine.journal_of("refinish").events(WORKFLOW_ENTITY, "refinish")
    names = [type(e.event).__name__ for e in events]
    assert names == ["RunStarted", "RunFinished", "RunReopened", "RunFinished"]
    assert await bank.balance("rf") == 90


async def test_records_sent_again_after_their_run_was_reopened_are_not_the_new_generations(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver's RecordSteps commits but its reply is lost; meanwhile another executor
    finished the run (this one's lease had lapsed) and an operator retried it from position
    0. The records sent again are generation 0's: they are refused (the driver stops), and
    the reopened run runs its first step again rather than finding it recorded."""
    calls.clear()

    async def finished_elsewhere_and_retried(ref: Any) -> None:
        other = FinishRun("failed", None, "finished by another executor", 1, ())
        assert await ref.ask(other) is None
        assert (await ref.ask(ReopenRun(0))).steps == ()

    lost = _lose_a_reply(
        monkeypatch, env.entities, "rerecord", RecordSteps, finished_elsewhere_and_retried
    )
    engine = await env.engine_for(crashy, "rerecord")
    await engine.start("two-steps", "r", id="rerecord")
    await until(lambda: _status_is(engine, "rerecord", "completed"))
    assert len(lost) == 1
    assert calls == ["r", "r", "r-2"]  # the first step again, in generation 1
    run = await engine.get("rerecord")
    assert run.generation == 1 and len(run.steps) == 3
    assert await engine.result("rerecord", timeout=10) == "R+R-2"


async def test_a_signal_or_reopen_sent_again_after_a_lost_reply_applies_once(
    bank: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine asks again after a runtime failure: a signal or a retry whose first try
    committed with its reply lost gets that try's stored reply (one command id for the
    tries), not a second signal, nor a refusal (or a second reopen) of the reopened run."""

    async def nothing(_: Any) -> None:
        pass

    engine = bank.engine
    await engine.start("approval", "ann", id="once-signal")
    await until(lambda: _has_steps(engine, "once-signal", 1))  # its receive timer recorded
    lost = _lose_a_reply(monkeypatch, bank.entities, "once-signal", DeliverSignal, nothing)
    assert await engine.send_signal("once-signal", "decision", "yes") == 0
    assert len(lost) == 1
    assert await engine.result("once-signal", timeout=10) == "ann: yes"
    assert len((await engine.get("once-signal")).signals) == 1
    monkeypatch.undo()

    await bank.entities.ref_for(AccountEntity, "oa").ask(Deposit(10))
    await bank.entities.ref_for(AccountEntity, "ob").ask(CloseAccount())
    await engine.start("transfer", Transfer("oa", "ob", 4), id="once-retry")
    with pytest.raises(WorkflowFailed):
        await engine.result("once-retry", timeout=10)
    lost = _lose_a_reply(monkeypatch, bank.entities, "once-retry", ReopenRun, nothing)
    reopened = await engine.retry("once-retry", 0)
    assert len(lost) == 1 and reopened.generation == 1
    with pytest.raises(WorkflowFailed):
        await engine.result("once-retry", timeout=10)
    await until(lambda: _status_is(engine, "once-retry", "failed"))
    assert (await engine.get("once-retry")).generation == 1
    assert await bank.balance("oa") == 10


async def test_a_run_takes_no_record_compensation_or_finish_of_an_earlier_generation(
    env: Env,
) -> None:
    """Commands that carry their generation apply to that generation only; those without one
    (from an executor of an earlier version, during a deploy) apply as they did."""
    ref = env.entities.ref_for(WorkflowRun, "gens")
    step = StepRecord(0, "a", True, b"1")
    assert await ref.ask(StartRun("w", 1, b"in", at_us=1)) is None
    assert await ref.ask(RecordSteps((step,), generation=0)) == ()
    assert await ref.ask(FinishRun("failed", None, "boom", 2, (), generation=0)) is None
    assert (await ref.ask(ReopenRun(0))).generation == 1
    with pytest.raises(lagompy.InvalidCommand, match="generation 1"):
        await ref.ask(RecordSteps((step,), generation=0))
    with pytest.raises(lagompy.InvalidCommand, match="generation 1"):
        await ref.ask(RecordStep(step, generation=0))
    await ref.ask(RecordCompensated(0, "undo", True, generation=0))
    stale = await ref.ask(FinishRun("completed", b"old", None, 3, (step,), generation=0))
    assert isinstance(stale, Run) and stale.status == "running" and stale.generation == 1
    run = await ref.ask(GetRun())
    assert isinstance(run, Run)
    assert (run.status, run.steps, run.compensated, run.output) == ("running", (), (), None)
    # Generation 1's own commands apply.
    assert await ref.ask(RecordSteps((step,), generation=1)) == ()
    await ref.ask(RecordCompensated(0, "undo", True, generation=1))
    run = await ref.ask(GetRun())
    assert isinstance(run, Run) and (run.steps, run.compensated) == ((step,), (0,))
    assert await ref.ask(FinishRun("failed", None, "again", 4, (), generation=1)) is None
    assert (await ref.ask(ReopenRun(1))).generation == 2
    # Without a generation: as before (the run's current one). A command pickled by an
    # executor of an earlier version (Ray sends commands pickled) reads as one without.
    earlier = FinishRun("completed", b"out", None, 5, ())
    del earlier.__dict__["generation"]  # as that version's instances were
    sent = pickle.loads(pickle.dumps(earlier))
    assert sent.generation is None
    assert await ref.ask(sent) is None
    run = await ref.ask(GetRun())
    assert isinstance(run, Run) and (run.status, run.generation, run.output) == (
        "completed",
        2,
        b"out",
    )


async def _synchronous(database: object) -> int:
    from sqlalchemy import text

    from lagompy.sql._database import Database

    assert isinstance(database, Database)
    async with database.read() as conn:
        return int((await conn.execute(text("PRAGMA synchronous"))).scalar_one())


async def test_on_a_sqlite_file_the_runs_index_commits_without_an_fsync(bank: Env) -> None:
    """SQLite's one write lock is held through a commit's fsync: the runs index (rebuilt from
    the journal if a machine crash loses its last transactions, with their positions) writes
    on connections that commit without one, the journal's stay synced."""
    engine = bank.engine
    executor = engine.executor
    assert executor is not None
    projection = next(iter(executor.partitions.values())).worker.projection
    if bank.journal.url.startswith("sqlite"):
        assert projection is not engine.database
        assert await _synchronous(projection) == 1  # NORMAL
        assert await _synchronous(engine.database) == 2  # FULL, the journal's default
    else:
        assert projection is engine.database
    await engine.start("transfer", Transfer("a", "b", 0), id="t-sync")
    assert await engine.result("t-sync", timeout=10) == "done"
    await until(lambda: _index_is(engine, "transfer", {"t-sync": "completed"}))


# --------------------------------------------------------------------------- result()


@pytest.fixture
def run_commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(run id, command name) of every command the runs' entities decide, in order; and no
    read of a run's state while ``result`` waits for its driver here (a slow test machine
    does not add any)."""
    decided: list[tuple[str, str]] = []
    on_command = WorkflowRun.on_command

    def counted(self: WorkflowRun, state: Any, command: Any) -> Any:
        decided.append((self.entity_id, type(command).__name__))
        return on_command(self, state, command)

    monkeypatch.setattr(WorkflowRun, "on_command", counted)
    monkeypatch.setattr(workflow_executor, "WATCH_READS", 60.0)
    return decided


def _commands_of(decided: list[tuple[str, str]], run_id: str) -> list[str]:
    return [name for of, name in decided if of == run_id]


async def _driving_all(engine: WorkflowEngine) -> None:
    """Until the engine's executor holds every partition (it drives the runs it starts)."""
    executor = engine.executor
    assert executor is not None
    await until(lambda: _true(all(p.epoch is not None for p in executor.partitions.values())))


async def _failure(engine: WorkflowEngine, run_id: str) -> tuple[str, str, str]:
    with pytest.raises(WorkflowFailed) as failed:
        await engine.result(run_id, timeout=10)
    return str(failed.value), failed.value.run_id, failed.value.status


async def test_the_result_of_a_run_driven_here_is_its_finish_with_no_read_of_the_run(
    bank: Env, run_commands: list[tuple[str, str]]
) -> None:
    """A result() that begins while this process's driver has not sent its FinishRun is
    answered by that finish (it committed during the wait); one that begins after the driver
    ended reads the run (GetRun), and both answer the same."""
    await bank.entities.ref_for(AccountEntity, "u").ask(Deposit(100))
    await bank.entities.ref_for(AccountEntity, "shut-u").ask(CloseAccount())
    engine = bank.engine
    await _driving_all(engine)
    await engine.start("transfer", Transfer("u", "v", 30), id="here-ok")
    assert await engine.result("here-ok", timeout=10) == "done"
    assert _commands_of(run_commands, "here-ok") == ["StartRun", "FinishRun"]
    await engine.start("transfer", Transfer("u", "shut-u", 30), id="here-bad")
    failed = await _failure(engine, "here-bad")
    assert failed == (
        "workflow run 'here-bad' failed: StepFailed: deposit rejected: account shut-u is closed",
        "here-bad",
        "failed",
    )
    assert "GetRun" not in _commands_of(run_commands, "here-bad")
    # Begun after the drivers ended: the runs' state is read, and says the same.
    assert await engine.result("here-ok", timeout=10) == "done"
    assert await _failure(engine, "here-bad") == failed
    assert _commands_of(run_commands, "here-ok") == ["StartRun", "FinishRun", "GetRun"]
    assert _commands_of(run_commands, "here-bad")[-1] == "GetRun"
    assert (await bank.balance("u"), await bank.balance("v")) == (70, 30)


async def test_the_result_of_a_run_cancelled_while_driven_here_is_its_cancelled_finish(
    env: Env, run_commands: list[tuple[str, str]]
) -> None:
    await env.entities.ref_for(AccountEntity, "hc").ask(Deposit(5))
    engine = await env.engine_for(cancellable, "cancel-result")
    await _driving_all(engine)
    await engine.start("hold", "hc", id="hold-r")
    await until(lambda: _has_steps(engine, "hold-r", 1))
    read = len(run_commands)
    waiting = asyncio.create_task(_failure(engine, "hold-r"))
    await asyncio.sleep(0.05)  # the wait has begun
    await engine.cancel("hold-r", "not wanted")
    message, run_id, status = await waiting
    assert (run_id, status) == ("hold-r", "cancelled")
    assert message == "workflow run 'hold-r' cancelled: cancelled: not wanted"
    assert "GetRun" not in [name for _, name in run_commands[read:]]
    assert await _failure(engine, "hold-r") == (message, run_id, status)  # read: the same
    assert await env.balance("hc") == 5


async def test_a_result_never_answers_a_finish_made_here_once_the_run_may_be_reopened(
    bank: Env, run_commands: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process reopens a run this one finished, and this executor has not read the
    reopen yet: a result() begun now waits for the run's new end, not its previous one."""
    await bank.entities.ref_for(AccountEntity, "w").ask(Deposit(100))
    engine = bank.engine
    executor = engine.executor
    assert executor is not None
    await _driving_all(engine)
    await engine.start("transfer", Transfer("w", "x", 10), id="again")
    assert await engine.result("again", timeout=10) == "done"
    committed = executor.committed
    held: list[EventEnvelope[Any]] = []

    def not_yet(tag: str, envelopes: Iterable[EventEnvelope[Any]]) -> None:
        envelopes = list(envelopes)
        held.extend(e for e in envelopes if isinstance(e.event, RunReopened))
        committed(tag, [e for e in envelopes if not isinstance(e.event, RunReopened)])

    monkeypatch.setattr(executor, "committed", not_yet)
    # As another process's engine would: the run's entity reopened, from the deposit on.
    reopened = await bank.entities.ref_for(WorkflowRun, "again").ask(ReopenRun(1))
    assert reopened.status == "running" and reopened.generation == 1
    with pytest.raises(TimeoutError):  # not driven here yet, and not "done" from before
        await engine.result("again", timeout=0.5)
    await until(lambda: _true(len(held) == 1))
    committed(executor.partition_of("again"), held)  # the reopen read: driven again
    assert await engine.result("again", timeout=10) == "done"
    assert (await bank.balance("w"), await bank.balance("x")) == (90, 20)  # deposited twice
    assert _commands_of(run_commands, "again").count("FinishRun") == 2


async def test_a_result_whose_driver_found_the_run_finished_before_reads_the_run(
    bank: Env, run_commands: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's FinishRun finds the run finished (by another executor, its lease gone):
    the result is the run's recorded end, read, not what this driver would have written."""
    await bank.entities.ref_for(AccountEntity, "y").ask(Deposit(100))
    finish = RunDriver._finish

    async def beaten(
        driver: RunDriver, run: Run, status: str, output: bytes | None, error: str | None
    ) -> None:
        other = FinishRun("failed", None, "finished by another executor", 1, ())
        await driver.ask_run(other)  # as another executor would, first
        await finish(driver, run, status, output, error)

    monkeypatch.setattr(RunDriver, "_finish", beaten)
    await _driving_all(bank.engine)
    await bank.engine.start("transfer", Transfer("y", "z", 10), id="beaten")
    message, _, status = await _failure(bank.engine, "beaten")
    assert status == "failed"
    assert message == "workflow run 'beaten' failed: finished by another executor"
    assert _commands_of(run_commands, "beaten") == ["StartRun", "FinishRun", "FinishRun", "GetRun"]


async def test_a_child_run_driven_here_starts_at_once_and_its_end_is_not_read(
    bank: Env, run_commands: list[tuple[str, str]]
) -> None:
    """A child run started by a run driven here is driven here at once (as a run the engine
    starts; the partitions' tail finds it driven), and its parent waits for its driver's
    finish: no read of a run's state anywhere."""
    await _driving_all(bank.engine)
    await bank.engine.start("parent", 3, id="pc")
    assert await bank.engine.result("pc", timeout=10) == 12
    assert [c for c in run_commands if c[1] == "GetRun"] == []
    for child in ("pc/0", "pc/1"):
        assert _commands_of(run_commands, child) == ["StartRun", "RecordSteps", "FinishRun"]
    assert (await bank.engine.status("pc")).steps == ("child double", "child double")


async def test_a_result_begun_once_the_finish_is_sent_reads_the_run(
    bank: Env, run_commands: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait that begins once the driver has set out to send its FinishRun (its driver
    still running) does not take that finish: the run is read once the driver has ended."""
    await bank.entities.ref_for(AccountEntity, "k").ask(Deposit(100))
    engine = bank.engine
    late: list[asyncio.Task[Any]] = []
    ask_run = RunDriver.ask_run

    async def finishing(driver: RunDriver, command: Any, run_id: str | None = None) -> Any:
        if isinstance(command, FinishRun) and driver.run_id == "late":
            late.append(asyncio.create_task(engine.result("late", timeout=10)))
            await asyncio.sleep(0.01)  # the wait has begun, before the send itself
        return await ask_run(driver, command, run_id)

    monkeypatch.setattr(RunDriver, "ask_run", finishing)
    await _driving_all(engine)
    await engine.start("transfer", Transfer("k", "l", 10), id="late")
    assert await engine.result("late", timeout=10) == "done"  # begun before: no read
    assert len(late) == 1 and await late[0] == "done"
    assert _commands_of(run_commands, "late") == ["StartRun", "FinishRun", "GetRun"]


async def test_a_result_whose_drivers_finish_was_rejected_does_not_take_it(
    bank: Env, run_commands: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's FinishRun is rejected (its first position holds another executor's
    step): the run is not finished by it, and a result() that waited for that driver does
    not answer "done" (the run stays running, or a later driver from the partition's tail
    replays it and fails it: non-deterministic)."""
    await bank.entities.ref_for(AccountEntity, "m").ask(Deposit(100))
    finish = RunDriver._finish

    async def overtaken(
        driver: RunDriver, run: Run, status: str, output: bytes | None, error: str | None
    ) -> None:
        other = RecordSteps((StepRecord(0, "another step", True),))
        await driver.ask_run(other)  # as another executor would, first
        await finish(driver, run, status, output, error)

    monkeypatch.setattr(RunDriver, "_finish", overtaken)
    await _driving_all(bank.engine)
    await bank.engine.start("transfer", Transfer("m", "n", 10), id="overtaken")
    with pytest.raises((TimeoutError, WorkflowFailed)) as raised:
        await bank.engine.result("overtaken", timeout=1.0)
    run = await bank.engine.get("overtaken")
    assert run.steps[0].name == "another step"
    if isinstance(raised.value, WorkflowFailed):
        assert run.status == "failed" and "WorkflowNonDeterminism" in str(raised.value)
    else:
        assert run.status == "running"
    assert _commands_of(run_commands, "overtaken")[:3] == ["StartRun", "RecordSteps", "FinishRun"]


def test_workflow_settings_refuse_what_would_fail_later() -> None:
    """Checked when built, naming the setting: inf and nan passed the bounds and failed far
    from them (a lease of inf seconds in a worker)."""
    from lagompy.errors import ConfigurationError

    cases: list[tuple[dict[str, Any], str]] = [
        ({"lease_ttl": float("inf")}, "lease_ttl must be a finite number"),
        ({"retry_max_delay": float("nan")}, "retry_max_delay must be a finite number"),
        ({"ask_timeout": float("inf")}, "ask_timeout must be a finite number"),
        ({"renew_interval": 20.0}, "below lease_ttl"),
        ({"admission_interval": 0}, "admission_interval must be above 0"),
        ({"max_batch": 0}, "max_batch must be at least 1"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigurationError, match=words):
            WorkflowSettings(**kwargs)
