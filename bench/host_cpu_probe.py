"""Host CPU probe: the CPU a shard host spends per write ask, step by step, without Ray.

On an :class:`~lagompy.runtime._processing.EntityProcessor` over a PostgreSQL schema (what a
shard host runs, with the host's collector settings), batches of ``--batch`` asks to random
entities of 1,000 live ones, each a command that persists one event and stores its reply under
a generated command id, the requests unpickled and the outcomes pickled as a host does: the
thread's CPU time per ask (``time.thread_time``: waiting on PostgreSQL is not counted), the
whole batch and each step of it. Medians of ``--batches`` batches, ``--rounds`` times. The
CPU time moves much less than rates with the other work sharing the machine: run it on two
checkouts in turns to see what a change of the hot path saves. Prints only.

    .venv/bin/python bench/host_cpu_probe.py
    .venv/bin/python bench/host_cpu_probe.py --batch 1000 --batches 40 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pickle
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment, Read
from bench._report import cpu_reference
from lagompy import JournalSettings, open_storage
from lagompy._collector import GC_THRESHOLD
from lagompy.journal import Journal
from lagompy.runtime._processing import EntityProcessor, Request

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ENTITIES = 1_000
#: The steps timed apart: (class, method). Each is timed where it is called from, so a step
#: that awaits counts only its own thread's CPU. ``Journal._encode`` (the events' encoding) is
#: a part of ``_commit``; the rest of a batch is the processor's grouping of the requests and
#: the unpickling and pickling around it.
STEPS: list[tuple[type, str]] = [
    (EntityProcessor, "_activate"),
    (EntityProcessor, "_decide"),
    (EntityProcessor, "_commit"),
    (EntityProcessor, "_release"),
    (Journal, "_encode"),
]


def _timed(cls: type, name: str, spent: dict[str, float]) -> Callable[[], None]:
    """Wrap ``cls.name`` so that its thread CPU time adds up in ``spent[name]``; return the
    function that puts the original back."""
    original = getattr(cls, name)
    if asyncio.iscoroutinefunction(original):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await original(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - started

        setattr(cls, name, timed_async)
    else:

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - started

        setattr(cls, name, timed)
    return lambda: setattr(cls, name, original)


async def probe(batch: int, batches: int, rounds: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        settings = JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
        async with await open_storage(settings=settings, entities=[CounterEntity]) as storage:
            processor = EntityProcessor(
                [CounterEntity], storage.journal, storage.snapshots, defer_snapshots=True
            )
            rng = random.Random(1)
            made = 0

            def requests() -> bytes:
                nonlocal made
                out = []
                for i in rng.sample(range(ENTITIES), batch):
                    made += 1
                    out.append(
                        tuple(
                            Request(CounterEntity.type_name, f"e{i}", Increment(), f"{made:032x}")
                        )
                    )
                return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)

            async def one(data: bytes) -> float:
                started = time.thread_time()
                results = await processor.process(list(map(Request._make, pickle.loads(data))))
                outcomes = [
                    (r.reply, None) if r.error is None else (None, r.error) for r in results
                ]
                pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)
                spent = time.thread_time() - started
                assert all(r.error is None for r in results), results[0].error
                if processor.due_snapshots:
                    await processor.save_due_snapshots()  # after the reply, as a host does
                return spent

            reads = [Request(CounterEntity.type_name, f"e{i}", Read()) for i in range(ENTITIES)]
            await processor.process(reads)
            for _ in range(5):
                await one(requests())
            gc.freeze()
            gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
            print(f"CPU reference, sum(range(10**6)): {cpu_reference():.1f} ms")
            print(f"batches of {batch} write asks, {batches} per round, CPU us per ask (median)")
            for n in range(rounds):
                steps: dict[str, float] = dict.fromkeys((name for _, name in STEPS), 0.0)
                restore = [_timed(cls, name, steps) for cls, name in STEPS]
                try:
                    per_batch = [await one(requests()) for _ in range(batches)]
                finally:
                    for undo in restore:
                        undo()
                asks = batch * batches
                split = ", ".join(
                    f"{name} {spent / asks * 1e6:.1f}" for name, spent in steps.items()
                )
                print(
                    f"round {n + 1}: {statistics.median(per_batch) / batch * 1e6:.2f} "
                    f"(min {min(per_batch) / batch * 1e6:.2f}); {split}"
                )
            print(f"CPU reference, sum(range(10**6)): {cpu_reference():.1f} ms")
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=500, help="asks per batch")
    parser.add_argument("--batches", type=int, default=60, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds")
    args = parser.parse_args()
    asyncio.run(probe(args.batch, args.batches, args.rounds))


if __name__ == "__main__":
    main()
