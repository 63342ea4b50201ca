"""A topic subscriber over HTTP parks a poisoned message (its JSON form kept in the subscriber's
database, on SQLite files and PostgreSQL schemas), goes on, and applies it once when retried
after the cause is fixed; ``lagompy topics parked|retry|discard``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from typer.testing import CliRunner

from lagompy.cli import build_app
from lagompy.journal import TailSettings
from lagompy.journal._storage import open_storage, serializer_for
from lagompy.readside import ParkedFilter
from lagompy.service import BreakerRegistry, Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from lagompy.testkit.topics import (
    ContractAccount,
    Deposit,
    Deposited,
    TopicEnv,
    contract_topic,
)
from lagompy.topic import HttpTransport, Message, Subscriber, TopicsComponent, start_subscribers
from lagompy.topic._component import status_samples

FAST: dict[str, Any] = {
    "lease_ttl": 2.0,
    "renew_interval": 0.05,
    "tail": TailSettings(poll_interval=0.02),
    "retry_initial_delay": 0.01,
    "retry_max_delay": 0.02,
    "max_attempts": 2,
    "on_failure": "park",
}


class PoisonedLedger(Subscriber[Deposit]):
    group = "poisoned-ledger"
    topic = contract_topic
    poison: ClassVar[set[str]] = set()

    async def prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS parked_ledger ("
                "msg_offset BIGINT NOT NULL, account VARCHAR(100) NOT NULL, amount BIGINT)"
            )
        )

    async def handle(self, conn: AsyncConnection, message: Message[Deposit]) -> None:
        if message.payload.account in type(self).poison:
            raise KeyError(f"account {message.payload.account} is poisoned")
        await conn.execute(
            text("INSERT INTO parked_ledger VALUES (:o, :a, :m)"),
            {"o": message.offset, "a": message.payload.account, "m": message.payload.amount},
        )


@pytest.fixture
def producer_settings(tmp_path: Path) -> JournalSettings:
    return JournalSettings(url=f"sqlite:///{tmp_path / 'producer.db'}")


@pytest.fixture
def producer(producer_settings: JournalSettings) -> Iterator[str]:
    topics = TopicsComponent([contract_topic], journal_settings=producer_settings)
    service = Service(name="producer", components=[topics])
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    with serve_in_thread(app) as base_url:
        yield base_url


@pytest_asyncio.fixture
async def env(producer_settings: JournalSettings) -> AsyncIterator[TopicEnv]:
    from lagompy.readside import ReadSideSettings

    storage = await open_storage(
        settings=producer_settings, serializer=serializer_for([ContractAccount])
    )
    env = TopicEnv(storage, producer_settings, ReadSideSettings())
    try:
        yield env
    finally:
        await env.close()
        PoisonedLedger.poison = set()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_subscriber_over_http_parks_a_poisoned_message_and_retries_it(
    producer: str, env: TopicEnv, journal_settings: JournalSettings
) -> None:
    written = await env.append(Deposited("good", 1), Deposited("bad", 2), Deposited("good", 3))
    bad = next(e for e in written if e.entity_id == "bad")
    PoisonedLedger.poison = {"bad"}
    transport = HttpTransport(producer, breakers=BreakerRegistry())
    async with start_subscribers(
        [PoisonedLedger], transport=transport, journal_settings=journal_settings, **FAST
    ) as subs:
        await subs.wait_until_caught_up(timeout=20)

        async def ledger() -> list[tuple[int, str]]:
            async with subs.database.read() as conn:
                rows = await conn.execute(
                    text("SELECT msg_offset, account FROM parked_ledger ORDER BY 1")
                )
                return [(int(o), str(a)) for o, a in rows.all()]

        assert [a for _, a in await ledger()] == ["good", "good"]
        (row,) = await subs.parked("poisoned-ledger")
        assert (row.consumer_kind, row.consumer) == (
            "subscriber",
            "topic:contract-deposits:poisoned-ledger",
        )
        assert (row.offset, row.entity_id, row.event_type) == (bad.offset, "bad", "Deposit")
        assert row.error_class == "KeyError" and row.attempts == 2
        assert row.message is not None
        message = json.loads(row.message)
        assert message["payload"] == {"account": "bad", "amount": 2}
        assert message["offset"] == bad.offset
        statuses = await subs.status("poisoned-ledger")
        assert sum(s.parked for s in statuses) == 1
        assert all(s.state == "running" for s in statuses)

        def labels(s: Any) -> dict[str, str]:
            return {"partition": s.tag}

        samples = status_samples("subscriber", "the group", statuses, labels)
        assert sum(v for n, _, _, _, v in samples if n == "lagompy_topic_subscriber_parked") == 1

        # The producer is not asked again: the stored message is handled once the cause is
        # fixed, and its row deleted in the same transaction.
        PoisonedLedger.poison = set()
        assert await subs.retry_parked("poisoned-ledger") == 1

        async def gone() -> bool:
            return not await subs.parked()

        await eventually(gone)
        assert sorted(a for _, a in await ledger()) == ["bad", "good", "good"]
        assert (bad.offset, "bad") in await ledger()
        assert sum(s.parked for s in await subs.status("poisoned-ledger")) == 0
    await transport.close()


@pytest.mark.asyncio
async def test_cli_topics_parked_retry_discard(
    producer: str, env: TopicEnv, journal_settings: JournalSettings
) -> None:
    await env.append(Deposited("bad", 2), Deposited("worse", 3))
    PoisonedLedger.poison = {"bad", "worse"}
    transport = HttpTransport(producer, breakers=BreakerRegistry())
    app = build_app()
    runner = CliRunner()
    args = ["--journal-url", journal_settings.url]
    if journal_settings.postgres_schema:
        args += ["--journal-schema", journal_settings.postgres_schema]

    async def run(*words: str) -> Any:
        return await asyncio.to_thread(runner.invoke, app, ["topics", *words, *args])

    async with start_subscribers(
        [PoisonedLedger], transport=transport, journal_settings=journal_settings, **FAST
    ) as subs:
        await subs.wait_until_caught_up(timeout=20)
        result = await run("parked")
        assert result.exit_code == 0, result.output
        assert len(result.stdout.splitlines()) == 5
        assert "topic:contract-deposits:poisoned-ledger" in result.stdout
        result = await run("parked", "contract-deposits")
        assert result.exit_code == 1 and "name both the topic and the group" in result.output
        result = await run("retry", "contract-deposits", "poisoned-ledger", "--entity", "x")
        assert result.exit_code == 1 and "no parked event matches" in result.output
        PoisonedLedger.poison = {"worse"}
        result = await run(
            "retry",
            "contract-deposits",
            "poisoned-ledger",
            "--entity",
            "topic-contract-account/bad",
        )
        assert result.exit_code == 0, result.output

        async def one_left() -> bool:
            return len(await subs.parked()) == 1

        await eventually(one_left)
        result = await run("discard", "contract-deposits", "poisoned-ledger", "--yes")
        assert result.exit_code == 0 and "discarded 1 parked message" in result.stdout
        assert await subs.parked() == []
        with pytest.raises(Exception, match="no subscriber group"):
            await subs.parked(which=ParkedFilter(consumer="topic:x:y"))
    await transport.close()
