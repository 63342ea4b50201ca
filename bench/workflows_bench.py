"""Durable workflows benchmark, on a local Ray with default settings, SQLite and PostgreSQL:

* a 3-step workflow (three entity asks, ``ctx.ask``) beside single commands at the same
  concurrency (64 runs / asks in flight): runs/s against commands/s; and, one run at a
  time, each step's time (``await ctx.ask(...)`` in the workflow) against a bare ask with a
  command id (what ``ctx.ask`` sends), blocks of each in turn: the per-step overhead;
* a shard host killed under 100 running runs (each: three asks, each followed by an
  external-call step that takes 0.2 s): seconds from the kill until each unfinished run
  records its next step (p50, p99, max), completed steps that ran again (external calls of
  positions recorded before the kill, after it), runs lost, asks applied twice;
* 1,000 runs started at once of a workflow with ``max_running=50``: the most running at once
  (in the workflow's code, and in the runs index, sampled every 20 ms), all finished, and
  started-to-finished seconds (p50, p99) from the index.

    .venv/bin/python bench/workflows_bench.py            # 3 runs, writes docs/benchmarks.md
    .venv/bin/python bench/workflows_bench.py --quick    # smaller, one run, prints only
    .venv/bin/python bench/workflows_bench.py --throughput --runs 2  # that part alone, prints
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment, Read
from bench._report import cpu_reference, write_section
from lagompy import JournalSettings, start
from lagompy.runtime import namespace_of, shutdown_app
from lagompy.sql._schema import workflow_runs
from lagompy.workflow import WorkflowContext, WorkflowRun, Workflows, start_workflows

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CONCURRENCY = 64
#: Accounts of the throughput runs (three counters each), asked in turn by runs and bare asks.
ACCOUNTS = 1000
LIMIT = 50

workflows = Workflows()
#: Times of each live ``ctx.ask`` in the 3-step workflow (seconds), when recording.
step_times: list[float] = []
#: run id -> its future, resolved when the workflow's code returns (``--results-at-end``).
returned: dict[str, asyncio.Future[None]] = {}
#: ``results_at_end``: see :func:`runs_of`.
options = {"results_at_end": False}
#: (run id, position) -> times the external-call step ran (monotonic).
calls: dict[tuple[str, int], list[float]] = {}
#: Runs of the limited workflow in its code now, and the most seen.
inside = {"now": 0, "most": 0}


@workflows.workflow("three-asks", version=1)
async def three_asks(ctx: WorkflowContext, account: str) -> int:
    total = 0
    for i in range(3):
        t0 = time.perf_counter()
        total += await ctx.ask(CounterEntity, f"{account}-{i}", Increment())
        if not ctx.replaying:
            step_times.append(time.perf_counter() - t0)
    future = returned.get(ctx.run_id)
    if future is not None and not future.done():
        future.set_result(None)
    return total


async def external(run_id: str, position: int) -> int:
    calls.setdefault((run_id, position), []).append(time.monotonic())
    await asyncio.sleep(0.2)
    return position


@workflows.workflow("slow-steps", version=1)
async def slow_steps(ctx: WorkflowContext, account: str) -> int:
    for i in range(3):
        await ctx.ask(CounterEntity, account, Increment())
        await ctx.step(external, ctx.run_id, 2 * i + 1)
    return 3


async def pause() -> int:
    await asyncio.sleep(0.05)
    return 0


@workflows.workflow("limited", version=1, max_running=LIMIT)
async def limited(ctx: WorkflowContext, account: str) -> int:
    inside["now"] += 1
    inside["most"] = max(inside["most"], inside["now"])
    try:
        value: int = await ctx.ask(CounterEntity, account, Increment())
        await ctx.step(pause)
        return value
    finally:
        inside["now"] -= 1


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def counters(pool: str) -> list[str]:
    """The ids of the counters the runs of accounts ``{pool}0`` to ``{pool}999`` ask."""
    return [f"{pool}{n}-{i}" for n in range(ACCOUNTS) for i in range(3)]


async def bare_asks(
    entities: Any, total: int, outstanding: int, prefix: str, ids: list[str]
) -> dict[str, Any]:
    """``total`` asks with command ids (``prefix-n``) to ``ids`` in turn, ``outstanding`` at a
    time: rate and latencies."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            ref = entities.ref_for(CounterEntity, ids[n % len(ids)])
            t0 = time.perf_counter()
            await ref.ask(Increment(), timeout=120, command_id=f"{prefix}-{n}")
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return {"rate": total / (time.perf_counter() - started), "latencies": latencies}


async def runs_of(
    engine: Any, total: int, outstanding: int, prefix: str, pool: str
) -> dict[str, Any]:
    """``total`` runs (ids ``prefix-n``) of three-asks on the accounts of ``pool`` in turn,
    ``outstanding`` in flight, each started then awaited (``engine.result``) as a caller that
    wants its output does: runs/s (to the last one finished). ``--results-at-end``: each
    worker waits for its run's code to return instead, and every result is asked at the end,
    in one batch per shard host (the bench's way before 2026-12-07, when a result cost a
    round trip, and a run driven in this process is now answered with none)."""
    counter = iter(range(total))
    ids: list[str] = []
    latencies: list[float] = []

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        for n in counter:
            run_id = f"{prefix}-{n}"
            if not options["results_at_end"]:
                t0 = time.perf_counter()
                await engine.start("three-asks", f"{pool}{n % ACCOUNTS}", id=run_id)
                await engine.result(run_id, timeout=120)
                latencies.append(time.perf_counter() - t0)
                continue
            ids.append(run_id)
            future = returned[run_id] = loop.create_future()
            await engine.start("three-asks", f"{pool}{n % ACCOUNTS}", id=run_id)
            await future
            del returned[run_id]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    await asyncio.gather(*(engine.result(run_id, timeout=120) for run_id in ids))
    return {"rate": total / (time.perf_counter() - started), "latencies": latencies}


async def chains_of(
    entities: Any, total: int, outstanding: int, prefix: str, pool: str
) -> dict[str, Any]:
    """``total`` chains of the five commands a run of three-asks writes, as plain asks with
    command ids and no workflow around them, ``outstanding`` chains in flight: one to a new
    counter (where a run records its start in its new entity), the three counters of the
    account in sequence (the run's steps), and the new counter again (its end). No design
    that records a run's start and end around three sequential asks does less, so chains/s
    over asks/s is the ceiling the runs' ratio is measured against, in the same run."""
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            own = entities.ref_for(CounterEntity, f"{prefix}-{n}")
            await own.ask(Increment(), timeout=120, command_id=f"{prefix}-{n}:0")
            account = f"{pool}{n % ACCOUNTS}"
            for i in range(3):
                ref = entities.ref_for(CounterEntity, f"{account}-{i}")
                await ref.ask(Increment(), timeout=120, command_id=f"{prefix}-{n}:{i + 1}")
            await own.ask(Increment(), timeout=120, command_id=f"{prefix}-{n}:4")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return {"rate": total / (time.perf_counter() - started)}


async def throughput(entities: Any, engine: Any, quick: bool) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    # Both sides ask the same counters, in memory in their shard hosts (a run's three asks go
    # to three of them), as a service's busy entities are: what is compared is a run's cost
    # against its commands', not the recovery of entities never seen before.
    pool = f"p{tag}-"
    ids = counters(pool)
    await bare_asks(entities, len(ids), CONCURRENCY, f"warm{tag}", ids)
    await runs_of(engine, 50, 16, f"warm{tag}", pool)
    asks = await bare_asks(entities, 1_000 if quick else 4_000, CONCURRENCY, f"a{tag}", ids)
    chains = await chains_of(entities, 200 if quick else 800, CONCURRENCY, f"c{tag}", pool)
    runs = await runs_of(engine, 200 if quick else 800, CONCURRENCY, f"r{tag}", pool)
    # One at a time: blocks of bare asks and of runs in turn (each side 10 blocks), so that
    # both meet the same load of a shared machine (one phase after the other, the load moved
    # between them by as much as the overhead measured).
    latencies: list[float] = []
    steps: list[float] = []
    whole: list[float] = []  # a run's start to its result, one at a time
    blocks = 10
    for b in range(blocks):
        one_ask = await bare_asks(
            entities, (100 if quick else 300) // blocks, 1, f"s{tag}-{b}", ids
        )
        latencies += one_ask["latencies"]
        step_times.clear()
        one_run = await runs_of(engine, (30 if quick else 100) // blocks, 1, f"o{tag}-{b}", pool)
        steps += step_times
        whole += one_run["latencies"]
    bare = statistics.median(latencies)
    step = statistics.median(steps)
    result = {
        "asks_per_s": asks["rate"],
        "runs_per_s": runs["rate"],
        "ratio": runs["rate"] / asks["rate"],
        "chains_per_s": chains["rate"],
        "chain_ratio": chains["rate"] / asks["rate"],
        "runs_over_chains": runs["rate"] / chains["rate"],
        "bare_p50_ms": bare * 1000,
        "step_p50_ms": step * 1000,
        "overhead_p50_ms": (step - bare) * 1000,
        "run_p50_ms": statistics.median(whole) * 1000 if whole else float("nan"),
    }
    print(
        f"  {CONCURRENCY} in flight: {asks['rate']:,.0f} asks/s, {runs['rate']:,.1f} runs/s "
        f"(ratio {result['ratio']:.2f}), {chains['rate']:,.1f} chains of 5 asks/s (ratio "
        f"{result['chain_ratio']:.2f}; runs over chains {result['runs_over_chains']:.2f}); "
        f"one at a time: bare ask p50 {bare * 1000:.2f} ms, "
        f"step p50 {step * 1000:.2f} ms, overhead {result['overhead_p50_ms']:.2f} ms, "
        f"run (start to result) p50 {result['run_p50_ms']:.2f} ms"
    )
    return result


async def index_rows(engine: Any, prefix: str) -> dict[str, Any]:
    t = workflow_runs
    from sqlalchemy import select

    async with engine.database.read() as conn:
        rows = (await conn.execute(select(t).where(t.c.run_id.startswith(prefix)))).all()
    return {r.run_id: r for r in rows}


async def host_kill(entities: Any, engine: Any, app: str, quick: bool) -> dict[str, Any]:
    import ray

    n = 30 if quick else 100
    prefix = f"k{uuid.uuid4().hex[:6]}-"
    for i in range(n):
        await engine.start("slow-steps", f"{prefix}acct{i}", id=f"{prefix}{i}")
    deadline = time.monotonic() + 60
    while True:  # until every run has recorded a step or two
        rows = await index_rows(engine, prefix)
        if len(rows) == n and all(r.steps >= 2 for r in rows.values()):
            break
        assert time.monotonic() < deadline, "the runs did not start"
        await asyncio.sleep(0.02)
    rows = await index_rows(engine, prefix)
    recorded = {run_id: r.steps for run_id, r in rows.items()}
    hosts = [
        name
        for name in ray.util.list_named_actors(all_namespaces=True)
        if name["namespace"] == namespace_of(app) and name["name"].startswith("host-")
    ]
    killed = time.monotonic()
    for host in hosts:  # every shard host of the app dies (Ray restarts them, memory empty)
        ray.kill(ray.get_actor(host["name"], namespace=host["namespace"]), no_restart=False)
    waits: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(waits) < n:
        for run_id, r in (await index_rows(engine, prefix)).items():
            if run_id not in waits and (r.steps > recorded[run_id] or r.finished_us is not None):
                waits[run_id] = time.monotonic() - killed
        assert time.monotonic() < deadline, f"{n - len(waits)} runs did not go on"
        await asyncio.sleep(0.01)
    outcomes = [await engine.result(f"{prefix}{i}", timeout=120) for i in range(n)]
    lost = sum(1 for o in outcomes if o != 3)
    rerun = 0
    for run_id, steps in recorded.items():
        for position in range(1, steps, 2):  # the external calls recorded before the kill
            rerun += sum(1 for at in calls.get((run_id, position), []) if at > killed)
    counts = [
        await entities.ref_for(CounterEntity, f"{prefix}acct{i}").ask(Read(), timeout=60)
        for i in range(n)
    ]
    twice = sum(1 for c in counts if c != 3)
    result = {
        "runs": n,
        "hosts": len(hosts),
        "p50_s": pct(list(waits.values()), 0.5),
        "p99_s": pct(list(waits.values()), 0.99),
        "max_s": max(waits.values()),
        "rerun": rerun,
        "lost": lost,
        "asks_twice": twice,
    }
    print(
        f"  host kill ({len(hosts)} hosts) under {n} runs: went on after p50 "
        f"{result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s, max {result['max_s']:.2f} s; "
        f"completed steps run again {rerun}, runs lost {lost}, asks applied twice {twice}"
    )
    return result


async def flow_control(engine: Any, quick: bool) -> dict[str, Any]:
    n = 300 if quick else 1_000
    prefix = f"l{uuid.uuid4().hex[:6]}-"
    inside["most"] = 0
    most_indexed = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal most_indexed
        from sqlalchemy import func, select

        t = workflow_runs
        while not stop.is_set():
            async with engine.database.read() as conn:
                running = (
                    await conn.execute(
                        select(func.count()).where(
                            t.c.workflow == "limited", t.c.status == "running"
                        )
                    )
                ).scalar_one()
            most_indexed = max(most_indexed, int(running))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    await asyncio.gather(
        *(engine.start("limited", f"{prefix}a{i % 100}", id=f"{prefix}{i}") for i in range(n))
    )
    for i in range(n):
        await engine.result(f"{prefix}{i}", timeout=600)
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    deadline = time.monotonic() + 60
    while True:  # the index follows the runs' events
        rows = await index_rows(engine, prefix)
        finished = [r for r in rows.values() if r.status == "completed"]
        if len(finished) == n or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    durations = [(r.finished_us - r.created_us) / 1e6 for r in finished]
    result = {
        "runs": n,
        "completed": len(finished),
        "most_in_code": inside["most"],
        "most_indexed": most_indexed,
        "p50_s": pct(durations, 0.5),
        "p99_s": pct(durations, 0.99),
        "elapsed_s": elapsed,
    }
    print(
        f"  {n} runs at once, max_running {LIMIT}: {len(finished)} completed in {elapsed:.1f} s; "
        f"most running at once {inside['most']} (code) / {most_indexed} (index); "
        f"started-to-finished p50 {result['p50_s']:.2f} s p99 {result['p99_s']:.2f} s"
    )
    return result


async def bench_backend(
    name: str, js: JournalSettings, quick: bool, only_throughput: bool = False
) -> dict[str, Any]:
    print(f"{name}:")
    app = f"wfbench-{uuid.uuid4().hex[:6]}"
    entities: Any = await start(app=app, entities=[CounterEntity, WorkflowRun], journal_settings=js)
    try:
        async with await start_workflows(
            workflows, runtime=entities, journal_settings=js
        ) as engine:
            if only_throughput:
                return {"throughput": await throughput(entities, engine, quick)}
            return {
                "throughput": await throughput(entities, engine, quick),
                "kill": await host_kill(entities, engine, app, quick),
                "flow": await flow_control(engine, quick),
            }
    finally:
        await entities.close()
        await shutdown_app(app)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


async def one_run(quick: bool, only_throughput: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {"load_before": load(), "cpu_ms": cpu_reference()}
    print(f"  CPU reference, sum(range(10**6)): {results['cpu_ms']:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite"] = await bench_backend(
            "SQLite", JournalSettings(url=f"sqlite:///{tmp}/bench.db"), quick, only_throughput
        )
    schema = f"wfbench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        results["PostgreSQL"] = await bench_backend("PostgreSQL", js, quick, only_throughput)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    results["load_after"] = load()
    results["cpu_ms_after"] = cpu_reference()
    return results


ROWS: list[tuple[str, str, str, Any]] = [
    # (label, part, key, format)
    ("single commands, 64 in flight (asks/s)", "throughput", "asks_per_s", "{:,.0f}"),
    ("3-step runs, 64 in flight (runs/s)", "throughput", "runs_per_s", "{:,.1f}"),
    ("runs/s over asks/s (floor 0.2)", "throughput", "ratio", "{:.2f}"),
    (
        "chains of a run's 5 commands as plain asks, 64 in flight (chains/s)",
        "throughput",
        "chains_per_s",
        "{:,.1f}",
    ),
    ("chains/s over asks/s (the ceiling of a run's ratio)", "throughput", "chain_ratio", "{:.2f}"),
    ("runs/s over chains/s", "throughput", "runs_over_chains", "{:.2f}"),
    ("bare ask p50, one at a time (ms)", "throughput", "bare_p50_ms", "{:.2f}"),
    ("step (ctx.ask) p50, one run at a time (ms)", "throughput", "step_p50_ms", "{:.2f}"),
    ("per-step overhead p50 (ms, floor 2)", "throughput", "overhead_p50_ms", "{:.2f}"),
    ("3-step run, start to result p50, one at a time (ms)", "throughput", "run_p50_ms", "{:.2f}"),
    ("host kill: went on after, p50 (s)", "kill", "p50_s", "{:.2f}"),
    ("host kill: went on after, p99 (s, floor 5)", "kill", "p99_s", "{:.2f}"),
    ("host kill: completed steps run again", "kill", "rerun", "{:,.0f}"),
    ("host kill: runs lost", "kill", "lost", "{:,.0f}"),
    ("host kill: asks applied twice", "kill", "asks_twice", "{:,.0f}"),
    ("1,000 at once: completed", "flow", "completed", "{:,.0f}"),
    ("1,000 at once: most running (code / index), limit 50", "flow", "most", "{}"),
    ("1,000 at once: started-to-finished p50 (s)", "flow", "p50_s", "{:.2f}"),
    ("1,000 at once: started-to-finished p99 (s)", "flow", "p99_s", "{:.2f}"),
]

#: Where the worst run is the highest (else the lowest).
HIGHER_IS_WORSE = {
    "bare_p50_ms", "step_p50_ms", "overhead_p50_ms", "run_p50_ms", "p50_s", "p99_s", "rerun",
    "lost", "asks_twice", "most",
}  # fmt: skip


def cell(run: dict[str, Any], backend: str, part: str, key: str, fmt: str) -> float | str:
    found = run[backend][part]
    if key == "most":
        return f"{found['most_in_code']} / {found['most_indexed']}"
    return float(found[key])


def render(runs: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Command: `{command}`. Local Ray, default "
        "settings (`lagompy.start`, `start_workflows`), SQLite file and PostgreSQL schema. "
        f"{len(runs)} runs; each cell is the median of the runs, then the worst in brackets.",
        "",
        "Load average (1 / 5 min) before and after each run: "
        + "; ".join(f"{r['load_before']} -> {r['load_after']}" for r in runs)
        + " (2 cores, other work running).",
        "",
        "CPU reference (`sum(range(10**6))`, best of 5, ms) before and after each run: "
        + "; ".join(f"{r['cpu_ms']:.1f} -> {r['cpu_ms_after']:.1f}" for r in runs)
        + ".",
        "",
        "| measure | SQLite | PostgreSQL |",
        "| --- | --- | --- |",
    ]
    for label, part, key, fmt in ROWS:
        cells = []
        for backend in ("SQLite", "PostgreSQL"):
            values = [cell(r, backend, part, key, fmt) for r in runs]
            if isinstance(values[0], str):
                cells.append(", ".join(str(v) for v in values))
                continue
            numbers = [float(v) for v in values]
            median = statistics.median(numbers)
            worst = max(numbers) if key in HIGHER_IS_WORSE else min(numbers)
            cells.append(f"{fmt.format(median)} ({fmt.format(worst)})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "How: throughput keeps 64 runs (or 64 asks, each with a command id like the asks of "
        "`ctx.ask`) in flight; a run is started then awaited (`engine.result`), and counts "
        "when it has finished. Runs and bare "
        "asks ask the same 3,000 counters, in memory in their hosts (recovered before either "
        "is timed); each run's own entity is new, as a run's always is. A step's time is "
        "`await ctx.ask(...)` in the workflow's code (the entity's ask, and the step's record "
        "when it waits for it: an applied ask's record goes with the run's next record or its "
        "end), one run at a time, against a bare ask one at a time (in turns: 10 blocks of 30 "
        "bare asks and 10 of 10 runs; a run's time from its start to its result is taken from "
        "the same runs). A chain is the five commands a run writes, as plain asks with "
        "command ids and no workflow: one to a new counter (a run's start, in its new "
        "entity), the account's three counters in sequence (its steps), the new counter "
        "again (its end), 64 chains in flight: no design that records a run's start and end "
        "around three sequential asks does less, so chains/s over asks/s bounds the runs' "
        "ratio from above. The host kill kills every "
        "shard host of the app (Ray restarts them) while 100 runs are between steps; the wait is "
        "from the kill to the next step each run records (seen in the runs index, polled "
        "every 10 ms). 'Completed steps run again' counts the external calls of positions "
        "recorded before the kill that ran after it; 'asks applied twice' compares each "
        "account's count to the three asks its run made.",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small, one run, prints only")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="the throughput part alone (no host kill, no flow control), prints only",
    )
    parser.add_argument(
        "--results-at-end",
        action="store_true",
        help="runs counted when their code returns, their results asked at the end (see runs_of)",
    )
    args = parser.parse_args()
    options["results_at_end"] = args.results_at_end
    runs = []
    command = (
        ".venv/bin/python bench/workflows_bench.py"
        + (f" --runs {args.runs}" if args.runs != 3 else "")
        + (" --results-at-end" if args.results_at_end else "")
    )
    for i in range(1 if args.quick else args.runs):
        print(f"run {i + 1} (load {load()})")
        runs.append(await one_run(args.quick, args.throughput))
        if args.throughput:
            print(f"  CPU reference after: {runs[-1]['cpu_ms_after']:.1f} ms")
        elif not args.quick:  # after each run: what is measured is kept if a later run fails
            title = "Durable workflows: throughput, a host kill, flow control"
            write_section("workflows", title, render(runs, command))
            print(f"wrote docs/benchmarks.md ({len(runs)} of {args.runs} runs)")


if __name__ == "__main__":
    asyncio.run(main())
