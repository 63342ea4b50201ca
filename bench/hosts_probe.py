"""Hosts probe: one shard host against two at one level of outstanding asks, with where each
process's time went: on a CPU, waiting for one (runnable, behind other work), or asleep.

Apps with each host count (and ``--in-flight``, the region's calls in flight per host, when
given) take turns, a round each, on one local Ray and one journal per backend, as
``bench/runtime_bench.py`` measures them, but at the levels and on the backends asked for, and
with the Linux scheduler's own account of each process around every round
(``/proc/<pid>/task/<tid>/schedstat``: nanoseconds on a CPU and waiting on a run queue): the
shard hosts (their busiest thread, the one that runs the batches), the driver (load generator
and region client) and PostgreSQL's processes together. A host thread that is neither on a CPU
nor waiting for one is asleep: waiting for the database, or for its next call. Prints only.

    .venv/bin/python bench/hosts_probe.py
    .venv/bin/python bench/hosts_probe.py --backends postgresql --levels 64,1024 --rounds 5
    .venv/bin/python bench/hosts_probe.py --hosts 1,2 --in-flight 1,2
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

from bench._counter import CounterEntity, Increment
from bench._report import cpu_reference, init_local_ray
from bench.runtime_bench import PG_URL, drive, in_turns, warm_up
from lagompy import JournalSettings, start
from lagompy._collector import tune_collector_once
from lagompy.settings import RuntimeSettings, make_settings

#: nanoseconds on a CPU and waiting for one, per thread id
Sched = dict[str, tuple[int, int]]


def sched(pid: int) -> Sched:
    """The scheduler's account of every thread of process ``pid`` (empty if it is gone)."""
    out: Sched = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, waiting, _ = map(int, f.read().split())
        except (OSError, ValueError):
            continue
        out[tid] = (on_cpu, waiting)
    return out


def postgres_pids() -> list[int]:
    """The processes named postgres on this machine (the database the probe writes to)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().startswith("postgres"):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def shares(before: Sched, after: Sched, wall: float) -> tuple[float, float, float]:
    """The process's CPU share of ``wall`` (all threads), and its busiest thread's shares on a
    CPU and waiting for one."""
    on = {t: after[t][0] - before.get(t, (0, 0))[0] for t in after}
    waiting = {t: after[t][1] - before.get(t, (0, 0))[1] for t in after}
    if not on:
        return 0.0, 0.0, 0.0
    top = max(on, key=lambda t: on[t])
    return sum(on.values()) / 1e9 / wall, on[top] / 1e9 / wall, waiting[top] / 1e9 / wall


async def measure(
    entities: Any, outstanding: int, asks: int, seed: int, prefix: str
) -> dict[str, Any]:
    """One round: ``asks`` asks at ``outstanding``; the rate and the processes' shares."""
    stats = await entities.host_stats()
    hosts = [h["pid"] for h in stats]
    driver = os.getpid()
    databases = postgres_pids()
    before = {pid: sched(pid) for pid in [*hosts, driver, *databases]}
    started = time.perf_counter()
    run = await drive(entities, Increment(), asks, outstanding, seed=seed, prefix=prefix)
    wall = time.perf_counter() - started
    after = {pid: sched(pid) for pid in before}
    host_shares = [shares(before[p], after[p], wall) for p in hosts]
    return {
        "rate": run["rate"],
        "host_cpu": sum(s[0] for s in host_shares),
        "host_thread": max(s[1] for s in host_shares),
        "host_waiting": max(s[2] for s in host_shares),
        "driver_cpu": shares(before[driver], after[driver], wall)[0],
        "database_cpu": sum(shares(before[p], after[p], wall)[0] for p in databases),
    }


async def run_backend(
    name: str, js: JournalSettings, configs: list[tuple[int, int | None]], args: Any
) -> None:
    apps: dict[str, Any] = {}
    try:
        for hosts, in_flight in configs:
            label = f"{hosts} host(s)" + (f", {in_flight} in flight" if in_flight else "")
            options: dict[str, Any] = {"hosts": hosts, "max_pending": 20_000}
            if in_flight:
                options["max_in_flight"] = in_flight
            apps[label] = await start(
                app=f"hosts-probe-{uuid.uuid4().hex[:6]}",
                entities=[CounterEntity],
                journal_settings=js,
                **options,
            )
        labels = list(apps)
        prefix = {label: f"c{n}-e" for n, label in enumerate(labels)}
        for label, entities in apps.items():
            await warm_up(entities, prefix[label])
        for outstanding in args.levels:
            asks = max(outstanding, args.asks * outstanding // 1024)
            rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
            for r in range(args.rounds):
                print(
                    f"{name}, {outstanding} outstanding, round {r + 1}: CPU reference "
                    f"{cpu_reference():.1f} ms, load {os.getloadavg()[0]:.2f}"
                )
                for label in in_turns(labels, r):
                    m = await measure(
                        apps[label], outstanding, asks, outstanding * 100 + r, prefix[label]
                    )
                    rounds[label].append(m)
                    print(
                        f"  {label}: {m['rate']:,.0f} commands/s; CPU share of the round: "
                        f"hosts {m['host_cpu']:.0%} (batch thread on a CPU "
                        f"{m['host_thread']:.0%}, waiting for one {m['host_waiting']:.0%}), "
                        f"driver {m['driver_cpu']:.0%}, PostgreSQL {m['database_cpu']:.0%}"
                    )
            for label in labels:
                done = rounds[label]
                print(
                    f"{name}, {outstanding} outstanding, {label}, median of {len(done)}: "
                    f"{statistics.median(d['rate'] for d in done):,.0f} commands/s, batch "
                    f"thread on a CPU {statistics.median(d['host_thread'] for d in done):.0%}, "
                    f"waiting for one {statistics.median(d['host_waiting'] for d in done):.0%}, "
                    f"all hosts {statistics.median(d['host_cpu'] for d in done):.0%}"
                )
    finally:
        for entities in apps.values():
            await entities.close(shutdown=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--levels", default="1024", help="outstanding asks, comma-separated")
    parser.add_argument("--hosts", default="1,2", help="host counts, comma-separated")
    parser.add_argument(
        "--in-flight",
        default="",
        help="calls in flight per host, comma-separated (default: the setting's)",
    )
    parser.add_argument("--asks", type=int, default=20_000, help="asks per round at 1,024")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.levels = [int(level) for level in args.levels.split(",")]
    in_flight: list[int | None] = [int(n) for n in args.in_flight.split(",") if n] or [None]
    configs = [(int(h), f) for h in args.hosts.split(",") for f in in_flight]
    import ray

    init_local_ray()
    if make_settings(RuntimeSettings).collector == "tuned":
        tune_collector_once()
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                with tempfile.TemporaryDirectory() as tmp:
                    js = JournalSettings(url=f"sqlite:///{tmp}/probe.db")
                    await run_backend("SQLite", js, configs, args)
                continue
            schema = f"hosts_probe_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(PG_URL)
            await admin.execute(f"CREATE SCHEMA {schema}")
            try:
                js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
                await run_backend("PostgreSQL", js, configs, args)
            finally:
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
                await admin.close()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
