"""The topic contract suite: what every topic transport must show (``lagompy.topic``).

Subclass :class:`TopicContract` under a ``Test...`` name, give it ``journal_settings`` (a
fresh, empty database: the producing service's journal; the conftest's fixture runs it on
SQLite and PostgreSQL) and override :meth:`TopicContract.transports`, an async context manager
that yields a function making a new transport (each runner of subscribers gets its own, as
separate processes would)::

    class TestTopicsOverMyBroker(ProducerTopicContract):   # TopicContract: no producers
        @contextlib.asynccontextmanager
        async def transports(self, env):
            broker = await start_my_broker(...)        # producers publish from env.journal
            try:
                yield lambda: MyTransport(broker.url, ...)
            finally:
                await broker.stop()

        async def kill_producer(self, env):             # as a crash would, then start again
            ...

(``tests/test_topic_nats.py`` does this for NATS JetStream.) Its cases: per-key order; every
message delivered at least once and applied exactly once across a killed consumer (and a killed
producer, with :class:`ProducerTopicContract`); one consumer per
(group, partition); replay from an offset; new groups from the earliest, the latest, an offset
and a time; filtered events advance the position. It needs pytest and pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.entity import Effect, PersistentEntity, sharded_tag
from lagompy.journal import TailSettings
from lagompy.journal._journal import AtomicWrite, EventEnvelope, Journal
from lagompy.journal._storage import Storage, open_storage, serializer_for
from lagompy.readside._settings import ReadSideSettings, projection_settings
from lagompy.settings import JournalSettings
from lagompy.sql._database import Database
from lagompy.topic import (
    EmbeddedTransport,
    Message,
    StartFrom,
    Subscriber,
    Subscribers,
    Topic,
    TopicTransport,
    start_subscribers,
)
from lagompy.topic._embedded import partition_position

__all__ = [
    "ContractAccount",
    "Deposit",
    "Deposited",
    "Noted",
    "ProducerTopicContract",
    "TopicContract",
    "TopicEnv",
    "contract_topic",
    "kill",
]


# --------------------------------------------------------------------------- the producer


@dataclass(frozen=True)
class Deposited:
    account: str
    amount: int


@dataclass(frozen=True)
class Noted:
    """An event the contract topic filters out."""

    text: str


@dataclass(frozen=True)
class AccountState:
    balance: int = 0


@dataclass(frozen=True)
class Deposit:
    """The contract topic's public message."""

    account: str
    amount: int


class ContractAccount(PersistentEntity[Any, Deposited | Noted, AccountState]):
    """The source of the contract topic: two partitions."""

    type_name = "topic-contract-account"
    initial_state = AccountState()
    tag = sharded_tag("topic-contract-", 2)

    def on_command(self, state: AccountState, command: Any) -> Effect[AccountState]:
        return Effect.unhandled()

    def on_event(self, state: AccountState, event: Deposited | Noted) -> AccountState:
        if isinstance(event, Deposited):
            return AccountState(state.balance + event.amount)
        return state


def _to_message(event: Deposited | Noted) -> Deposit | None:
    if isinstance(event, Deposited):
        return Deposit(event.account, event.amount)
    return None


contract_topic = Topic("contract-deposits", Deposit, source=ContractAccount, to_message=_to_message)


# --------------------------------------------------------------------------- the subscriber

_SEEN = "topic_contract_seen"


class _Recorder(Subscriber[Deposit]):
    """Records every message it handles, with the runner that handled it."""

    topic = contract_topic

    def __init__(self, runner: str, delay: float = 0.0) -> None:
        self.runner = runner
        self.delay = delay

    async def prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {_SEEN} (grp VARCHAR(100), msg_offset BIGINT, "
                "part INTEGER, msg_key VARCHAR(100), amount INTEGER, runner VARCHAR(20))"
            )
        )

    async def handle(self, conn: AsyncConnection, message: Message[Deposit]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        await conn.execute(
            text(f"INSERT INTO {_SEEN} VALUES (:g, :o, :p, :k, :a, :r)"),
            {
                "g": self.group,
                "o": message.offset,
                "p": message.partition,
                "k": message.key,
                "a": message.payload.amount,
                "r": self.runner,
            },
        )


def recorder(
    group: str, runner: str = "a", *, start: StartFrom | None = None, delay: float = 0.0
) -> Subscriber[Deposit]:
    """A subscriber instance of ``group`` that records what it handles."""
    cls = type(
        f"Recorder_{group.replace('-', '_')}",
        (_Recorder,),
        {"group": group, "start_from": start or StartFrom.earliest()},
    )
    subscriber: Subscriber[Deposit] = cls(runner, delay)
    return subscriber


async def kill(subscribers: Subscribers) -> None:
    """Stop ``subscribers`` the way a crash does: its tasks are cancelled mid-transaction
    (rolled back) and its leases are not released (the next holder waits for their expiry)."""
    for task in subscribers._tasks:
        task.cancel()
    await asyncio.gather(*subscribers._tasks, return_exceptions=True)
    subscribers._tasks = []
    subscribers.workers = []
    await subscribers.close()


# --------------------------------------------------------------------------- the environment

Row = tuple[str, int, int, str, int, str]


class TopicEnv:
    """A producer journal and a subscriber database for one contract case."""

    def __init__(
        self,
        storage: Storage,
        subscriber_journal: JournalSettings,
        settings: ReadSideSettings,
    ) -> None:
        self.storage = storage
        self.journal: Journal = storage.journal
        #: Where the subscribers keep their writes and positions (``url`` of ``settings``, or
        #: this journal's database).
        self.subscriber_journal = subscriber_journal
        self.settings = settings
        self.database = Database.create(projection_settings(subscriber_journal, settings))
        self.make_transport: Callable[[], TopicTransport] = lambda: EmbeddedTransport(
            storage.journal, tail=settings.tail
        )
        self._seq: dict[str, int] = {}
        self._running: list[Subscribers] = []

    async def append(self, *events: Deposited | Noted) -> list[EventEnvelope[Any]]:
        """Append each event to its account (one write per account, in the order given)."""
        writes = []
        by_account: dict[str, list[Any]] = {}
        for e in events:
            account = e.account if isinstance(e, Deposited) else e.text.split(":")[0]
            by_account.setdefault(account, []).append(e)
        for account, evs in by_account.items():
            seq = self._seq.get(account, 0)
            tag = contract_topic.tag.for_entity(account)
            writes.append(
                AtomicWrite(ContractAccount.type_name, account, seq, evs, [(tag,)] * len(evs))
            )
            self._seq[account] = seq + len(evs)
        out: list[EventEnvelope[Any]] = []
        for result in await self.journal.append(writes):
            out += result.unwrap()
        return sorted(out, key=lambda e: e.offset)

    async def start(self, *subscribers: Subscriber[Any]) -> Subscribers:
        running = await start_subscribers(
            subscribers,
            transport=self.make_transport(),
            journal_settings=self.subscriber_journal,
            settings=self.settings,
        )
        running._close_transport = True
        self._running.append(running)
        return running

    async def heads(self) -> list[int]:
        """The head offset of each partition in the journal."""
        return [
            await partition_position(
                self.journal.database, contract_topic.partition_tag(p), StartFrom.latest()
            )
            for p in range(contract_topic.partitions)
        ]

    async def seen(self, group: str | None = None) -> list[Row]:
        query = f"SELECT grp, msg_offset, part, msg_key, amount, runner FROM {_SEEN}"
        params: dict[str, Any] = {}
        if group is not None:
            query += " WHERE grp = :g"
            params["g"] = group
        async with self.database.read() as conn:
            try:
                rows = (await conn.execute(text(query + " ORDER BY msg_offset"), params)).all()
            except Exception:
                return []  # no subscriber prepared the table yet
        return [(str(a), int(b), int(c), str(d), int(e), str(f)) for a, b, c, d, e, f in rows]

    async def positions(self, running: Subscribers, group: str) -> list[int]:
        """The stored position of each partition of ``group``."""
        rows = sorted(await running.status(group), key=lambda s: s.tag)
        return [s.offset for s in rows]

    async def close(self) -> None:
        for running in self._running:
            await running.close()
        await self.database.dispose()
        await self.storage.close()


def _deposits(envelopes: Sequence[EventEnvelope[Any]]) -> list[EventEnvelope[Any]]:
    return [e for e in envelopes if isinstance(e.event, Deposited)]


# --------------------------------------------------------------------------- the contract


class TopicContract:
    """Behaviours every topic transport must show. Provide ``journal_settings``; override
    :meth:`transports` (default: the embedded transport, same database) and
    :meth:`kill_producer` for a transport with producers."""

    @pytest.fixture
    def subscriber_settings(self) -> ReadSideSettings:
        """The subscribers' settings: fast leases and retries (``url``: their own database)."""
        return ReadSideSettings(
            lease_ttl=1.0,
            renew_interval=0.1,
            retry_initial_delay=0.01,
            retry_max_delay=0.05,
            max_attempts=3,
            max_batch=7,  # several pages per case
            tail=TailSettings(poll_interval=0.02),
        )

    @contextlib.asynccontextmanager
    async def transports(self, env: TopicEnv) -> AsyncIterator[Callable[[], TopicTransport]]:
        """Yields a function making a new transport for ``env`` (started and stopped here)."""
        yield lambda: EmbeddedTransport(env.journal, tail=env.settings.tail)

    async def kill_producer(self, env: TopicEnv) -> None:
        """Kill the transport's producers (a transport that has some overrides this)."""

    @pytest_asyncio.fixture
    async def env(
        self, journal_settings: JournalSettings, subscriber_settings: ReadSideSettings
    ) -> AsyncIterator[TopicEnv]:
        serializer = serializer_for([ContractAccount])
        serializer.register(Deposit)
        storage = await open_storage(settings=journal_settings, serializer=serializer)
        env = TopicEnv(storage, journal_settings, subscriber_settings)
        try:
            async with self.transports(env) as make:
                env.make_transport = make
                yield env
                for running in env._running:
                    await running.close()
        finally:
            await env.close()

    async def _caught_up(self, env: TopicEnv, *running: Subscribers, timeout: float = 20) -> None:
        for r in running:
            await r.wait_until_caught_up(timeout=timeout)

    @pytest.mark.asyncio
    async def test_order_per_key_exactly_once_and_filtered_events_advance(
        self, env: TopicEnv
    ) -> None:
        keys = [f"k{i}" for i in range(6)]
        written: list[EventEnvelope[Any]] = []
        for round_ in range(3):
            written += await env.append(*(Deposited(k, round_ + 1) for k in keys))
        written += await env.append(*(Noted(f"{k}:note") for k in keys))  # filtered, last
        running = await env.start(recorder("ordered"))
        await self._caught_up(env, running)
        seen = await env.seen("ordered")
        assert sorted(r[1] for r in seen) == [e.offset for e in _deposits(written)]
        for k in keys:
            assert [r[4] for r in seen if r[3] == k] == [1, 2, 3], f"order of key {k}"
            (partition,) = {r[2] for r in seen if r[3] == k}
            assert partition == contract_topic.partition_of(k)
        # The filtered events at the end moved the positions to the partitions' heads.
        assert await env.positions(running, "ordered") == await env.heads()

    @pytest.mark.asyncio
    async def test_exactly_once_effect_across_a_killed_consumer(self, env: TopicEnv) -> None:
        group = "killed"
        written = await env.append(*(Deposited(f"a{i % 5}", i) for i in range(30)))
        first = await env.start(recorder(group, "first", delay=0.002))
        async with asyncio.timeout(20):
            while len(await env.seen(group)) < 10:
                await asyncio.sleep(0.01)
        await kill(first)
        written += await env.append(*(Deposited(f"a{i % 5}", i) for i in range(30, 45)))
        second = await env.start(recorder(group, "second"))
        written += await env.append(*(Deposited(f"a{i % 5}", i) for i in range(45, 50)))
        await self._caught_up(env, second)
        offsets = [r[1] for r in await env.seen(group)]
        assert offsets == [e.offset for e in written], "each message applied exactly once"

    @pytest.mark.asyncio
    async def test_one_consumer_per_group_and_partition(self, env: TopicEnv) -> None:
        group = "exclusive"
        one = await env.start(recorder(group, "one"))
        two = await env.start(recorder(group, "two"))
        written: list[EventEnvelope[Any]] = []
        for round_ in range(4):
            written += await env.append(*(Deposited(f"x{i}", round_) for i in range(8)))
            await asyncio.sleep(0.02)
        await self._caught_up(env, one, two)
        seen = await env.seen(group)
        assert [r[1] for r in seen] == [e.offset for e in written]
        for p in range(contract_topic.partitions):
            # One consumer at a time: the second one to start may take a partition over from
            # the first (once: partitions spread as consumers join), never share it.
            runners = [r[5] for r in seen if r[2] == p]
            turns = [r for i, r in enumerate(runners) if i == 0 or runners[i - 1] != r]
            assert len(turns) <= 2, f"partition {p} went back and forth: {turns}"

    @pytest.mark.asyncio
    async def test_partitions_spread_over_the_consumers_and_come_back(self, env: TopicEnv) -> None:
        # A second consumer of the group takes one of the two partitions over (at a batch
        # boundary: every message once); when it stops, the first gets it back.
        group = "spread"

        def held(running: Subscribers) -> int:
            return sum(w.lease is not None for w in running.workers)

        async def until(check: Callable[[], bool], what: str) -> None:
            try:
                async with asyncio.timeout(20):
                    while not check():
                        await asyncio.sleep(0.02)
            except TimeoutError:
                raise AssertionError(f"not within 20 s: {what}") from None

        written = await env.append(*(Deposited(f"s{i % 6}", i) for i in range(12)))
        one = await env.start(recorder(group, "one"))
        await until(lambda: held(one) == contract_topic.partitions, "one holds both")
        two = await env.start(recorder(group, "two"))
        await until(lambda: held(one) == 1 and held(two) == 1, "one partition each")
        written += await env.append(*(Deposited(f"s{i % 6}", i) for i in range(12, 24)))
        await self._caught_up(env, one, two)
        await two.close()
        await until(lambda: held(one) == contract_topic.partitions, "one holds both again")
        written += await env.append(*(Deposited(f"s{i % 6}", i) for i in range(24, 30)))
        await self._caught_up(env, one)
        seen = await env.seen(group)
        assert [r[1] for r in seen] == [e.offset for e in written], "each message once"
        assert {r[5] for r in seen} == {"one", "two"}

    @pytest.mark.asyncio
    async def test_replay_from_an_offset(self, env: TopicEnv) -> None:
        group = "replayed"
        written = await env.append(*(Deposited(f"r{i % 4}", i) for i in range(16)))
        running = await env.start(recorder(group))
        await self._caught_up(env, running)
        by_partition = [
            [e.offset for e in written if contract_topic.partition_of(e.entity_id) == p]
            for p in range(contract_topic.partitions)
        ]
        partition = max(range(contract_topic.partitions), key=lambda p: len(by_partition[p]))
        in_p0 = by_partition[partition]
        await running.set_offset(group, partition, in_p0[1])
        await self._caught_up(env, running)
        async with asyncio.timeout(20):
            while len(await env.seen(group)) < len(written) + len(in_p0) - 2:
                await asyncio.sleep(0.01)
        offsets = [r[1] for r in await env.seen(group)]
        expected = sorted([e.offset for e in written] + in_p0[2:])
        assert offsets == expected, "the messages after the offset came again, only those"

    @pytest.mark.asyncio
    async def test_new_groups_start_at_earliest_latest_an_offset_or_a_time(
        self, env: TopicEnv
    ) -> None:
        before = await env.append(*(Deposited(f"s{i}", 1) for i in range(6)))
        await asyncio.sleep(0.05)
        between = datetime.now(UTC)
        await asyncio.sleep(0.05)
        middle = await env.append(*(Deposited(f"s{i}", 2) for i in range(6)))
        running = await env.start(
            recorder("earliest"),
            recorder("latest", start=StartFrom.latest()),
            recorder("by-offset", start=StartFrom.after_offset(before[-1].offset)),
            recorder("by-time", start=StartFrom.at_time(between)),
        )
        await self._caught_up(env, running)
        after = await env.append(*(Deposited(f"s{i}", 3) for i in range(6)))
        await self._caught_up(env, running)

        async def offsets(group: str) -> list[int]:
            return [r[1] for r in await env.seen(group)]

        every = [e.offset for e in before + middle + after]
        assert await offsets("earliest") == every
        assert await offsets("latest") == [e.offset for e in after]
        assert await offsets("by-offset") == [e.offset for e in middle + after]
        assert await offsets("by-time") == [e.offset for e in middle + after]


class ProducerTopicContract(TopicContract):
    """:class:`TopicContract` for a transport with producers (a broker's), with the case of a
    killed producer: override :meth:`kill_producer` (kill the producers as a crash would, and
    start them again in a new "process")."""

    @pytest.mark.asyncio
    async def test_exactly_once_effect_across_a_killed_producer(self, env: TopicEnv) -> None:
        written = await env.append(*(Deposited(f"p{i % 3}", i) for i in range(20)))
        running = await env.start(recorder("producer-killed"))
        await self.kill_producer(env)
        written += await env.append(*(Deposited(f"p{i % 3}", i) for i in range(20, 30)))
        await self._caught_up(env, running)
        offsets = [r[1] for r in await env.seen("producer-killed")]
        assert offsets == [e.offset for e in written]
