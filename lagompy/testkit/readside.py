"""Read-side test kit: ``ReadSideTestDriver`` and the read-side contract suite.

``ReadSideTestDriver`` feeds events to a processor against a real database (a temporary SQLite
file unless told otherwise) and exposes the rows it wrote::

    async with ReadSideTestDriver(UsersProjection) as driver:
        await driver.feed("42", UserRegistered("42", "Ada", "ada@example.org"))
        assert await driver.rows("SELECT name FROM users") == [{"name": "Ada"}]

Each ``feed`` appends the events to the journal (tagged as the processor's tag tags them) and
runs the processor's workers until they have handled everything, through the same code path as
a running read side: one transaction per batch with the offset.

``ReadSideContract`` is the suite every journal/projection backend pair must pass (Lagom's
``AbstractReadSideSpec``): subclass it under a ``Test...`` name and provide ``journal_settings``
(a fresh, empty database; the projection lives in the same one unless ``readside_settings``
names another). It needs pytest and pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.closing import AsyncClosing
from lagompy.entity import ShardedTag, Tag
from lagompy.journal import TailSettings
from lagompy.journal._journal import AtomicWrite, EventEnvelope
from lagompy.journal._storage import Storage, open_storage
from lagompy.readside._processor import (
    ProcessorArg,
    SqlReadSideProcessor,
    _instance,
    serializer_for_processors,
)
from lagompy.readside._settings import ReadSideSettings, projection_settings
from lagompy.readside._worker import ReadSideWorker, run_global_prepare
from lagompy.serialization import Serializer, serializable
from lagompy.settings import JournalSettings, make_settings
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema

__all__ = [
    "CONTRACT_TAG",
    "Credited",
    "CreditsProjection",
    "Noise",
    "ReadSideContract",
    "ReadSideTestDriver",
    "readside_contract_serializer",
]


# --------------------------------------------------------------------------- the driver


class ReadSideTestDriver(AsyncClosing):
    """Feed events to one processor on a real journal and projection database."""

    def __init__(
        self,
        processor: ProcessorArg,
        *,
        journal_url: str | None = None,
        journal_settings: JournalSettings | None = None,
        serializer: Serializer | None = None,
        settings: ReadSideSettings | None = None,
        entity_type: str | None = None,
    ) -> None:
        self.processor: SqlReadSideProcessor = _instance(processor)
        self._journal_url = journal_url
        self._journal_settings = journal_settings
        self.serializer = serializer or serializer_for_processors([self.processor])
        self.settings = settings or ReadSideSettings()
        entities = self.processor.entities
        self.entity_type = entity_type or (entities[0].type_name if entities else "test-entity")
        self._tmp: str | None = None
        self._storage: Storage | None = None
        self._projection: Database | None = None
        self._seq: dict[tuple[str, str], int] = {}

    async def __aenter__(self) -> Self:
        url = self._journal_url
        if url is None and self._journal_settings is None:
            self._tmp = tempfile.mkdtemp(prefix="lagompy-readside-")
            url = f"sqlite:///{Path(self._tmp) / 'readside.db'}"
        given = {} if url is None else {"url": url}
        settings = make_settings(JournalSettings, self._journal_settings, **given)
        self._storage = await open_storage(settings=settings, serializer=self.serializer)
        self._projection = Database.create(projection_settings(settings, self.settings))
        await ensure_schema(self._projection)
        await run_global_prepare(self.processor, self._projection, self.settings)
        return self

    async def close(self) -> None:
        if self._projection is not None:
            await self._projection.dispose()
            self._projection = None
        if self._storage is not None:
            await self._storage.close()
            self._storage = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise RuntimeError("use the driver inside `async with`")
        return self._storage

    @property
    def projection(self) -> Database:
        if self._projection is None:
            raise RuntimeError("use the driver inside `async with`")
        return self._projection

    def tag_for(self, entity_id: str) -> str:
        t = type(self.processor).tag
        if isinstance(t, (Tag, ShardedTag)):
            return t.for_entity(entity_id)
        return t

    async def feed(
        self, entity_id: str, *events: Any, entity_type: str | None = None
    ) -> list[EventEnvelope[Any]]:
        """Append ``events`` to the entity's stream (next sequence numbers, the processor's tag)
        and let the processor handle everything; returns the appended envelopes."""
        entity_type = entity_type or self.entity_type
        key = (entity_type, entity_id)
        if key not in self._seq:
            self._seq[key] = await self.storage.journal.highest_seq_nr(entity_type, entity_id)
        tag = self.tag_for(entity_id)
        write = AtomicWrite(
            entity_type, entity_id, self._seq[key], list(events), [(tag,)] * len(events)
        )
        (result,) = await self.storage.journal.append([write])
        envelopes = list(result.unwrap())
        self._seq[key] += len(events)
        await self.process()
        return envelopes

    async def process(self) -> None:
        """Let every worker of the processor handle what the journal holds now."""
        for tag in self.processor.tags():
            await self.worker(tag).catch_up()

    def worker(self, tag: str, *, owner: str | None = None) -> ReadSideWorker:
        return ReadSideWorker(
            self.processor,
            tag,
            journal=self.storage.journal,
            projection=self.projection,
            settings=self.settings,
            owner=owner,
        )

    async def rows(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """The rows of a SQL query on the projection database, as dicts."""
        async with self.projection.read() as conn:
            result = await conn.execute(text(query), params)
            return [dict(r) for r in result.mappings().all()]

    async def offset(self, tag: str | None = None) -> int:
        """The stored offset of ``tag`` (default: the processor's only tag)."""
        from lagompy.readside._store import OffsetStore

        tags = self.processor.tags()
        if tag is None:
            if len(tags) != 1:
                raise ValueError(f"the processor has several tags {tags}: name one")
            tag = tags[0]
        row = await OffsetStore(self.projection).row(self.processor.name, tag)
        return 0 if row is None else row.offset


# --------------------------------------------------------------------------- contract types


@serializable("lagompy.contract.readside.Credited")
@dataclass(frozen=True)
class Credited:
    """The contract processor's event: ``amount`` credited to an account."""

    account: str
    amount: int


@serializable("lagompy.contract.readside.Noise")
@dataclass(frozen=True)
class Noise:
    """An event the contract processor does not handle (only its offset moves)."""

    text: str


def readside_contract_serializer() -> Serializer:
    return Serializer([Credited, Noise])


CONTRACT_TAG = "lagompy-contract-credits"


class CreditsProjection(SqlReadSideProcessor):
    """The contract suite's processor: one row per handled event in ``contract_credits``, with
    no unique key, so an event handled twice shows as two rows. Records what ran, in order, in
    ``calls`` (class-level, shared by its instances; clear it in tests)."""

    name = "contract-credits"
    tag = CONTRACT_TAG
    event_types: ClassVar[tuple[type, ...] | None] = (Credited,)
    calls: ClassVar[list[str]] = []
    #: How many of the next global_prepare calls fail.
    failing_global_prepares: ClassVar[int] = 0

    async def global_prepare(self, conn: AsyncConnection) -> None:
        type(self).calls.append("global_prepare")
        if type(self).failing_global_prepares > 0:
            type(self).failing_global_prepares -= 1
            raise RuntimeError("global_prepare failed on purpose")
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS contract_credits ("
                "event_offset BIGINT NOT NULL, account VARCHAR(100) NOT NULL, "
                "seq_nr BIGINT NOT NULL, amount BIGINT NOT NULL)"
            )
        )

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        type(self).calls.append(f"handle {envelope.offset}")
        await conn.execute(
            text("INSERT INTO contract_credits VALUES (:o, :a, :s, :m)"),
            {
                "o": envelope.offset,
                "a": envelope.entity_id,
                "s": envelope.seq_nr,
                "m": envelope.event.amount,
            },
        )

    async def reset(self, conn: AsyncConnection) -> None:
        await conn.execute(text("DELETE FROM contract_credits"))


# --------------------------------------------------------------------------- the contract


class _Env:
    """A journal and a projection database for one contract case."""

    def __init__(self, storage: Storage, projection: Database, settings: ReadSideSettings) -> None:
        self.storage = storage
        self.projection = projection
        self.settings = settings
        self._seq: dict[str, int] = {}

    async def append(self, account: str, *events: Any) -> list[EventEnvelope[Any]]:
        seq = self._seq.get(account, 0)
        write = AtomicWrite(
            "contract-account", account, seq, list(events), [(CONTRACT_TAG,)] * len(events)
        )
        (result,) = await self.storage.journal.append([write])
        self._seq[account] = seq + len(events)
        return list(result.unwrap())

    def worker(
        self, processor: SqlReadSideProcessor | None = None, *, owner: str | None = None
    ) -> ReadSideWorker:
        return ReadSideWorker(
            processor or CreditsProjection(),
            CONTRACT_TAG,
            journal=self.storage.journal,
            projection=self.projection,
            settings=self.settings,
            owner=owner,
        )

    async def prepare(self) -> None:
        await run_global_prepare(CreditsProjection(), self.projection, self.settings)

    async def credits(self) -> list[tuple[int, str, int, int]]:
        async with self.projection.read() as conn:
            result = await conn.execute(
                text(
                    "SELECT event_offset, account, seq_nr, amount FROM contract_credits "
                    "ORDER BY event_offset"
                )
            )
            return [(int(a), str(b), int(c), int(d)) for a, b, c, d in result.all()]

    async def stored_offset(self) -> int:
        from lagompy.readside._store import OffsetStore

        row = await OffsetStore(self.projection).row(CreditsProjection.name, CONTRACT_TAG)
        return 0 if row is None else row.offset


class ReadSideContract:
    """Behaviours a journal plus projection database must show for read sides to be exactly
    once. Provide ``journal_settings`` (fresh database); override ``readside_settings`` for a
    separate projection database."""

    @pytest.fixture
    def readside_settings(self) -> ReadSideSettings:
        fast: dict[str, Any] = {
            "lease_ttl": 2.0,
            "renew_interval": 0.1,
            "retry_initial_delay": 0.01,
            "retry_max_delay": 0.05,
            "max_attempts": 2,
            "tail": TailSettings(poll_interval=0.02),
        }
        return ReadSideSettings(**fast)

    @pytest_asyncio.fixture
    async def env(
        self, journal_settings: JournalSettings, readside_settings: ReadSideSettings
    ) -> AsyncIterator[_Env]:
        CreditsProjection.calls = []
        CreditsProjection.failing_global_prepares = 0
        storage = await open_storage(
            settings=journal_settings, serializer=readside_contract_serializer()
        )
        projection = Database.create(projection_settings(journal_settings, readside_settings))
        try:
            await ensure_schema(projection)
            yield _Env(storage, projection, readside_settings)
        finally:
            await projection.dispose()
            await storage.close()

    @pytest.mark.asyncio
    async def test_a_worker_resumes_from_the_stored_offset(self, env: _Env) -> None:
        await env.prepare()
        first = await env.append("a", Credited("a", 1), Credited("a", 2))
        assert await env.worker().catch_up() == first[-1].offset
        CreditsProjection.calls.clear()
        more = await env.append("b", Credited("b", 3))
        assert await env.worker().catch_up() == more[0].offset  # a new worker, another owner
        assert CreditsProjection.calls == [f"handle {more[0].offset}"]
        assert [c[3] for c in await env.credits()] == [1, 2, 3]
        assert await env.stored_offset() == more[0].offset

    @pytest.mark.asyncio
    async def test_offsets_are_persisted_for_unhandled_events(self, env: _Env) -> None:
        await env.prepare()
        noise = await env.append("n", Noise("x"), Noise("y"))
        assert await env.worker().catch_up() == noise[-1].offset
        assert await env.stored_offset() == noise[-1].offset
        assert await env.credits() == []
        assert not [c for c in CreditsProjection.calls if c.startswith("handle")]
        credit = await env.append("n", Credited("n", 5))
        await env.worker().catch_up()
        assert await env.credits() == [(credit[0].offset, "n", 3, 5)]

    @pytest.mark.asyncio
    async def test_recovery_after_a_failing_global_prepare(
        self, env: _Env, journal_settings: JournalSettings
    ) -> None:
        from lagompy.readside._projections import start_readside

        await env.append("a", Credited("a", 7))
        CreditsProjection.failing_global_prepares = 2
        readside = await start_readside(
            [CreditsProjection],
            journal_settings=journal_settings,
            serializer=readside_contract_serializer(),
            settings=env.settings,
        )
        async with readside:
            await readside.wait_until_caught_up(timeout=30)
            assert readside.global_prepares == {CreditsProjection.name: 3}
        calls = CreditsProjection.calls
        assert calls[:3] == ["global_prepare"] * 3
        assert [c for c in calls if c.startswith("handle")] == calls[3:]
        assert [c[3] for c in await env.credits()] == [7]

    @pytest.mark.asyncio
    async def test_exactly_once_after_a_crash_between_handler_and_commit(self, env: _Env) -> None:
        from sqlalchemy import event

        await env.prepare()
        first = await env.append("a", Credited("a", 1), Credited("a", 2))
        await env.worker().catch_up()
        second = await env.append("a", Credited("a", 3), Credited("a", 4))

        class Crash(BaseException):
            """The process dies: nothing after this line of the worker runs."""

        def due() -> bool:
            # Die at the first commit that follows the new events' handlers.
            return f"handle {second[0].offset}" in CreditsProjection.calls

        def die_before_commit(_conn: Any) -> None:
            # Every transaction through SQLAlchemy commits through here (leases too).
            if due():
                raise Crash

        # On SQLite a batch's deferred writes and its offset go to the driver's thread in one
        # call (``sqlite_commit_in_one_call``): die there, after its writes, before its COMMIT.
        from lagompy.sql import _database

        one_call = _database._commit_in_one_call

        def writes_then_die(conn: Any, timeout_ms: int, writes: Any, last: Any) -> Any:
            if not due():
                return one_call(conn, timeout_ms, writes, last)
            _database._begin_immediate(conn, timeout_ms)
            for sql, rows in writes:
                conn.executemany(sql, rows)
            conn.execute(last[0], last[1]).fetchall()
            conn.execute("ROLLBACK")  # what the database does with a dead writer's transaction
            raise Crash

        engine = env.projection.engine.sync_engine
        event.listen(engine, "commit", die_before_commit)
        _database._commit_in_one_call = writes_then_die
        crashed = env.worker()
        try:
            with pytest.raises(Crash):
                await crashed.catch_up()
        finally:
            event.remove(engine, "commit", die_before_commit)
            _database._commit_in_one_call = one_call
        # The handlers ran, their writes and the offset were rolled back together.
        assert "handle " + str(second[0].offset) in CreditsProjection.calls
        assert await env.stored_offset() == first[-1].offset
        assert len(await env.credits()) == 2
        # A new worker (the crashed one's lease is taken over once it expires, or at once by
        # the same owner) handles each event exactly once.
        await env.worker(owner=crashed.owner).catch_up()
        offsets = [c[0] for c in await env.credits()]
        assert offsets == [e.offset for e in first + second]
        assert await env.stored_offset() == second[-1].offset

    @pytest.mark.asyncio
    async def test_a_stale_lease_holder_is_rejected(self, env: _Env) -> None:
        from lagompy.errors import LeaseLost

        await env.prepare()
        events = await env.append("a", Credited("a", 1), Credited("a", 2))
        stale = env.worker(owner="stale")
        lease = await stale.store.acquire(
            CreditsProjection.name, CONTRACT_TAG, "stale", ttl=env.settings.lease_ttl
        )
        assert lease is not None
        # While the lease is live, nobody else gets it: at most one worker.
        other = env.worker(owner="other")
        assert (
            await other.store.acquire(CreditsProjection.name, CONTRACT_TAG, "other", ttl=1.0)
            is None
        )
        # The stale holder stalls; the lease is taken from it (an operator, or expiry).
        fresh = await other.store.acquire(
            CreditsProjection.name, CONTRACT_TAG, "other", ttl=5.0, force=True
        )
        assert fresh is not None and fresh.epoch == lease.epoch + 1
        with pytest.raises(LeaseLost, match="taken by another worker"):
            await stale._commit_batch(lease, events)
        assert await env.credits() == []  # its handler writes were rolled back
        assert await env.stored_offset() == 0
        await other.store.release(fresh)
        await other.catch_up()
        assert [c[0] for c in await env.credits()] == [e.offset for e in events]

    @pytest.mark.asyncio
    async def test_an_expired_lease_can_be_taken_and_fences_its_old_holder(self, env: _Env) -> None:
        from lagompy.errors import LeaseLost

        await env.prepare()
        events = await env.append("a", Credited("a", 1))
        old = env.worker(owner="old")
        lease = await old.store.acquire(CreditsProjection.name, CONTRACT_TAG, "old", ttl=0.05)
        assert lease is not None
        await asyncio.sleep(0.1)
        new = await old.store.acquire(CreditsProjection.name, CONTRACT_TAG, "new", ttl=5.0)
        assert new is not None
        with pytest.raises(LeaseLost):
            await old._commit_batch(lease, events)
        assert await env.credits() == []
