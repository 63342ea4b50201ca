"""The topic route over real HTTP (bad input gets problem documents, the long poll answers as
soon as a message commits), the JSON form of messages, and what a topic or subscriber
declaration refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import pytest_asyncio
from fastapi import FastAPI, Response

from lagompy.entity import Effect, PersistentEntity, tag
from lagompy.errors import ConfigurationError, TopicMessageInvalid
from lagompy.journal._model import EventEnvelope
from lagompy.journal._storage import open_storage, serializer_for
from lagompy.serialization import serializable
from lagompy.service import BreakerRegistry, Service, ServiceClient
from lagompy.settings import JournalSettings
from lagompy.testkit.server import free_port, serve_in_thread
from lagompy.testkit.topics import (
    ContractAccount,
    Deposit,
    Deposited,
    TopicEnv,
    contract_topic,
)
from lagompy.topic import (
    HttpTransport,
    Message,
    StartFrom,
    Subscriber,
    SubscribersComponent,
    Topic,
    TopicsComponent,
    entity_key,
    message_command_id,
    message_from_json,
    message_to_json,
    messages_from_json,
    messages_to_json,
    start_subscribers,
)
from lagompy.topic._codec import COLUMNS, messages_from_columns, messages_to_columns


@pytest.fixture
def settings(tmp_path: Path) -> JournalSettings:
    return JournalSettings(url=f"sqlite:///{tmp_path / 'topics.db'}")


@pytest.fixture
def producer(settings: JournalSettings) -> Iterator[str]:
    topics = TopicsComponent([contract_topic], journal_settings=settings)
    service = Service(name="producer", components=[topics])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    with serve_in_thread(app) as base_url:
        yield base_url


@pytest_asyncio.fixture
async def env(settings: JournalSettings) -> AsyncIterator[TopicEnv]:
    from lagompy.readside import ReadSideSettings

    serializer = serializer_for([ContractAccount])
    storage = await open_storage(settings=settings, serializer=serializer)
    env = TopicEnv(storage, settings, ReadSideSettings())
    try:
        yield env
    finally:
        await env.close()


PARTITION = "/topics/contract-deposits/partitions"


@pytest.mark.asyncio
async def test_bad_requests_get_problem_documents_naming_what_was_wrong(producer: str) -> None:
    cases = {
        "/topics/nope/partitions/0": (404, "no topic named 'nope'"),
        f"{PARTITION}/2": (404, "partitions 0 to 1, not 2"),
        f"{PARTITION}/-1": (404, "not -1"),
        f"{PARTITION}/x": (422, "partition"),
        f"{PARTITION}/0?after=-1": (422, "after"),
        f"{PARTITION}/0?after=abc": (422, "after"),
        f"{PARTITION}/0?after={2**63}": (422, "after"),  # beyond SQL's BIGINT
        f"{PARTITION}/0/position?after={2**63}": (422, "after"),
        f"{PARTITION}/0?limit=0": (422, "limit"),
        f"{PARTITION}/0?limit=10001": (422, "limit"),
        f"{PARTITION}/0?wait=31": (422, "wait"),
        f"{PARTITION}/0/position?time=yesterday": (422, "time"),
        f"{PARTITION}/0/position?time=2026-12-04T18:00:00": (422, "needs a zone"),
        f"{PARTITION}/9/position": (404, "not 9"),
    }
    async with httpx.AsyncClient(base_url=producer) as client:
        for path, (status, words) in cases.items():
            reply = await client.get(path)
            assert reply.status_code == status, path
            assert reply.headers["content-type"] == "application/problem+json", path
            text = reply.text
            assert words in text, (path, text)
            assert "sqlite" not in text and "Traceback" not in text, path


@pytest.mark.asyncio
async def test_the_route_serves_messages_with_their_metadata_and_long_polls(
    producer: str, env: TopicEnv
) -> None:
    written = await env.append(Deposited("ada", 5))
    partition = contract_topic.partition_of("ada")
    async with httpx.AsyncClient(base_url=producer, timeout=10) as client:
        listed = (await client.get("/topics")).json()
        assert listed == [
            {"name": "contract-deposits", "partitions": 2, "type": "Deposit", "version": 1}
        ]
        page = (await client.get(f"{PARTITION}/{partition}")).json()
        assert page["last_offset"] == written[0].offset and page["full"] is False
        (message,) = page["messages"]
        assert message["payload"] == {"account": "ada", "amount": 5}
        assert (message["key"], message["offset"], message["type"], message["version"]) == (
            "ada",
            written[0].offset,
            "Deposit",
            1,
        )
        assert datetime.fromisoformat(message["timestamp"]) == written[0].timestamp
        # A client that asks for MessagePack (lagompy's feeds do) gets the same body in it.
        packed = await client.get(
            f"{PARTITION}/{partition}", headers={"Accept": "application/msgpack"}
        )
        assert packed.headers["content-type"] == "application/msgpack"
        assert msgpack.unpackb(packed.content) == page
        # lagompy's feeds ask for columns: the same messages, without an object per message.
        columns = await client.get(
            f"{PARTITION}/{partition}", headers={"Accept": f"{COLUMNS}, application/msgpack"}
        )
        assert columns.headers["content-type"] == COLUMNS
        body = msgpack.unpackb(columns.content)
        assert (body["last_offset"], body["full"], body["offset"]) == (
            page["last_offset"],
            False,
            [written[0].offset],
        )
        assert messages_from_columns(contract_topic, body, partition=partition) == (
            messages_from_json(contract_topic, page["messages"], partition=partition)
        )
        # Without an Accept (curl, another language), JSON stays the answer.
        assert (await client.get(f"{PARTITION}/{partition}")).headers["content-type"] == (
            "application/json"
        )

        # Caught up: the long poll answers when a message commits, not at the end of `wait`.
        after = page["last_offset"]
        started = time.monotonic()
        poll = asyncio.create_task(
            client.get(f"{PARTITION}/{partition}", params={"after": after, "wait": 5})
        )
        await asyncio.sleep(0.3)
        more = await env.append(Deposited("ada", 6))
        reply = (await poll).json()
        assert [m["offset"] for m in reply["messages"]] == [more[0].offset]
        assert time.monotonic() - started < 2.5
        # Nothing comes: it answers after `wait`, empty, at the same position.
        started = time.monotonic()
        empty = (
            await client.get(
                f"{PARTITION}/{partition}", params={"after": reply["last_offset"], "wait": 0.3}
            )
        ).json()
        assert empty["messages"] == [] and empty["last_offset"] == reply["last_offset"]
        assert 0.25 <= time.monotonic() - started < 2.0
        head = (await client.get(f"{PARTITION}/{partition}/position")).json()
        assert head["offset"] == more[0].offset


@pytest.mark.asyncio
async def test_a_feed_pulls_several_batches_at_once_and_hands_them_out_in_order(
    producer: str, env: TopicEnv
) -> None:
    written = [e.offset for e in await env.append(*(Deposited("ada", n) for n in range(7)))]
    partition = contract_topic.partition_of("ada")
    recording = _Recording()
    async with ServiceClient(producer, transport=recording, breaker=False) as client:
        feed = HttpTransport(client, pull_limit=5).feed(contract_topic, partition, group="g")
        first = await feed.next_batch(0, 2)
        second = await feed.next_batch(first.last_offset, 2)
        third = await feed.next_batch(second.last_offset, 2)
        assert len(recording.content_types) == 1  # one pull of five so far
        assert [m.offset for m in first.messages + second.messages + third.messages] == (
            written[:5]
        )
        assert (first.full, second.full, first.last_offset) == (True, True, written[1])
        assert third.full and third.last_offset == written[4]  # the pull was full
        # The position moves back (a failed transaction): from there, pulled again.
        again = await feed.next_batch(written[0], 2)
        assert [m.offset for m in again.messages] == written[1:3]
        assert len(recording.content_types) == 2
        rest = await feed.next_batch(written[4], 10)  # what that pull (full) has left
        assert [m.offset for m in rest.messages] == [written[5]] and rest.full
        last = await feed.next_batch(written[5], 10)
        assert [m.offset for m in last.messages] == [written[6]] and not last.full
    with pytest.raises(ConfigurationError, match="pull_limit must be 1 to 10,000"):
        HttpTransport(producer, pull_limit=0)


@pytest.mark.asyncio
async def test_a_feed_pulls_1000_at_most_from_a_producer_that_takes_no_more(
    env: TopicEnv,
) -> None:
    """A producer of an older lagompy answers a limit above 1,000 with a 422."""
    from lagompy.topic import topic_router

    app = FastAPI()
    app.include_router(topic_router([contract_topic], env.journal))
    limits: list[int] = []

    @app.middleware("http")
    async def older(request: Any, call_next: Any) -> Any:
        limit = int(request.query_params.get("limit", 100))
        limits.append(limit)
        if limit > 1000:
            return Response(status_code=422, content=b'{"detail": "limit"}')
        return await call_next(request)

    written = await env.append(Deposited("ada", 1))
    with serve_in_thread(app) as url:
        transport = HttpTransport(url, breakers=BreakerRegistry())
        feed = transport.feed(contract_topic, contract_topic.partition_of("ada"), group="g")
        batch = await feed.next_batch(0, 100)
        await feed.next_batch(batch.last_offset, 100)
        await transport.close()
    assert [m.offset for m in batch.messages] == [written[0].offset]
    assert limits == [5000, 1000, 1000]


class _Recording(httpx.AsyncBaseTransport):
    """Real HTTP, with the content type of every answer kept."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.content_types: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.content_types.append(response.headers.get("content-type", ""))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.asyncio
async def test_the_feed_pulls_batches_as_columns(producer: str, env: TopicEnv) -> None:
    written = await env.append(*(Deposited("ada", n) for n in range(1, 4)))
    partition = contract_topic.partition_of("ada")
    recording = _Recording()
    async with ServiceClient(producer, transport=recording, breaker=False) as client:
        feed = HttpTransport(client).feed(contract_topic, partition, group="g")
        batch = await feed.next_batch(0, 2)
        assert [m.offset for m in batch.messages] == [w.offset for w in written[:2]]
        assert batch.full and batch.last_offset == written[1].offset
        rest = await feed.next_batch(batch.last_offset, 100)
        assert [m.payload for m in rest.messages] == [Deposit("ada", 3)] and not rest.full
    assert recording.content_types == [COLUMNS]  # one pull brought all three


@pytest.mark.asyncio
async def test_a_pull_is_read_encoded_and_decoded_with_the_collector_paused_but_not_its_wait(
    producer: str, env: TopicEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lagompy.journal._tailing import PageTailer
    from lagompy.topic._embedded import batch_of

    seen: dict[str, list[bool]] = {"read": [], "map": [], "wait": [], "decode": []}

    def watch(name: str, call: Any) -> Any:
        def watched(*args: Any, **kwargs: Any) -> Any:
            seen[name].append(gc.isenabled())
            return call(*args, **kwargs)

        return watched

    http = "lagompy.topic._http."
    monkeypatch.setattr(PageTailer, "next_page", watch("read", PageTailer.next_page))
    monkeypatch.setattr(PageTailer, "wait", watch("wait", PageTailer.wait))
    # Mapped where the tag's feed maps it (the route reads through the journal's log).
    monkeypatch.setattr("lagompy.topic._embedded.batch_of", watch("map", batch_of))
    monkeypatch.setattr(http + "messages_from_columns", watch("decode", messages_from_columns))
    await env.append(Deposited("ada", 1))
    async with ServiceClient(producer, breaker=False) as client:
        feed = HttpTransport(client, long_poll=0.2).feed(
            contract_topic, contract_topic.partition_of("ada"), group="g"
        )
        batch = await feed.next_batch(0, 100)
        await feed.wait()  # caught up: a long poll of 0.2 s, which finds nothing
    assert len(batch.messages) == 1 and gc.isenabled()
    # read and mapped twice (the pull, the long poll's first look and its last), decoded once
    assert seen["read"] == seen["map"] == [False] * 3
    assert seen["wait"] == [True] and seen["decode"] == [False, False]


@pytest.mark.asyncio
async def test_the_page_after_a_full_one_is_read_ahead_and_served_only_if_full(
    producer: str, env: TopicEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lagompy.journal import Journal

    reads: list[int] = []
    read_tag_made = Journal.read_tag_made

    def counted(self: Journal, tag: str, make: Any, **kwargs: Any) -> Any:
        # The partition's messages are made from its rows (the topic's key is the default).
        if tag.startswith("topic-contract-"):
            reads.append(kwargs["after_offset"])
        return read_tag_made(self, tag, make, **kwargs)

    async def read_at(offset: int) -> None:
        for _ in range(200):
            if offset in reads:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no read after offset {offset}: {reads}")

    monkeypatch.setattr(Journal, "read_tag_made", counted)
    written = [e.offset for e in await env.append(*(Deposited("ada", n) for n in range(5)))]
    path = f"{PARTITION}/{contract_topic.partition_of('ada')}"
    async with httpx.AsyncClient(base_url=producer, timeout=10) as client:

        async def pull(after: int) -> list[int]:
            body = (await client.get(path, params={"after": after, "limit": 2})).json()
            return [m["offset"] for m in body["messages"]]

        assert await pull(0) == written[:2]
        await read_at(written[1])  # the next page, read while the first travelled
        assert await pull(written[1]) == written[2:4]
        assert reads.count(written[1]) == 1  # that pull was answered from it
        await read_at(written[3])  # read ahead again, but short: one event
        more = await env.append(Deposited("ada", 5))
        # A short page may have grown since it was read: the pull reads it again.
        assert await pull(written[3]) == [written[4], more[0].offset]


class _Held(Subscriber[Deposit]):
    """Handles nothing until released."""

    group = "held"
    topic = contract_topic
    release: asyncio.Event | None = None

    async def handle(self, conn: Any, message: Message[Deposit]) -> None:
        assert self.release is not None
        await self.release.wait()


@pytest.mark.asyncio
async def test_waiting_for_a_catch_up_reads_no_rows_while_a_worker_here_is_behind(
    env: TopicEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lagompy.readside._store import OffsetStore

    await env.append(*(Deposited(f"h{i}", i) for i in range(4)))
    _Held.release = asyncio.Event()
    reads = 0
    rows = OffsetStore.rows

    async def counted(self: OffsetStore, processor: str) -> Any:
        nonlocal reads
        reads += 1
        return await rows(self, processor)

    monkeypatch.setattr(OffsetStore, "rows", counted)
    async with start_subscribers([_Held], journal_settings=env.subscriber_journal) as subs:
        waiting = asyncio.create_task(subs.wait_until_caught_up(timeout=20))
        for _ in range(200):  # until both workers hold their lease, in a handler
            if all(w.state == "running" and w.lease is not None for w in subs.workers):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        before = reads
        await asyncio.sleep(0.3)  # 30 rounds of the wait's loop
        assert reads == before and not waiting.done()
        _Held.release.set()
        await waiting
    assert [w.offset for w in subs.workers] == await env.heads()


def test_messages_round_trip_through_json_and_bad_ones_are_named() -> None:
    message = Message(
        topic="contract-deposits",
        payload=Deposit("ada", 5),
        key="ada",
        partition=1,
        offset=42,
        timestamp=datetime(2026, 12, 4, 18, 0, tzinfo=UTC),
        type_name="Deposit",
        version=1,
        entity_type="topic-contract-account",
        entity_id="ada",
        seq_nr=3,
    )
    data = message_to_json(message)
    assert message_from_json(contract_topic, data, partition=1) == message
    bad: list[tuple[Any, str]] = [
        ([], "must be a JSON object"),
        ({**data, "payload": {"account": "ada"}}, "amount"),
        ({**data, "payload": {"account": "ada", "amount": "lots"}}, "amount"),
        ({**data, "topic": "other"}, "expected a message of topic 'contract-deposits'"),
        ({**data, "version": 2}, "newer than this side's"),
        ({**data, "type": "Withdrawal"}, "is not this topic's"),
        ({**data, "offset": "42"}, "'offset' must be a int"),
        ({**data, "timestamp": "soon"}, "bad timestamp"),
    ]
    for value, words in bad:
        with pytest.raises(TopicMessageInvalid, match=words):
            message_from_json(contract_topic, value, partition=1)
    with pytest.raises(TopicMessageInvalid, match="partition 0"):
        message_from_json(contract_topic, data, partition=0)
    # A batch is validated in one call, and names the message and field that do not fit.
    batch = [data, {**data, "offset": 43}]
    assert [m.offset for m in messages_from_json(contract_topic, batch, partition=1)] == [42, 43]
    batch[1] = {**data, "payload": {"account": "ada"}}
    with pytest.raises(TopicMessageInvalid, match=r"first: 1\.amount: Field required"):
        messages_from_json(contract_topic, batch, partition=1)
    assert messages_to_json([message], Deposit) == [data]


def _columns(items: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON message objects of one partition as messages_to_columns lays them out."""
    first = items[0]
    fields = ("offset", "key", "timestamp", "version", "entity_type", "entity_id", "seq_nr")
    return {
        "topic": first["topic"],
        "partition": first["partition"],
        "type": first["type"],
        **{f: [d[f] for d in items] for f in (*fields, "payload")},
    }


def test_batches_round_trip_through_columns_and_bad_ones_are_named() -> None:
    stamp = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)
    messages = [
        Message(
            topic="contract-deposits",
            payload=Deposit(f"acct-{i}", i),
            key=f"acct-{i}",
            partition=1,
            offset=40 + i,
            timestamp=stamp if i < 2 else datetime(2026, 12, 4, 18, 1, tzinfo=UTC),
            type_name="Deposit",
            version=1,
            entity_type="topic-contract-account",
            entity_id=f"acct-{i}",
            seq_nr=i,
        )
        for i in range(3)
    ]
    columns = messages_to_columns(contract_topic, 1, messages)
    assert columns == _columns(messages_to_json(messages, Deposit))
    wire = msgpack.unpackb(msgpack.packb(columns))
    assert messages_from_columns(contract_topic, wire, partition=1) == messages
    empty = msgpack.unpackb(msgpack.packb(messages_to_columns(contract_topic, 1, [])))
    assert messages_from_columns(contract_topic, empty, partition=1) == []
    bad: list[tuple[Any, str]] = [
        ([], "a batch must be a map"),
        ({**wire, "topic": "other"}, "expected messages of topic 'contract-deposits'"),
        ({**wire, "partition": 0}, "partition 0"),
        ({**wire, "type": "Withdrawal"}, "is not this topic's"),
        ({**wire, "payload": None}, "column 'payload' must be an array"),
        ({**wire, "key": ["a"]}, "column 'key' must be an array of 3 items"),
        ({**wire, "offset": [40, "41", 42]}, "column 'offset' must hold ints, got '41'"),
        ({**wire, "seq_nr": [0, True, 2]}, "column 'seq_nr' must hold ints"),
        ({**wire, "version": [1, 2, 1]}, "version 2 is newer than this side's"),
        ({**wire, "timestamp": ["soon"] * 3}, "bad timestamp"),
        ({**wire, "payload": [{"account": "a"}] * 3}, r"first: 0\.amount: Field required"),
    ]
    for value, words in bad:
        with pytest.raises(TopicMessageInvalid, match=words):
            messages_from_columns(contract_topic, value, partition=1)


def test_command_ids_come_from_the_message_position() -> None:
    message = message_from_json(
        contract_topic,
        {
            "topic": "contract-deposits",
            "partition": 0,
            "offset": 7,
            "key": "k",
            "timestamp": "2026-12-04T18:00:00+00:00",
            "type": "Deposit",
            "version": 1,
            "entity_type": "e",
            "entity_id": "k",
            "seq_nr": 1,
            "payload": {"account": "k", "amount": 1},
        },
        partition=0,
    )
    assert message_command_id(message) == "topic:contract-deposits:0:7"
    assert message_command_id(message, "notify") == "topic:contract-deposits:0:7:notify"


@dataclass(frozen=True)
class BigDeposit(Deposit):
    """A subclass of the message type: a message too."""


def test_a_page_of_events_maps_to_the_messages_of_each_event_filtered_ones_left_out() -> None:
    def mapping(event: Any) -> Any:
        if event.amount % 3 == 0:
            return None  # filtered out
        if event.amount == 4:
            return BigDeposit(event.account, event.amount)
        return Deposit(event.account, event.amount)

    at = datetime(2026, 12, 7, tzinfo=UTC)
    envelopes = [
        EventEnvelope("account", f"a{i}", i + 1, 10 + i, at, Deposited(f"a{i}", i), ("t",), {})
        for i in range(7)
    ]
    for key in (entity_key, lambda e: f"{e.entity_id}/{e.seq_nr}"):
        topic = Topic("mapped", Deposit, source=ContractAccount, to_message=mapping, key=key)
        one_by_one = [m for e in envelopes if (m := topic.message(e, 1)) is not None]
        page = topic.messages(envelopes, 1)
        assert page == one_by_one
        assert [m.offset for m in page] == [11, 12, 14, 15]
        assert [m.key for m in page] == [key(e) for e in envelopes if e.offset in (11, 12, 14, 15)]
        assert type(page[2].payload) is BigDeposit
        first = page[0]
        assert (first.topic, first.partition, first.timestamp, first.type_name) == (
            "mapped", 1, at, "Deposit",
        )  # fmt: skip
        assert (first.entity_type, first.entity_id, first.seq_nr) == ("account", "a1", 2)
        assert dataclasses.replace(first, offset=99).offset == 99

    def not_a_deposit(event: Any) -> Any:
        return Mutable(1)

    wrong = Topic("wrong", Deposit, source=ContractAccount, to_message=not_a_deposit)
    for make in (lambda: wrong.messages(envelopes, 0), lambda: wrong.message(envelopes[0], 0)):
        with pytest.raises(TypeError, match="returned a Mutable for the event at offset 10"):
            make()


@dataclass
class Mutable:
    x: int


class Untagged(PersistentEntity[Any, Deposited, Any]):
    type_name = "untagged"
    initial_state = Deposit("", 0)
    tag = tag("plain")

    def on_command(self, state: Any, command: Any) -> Effect[Any]:
        return Effect.unhandled()

    def on_event(self, state: Any, event: Deposited) -> Any:
        return state


def test_declarations_refuse_what_cannot_work() -> None:
    def none(event: Any) -> None:
        return None

    refused: list[tuple[Any, str]] = [
        (lambda: Topic("bad name", Deposit, source=ContractAccount, to_message=none), "letters"),
        (lambda: Topic("t", Mutable, source=ContractAccount, to_message=none), "frozen"),
        (lambda: Topic("t", int, source=ContractAccount, to_message=none), "dataclass"),
        (lambda: Topic("t", Deposit, source=Untagged, to_message=none), "sharded_tag"),
        (lambda: Topic("t", Deposit, source=Deposit, to_message=none), "PersistentEntity"),  # type: ignore[arg-type]
        (lambda: StartFrom.after_offset(-1), "from 0 to"),
        (lambda: StartFrom.after_offset(2**63), f"from 0 to {2**63 - 1}, got {2**63}"),
        (lambda: StartFrom.at_time(datetime(2026, 1, 1)), "timezone-aware"),
        (lambda: contract_topic.partition_tag(2), "partitions 0 to 1"),
    ]
    for make, words in refused:
        with pytest.raises(ConfigurationError, match=words):
            make()

    class NoHandle(Subscriber[Deposit]):
        group = "g"
        topic = contract_topic

    class NoGroup(Subscriber[Deposit]):
        topic = contract_topic

        async def handle(self, conn: Any, message: Message[Deposit]) -> None: ...

    class NoTopic(Subscriber[Deposit]):
        group = "g"

        async def handle(self, conn: Any, message: Message[Deposit]) -> None: ...

    with pytest.raises(ConfigurationError, match="encoding must be 'msgpack' or 'json'"):
        Topic("t", Deposit, source=ContractAccount, to_message=_deposit_v3, encoding="xml")  # type: ignore[arg-type]
    for cls, words in [(NoHandle, "handle"), (NoGroup, "group"), (NoTopic, "needs a topic")]:
        with pytest.raises(ConfigurationError, match=words):
            cls.validate()


class Ledger(Subscriber[Deposit]):
    group = "ledger"
    topic = contract_topic

    async def handle(self, conn: Any, message: Message[Deposit]) -> None:
        pass


@pytest.mark.asyncio
async def test_a_subscriber_over_http_shows_its_lag_status_and_metrics(
    producer: str, env: TopicEnv, tmp_path: Path
) -> None:
    await env.append(*(Deposited(f"m{i}", i) for i in range(6)))
    own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
    transport = HttpTransport(producer, breakers=BreakerRegistry())
    async with start_subscribers([Ledger], transport=transport, journal_settings=own) as subs:
        await subs.wait_until_caught_up(timeout=20)
        heads = await env.heads()
        status = sorted(await subs.status("ledger"), key=lambda s: s.tag)
        assert [(s.offset, s.head_offset, s.lag_events) for s in status] == [
            (h, h, 0) for h in heads
        ]
        await subs.pause("ledger")
        # Each worker sees the pause at its next renewal (a read in flight may still commit
        # what it brings): once it holds it stores the state "paused" in its row (the status
        # says "paused" from the flag at once) and reads nothing more.
        store, processor = subs.projections.store, status[0].processor
        async with asyncio.timeout(10):
            while any(r.state != "paused" for r in await store.rows(processor)):
                await asyncio.sleep(0.05)
        more = await env.append(Deposited("m0", 9))
        partition = contract_topic.partition_of("m0")
        status = sorted(await subs.status("ledger"), key=lambda s: s.tag)
        behind = status[partition]
        assert behind.state == "paused"
        assert behind.lag_events == 1 and behind.head_offset == more[0].offset
        assert behind.lag_seconds is not None and behind.lag_seconds >= 0
    await transport.close()

    # In a service: the status route, readiness and metrics.
    component = SubscribersComponent(
        [Ledger],
        transport=HttpTransport(producer, breakers=BreakerRegistry()),
        journal_settings=own,
    )
    service = Service(name="ledger", components=[component])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    with serve_in_thread(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            rows = (await client.get("/topics/subscribers")).json()
            assert {r["tag"]: r["state"] for r in rows}[
                contract_topic.partition_tag(partition)
            ] == "paused"
            ready = (await client.get("/health/ready")).json()
            assert ready["checks"]["subscribers"] == "ok", ready  # paused is not stuck
            scraped = (await client.get("/metrics")).text
            assert 'lagompy_topic_subscriber_lag_events{group="ledger",partition="' in scraped
            assert 'state="paused",topic="contract-deposits"} 1.0' in scraped


@pytest.mark.asyncio
async def test_a_new_group_whose_producer_is_down_starts_and_says_why(tmp_path: Path) -> None:
    class Latest(Ledger):
        group = "latest"
        start_from = StartFrom.latest()

    down = f"http://127.0.0.1:{free_port()}"
    own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
    transport = HttpTransport(down, breakers=BreakerRegistry())
    async with start_subscribers([Latest], transport=transport, journal_settings=own) as subs:
        async with asyncio.timeout(10):
            while not subs.problems():
                await asyncio.sleep(0.02)
        (problem,) = subs.problems()
        assert "finding where it starts failed" in problem and "cannot be reached" in problem
        assert "127.0.0.1" not in problem  # no URL in what the status shows
    await transport.close()


# --------------------------------------------------------------------------- older versions


@serializable(
    name="Deposit",
    version=3,
    upcasters={1: lambda d: {**d, "currency": "EUR"}, 2: lambda d: {**d, "note": ""}},
)
@dataclass(frozen=True)
class DepositV3:
    """The contract topic's message two versions later, as an upgraded subscriber declares it."""

    account: str
    amount: int
    currency: str
    note: str


def _deposit_v3(event: Deposited | Any) -> DepositV3 | None:
    return (
        DepositV3(event.account, event.amount, "EUR", "") if isinstance(event, Deposited) else None
    )


deposits_v3 = Topic("contract-deposits", DepositV3, source=ContractAccount, to_message=_deposit_v3)


def test_older_versions_are_upcast_and_what_cannot_be_is_named() -> None:
    data = {
        "topic": "contract-deposits",
        "partition": 0,
        "offset": 7,
        "key": "ada",
        "timestamp": "2026-12-04T18:00:00+00:00",
        "type": "Deposit",
        "version": 1,
        "entity_type": "topic-contract-account",
        "entity_id": "ada",
        "seq_nr": 1,
        "payload": {"account": "ada", "amount": 5},
    }
    message = message_from_json(deposits_v3, data, partition=0)
    assert message.payload == DepositV3("ada", 5, "EUR", "")
    assert message.version == 1  # the version it was sent in
    v2 = {
        **data,
        "offset": 8,
        "version": 2,
        "payload": {"account": "bo", "amount": 1, "currency": "USD"},
    }
    v3 = {
        **data,
        "offset": 9,
        "version": 3,
        "payload": {"account": "cy", "amount": 2, "currency": "CHF", "note": "n"},
    }
    batch = messages_from_json(deposits_v3, [data, v2, v3], partition=0)
    assert [m.payload for m in batch] == [
        DepositV3("ada", 5, "EUR", ""),
        DepositV3("bo", 1, "USD", ""),
        DepositV3("cy", 2, "CHF", "n"),
    ]
    # What cannot be upcast is named: no upcaster, an upcaster that fails, version 0.
    gap = Topic("contract-deposits", DepositGap, source=ContractAccount, to_message=lambda e: None)
    bad: list[tuple[Topic[Any], dict[str, Any], str]] = [
        (gap, data, "has no upcaster from version 1 to 2"),
        (deposits_v3, {**data, "payload": ["ada", 5]}, "must be a JSON object to be upcast"),
        (deposits_v3, {**data, "version": 0}, "version 0 is not one this side reads"),
        (failing, data, "upcaster from version 1 to 2 raised KeyError"),
    ]
    for topic, value, words in bad:
        with pytest.raises(TopicMessageInvalid, match=words):
            message_from_json(topic, value, partition=0)
        with pytest.raises(TopicMessageInvalid, match=words):
            messages_from_json(topic, [value], partition=0)
        with pytest.raises(TopicMessageInvalid, match=words):
            messages_from_columns(topic, _columns([value]), partition=0)
    upcast = messages_from_columns(deposits_v3, _columns([data, v2, v3]), partition=0)
    assert upcast == batch


@serializable(name="Deposit", version=2)
@dataclass(frozen=True)
class DepositGap:
    account: str
    amount: int
    currency: str


@serializable(name="Deposit", version=2, upcasters={1: lambda d: {**d, "currency": d["nope"]}})
@dataclass(frozen=True)
class DepositFailing:
    account: str
    amount: int
    currency: str


failing = Topic(
    "contract-deposits", DepositFailing, source=ContractAccount, to_message=lambda e: None
)


class LedgerV3(Subscriber[DepositV3]):
    group = "ledger-v3"
    topic = deposits_v3

    async def prepare(self, conn: Any) -> None:
        await conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS ledger_v3 (account TEXT, amount INT, currency TEXT)"
        )

    async def handle(self, conn: Any, message: Message[DepositV3]) -> None:
        p = message.payload
        await conn.exec_driver_sql(
            "INSERT INTO ledger_v3 VALUES (?, ?, ?)", (p.account, p.amount, p.currency)
        )


@pytest.mark.asyncio
async def test_a_subscriber_reads_an_older_producers_messages_over_http(
    producer: str, env: TopicEnv, tmp_path: Path
) -> None:
    # The producer still publishes Deposit version 1; the subscriber was upgraded to version 3.
    await env.append(Deposited("ada", 5), Deposited("bo", 7))
    own = JournalSettings(url=f"sqlite:///{tmp_path / 'subscriber.db'}")
    transport = HttpTransport(producer, breakers=BreakerRegistry())
    try:
        async with start_subscribers([LedgerV3], transport=transport, journal_settings=own) as subs:
            await subs.wait_until_caught_up(timeout=20)
    finally:
        await transport.close()
    with sqlite3.connect(tmp_path / "subscriber.db") as con:
        rows = sorted(con.execute("SELECT account, amount, currency FROM ledger_v3"))
    assert rows == [("ada", 5, "EUR"), ("bo", 7, "EUR")]
