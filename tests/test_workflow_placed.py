"""Durable workflows on a journal placed on several databases (SQLite files, PostgreSQL schemas):
the executor has one partition per (shard of the runs' tag, database), keyed like a read side's
(``lagompy-workflows-<i>`` on the home database, ``...@<name>`` on another), each reading its own
database's journal into the runs index of the home database. Transfers whose runs fall on every
database finish exactly once; an executor that dies mid-way is replaced and the next one resumes
the unfinished runs of every partition; the operations (list, inspect, cancel, retry, signal)
find a run on a database other than the home one, from Python and over a service's routes.
The entities run on Ray: its shard hosts write each run to its slice's database."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import lagompy
from lagompy import JournalSettings
from lagompy.console import ConsoleSettings
from lagompy.journal._placement import Placement, partition_key
from lagompy.journal._storage import open_placed_storage
from lagompy.runtime._protocol import EntityRuntime
from lagompy.service import Service
from lagompy.testkit.server import serve_in_thread
from lagompy.workflow import (
    WORKFLOW_ENTITY,
    WORKFLOW_TAG,
    RunFilter,
    WorkflowEngine,
    WorkflowRun,
    WorkflowsComponent,
    WorkflowSettings,
    bulk,
    find_runs,
    inspect_run,
    start_workflows,
)
from tests.conftest import Placed
from tests.workflow_app import AccountEntity, CloseAccount, Deposit, Transfer, workflows

FAST = WorkflowSettings(lease_ttl=1.0, renew_interval=0.25, admission_interval=0.1)


async def until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


def keys_of(placement: Placement) -> list[str]:
    """Every partition key of the executor on ``placement``."""
    return sorted(k for t in WORKFLOW_TAG.all_tags for k, _ in placement.partitions(t))


def key_of(placement: Placement, run_id: str) -> str:
    return partition_key(WORKFLOW_TAG.for_entity(run_id), placement.database_of(run_id))


def run_ids(placement: Placement, prefix: str, per_partition: int) -> list[str]:
    """Run ids, ``per_partition`` on each partition (every shard of every database)."""
    wanted = dict.fromkeys(keys_of(placement), per_partition)
    ids: list[str] = []
    i = 0
    while any(wanted.values()):
        run_id = f"{prefix}-{i}"
        i += 1
        key = key_of(placement, run_id)
        if wanted[key]:
            wanted[key] -= 1
            ids.append(run_id)
    return ids


@asynccontextmanager
async def entities_on_ray(settings: JournalSettings) -> AsyncIterator[EntityRuntime]:
    """The accounts and the runs on Ray (one shard host), writing to every database."""
    app = f"wfp-{uuid.uuid4().hex[:8]}"
    try:
        async with lagompy.start(
            app=app, entities=[AccountEntity, WorkflowRun], journal_settings=settings, hosts=1
        ) as entities:
            yield entities
    finally:
        await lagompy.shutdown_app(app)


def held(engine: WorkflowEngine) -> set[str]:
    """The partitions the engine's executor holds now."""
    assert engine.executor is not None
    return {k for k, p in engine.executor.partitions.items() if p.worker.lease is not None}


async def has_steps(engine: WorkflowEngine, run_id: str, n: int) -> bool:
    return len((await engine.get(run_id)).steps) >= n


@pytest.mark.parametrize("databases", [2, 4])
async def test_transfers_finish_once_and_a_restart_resumes_the_runs_of_every_partition(
    ray_session: Any, placed: Placed, databases: int
) -> None:
    settings = await placed(databases)
    placement = Placement.of(settings)
    keys = keys_of(placement)
    assert len(keys) == WORKFLOW_TAG.shards * databases
    async with entities_on_ray(settings) as entities:
        balance = functools.partial(_balance, entities)
        a = await start_workflows(
            workflows, runtime=entities, journal_settings=settings, settings=FAST, owner="a"
        )
        b: WorkflowEngine | None = None
        try:
            assert a.executor is not None
            assert sorted(a.executor.partitions) == keys
            await until(lambda: _is(held(a) == set(keys)))

            # Plain transfers, two per partition: each applied once.
            plain = run_ids(placement, "t", 2)
            for run in plain:
                await entities.ref_for(AccountEntity, f"{run}-from").ask(Deposit(100))
                await a.start("transfer", Transfer(f"{run}-from", f"{run}-to", 30), id=run)
            for run in plain:
                assert await a.result(run, timeout=20) == "done"
                assert (await balance(f"{run}-from"), await balance(f"{run}-to")) == (70, 30)

            # Gated transfers, two per partition, withdrawn and waiting; then the executor dies.
            gated = run_ids(placement, "g", 2)
            for run in gated:
                await entities.ref_for(AccountEntity, f"{run}-from").ask(Deposit(100))
                await a.start("gated-transfer", Transfer(f"{run}-from", f"{run}-to", 30), id=run)
            for run in gated:
                await until(functools.partial(has_steps, a, run, 1))
            await a.close(release=False)  # as a crash: the leases stay until they expire

            b = await start_workflows(
                workflows, runtime=entities, journal_settings=settings, settings=FAST, owner="b"
            )
            await until(lambda: _is(held(b) == set(keys)))
            assert b.executor is not None
            # Taking each partition resumed that partition's unfinished runs, and only them.
            await until(lambda: _is(set(gated) <= set(_driven(b))))
            for run, key in _driven(b).items():
                assert key == key_of(placement, run)
            for _ in range(2):
                for run in gated:
                    await b.send_signal(run, "go")
            for run in gated:
                assert await b.result(run, timeout=20) == "done"
                assert (await balance(f"{run}-from"), await balance(f"{run}-to")) == (70, 30)
            assert b.executor.metrics.finished.get(("gated-transfer", "completed"), 0) == len(gated)

            # The index (home database) has every run, fed by the partitions of every database.
            every = {run: "completed" for run in plain + gated}
            await until(lambda: _statuses(b, every))
        finally:
            if b is not None:
                await b.close()
            await a.close()

    # Each run's events are in its own database's journal, and only there.
    async with await open_placed_storage(settings=settings, entities=[WorkflowRun]) as storage:
        for run in plain + gated:
            home = placement.database_of(run)
            for name, part in storage.parts.items():
                events = await part.journal.events(WORKFLOW_ENTITY, run)
                assert bool(events) == (name == home), (run, name)
    assert {placement.database_of(run) for run in plain} == set(placement.names)


async def test_two_executors_share_the_partitions_of_every_database(
    ray_session: Any, placed: Placed
) -> None:
    """The partitions (shard, database) spread over the executors like a read side's: each
    gets half, and each drives the runs of its own partitions to their end, once."""
    settings = await placed(2)
    placement = Placement.of(settings)
    keys = set(keys_of(placement))
    async with entities_on_ray(settings) as entities:
        engines = []
        try:
            for owner in ("a", "b"):
                engines.append(
                    await start_workflows(
                        workflows,
                        runtime=entities,
                        journal_settings=settings,
                        settings=FAST,
                        owner=owner,
                    )
                )
            a, b = engines
            half = len(keys) // 2
            await until(lambda: _is(len(held(a)) == len(held(b)) == half))
            assert held(a) | held(b) == keys
            runs = run_ids(placement, "r", 2)
            for run in runs:
                await entities.ref_for(AccountEntity, f"{run}-from").ask(Deposit(100))
                await a.start("transfer", Transfer(f"{run}-from", f"{run}-to", 30), id=run)
            for run in runs:
                assert await b.result(run, timeout=20) == "done"
                assert (
                    await _balance(entities, f"{run}-from"),
                    await _balance(entities, f"{run}-to"),
                ) == (70, 30)
            finished = [
                e.executor.metrics.finished.get(("transfer", "completed"), 0)
                for e in engines
                if e.executor is not None
            ]
            assert sum(finished) == len(runs) and all(finished)  # once each, both drove
        finally:
            for engine in engines:
                await engine.close()


async def test_the_operations_find_a_run_on_a_database_other_than_the_home_one(
    ray_session: Any, placed: Placed
) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    on_b = [r for r in (f"op-{i}" for i in range(200)) if placement.database_of(r) == "b"]
    done, failing, waiting, signalled = on_b[:4]
    async with (
        entities_on_ray(settings) as entities,
        await start_workflows(
            workflows, runtime=entities, journal_settings=settings, settings=FAST
        ) as engine,
    ):
        await entities.ref_for(AccountEntity, "src").ask(Deposit(100))
        await entities.ref_for(AccountEntity, "shut").ask(CloseAccount())
        await engine.start("transfer", Transfer("src", "dst", 10), id=done)
        await engine.start("transfer", Transfer("src", "shut", 10), id=failing)
        await engine.start("approval", "ada", id=waiting)
        await engine.start("approval", "bob", id=signalled)
        assert await engine.result(done, timeout=20) == "done"
        await until(lambda: _is_status(engine, failing, "failed"))
        await until(functools.partial(_index_has, engine, [done, failing, waiting, signalled]))

        # inspect: the run's whole history, read from its own database's journal
        shown = await inspect_run(engine, done)
        assert shown["status"] == "completed"
        assert [h["event"] for h in shown["history"]] == ["RunStarted", "RunFinished"]
        assert [s["position"] for s in shown["steps"]] == [0, 1]  # recorded with the finish

        # list (the index, in the home database) finds them
        rows = await find_runs(engine, RunFilter(id_prefix="op-"))
        assert {r.run_id for r in rows} >= {done, failing, waiting, signalled}

        # signal, cancel, retry: commands to the run's entity on its database
        await engine.send_signal(signalled, "decision", "yes")
        assert await engine.result(signalled, timeout=20) == "bob: yes"
        result = await bulk(engine, "cancel", RunFilter(id_prefix=waiting), reason="test")
        assert (result.matched, result.done) == (1, 1)
        await until(lambda: _is_status(engine, waiting, "cancelled"))
        await engine.retry(done, 0)
        assert await engine.result(done, timeout=20) == "done"
        assert await _balance(entities, "dst") == 20  # the retried transfer deposited again
        history = (await inspect_run(engine, done))["history"]
        assert [h["event"] for h in history].count("RunReopened") == 1


@pytest.fixture
def served(ray_session: Any, placed: Placed) -> Iterator[tuple[httpx.Client, Placement]]:
    settings = asyncio.run(_settings_of(placed, 2))
    name = f"wfp-{uuid.uuid4().hex[:8]}"
    service = Service(
        name=name,
        entities=[AccountEntity, WorkflowRun],
        journal_settings=settings,
        runtime_options={"hosts": 1},
        components=[WorkflowsComponent(workflows, settings=FAST, routes=True)],
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=ConsoleSettings(token="workflow-console-token-0123456789"))
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http, Placement.of(settings)
    finally:
        asyncio.run(lagompy.shutdown_app(name))


def test_a_service_runs_and_shows_workflows_on_every_database(
    served: tuple[httpx.Client, Placement],
) -> None:
    http, placement = served
    ids = run_ids(placement, "s", 1)
    for run in ids:
        posted = http.post(
            "/workflows",
            json={"workflow": "transfer", "id": run,
                  "input": {"source": "none", "target": "x", "amount": 0}},
        )  # fmt: skip
        assert posted.status_code == 202, posted.text
    deadline = time.monotonic() + 30
    for run in ids:
        while (shown := http.get(f"/workflows/{run}").json())["status"] != "completed":
            assert time.monotonic() < deadline, shown
            time.sleep(0.05)
        assert shown["history"], shown
        # the console's page of the run shows its history (read from the run's database)
        page = http.get(f"/console/workflows/{run}")
        assert page.status_code == 200 and "finished completed" in page.text, run
    deadline = time.monotonic() + 30
    while True:
        listed = http.get("/workflows", params={"id_prefix": "s-", "limit": 100}).json()["runs"]
        if sorted(r["run_id"] for r in listed if r["status"] == "completed") == sorted(ids):
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)


# --------------------------------------------------------------------------- helpers


async def _settings_of(placed: Placed, databases: int) -> JournalSettings:
    settings: JournalSettings = await placed(databases)
    return settings


async def _is(value: bool) -> bool:
    return value


async def _balance(entities: EntityRuntime, account: str) -> int:
    return await entities.ref_for(AccountEntity, account).ask(Deposit(0))


def _driven(engine: WorkflowEngine) -> dict[str, str]:
    """The runs the engine's executor drives now, with their partitions' keys."""
    assert engine.executor is not None
    return {run: d.tag for run, d in engine.executor.drivers.items()}


async def _statuses(engine: WorkflowEngine, expected: dict[str, str]) -> bool:
    rows = await engine.list(limit=10_000)
    return {r.run_id: r.status for r in rows if r.run_id in expected} == expected


async def _is_status(engine: WorkflowEngine, run_id: str, status: str) -> bool:
    return (await engine.get(run_id)).status == status


async def _index_has(engine: WorkflowEngine, ids: list[str]) -> bool:
    rows = await engine.list(limit=10_000)
    return set(ids) <= {r.run_id for r in rows}
