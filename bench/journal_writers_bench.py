"""Journal writers benchmark: does the journal write faster with more writers?

N concurrent writers (1, 2, 4, 8), each a journal of its own (``open_storage``, default
settings: its own connections, as shard hosts in separate processes have), append batches of
100 events (100 entities, one event each, with a tag: a shard host's group commit) to disjoint
entities for a few seconds; beside them, in the same run and in alternating rounds, raw asyncpg
on N connections inserts the same rows (events and tag rows, precomputed, offsets included) with
one executemany per table per transaction into tables with the same indexes: the cheapest a
plain driver can do. Every measurement starts on empty tables. PostgreSQL only (SQLite's
writers take turns by design). The process's collector is what opening the journal gives a
program of one's own by default: tuned as a shard host's, by the first ``open_storage``
(``JournalSettings.collector``, lagompy/_collector.py); ``--default-gc`` opens the journals with
``collector="default"`` and keeps Python's.

    .venv/bin/python bench/journal_writers_bench.py --runs 3   # writes docs/benchmarks.md

Before migration 0010 every write transaction took the journal's one exclusive lock, and the
journal stayed at one writer's speed (measured 2026-12-03: 0.66, 0.30, 0.26, 0.23 of raw at
1, 2, 4, 8 writers). Writers now place a marker instead and never wait for each other; readers
stop below the markers of writers still in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_reference, write_section
from bench.journal_bench import INSERT_EVENTS, PG_URL, CartEntity, RawRows, make_batch
from lagompy import JournalSettings, open_storage
from lagompy.journal import Storage

WRITERS = (1, 2, 4, 8)
BATCH = 100
ROUNDS = 3
#: The journals' JournalSettings.collector (see the module docstring); --default-gc: "default".
COLLECTOR: Literal["tuned", "default"] = "tuned"


async def for_seconds(
    writers: int, seconds: float, one: Callable[[int, int], Awaitable[int]]
) -> float:
    """``writers`` loops calling ``one(writer, n)`` until ``seconds`` pass; rows/s in all."""
    stop = time.perf_counter() + seconds
    total = 0

    async def loop(w: int) -> None:
        nonlocal total
        for n in itertools.count():
            if time.perf_counter() >= stop:
                return
            added = await one(w, n)  # not `total += await ...`: that reads total before
            total += added  # the await, and the writers' counts overwrite each other

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(writers)))
    return total / (time.perf_counter() - start)


async def one_run(run: int, seconds: float) -> tuple[float, dict[int, tuple[float, float]]]:
    schema = f"bench_w{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    settings = JournalSettings(
        url=PG_URL, postgres_schema=schema, auto_migrate=True, collector=COLLECTOR
    )
    storages: list[Storage] = []
    conns: list[asyncpg.Connection] = []
    try:
        storages = [
            await open_storage(settings=settings, entities=[CartEntity])
            for _ in range(max(WRITERS))
        ]
        conns = [
            await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
            for _ in range(max(WRITERS))
        ]
        await conns[0].execute("CREATE TABLE raw_events (LIKE lagompy_events INCLUDING ALL)")
        await conns[0].execute("CREATE TABLE raw_tags (LIKE lagompy_event_tags INCLUDING ALL)")
        raw_rows = RawRows(storages[0].serializer)
        ins_events = INSERT_EVENTS.format(
            t="raw_events", p=", ".join(f"${i}" for i in range(1, 12))
        )
        cpu = cpu_reference()
        rates: dict[int, tuple[float, float]] = {}
        for writers in WRITERS:

            async def ours(w: int, n: int, writers: int = writers) -> int:
                prefix = f"o{run}-{writers}-{w}-{n}-{uuid.uuid4().hex[:6]}"
                for result in await storages[w].journal.append(make_batch(prefix, BATCH)):
                    result.unwrap()
                return BATCH

            async def raw(w: int, n: int, writers: int = writers) -> int:
                events, tags = raw_rows.rows(
                    f"r{run}-{writers}-{w}-{n}-{uuid.uuid4().hex[:6]}", BATCH
                )
                conn = conns[w]
                async with conn.transaction():
                    await conn.executemany(ins_events, events)
                    await conn.executemany(
                        "INSERT INTO raw_tags (tag, global_offset) VALUES ($1, $2)", tags
                    )
                return BATCH

            measured: dict[str, list[float]] = {"ours": [], "raw": []}
            for r in range(ROUNDS):
                order = [("ours", ours), ("raw", raw)]
                if r % 2:
                    order.reverse()
                for name, one in order:
                    measured[name].append(await for_seconds(writers, seconds, one))
                    # Every measurement starts on empty tables: grown ones (past the
                    # server's buffers) made the later, larger writer counts look slower.
                    await conns[0].execute(
                        "TRUNCATE raw_events, raw_tags, lagompy_events, lagompy_event_tags, "
                        "lagompy_command_replies"
                    )
            rates[writers] = (
                statistics.median(measured["ours"]),
                statistics.median(measured["raw"]),
            )
            ours_rate, raw_rate = rates[writers]
            print(
                f"run {run + 1}: {writers} writer(s): journal {ours_rate:,.0f}/s, raw "
                f"{raw_rate:,.0f}/s, ratio {ours_rate / raw_rate:.2f}",
                flush=True,
            )
        return cpu, rates
    finally:
        for conn in conns:
            await conn.close()
        for storage in storages:
            await storage.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


def render(runs: list[tuple[float, dict[int, tuple[float, float]]]], command: str) -> str:
    doc = __doc__ or ""
    lines = [
        f"Command: `{command}` ({len(runs)} run(s) in one sitting; each figure is the median of"
        f" {ROUNDS} rounds, journal and raw alternating)",
        "",
        doc.split("\n\n", 1)[1].split("\n\n    .venv")[0].strip(),
        "",
        doc.rsplit("\n\n", 1)[1].strip(),
        "",
        "| run | CPU ms | writers | journal events/s | raw rows/s | journal / raw |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (cpu, rates) in enumerate(runs, 1):
        for w in WRITERS:
            ours, raw = rates[w]
            lines.append(f"| {i} | {cpu:.1f} | {w} | {ours:,.0f} | {raw:,.0f} | {ours / raw:.2f} |")
    lines += [
        "",
        "Floor: >= 0.7 of raw at 1, 2, 4 and 8 writers, same run.",
        "",
        "| writers | median ratio | worst ratio | runs meeting 0.7 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for w in WRITERS:
        ratios = [r[w][0] / r[w][1] for _, r in runs]
        met = sum(x >= 0.7 for x in ratios)
        median = statistics.median(ratios)
        lines.append(f"| {w} | {median:.2f} | {min(ratios):.2f} | {met} of {len(ratios)} |")
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description="journal append with N concurrent writers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and contender")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="open the journals with collector='default': Python's collector settings",
    )
    args = parser.parse_args()
    global COLLECTOR
    COLLECTOR = "default" if args.default_gc else "tuned"
    runs = [await one_run(r, args.seconds) for r in range(args.runs)]
    body = render(runs, f".venv/bin/python bench/journal_writers_bench.py --runs {args.runs}")
    print(body)
    if not args.no_write:
        write_section("journal-writers", "Journal: concurrent writers", body)


if __name__ == "__main__":
    asyncio.run(main())
