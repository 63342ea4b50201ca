"""Topics benchmark, for each embedded transport (same database; HTTP from a producing service
in another process), on PostgreSQL and SQLite:

* catch-up of a new group over the messages of 100,000 journal events (a subscriber that
  writes nothing but its positions), beside reading and decoding the same events from the
  journal in the same run (the issue's floor: >= 0.5 of it);
* lag from commit to handled under 2,000 events/s of live load (floor: p99 <= 100 ms). The
  lag of a message is the time its handler ran minus its event's timestamp (the write
  transaction's clock, taken just before its commit).

Default settings (``ReadSideSettings()``: 1,000 messages per page and transaction). The
subscriber runs in the benchmark's process as a service's subscribers run in the process that
``lagompy run`` serves: with the collector tuned once the service has started
(``tune_collector``, lagompy/_collector.py; ``--default-gc`` leaves Python's, here and in the
producing service's process).

    .venv/bin/python bench/topics_bench.py                 # prints
    .venv/bin/python bench/topics_bench.py --write         # also writes docs/benchmarks.md
    .venv/bin/python bench/topics_bench.py --quick         # 10,000 events, 3 s of load
    .venv/bin/python bench/topics_bench.py --runs 3        # three runs, one table
    .venv/bin/python bench/topics_bench.py --catch-up 3 --backend sqlite --transport embedded

``--catch-up N`` writes the events once, then runs N catch-ups of new groups over one transport,
each after reading and decoding the journal (the floor's baseline) and the CPU reference: the
form to profile (``py-spy record -- .venv/bin/python bench/topics_bench.py --catch-up 5``) and
to alternate before/after runs with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy.ext.asyncio import AsyncConnection

from bench._report import cpu_reference, write_section
from lagompy import AtomicWrite, JournalSettings, open_storage
from lagompy._collector import tune_collector
from lagompy.journal import Journal, Storage
from lagompy.readside import ReadSideSettings
from lagompy.serialization import Serializer
from lagompy.testkit.topics import ContractAccount, Deposit, Deposited, contract_topic
from lagompy.topic import (
    HttpTransport,
    Message,
    StartFrom,
    Subscriber,
    TopicTransport,
    start_subscribers,
)

PG_URL = os.environ.get("LAGOMPY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parent.parent
ACCOUNTS = 1000
#: The subscriber's and the producing service's collector as `lagompy run` tunes it (see the
#: module's docstring); --default-gc: Python's.
TUNED = True


class Probe(Subscriber[Deposit]):
    """Writes nothing but its positions; records the lag of each message when asked."""

    topic = contract_topic
    lags: list[float] | None = None

    async def handle(self, conn: AsyncConnection, message: Message[Deposit]) -> None:
        if self.lags is not None:
            self.lags.append(time.time() - message.timestamp.timestamp())


def probe(group: str, *, start: StartFrom | None = None, record: bool = False) -> Probe:
    cls = type(
        "Probe_" + group.replace("-", "_"),
        (Probe,),
        {"group": group, "start_from": start or StartFrom.earliest()},
    )
    instance: Probe = cls()
    instance.lags = [] if record else None
    return instance


def serializer() -> Serializer:
    from lagompy.journal import serializer_for

    s = serializer_for([ContractAccount])
    s.register(Deposit)
    return s


class Writer:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.seq: dict[str, int] = {}

    async def append(self, first: int, count: int) -> None:
        by_account: dict[str, list[Any]] = {}
        for i in range(first, first + count):
            account = f"acct-{i % ACCOUNTS}"
            by_account.setdefault(account, []).append(Deposited(account, i))
        writes = []
        for account, events in by_account.items():
            seq = self.seq.get(account, 0)
            tag = contract_topic.tag.for_entity(account)
            writes.append(
                AtomicWrite(ContractAccount.type_name, account, seq, events, [(tag,)] * len(events))
            )
            self.seq[account] = seq + len(events)
        for result in await self.journal.append(writes):
            result.unwrap()


async def read_and_decode(journal: Journal) -> float:
    started = time.perf_counter()
    total = 0
    for tag in contract_topic.tag.all_tags:
        after = 0
        while True:
            page = await journal.read_tag(tag, after_offset=after, limit=1000)
            total += len(page.envelopes)
            after = page.last_offset
            if not page.full:
                break
    return total / (time.perf_counter() - started)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def producer_process(settings: JournalSettings) -> Iterator[str]:
    """The producing service in a process of its own; yields its URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAGOMPY_")}
    env["LAGOMPY_JOURNAL_URL"] = settings.url
    if settings.postgres_schema:
        env["LAGOMPY_JOURNAL_POSTGRES_SCHEMA"] = settings.postgres_schema
    env["PYTHONPATH"] = str(REPO)
    env["LAGOMPY_RUN_COLLECTOR"] = "tuned" if TUNED else "default"
    command = [sys.executable, "-m", "lagompy", "run", "bench._topics_app:app"]
    popen = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"], env=env, cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or popen.poll() is not None:
                raise RuntimeError("the producing service did not start")
            time.sleep(0.1)
        yield url
    finally:
        popen.terminate()
        popen.wait(30)


@contextlib.asynccontextmanager
async def backend(name: str, tmp: Path, file: str = "topics.db") -> AsyncIterator[JournalSettings]:
    """A fresh database of the backend: a SQLite file, or a PostgreSQL schema."""
    if name == "sqlite":
        yield JournalSettings(url=f"sqlite:///{tmp / file}", auto_migrate=True)
        return
    schema = f"bench_topics_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    try:
        yield JournalSettings(url=PG_URL, postgres_schema=schema, auto_migrate=True)
    finally:
        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def catch_up(
    settings: JournalSettings, transport: TopicTransport | None, events: int
) -> float:
    group = f"catch-up-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    async with start_subscribers(
        [probe(group)], transport=transport, journal_settings=settings
    ) as subscribers:
        await subscribers.wait_until_caught_up(timeout=600)
    return events / (time.perf_counter() - started)


async def lag(
    settings: JournalSettings,
    writer: Writer,
    transport: TopicTransport | None,
    first: int,
    seconds: float,
    rate: int,
) -> dict[str, float]:
    group = f"lag-{uuid.uuid4().hex[:6]}"
    subscriber = probe(group, start=StartFrom.latest(), record=True)
    tick, per_tick = 0.01, max(1, rate // 100)
    async with start_subscribers(
        [subscriber], transport=transport, journal_settings=settings
    ) as subscribers:
        await subscribers.wait_until_caught_up(timeout=60)
        started = time.perf_counter()
        written = 0
        while time.perf_counter() - started < seconds:
            await writer.append(first + written, per_tick)
            written += per_tick
            delay = started + written / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        achieved = written / (time.perf_counter() - started)
        await subscribers.wait_until_caught_up(timeout=60)
    lags = sorted(subscriber.lags or [])
    return {
        "rate": achieved,
        "events": len(lags),
        "p50": lags[len(lags) // 2] * 1000,
        "p99": lags[int(len(lags) * 0.99)] * 1000,
        "max": lags[-1] * 1000,
        "tick": tick,
    }


@contextlib.asynccontextmanager
async def journal_with_events(
    name: str, events: int
) -> AsyncIterator[tuple[JournalSettings, JournalSettings, Storage, Writer]]:
    """A backend's journal with ``events`` written (the settings of the journal and of the
    subscriber's own database, the open storage, its writer), the collector then tuned as
    `lagompy run` tunes a service's process once it has started (unless --default-gc)."""
    with tempfile.TemporaryDirectory(prefix="lagompy-bench-") as tmp:
        async with (
            backend(name, Path(tmp)) as settings,
            backend(name, Path(tmp), "subscriber.db") as own,
        ):
            async with await open_storage(settings=settings, serializer=serializer()) as storage:
                writer = Writer(storage.journal)
                for first in range(0, events, 1000):
                    await writer.append(first, min(1000, events - first))
                print(f"[{name}] {events:,} events written", flush=True)
                if TUNED:
                    tune_collector()
                yield settings, own, storage, writer


async def run_backend(name: str, events: int, seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with journal_with_events(name, events) as (settings, own, storage, writer):
        cpu = cpu_reference()
        print(f"[{name}] CPU reference {cpu:.0f} ms", flush=True)
        baseline = await read_and_decode(storage.journal)
        print(f"[{name}] read and decode: {baseline:,.0f} events/s", flush=True)
        with producer_process(settings) as url:
            # The HTTP subscriber keeps its positions in a database of its own.
            transports: dict[str, tuple[Any, JournalSettings]] = {
                "embedded (same database)": (lambda: None, settings),
                "HTTP (another process)": (lambda: HttpTransport(url), own),
            }
            written = events
            for label, (make, database) in transports.items():
                transport = make()
                rate = await catch_up(database, transport, events)
                print(
                    f"[{name}] {label}: catch-up {rate:,.0f} messages/s, "
                    f"{rate / baseline:.2f} of read and decode",
                    flush=True,
                )
                if transport is not None:
                    await transport.close()
                transport = make()
                r = await lag(database, writer, transport, written, seconds, 2000)
                written += int(r["rate"] * seconds) + 100
                if transport is not None:
                    await transport.close()
                print(
                    f"[{name}] {label}: lag at {r['rate']:,.0f} events/s: "
                    f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms "
                    f"({r['events']:,} messages)",
                    flush=True,
                )
                rows.append(
                    {
                        "backend": name,
                        "transport": label,
                        "baseline": baseline,
                        "catch_up": rate,
                        "cpu": cpu,
                        **r,
                    }
                )
    return rows


async def catch_up_only(name: str, transport_name: str, events: int, times: int) -> None:
    """Write once, then ``times`` catch-ups of new groups over one transport, each beside
    reading and decoding the same events (the floor's ratio) and the CPU reference."""
    async with journal_with_events(name, events) as (settings, own, storage, _):
        with contextlib.ExitStack() as stack:
            url = ""
            if transport_name == "http":
                url = stack.enter_context(producer_process(settings))
            for _ in range(times):
                cpu = cpu_reference()
                decode = await read_and_decode(storage.journal)
                transport = HttpTransport(url) if url else None
                caught = await catch_up(own if url else settings, transport, events)
                if transport is not None:
                    await transport.close()
                print(
                    f"[{name}] {transport_name} catch-up {caught:,.0f} messages/s, read "
                    f"and decode {decode:,.0f} events/s: {caught / decode:.2f}; "
                    f"CPU ref {cpu:.0f} ms",
                    flush=True,
                )


COLLECTORS = {
    True: "Both processes' collector is tuned as `lagompy run` tunes a service's once it has "
    "started (lagompy/_collector.py); reading and decoding, the baseline, runs in the same "
    "process.",
    False: "Python's default collector in both processes (`--default-gc`).",
}

HEADER = (
    "| run | backend | transport | catch-up (messages/s) | read and decode (events/s) "
    "| ratio (floor 0.5) | load (events/s) | lag p50 / p99 (floor p99 100 ms) | CPU ref |\n"
    "| ---: | --- | --- | --- | --- | --- | --- | --- | --- |"
)


async def main(quick: bool, write: bool, runs: int) -> None:
    events, seconds = (10_000, 3.0) if quick else (100_000, 10.0)
    rows = []
    for run in range(1, runs + 1):
        for name in ("postgres", "sqlite"):
            rows += [r | {"run": run} for r in await run_backend(name, events, seconds)]
    if not write:
        return
    table = "\n".join(
        f"| {r['run']} | {r['backend']} | {r['transport']} | {r['catch_up']:,.0f} | "
        f"{r['baseline']:,.0f} | "
        f"{r['catch_up'] / r['baseline']:.2f} | {r['rate']:,.0f} | {r['p50']:.1f} / "
        f"{r['p99']:.1f} ms | {r['cpu']:.0f} ms |"
        for r in rows
    )
    flag = (" --quick" if quick else "") + (f" --runs {runs}" if runs > 1 else "")
    flag += "" if TUNED else " --default-gc"
    body = f"""Command: `.venv/bin/python bench/topics_bench.py{flag} --write`
({events:,} events for the catch-up; {seconds:g} s of load for the lag). The subscriber writes
nothing but its positions (one transaction per page of up to
{ReadSideSettings().max_batch:,} messages); the HTTP producer runs in a process of its own
(`lagompy run`), the subscriber in the benchmark's, with its positions in a database of its own
(another SQLite file, another PostgreSQL schema). {COLLECTORS[TUNED]}
The lag of a message is the time its handler ran minus its event's timestamp. CPU ref:
`sum(range(10**6))`, best of 5, in ms, taken before each backend's runs (how busy the machine
was).

{HEADER}
{table}
"""
    write_section("topics", "Topics: catch-up and live lag, embedded transports", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--default-gc", action="store_true", help="Python's default collector")
    parser.add_argument("--catch-up", type=int, default=0, metavar="N")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--transport", choices=("embedded", "http"), default="embedded")
    args = parser.parse_args()
    TUNED = not args.default_gc
    if args.catch_up:
        events = 10_000 if args.quick else 100_000
        asyncio.run(catch_up_only(args.backend, args.transport, events, args.catch_up))
    else:
        asyncio.run(main(args.quick, args.write, args.runs))
