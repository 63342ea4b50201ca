"""Runtime benchmark: asks/s and latency through the sharded runtime on a local Ray, with 1,024
asks outstanding over many entities, on SQLite and PostgreSQL, beside the journal's own append
rate for the same batch sizes, measured in the same run.

    .venv/bin/python bench/runtime_bench.py            # writes its section of docs/benchmarks.md
    .venv/bin/python bench/runtime_bench.py --quick    # fewer asks, prints only

Each ask is a command that persists one event (one entity per ask in flight, 10,000 entities,
activated by a warm-up pass first). *read-only* asks persist nothing: they measure the runtime's
own ceiling (region client, Ray call, processor) without a journal write.
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

from bench._counter import CounterEntity, Increment, Incremented, Read
from bench._report import write_section
from lagompy import AtomicWrite, JournalSettings, open_storage, start

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
OUTSTANDING = 1024
ENTITIES = 10_000


async def drive(entities: Any, command: Any, total: int, seed: int) -> dict[str, float]:
    """``total`` asks, ``OUTSTANDING`` at a time, to random entities; rate and latencies."""
    rng = random.Random(seed)
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            ref = entities.ref_for(CounterEntity, f"e{rng.randrange(ENTITIES)}")
            t0 = time.perf_counter()
            await ref.ask(command, timeout=120)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(OUTSTANDING)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": total / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def _busy(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Seconds the hosts spent processing batches (the busiest host)."""
    return max(a["busy_seconds"] - b["busy_seconds"] for a, b in zip(after, before, strict=True))


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


async def bench_backend(name: str, js: JournalSettings, asks: int, hosts: int) -> dict[str, Any]:
    app = f"bench-{uuid.uuid4().hex[:6]}"
    entities = await start(
        app=app, entities=[CounterEntity], journal_settings=js, hosts=hosts, max_pending=20_000
    )
    try:
        # Warm-up: activate every entity (recovery reads), so the runs measure commands.
        await asyncio.gather(
            *(
                entities.ref_for(CounterEntity, f"e{i}").ask(Read(), timeout=120)
                for i in range(ENTITIES)
            )
        )
        before = await entities.host_stats()
        writes = await drive(entities, Increment(), asks, seed=1)
        after = await entities.host_stats()
        batches = sum(a["batches"] - b["batches"] for a, b in zip(after, before, strict=True))
        mean_batch = asks / max(1, batches)
        writes["busy"] = _busy(before, after) / (asks / writes["rate"])
        reads = await drive(entities, Read(), asks, seed=2)
        reads["busy"] = _busy(after, await entities.host_stats()) / (asks / reads["rate"])
        print(
            f"{name} hosts={hosts}: {writes['rate']:,.0f} asks/s p50 {writes['p50']:.1f} ms "
            f"p99 {writes['p99']:.1f} ms, mean batch {mean_batch:.0f}, host busy "
            f"{writes['busy']:.0%}; read-only "
            f"{reads['rate']:,.0f} asks/s p50 {reads['p50']:.1f} ms p99 {reads['p99']:.1f} ms, "
            f"host busy {reads['busy']:.0%}"
        )
    finally:
        await entities.close(shutdown=True)
    journal = await journal_rate(js, max(1, round(mean_batch)), rounds=7)
    print(f"{name}: journal alone, {round(mean_batch)} events per transaction: {journal:,.0f}/s")
    return {"writes": writes, "reads": reads, "batch": mean_batch, "journal": journal}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, print only")
    parser.add_argument("--asks", type=int, default=50_000)
    parser.add_argument("--hosts", type=int, default=1)
    args = parser.parse_args()
    asks = 5_000 if args.quick else args.asks
    import ray

    ray.init(
        address="local",
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite"] = await bench_backend(
            "SQLite", JournalSettings(url=f"sqlite:///{tmp}/bench.db"), asks, args.hosts
        )
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        results["PostgreSQL"] = await bench_backend(
            "PostgreSQL",
            JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True),
            asks,
            args.hosts,
        )
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    ray.shutdown()
    if args.quick:
        return
    command = (
        ".venv/bin/python bench/runtime_bench.py"
        + (f" --asks {args.asks}" if args.asks != 50_000 else "")
        + (f" --hosts {args.hosts}" if args.hosts != 1 else "")
    )
    write_section(
        "runtime",
        "Runtime: asks through shard hosts on Ray",
        render(results, command, asks, args.hosts),
    )


def render(results: dict[str, dict[str, Any]], command: str, asks: int, hosts: int) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"{asks:,} asks per run, {OUTSTANDING:,} outstanding at any time, to random entities of",
        f"{ENTITIES:,} (all activated by a warm-up pass); {hosts} shard host(s), the load",
        "generator in the driver process, the database on the same 2-core machine. Each write",
        "ask persists one event. *Journal alone* appends batches of the mean batch size the",
        "hosts saw (one event per entity, one transaction per batch) straight to the journal,",
        "in the same run, to new entities and without stored replies. *Read-only* asks persist",
        "nothing: the runtime's own ceiling. *Host busy* is the share of the run the busiest",
        "shard host spent inside `EntityProcessor.process` (the rest is Ray transport, the",
        "region client and the load generator, which share the 2 cores with it).",
        "",
        "| backend | write asks/s | p50 ms | p99 ms | mean batch | host busy "
        "| journal alone, events/s | read-only asks/s | p50 ms | p99 ms | host busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, r in results.items():
        w, rd = r["writes"], r["reads"]
        lines.append(
            f"| {backend} | {w['rate']:,.0f} | {w['p50']:.1f} | {w['p99']:.1f} | {r['batch']:.0f} "
            f"| {w['busy']:.0%} | {r['journal']:,.0f} | {rd['rate']:,.0f} | {rd['p50']:.1f} "
            f"| {rd['p99']:.1f} | {rd['busy']:.0%} |"
        )
    lines += [
        "",
        "Reading the table: when *host busy* is high for write asks, the shard host's",
        "`EntityProcessor.process` (decide, apply, encode, one journal transaction with the",
        "command replies) is the bottleneck, not Ray's transport or the region client: compare",
        "the time per command inside the host with the journal's own time per event. A profile",
        "of the processor alone (same batches, one process) put about a quarter of its time in",
        "the journal append, and notable shares in one asyncio task per entity per batch",
        "(activation) and in `Effect.then_reply`'s `dataclasses.replace`. Read-only asks leave",
        "the host idle about half of the time: there the load generator, the region client and",
        "Ray's transport share the two cores with the host. The design notes' 134k commands/s",
        "was one host with a no-op journal and no processor.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    asyncio.run(main())
