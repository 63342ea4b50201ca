"""Cold batches probe: what a shard host's batch costs when its entities are not in memory.

On an :class:`~lagompy.runtime._processing.EntityProcessor` (what a shard host runs; no Ray),
SQLite file and PostgreSQL schema, batches of ``--batch`` asks (each a command that persists an
event, with a command id checked for duplicates, as ``ctx.ask`` sends), each to its own entity:

* cold, new ids: entities never written (recovery finds nothing);
* warm: the same entities again, now in memory;
* cold with history: entities of 10 to 40 events, dropped from memory before each batch.

Medians of ``--rounds`` batches. Prints only (the numbers, with the command and the CPU
reference, are quoted by hand in docs/benchmarks.md's workflows section).

    .venv/bin/python bench/cold_batch_probe.py
    .venv/bin/python bench/cold_batch_probe.py --batch 256 --rounds 10
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

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment
from bench._report import cpu_reference
from lagompy import JournalSettings, open_storage
from lagompy.runtime._processing import EntityProcessor, Request

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WARM_UP = 3


async def timed(processor: EntityProcessor, requests: list[Request]) -> float:
    t0 = time.perf_counter()
    results = await processor.process(requests)
    elapsed = time.perf_counter() - t0
    errors = [r.error for r in results if r.error is not None]
    assert not errors, errors[0]
    return elapsed


async def probe(name: str, js: JournalSettings, batch: int, rounds: int) -> None:
    kind = CounterEntity.type_name
    async with await open_storage(settings=js, entities=[CounterEntity]) as storage:
        processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
        tag = uuid.uuid4().hex[:6]
        cold: list[float] = []
        warm: list[float] = []
        for r in range(WARM_UP + rounds):
            ids = [f"{tag}-{r}-{i}" for i in range(batch)]
            first = await timed(
                processor, [Request(kind, e, Increment(), f"c{e}", True) for e in ids]
            )
            again = await timed(
                processor, [Request(kind, e, Increment(), f"d{e}", True) for e in ids]
            )
            if r >= WARM_UP:
                cold.append(first)
                warm.append(again)
        ids = [f"{tag}-h-{i}" for i in range(batch)]
        for _ in range(10):
            await timed(processor, [Request(kind, e, Increment()) for e in ids])
        history: list[float] = []
        for _ in range(rounds):
            processor.live.clear()
            history.append(await timed(processor, [Request(kind, e, Increment()) for e in ids]))

        def ms(samples: list[float]) -> str:
            return f"{statistics.median(samples) * 1000:.1f} ms"

        print(
            f"{name}: batch of {batch} asks: cold new ids {ms(cold)}, warm {ms(warm)}, "
            f"cold with 10-40 events {ms(history)} (medians of {rounds})"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"CPU reference, sum(range(10**6)): {cpu_reference():.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        js = JournalSettings(url=f"sqlite:///{tmp}/probe.db")
        await probe("SQLite", js, args.batch, args.rounds)
    schema = f"coldprobe_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        js = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        await probe("PostgreSQL", js, args.batch, args.rounds)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    print(f"CPU reference after: {cpu_reference():.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
