"""Design probe for a sliced journal (issue 21): which ordering fence lets N writers scale.

Today every write transaction of the journal takes one advisory lock (the ordering fence), so
the cluster writes at one writer's speed. A sliced journal gives every event a slice (a stable
hash of its entity, a fixed count) and orders positions per slice; a write takes only the
fences of the slices it touches. This probe measures, on PostgreSQL and in one run, N
concurrent writers (each its own connection, owning disjoint slices, as shard hosts aligned
with the slices would) appending batches of events with each candidate fence, beside raw
executemany of the same rows on as many connections:

* ``raw``: ``BEGIN``, executemany of the rows, ``COMMIT``; no ordering at all.
* ``global``: the same after one ``pg_advisory_xact_lock``: today's single fence.
* ``slice-rows``: a head row per slice, locked in slice order (``SELECT ... ORDER BY slice FOR
  UPDATE``) and advanced by the batch's count of events per slice (``UPDATE ... FROM unnest``);
  every event gets a dense, gap-free position in its slice. Row locks live in the tuples, so a
  batch touching hundreds of slices takes no slots of the lock table.
* ``slice-locks``: one ``pg_advisory_xact_lock`` per touched slice, in slice order, then each
  slice's highest position read from the events' (slice, position) index.

The rows are the journal's event columns (a 100-byte payload) plus, for the sliced candidates,
the slice and the position in it. Writers that own disjoint slices never wait for each other
under the sliced fences; the probe shows what each fence costs per batch and how each scales.

Command: ``.venv/bin/python bench/slices_probe.py --runs 3`` (writes its section of
docs/benchmarks.md). Needs PostgreSQL at ``LAGOMPY_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_reference, write_section

SLICES = 256
BATCH = 100
ENTITIES_PER_WRITER = 2_000
WRITERS = (1, 2, 4, 8)
CANDIDATES = ("raw", "global", "slice-rows", "slice-locks")
PAYLOAD = b"x" * 100
SCHEMA = "lagompy_slices_probe"


def _dsn() -> str:
    url = os.environ.get(
        "LAGOMPY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    )
    return url.replace("postgresql+asyncpg://", "postgresql://")


def slice_of(entity_id: str) -> int:
    return zlib.crc32(entity_id.encode()) % SLICES


def entities_for(writer: int, writers: int, tag: str) -> list[str]:
    """Entity ids whose slices the writer owns (slice % writers == writer)."""
    found: list[str] = []
    n = 0
    while len(found) < ENTITIES_PER_WRITER:
        candidate = f"{tag}-{writer}-{n}"
        n += 1
        if slice_of(candidate) % writers == writer:
            found.append(candidate)
    return found


_INSERT_PLAIN = (
    f"INSERT INTO {SCHEMA}.events (entity_type, entity_id, seq_nr, event_type, event_version,"
    " payload, written_at_us) VALUES ($1, $2, $3, $4, 1, $5, $6)"
)
_INSERT_SLICED = (
    f"INSERT INTO {SCHEMA}.events (entity_type, entity_id, seq_nr, event_type, event_version,"
    " payload, written_at_us, slice, slice_pos) VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8)"
)
_LOCK_ROWS = (
    f"SELECT slice, head FROM {SCHEMA}.slices WHERE slice = ANY($1::int[]) ORDER BY slice"
    " FOR UPDATE"
)
_ADVANCE_ROWS = (
    f"UPDATE {SCHEMA}.slices s SET head = v.h FROM unnest($1::int[], $2::bigint[]) AS v(sl, h)"
    " WHERE s.slice = v.sl"
)
_LOCK_ADVISORY = "SELECT pg_advisory_xact_lock(1819111792, s) FROM unnest($1::int[]) AS s"
_HEADS = (
    f"SELECT v.sl, (SELECT e.slice_pos FROM {SCHEMA}.events e WHERE e.slice = v.sl"
    " ORDER BY e.slice_pos DESC LIMIT 1) FROM unnest($1::int[]) AS v(sl)"
)


async def setup(conn: asyncpg.Connection) -> None:
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await conn.execute(f"CREATE SCHEMA {SCHEMA}")
    await conn.execute(
        f"""CREATE TABLE {SCHEMA}.events (
            global_offset bigserial PRIMARY KEY,
            entity_type text NOT NULL, entity_id text NOT NULL, seq_nr bigint NOT NULL,
            event_type text NOT NULL, event_version int NOT NULL, payload bytea NOT NULL,
            written_at_us bigint NOT NULL, slice int, slice_pos bigint,
            UNIQUE (entity_type, entity_id, seq_nr))"""
    )
    await conn.execute(f"CREATE UNIQUE INDEX ON {SCHEMA}.events (slice, slice_pos)")
    await conn.execute(
        f"CREATE TABLE {SCHEMA}.slices (slice int PRIMARY KEY, head bigint NOT NULL)"
        " WITH (fillfactor = 50)"
    )
    await conn.execute(
        f"INSERT INTO {SCHEMA}.slices SELECT s, 0 FROM generate_series(0, {SLICES - 1}) s"
    )


class Writer:
    def __init__(self, conn: asyncpg.Connection, entities: list[str], candidate: str) -> None:
        self.conn = conn
        self.entities = entities
        self.candidate = candidate
        self.seq: dict[str, int] = {}
        self.rng = random.Random(len(entities) + hash(candidate) % 1000)

    def batch(self) -> list[tuple[str, int, int]]:
        out = []
        for entity in self.rng.sample(self.entities, BATCH):
            n = self.seq.get(entity, 0) + 1
            self.seq[entity] = n
            out.append((entity, n, slice_of(entity)))
        return out

    async def write(self) -> None:
        rows = self.batch()
        now = time.time_ns() // 1000
        conn = self.conn
        async with conn.transaction():
            if self.candidate == "raw":
                await conn.executemany(
                    _INSERT_PLAIN, [("probe", e, n, "Added", PAYLOAD, now) for e, n, _ in rows]
                )
                return
            if self.candidate == "global":
                await conn.execute("SELECT pg_advisory_xact_lock(1819111792, -1)")
                await conn.executemany(
                    _INSERT_PLAIN, [("probe", e, n, "Added", PAYLOAD, now) for e, n, _ in rows]
                )
                return
            counts = Counter(s for _, _, s in rows)
            touched = sorted(counts)
            if self.candidate == "slice-rows":
                heads = dict(await conn.fetch(_LOCK_ROWS, touched))
            else:
                await conn.execute(_LOCK_ADVISORY, touched)
                heads = {s: h or 0 for s, h in await conn.fetch(_HEADS, touched)}
            values = []
            for e, n, s in rows:
                heads[s] += 1
                values.append(("probe", e, n, "Added", PAYLOAD, now, s, heads[s]))
            if self.candidate == "slice-rows":
                await conn.execute(_ADVANCE_ROWS, touched, [heads[s] for s in touched])
            await conn.executemany(_INSERT_SLICED, values)


async def measure(
    conns: list[asyncpg.Connection], writers: int, candidate: str, seconds: float, tag: str
) -> float:
    team = [Writer(conns[w], entities_for(w, writers, tag), candidate) for w in range(writers)]
    stop = time.perf_counter() + seconds
    written = 0

    async def loop(writer: Writer) -> None:
        nonlocal written
        while time.perf_counter() < stop:
            await writer.write()
            written += BATCH

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in team))
    return written / (time.perf_counter() - start)


async def one_run(run: int, seconds: float) -> tuple[float, dict[tuple[str, int], float]]:
    admin = await asyncpg.connect(_dsn())
    try:
        await setup(admin)
        conns = [await asyncpg.connect(_dsn()) for _ in range(max(WRITERS))]
        try:
            cpu = cpu_reference()
            rates: dict[tuple[str, int], float] = {}
            for writers in WRITERS:
                order = list(CANDIDATES)
                random.Random(run * 10 + writers).shuffle(order)
                for candidate in order:
                    tag = f"r{run}w{writers}{candidate}"
                    rates[candidate, writers] = await measure(
                        conns, writers, candidate, seconds, tag
                    )
                    await admin.execute(f"TRUNCATE {SCHEMA}.events")
                    await admin.execute(f"UPDATE {SCHEMA}.slices SET head = 0")
            return cpu, rates
        finally:
            for conn in conns:
                await conn.close()
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.close()


def render(runs: list[tuple[float, dict[tuple[str, int], float]]], command: str) -> str:
    lines = [
        f"Command: `{command}` ({len(runs)} run(s) in one sitting; every ratio is against raw",
        "executemany on as many connections, measured in the same run)",
        "",
        __doc__.split("\n\n", 1)[1].split("\n\nCommand:")[0].strip(),
        "",
        f"Batches of {BATCH} events over {SLICES} slices; each writer owns the slices"
        " `slice % writers == its index` and writes random entities of its own"
        f" ({ENTITIES_PER_WRITER:,} each).",
        "",
        "| run | CPU ms | writers | raw rows/s | global | slice-rows | slice-locks |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (cpu, rates) in enumerate(runs, 1):
        for w in WRITERS:
            raw = rates["raw", w]
            cells = [
                f"{rates[c, w]:,.0f} ({rates[c, w] / raw:.2f})" for c in CANDIDATES if c != "raw"
            ]
            lines.append(f"| {i} | {cpu:.1f} | {w} | {raw:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Median ratio to raw over the runs:", ""]
    lines += ["| writers | global | slice-rows | slice-locks |", "| ---: | ---: | ---: | ---: |"]
    for w in WRITERS:
        meds = [
            statistics.median(r[c, w] / r["raw", w] for _, r in runs)
            for c in CANDIDATES
            if c != "raw"
        ]
        lines.append(f"| {w} | " + " | ".join(f"{m:.2f}" for m in meds) + " |")
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    runs = [await one_run(r, args.seconds) for r in range(args.runs)]
    command = f".venv/bin/python bench/slices_probe.py --runs {args.runs}"
    body = render(runs, command)
    print(body)
    if not args.no_write:
        write_section("slices-probe", "Journal slices: which fence scales (design probe)", body)


if __name__ == "__main__":
    asyncio.run(main())
