"""The event-consumer core: one tail loop and one set of tail settings for every consumer.

Read-side workers wait for new events with the journal's own tail machinery
(:class:`lagompy.journal.PageTailer`), configured by ``ReadSideSettings.tail``: turning LISTEN
off (``LAGOMPY_TAIL_LISTEN=0``, or the embedded setting) opens no LISTEN connection, and events
still arrive, by polling. And the core takes other commit strategies than the read side's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import POSTGRES_URL
from test_tailing import listen_connections

from lagompy import JournalSettings
from lagompy.consumer import CommitStrategy, EventConsumer, Lease
from lagompy.errors import EventDecodeError
from lagompy.journal import AtomicWrite, Storage, TagPage, TailSettings, open_storage
from lagompy.readside import ReadSide, ReadSideSettings, start_readside
from lagompy.readside._store import OffsetStore
from lagompy.sql import Database
from lagompy.testkit.readside import (
    CONTRACT_TAG,
    Credited,
    CreditsProjection,
    readside_contract_serializer,
)

#: Long enough that an event seen within a few seconds cannot have come from this poll.
NEVER = 30.0

FAST: dict[str, Any] = {"lease_ttl": 2.0, "renew_interval": 0.05}


async def credit(storage: Storage, account: str, seq: int, amount: int) -> int:
    write = AtomicWrite(
        "contract-account", account, seq, [Credited(account, amount)], [(CONTRACT_TAG,)]
    )
    (result,) = await storage.journal.append([write])
    return result.unwrap()[-1].offset


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def pg_settings(postgres_schema: str) -> JournalSettings:
    return JournalSettings(url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True)


@pytest.fixture
async def pg_journal(pg_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(
        settings=pg_settings, serializer=readside_contract_serializer()
    ) as storage:
        yield storage


@pytest.fixture
def listen_name() -> str:
    """An application_name of our own, so concurrent test runs on the server do not count."""
    return f"lagompy-consumer-test-{uuid.uuid4().hex[:8]}"


async def started(pg_settings: JournalSettings, settings: ReadSideSettings) -> ReadSide:
    return await start_readside(
        [CreditsProjection],
        journal_settings=pg_settings,
        serializer=readside_contract_serializer(),
        settings=settings,
    )


# --------------------------------------------------------------------------- listen off


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["environment", "embedded"])
async def test_listen_off_opens_no_listen_connection_and_workers_poll(
    how: str,
    pg_settings: JournalSettings,
    pg_journal: Storage,
    listen_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if how == "environment":
        monkeypatch.setenv("LAGOMPY_TAIL_LISTEN", "0")
        monkeypatch.setenv("LAGOMPY_TAIL_APPLICATION_NAME", listen_name)
        monkeypatch.setenv("LAGOMPY_TAIL_POLL_INTERVAL", "0.05")
        settings = ReadSideSettings(**FAST)
    else:
        tail = TailSettings(listen=False, application_name=listen_name, poll_interval=0.05)
        settings = ReadSideSettings(tail=tail, **FAST)
    assert settings.tail.listen is False
    async with await started(pg_settings, settings) as rs:
        (worker,) = rs.workers
        await until(lambda: worker.state == "running", 10, "the worker runs")
        offsets = [await credit(pg_journal, "a", n, n + 1) for n in range(3)]
        await until(lambda: worker.offset == offsets[-1], 10, "the events are handled")
        tailer = worker.tailer
        assert tailer is not None and tailer.notifier is None
        assert tailer.poll_wakeups > 0 and tailer.notify_wakeups == 0
        await asyncio.sleep(0.3)  # a LISTEN connection, if one were started, connects by now
        assert await listen_connections(listen_name) == 0


@pytest.mark.postgres
async def test_read_side_workers_listen_with_the_tail_settings(
    pg_settings: JournalSettings, pg_journal: Storage, listen_name: str
) -> None:
    tail = TailSettings(
        application_name=listen_name, poll_interval=NEVER, listen_poll_interval=NEVER
    )
    # Renewals far apart too: nothing but a notification ends the worker's wait within seconds
    # (other schemas' writers on the server may wake it as well: that costs a query).
    settings = ReadSideSettings(tail=tail, lease_ttl=20.0, renew_interval=9.0)
    async with await started(pg_settings, settings) as rs:
        (worker,) = rs.workers
        await until(
            lambda: worker.tailer is not None and worker.tailer.notifier is not None,
            10,
            "subscribed",
        )
        tailer = worker.tailer
        assert tailer is not None and tailer.notifier is not None
        assert await tailer.notifier.wait_connected(5)
        await until(lambda: tailer.waiting, 10, "the worker waits for events")
        polls = tailer.poll_wakeups
        offset = await credit(pg_journal, "a", 0, 1)
        await until(lambda: worker.offset == offset, 3, "the event arrives by notification")
        assert tailer.notify_wakeups >= 1 and tailer.poll_wakeups == polls
        assert await listen_connections(listen_name) == 1


# --------------------------------------------------------------------------- other strategies


class Collected:
    """A commit strategy other than the read side's: hand the events to a sink first, then
    record the position (at least once, like a topic producer)."""

    def __init__(self, store: OffsetStore, projection: Database) -> None:
        self.store = store
        self.projection = projection
        self.sink: list[int] = []
        self.prepared = 0

    async def _record(self, consumer: EventConsumer, lease: Lease, offset: int) -> None:
        async with self.projection.write() as conn:
            flags = await self.store.commit(conn, lease, offset, consumer.settings.lease_ttl)
        consumer.moved(offset, False, flags)

    async def prepare(self, consumer: EventConsumer, lease: Lease, *, clear_stall: bool) -> None:
        self.prepared += 1
        await self._record(consumer, lease, consumer.offset)

    async def commit(
        self, consumer: EventConsumer, lease: Lease, page: TagPage, *, ignore_pause: bool
    ) -> None:
        self.sink += [e.offset for e in page.envelopes]  # "publish"
        consumer.committed(len(page.envelopes))
        await self._record(consumer, lease, page.last_offset)

    async def undecodable(
        self, consumer: EventConsumer, lease: Lease, error: EventDecodeError
    ) -> None:
        raise AssertionError(f"unexpected: {error}")

    async def idle(self, consumer: EventConsumer, lease: Lease) -> None:
        pass

    async def hand_over(self, consumer: EventConsumer, lease: Lease) -> None:
        pass


async def test_the_core_runs_another_commit_strategy(journal_settings: JournalSettings) -> None:
    async with await open_storage(
        settings=journal_settings, serializer=readside_contract_serializer()
    ) as storage:
        projection = storage.database
        store = OffsetStore(projection)
        await store.ensure("collector", [CONTRACT_TAG])
        strategy = Collected(store, projection)
        checked: CommitStrategy = strategy  # it fits the protocol
        assert checked is strategy
        settings = ReadSideSettings(tail=TailSettings(poll_interval=0.02), **FAST)
        consumer = EventConsumer(
            "collector",
            CONTRACT_TAG,
            journal=storage.journal,
            store=store,
            strategy=strategy,
            settings=settings,
            owner="collector-1",
        )
        first = [await credit(storage, "a", n, n) for n in range(3)]
        assert await consumer.catch_up() == first[-1]
        assert strategy.sink == first
        running = asyncio.create_task(consumer.run())
        try:
            more = [await credit(storage, "a", n, n) for n in range(3, 5)]
            await until(lambda: consumer.offset == more[-1], 10, "the live events are collected")
            assert strategy.sink == first + more
            assert consumer.events_handled == 5 and consumer.state == "running"
        finally:
            await consumer.stop()
            await asyncio.wait_for(running, 10)
        assert consumer.state == "stopped"
        row = await store.row("collector", CONTRACT_TAG)
        assert row is not None and (row.offset, row.owner) == (more[-1], None)
