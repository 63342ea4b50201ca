"""Journal benchmark: append throughput by batch size, and read-by-tag throughput, each beside a
raw driver baseline measured in the same run, on SQLite and PostgreSQL.

    .venv/bin/python bench/journal_bench.py            # writes its section of docs/benchmarks.md
    .venv/bin/python bench/journal_bench.py --runs 3   # the same three times, CPU reference each
    .venv/bin/python bench/journal_bench.py --quick    # fewer rows, prints only

The raw baselines insert the same rows (events and their tag rows) into tables with the same
indexes, one transaction per batch, with precomputed offsets and no lock: the cheapest a plain
driver can do. PostgreSQL runs with its default synchronous_commit. Rounds of ours and raw are
interleaved and the median of each is reported, because this machine is noisy.
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import cpu_reference, write_section
from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy.entity import Command, Effect, PersistentEntity
from lagompy.journal import slice_of
from lagompy.journal._postgres import _PG_COPY_FROM

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TAG = "bench-events3"


@dataclass(frozen=True)
class Nothing:
    pass


@dataclass(frozen=True)
class Noop(Command[None]):
    pass


@dataclass(frozen=True)
class ItemAdded:
    cart_id: str
    item: str
    quantity: int


class CartEntity(PersistentEntity[Noop, ItemAdded, Nothing]):
    type_name = "cart"
    initial_state = Nothing()

    def on_command(self, state: Nothing, command: Noop) -> Effect[Nothing]:
        return Effect.none()

    def on_event(self, state: Nothing, event: ItemAdded) -> Nothing:
        return state


def make_batch(prefix: str, batch: int) -> list[AtomicWrite]:
    # One event per entity: a batch of N events is N entities, as a shard host's group commit is.
    return [
        AtomicWrite("cart", f"{prefix}-{i}", 0, [ItemAdded(f"{prefix}-{i}", "apple", 3)], [(TAG,)])
        for i in range(batch)
    ]


class RawRows:
    """The rows our journal writes for a batch, precomputed, for the raw baselines."""

    def __init__(self, serializer: object) -> None:
        self.serializer = serializer
        self.next_offset = 10_000_000

    def rows(
        self, prefix: str, batch: int
    ) -> tuple[list[tuple[object, ...]], list[tuple[str, int]]]:
        encode = self.serializer.encode  # type: ignore[attr-defined]
        events: list[tuple[object, ...]] = []
        tags: list[tuple[str, int]] = []
        for i in range(batch):
            type_name, version, payload = encode(ItemAdded(f"{prefix}-{i}", "apple", 3))
            self.next_offset += 1
            events.append(
                (
                    self.next_offset,
                    "cart",
                    f"{prefix}-{i}",
                    1,
                    type_name,
                    version,
                    payload,
                    b"\x91\xadbench-events3",
                    None,
                    time.time_ns() // 1000,
                    slice_of(f"{prefix}-{i}"),
                )
            )
            tags.append((TAG, self.next_offset))
        return events, tags


async def timed_rounds(
    rounds: int, contenders: dict[str, Callable[[int], Awaitable[int]]]
) -> dict[str, float]:
    """Interleave the contenders round by round; median rows/s of each."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            rows = await run(r)
            rates[name].append(rows / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


#: The same query as Journal.events_by_tag (a page of offsets from the tag key, then the events).
READ_BY_TAG = (
    "SELECT e.* FROM (SELECT global_offset FROM lagompy_event_tags WHERE tag = ? AND "
    "global_offset > ? ORDER BY global_offset LIMIT 1000) t JOIN lagompy_events e "
    "ON e.global_offset = t.global_offset ORDER BY t.global_offset"
)

INSERT_EVENTS = (
    "INSERT INTO {t} (global_offset, entity_type, entity_id, seq_nr, event_type, event_version, "
    "payload, tags, metadata, written_at_us, slice) VALUES ({p})"
)


async def drain(
    fetch_page: Callable[[int], Awaitable[Sequence[Any]]], offset_of: Callable[[Any], int]
) -> int:
    """Read every page after offset 0 (``fetch_page(after)``) until an empty one; the count."""
    n, after = 0, 0
    while True:
        page = await fetch_page(after)
        if not page:
            return n
        n += len(page)
        after = offset_of(page[-1])


async def read_ours(journal: Any) -> int:
    """The events of TAG through lagompy, in pages of 1,000 (decoded)."""
    return await drain(
        lambda after: journal.events_by_tag(TAG, after_offset=after, limit=1000),
        lambda envelope: envelope.offset,
    )


async def bench_postgres(rows_per_round: int, rounds: int) -> dict[str, object]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.close()
    storage = await open_storage(
        settings=JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True),
        entities=[CartEntity],
    )
    raw = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        await raw.execute("CREATE TABLE raw_events (LIKE lagompy_events INCLUDING ALL)")
        await raw.execute("CREATE TABLE raw_tags (LIKE lagompy_event_tags INCLUDING ALL)")
        raw_rows = RawRows(storage.serializer)
        ins_events = INSERT_EVENTS.format(
            t="raw_events", p=", ".join(f"${i}" for i in range(1, 12))
        )
        appends: dict[int, tuple[float, float]] = {}
        for batch in (1, 10, 100, 1000):
            txns = max(1, rows_per_round // batch)
            if batch == 1:
                txns = max(1, txns // 4)  # one row per transaction is slow; keep the run short

            async def ours(r: int, batch: int = batch, txns: int = txns) -> int:
                for t in range(txns):
                    await storage.journal.append(make_batch(f"o{batch}-{r}-{t}", batch))
                return batch * txns

            async def plain(r: int, batch: int = batch, txns: int = txns) -> int:
                for t in range(txns):
                    events, tags = raw_rows.rows(f"r{batch}-{r}-{t}", batch)
                    async with raw.transaction():
                        await raw.executemany(ins_events, events)
                        await raw.executemany(
                            "INSERT INTO raw_tags (tag, global_offset) VALUES ($1, $2)", tags
                        )
                return batch * txns

            medians = await timed_rounds(rounds, {"ours": ours, "raw": plain})
            appends[batch] = (medians["ours"], medians["raw"])
            print(
                f"postgres append batch={batch}: ours {medians['ours']:.0f}/s raw "
                f"{medians['raw']:.0f}/s ratio {medians['ours'] / medians['raw']:.2f}"
            )

        # Fresh statistics, as autovacuum would have them.
        await raw.execute("ANALYZE lagompy_events; ANALYZE lagompy_event_tags")

        pg_read = READ_BY_TAG.replace("?", "$1", 1).replace("?", "$2", 1)

        async def read_raw(r: int) -> int:
            return await drain(
                lambda after: raw.fetch(pg_read, TAG, after), lambda row: row["global_offset"]
            )

        async def read_lagompy(r: int) -> int:
            return await read_ours(storage.journal)

        reads = await timed_rounds(max(3, rounds // 2), {"ours": read_lagompy, "raw": read_raw})
        print(f"postgres read by tag: ours {reads['ours']:.0f}/s raw {reads['raw']:.0f}/s")
        return {"appends": appends, "reads": (reads["ours"], reads["raw"])}
    finally:
        await raw.close()
        await storage.close()
        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def bench_sqlite(rows_per_round: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        storage = await open_storage(f"sqlite:///{path}", entities=[CartEntity])
        raw = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await raw.execute("PRAGMA journal_mode=WAL")
            await raw.execute("PRAGMA synchronous=FULL")
            # The same DDL as lagompy's tables (AUTOINCREMENT, unique and tag indexes included).
            cursor = await raw.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name IN "
                "('lagompy_events', 'lagompy_event_tags') AND sql IS NOT NULL"
            )
            for (ddl,) in await cursor.fetchall():
                ddl = ddl.replace("lagompy_event_tags", "raw_tags")
                ddl = ddl.replace("lagompy_events", "raw_events")
                await raw.execute(
                    ddl.replace(" uq_", " raw_uq_")
                    .replace(" ix_", " raw_ix_")
                    .replace(" pk_", " raw_pk_")
                )
            raw_rows = RawRows(storage.serializer)
            ins_events = INSERT_EVENTS.format(t="raw_events", p=", ".join("?" * 11))
            appends: dict[int, tuple[float, float]] = {}
            for batch in (1, 10, 100, 1000):
                txns = max(1, rows_per_round // batch)
                if batch == 1:
                    txns = max(1, txns // 4)

                async def ours(r: int, batch: int = batch, txns: int = txns) -> int:
                    for t in range(txns):
                        await storage.journal.append(make_batch(f"o{batch}-{r}-{t}", batch))
                    return batch * txns

                async def plain(r: int, batch: int = batch, txns: int = txns) -> int:
                    for t in range(txns):
                        events, tags = raw_rows.rows(f"r{batch}-{r}-{t}", batch)
                        await raw.execute("BEGIN IMMEDIATE")
                        await raw.executemany(ins_events, events)
                        await raw.executemany("INSERT INTO raw_tags VALUES (?, ?)", tags)
                        await raw.execute("COMMIT")
                    return batch * txns

                medians = await timed_rounds(rounds, {"ours": ours, "raw": plain})
                appends[batch] = (medians["ours"], medians["raw"])
                print(
                    f"sqlite append batch={batch}: ours {medians['ours']:.0f}/s raw "
                    f"{medians['raw']:.0f}/s ratio {medians['ours'] / medians['raw']:.2f}"
                )

            async def fetch_raw(after: int) -> list[Any]:
                cursor = await raw.execute(READ_BY_TAG, (TAG, after))
                return list(await cursor.fetchall())

            async def read_raw(r: int) -> int:
                return await drain(fetch_raw, lambda row: row[0])

            async def read_lagompy(r: int) -> int:
                return await read_ours(storage.journal)

            reads = await timed_rounds(max(3, rounds // 2), {"ours": read_lagompy, "raw": read_raw})
            print(f"sqlite read by tag: ours {reads['ours']:.0f}/s raw {reads['raw']:.0f}/s")
            return {"appends": appends, "reads": (reads["ours"], reads["raw"])}
        finally:
            await raw.close()
            await storage.close()


Results = dict[str, dict[str, object]]


def render(runs: list[tuple[float, Results]], command: str) -> str:
    lines = [
        f"Command: `{command}` ({len(runs)} run(s) in one sitting; the CPU reference,"
        " `sum(range(10**6))` best of 5 in ms, was taken at the start of each run)",
        "",
        "Append throughput (events/s, one transaction per batch, one event per entity, each with",
        "one tag), median of interleaved rounds. *raw* is the driver's own executemany of the same",
        "event and tag rows into tables with the same indexes (asyncpg on PostgreSQL, aiosqlite",
        "on SQLite), precomputed offsets, no ordering lock.",
        "",
        "| run | CPU ms | backend | events per transaction | lagompy | raw | lagompy / raw |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for n, (cpu, results) in enumerate(runs, 1):
        for backend, res in results.items():
            appends = res["appends"]
            assert isinstance(appends, dict)
            for batch, (ours, raw) in appends.items():
                lines.append(
                    f"| {n} | {cpu:.1f} | {backend} | {batch} | {ours:,.0f} | {raw:,.0f} "
                    f"| {ours / raw:.2f} |"
                )
    if len(runs) > 1:
        lines += [
            "",
            "| backend | events per transaction | median lagompy / raw | worst |",
            "| --- | ---: | ---: | ---: |",
        ]
        for backend, res in runs[0][1].items():
            appends = res["appends"]
            assert isinstance(appends, dict)
            for batch in appends:
                ratios = []
                for _, results in runs:
                    by_batch = results[backend]["appends"]
                    assert isinstance(by_batch, dict)
                    ours, raw = by_batch[batch]
                    ratios.append(ours / raw)
                lines.append(
                    f"| {backend} | {batch} | {statistics.median(ratios):.2f} | {min(ratios):.2f} |"
                )
    lines += [
        "",
        "Read by tag (events/s, pages of 1,000, in offset order). lagompy decodes every event into",
        "its dataclass; raw fetches the same rows without decoding.",
        "",
        "| run | CPU ms | backend | lagompy | raw | lagompy / raw |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for n, (cpu, results) in enumerate(runs, 1):
        for backend, res in results.items():
            ours, raw = res["reads"]  # type: ignore[misc]
            lines.append(
                f"| {n} | {cpu:.1f} | {backend} | {ours:,.0f} | {raw:,.0f} | {ours / raw:.2f} |"
            )
    lines += [
        "",
        "What lagompy does that the raw rows do not, in every transaction: the ordering fence",
        "(a transaction-level advisory lock, PostgreSQL), a check of every entity's expected",
        "sequence number (deletions included), the allocation of the offsets, the NOTIFY, and",
        "the encoding of every event: fixed costs per transaction plus an index probe per",
        "entity; the runtime's group commit exists to keep batches large. On PostgreSQL a batch",
        f"of fewer than {_PG_COPY_FROM} events is one call of the `lagompy_write` function, a",
        "transaction of its own (one round trip where raw's BEGIN, INSERT, COMMIT take three),",
        "so it can beat raw at one event per transaction; larger batches run a transaction that",
        "COPYs their events and replies. The issue's floor is 0.7 of the raw rate for 100-event",
        "batches on PostgreSQL.",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, print only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=5000, help="rows per round per contender")
    parser.add_argument("--runs", type=int, default=1, help="repeat everything this many times")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows, rounds = (1000, 3) if args.quick else (args.rows, args.rounds)
    runs: list[tuple[float, Results]] = []
    for n in range(args.runs):
        cpu = cpu_reference()
        print(f"run {n + 1}: CPU reference, sum(range(10**6)): {cpu:.1f} ms", flush=True)
        results: Results = {
            "PostgreSQL": await bench_postgres(rows, rounds),
            "SQLite": await bench_sqlite(rows, rounds),
        }
        runs.append((cpu, results))
    command = ".venv/bin/python bench/journal_bench.py" + (
        ""
        if (args.rows, args.rounds) == (5000, 7)
        else f" --rows {args.rows} --rounds {args.rounds}"
    )
    if args.runs != 1:
        command += f" --runs {args.runs}"
    text = render(runs, command)
    print(text)
    if not (args.quick or args.no_write):
        write_section("journal", "Journal: append and read throughput", text)


if __name__ == "__main__":
    asyncio.run(main())
