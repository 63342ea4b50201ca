"""An entity whose every event was deleted (forgotten) starts again from its initial state, and
keeps recovering after it writes again: recovery starts from the initial state where the
deletion left it (``Journal.restarted_at``) and replays the events after it. A deletion that
leaves events behind with no snapshot under them still makes recovery fail with
``EventsMissing``. Alone (``recover``), batched (``recover_many``), and through the in-process
runtime across passivation and a host restart; on both journal backends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, insert

from lagompy import (
    Command,
    Effect,
    EventsMissing,
    JournalSettings,
    PersistentEntity,
    Storage,
    open_storage,
    start_in_process,
)
from lagompy.journal import AtomicWrite, SnapshotToSave
from lagompy.runtime._processing import EntityProcessor, LiveEntity, Request, recover, recover_many
from lagompy.sql import _schema as schema

# --------------------------------------------------------------------------- the entity


@dataclass(frozen=True)
class Append(Command[tuple[int, ...]]):
    value: int


@dataclass(frozen=True)
class Appended:
    value: int


@dataclass(frozen=True)
class Items:
    """The values in order: a state that depends on every event and on their order."""

    values: tuple[int, ...] = ()


class ListEntity(PersistentEntity[Append, Appended, Items]):
    type_name = "forget-list"
    initial_state = Items()
    snapshot_every: ClassVar[int | None] = None

    def on_command(self, state: Items, command: Append) -> Effect[Items]:
        return Effect.persist(Appended(command.value)).then_reply(lambda s: s.values)

    def on_event(self, state: Items, event: Appended) -> Items:
        return Items((*state.values, event.value))


class SnapshottedListEntity(ListEntity):
    type_name = "forget-list-snap"
    snapshot_every = 1000  # snapshots are saved by the tests


CLASSES = [ListEntity, SnapshottedListEntity]
T = ListEntity.type_name


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(settings=journal_settings, entities=CLASSES) as storage:
        yield storage


async def append(storage: Storage, entity_id: str, after: int, *values: int) -> None:
    await storage.journal.append_one(
        AtomicWrite(T, entity_id, after, [Appended(v) for v in values])
    )


async def both(
    storage: Storage, entity_id: str, cls: type[ListEntity] = ListEntity
) -> tuple[Items, int]:
    """The entity recovered alone and in a batch, which must agree: (state, seq_nr)."""
    alone = await recover(cls, entity_id, storage.journal, storage.snapshots)
    batched = (await recover_many(cls, [entity_id], storage.journal, storage.snapshots))[entity_id]
    assert isinstance(batched, LiveEntity)
    assert (batched.state, batched.seq_nr, batched.recovered_from_snapshot) == (
        alone.state,
        alone.seq_nr,
        alone.recovered_from_snapshot,
    )
    return alone.state, alone.seq_nr


async def both_fail(storage: Storage, entity_id: str) -> str:
    """The message of the ``EventsMissing`` that recovering alone and batched both raise."""
    with pytest.raises(EventsMissing) as alone:
        await recover(ListEntity, entity_id, storage.journal, storage.snapshots)
    batched = (await recover_many(ListEntity, [entity_id], storage.journal, storage.snapshots))[
        entity_id
    ]
    assert isinstance(batched, EventsMissing)
    assert str(batched) == str(alone.value)
    return str(alone.value)


# --------------------------------------------------------------------------- the journal


async def test_a_deletion_that_leaves_no_event_records_the_restart(storage: Storage) -> None:
    journal = storage.journal
    await append(storage, "a", 0, 1, 2, 3, 4)
    assert await journal.delete_events(T, "a", 2) == 2  # events 3 and 4 are left
    assert await journal.deletions(T, "a") == (2, 0)
    assert await journal.delete_events(T, "a", 10) == 2  # none left: forgotten at 4
    assert await journal.deletions(T, "a") == (4, 4)
    assert await journal.restarted_at(T, "a") == 4
    assert await journal.deleted_to(T, "a") == 4
    # Deleting again below it, with nothing left to delete, moves nothing.
    assert await journal.delete_events(T, "a", 1) == 0
    assert await journal.deletions(T, "a") == (4, 4)
    # Events written after it; a deletion of some of them keeps the restart where it was.
    await append(storage, "a", 4, 5, 6, 7)
    assert await journal.delete_events(T, "a", 5) == 1
    assert await journal.deletions(T, "a") == (5, 4)
    assert await journal.deletions(T, "never") == (0, 0)
    read = await journal.replay_many(T, {"a": 1, "never": 1})
    assert (read["a"].deleted_to, read["a"].restarted_at) == (5, 4)
    assert [e.seq_nr for e in read["a"].events] == [6, 7]
    assert (read["never"].deleted_to, read["never"].restarted_at, read["never"].events) == (
        0,
        0,
        [],
    )


async def test_a_forgotten_entity_that_writes_again_recovers(storage: Storage) -> None:
    await append(storage, "f", 0, 1, 2, 3)
    await storage.journal.delete_events(T, "f", 3)
    assert await both(storage, "f") == (Items(), 3)
    await append(storage, "f", 3, 40, 50)
    # The bug: recovery replayed from 1, met 4 first and raised EventsMissing for 1..3.
    assert await both(storage, "f") == (Items((40, 50)), 5)


async def test_a_partial_deletion_without_a_snapshot_is_still_events_missing(
    storage: Storage,
) -> None:
    await append(storage, "p", 0, 1, 2, 3, 4, 5)
    await storage.journal.delete_events(T, "p", 2)
    assert "forget-list/p cannot be recovered: its events 1..2 were deleted" in await both_fail(
        storage, "p"
    )
    # Above a restart too: forgotten at 2, wrote 3..5, then 3..4 deleted with no snapshot.
    await append(storage, "q", 0, 1, 2)
    await storage.journal.delete_events(T, "q", 2)
    await append(storage, "q", 2, 3, 4, 5)
    await storage.journal.delete_events(T, "q", 4)
    assert "its events 3..4 were deleted" in await both_fail(storage, "q")


async def test_an_entity_forgotten_twice_recovers_after_the_second_time(storage: Storage) -> None:
    await append(storage, "t", 0, 1, 2)
    await storage.journal.delete_events(T, "t", 2)
    await append(storage, "t", 2, 3, 4)
    assert await both(storage, "t") == (Items((3, 4)), 4)
    await storage.journal.delete_events(T, "t", 100)
    assert await storage.journal.deletions(T, "t") == (4, 4)
    assert await both(storage, "t") == (Items(), 4)
    await append(storage, "t", 4, 5)
    assert await both(storage, "t") == (Items((5,)), 5)


async def test_a_snapshot_that_reaches_the_restart_is_used(storage: Storage) -> None:
    # Every event deleted, but the snapshot at the last one kept: the snapshot wins (as it did);
    # the events written after it follow it.
    s = SnapshottedListEntity.type_name
    await storage.journal.append_one(AtomicWrite(s, "k", 0, [Appended(1), Appended(2)]))
    await storage.snapshots.save_many([SnapshotToSave(s, "k", 2, Items((1, 2)))])
    await storage.journal.delete_events(s, "k", 2)
    assert await storage.journal.deletions(s, "k") == (2, 2)
    assert await both(storage, "k", SnapshottedListEntity) == (Items((1, 2)), 2)
    await storage.journal.append_one(AtomicWrite(s, "k", 2, [Appended(3)]))
    assert await both(storage, "k", SnapshottedListEntity) == (Items((1, 2, 3)), 3)
    # Its snapshots deleted too (a whole forgetting): the initial state, then event 3.
    await storage.snapshots.delete(s, "k")
    await storage.journal.delete_events(s, "k", 3)
    await storage.journal.append_one(AtomicWrite(s, "k", 3, [Appended(4)]))
    assert await both(storage, "k", SnapshottedListEntity) == (Items((4,)), 4)


async def test_a_snapshot_below_the_restart_is_still_events_missing(storage: Storage) -> None:
    # Events deleted beyond the snapshot kept (every one of them): the snapshot does not reach
    # the deleted events and the entity was not forgotten as a whole, as before this change.
    s = SnapshottedListEntity.type_name
    await storage.journal.append_one(AtomicWrite(s, "b", 0, [Appended(1), Appended(2)]))
    await storage.snapshots.save_many([SnapshotToSave(s, "b", 1, Items((1,)))])
    await storage.journal.delete_events(s, "b", 2)
    with pytest.raises(EventsMissing, match=r"events 2\.\.2 .* covers only up to 1"):
        await recover(SnapshottedListEntity, "b", storage.journal, storage.snapshots)
    await storage.journal.append_one(AtomicWrite(s, "b", 2, [Appended(3)]))
    batched = await recover_many(SnapshottedListEntity, ["b"], storage.journal, storage.snapshots)
    assert isinstance(batched["b"], EventsMissing)
    assert "events 2..2" in str(batched["b"])


# --------------------------------------------------------------------------- the runtime


async def test_through_the_runtime_across_passivation_and_a_restart(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=CLASSES, settings=journal_settings) as ents:
        ref = ents.ref_for(ListEntity, "r")
        for v in (1, 2, 3):
            await ref.ask(Append(v))
        await ents.ref_for(ListEntity, "s").ask(Append(1))
        await ents.storage.journal.delete_events(T, "r", 3)
        ents.processor.evict(T, "r")  # a forgotten entity is dropped from memory
        # Recovered (this host knew it): its initial state at 3.
        assert await ref.ask(Append(4)) == (4,)
        ents.processor.evict(T, "r")  # passivated
        assert await ref.ask(Append(5)) == (4, 5)
        await ents.storage.journal.delete_events(T, "s", 1)
    async with await start_in_process(entities=CLASSES, settings=journal_settings) as ents:
        # A new host presumes both new; the journal refuses their writes (one has events, the
        # other only its deletion), and they are recovered and run again.
        ref = ents.ref_for(ListEntity, "r")
        assert await ref.ask(Append(6)) == (4, 5, 6)
        assert await ents.ref_for(ListEntity, "s").ask(Append(2)) == (2,)
        assert ents.processor.stats()["new_refused"] == 2
        events = await ents.storage.journal.events(T, "r")
        assert [(e.seq_nr, e.event.value) for e in events] == [(4, 4), (5, 5), (6, 6)]
        assert [e.seq_nr for e in await ents.storage.journal.events(T, "s")] == [2]
    async with await start_in_process(entities=CLASSES, settings=journal_settings) as ents:
        assert await ents.ref_for(ListEntity, "s").ask(Append(3)) == (2, 3)


# --------------------------------------------------------------------------- property

#: One step: ("write", values), ("trim", how many of the events left to delete; at least one
#: stays), ("forget",) (delete every event), ("passivate",), ("restart",) (a new processor).
Step = tuple[Any, ...]

steps = st.one_of(
    st.tuples(st.just("write"), st.lists(st.integers(0, 99), min_size=1, max_size=3)),
    st.tuples(st.just("trim"), st.integers(1, 3)),
    st.tuples(st.just("forget")),
    st.tuples(st.just("passivate")),
    st.tuples(st.just("restart")),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(steps, max_size=12))
def test_recovered_equals_live_across_deletions_and_writes(
    journal_settings: JournalSettings, script: list[Step]
) -> None:
    """Random writes (through a processor, as a host writes), deletions of some of the events
    left (compaction without a snapshot: the entity stays live in memory), forgettings (every
    event deleted, the entity dropped from memory), passivations and restarts. The model is the
    list of events the journal holds and where the entity was last forgotten. After every step,
    recovery (alone and batched) is the fold of the events after the restart when they follow
    on from it, else ``EventsMissing``; and equals the live entity whenever both exist."""

    async def scenario() -> None:
        entity_id = f"prop-{uuid.uuid4().hex[:10]}"
        async with await open_storage(settings=journal_settings, entities=CLASSES) as storage:
            journal = storage.journal
            processor = EntityProcessor(CLASSES, journal, storage.snapshots)
            events: dict[int, int] = {}  # what the journal holds: seq_nr -> value
            highest = restarted = 0

            def expected() -> tuple[Items, int] | None:
                """What recovery must give (None: EventsMissing)."""
                seqs = sorted(events)
                if seqs != list(range(restarted + 1, restarted + 1 + len(seqs))):
                    return None
                return Items(tuple(events[s] for s in seqs)), highest

            for step in script:
                live_before = processor.live.get((T, entity_id))
                if step[0] == "write":
                    values = step[1]
                    fold = expected()
                    if live_before is None and fold is None:  # it cannot come back
                        results = await processor.process(
                            [Request(T, entity_id, Append(v)) for v in values]
                        )
                        assert all(isinstance(r.error, EventsMissing) for r in results)
                        continue
                    results = await processor.process(
                        [Request(T, entity_id, Append(v)) for v in values]
                    )
                    assert [r.error for r in results] == [None] * len(values)
                    for v in values:
                        highest += 1
                        events[highest] = v
                elif step[0] == "trim" and len(events) > 1:
                    to = sorted(events)[min(step[1], len(events) - 1) - 1]
                    await journal.delete_events(T, entity_id, to)
                    events = {s: v for s, v in events.items() if s > to}
                elif step[0] == "forget" and highest:
                    await journal.delete_events(T, entity_id, highest)
                    processor.evict(T, entity_id)
                    events, restarted = {}, highest
                elif step[0] == "passivate":
                    processor.evict(T, entity_id)
                elif step[0] == "restart":
                    processor = EntityProcessor(CLASSES, journal, storage.snapshots)

                assert await journal.restarted_at(T, entity_id) == restarted
                fold = expected()
                if fold is None:
                    await both_fail(storage, entity_id)
                else:
                    assert await both(storage, entity_id) == fold
                live = processor.live.get((T, entity_id))
                if live is not None and fold is not None:
                    assert (live.state, live.seq_nr) == fold

    asyncio.run(scenario())


async def test_a_long_forgotten_history_costs_no_empty_pages(storage: Storage) -> None:
    # Forgotten at 50,000 (its deletions row as delete_events leaves it), then 3 events: the
    # batched replay reads them with one events query, not 5,000 pages of nothing.
    async with storage.database.write() as conn:
        await conn.execute(
            insert(schema.deletions).values(
                entity_type=T, entity_id="long", deleted_to=50_000, restarted_at=50_000
            )
        )
    await append(storage, "long", 50_000, 1, 2, 3)
    selects: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "(SELECT")):
            selects.append(statement)

    engine = storage.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", listener)
    try:
        read = await storage.journal.replay_many(T, {"long": 1}, page_size=10)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert [e.seq_nr for e in read["long"].events] == [50_001, 50_002, 50_003]
    assert len(selects) == 2  # the positions, the events
    assert await both(storage, "long") == (Items((1, 2, 3)), 50_003)
