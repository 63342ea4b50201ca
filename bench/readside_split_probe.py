"""Read-side split probe (SQLite): the simple rebuild's catch-up in one process or split over
two, beside raw aiosqlite executemany of the same rows, in the same run.

Why: the rebuild of docs/benchmarks.md's read-side section is one process (four workers, one
per tag shard of ``user-events``, on one event loop) and stays near 0.2 x raw executemany on
SQLite: the process's Python (the event loop's thread, ~0.5 s per 100,000 events, and the
driver's threads, ~0.3 s, taking turns at the GIL) uses one core. This probe asks what a
second process would give: the tag shards are divided among ``--processes`` processes, each
running the shards' workers (``ReadSideWorker.catch_up``, default settings) on the one SQLite
file, all started and connected before the clock starts (a split rebuild would need them
pre-started: a new Python process takes ~1 s to import lagompy). Timed from the go to the last
process done; the projection is emptied and its offsets zeroed before each way, as
``rebuild`` does. A control runs the split on two copies of the journal (one per process, no
shared write lock). Prints only (quoted by hand in docs/benchmarks.md's read-side section).

    .venv/bin/python bench/readside_split_probe.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_reference
from bench.readside_bench import fill, raw_executemany_sqlite, raw_rows, read_and_decode
from examples.user_service.entity import UserEntity
from examples.user_service.projection import UsersProjection
from lagompy import JournalSettings, open_storage
from lagompy._collector import tune_collector
from lagompy.readside import open_projections
from lagompy.readside._store import GLOBAL_TAG
from lagompy.readside._worker import ReadSideWorker

EVENTS = 100_000


def settings(path: str) -> JournalSettings:
    return JournalSettings(url=f"sqlite:///{path}")


async def reset(path: str) -> None:
    """What ``rebuild`` does before it replays: every lease taken, ``reset`` and the offsets
    zeroed in one transaction, the leases let go (the workers force them)."""
    p = UsersProjection()
    async with await open_projections(journal_settings=settings(path)) as projections:
        store, ttl = projections.store, projections.settings.lease_ttl
        tags = [GLOBAL_TAG, *UserEntity.tag.all_tags]
        await store.ensure(p.name, tags)
        leases = [await store.acquire(p.name, t, "probe", ttl, force=True) for t in tags]
        async with projections.projection.write() as conn:
            await p.global_prepare(conn)
            await p.reset(conn)
            await store.reset_offsets(conn, [lease for lease in leases[1:] if lease])
        for lease in leases:
            if lease is not None:
                await store.release(lease)


async def child(path: str, tags: list[str]) -> None:
    """One process of the split: its tags' workers, started, then run on the go (stdin)."""
    s = settings(path)
    async with (
        await open_projections(journal_settings=s) as projections,
        await open_storage(settings=s, entities=[UserEntity]) as storage,
    ):
        p = UsersProjection()
        workers = [
            ReadSideWorker(
                p,
                t,
                journal=storage.journal,
                projection=projections.projection,
                settings=projections.settings,
                owner="probe",
                journal_tag=t,
            )
            for t in tags
        ]
        tune_collector()  # started, as `lagompy run` tunes a service's process
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started, cpu = time.perf_counter(), time.process_time()
        offsets = await asyncio.gather(*(w.catch_up(force=True) for w in workers))
        print(
            json.dumps(
                {"s": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                 "offsets": offsets}
            ),
            flush=True,
        )  # fmt: skip


def split(paths: list[str]) -> tuple[float, list[float]]:
    """The catch-up over ``len(paths)`` processes (process i on ``paths[i]``): events/s from
    the go to the last one done, and each process's CPU seconds."""
    for path in set(paths):
        asyncio.run(reset(path))
    tags = UserEntity.tag.all_tags
    k = len(paths)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", path, *tags[i::k]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, path in enumerate(paths)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs: list[dict[str, Any]] = []
    for proc in procs:
        assert proc.stdout is not None
        outs.append(json.loads(proc.stdout.readline()))
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.wait(30)
    renamed = 0
    for path in set(paths):
        with sqlite3.connect(path) as conn:
            (n,) = conn.execute("SELECT count(*) FROM users WHERE name LIKE 'Renamed %'").fetchone()
            renamed += n
    assert renamed == EVENTS // 2, renamed
    return EVENTS / elapsed, [o["cpu"] for o in outs]


async def prepare(path: str) -> Any:
    await fill(settings(path), EVENTS)
    _, pages = await read_and_decode(settings(path))
    return raw_rows(pages)


def main(rounds: int, processes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lagompy-split-") as tmp:
        journal = str(Path(tmp) / "journal.db")
        work = asyncio.run(prepare(journal))
        copies = [str(Path(tmp) / f"copy{i}.db") for i in range(processes)]
        for copy in copies:
            shutil.copy(journal, copy)
        for i in range(rounds):
            cpu = cpu_reference()
            raw = asyncio.run(raw_executemany_sqlite(Path(tmp) / f"raw{i}.db", work))
            one, one_cpu = split([journal])
            many, many_cpu = split([journal] * processes)
            alone, alone_cpu = split(copies)
            each = ", ".join(f"{c:.2f}" for c in many_cpu)
            each_alone = ", ".join(f"{c:.2f}" for c in alone_cpu)
            print(
                f"round {i + 1}: CPU reference {cpu:.1f} ms | raw aiosqlite {raw:,.0f}/s | "
                f"1 process {one:,.0f}/s ({one / raw:.2f} x raw; CPU {one_cpu[0]:.2f} s) | "
                f"{processes} processes {many:,.0f}/s ({many / raw:.2f}; CPU {each} s) "
                f"| control, a file each {alone:,.0f}/s ({alone / raw:.2f}; CPU {each_alone} s)",
                flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        asyncio.run(child(sys.argv[2], sys.argv[3:]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    main(args.rounds, args.processes)
