"""Design probe: does the NOTIFY inside every journal write transaction stop PostgreSQL's
commits from scaling with concurrent writers? (PostgreSQL takes a global lock for a notifying
transaction's commit.)

N writers (1, 2, 4, 8), each on its own asyncpg connection, insert 100 rows per transaction
(executemany) for 2 s per round, three ways in alternating rounds: no notification,
``pg_notify`` inside the transaction (what the journal does), and ``pg_notify`` in a statement
of its own after the commit; a listener is connected. Prints the median rows/s of three rounds
of each way. Raw SQL only: it measures PostgreSQL, not lagompy.

    .venv/bin/python bench/notify_probe.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WAYS = ("none", "inside", "after")


async def writer(conn: Any, way: str, stop: float) -> int:
    written = 0
    rows = [(j, "x" * 50) for j in range(100)]
    while time.perf_counter() < stop:
        async with conn.transaction():
            await conn.executemany("INSERT INTO notify_probe (k, v) VALUES ($1, $2)", rows)
            if way == "inside":
                await conn.execute("SELECT pg_notify('notify_probe', '1')")
        if way == "after":
            await conn.execute("SELECT pg_notify('notify_probe', '1')")
        written += len(rows)
    return written


async def one_round(conns: list[Any], way: str, seconds: float = 2.0) -> float:
    stop = time.perf_counter() + seconds
    counts = await asyncio.gather(*(writer(c, way, stop) for c in conns))
    return sum(counts) / seconds


async def main() -> None:
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(
        "DROP TABLE IF EXISTS notify_probe; "
        "CREATE TABLE notify_probe (id bigserial PRIMARY KEY, k int, v text)"
    )
    listener = await asyncpg.connect(PG_URL)
    await listener.add_listener("notify_probe", lambda *_: None)
    try:
        for n in (1, 2, 4, 8):
            conns = [await asyncpg.connect(PG_URL) for _ in range(n)]
            rates: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(3):
                for way in WAYS:
                    rates[way].append(await one_round(conns, way))
            medians = {way: statistics.median(r) for way, r in rates.items()}
            print(
                f"{n} writer(s): "
                + ", ".join(f"{way} {medians[way]:,.0f} rows/s" for way in WAYS)
                + f" (inside / none {medians['inside'] / medians['none']:.2f})",
                flush=True,
            )
            for c in conns:
                await c.close()
    finally:
        await admin.execute("DROP TABLE IF EXISTS notify_probe")
        await admin.close()
        await listener.close()


if __name__ == "__main__":
    asyncio.run(main())
