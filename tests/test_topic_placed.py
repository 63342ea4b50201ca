"""Topics on a journal placed on several databases: the producing service relays each partition
into one log in the home database (``lagompy_topic_messages``), with offsets 1..N per partition
whichever database the events come from. Every message is delivered once, in per-key order,
over HTTP and to embedded subscribers; filtered events give no message; a relay killed mid-way
loses and duplicates nothing; two databases' relays interleave into one partition without
gaps; the status shows the relays. On SQLite files and PostgreSQL schemas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text

from lagompy import JournalSettings
from lagompy.errors import ConfigurationError, JournalError
from lagompy.journal import TailSettings
from lagompy.journal._journal import AtomicWrite
from lagompy.journal._model import EventEnvelope, from_us, now_us
from lagompy.journal._moving import move_slices
from lagompy.journal._placement import HOME, Placement
from lagompy.journal._slices import slice_of
from lagompy.journal._storage import PlacedStorage, open_placed_storage, serializer_for
from lagompy.readside import open_projections, start_readside
from lagompy.service import BreakerRegistry, Service
from lagompy.settings import PlacedDatabase
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from lagompy.testkit.nats import find_server, nats_server
from lagompy.testkit.server import serve_in_thread
from lagompy.testkit.topics import ContractAccount, Deposit, Deposited, Noted, contract_topic
from lagompy.topic import (
    BrokerSettings,
    HttpTransport,
    Message,
    NatsTransport,
    Subscriber,
    SubscribersComponent,
    TopicsComponent,
    start_subscribers,
)
from lagompy.topic._relay import RelayFeed, RelayLog, relay_for
from tests.conftest import Placed

FAST: dict[str, Any] = {
    "lease_ttl": 2.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
}


def fast_settings() -> Any:
    from lagompy.readside import ReadSideSettings

    return ReadSideSettings(**FAST)


class Writer:
    """Appends the contract account's events, each to its own database's journal; remembers
    what each account wrote, in order."""

    def __init__(self, storage: PlacedStorage) -> None:
        self.storage = storage
        self.seq: dict[str, int] = {}
        #: Per account, the amounts of its Deposited events in order (Noted ones give none).
        self.deposits: dict[str, list[int]] = {}
        self.noted = 0

    async def write(self, accounts: Sequence[str], rounds: int) -> None:
        for r in range(rounds):
            for account in accounts:
                n = self.seq.get(account, 0)
                events: list[Any] = [Deposited(account, n + 1)]
                if (n + r) % 3 == 0:
                    events.append(Noted(f"{account} {n}"))  # filtered out by the topic
                write = AtomicWrite(
                    ContractAccount.type_name,
                    account,
                    n,
                    events,
                    [(ContractAccount.tag.for_entity(account),)] * len(events),
                )
                (result,) = await self.storage.of(account).journal.append([write])
                result.unwrap()
                self.seq[account] = n + len(events)
                self.deposits.setdefault(account, []).append(n + 1)
                self.noted += len(events) - 1


def accounts_on(placement: Placement, n: int) -> dict[str, list[str]]:
    """``n`` accounts per (database, partition): the test proves little unless every database
    feeds every partition."""
    found: dict[tuple[str, int], list[str]] = {}
    i = 0
    while any(
        len(found.get((d, p), [])) < n
        for d in placement.names
        for p in range(contract_topic.partitions)
    ):
        account = f"acct-{i}"
        key = (placement.database_of(account), contract_topic.partition_of(account))
        if len(found.setdefault(key, [])) < n:
            found[key].append(account)
        i += 1
    by_database: dict[str, list[str]] = {}
    for (database, _), names in found.items():
        by_database.setdefault(database, []).extend(names)
    return by_database


async def relay_rows(settings: JournalSettings) -> list[Any]:
    """Every row of the home database's relay log, by (partition, offset)."""
    database = Database.create(Placement.of(settings).settings_of(HOME))
    m = schema.topic_messages.c
    try:
        async with database.read() as conn:
            query = select(
                m.partition, m.message_offset, m.entity_id, m.source_database, m.payload
            ).order_by(m.partition, m.message_offset)
            return list((await conn.execute(query)).all())
    finally:
        await database.dispose()


async def relayed(settings: JournalSettings, writer: Writer, timeout: float = 30) -> None:
    """Wait until the relay log holds a message per deposit written."""
    expected = sum(len(d) for d in writer.deposits.values())
    async with asyncio.timeout(timeout):
        while len(await relay_rows(settings)) < expected:
            await asyncio.sleep(0.05)


def check_log(rows: list[Any], writer: Writer) -> None:
    """Offsets 1..N per partition, every deposit once, per account in its order; both
    databases' relays wrote into every partition."""
    for p in range(contract_topic.partitions):
        offsets = [r.message_offset for r in rows if r.partition == p]
        assert offsets == list(range(1, len(offsets) + 1)), f"partition {p}: {offsets}"
        assert len({r.source_database for r in rows if r.partition == p}) == 2
    assert len(rows) == sum(len(d) for d in writer.deposits.values())


def check_messages(messages: list[tuple[int, int, str, int]], writer: Writer) -> None:
    """(partition, offset, key, amount) delivered: each once, gap-free offsets per partition,
    per key the deposits in the order written, none for a filtered event."""
    for p in range(contract_topic.partitions):
        offsets = [o for part, o, _, _ in messages if part == p]
        assert offsets == list(range(1, len(offsets) + 1)), f"partition {p}"
    by_key: dict[str, list[int]] = {}
    for _, _, key, amount in messages:
        by_key.setdefault(key, []).append(amount)
    assert by_key == writer.deposits


async def test_an_embedded_subscriber_and_one_over_http_get_every_message_once_in_order(
    placed: Placed,
) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    serializer = serializer_for([ContractAccount])
    accounts = accounts_on(placement, 3)
    got: list[tuple[int, int, str, int]] = []

    class Embedded(Subscriber[Deposit]):
        group = "embedded"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None:
            got.append((message.partition, message.offset, message.key, message.payload.amount))

    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        writer = Writer(storage)
        await writer.write([a for names in accounts.values() for a in names], 2)
        assert writer.noted > 0

        topics = TopicsComponent(
            [contract_topic], journal_settings=settings, producer_settings=fast_settings()
        )
        service = Service(name="producer", components=[topics])
        app = FastAPI(lifespan=service.lifespan)
        service.install(app)
        with serve_in_thread(app) as url:
            # Both databases' writers go on while the relays run.
            await asyncio.gather(
                *(writer.write(names, 4) for names in accounts.values()),
            )
            await relayed(settings, writer)
            check_log(await relay_rows(settings), writer)

            # Status: one relay partition per (tag shard, database), in the home database's
            # offsets (as read sides') and at the producer's /topics/relays.
            keys = sorted(
                key for t in contract_topic.tag.all_tags for key, _ in placement.partitions(t)
            )
            async with await open_projections(journal_settings=settings) as projections:
                status = await projections.status("topic-relay:contract-deposits")
                assert sorted(s.tag for s in status) == keys
                assert all(s.lag_events == 0 and s.state == "running" for s in status)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                rows = (await client.get("/topics/relays")).json()
                assert sorted(r["tag"] for r in rows) == keys
                assert {r["processor"] for r in rows} == {"topic-relay:contract-deposits"}

            # An embedded subscriber (the producer's database) reads the relay log.
            async with await start_subscribers(
                [Embedded], journal_settings=settings, **FAST
            ) as subs:
                await subs.wait_until_caught_up(timeout=30)
                check_messages(got, writer)
                sub_status = await subs.status("embedded")
                assert all(s.lag_events == 0 and s.head_offset == s.offset for s in sub_status)

            # A subscriber of another service, over HTTP, with its own database.
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                body = (await client.get("/topics/contract-deposits/partitions/0?limit=5")).json()
                assert [m["offset"] for m in body["messages"]] == [1, 2, 3, 4, 5]
                assert body["last_offset"] == 5 and body["full"] is True
                head = (await client.get("/topics/contract-deposits/partitions/0/position")).json()
                assert head["offset"] == len([g for g in got if g[0] == 0])
                ready = (await client.get("/health/ready")).json()
                assert ready["checks"]["topics"] == "ok", ready
                metrics = (await client.get("/metrics")).text
                assert 'lagompy_topic_relay_lag_events{partition="topic-contract-0@b"' in metrics

            over_http: list[tuple[int, int, str, int]] = []

            class Remote(Subscriber[Deposit]):
                group = "remote"
                topic = contract_topic

                async def handle(self, conn: Any, message: Message[Deposit]) -> None:
                    over_http.append(
                        (message.partition, message.offset, message.key, message.payload.amount)
                    )

            own = settings.placed_on("b")  # any database of its own
            transport = HttpTransport(url, breakers=BreakerRegistry())
            async with await start_subscribers(
                [Remote], transport=transport, journal_settings=own, **FAST
            ) as remote:
                await remote.wait_until_caught_up(timeout=30)
                check_messages(over_http, writer)
                # A new message reaches it live.
                first = accounts[HOME][0]
                await writer.write([first], 1)
                await relayed(settings, writer)
                await remote.wait_until_caught_up(timeout=30)
                check_messages(over_http, writer)
            await transport.close()


async def test_a_relay_killed_mid_way_loses_and_duplicates_nothing(placed: Placed) -> None:
    settings = await placed(2)
    placement = Placement.of(settings)
    serializer = serializer_for([ContractAccount])
    accounts = accounts_on(placement, 4)
    relay = relay_for(contract_topic, placement)
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        writer = Writer(storage)

        async def write() -> None:
            await asyncio.gather(*(writer.write(names, 15) for names in accounts.values()))

        writing = asyncio.create_task(write())
        for _ in range(3):
            relays = await start_readside([relay], journal_settings=settings, max_batch=7, **FAST)
            await asyncio.sleep(0.4)
            # Killed as a crash does: tasks cancelled mid-transaction, leases left to expire.
            for task in relays._tasks:
                task.cancel()
            await asyncio.gather(*relays._tasks, return_exceptions=True)
            relays._tasks = []
            relays.workers = []
            await relays.close()
        await writing
        async with await start_readside([relay], journal_settings=settings, **FAST) as relays:
            await relays.wait_until_caught_up(timeout=30)
        rows = await relay_rows(settings)
        check_log(rows, writer)
        per_key: dict[str, list[int]] = {}
        for r in rows:
            per_key.setdefault(r.entity_id, []).append(r.message_offset)
        assert all(offsets == sorted(offsets) for offsets in per_key.values())


async def test_two_relays_of_one_partition_commit_in_order_while_their_transactions_overlap(
    placed: Placed,
) -> None:
    """Each relay allocates offsets under the head row's lock: the second waits for the first
    to commit, so a reader never sees a later offset before an earlier one."""
    settings = await placed(2)
    placement = Placement.of(settings)
    accounts = accounts_on(placement, 1)
    relay = relay_for(contract_topic, placement)
    home = Database.create(placement.settings_of(HOME))
    try:
        await ensure_schema(home)
        async with home.write() as conn:
            await relay.global_prepare(conn)

        def envelope(account: str, offset: int) -> EventEnvelope[Any]:
            return EventEnvelope(
                offset=offset,
                entity_type=ContractAccount.type_name,
                entity_id=account,
                seq_nr=1,
                event=Deposited(account, offset),
                timestamp=from_us(now_us()),
            )

        partition = 0
        a = next(x for x in accounts[HOME] if contract_topic.partition_of(x) == partition)
        b = next(x for x in accounts["b"] if contract_topic.partition_of(x) == partition)
        first_in = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with home.write() as conn:
                await relay.handle_batch(conn, [envelope(a, 1), envelope(a, 2)])
                first_in.set()
                await release.wait()

        async def second() -> None:
            await first_in.wait()
            async with home.write() as conn:
                await relay.handle_batch(conn, [envelope(b, 1)])

        one = asyncio.create_task(first())
        two = asyncio.create_task(second())
        await first_in.wait()
        await asyncio.sleep(0.3)
        assert not two.done()  # waits for the first's commit
        assert await relay_rows(settings) == []  # nothing visible yet
        release.set()
        await asyncio.gather(one, two)
        rows = await relay_rows(settings)
        assert [(r.message_offset, r.entity_id) for r in rows] == [(1, a), (2, a), (3, b)]
    finally:
        await home.dispose()


async def test_nats_producers_publish_the_relay_log_and_a_subscriber_gets_it_once(
    placed: Placed, tmp_path: Path
) -> None:
    """With a broker, the producers of a placed journal publish the relay log (message ids
    ``topic:partition:offset`` of its offsets); a subscriber pulls every message once, in
    per-key order; the producers' status shows their lag in the log."""
    if find_server() is None:
        pytest.skip("nats-server is not installed")
    settings = await placed(2)
    placement = Placement.of(settings)
    accounts = accounts_on(placement, 3)
    fast = fast_settings().model_copy(update={"max_batch": 7})
    got: list[tuple[int, int, str, int]] = []

    class Brokered(Subscriber[Deposit]):
        group = "brokered"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None:
            got.append((message.partition, message.offset, message.key, message.payload.amount))

    async with nats_server() as server:
        broker = BrokerSettings(url=server.url, stream_prefix=f"p{uuid.uuid4().hex[:6]}")
        topics = TopicsComponent(
            [contract_topic], journal_settings=settings, broker=broker, producer_settings=fast
        )
        own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
        subscribers = SubscribersComponent(
            [Brokered], broker=broker, journal_settings=own, settings=fast
        )
        serializer = serializer_for([ContractAccount])
        await topics.start()
        await subscribers.start()
        try:
            async with await open_placed_storage(
                settings=settings, serializer=serializer
            ) as storage:
                writer = Writer(storage)
                await asyncio.gather(*(writer.write(names, 4) for names in accounts.values()))
            await relayed(settings, writer)
            expected = sum(len(d) for d in writer.deposits.values())
            async with asyncio.timeout(30):
                while len(got) < expected:
                    await asyncio.sleep(0.05)
                assert topics.producers is not None
                while any(s.lag_events != 0 for s in await topics.producers.status()):
                    await asyncio.sleep(0.05)
            check_messages(got, writer)
            status = await topics.producers.status()
            heads = {p: len([g for g in got if g[0] == p]) for p in range(2)}
            assert sorted((s.tag, s.offset, s.head_offset) for s in status) == [
                (contract_topic.partition_tag(p), heads[p], heads[p]) for p in range(2)
            ]
            assert await topics.ready() is True
        finally:
            await subscribers.stop()
            await topics.stop()


async def test_a_transport_made_beforehand_is_refused_on_a_placed_journal(
    placed: Placed,
) -> None:
    settings = await placed(2)
    topics = TopicsComponent(
        [contract_topic],
        journal_settings=settings,
        transport=NatsTransport(BrokerSettings(url="nats://127.0.0.1:4222")),
    )
    with pytest.raises(ConfigurationError, match="placed on several"):
        await topics.start()
    await topics.stop()


async def test_a_topic_published_before_the_journal_was_placed_is_refused_until_reset(
    placed: Placed,
) -> None:
    """A group that followed the topic on the journal's one database holds journal offsets:
    on the placed journal they would mean relay-log offsets. The relays refuse to start
    (naming the group) until it is set back to 0; then they start and the group gets every
    message."""
    settings = await placed(2)
    one = settings.model_copy(update={"databases": {}})  # the home database alone, before
    got: list[int] = []

    class Early(Subscriber[Deposit]):
        group = "early"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None:
            got.append(message.offset)

    home_accounts = [a for a in (f"acct-{i}" for i in range(100)) if slice_of(a) < 512][:4]
    serializer = serializer_for([ContractAccount])
    async with await open_placed_storage(settings=one, serializer=serializer) as storage:
        writer = Writer(storage)
        await writer.write(home_accounts, 2)
    async with await start_subscribers([Early], journal_settings=one, **FAST) as subs:
        await subs.wait_until_caught_up(timeout=30)
    assert len(got) == 8 and max(got) > 8 - 1  # journal offsets (Noted events among them)

    topics = TopicsComponent(
        [contract_topic], journal_settings=settings, producer_settings=fast_settings()
    )
    with pytest.raises(ConfigurationError, match=r"topic:contract-deposits:early on .* at \d+"):
        await topics.start()
    await topics.stop()
    assert await relay_rows(settings) == []  # nothing relayed

    async with await open_projections(journal_settings=settings) as projections:
        for s in await projections.status("topic:contract-deposits:early"):
            await projections.set_offset(s.processor, s.tag, 0, force=True)
    got.clear()
    await topics.start()
    try:
        async with await start_subscribers([Early], journal_settings=settings, **FAST) as subs:
            await relayed(settings, writer)
            await subs.wait_until_caught_up(timeout=30)
        assert sorted(got) == sorted(r.message_offset for r in await relay_rows(settings))
        assert len(got) == 8
    finally:
        await topics.stop()
    # Started once, the relay log's positions are its own: a restart is not refused.
    await topics.start()
    await topics.stop()


async def test_moving_slices_with_the_relays_caught_up_relays_nothing_twice(
    placed: Placed,
) -> None:
    """A move waits for the relays to catch up (they are consumers of the source database) and
    sets their positions on the target at its head: the moved events are not relayed again,
    and the moved entities' next events follow in their partitions."""
    settings = await placed(2)  # home: slices 0-511, b: 512-1023
    after = settings.model_copy(
        update={
            "databases": {"b": settings.databases["b"].model_copy(update={"slices": "256-1023"})}
        }
    )
    serializer = serializer_for([ContractAccount])
    relay = relay_for(contract_topic, Placement.of(settings))
    moved = [a for a in (f"acct-{i}" for i in range(400)) if 256 <= slice_of(a) <= 511][:6]
    stay = [a for a in (f"acct-{i}" for i in range(400)) if slice_of(a) > 511][:6]
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        writer = Writer(storage)
        await writer.write(moved + stay, 3)
        relays = await start_readside([relay], journal_settings=settings, **FAST)
        try:
            # Behind: the move is refused, naming the relay.
            with pytest.raises(JournalError, match="topic-relay:contract-deposits"):
                await move_slices(after, "256-511", target="b")
            await relays.wait_until_caught_up(timeout=30)
        finally:
            await relays.close()

    class Group(Subscriber[Deposit]):
        group = "before-the-move"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None:
            pass

    # A group of the topic keeps relay-log positions under the partitions' tags: the move
    # neither takes them for journal offsets (behind the tag's head) nor writes them any.
    async with await start_subscribers([Group], journal_settings=settings, **FAST) as subs:
        await subs.wait_until_caught_up(timeout=30)
    report = await move_slices(after, "256-511", target="b")
    assert not [p for p in report.positions if p[0].startswith("topic:")]

    relay = relay_for(contract_topic, Placement.of(after))
    async with await open_placed_storage(settings=after, serializer=serializer) as storage:
        continued = Writer(storage)
        continued.seq, continued.deposits = writer.seq, writer.deposits
        await continued.write(moved + stay, 2)
        async with await start_readside([relay], journal_settings=after, **FAST) as relays:
            await relays.wait_until_caught_up(timeout=30)
    rows = await relay_rows(after)
    decode = contract_topic.serializer().decode
    for p in range(contract_topic.partitions):
        offsets = [r.message_offset for r in rows if r.partition == p]
        assert offsets == list(range(1, len(offsets) + 1))
    per_key: dict[str, list[int]] = {}
    for r in rows:
        message = decode(contract_topic.type_name, contract_topic.version, r.payload)
        per_key.setdefault(r.entity_id, []).append(message.amount)
    assert per_key == writer.deposits


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_relay_commit_wakes_the_feeds_of_its_partition_on_postgresql(
    placed: Placed,
) -> None:
    """A feed caught up waits for the relay's NOTIFY (delivered at its commit), not for its
    poll: here the poll is 10 s away, and the message arrives well before. (SQLite has no
    NOTIFY: its feeds poll.)"""
    settings = await placed(2)
    placement = Placement.of(settings)
    relay = relay_for(contract_topic, placement)
    home = Database.create(placement.settings_of(HOME))
    slow = TailSettings(poll_interval=10.0, listen_poll_interval=10.0)
    feed = RelayLog(home).feed(contract_topic, 0, tail=slow)
    try:
        await ensure_schema(home)
        async with home.write() as conn:
            await relay.global_prepare(conn)
        await feed.start()
        account = next(
            a for a in accounts_on(placement, 1)["b"] if contract_topic.partition_of(a) == 0
        )
        assert isinstance(feed, RelayFeed) and feed._notifier is not None
        assert await feed._notifier.wait_connected(5)  # (its coming up woke the feed)
        assert (await feed.next_batch(0, 10)).messages == []
        waiting = asyncio.create_task(feed.wait())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        started = time.monotonic()
        async with home.write() as conn:
            await relay.handle_batch(
                conn,
                [
                    EventEnvelope(
                        ContractAccount.type_name,
                        account,
                        1,
                        7,
                        from_us(now_us()),
                        Deposited(account, 1),
                    )
                ],
            )
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 2
        batch = await feed.next_batch(0, 10)
        assert [(m.offset, m.key, m.payload.amount) for m in batch.messages] == [(1, account, 1)]
    finally:
        await feed.close()
        await home.dispose()


async def test_a_group_on_ray_reads_the_relay_log_of_a_placed_journal(
    ray_session: Any, placed: Placed
) -> None:
    """A subscriber group as a Ray actor, on the embedded transport: the actor opens the home
    database of the placed journal and reads the relay log, every message once, in order."""
    from lagompy.topic import start_subscribers_on_ray
    from tests.topic_ray_subscribers import RayLedger

    settings = await placed(2)
    placement = Placement.of(settings)
    accounts = accounts_on(placement, 2)
    app = f"tp-{uuid.uuid4().hex[:8]}"
    relay = relay_for(contract_topic, placement)
    serializer = serializer_for([ContractAccount])
    async with await open_placed_storage(settings=settings, serializer=serializer) as storage:
        writer = Writer(storage)
        await asyncio.gather(*(writer.write(names, 3) for names in accounts.values()))
    async with await start_readside([relay], journal_settings=settings, **FAST) as relays:
        await relays.wait_until_caught_up(timeout=30)
    subs = await start_subscribers_on_ray(
        [RayLedger], app=app, journal_settings=settings, supervise_interval=0.2, **FAST
    )
    try:
        await subs.wait_until_caught_up(timeout=60)
        home = Database.create(placement.settings_of(HOME))
        try:
            async with home.read() as conn:
                rows = (
                    await conn.execute(
                        text(f"SELECT part, msg_offset, account, amount FROM {RayLedger.table}")
                    )
                ).all()
        finally:
            await home.dispose()
        check_messages(
            [
                (int(p), int(o), str(a), int(n))
                for p, o, a, n in sorted(rows, key=lambda r: (r[0], r[1]))
            ],
            writer,
        )
    finally:
        await subs.close(stop=True)


def test_the_example_services_as_processes_on_a_placed_journal_welcome_every_user_once(
    tmp_path: Path,
) -> None:
    """The example's user service (``lagompy run``, entities in its process) on a journal
    placed on two SQLite files publishes its topic over HTTP from the relay log; the
    notification service, another process with its own database, pulls it: each user
    registered gets one welcome, from either database."""
    import json

    import httpx

    from lagompy.testkit.server import free_port
    from tests.test_e2e_services import (
        NOTIFICATIONS_APP,
        USERS_APP,
        Process,
        _clean_environment,
        eventually,
        register,
    )

    users_port, notifications_port = free_port(), free_port()
    env = _clean_environment()
    databases = {"b": {"url": f"sqlite:///{tmp_path / 'b.db'}", "slices": "512-1023"}}
    users_env = env | {
        "LAGOMPY_JOURNAL_URL": f"sqlite:///{tmp_path / 'home.db'}",
        "LAGOMPY_JOURNAL_DATABASES": json.dumps(databases),
        "LAGOMPY_EXAMPLE_RAY": "0",
        "LAGOMPY_SERVICE_NOTIFICATIONS": f"http://127.0.0.1:{notifications_port}",
    }
    notifications_env = env | {
        "LAGOMPY_SERVICE_USERS": f"http://127.0.0.1:{users_port}",
        "LAGOMPY_EXAMPLE_NOTIFICATIONS_DB": f"sqlite:///{tmp_path / 'notifications.db'}",
    }
    users = Process(USERS_APP, users_port, users_env, tmp_path / "users.log")
    notifications = Process(
        NOTIFICATIONS_APP, notifications_port, notifications_env, tmp_path / "n.log"
    )
    try:
        notifications.start()
        users.start()
        users.wait_ready()
        notifications.wait_ready()
        with httpx.Client(base_url=users.url, timeout=30) as http:
            emails = [register(http, f"placed{i}") for i in range(24)]
            ids = [u["user_id"] for u in http.get("/users", params={"limit": 100}).json()["items"]]
        placement = Placement.of(
            JournalSettings(
                url="sqlite:///x.db",
                databases={n: PlacedDatabase(**d) for n, d in databases.items()},
            )
        )
        assert {placement.database_of(i) for i in ids} == {HOME, "b"}

        def welcomed() -> bool | None:
            counts = []
            for email in emails:
                r = client.get(f"{notifications.url}/notifications", params={"recipient": email})
                counts.append(len(r.json()["items"]))
            assert max(counts) <= 1, "a user was welcomed twice"
            return True if min(counts) == 1 else None

        # One kept-alive client for every poll (httpx.get makes a client per call: ~35 ms).
        with httpx.Client(timeout=30) as client:
            eventually(welcomed, "a welcome for every user", timeout=60)
        relays = httpx.get(f"{users.url}/topics/relays", timeout=10).json()
        assert any(r["tag"].endswith("@b") for r in relays), relays
    finally:
        status = users.stop()
        notifications.stop()
    assert status == 0, users.output()  # the relays stopped with the service


def test_a_groups_reset_to_a_time_finds_the_relay_logs_offset(tmp_path: Path) -> None:
    """``lagompy topics reset --to-time`` on a group of a placed journal's topic: the position
    is the relay log's offset of the last message written before the time, not a database's
    journal offset."""
    from typer.testing import CliRunner

    from lagompy.cli import build_app
    from lagompy.readside import ReadSideSettings

    home_url = f"sqlite:///{tmp_path / 'home.db'}"
    settings = JournalSettings(
        url=home_url,
        databases={"b": PlacedDatabase(url=f"sqlite:///{tmp_path / 'b.db'}", slices="512-1023")},
    )
    placement = Placement.of(settings)
    by_db = accounts_on(placement, 1)
    partition = 0
    pair = [
        next(a for a in by_db[d] if contract_topic.partition_of(a) == partition)
        for d in (HOME, "b")
    ]
    relay = relay_for(contract_topic, placement)

    class Group(Subscriber[Deposit]):
        group = "cli-group"
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None:
            pass

    async def run() -> datetime:
        serializer = serializer_for([ContractAccount])
        async with await open_placed_storage(settings=settings, serializer=serializer) as s:
            writer = Writer(s)
            await writer.write(pair, 3)
            await writer.write(pair[1:], 2)  # offsets 1..8 of the partition, 6 in home's
            async with await start_readside([relay], journal_settings=settings, **FAST) as r:
                await r.wait_until_caught_up(timeout=30)
            await asyncio.sleep(0.05)
            middle = datetime.now(UTC)
            await asyncio.sleep(0.05)
            await writer.write(pair, 2)  # 9..12
            async with await start_readside([relay], journal_settings=settings, **FAST) as r:
                await r.wait_until_caught_up(timeout=30)
        fast = ReadSideSettings(**FAST)
        async with await start_subscribers([Group], journal_settings=settings, settings=fast) as g:
            await g.wait_until_caught_up(timeout=30)
            assert [s.offset for s in await g.status("cli-group")][partition] == 12
        return middle

    middle = asyncio.run(run())
    tag = contract_topic.partition_tag(partition)
    result = CliRunner().invoke(
        build_app(),
        [
            "topics", "reset", contract_topic.name, "cli-group", "--to-time", middle.isoformat(),
            "--tag", tag, "--url", home_url, "--journal-url", home_url,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"partition {tag}: resumes after offset 8" in result.output
