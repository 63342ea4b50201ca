"""The journal's ordering guarantee: a reader tailing by offset never skips an event, whatever
order concurrent writers commit in, and without any built-in delay (invariant 3).

On PostgreSQL, four writers, each on a storage of its own (as shard hosts are: the writers of
one process take turns on its write connection), append concurrently while a deferred
constraint trigger sleeps a random few milliseconds inside every commit, so transactions that
took their offsets first often become visible last. A tailer with a tiny page size must still
see every event exactly once, in offset order (writers never wait for each other: each places a
marker that reads stop below while it is in flight). The twin runs the same load with the
ordering fence switched off and must observe a skipped event, which shows the test can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_URL

from lagompy import AtomicWrite, Command, Effect, JournalSettings, PersistentEntity, open_storage
from lagompy.errors import JournalError
from lagompy.journal import SLICES, EventEnvelope, Journal, SliceRange, Storage, slice_of
from lagompy.journal._journal import _LOCK_EVENTS

pytestmark = pytest.mark.postgres

WRITERS = 4
BATCHES_PER_WRITER = 40
PAGE_SIZE = 3


@dataclass(frozen=True)
class Tick(Command[None]):
    pass


@dataclass(frozen=True)
class Ticked:
    writer: int
    n: int


@dataclass(frozen=True)
class Clock:
    pass


class ClockEntity(PersistentEntity[Tick, Ticked, Clock]):
    type_name = "clock"
    initial_state = Clock()

    def on_command(self, state: Clock, command: Tick) -> Effect[Clock]:
        return Effect.none()

    def on_event(self, state: Clock, event: Ticked) -> Clock:
        return state


SLOW_COMMITS = """
CREATE FUNCTION lagompy_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Runs at COMMIT time (deferred): offsets are taken, visibility is not yet.
    IF random() < 0.5 THEN
        PERFORM pg_sleep(random() * 0.02);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER lagompy_test_slow_commit
    AFTER INSERT ON lagompy_event_tags
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.tag = 'clock-first')
    EXECUTE FUNCTION lagompy_test_slow_commit();
"""


@pytest.fixture
async def storage(postgres_schema: str) -> AsyncIterator[Storage]:
    settings = JournalSettings(
        url=POSTGRES_URL,
        postgres_schema=postgres_schema,
        pool_size=WRITERS + 2,
        auto_migrate=True,
    )
    s = await open_storage(settings=settings, entities=[ClockEntity])
    conn = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": postgres_schema})
    try:
        await conn.execute(SLOW_COMMITS)
    finally:
        await conn.close()
    try:
        yield s
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def writer_journals(storage: Storage, *, fence: bool) -> AsyncIterator[list[Journal]]:
    """One journal per writer, each on its own database connections, like separate
    processes."""
    settings = storage.database.settings.model_copy(update={"pool_size": 1})
    storages = [
        await open_storage(settings=settings, entities=[ClockEntity]) for _ in range(WRITERS)
    ]
    try:
        yield [Journal(s.database, s.serializer, ordering_fence=fence) for s in storages]
    finally:
        for s in storages:
            await s.close()


Read = Callable[[Journal, int, int], Awaitable[list[EventEnvelope[Any]]]]


async def by_tag(journal: Journal, after: int, limit: int) -> list[EventEnvelope[Any]]:
    return await journal.events_by_tag("clock", after_offset=after, limit=limit)


#: Half of the slices: the ids of the load fall on both sides.
HALF = SliceRange(0, SLICES // 2 - 1)


async def by_slices(journal: Journal, after: int, limit: int) -> list[EventEnvelope[Any]]:
    return (await journal.read_slices(HALF, after_offset=after, limit=limit)).envelopes


async def run_load(
    writer_journals: Sequence[Journal], reader: Journal, run: int = 0, read: Read = by_tag
) -> tuple[list[int], list[int]]:
    """Concurrent writers and one tailer (reading with ``read``: the tag, or a slice range);
    returns (offsets the tailer saw, offsets committed)."""
    done = asyncio.Event()
    seen: list[int] = []
    before = await read(reader, 0, 100_000)
    start = max((e.offset for e in before), default=0)

    async def writer(w: int) -> None:
        rng = random.Random(w)
        for b in range(BATCHES_PER_WRITER):
            # The last writer's first batches are large: the journal's COPY path.
            large = w == WRITERS - 1 and b < 6
            size = rng.randint(64, 66) if large else rng.randint(1, 3)
            writes = [
                AtomicWrite(
                    "clock",
                    f"r{run}-w{w}-b{b}-e{i}",
                    0,
                    [Ticked(w, b)],
                    # Each batch's first event carries the tag that slows its commit.
                    [("clock-first", "clock") if i == 0 else ("clock",)],
                )
                for i in range(size)
            ]
            for result in await writer_journals[w].append(writes):
                assert result.ok, result.error

    async def tailer() -> None:
        after = start
        while True:
            finished = done.is_set()
            page = await read(reader, after, PAGE_SIZE)
            for envelope in page:
                seen.append(envelope.offset)
                after = envelope.offset
            if not page:
                if finished:
                    return
                await asyncio.sleep(0)  # no fixed delay: just let the writers run

    tail = asyncio.create_task(tailer())
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    done.set()
    await asyncio.wait_for(tail, timeout=60)
    committed = [e.offset for e in await read(reader, start, 100_000)]
    return seen, committed


@pytest.mark.parametrize("read", [by_tag, by_slices], ids=["tag", "slices"])
async def test_tailer_sees_every_event_once_in_order_under_concurrent_slow_commits(
    storage: Storage, read: Read
) -> None:
    async with writer_journals(storage, fence=True) as journals:
        seen, committed = await run_load(journals, storage.journal, read=read)
    enough = WRITERS * BATCHES_PER_WRITER // (2 if read is by_slices else 1)
    assert len(committed) >= enough
    assert seen == sorted(seen), "the tailer saw offsets out of order"
    assert len(seen) == len(set(seen)), "the tailer saw an event twice"
    missing = sorted(set(committed) - set(seen))
    assert not missing, f"the tailer skipped {len(missing)} events, e.g. offsets {missing[:10]}"
    assert seen == committed


@pytest.mark.parametrize("read", [by_tag, by_slices], ids=["tag", "slices"])
async def test_without_the_ordering_fence_the_same_tailer_skips_events(
    storage: Storage, read: Read
) -> None:
    # The writers' commits interleave at random: a skip needs the tailer to read while a
    # slowed commit is in flight. On an idle machine nearly every run has dozens; on a loaded
    # one (the tailer scheduled less often) a run may have none, so the test runs the load
    # until one shows, within a bound.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    async with writer_journals(storage, fence=False) as unfenced:
        for attempt in range(30):
            seen, committed = await run_load(unfenced, storage.journal, run=attempt, read=read)
            missing = set(committed) - set(seen)
            if missing or loop.time() > deadline:
                break
    assert missing, (
        f"no event was skipped without the fence in {attempt + 1} runs: this test could not fail"
    )
    print(
        f"without the fence the tailer skipped {len(missing)} of {len(committed)} events "
        f"(run {attempt + 1})"
    )


#: What a writer of the version before migration 0010 took: the journal's lock, exclusive.
_OLD_FENCE = (
    "SELECT pg_advisory_xact_lock(1818717552, "
    "('lagompy_events'::regclass::oid::bigint - 2147483648)::int)"
)
_NEXT_OFFSET = "SELECT nextval(pg_get_serial_sequence('lagompy_events', 'global_offset'))"
#: A copy of entity a's first event as entity c's, at the offset $1, tagged "clock".
_COPY_EVENT = f"""
WITH ev AS (
    INSERT INTO lagompy_events (global_offset, entity_type, entity_id, seq_nr, event_type,
                                event_version, payload, tags, metadata, slice, written_at_us)
    SELECT $1, entity_type, 'c', 1, event_type, event_version, payload, tags, metadata,
           {slice_of("c")}, written_at_us
    FROM lagompy_events WHERE entity_id = 'a' AND seq_nr = 1
)
INSERT INTO lagompy_event_tags (tag, global_offset) VALUES ('clock', $1)
"""


async def test_writers_never_wait_for_each_other_and_reads_stop_below_one_in_flight(
    postgres_schema: str,
) -> None:
    """A writer in flight (its marker placed, an offset taken, not committed) does not hold
    another writer back, but holds every read by offset below its offset until it commits
    (then both events are read, in offset order) or rolls back (then the other one is). A
    writer of the version before (the exclusive lock) and this version's writers take turns,
    and reads stop at what was committed while it runs. VACUUM's lock holds none of them."""
    settings = JournalSettings(
        url=POSTGRES_URL, postgres_schema=postgres_schema, auto_migrate=True, lock_timeout_ms=300
    )
    async with await open_storage(settings=settings, entities=[ClockEntity]) as s:
        journal = s.journal

        async def write(entity: str, expected: int = 0) -> int:
            write = AtomicWrite("clock", entity, expected, [Ticked(0, 0)], [("clock",)])
            written = await asyncio.wait_for(journal.append_one(write), 5)
            return written[-1].offset

        start = await write("a")
        other = await asyncpg.connect(
            POSTGRES_URL, server_settings={"search_path": postgres_schema}
        )
        try:
            # In flight, then committed: the other writer went ahead; reads waited for it.
            async with other.transaction():
                await other.execute(_LOCK_EVENTS)
                in_flight = await other.fetchval(_NEXT_OFFSET)
                later = await write("b")
                assert later > in_flight
                page = await journal.read_tag("clock", after_offset=start)
                assert (page.envelopes, page.held) == ([], True)
                assert await journal.events_by_tag("clock", after_offset=start) == []
                assert await journal.all_events(after_offset=start) == []
                await other.execute(_COPY_EVENT, in_flight)
            page = await journal.read_tag("clock", after_offset=start)
            assert [(e.entity_id, e.offset) for e in page.envelopes] == [
                ("c", in_flight),
                ("b", later),
            ]
            assert not page.held

            # In flight, then rolled back: the other writer's event is read once it ends.
            rolled_back = other.transaction()
            await rolled_back.start()
            await other.execute(_LOCK_EVENTS)
            await other.fetchval(_NEXT_OFFSET)
            last = await write("d")
            assert (await journal.read_tag("clock", after_offset=later)).envelopes == []
            await rolled_back.rollback()
            page = await journal.read_tag("clock", after_offset=later)
            assert [(e.entity_id, e.offset) for e in page.envelopes] == [("d", last)]

            # A writer of the version before: this version's writers wait for it (and fail
            # after lock_timeout), reads stop at what is committed while it runs.
            async with other.transaction():
                await other.execute(_OLD_FENCE)
                await other.fetchval(_NEXT_OFFSET)
                with pytest.raises(JournalError, match="lock timeout"):
                    await journal.append_one(AtomicWrite("clock", "e", 0, [Ticked(0, 0)]))
                page = await journal.read_tag("clock", after_offset=start)
                assert [e.entity_id for e in page.envelopes] == ["c", "b", "d"]
                assert page.held

            # What VACUUM and ANALYZE hold for their whole run.
            async with other.transaction():
                await other.execute("LOCK TABLE lagompy_events IN SHARE UPDATE EXCLUSIVE MODE")
                await write("a", 1)
        finally:
            await other.close()
        assert [e.seq_nr for e in await journal.events("clock", "a")] == [1, 2]


async def test_on_two_databases_a_tailer_of_each_sees_every_event_of_its_database_once(
    postgres_schema: str,
) -> None:
    """A journal placed on two databases (schemas here), the slow commits on both: each
    writer's batches span both (one transaction per database, at once, as a shard host's
    batch does), and a tailer per database, reading by tag, sees its database's events once
    each, in offset order; together they see every event, each on its entity's database."""
    from conftest import _create_schema, _drop_schema

    from lagompy.journal._placement import Placement
    from lagompy.journal._storage import PlacedStorage, open_placed_storage
    from lagompy.settings import PlacedDatabase

    second = await _create_schema()
    settings = JournalSettings(
        url=POSTGRES_URL,
        postgres_schema=postgres_schema,
        auto_migrate=True,
        databases={
            "b": PlacedDatabase(url=POSTGRES_URL, postgres_schema=second, slices="512-1023")
        },
    )
    placement = Placement.of(settings)
    writers: list[PlacedStorage] = []
    readers = await open_placed_storage(settings=settings, entities=[ClockEntity])
    try:
        for name in placement.names:
            schema = placement.settings_of(name).postgres_schema
            conn = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": schema})
            try:
                await conn.execute(SLOW_COMMITS)
            finally:
                await conn.close()
        for _ in range(WRITERS):
            writers.append(
                await open_placed_storage(
                    settings=settings.model_copy(update={"pool_size": 1}), entities=[ClockEntity]
                )
            )

        async def append(w: int, writes: list[AtomicWrite]) -> None:
            parts: dict[str, list[AtomicWrite]] = {}
            for write in writes:
                parts.setdefault(placement.database_of(write.entity_id), []).append(write)
            outs = await asyncio.gather(
                *(writers[w].parts[n].journal.append(ws) for n, ws in parts.items())
            )
            assert all(r.ok for out in outs for r in out)

        done = asyncio.Event()
        seen: dict[str, list[EventEnvelope[Any]]] = {n: [] for n in placement.names}

        async def tailer(name: str) -> None:
            journal, after = readers.parts[name].journal, 0
            while True:
                finished = done.is_set()
                page = await journal.events_by_tag("clock", after_offset=after, limit=PAGE_SIZE)
                seen[name].extend(page)
                after = page[-1].offset if page else after
                if not page:
                    if finished:
                        return
                    await asyncio.sleep(0)

        async def writer(w: int) -> None:
            rng = random.Random(w)
            for b in range(BATCHES_PER_WRITER):
                writes = [
                    AtomicWrite(
                        "clock",
                        f"w{w}-b{b}-e{i}",
                        0,
                        [Ticked(w, b)],
                        [("clock-first", "clock") if i == 0 else ("clock",)],
                    )
                    for i in range(rng.randint(2, 6))
                ]
                await append(w, writes)

        tails = [asyncio.create_task(tailer(n)) for n in placement.names]
        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        done.set()
        await asyncio.wait_for(asyncio.gather(*tails), timeout=60)
        written = 0
        for name in placement.names:
            journal = readers.parts[name].journal
            committed = await journal.events_by_tag("clock", after_offset=0, limit=100_000)
            offsets = [e.offset for e in seen[name]]
            assert offsets == [e.offset for e in committed], f"tailer of {name!r} skipped"
            assert {placement.database_of(e.entity_id) for e in committed} == {name}
            written += len(committed)
        assert written == sum(len(v) for v in seen.values())
        assert all(seen.values())
    finally:
        await readers.close()
        for s in writers:
            await s.close()
        await _drop_schema(second)
