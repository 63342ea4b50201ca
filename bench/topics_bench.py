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
each between two readings of the floor's baseline (reading and decoding the same events, right
before and right after it: the ratio is over the mean of their times), with the CPU time per
message of both and the CPU reference: the form to profile
(``py-spy record -- .venv/bin/python bench/topics_bench.py --catch-up 5``) and to alternate
before/after runs with.
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
from typing import Any, NamedTuple

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


class Timed(NamedTuple):
    """One measured run: wall seconds and CPU seconds (user + system, every thread of the
    benchmark's process, and of the producing service's for a catch-up over HTTP)."""

    wall: float
    cpu: float


def process_cpu(pid: int | None = None) -> float:
    """CPU seconds so far of this process (every thread), or of process ``pid``."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def read_and_decode(journal: Journal) -> Timed:
    """Every event of the topic's tags read and decoded, page by page, one tag after the
    other (the floor's baseline)."""
    started, cpu = time.perf_counter(), time.process_time()
    for tag in contract_topic.tag.all_tags:
        after = 0
        while True:
            page = await journal.read_tag(tag, after_offset=after, limit=1000)
            after = page.last_offset
            if not page.full:
                break
    return Timed(time.perf_counter() - started, time.process_time() - cpu)


class Bracketed(NamedTuple):
    """A catch-up between two readings of the baseline (see :func:`bracketed`)."""

    catch_up: Timed
    before: Timed
    after: Timed
    events: int

    @property
    def rate(self) -> float:
        return self.events / self.catch_up.wall

    @property
    def baseline(self) -> float:
        """Events read and decoded per second: over the mean of the two readings' times."""
        return self.events / ((self.before.wall + self.after.wall) / 2)

    @property
    def ratio(self) -> float:
        return self.rate / self.baseline

    @property
    def cpu_us(self) -> tuple[float, float]:
        """CPU microseconds per message of the catch-up, and per event of the baseline (the
        mean of its two readings)."""
        decode = (self.before.cpu + self.after.cpu) / 2
        return self.catch_up.cpu / self.events * 1e6, decode / self.events * 1e6


async def bracketed(
    journal: Journal,
    settings: JournalSettings,
    transport: TopicTransport | None,
    events: int,
    producer: int | None = None,
) -> Bracketed:
    """A catch-up of a new group, with reading and decoding the same events right before and
    right after it, in the same process (``producer``: the producing service's pid, whose CPU
    time counts with the catch-up's)."""
    before = await read_and_decode(journal)
    cpu = process_cpu() + (process_cpu(producer) if producer else 0.0)
    wall = await catch_up(settings, transport, events)
    cpu = process_cpu() + (process_cpu(producer) if producer else 0.0) - cpu
    after = await read_and_decode(journal)
    return Bracketed(Timed(wall, cpu), before, after, events)


def describe(b: Bracketed) -> str:
    catch_up_us, decode_us = b.cpu_us
    return (
        f"catch-up {b.rate:,.0f} messages/s; read and decode before {b.events / b.before.wall:,.0f}"
        f", after {b.events / b.after.wall:,.0f} events/s: {b.ratio:.2f}; CPU {catch_up_us:.1f} "
        f"us per message against {decode_us:.1f} ({decode_us / catch_up_us:.2f})"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def producer_process(settings: JournalSettings) -> Iterator[tuple[str, int]]:
    """The producing service in a process of its own; yields its URL and pid."""
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
        yield url, popen.pid
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
    """Seconds from starting a new group's subscriber until it is caught up and closed."""
    group = f"catch-up-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    async with start_subscribers(
        [probe(group)], transport=transport, journal_settings=settings
    ) as subscribers:
        await subscribers.wait_until_caught_up(timeout=600)
    return time.perf_counter() - started


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
        with producer_process(settings) as (url, pid):
            # The HTTP subscriber keeps its positions in a database of its own.
            transports: dict[str, tuple[Any, JournalSettings, int | None]] = {
                "embedded (same database)": (lambda: None, settings, None),
                "HTTP (another process)": (lambda: HttpTransport(url), own, pid),
            }
            written = events
            for label, (make, database, producer) in transports.items():
                transport = make()
                b = await bracketed(storage.journal, database, transport, events, producer)
                print(f"[{name}] {label}: {describe(b)}", flush=True)
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
                rows.append({"backend": name, "transport": label, "bracket": b, "cpu": cpu, **r})
    return rows


async def catch_up_only(name: str, transport_name: str, events: int, times: int) -> None:
    """Write once, then ``times`` catch-ups of new groups over one transport, each between
    two readings of the baseline (see :func:`bracketed`), with the CPU reference."""
    async with journal_with_events(name, events) as (settings, own, storage, _):
        with contextlib.ExitStack() as stack:
            url, pid = "", None
            if transport_name == "http":
                url, pid = stack.enter_context(producer_process(settings))
            for _ in range(times):
                cpu = cpu_reference()
                transport = HttpTransport(url) if url else None
                b = await bracketed(
                    storage.journal, own if url else settings, transport, events, pid
                )
                if transport is not None:
                    await transport.close()
                print(
                    f"[{name}] {transport_name} {describe(b)}; CPU ref {cpu:.0f} ms, "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )


#: How the floor's ratio is measured (the table's text says it).
METHOD = (
    "Each catch-up (from starting the group's subscriber until it is caught up and closed) runs "
    "between two readings of its baseline, reading and decoding the same events from the "
    "journal, right before and right after it in the same process: the ratio is the catch-up's "
    "rate over the events divided by the mean of the two readings' times. The machine is shared "
    "and its load moves within seconds (the baseline read once per backend swung 2x between "
    "runs at the same CPU reference while its CPU time did not), so the CPU time per message "
    "is given too (user + system of every thread of the benchmark's process, plus the "
    "producing service's over HTTP), against the baseline's."
)

COLLECTORS = {
    True: "Both processes' collector is tuned as `lagompy run` tunes a service's once it has "
    "started (lagompy/_collector.py); reading and decoding, the baseline, runs in the same "
    "process.",
    False: "Python's default collector in both processes (`--default-gc`).",
}

HEADER = (
    "| run | backend | transport | catch-up (messages/s) | read and decode before / after "
    "(events/s) | ratio (floor 0.5) | CPU us per message: catch-up / read and decode "
    "| load (events/s) | lag p50 / p99 (floor p99 100 ms) | CPU ref |\n"
    "| ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def table_row(r: dict[str, Any]) -> str:
    b: Bracketed = r["bracket"]
    catch_up_us, decode_us = b.cpu_us
    return (
        f"| {r['run']} | {r['backend']} | {r['transport']} | {b.rate:,.0f} | "
        f"{b.events / b.before.wall:,.0f} / {b.events / b.after.wall:,.0f} | {b.ratio:.2f} | "
        f"{catch_up_us:.1f} / {decode_us:.1f} | {r['rate']:,.0f} | {r['p50']:.1f} / "
        f"{r['p99']:.1f} ms | {r['cpu']:.0f} ms |"
    )


async def main(quick: bool, write: bool, runs: int) -> None:
    events, seconds = (10_000, 3.0) if quick else (100_000, 10.0)
    rows = []
    for run in range(1, runs + 1):
        for name in ("postgres", "sqlite"):
            rows += [r | {"run": run} for r in await run_backend(name, events, seconds)]
    if not write:
        return
    table = "\n".join(table_row(r) for r in rows)
    flag = (" --quick" if quick else "") + (f" --runs {runs}" if runs > 1 else "")
    flag += "" if TUNED else " --default-gc"
    body = f"""Command: `.venv/bin/python bench/topics_bench.py{flag} --write`
({events:,} events for the catch-up; {seconds:g} s of load for the lag). The subscriber writes
nothing but its positions (one transaction per page of up to
{ReadSideSettings().max_batch:,} messages); the HTTP producer runs in a process of its own
(`lagompy run`), the subscriber in the benchmark's, with its positions in a database of its own
(another SQLite file, another PostgreSQL schema). {COLLECTORS[TUNED]}
{METHOD}
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
