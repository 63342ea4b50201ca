"""Workflow CPU probe: the CPU a 3-ask run costs, per process, beside a bare ask's.

The throughput part of ``workflows_bench.py`` (its workflow, counters and phases), with longer
phases and the CPU each process spent in them: the driver (this process: the engine, the
executor, the region client, the runs index's consumers) and the Ray processes under it (the
shard hosts and the rest), read from ``/proc``, per run and per bare ask. The CPU time moves
much less than the rates with the other work sharing the machine: run it on two checkouts in
turns to see what a change saves. Prints only.

    .venv/bin/python bench/workflows_cpu_probe.py                     # SQLite
    .venv/bin/python bench/workflows_cpu_probe.py --postgres --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity
from bench._report import cpu_reference
from bench.workflows_bench import (
    CONCURRENCY,
    PG_URL,
    bare_asks,
    counters,
    options,
    runs_of,
    workflows,
)
from lagompy import JournalSettings, start
from lagompy.journal._tailing import PageTailer
from lagompy.runtime import shutdown_app
from lagompy.workflow import WorkflowRun, start_workflows

TICK = os.sysconf("SC_CLK_TCK")

#: Pages read by this process's tailers (the runs index's partitions) and their events.
pages = {"pages": 0, "events": 0}
_next_page = PageTailer.next_page


async def _counted(self: PageTailer, *args: Any, **kwargs: Any) -> Any:
    page = await _next_page(self, *args, **kwargs)
    pages["pages"] += 1
    pages["events"] += len(page.envelopes)
    return page


PageTailer.next_page = _counted  # type: ignore[method-assign]


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, name, CPU seconds) of every process."""
    found: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        found[int(entry)] = (int(rest[1]), cmdline, (int(rest[11]) + int(rest[12])) / TICK)
    return found


def cpu() -> dict[str, float]:
    """CPU seconds so far: this process, the shard hosts under it, the other processes under it."""
    procs = _processes()
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {"driver": time.process_time(), "hosts": 0.0, "other": 0.0}
    todo = list(children.get(me, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        _, name, seconds = procs[pid]
        out["hosts" if "ShardHost" in name or "host" in name.lower() else "other"] += seconds
    return out


def spent(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n * 1000 for k in before}


async def backend(js: JournalSettings, rounds: int, asks: int, runs: int) -> None:
    app = f"wfcpu-{uuid.uuid4().hex[:6]}"
    entities: Any = await start(app=app, entities=[CounterEntity, WorkflowRun], journal_settings=js)
    try:
        async with await start_workflows(
            workflows, runtime=entities, journal_settings=js
        ) as engine:
            tag = uuid.uuid4().hex[:6]
            pool = f"p{tag}-"
            ids = counters(pool)
            await bare_asks(entities, len(ids), CONCURRENCY, f"warm{tag}", ids)
            await runs_of(engine, 300, CONCURRENCY, f"warm{tag}", pool)
            for r in range(rounds):
                c0 = cpu()
                a = {"rate": float("nan")}
                if asks:  # --asks 0: runs alone (to profile them)
                    a = await bare_asks(entities, asks, CONCURRENCY, f"a{tag}-{r}", ids)
                c1 = cpu()
                read = dict(pages)
                sent = entities.stats()
                w = await runs_of(engine, runs, CONCURRENCY, f"r{tag}-{r}", pool)
                c2 = cpu()
                region = entities.stats()
                requests = (region["asks"] - sent["asks"]) / runs
                batches = region["batches"] - sent["batches"]
                per_call = (region["asks"] - sent["asks"]) / max(1, batches)
                n_pages = pages["pages"] - read["pages"]
                n_events = pages["events"] - read["events"]
                per_run = spent(c1, c2, runs)
                if asks:
                    per_ask = spent(c0, c1, asks)
                    asked = (
                        f"{a['rate']:,.0f} asks/s, {w['rate']:,.0f} runs/s "
                        f"(ratio {w['rate'] / a['rate']:.3f}); CPU ms per ask "
                        + " ".join(f"{k} {v:.3f}" for k, v in per_ask.items())
                        + "; "
                    )
                else:  # --asks 0: no asks, nothing to say of them
                    asked = f"{w['rate']:,.0f} runs/s; "
                print(
                    f"  round {r + 1}: {asked}CPU ms per run "
                    + " ".join(f"{k} {v:.3f}" for k, v in per_run.items())
                    + f"; tail: {n_pages / runs:.2f} pages, {n_events / runs:.2f} events per run"
                    + f"; {requests:.2f} requests per run, {per_call:.1f} per Ray call",
                    flush=True,
                )
    finally:
        await entities.close()
        await shutdown_app(app)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (else SQLite)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asks", type=int, default=8_000)
    parser.add_argument("--runs", type=int, default=3_000)
    parser.add_argument(
        "--results-at-end",
        action="store_true",
        help="runs counted when their code returns, results asked at the end (workflows_bench)",
    )
    args = parser.parse_args()
    options["results_at_end"] = args.results_at_end
    print(f"CPU reference {cpu_reference():.1f} ms")
    if not args.postgres:
        with tempfile.TemporaryDirectory() as tmp:
            js = JournalSettings(url=f"sqlite:///{tmp}/probe.db")
            await backend(js, args.rounds, args.asks, args.runs)
    else:
        schema = f"wfcpu_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
            await backend(js, args.rounds, args.asks, args.runs)
        finally:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()
    print(f"CPU reference after {cpu_reference():.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
