"""Reading by offset in pages, and tailing the journal live (PostgreSQL LISTEN/NOTIFY, polling).

Every wait here is bounded: a tailer that misses its wake-up fails the test within seconds
instead of hanging it. The PostgreSQL tests give tailers a 30 s poll interval, so an event that
arrives within a second was delivered by a notification (or a reconnect), not by the poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_URL
from sqlalchemy import text

from examples.user_service.entity import NameChanged, UserEntity, UserRegistered
from lagompy import (
    AtomicWrite,
    ConfigurationError,
    EventEnvelope,
    JournalSettings,
    Storage,
    open_storage,
)
from lagompy.journal import (
    EventTailer,
    Journal,
    JournalNotifier,
    TailSettings,
    WakeReason,
    read_pages,
    tail,
)
from lagompy.journal._tailing import (
    SqliteWatcher,
    _JournalHead,
    _listen_connect_args,
    _notifiers,
)
from lagompy.sql import Database

REPO = Path(__file__).resolve().parent.parent
#: Long enough that an event seen within a second cannot have come from polling.
NEVER = 30.0


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    s = await open_storage(settings=journal_settings, entities=[UserEntity])
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def listen_name() -> str:
    """An application_name of our own, so concurrent test runs on the server do not count."""
    return f"lagompy-listen-test-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- helpers


def user_write(uid: str, n_events: int, tags: tuple[str, ...], expected: int = 0) -> AtomicWrite:
    events: list[object] = [] if expected else [UserRegistered(uid, uid, f"{uid}@x.org")]
    events += [NameChanged(uid, f"{uid}-{i}") for i in range(n_events - len(events))]
    return AtomicWrite("user", uid, expected, events, [tags] * len(events) if tags else [])


async def append_batch(journal: Journal, writes: Sequence[AtomicWrite]) -> list[int]:
    """Append in one transaction; the offsets written, in order."""
    offsets: list[int] = []
    for result in await journal.append(list(writes)):
        offsets += [e.offset for e in result.unwrap()]
    return offsets


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds, checking every few milliseconds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.005)


class Collector:
    """Runs ``async for`` over a tailer in a task, keeping what it yields."""

    def __init__(self, tailer: EventTailer) -> None:
        self.tailer = tailer
        self.seen: list[EventEnvelope[Any]] = []
        self.arrived: list[float] = []  # time.monotonic() at which each one arrived
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for envelope in self.tailer:
            self.seen.append(envelope)
            self.arrived.append(time.monotonic())

    @property
    def offsets(self) -> list[int]:
        return [e.offset for e in self.seen]

    async def until(self, count: int, timeout: float = 5.0) -> None:
        def done() -> bool:
            if self.task.done():
                self.task.result()  # raise what the tailer raised
                pytest.fail(f"the tailer stopped after {len(self.seen)} events")
            return len(self.seen) >= count

        await eventually(done, timeout, f"the tailer has {count} events (has {len(self.seen)})")

    async def idle(self, timeout: float = 5.0) -> None:
        """Until the tailer has read everything and waits."""
        await eventually(lambda: self.tailer.waiting, timeout, "the tailer waits")

    async def stop(self) -> None:
        await self.tailer.close()
        async with asyncio.timeout(5):
            await self.task  # close() ends the pending iteration


async def listen_connections(application_name: str) -> int:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
        )
    finally:
        await conn.close()


async def terminate_backend(pid: int) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


def gate_reconnects(notifier: JournalNotifier) -> asyncio.Event:
    """Make the notifier's next connection attempts wait until the returned event is set."""
    gate = asyncio.Event()
    original: Callable[[], Awaitable[Any]] = notifier._open_connection

    async def gated() -> Any:
        await gate.wait()
        return await original()

    notifier._open_connection = gated  # type: ignore[method-assign]
    return gate


async def expected_offsets(journal: Journal, tag: str | None = None) -> list[int]:
    if tag is None:
        return [e.offset for e in await journal.all_events(limit=100_000)]
    return [e.offset for e in await journal.events_by_tag(tag, limit=100_000)]


# --------------------------------------------------------------------------- reading in pages


async def test_read_pages_reads_everything_once_in_offset_order_and_stops(storage: Storage) -> None:
    j = storage.journal
    for n in range(7):
        await append_batch(j, [user_write(f"a{n}", 2, ("t1",)), user_write(f"b{n}", 1, ("t12",))])
    pages = [p async for p in read_pages(j, page_size=3)]
    assert [len(p) for p in pages] == [3] * 7  # 21 events; the empty last page is not yielded
    flat = [e.offset for p in pages for e in p]
    assert flat == await expected_offsets(j) and len(set(flat)) == 21

    t1 = [e async for p in read_pages(j, tag="t1", page_size=4) for e in p]
    assert [e.offset for e in t1] == await expected_offsets(j, "t1")
    assert len(t1) == 14 and all(e.tags == ("t1",) for e in t1)  # never "t12"

    later = [e async for p in read_pages(j, tag="t12", after_offset=t1[-1].offset) for e in p]
    assert [e.entity_id for e in later] == ["b6"]
    assert [p async for p in read_pages(j, tag="nope")] == []
    with pytest.raises(ValueError, match="page_size"):
        [p async for p in read_pages(j, page_size=0)]
    with pytest.raises(ValueError, match="after_offset"):
        tail(j, after_offset=-1)


async def test_a_page_is_decoded_with_the_collector_paused_and_each_event_keeps_its_tags(
    storage: Storage,
) -> None:
    """read_tag pauses the cyclic collector while it decodes a page (every envelope is built
    with it off, and it is on again after), leaves a collector the application turned off
    off, and gives every event its own tags although it reuses the tuple of a run of equal
    ones."""
    j = storage.journal
    tag_sets = [("t1",), ("t1",), ("t1", "x"), ("t1",), ("t1", "y"), ("t1", "y"), ("t1",)]
    await append_batch(j, [user_write(f"g{i}", 1, tags) for i, tags in enumerate(tag_sets)])
    decode = j._envelope
    collecting: list[bool] = []

    def watched(*row: Any) -> Any:
        collecting.append(gc.isenabled())
        return decode(*row)

    j._envelope = watched  # type: ignore[method-assign,assignment]
    try:
        page = await j.read_tag("t1", limit=100)
        assert [e.tags for e in page.envelopes] == tag_sets
        assert collecting == [False] * len(tag_sets) and gc.isenabled()
        gc.disable()
        try:
            await j.read_tag("t1", limit=100)
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        del j._envelope
    assert [e.tags for e in (await j.read_tag("x", limit=100)).envelopes] == [("t1", "x")]


async def test_a_page_is_read_as_plain_tuples_or_rows_where_sqlalchemy_lacks_them(
    storage: Storage,
) -> None:
    """read_tag takes a page's rows as processed tuples (no Row each), or ``all()`` of a
    result without ``_raw_all_tuples``: the same values either way."""
    from sqlalchemy import select

    from lagompy.journal._journal import _tuples
    from lagompy.sql import _schema as schema

    j = storage.journal
    await append_batch(j, [user_write("p0", 2, ("t1",))])
    stmt = select(schema.events.c.global_offset, schema.events.c.payload).order_by(
        schema.events.c.global_offset
    )
    async with j.database.read() as conn:
        fast = _tuples(await conn.execute(stmt))
        rows = (await conn.execute(stmt)).all()

    class Old:
        def all(self) -> list[Any]:
            return list(rows)

    assert all(type(r) is tuple for r in fast)
    assert (
        [tuple(r) for r in fast] == [tuple(r) for r in rows] == [tuple(r) for r in _tuples(Old())]
    )
    assert len(rows) == 2 and isinstance(rows[0][1], bytes)


# --------------------------------------------------------------------------- tailing


async def test_tailers_see_every_event_once_in_offset_order_across_many_pages(
    storage: Storage,
) -> None:
    j = storage.journal
    await append_batch(j, [user_write(f"pre{n}", 2, ("t1",)) for n in range(4)])  # 8 events
    before_all = Collector(tail(j, page_size=3, poll_interval=0.02))
    before_t1 = Collector(tail(j, tag="t1", page_size=3, poll_interval=0.02))
    try:
        # Many small transactions, of mixed tags, while the tailers run.
        for n in range(20):
            tags = ("t1",) if n % 3 == 0 else ("t12",) if n % 3 == 1 else ()
            await append_batch(j, [user_write(f"u{n}", 1 + n % 4, tags)])
            if n % 5 == 0:
                await asyncio.sleep(0)
        all_offsets = await expected_offsets(j)
        t1_offsets = await expected_offsets(j, "t1")
        after_all = Collector(tail(j, page_size=3, poll_interval=0.02))
        after_t1 = Collector(tail(j, tag="t1", page_size=3, poll_interval=0.02))
        for c, want in [
            (before_all, all_offsets),
            (before_t1, t1_offsets),
            (after_all, all_offsets),
            (after_t1, t1_offsets),
        ]:
            await c.until(len(want))
            await c.idle()
            assert c.offsets == want  # each once, in offset order, nothing more
            assert c.tailer.offset == want[-1]
            assert c.tailer.events_yielded == len(want)
        assert all("t1" in e.tags for e in before_t1.seen)
        assert after_all.tailer.pages_read >= len(all_offsets) // 3
        for c in (after_all, after_t1):
            await c.stop()
    finally:
        for c in (before_all, before_t1):
            await c.stop()


async def test_concurrent_writers_committing_in_any_order_skip_nothing(storage: Storage) -> None:
    """Invariant 3 end to end: writers race, tailers by offset still see everything once."""
    j = storage.journal
    tailers = [
        Collector(tail(j, page_size=3, poll_interval=0.01)),
        Collector(tail(j, tag="even", page_size=3, poll_interval=0.01)),
    ]

    async def writer(w: int) -> None:
        for n in range(15):
            await append_batch(j, [user_write(f"c{w}-{n}", 1 + n % 3, ("even",) if w % 2 else ())])

    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(writer(w) for w in range(4)))
        wanted = [await expected_offsets(j), await expected_offsets(j, "even")]
        for c, want in zip(tailers, wanted, strict=True):
            await c.until(len(want))
            await c.idle()
            assert c.offsets == want
    finally:
        for c in tailers:
            await c.stop()


async def test_a_tailer_resumes_after_its_offset(storage: Storage) -> None:
    j = storage.journal
    offsets = await append_batch(j, [user_write("r", 5, ("t1",))])
    async with tail(j, tag="t1", page_size=2, poll_interval=0.02) as tailer:
        seen = []
        async for envelope in tailer:
            seen.append(envelope.offset)
            if len(seen) == 2:
                break
        assert tailer.offset == offsets[1]
    async with tail(j, tag="t1", after_offset=tailer.offset, poll_interval=0.02) as resumed:
        c = Collector(resumed)
        await c.until(3)
        await c.idle()
        assert c.offsets == offsets[2:]
        await c.stop()
    assert await anext(resumed, None) is None  # closed: the iteration is over


async def test_close_from_another_task_ends_a_waiting_iteration(storage: Storage) -> None:
    tailer = tail(storage.journal, poll_interval=NEVER, listen_poll_interval=NEVER)
    c = Collector(tailer)
    await c.idle()
    started = time.monotonic()
    await c.stop()
    assert time.monotonic() - started < 1.0 and c.seen == []
    assert tailer.closed and tailer.notifier is None


async def test_wake_makes_a_tailer_query_now(storage: Storage) -> None:
    # No LISTEN, no watch, no polling to speak of: only wake() can end its wait.
    off = TailSettings(listen=False, sqlite_watch_interval=0, poll_interval=NEVER)
    tailer = tail(storage.journal, settings=off)
    c = Collector(tailer)
    try:
        await c.idle()
        await append_batch(storage.journal, [user_write("w", 1, ())])
        tailer.wake()
        await c.until(1, timeout=2.0)
        assert tailer.notify_wakeups == 1 and tailer.poll_wakeups == 0
    finally:
        await c.stop()


async def test_a_tailer_sees_events_another_process_appends(
    journal_settings: JournalSettings, tmp_path: Path
) -> None:
    """Woken, not polling: on PostgreSQL by the other process's NOTIFY, on SQLite by the
    process's watch of the -wal file."""
    postgres = journal_settings.url.startswith("postgresql")
    async with await open_storage(settings=journal_settings, entities=[UserEntity]) as s:
        tailer = tail(s.journal, tag="t1", poll_interval=NEVER, listen_poll_interval=NEVER)
        await tailer.start()
        c = Collector(tailer)
        try:
            if postgres:
                assert tailer.notifier is not None
                assert await tailer.notifier.wait_connected(5)
            await c.idle()
            code = (
                "import asyncio\n"
                "from lagompy import AtomicWrite, open_storage\n"
                "from examples.user_service.entity import UserEntity, UserRegistered\n"
                "async def main():\n"
                "    async with await open_storage(entities=[UserEntity]) as s:\n"
                "        for n in range(5):\n"
                "            uid = f'p{n}'\n"
                "            ev = UserRegistered(uid, uid, uid + '@x.org')\n"
                "            w = AtomicWrite('user', uid, 0, [ev], [('t1',)])\n"
                "            await s.journal.append_one(w)\n"
                "asyncio.run(main())\n"
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("LAGOMPY_")}
            env["LAGOMPY_JOURNAL_URL"] = journal_settings.url
            if journal_settings.postgres_schema:
                env["LAGOMPY_JOURNAL_POSTGRES_SCHEMA"] = journal_settings.postgres_schema
            env["PYTHONPATH"] = str(REPO)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                async with asyncio.timeout(8):
                    _, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, err.decode()
            await c.until(5)
            assert [e.entity_id for e in c.seen] == [f"p{n}" for n in range(5)]
            assert c.offsets == await expected_offsets(s.journal, "t1")
            assert tailer.poll_wakeups == 0 and tailer.notify_wakeups >= 1
            assert isinstance(tailer.notifier, JournalNotifier if postgres else SqliteWatcher)
        finally:
            await c.stop()


async def test_the_sqlite_watch_wakes_tailers_within_milliseconds_and_can_be_off(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'watched.db'}"
    async with await open_storage(url, entities=[UserEntity]) as storage:
        first = tail(storage.journal, poll_interval=NEVER)
        second = tail(storage.journal, poll_interval=NEVER)
        async with first, second:
            assert isinstance(first.notifier, SqliteWatcher)
            assert first.notifier is second.notifier  # one watch per process and file
            assert first.notifier.references == 2
            c = Collector(first)
            latencies = []
            for n in range(5):
                await c.idle()
                started = time.monotonic()
                await append_batch(storage.journal, [user_write(f"s{n}", 1, ())])
                await c.until(n + 1, timeout=2.0)
                latencies.append(c.arrived[-1] - started)
            print("sqlite watch latencies (ms):", [round(x * 1000, 1) for x in latencies])
            assert max(latencies) < 1.0, latencies
            assert first.notify_wakeups >= 5 and first.poll_wakeups == 0
            watcher = first.notifier
            await c.stop()
        assert watcher.references == 0 and not [k for k in _notifiers if "watched.db" in k[1]]
        # Off: nothing watches, the tailer polls.
        off = TailSettings(sqlite_watch_interval=0, poll_interval=0.05)
        polling = tail(storage.journal, settings=off)
        async with polling:
            assert polling.notifier is None
            c = Collector(polling)
            await c.idle()
            await append_batch(storage.journal, [user_write("q", 1, ())])
            await c.until(1, timeout=2.0)
            assert polling.notify_wakeups == 0  # found by its poll
            await c.stop()


async def test_the_sqlite_watch_wakes_tailers_for_new_events_not_for_other_writes(
    tmp_path: Path,
) -> None:
    """Lease renewals, membership heartbeats and projections write the same file as the
    journal: the watch sees the file change, finds the journal's highest offset where it was,
    and wakes nobody (each wake-up is a query per tailer); a new event still wakes them at
    once."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    async with await open_storage(url, entities=[UserEntity]) as storage:
        db = storage.journal.database
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE other_rows (n INTEGER)"))
        first = tail(storage.journal, poll_interval=NEVER)
        second = tail(storage.journal, poll_interval=NEVER)
        async with first, second:
            c, d = Collector(first), Collector(second)
            await c.idle()
            await d.idle()
            watcher = first.notifier
            assert isinstance(watcher, SqliteWatcher)
            pages, woken = first.pages_read + second.pages_read, watcher.notifications
            for n in range(10):
                async with db.write() as conn:
                    await conn.execute(text("INSERT INTO other_rows VALUES (:n)"), {"n": n})
                await asyncio.sleep(0.03)  # a few looks of the watch apart
            await asyncio.sleep(0.3)  # longer than it keeps looking after a change
            assert watcher.other_writes >= 5  # it saw the file change...
            assert watcher.notifications == woken  # ... and woke nobody
            assert first.pages_read + second.pages_read == pages
            assert first.notify_wakeups == second.notify_wakeups == 0
            started = time.monotonic()
            await append_batch(storage.journal, [user_write("e", 1, ())])
            await c.until(1, timeout=2.0)
            await d.until(1, timeout=2.0)
            assert c.arrived[0] - started < 1.0 and d.arrived[0] - started < 1.0
            assert first.notify_wakeups == second.notify_wakeups == 1
            await c.stop()
            await d.stop()


async def test_the_sqlite_watch_wakes_only_the_tailers_of_the_tags_written(
    tmp_path: Path,
) -> None:
    """As a PostgreSQL notification names its tags: a new event wakes the tailers of its tags
    and those of every event, never a tailer of another tag (which would query for nothing);
    each still sees all of its own events."""
    url = f"sqlite:///{tmp_path / 'tags.db'}"
    async with await open_storage(url, entities=[UserEntity]) as storage:
        a = tail(storage.journal, tag="a", poll_interval=NEVER)
        b = tail(storage.journal, tag="b", poll_interval=NEVER)
        every = tail(storage.journal, poll_interval=NEVER)
        async with a, b, every:
            ca, cb, ce = Collector(a), Collector(b), Collector(every)
            for c in (ca, cb, ce):
                await c.idle()
            watcher = a.notifier
            assert isinstance(watcher, SqliteWatcher)
            for n in range(5):
                await append_batch(storage.journal, [user_write(f"a{n}", 1, ("a",))])
                await ca.until(n + 1, timeout=2.0)
                await ce.until(n + 1, timeout=2.0)
            await append_batch(storage.journal, [user_write("none", 1, ())])  # no tag
            await ce.until(6, timeout=2.0)
            await asyncio.sleep(0.1)
            assert b.notify_wakeups == 0 and cb.seen == []  # never woken for a's events
            assert a.notify_wakeups >= 5 and every.notify_wakeups >= 6
            assert watcher.notifications_skipped >= 6
            await append_batch(storage.journal, [user_write("ab", 1, ("a", "b"))])
            await cb.until(1, timeout=2.0)
            await ca.until(6, timeout=2.0)
            assert b.notify_wakeups == 1 and b.poll_wakeups == 0
            for c in (ca, cb, ce):
                await c.stop()


async def test_the_sqlite_watch_wakes_on_any_write_where_it_cannot_read_a_journal(
    tmp_path: Path,
) -> None:
    """A file with no journal in it (yet): the highest offset cannot be read, so every change
    of the file wakes the subscribers, as a change of the journal would."""
    db = Database.create(JournalSettings(url=f"sqlite:///{tmp_path / 'bare.db'}"))
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE other_rows (n INTEGER)"))
        watcher = await SqliteWatcher.acquire_file(db)
        woken: list[WakeReason] = []
        subscription = watcher.subscribe(woken.append)
        try:
            await asyncio.sleep(0.05)
            async with db.write() as conn:
                await conn.execute(text("INSERT INTO other_rows VALUES (1)"))
            await eventually(lambda: bool(woken), 2.0, "the watch wakes its subscriber")
            assert woken[0] is WakeReason.NOTIFICATION and watcher.other_writes == 0
        finally:
            subscription.close()
            await watcher.release()
    finally:
        await db.dispose()


def test_the_sqlite_watch_reads_the_head_of_the_file_now_at_its_path(tmp_path: Path) -> None:
    """The watch's connection follows the path: a file replaced there (a test's fresh
    database) is read, not the deleted one the connection still held open."""
    path = str(tmp_path / "replaced.db")

    def make(rows: int) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE lagompy_events (global_offset INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO lagompy_events VALUES (?)", [(n + 1,) for n in range(rows)])
        conn.commit()
        conn.close()

    head = _JournalHead(path)
    try:
        assert head.read() is None  # no file yet (and none created)
        assert not os.path.exists(path)
        make(3)
        assert head.read() == 3
        make(5)
        assert head.read() == 5
    finally:
        head.close()


# --------------------------------------------------------------------------- PostgreSQL LISTEN


@pytest.mark.postgres
async def test_notify_wakes_a_tailer_within_milliseconds(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    settings = TailSettings(application_name=listen_name)
    tailer = tail(
        storage.journal, settings=settings, poll_interval=NEVER, listen_poll_interval=NEVER
    )
    async with tailer:
        assert tailer.notifier is not None
        assert await tailer.notifier.wait_connected(5)
        c = Collector(tailer)
        latencies = []
        for n in range(5):
            await c.idle()
            started = time.monotonic()
            await append_batch(storage.journal, [user_write(f"l{n}", 1, ())])
            await c.until(n + 1, timeout=2.0)
            latencies.append(c.arrived[-1] - started)
        print("notify latencies (ms):", [round(x * 1000, 1) for x in latencies])
        assert max(latencies) < 1.0, latencies
        assert tailer.notify_wakeups >= 5 and tailer.poll_wakeups == 0
        assert tailer.notifier.notifications >= 5
        assert tailer.notifier.last_payload is not None
        # The channel is database-wide: the last payload may be another schema's journal's
        # (a test running beside this one), whose tags follow its offset on lines of their own.
        assert int(tailer.notifier.last_payload.partition("\n")[0]) >= 1
        await c.stop()


@pytest.mark.postgres
async def test_one_listen_connection_per_process_released_with_the_last_tailer(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    settings = TailSettings(application_name=listen_name)
    # A second Storage (its own engine and pool) on the same database shares the notifier.
    other = await open_storage(settings=pg_storage.database.settings, entities=[UserEntity])
    tailers = [
        tail(storage.journal, settings=settings),
        tail(storage.journal, tag="t1", settings=settings),
        tail(storage.journal, tag="t2", settings=settings),
        tail(other.journal, settings=settings),
    ]
    try:
        for t in tailers:
            await t.start()
        notifiers = {id(t.notifier) for t in tailers}
        assert len(notifiers) == 1
        notifier = tailers[0].notifier
        assert notifier is not None and notifier.references == 4
        assert await notifier.wait_connected(5)
        assert await listen_connections(listen_name) == 1
        collectors = [Collector(t) for t in tailers]
        await append_batch(storage.journal, [user_write("f", 2, ("t1",))])
        for c, n in zip(collectors, [2, 2, 0, 2], strict=True):
            await c.until(n, timeout=2.0)
        assert await listen_connections(listen_name) == 1
        for c in collectors[:-1]:
            await c.stop()
        assert notifier.references == 1 and notifier.connected
        await collectors[-1].stop()
        assert notifier.references == 0 and not notifier.connected
        assert all(k[1] != notifier._key for k in _notifiers)
        deadline = time.monotonic() + 5
        while await listen_connections(listen_name) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await listen_connections(listen_name) == 0
    finally:
        for t in tailers:
            await t.close()
        await other.close()


@pytest.mark.postgres
async def test_an_unclosed_tailer_gives_its_listen_reference_back_when_collected(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    await append_batch(storage.journal, [user_write("g", 3, ())])
    tailer = tail(storage.journal, settings=TailSettings(application_name=listen_name))
    async for _ in tailer:
        break  # left without close()
    notifier = tailer.notifier
    assert notifier is not None and notifier.references == 1
    del tailer
    gc.collect()
    await eventually(lambda: notifier.references == 0 and notifier._task is None, 5, "released")
    deadline = time.monotonic() + 5
    while await listen_connections(listen_name) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await listen_connections(listen_name) == 0


@pytest.mark.postgres
async def test_after_the_listen_connection_is_killed_a_reconnect_delivers_what_was_missed(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    j = storage.journal
    settings = TailSettings(application_name=listen_name)
    tailer = tail(
        j, page_size=3, settings=settings, poll_interval=NEVER, listen_poll_interval=NEVER
    )
    async with tailer:
        notifier = tailer.notifier
        assert notifier is not None and await notifier.wait_connected(5)
        c = Collector(tailer)
        first = await append_batch(j, [user_write(f"k{n}", 2, ()) for n in range(2)])
        await c.until(len(first), timeout=2.0)

        # The server kills the LISTEN connection; reconnecting is held back until we say so.
        gate = gate_reconnects(notifier)
        old_pid = notifier.backend_pid
        assert old_pid is not None
        await c.idle()
        pages = tailer.pages_read
        await terminate_backend(old_pid)
        await eventually(lambda: not notifier.connected, 2, "the notifier saw the loss")
        # The loss woke the tailer (to poll from now on); let it re-query and wait again.
        await eventually(
            lambda: tailer.reconnect_wakeups == 1 and tailer.pages_read > pages and tailer.waiting,
            2,
            "the tailer re-queried after the loss",
        )

        # Committed while nobody listens: these notifications are lost for us.
        missed = []
        for n in range(3):
            missed += await append_batch(j, [user_write(f"m{n}", 3, ())])
        assert len(c.seen) == len(first)

        gate.set()
        await c.until(len(first) + len(missed), timeout=3.0)  # the reconnect's re-query
        assert notifier.connected and notifier.connects == 2 and notifier.disconnects == 1
        assert notifier.backend_pid not in (None, old_pid)
        assert tailer.reconnect_wakeups >= 2 and tailer.poll_wakeups == 0

        # And notifications flow again on the new connection.
        await c.idle()
        last = await append_batch(j, [user_write("z", 1, ())])
        await c.until(len(first) + len(missed) + 1, timeout=2.0)
        assert c.offsets == first + missed + last == await expected_offsets(j)
        assert await listen_connections(listen_name) == 1
        await c.stop()


@pytest.mark.postgres
async def test_while_the_listen_connection_is_down_tailers_poll(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    settings = TailSettings(application_name=listen_name)
    tailer = tail(
        storage.journal, settings=settings, poll_interval=0.05, listen_poll_interval=NEVER
    )
    async with tailer:
        notifier = tailer.notifier
        assert notifier is not None and await notifier.wait_connected(5)
        c = Collector(tailer)
        gate = gate_reconnects(notifier)
        assert notifier.backend_pid is not None
        await terminate_backend(notifier.backend_pid)
        await eventually(lambda: not notifier.connected, 2, "the notifier saw the loss")
        offsets = await append_batch(storage.journal, [user_write("p", 2, ())])
        await c.until(2, timeout=2.0)
        assert not notifier.connected and tailer.poll_wakeups >= 1
        assert c.offsets == offsets
        gate.set()
        assert await notifier.wait_connected(5)
        await c.stop()


@pytest.mark.postgres
async def test_a_silent_dead_listen_connection_fails_its_health_check_and_is_replaced(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    settings = TailSettings(
        application_name=listen_name, health_check_interval=0.1, listen_timeout=0.3
    )
    tailer = tail(
        storage.journal, settings=settings, poll_interval=NEVER, listen_poll_interval=NEVER
    )
    async with tailer:
        notifier = tailer.notifier
        assert notifier is not None and await notifier.wait_connected(5)
        c = Collector(tailer)
        await c.idle()
        # The connection stays open but nothing it receives is read any more: no termination
        # callback fires, only the health check can notice.
        notifier._connection._transport.pause_reading()
        await eventually(lambda: notifier.connects >= 2, 5, "the notifier reconnected")
        assert notifier.disconnects == 1
        await c.idle()
        offsets = await append_batch(storage.journal, [user_write("h", 1, ())])
        await c.until(1, timeout=2.0)
        assert c.offsets == offsets and tailer.poll_wakeups == 0
        await c.stop()


@pytest.mark.postgres
async def test_listen_off_polls_without_a_listen_connection(
    pg_storage: Storage, listen_name: str
) -> None:
    storage = pg_storage
    settings = TailSettings(listen=False, poll_interval=0.05, application_name=listen_name)
    async with tail(storage.journal, settings=settings) as tailer:
        c = Collector(tailer)
        await c.idle()
        offsets = await append_batch(storage.journal, [user_write("o", 1, ())])
        await c.until(1, timeout=2.0)
        assert c.offsets == offsets and tailer.notifier is None and tailer.poll_wakeups >= 1
        assert await listen_connections(listen_name) == 0
        await c.stop()


# --------------------------------------------------------------------------- configuration


async def test_the_notifier_refuses_sqlite(tmp_path: Path) -> None:
    db = Database.create(JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}"))
    try:
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            await JournalNotifier.acquire(db)
    finally:
        await db.dispose()


async def test_listen_connect_args_keep_password_and_query_parameters() -> None:
    url = "postgresql://app:p%40ss%2Fw%3Ard@db.example.org:6543/events?ssl=require"
    db = Database.create(JournalSettings(url=url + "&prepared_statement_cache_size=0"))
    try:
        args = _listen_connect_args(db, TailSettings(application_name="x", listen_timeout=2))
    finally:
        await db.dispose()
    assert args == {
        "host": "db.example.org",
        "port": 6543,
        "user": "app",
        "password": "p@ss/w:rd",
        "database": "events",
        "ssl": "require",
        "server_settings": {"application_name": "x"},
        "timeout": 2,
    }


def test_tail_settings_from_environment_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAGOMPY_TAIL_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("LAGOMPY_TAIL_LISTEN", "false")
    s = TailSettings()
    assert s.poll_interval == 0.25 and s.listen is False
    assert s.listen_poll_interval == 2.0 and s.page_size == 500
    assert TailSettings(poll_interval=1).poll_interval == 1
    with pytest.raises(ValueError, match="reconnect_max_delay"):
        TailSettings(reconnect_initial_delay=2, reconnect_max_delay=1)
    with pytest.raises(ValueError):
        TailSettings(page_size=0)
