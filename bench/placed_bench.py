"""What a journal placed on several databases costs the runtime: commands/s through the shard
hosts (default host count) on one PostgreSQL database, beside the same load on a journal placed
on two databases of the same server (the slices cut in halves), in the same run, rounds
alternating. On one 2-core machine both databases share the server's cores, so this measures
the runtime's cost of the placement (a batch split by database, its parts committed side by
side), not the scaling a second server brings.

    .venv/bin/python bench/placed_bench.py            # writes its section of docs/benchmarks.md
    .venv/bin/python bench/placed_bench.py --runs 3   # three runs, each with its CPU reference
    .venv/bin/python bench/placed_bench.py --no-write # prints only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._counter import CounterEntity, Increment, Read
from bench._report import cpu_reference, write_section
from bench.runtime_bench import ENTITIES, drive
from lagompy import JournalSettings, start
from lagompy.journal import slice_ranges
from lagompy.settings import PlacedDatabase

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: outstanding asks -> asks per round
LEVELS = {64: 6_000, 1024: 30_000}
ROUNDS = 4


async def _schemas(n: int) -> list[str]:
    names = [f"bench_p{uuid.uuid4().hex[:8]}" for _ in range(n)]
    conn = await asyncpg.connect(PG_URL)
    try:
        for name in names:
            await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return names


async def _drop(names: list[str]) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        for name in names:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


def _settings(schemas: list[str]) -> JournalSettings:
    """One database per schema; the slices cut into as many contiguous ranges."""
    ranges = slice_ranges(len(schemas))
    return JournalSettings(
        url=PG_URL,
        postgres_schema=schemas[0],
        auto_migrate=True,
        databases={
            f"d{n}": PlacedDatabase(url=PG_URL, postgres_schema=s, slices=str(ranges[n]))
            for n, s in enumerate(schemas[1:], start=1)
        },
    )


async def one_run(run: int) -> tuple[float, dict[int, dict[str, float]]]:
    """Commands/s of each configuration (1 and 2 databases) at each level, median of its
    rounds."""
    schemas = await _schemas(3)
    configs = {"one": _settings(schemas[:1]), "two": _settings(schemas[1:])}
    apps: dict[str, Any] = {}
    out: dict[int, dict[str, float]] = {}
    try:
        for label, js in configs.items():
            apps[label] = await start(
                app=f"bench-{uuid.uuid4().hex[:6]}",
                entities=[CounterEntity],
                journal_settings=js,
                max_pending=20_000,
            )
            ents = apps[label]
            await asyncio.gather(
                *(
                    ents.ref_for(CounterEntity, f"e{i}").ask(Read(), timeout=120)
                    for i in range(ENTITIES)
                )
            )
            await drive(ents, Increment(), 2_000, 64, seed=0)
        cpu = cpu_reference()
        for outstanding, asks in LEVELS.items():
            rates: dict[str, list[float]] = {label: [] for label in configs}
            for r in range(ROUNDS):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for label in order:
                    done = await drive(apps[label], Increment(), asks, outstanding, seed=r)
                    rates[label].append(done["rate"])
            level = {label: statistics.median(v) for label, v in rates.items()}
            out[outstanding] = level
            print(
                f"run {run + 1} (CPU {cpu:.1f} ms), {outstanding} outstanding: one database "
                f"{level['one']:,.0f}/s, two {level['two']:,.0f}/s, ratio "
                f"{level['two'] / level['one']:.2f}",
                flush=True,
            )
        return cpu, out
    finally:
        for ents in apps.values():
            await ents.close(shutdown=True)
        await _drop(schemas)


def render(runs: list[tuple[float, dict[int, dict[str, float]]]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "Asks to random entities of 1,000 through the shard hosts (default host count), each",
        "persisting one event and storing its reply, on a journal of one PostgreSQL database and",
        "on one placed on two databases of the same server (slices 0-511 and 512-1023: a",
        "batch's part for each committed side by side), in the same run, rounds alternating;",
        f"each figure is the median of {ROUNDS} rounds. Both databases share the machine's 2",
        "cores with the hosts and the load generator: this is the runtime's cost of placing the",
        "journal on several databases, not what a second server adds.",
        "",
        "| run | CPU ms | outstanding | one database, commands/s | two databases | two / one |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, (cpu, levels) in enumerate(runs, start=1):
        for outstanding, level in levels.items():
            lines.append(
                f"| {n} | {cpu:.1f} | {outstanding:,} | {level['one']:,.0f} | "
                f"{level['two']:,.0f} | {level['two'] / level['one']:.2f} |"
            )
    lines.append("")
    for outstanding in LEVELS:
        ratios = [levels[outstanding]["two"] / levels[outstanding]["one"] for _, levels in runs]
        lines.append(
            f"At {outstanding:,} outstanding: median two / one {statistics.median(ratios):.2f}, "
            f"worst {min(ratios):.2f}."
        )
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    runs = [await one_run(r) for r in range(args.runs)]
    command = ".venv/bin/python bench/placed_bench.py" + (
        f" --runs {args.runs}" if args.runs != 1 else ""
    )
    text = render(runs, command)
    print(text)
    if not args.no_write:
        write_section("placed", "Runtime: a journal placed on several databases", text)


if __name__ == "__main__":
    asyncio.run(main())
