"""Runtime benchmark: commands/s and ask latency through the sharded runtime on a local Ray, at
1, 64 and 1,024 outstanding asks over 1,000 entities, on SQLite and PostgreSQL; beside, in the
same run, the baselines the issue's floors are stated in (a no-op Ray actor call, a one-row
asyncpg transaction, asyncpg executemany of the same event rows, the journal alone) and the
recovery time of an entity with 10,000 events, with and without snapshots.

    .venv/bin/python bench/runtime_bench.py            # writes its section of docs/benchmarks.md
    .venv/bin/python bench/runtime_bench.py --runs 5   # the same five times, median and worst
    .venv/bin/python bench/runtime_bench.py --quick    # fewer asks, prints only
    .venv/bin/python bench/runtime_bench.py --recovery # the recovery part alone, prints only

Each write ask is a command that persists one event and stores its reply (command id).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import (
    Count,
    CounterEntity,
    Increment,
    Incremented,
    NoopActor,
    Read,
    UnsnapshottedCounterEntity,
)
from bench._report import cpu_reference, init_local_ray, write_section
from lagompy import AtomicWrite, JournalSettings, open_storage, start
from lagompy._collector import tune_collector_once
from lagompy.journal import SnapshotToSave, slice_of
from lagompy.runtime._processing import recover
from lagompy.settings import RuntimeSettings, make_settings

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ENTITIES = 1_000
#: outstanding asks -> asks per run (full, quick)
LEVELS = {1: (3_000, 500), 64: (20_000, 4_000), 1024: (100_000, 15_000)}
RECOVERY_EVENTS = 10_000


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50": s[len(s) // 2] * 1000, "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000}


async def drive(
    entities: Any, command: Any, total: int, outstanding: int, seed: int, prefix: str = "e"
) -> dict[str, Any]:
    """``total`` asks, ``outstanding`` at a time, to random entities; rate and latencies."""
    rng = random.Random(seed)
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            ref = entities.ref_for(CounterEntity, f"{prefix}{rng.randrange(ENTITIES)}")
            t0 = time.perf_counter()
            await ref.ask(command, timeout=120)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    elapsed = time.perf_counter() - started
    return {"rate": total / elapsed, "elapsed": elapsed, "latencies": latencies}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(host_pids: list[int]) -> tuple[float, float]:
    """CPU seconds so far of this (the driver) process and of the shard hosts together: what
    a command costs each side, whatever else shares the machine's cores."""
    return time.process_time(), sum(_cpu_seconds(pid) for pid in host_pids)


def _busy(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Seconds the hosts spent processing batches (the busiest host)."""
    busiest: float = max(
        a["busy_seconds"] - b["busy_seconds"] for a, b in zip(after, before, strict=True)
    )
    return busiest


async def journal_rate(js: JournalSettings, batch: int, rounds: int) -> float:
    """The journal's own append rate: one transaction per ``batch`` events, one per entity."""
    storage = await open_storage(settings=js, entities=[CounterEntity])
    try:
        rates = []
        for r in range(rounds):
            writes = [
                AtomicWrite(
                    "bench-counter", f"j{r}-{i}-{uuid.uuid4().hex[:6]}", 0, [Incremented(1)], [()]
                )
                for i in range(batch)
            ]
            t0 = time.perf_counter()
            await storage.journal.append(writes)
            rates.append(batch / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        await storage.close()


async def recovery_times(js: JournalSettings, rounds: int) -> dict[str, float]:
    """Milliseconds to recover an entity with RECOVERY_EVENTS events (median), with a snapshot
    at its last event (snapshot_every=100) and without snapshots."""
    classes = [CounterEntity, UnsnapshottedCounterEntity]
    storage = await open_storage(settings=js, entities=classes)
    try:
        out: dict[str, float] = {}
        for cls, label in ((CounterEntity, "snapshots"), (UnsnapshottedCounterEntity, "events")):
            entity_id = f"rec-{uuid.uuid4().hex[:8]}"
            for start_seq in range(0, RECOVERY_EVENTS, 1_000):
                await storage.journal.append_one(
                    AtomicWrite(cls.type_name, entity_id, start_seq, [Incremented(1)] * 1_000)
                )
            if cls.snapshot_every:
                await storage.snapshots.save_many(
                    [
                        SnapshotToSave(
                            cls.type_name, entity_id, RECOVERY_EVENTS, Count(RECOVERY_EVENTS)
                        )
                    ]
                )
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                live = await recover(cls, entity_id, storage.journal, storage.snapshots)
                times.append(time.perf_counter() - t0)
                assert live.state == Count(RECOVERY_EVENTS) and live.seq_nr == RECOVERY_EVENTS
            out[label] = statistics.median(times) * 1000
            out[f"{label}_worst"] = max(times) * 1000
        return out
    finally:
        await storage.close()


async def warm_up(entities: Any, prefix: str) -> None:
    """Activate every entity (recovery reads), then 2,000 asks at 64 outstanding: the rounds
    after it measure commands to entities in memory."""
    await asyncio.gather(
        *(
            entities.ref_for(CounterEntity, f"{prefix}{i}").ask(Read(), timeout=120)
            for i in range(ENTITIES)
        )
    )
    await drive(entities, Increment(), 2_000, 64, seed=0, prefix=prefix)


def in_turns(labels: list[str], r: int) -> list[str]:
    """The configurations' order in round ``r``: rotated by one each round, so that a change
    of the shared machine's speed during the run falls on all of them alike."""
    k = r % len(labels)
    return labels[k:] + labels[:k]


#: Rounds per level: the host counts take turns, a round each, so that a change in the shared
#: machine's speed during the run falls on all of them alike.
ROUNDS = 5


async def run_configs(
    name: str, js: JournalSettings, quick: bool, configs: dict[str, int | None]
) -> tuple[dict[str, int], dict[str, dict[int, dict[str, float]]]]:
    """Every level of outstanding asks on one app per configuration (label -> ``hosts``; None:
    the default, which start() resolves from the cluster), all started at once, each on
    entities of its own. Each level runs ``ROUNDS`` rounds in which every configuration takes
    a turn (in a rotating order); a level's rate is the median of its rounds, its latencies
    pooled. Returns each configuration's host count and levels."""
    apps: dict[str, Any] = {}
    counts: dict[str, int] = {}
    out: dict[str, dict[int, dict[str, float]]] = {label: {} for label in configs}
    try:
        for label, hosts in configs.items():
            apps[label] = await start(
                app=f"bench-{uuid.uuid4().hex[:6]}",
                entities=[CounterEntity],
                journal_settings=js,
                hosts=hosts,
                max_pending=20_000,
            )
            counts[label] = len(await apps[label].host_stats())
        for label, entities in apps.items():
            await warm_up(entities, f"{label}-e")
        labels = list(configs)
        for outstanding, (full, small) in LEVELS.items():
            asks = small if quick else full
            per_round = max(outstanding, asks // ROUNDS)
            rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
            for r in range(ROUNDS):
                for label in in_turns(labels, r):
                    entities = apps[label]
                    before = await entities.host_stats()
                    cpu_before = _cpu([h["pid"] for h in before])
                    run = await drive(
                        entities,
                        Increment(),
                        per_round,
                        outstanding,
                        seed=outstanding * 100 + r,
                        prefix=f"{label}-e",
                    )
                    cpu_after = _cpu([h["pid"] for h in before])
                    after = await entities.host_stats()
                    run["driver_cpu"] = cpu_after[0] - cpu_before[0]
                    run["host_cpu"] = cpu_after[1] - cpu_before[1]
                    run["batches"] = sum(
                        a["batches"] - b["batches"] for a, b in zip(after, before, strict=True)
                    )
                    run["busy"] = _busy(before, after)
                    rounds[label].append(run)
            for label in labels:
                done = rounds[label]
                elapsed = sum(d["elapsed"] for d in done)
                total = per_round * ROUNDS
                level = {
                    "rate": statistics.median(per_round / d["elapsed"] for d in done),
                    **_pcts([x for d in done for x in d["latencies"]]),
                    "batch": total / max(1, sum(d["batches"] for d in done)),
                    "busy": sum(d["busy"] for d in done) / elapsed,
                    # CPU microseconds per command, summed over the rounds.
                    "driver_us": sum(d["driver_cpu"] for d in done) / total * 1e6,
                    "host_us": sum(d["host_cpu"] for d in done) / total * 1e6,
                    "asks": total,
                }
                out[label][outstanding] = level
                print(
                    f"{name}, hosts {label} ({counts[label]}), {outstanding:>5} outstanding: "
                    f"{level['rate']:,.0f} commands/s p50 {level['p50']:.2f} ms p99 "
                    f"{level['p99']:.2f} ms, mean batch {level['batch']:.0f}, host busy "
                    f"{level['busy']:.0%}, CPU per command: driver {level['driver_us']:.1f} us, "
                    f"host(s) {level['host_us']:.1f} us"
                )
    finally:
        for entities in apps.values():
            await entities.close(shutdown=True)
    return counts, out


async def bench_backend(
    name: str, js: JournalSettings, quick: bool, host_counts: list[int]
) -> dict[str, Any]:
    """Every level with each explicit host count and with the default (``hosts=None``, which
    ``start()`` resolves from the cluster), the journal alone at the default's mean batch, and
    recovery."""
    configs: dict[str, int | None] = {str(h): h for h in host_counts}
    configs["default"] = None
    counts, runs = await run_configs(name, js, quick, configs)
    count = counts["default"]
    default_vs_best = {}
    for outstanding in LEVELS:
        best = max(runs[h][outstanding]["rate"] for h in runs)
        default_vs_best[outstanding] = runs["default"][outstanding]["rate"] / best
        print(
            f"{name}: default ({count} host(s)) / best host count at {outstanding} outstanding: "
            f"{default_vs_best[outstanding]:.2f}"
        )
    mean_batch = max(1, round(runs["default"][1024]["batch"]))
    journal = await journal_rate(js, mean_batch, rounds=7)
    print(f"{name}: journal alone, {mean_batch} events per transaction: {journal:,.0f}/s")
    recovery = await recovery_times(js, rounds=3 if quick else 5)
    print(
        f"{name}: recovery of {RECOVERY_EVENTS:,} events: {recovery['events']:.1f} ms replayed, "
        f"{recovery['snapshots']:.1f} ms from a snapshot"
    )
    return {
        "runs": runs,
        "counts": counts,
        "default_vs_best": default_vs_best,
        "batch": mean_batch,
        "journal": journal,
        "recovery": recovery,
    }


async def postgres_baselines(schema: str, batch: int, rounds: int, single: int) -> dict[str, Any]:
    """Raw asyncpg: executemany of ``batch`` event rows per transaction (rows/s), and a one-row
    transaction's latency (p50/p99 ms), into a copy of the events table."""
    storage = await open_storage(
        settings=JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True),
        entities=[CounterEntity],
    )
    type_name, version, payload = storage.serializer.encode(Incremented(1))
    await storage.close()
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        await conn.execute("CREATE TABLE raw_events (LIKE lagompy_events INCLUDING ALL)")
        insert = (
            "INSERT INTO raw_events (global_offset, entity_type, entity_id, seq_nr, event_type, "
            "event_version, payload, tags, metadata, written_at_us, slice) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        )
        offset = 0

        def rows(n: int) -> list[tuple[Any, ...]]:
            nonlocal offset
            out = []
            for _ in range(n):
                offset += 1
                out.append(
                    (
                        offset,
                        "bench-counter",
                        f"r{offset}",
                        1,
                        type_name,
                        version,
                        payload,
                        None,
                        None,
                        time.time_ns() // 1000,
                        slice_of(f"r{offset}"),
                    )
                )
            return out

        rates = []
        for _ in range(rounds):
            data = rows(batch)
            t0 = time.perf_counter()
            async with conn.transaction():
                await conn.executemany(insert, data)
            rates.append(batch / (time.perf_counter() - t0))
        latencies = []
        for _ in range(single):
            (row,) = rows(1)
            t0 = time.perf_counter()
            async with conn.transaction():
                await conn.execute(insert, *row)
            latencies.append(time.perf_counter() - t0)
        return {"executemany": statistics.median(rates), "tx": _pcts(latencies)}
    finally:
        await conn.close()


async def ray_noop(calls: int) -> dict[str, float]:
    import ray

    # Ray's typing of an actor class's handle does not follow its methods' .remote.
    actor: Any = ray.remote(NoopActor).options(max_concurrency=1).remote()
    for _ in range(50):
        await actor.ping.remote(b"")
    latencies = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await actor.ping.remote(b"")
        latencies.append(time.perf_counter() - t0)
    ray.kill(actor)
    return _pcts(latencies)


async def one_run(quick: bool, host_counts: list[int]) -> dict[str, Any]:
    """Every measurement once, baselines beside: the CPU reference, the no-op Ray call, both
    backends, raw asyncpg; then the floors of this run."""
    noop = await ray_noop(300 if quick else 2_000)
    noop["cpu_ms"] = cpu_reference()
    print(f"CPU reference, sum(range(10**6)): {noop['cpu_ms']:.1f} ms")
    print(f"no-op Ray actor call: p50 {noop['p50']:.2f} ms p99 {noop['p99']:.2f} ms")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite"] = await bench_backend(
            "SQLite", JournalSettings(url=f"sqlite:///{tmp}/bench.db"), quick, host_counts
        )
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        results["PostgreSQL"] = await bench_backend(
            "PostgreSQL",
            JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True),
            quick,
            host_counts,
        )
        raw = await postgres_baselines(
            schema, results["PostgreSQL"]["batch"], rounds=7, single=300 if quick else 2_000
        )
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    print(
        f"raw asyncpg: executemany of {results['PostgreSQL']['batch']} event rows: "
        f"{raw['executemany']:,.0f} rows/s; one-row transaction p50 {raw['tx']['p50']:.2f} ms "
        f"p99 {raw['tx']['p99']:.2f} ms"
    )
    floors = check_floors(results, noop, raw)
    for f in floors:
        print(
            f"floor {f['what']}: {f['value']} (ratio {f['ratio']:.2f}, limit {f['limit']}) -> "
            f"{'met' if f['ok'] else 'NOT met'}"
        )
    return {"results": results, "noop": noop, "raw": raw, "floors": floors}


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, print only")
    parser.add_argument(
        "--recovery",
        action="store_true",
        help="only the recovery part (no Ray), as many rounds as the full run, print only",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat every measurement this many times"
    )
    parser.add_argument(
        "--hosts",
        default="1,2",
        help="explicit host counts measured beside the default (comma-separated)",
    )
    args = parser.parse_args()
    quick: bool = args.quick
    if args.recovery:
        await recovery_only()
        return
    host_counts = [int(h) for h in args.hosts.split(",") if h]
    import ray

    started = time.perf_counter()
    init_local_ray()
    # The collector as start() leaves this process (RuntimeSettings.collector, from the
    # environment too), before the first baseline: else run 1's no-op call was timed with
    # Python's default collector and everything after it with the tuned one.
    if make_settings(RuntimeSettings).collector == "tuned":
        tune_collector_once()
    runs = []
    for n in range(args.runs):
        print(f"--- run {n + 1} of {args.runs}")
        runs.append(await one_run(quick, host_counts))
    ray.shutdown()
    summary = summarize(runs)
    if args.runs > 1:
        for line in summary["lines"]:
            print(line)
    print(f"total {time.perf_counter() - started:.0f} s")
    if quick:
        return
    write_section(
        "runtime",
        "Runtime: asks through shard hosts on Ray",
        render(runs, summary, args.runs, args.hosts),
    )


async def recovery_only() -> None:
    """The recovery part of the full run alone, on both backends, beside the CPU reference."""
    print(f"CPU reference, sum(range(10**6)): {cpu_reference():.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("SQLite", JournalSettings(url=f"sqlite:///{tmp}/bench.db"))]
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f"CREATE SCHEMA {schema}")
        pg = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        backends.append(("PostgreSQL", pg))
        try:
            for name, js in backends:
                recovery = await recovery_times(js, rounds=5)
                print(
                    f"{name}: recovery of {RECOVERY_EVENTS:,} events: "
                    f"{recovery['events']:.1f} ms replayed (worst {recovery['events_worst']:.1f}), "
                    f"{recovery['snapshots']:.1f} ms from a snapshot "
                    f"(worst {recovery['snapshots_worst']:.1f})"
                )
        finally:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
            await admin.close()


def check_floors(
    results: dict[str, dict[str, Any]], noop: dict[str, float], raw: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue's floors on this run, each as a value, its ratio to the same run's baseline
    and the limit of that ratio. Every floor is measured on the default configuration."""
    floors: list[dict[str, Any]] = []

    def add(key: str, what: str, value: str, ratio: float, limit: float, at_least: bool) -> None:
        ok = ratio >= limit if at_least else ratio <= limit
        bound = f"{'>=' if at_least else '<='} {limit:g}"
        floors.append(
            {"key": key, "what": what, "value": value, "ratio": ratio, "limit": bound, "ok": ok}
        )

    for backend, r in results.items():
        count = r["counts"]["default"]
        for outstanding, ratio in r["default_vs_best"].items():
            rate = r["runs"]["default"][outstanding]["rate"]
            add(
                f"hosts-{backend}-{outstanding}",
                f"{backend}, {outstanding:,} outstanding: default ({count} host(s)) / best host "
                "count",
                f"{rate:,.0f}/s",
                ratio,
                0.9,
                True,
            )
    pg = results["PostgreSQL"]["runs"]["default"]
    rate = pg[1024]["rate"]
    add(
        "throughput",
        "PostgreSQL, 1,024 outstanding, default: commands/s / raw executemany rows/s",
        f"{rate:,.0f}/s",
        rate / raw["executemany"],
        0.6,
        True,
    )
    base = noop["p50"] + raw["tx"]["p50"]
    one = pg[1]
    add(
        "p50",
        "PostgreSQL, 1 outstanding, default: p50 / (no-op Ray call p50 + one-row tx p50)",
        f"{one['p50']:.2f} ms",
        one["p50"] / base,
        1.5,
        False,
    )
    add(
        "p99",
        "PostgreSQL, 1 outstanding, default: p99 / (no-op Ray call p50 + one-row tx p50)",
        f"{one['p99']:.2f} ms",
        one["p99"] / base,
        3,
        False,
    )
    for backend, r in results.items():
        rec = r["recovery"]
        add(
            f"replay-{backend}",
            f"{backend}: recovery replaying {RECOVERY_EVENTS:,} events, ms / 100 ms",
            f"{rec['events']:.1f} ms",
            rec["events"] / 100,
            1,
            False,
        )
        add(
            f"snapshot-{backend}",
            f"{backend}: recovery from a snapshot, ms / 5 ms",
            f"{rec['snapshots']:.1f} ms",
            rec["snapshots"] / 5,
            1,
            False,
        )
    return floors


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per floor: each run's ratio, the median and the worst, and how many runs met it."""
    rows = []
    for n, first in enumerate(runs[0]["floors"]):
        per_run = [run["floors"][n] for run in runs]
        ratios = [f["ratio"] for f in per_run]
        at_least = first["limit"].startswith(">=")
        worst = min(ratios) if at_least else max(ratios)
        met = sum(1 for f in per_run if f["ok"])
        rows.append(
            {
                "what": first["what"],
                "limit": first["limit"],
                "runs": per_run,
                "median": statistics.median(ratios),
                "worst": worst,
                "met": met,
            }
        )
    lines = [
        f"{row['what']}: median {row['median']:.2f}, worst {row['worst']:.2f} "
        f"({row['limit']}), met in {row['met']} of {len(runs)}"
        for row in rows
    ]
    return {"rows": rows, "lines": lines}


def render(runs: list[dict[str, Any]], summary: dict[str, Any], count: int, hosts: str) -> str:
    last = runs[-1]
    results, noop, raw = last["results"], last["noop"], last["raw"]
    pg_batch = results["PostgreSQL"]["batch"]
    command = ".venv/bin/python bench/runtime_bench.py"
    if count > 1:
        command += f" --runs {count}"
    if hosts != "1,2":
        command += f" --hosts {hosts}"
    default_count = results["PostgreSQL"]["counts"]["default"]
    lines = [
        f"Command: `{command}` ({count} run(s) in one sitting; every ratio is against a baseline",
        "measured in the same run)",
        "",
        f"Asks to random entities of {ENTITIES:,} (all activated by a warm-up pass), with each",
        f"explicit host count and with the default (`hosts` unset: one per node, {default_count}",
        "here), the load generator in the driver process, the database on the same 2-core",
        "machine. Each ask persists one event and stores its reply under its command id. *Host",
        "busy* is the share of the run the busiest shard host spent inside",
        "`EntityProcessor.process`; *CPU per command* is the CPU time (user + system) the driver",
        "process (load generator, region client, Ray's calls) and the shard hosts together spent",
        "per ask: less sensitive than the rates to other work on the machine's shared cores (at",
        "low rates it is mostly the processes' background work: Ray's threads, timers).",
        "",
        "### Floors, every run",
        "",
        "Each cell is the run's ratio to its own baseline (the measured value in brackets); the",
        "CPU reference (`sum(range(10**6))`, best of 5, ms) of each run heads its column.",
        "",
        "| floor | limit | "
        + " | ".join(f"run {n + 1} (CPU {run['noop']['cpu_ms']:.1f})" for n, run in enumerate(runs))
        + " | median | worst | met |",
        "| --- | --- | " + " | ".join("---:" for _ in runs) + " | ---: | ---: | --- |",
    ]
    for row in summary["rows"]:
        cells = " | ".join(f"{f['ratio']:.2f} ({f['value']})" for f in row["runs"])
        met = f"{row['met']} of {count}"
        if row["met"] < count:
            met = f"**{met}**"
        lines.append(
            f"| {row['what']} | {row['limit']} | {cells} | {row['median']:.2f} "
            f"| {row['worst']:.2f} | {met} |"
        )
    labels = list(results["PostgreSQL"]["runs"])
    lines += [
        "",
        f"Commands/s by host count, median of the {count} run(s) (the default resolves to "
        f"{default_count}):",
        "",
        "| backend | outstanding asks | "
        + " | ".join("default" if label == "default" else f"{label} host(s)" for label in labels)
        + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for backend in results:
        for outstanding in LEVELS:
            rates = {
                label: statistics.median(
                    r["results"][backend]["runs"][label][outstanding]["rate"] for r in runs
                )
                for label in labels
            }
            cells = " | ".join(f"{rates[label]:,.0f}" for label in labels)
            lines.append(f"| {backend} | {outstanding:,} | {cells} |")
    lines += [
        "",
        "Baselines of every run:",
        "",
        "| run | CPU ms | no-op Ray call p50 / p99 ms | one-row asyncpg tx p50 / p99 ms "
        "| raw executemany rows/s (rows per tx) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, run in enumerate(runs):
        lines.append(
            f"| {n + 1} | {run['noop']['cpu_ms']:.1f} | {run['noop']['p50']:.2f} / "
            f"{run['noop']['p99']:.2f} | {run['raw']['tx']['p50']:.2f} / "
            f"{run['raw']['tx']['p99']:.2f} | {run['raw']['executemany']:,.0f} "
            f"({run['results']['PostgreSQL']['batch']}) |"
        )
    lines += [
        "",
        f"### Every measurement of run {count}",
        "",
        "| backend | hosts | outstanding asks | asks | commands/s | p50 ms | p99 ms "
        "| mean batch | host busy | CPU us per command: driver / host(s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, r in results.items():
        for label, levels in r["runs"].items():
            shown = f"default ({r['counts']['default']})" if label == "default" else label
            for outstanding, run in levels.items():
                lines.append(
                    f"| {backend} | {shown} | {outstanding:,} | {run['asks']:,.0f} "
                    f"| {run['rate']:,.0f} | {run['p50']:.2f} | {run['p99']:.2f} "
                    f"| {run['batch']:.0f} | {run['busy']:.0%} "
                    f"| {run['driver_us']:.1f} / {run['host_us']:.1f} |"
                )
    lines += [
        "",
        "| baseline, same run | value |",
        "| --- | ---: |",
        f"| CPU reference: `sum(range(10**6))`, best of 5 | {noop['cpu_ms']:.1f} ms |",
        f"| no-op Ray actor call, p50 / p99 | {noop['p50']:.2f} / {noop['p99']:.2f} ms |",
        f"| one-row asyncpg transaction (BEGIN, INSERT, COMMIT), p50 / p99 "
        f"| {raw['tx']['p50']:.2f} / {raw['tx']['p99']:.2f} ms |",
        f"| asyncpg executemany, {pg_batch} event rows per transaction (the default's mean "
        f"batch) | {raw['executemany']:,.0f} rows/s |",
    ]
    for backend, r in results.items():
        lines.append(
            f"| {backend} journal alone, {r['batch']} events per transaction "
            f"| {r['journal']:,.0f} events/s |"
        )
    lines += [
        "",
        f"Recovery of one entity with {RECOVERY_EVENTS:,} events (median of 5, ms):",
        "",
        "| backend | replaying every event | from a snapshot (snapshot_every=100) |",
        "| --- | ---: | ---: |",
    ]
    for backend, r in results.items():
        rec = r["recovery"]
        lines.append(f"| {backend} | {rec['events']:.1f} | {rec['snapshots']:.1f} |")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """\
**Host count.** The default is one host per node (here 1). Two hosts lost at 64 outstanding
asks on both backends in every run of 2026-12-04 (twenty runs in four sittings: each host gets
half the asks, batches of ~10 instead of ~32, and a batch's transaction, Ray call and turn at
the journal's fence cost about as much whatever its size); at 1,024 they were within ~10% of
one host (in the first two sittings ahead on PostgreSQL in 7 of 10 runs by 3-8%, behind on
SQLite in 8 of 10). The
default runs as an app of its own beside the explicit counts, in turns, so its ratio to the
best also measures the noise between two identical configurations: its misses below 0.9 are
that noise, not a cost of the default.

**Commands/s against raw executemany (floor 0.6: not met).** One host's cycle is serial:
decide, then commit, then the next batch. Profiled in process (no Ray, PostgreSQL, batches of
500 commands on 1,000 live entities, `time.thread_time` around each step, 2026-12-04): per
command the host spent ~23 us of CPU (deciding: `on_command`, `on_event` and encoding the reply
6.4; encoding the event 2.9; the journal's checks and arrays 2.7; building the statements'
rows 3.0; asyncpg 3.2; grouping, release and pickling the rest) and waited ~17 us for
PostgreSQL (the check of every write plus the offsets, one statement: 4.8; COPY of the events
5.6; COPY of the command replies 4.8; COMMIT 1.4; BEGIN and the fence 0.8): ~37 us per command,
~27,000 commands/s, which is what the runtime reaches with Ray around it. The raw baseline
writes one row per ~10 us; a command writes two (its event and its stored reply) plus the
check, so the PostgreSQL part alone is ~17 us per command, more than the ~16.7 us per command
that 0.6 of the raw rate would allow for the whole cycle. Two hosts overlap one's deciding
with the other's commit, but the hosts, PostgreSQL and the driver (~13 us per command: load
generator, region client, Ray's transport) share the 2 cores: ~50 us of CPU per command in
all, at most ~40,000 commands/s here. Tried before and not kept: overlapping batches inside
one host (no gain: the commit is the larger part and runs on the same event loop) and the
reply stored on the event row (~3% of the cycle, not worth a migration).

**Latency at 1 outstanding ask.** One ask is one Ray call (the no-op call's ~0.8-1.0 ms) plus
the host's batch: one round trip of the journal's `lagompy_write` function (a transaction of
its own, where the raw baseline's takes three) and ~0.2-0.35 ms of CPU; measured inside a Ray
host a one-command batch took 0.75-0.79 ms p50 (0.56 ms in a plain process), and a Ray call
that waits on I/O costs the driver ~0.2-0.3 ms more than the no-op one. In the twenty runs
of 2026-12-04 p50 was 1.18-2.18x the baseline (floor 1.5: met in 11 of 20) and p99 3.4-6.2x
(floor 3: met in none). The tail is the shared 2 cores': the no-op call's own p99 moved
between 1.85 and 5.51 ms from run to run, and in the slowest 2% of one-command calls measured
apart, ~4-4.7 ms went outside the host's batch (Ray and the driver) and ~2-4 ms inside it
(0.6-0.9 ms of it CPU). The CPU reference moved between 11.8 and 20.9 ms over these runs.

**Where the time of one ask goes (2026-12-05).** Timestamps on every phase of 4,000 asks at
1 outstanding (PostgreSQL, default configuration, a loaded machine: CPU reference 27.8 ms, the
one-row transaction's p50 2.08 ms), p50 / p99 in ms: the driver until Ray took the call 0.33 /
1.05; Ray to the host 0.75 / 2.34; the host before deciding (unpickling, routing check, lock,
grouping, activation) 0.10 / 0.24; deciding 0.05 / 0.12; the commit (encoding and one round
trip of `lagompy_write`) 3.02 / 9.79; the release 0.01 / 0.02; the outcomes and their pickling
0.05 / 0.11; Ray back to the driver 0.87 / 4.41. In 47 of the slowest 60 asks the commit was
the phase furthest above its median, in 13 Ray's transport. The collector is not a source:
no collection ran in the host during the 4,000 asks (`gc.freeze()` and a first-generation
threshold of 50,000 since the journal opened), and the driver ran six first-generation ones of
at most 0.2 ms. The host's own work is ~0.2 ms at p50 and ~0.5 ms at p99; the tail is the
database's commit (a durable WAL flush per ask on the shared disk) and Ray's transport, whose
no-op call alone had a p99 2.7 times its p50 in that run. One source was ours: a batch that
crossed an entity's `snapshot_every` saved the snapshot before replying, a second statement
on the path of one write in a hundred with the default of 100. A shard host now saves it after
the reply. Measured with 10 hot entities (4,000 asks, 34 of them crossing a snapshot, three
runs each on the code before and after, alternating): the crossing asks' median was 0.42-0.51
ms above the others' before, 0.13-0.32 ms after. The others' p99 was 4.30-5.22 ms
before and 5.47-5.65 ms after in those runs; two more pairs, which also timed the ask after each
crossing (the one that could wait for the save), found it at the others' median (3.12 and 3.25
ms against 3.07 and 3.25), the crossing asks 0.11 and 0.32 ms above it (0.23 and 0.69 before),
and the p99 of all asks 6.31 and 6.38 ms after against 7.14 and 6.51 before: a gain at the
tail, within this machine's noise.
No throughput change was made: at 1,024 outstanding the host was 84-88% busy and its profile
(py-spy, 100,000 asks) spread over deciding (22% of the samples), the commit (25%, mostly
waiting on PostgreSQL) and the event loop, no function of ours above ~3% on its own.

**The tail of one ask, and the hosts' niceness (2026-12-06).** `bench/runtime_tail_probe.py`
timestamps every stage of single asks (PostgreSQL, default configuration) and runs beside each
ask, in a random order, a no-op Ray call, a one-row transaction and the two composed in one
actor call without lagompy (an actor that runs the transaction on its event loop, as a host
does), so that all meet the same load. Two findings. First, Ray runs an actor's task thread at
niceness 15 (its `worker_niceness`): the shard hosts ran every batch behind any process at
niceness 0 that wanted the same core. With `--compare` (beside the default app, one whose hosts
stay at 15, the asks interleaved) and CPU-bound processes at niceness 0 running beside, the
asks' p99 at 0 / at 15, ms: one busy process (CPU reference 13.6-24.0 ms) 10.2 / 20.5, 9.5 /
12.1, 14.6 / 23.3; two (CPU reference 22.3 and 12.6 ms) 46.4 / 105.7, 13.5 / 61.8. The stage
that grew was the append, where the host wakes when PostgreSQL answers (p99 7.6 against 16.1
ms). With nothing busy beside (CPU reference 14.6-15.1 ms): 4.41 / 5.26, 4.63 / 4.96, 5.94 /
5.66, the same within the noise; the p50 was the same in every round. The hosts now lower
their niceness to 0 ([runtime](runtime.md#latency-of-one-ask)). Second, the rest of the tail is
the composition's: in those calm rounds the composed call's p99 was 2.0-2.8 times the floor's
base and the asks' 2.7-3.4 times (floor 3); each of the slowest 1% of asks was slow in the
commit (7 of 15 in every round) or in Ray's transport (the others), never in lagompy's own steps
(each at most 0.3 ms at p99) nor in a collection (none in the host, the driver's at most 0.35
ms). lagompy adds 0.65-0.8 ms to the composed call at p50 (1.04-1.05 times the base): the region
client 0.08, the host before the append 0.16 (unpickling, deciding, encoding), the append's one
round trip ~0.2 above a raw one-row transaction run by an actor (`lagompy_write` takes the
fence, inserts into three tables and notifies), the host after it 0.05, the rest in Ray's
larger messages. `bench/runtime_bench.py --quick` on main and on this change, three runs each,
alternating (CPU reference 12.3-13.0 ms, no process busy beside): p99 floor ratio 3.72, 3.56,
3.73 before and 1.76, 5.62, 3.60 after, p50 1.39, 1.29, 1.32 and 1.15, 1.50, 1.40: no
difference on a calm machine, as the probe found. At 1,024 outstanding asks two hosts gained
on one after the change (two hosts / one: 1.02, 1.13, 1.14 after, 0.97, 1.03, 1.06 before; the
default / best floor 0.97, 0.91, 0.87 after, 1.00, 0.99, 0.93 before): at niceness 0 the hosts
get their share of the cores beside the driver and PostgreSQL, and two hosts overlap one's
deciding with the other's commit. One host's rate was 25,234-25,876 commands/s after and
24,220-25,280 before. The five runs of the tables above are of this change (09:14-09:23 UTC,
CPU reference 11.9-19.2 ms, where the sitting of 01:22 UTC before it had 8.5-9.8): the p99
floor met in 1 of 5 (worst 5.05), the p50 floor in 3 of 5, and two hosts 13% ahead of one at
1,024 outstanding asks on PostgreSQL in the medians (27,681 against 24,441 commands/s), so that
the default / best floor there was met in 1 of 5; at 64 outstanding two hosts still lost by a
third.

**The calling process's collector (2026-12-06, 18:38-19:04 UTC).** py-spy on the driver at
1,024 outstanding asks put a quarter of its samples in allocations (the future of `submit`,
the wake-up `call_soon` of `set_result`): Python's cyclic collector, walking a heap that Ray's
modules make large, took ~1 s of the driver's 3.4-4.1 s of CPU in 12 s of asks (840-1,120
collections). `start()` now tunes the calling process's collector as shard hosts tune theirs
(`RuntimeSettings.collector`, docs/runtime.md, "How batching works"). `--quick`, five runs each
with `LAGOMPY_RUNTIME_COLLECTOR=default` (before) and the default (after), alternating, CPU
reference 9.4-11.5 ms: PostgreSQL, default configuration, 1,024 outstanding: 21,841, 23,022,
18,490, 33,584, 32,516 commands/s before, 27,315, 25,794, 28,575, 37,776, 37,061 after; the
driver's CPU per command 19.0, 17.8, 16.3, 16.9, 16.4 us before, 9.8, 11.3, 9.6, 8.3, 8.9 after.
The ratio to raw executemany did not move out of its noise (0.14-0.35 before, 0.21-0.37 after):
the raw baseline moved more from run to run than the runtime gained, and the host's cycle
(deciding, then the commit) still bounds one host. The latency floors did not move either.

**Less work around a single ask (2026-12-07, 06:27-07:02 UTC).** Measured apart, each beside its
own baseline: a no-op actor call with a `str` and a `bytes` argument (what the region sent the
host: the topology key and the pickled batch) took 1.139 ms at p50 against 1.058 with one
`bytes` argument and 0.988 with none, returning None (2,000 calls each, interleaved, one Ray):
Ray serializes, sends and deserializes every argument apart. The driver's wait for a call,
through Ray's `concurrent.futures.Future` chained to an asyncio one (`await ref`) in a task
whose first step ran one tick after the flush, took 1.041 ms at p50 against 1.016 with the call
begun in the flush and one asyncio future set from Ray's completion callback (3,000 calls each,
interleaved). A small write's eight integer arrays, encoded by asyncpg's binary encoder (which
checks every array and element against abstract base classes), cost the writer ~7-9 us of CPU
more than in their text form (two prepared `lagompy_write` calls interleaved, 3,000 each). So
the region now begins a call in its flush, the Ray link waits on one future, the host takes its
topology key inside the pickled batch (`ShardHost.process_packed`, one argument) and a small
write's integer arrays travel as text (the probe now times `_RayHostLink._submit`).
`bench/runtime_tail_probe.py --asks 2000 --rounds 1` on main and on this change, alternating,
six pairs (CPU reference 11.9-21.8 ms, other helpers' work beside): p50 against the floor's base
1.60, 1.58, 1.56, 1.60, 1.61, 1.60 before and 1.47, 1.52, 1.51, 1.45, 1.52, 1.52 after; the
composed call's 1.09-1.12 and 1.06-1.10 in the same runs; what lagompy added above the composed
call 1.27, 1.21, 0.98, 1.21, 1.46, 1.23 ms before and 0.78, 1.07, 0.90, 0.75, 1.16, 1.02 after,
in the dispatch (0.23-0.34 -> 0.15-0.26 ms), the driver's wake-up (0.16-0.28 -> 0.13-0.21) and
Ray's transport to the host. The p99 did not move out of its noise (3.24, 2.72, 4.17, 3.40,
3.07, 3.17 before, 3.53, 3.48, 3.60, 2.94, 2.91, 2.76 after). A script of the same asks beside a
no-op call and a one-row transaction, five more pairs: p50 ratio 1.59, 1.39, 1.57, 1.59, 1.46
before and 1.45, 1.41, 1.52, 1.48, 1.48 after, p99 3.25-5.25 and 2.93-4.93 (CPU reference
12.1-21.1 ms). Measured and left as they are: the host's event loop run per batch
(`run_until_complete`, ~20 us a batch against one loop running throughout, in process; nothing
cheaper keeps a synchronous actor), and the write function's own cost, by its variants in one
session (1,500 calls each, interleaved): the notification ~0.03 ms, the fence ~0.015, the whole
function as long as a raw BEGIN, INSERT, COMMIT (0.655 against 0.674 ms) and ~0.3 ms above one
autocommitted one-row INSERT: no change there is worth a migration for this floor.
`bench/runtime_bench.py --quick`, three alternated pairs (06:55-06:59, CPU reference 12.3-19.4
ms, the machine loaded: its baselines are measured apart from the asks, and the asks' p50 moved
from 2.8 to 4.3 ms between runs of either): p50 ratio 2.44, 1.69, 2.03 before and 2.11, 1.74,
2.44 after, no signal. Left for later: one one-ask batch cost a host's thread 0.30-0.35 ms of
CPU at p50 when 2,000 ran inside one Ray call and 0.42-0.70 ms when each was a Ray call of its
own (an actor running the same EntityProcessor on PostgreSQL, three rounds): explained since,
below this section ("One ask against the composed call, side by side").

The machine is a shared VM whose speed changes from minute to minute: compare runs by their
ratios to the same run's baselines, and by the CPU reference."""


if __name__ == "__main__":
    asyncio.run(main())
