"""A batch's cold entities are recovered together (``recover_many``, ``Journal.replay_many``,
``SnapshotStore.load_many``): a bounded number of queries per entity class, and for every
entity exactly what recovering it alone (``recover``) gives, errors included (invariant 6).
On both journal backends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, update

from lagompy import (
    Command,
    Effect,
    JournalSettings,
    PersistentEntity,
    Storage,
    open_storage,
)
from lagompy.errors import EventDecodeError, EventHandlerFailed, EventsMissing
from lagompy.journal import AtomicWrite, SnapshotToSave
from lagompy.runtime._processing import (
    EntityProcessor,
    LiveEntity,
    Request,
    recover,
    recover_many,
)
from lagompy.sql import _schema as schema

# --------------------------------------------------------------------------- the entity


@dataclass(frozen=True)
class Append(Command[int]):
    value: int


@dataclass(frozen=True)
class Appended:
    value: int


@dataclass(frozen=True)
class Items:
    """The values in order: a state that depends on the order of its events."""

    values: tuple[int, ...] = ()


class ListEntity(PersistentEntity[Append, Appended, Items]):
    type_name = "batched-list"
    initial_state = Items()
    snapshot_every: ClassVar[int | None] = None

    def on_command(self, state: Items, command: Append) -> Effect[Items]:
        return Effect.persist(Appended(command.value)).then_reply(lambda s: len(s.values))

    def on_event(self, state: Items, event: Appended) -> Items:
        if event.value < 0:
            raise ValueError("a negative value")  # an event handler that fails on old data
        return Items((*state.values, event.value))


class SnapshottedListEntity(ListEntity):
    type_name = "batched-list-snap"
    snapshot_every = 1000  # snapshots are saved by the tests, not by the processor


CLASSES = [ListEntity, SnapshottedListEntity]


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(settings=journal_settings, entities=CLASSES) as storage:
        yield storage


@dataclass(frozen=True)
class History:
    """One entity's history as written to the journal."""

    events: int
    snapshots: tuple[int, ...] = ()
    #: the latest snapshot's stored state cannot be decoded
    unreadable: bool = False
    deleted_to: int = 0
    #: an event handler fails on this event (a negative value); 0: none
    failing: int = 0
    #: this event's type is unknown to the serializer; 0: none
    undecodable: int = 0
    #: events written after the deletion (after all of them were deleted, the entity was
    #: forgotten and starts again under these)
    rewritten: int = 0


async def write(storage: Storage, cls: type[ListEntity], entity_id: str, h: History) -> None:
    t = cls.type_name
    if h.events:
        values = [-n if n == h.failing else n for n in range(1, h.events + 1)]
        await storage.journal.append_one(
            AtomicWrite(t, entity_id, 0, [Appended(v) for v in values])
        )
    if h.snapshots:
        await storage.snapshots.save_many(
            [SnapshotToSave(t, entity_id, s, Items(tuple(range(1, s + 1)))) for s in h.snapshots]
        )
    async with storage.database.write() as conn:
        if h.unreadable and h.snapshots:
            s = schema.snapshots
            await conn.execute(
                update(s)
                .where(s.c.entity_type == t, s.c.entity_id == entity_id)
                .where(s.c.seq_nr == max(h.snapshots))
                .values(state_type="NoSuchState")
            )
        if h.undecodable:
            e = schema.events
            await conn.execute(
                update(e)
                .where(e.c.entity_type == t, e.c.entity_id == entity_id)
                .where(e.c.seq_nr == h.undecodable)
                .values(event_type="NoSuchEvent")
            )
    if h.deleted_to:
        await storage.journal.delete_events(t, entity_id, h.deleted_to)
    if h.rewritten:
        await storage.journal.append_one(
            AtomicWrite(t, entity_id, h.events, [Appended(100 + n) for n in range(h.rewritten)])
        )


def outcome(result: LiveEntity | BaseException) -> tuple[Any, ...]:
    """What must match between the two ways of recovering an entity."""
    if isinstance(result, BaseException):
        return (type(result), str(result))
    return (result.state, result.seq_nr, result.snapshot_seq_nr, result.recovered_from_snapshot)


async def alone(cls: type[ListEntity], entity_id: str, storage: Storage) -> tuple[Any, ...]:
    try:
        return outcome(await recover(cls, entity_id, storage.journal, storage.snapshots))
    except Exception as e:
        return outcome(e)


@contextmanager
def counting_selects(storage: Storage) -> Iterator[list[str]]:
    """The SELECT statements run on the storage's database meanwhile."""
    statements: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "(SELECT")):
            statements.append(statement)

    engine = storage.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", listener)


# --------------------------------------------------------------------------- property


@st.composite
def histories(draw: st.DrawFn) -> History:
    events = draw(st.integers(0, 12))
    seqs = st.integers(1, events) if events else st.nothing()
    snapshots = tuple(sorted(draw(st.sets(seqs, max_size=3)))) if events else ()
    return History(
        events=events,
        snapshots=snapshots,
        unreadable=draw(st.booleans()) if snapshots else False,
        deleted_to=draw(st.sampled_from([0, 0, *range(1, events + 2)])) if events else 0,
        failing=draw(st.sampled_from([0, 0, 0, *range(1, events + 1)])) if events else 0,
        undecodable=draw(st.sampled_from([0, 0, 0, 0, *range(1, events + 1)])) if events else 0,
        rewritten=draw(st.sampled_from([0, 0, 1, 3])) if events else 0,
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entities=st.lists(st.tuples(st.sampled_from(CLASSES), histories()), max_size=8),
    unknown=st.integers(0, 2),
    page_size=st.integers(1, 15),
)
def test_batched_recovery_equals_recovering_each_alone(
    journal_settings: JournalSettings,
    entities: list[tuple[type[ListEntity], History]],
    unknown: int,
    page_size: int,
) -> None:
    """Random histories (snapshots, an unreadable latest snapshot, deletions below, at and
    beyond the snapshot, of every event, events written after them, an event its handler fails
    on, an undecodable event) and ids never written: per entity, the batch's recovery gives
    what recovering it alone gives, and the journal's batched replay (in pages of any size)
    what replaying it alone gives."""

    async def scenario() -> None:
        prefix = uuid.uuid4().hex[:8]
        async with await open_storage(settings=journal_settings, entities=CLASSES) as storage:
            ids: dict[type[ListEntity], list[str]] = {cls: [] for cls in CLASSES}
            for n, (cls, history) in enumerate(entities):
                entity_id = f"{prefix}-{n}"
                await write(storage, cls, entity_id, history)
                ids[cls].append(entity_id)
            for cls in CLASSES:
                ids[cls].extend(f"{prefix}-never-{n}" for n in range(unknown))
                expected = {i: await alone(cls, i, storage) for i in ids[cls]}
                batched = await recover_many(cls, ids[cls], storage.journal, storage.snapshots)
                assert {i: outcome(r) for i, r in batched.items()} == expected

                starts = {i: 1 + n % 3 for n, i in enumerate(ids[cls])}
                read = await storage.journal.replay_many(cls.type_name, starts, page_size=page_size)
                assert set(read) == set(starts)
                for entity_id, start in starts.items():
                    try:
                        replayed = await storage.journal.replay(
                            cls.type_name, entity_id, from_seq_nr=start
                        )
                    except EventDecodeError as e:
                        assert read[entity_id].error is not None
                        assert str(read[entity_id].error) == str(e)
                    else:
                        assert read[entity_id].error is None
                        assert read[entity_id].events == replayed
                    assert (
                        read[entity_id].deleted_to,
                        read[entity_id].restarted_at,
                    ) == await storage.journal.deletions(cls.type_name, entity_id)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- bounded queries


async def test_a_batch_of_cold_entities_is_recovered_with_a_few_queries(storage: Storage) -> None:
    """Sixty cold entities of two classes, with snapshots, events and deletions, and new ones:
    one read transaction, at most three SELECTs per class (snapshots, positions, events),
    where one by one took two or three each."""
    for n in range(20):
        await write(storage, ListEntity, f"plain-{n}", History(events=n % 5))
        await write(
            storage,
            SnapshottedListEntity,
            f"snap-{n}",
            History(events=6, snapshots=(3,), deleted_to=2 if n % 2 else 0),
        )
    requests = [
        Request(cls.type_name, f"{name}-{n}", Append(100))
        for n in range(20)
        for cls, name in ((ListEntity, "plain"), (SnapshottedListEntity, "snap"))
    ] + [Request(ListEntity.type_name, f"new-{n}", Append(100)) for n in range(20)]
    processor = EntityProcessor(CLASSES, storage.journal, storage.snapshots)
    begun: list[object] = []
    engine = storage.database.engine.sync_engine
    listener = begun.append
    event.listen(engine, "begin", listener)
    try:
        with counting_selects(storage) as selects:
            results = await processor.process(requests)
    finally:
        event.remove(engine, "begin", listener)
    assert [r.error for r in results] == [None] * len(requests)
    for request, result in zip(requests, results, strict=True):
        n = int(request.entity_id.rsplit("-", 1)[1])
        if request.entity_id.startswith("plain"):
            assert result.reply == n % 5 + 1
        elif request.entity_id.startswith("snap"):
            assert result.reply == 7
        else:
            assert result.reply == 1
    recovery = [s for s in selects if "lagompy_command_replies" not in s]
    assert len(recovery) <= 5, recovery  # plain: positions, events; snap: + snapshots
    assert len(begun) == 1  # one read transaction for the whole recovery (the write is apart)
    assert processor.stats()["activations"] == 60


async def test_long_histories_are_read_in_bounded_pages(storage: Storage) -> None:
    """Three entities of 2,500 events: no query of the batched replay returns more than its
    page of events, and every event arrives once, in order."""
    ids = [f"long-{n}" for n in range(3)]
    for entity_id in ids:
        for start in range(0, 2_500, 500):
            await storage.journal.append_one(
                AtomicWrite(
                    ListEntity.type_name,
                    entity_id,
                    start,
                    [Appended(v) for v in range(start + 1, start + 501)],
                )
            )
    with counting_selects(storage) as selects:
        read = await storage.journal.replay_many(
            ListEntity.type_name, dict.fromkeys(ids, 1), page_size=1_000
        )
    for entity_id in ids:
        assert [e.seq_nr for e in read[entity_id].events] == list(range(1, 2_501))
        assert [e.event.value for e in read[entity_id].events] == list(range(1, 2_501))
    # one positions query, then 7,500 events in pages of 1,000
    assert len(selects) == 1 + 8
    batched = await recover_many(ListEntity, ids, storage.journal, storage.snapshots)
    for entity_id in ids:
        live = batched[entity_id]
        assert isinstance(live, LiveEntity)
        assert live.seq_nr == 2_500 and live.state == Items(tuple(range(1, 2_501)))


# --------------------------------------------------------------------------- host batches


async def test_a_batch_of_cold_entities_answers_each_with_its_own_outcome(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """One batch, many cold entities; a few cannot be recovered (events deleted beyond the
    snapshot, an undecodable event, a failing event handler) and one's snapshot is unreadable:
    each of those answers only its own requests; the rest run on their recovered state."""
    bad = {
        "gap": History(events=5, snapshots=(2,), deleted_to=4),
        "undecodable": History(events=4, undecodable=3),
        "failing": History(events=4, failing=2),
    }
    for name, history in bad.items():
        await write(storage, SnapshottedListEntity, name, history)
    await write(
        storage,
        SnapshottedListEntity,
        "unreadable",
        History(events=5, snapshots=(4,), unreadable=True),
    )
    for n in range(30):
        await write(storage, SnapshottedListEntity, f"ok-{n}", History(events=n % 4, snapshots=()))
    names = [*bad, "unreadable", *(f"ok-{n}" for n in range(30)), "fresh"]
    requests = [Request(SnapshottedListEntity.type_name, name, Append(100)) for name in names]
    requests += [Request(SnapshottedListEntity.type_name, "gap", Append(101))]
    processor = EntityProcessor(CLASSES, storage.journal, storage.snapshots)
    results = await processor.process(requests)
    by_name = dict(zip(names, results, strict=False))
    assert isinstance(by_name["gap"].error, EventsMissing)
    assert isinstance(results[-1].error, EventsMissing)
    assert isinstance(by_name["undecodable"].error, EventDecodeError)
    assert isinstance(by_name["failing"].error, EventHandlerFailed)
    assert by_name["unreadable"].error is None and by_name["unreadable"].reply == 6
    assert "replaying all events instead" in caplog.text
    for n in range(30):
        assert by_name[f"ok-{n}"].error is None and by_name[f"ok-{n}"].reply == n % 4 + 1
    assert by_name["fresh"].reply == 1
    assert processor.stats()["activations"] == 32  # 30 ok, unreadable, fresh
    assert set(processor.live) == {
        (SnapshottedListEntity.type_name, n) for n in names if n not in bad
    }
    # Recovered == live: the batch's writes on top of the recovered states, recovered alone.
    for name in names:
        if name not in bad:
            live = processor.live[(SnapshottedListEntity.type_name, name)]
            alone_now = await alone(SnapshottedListEntity, name, storage)
            assert alone_now[:2] == (live.state, live.seq_nr)


async def test_entities_recovered_meanwhile_by_another_batch_are_kept(storage: Storage) -> None:
    """Two batches recover the same cold entities at once: one live entity each, and both
    batches' commands apply to it in turn."""
    for n in range(10):
        await write(storage, ListEntity, f"e{n}", History(events=2))
    processor = EntityProcessor(CLASSES, storage.journal, storage.snapshots)

    def batch(value: int) -> list[Request]:
        return [Request(ListEntity.type_name, f"e{n}", Append(value)) for n in range(10)]

    first, second = await asyncio.gather(processor.process(batch(7)), processor.process(batch(8)))
    errors = [r.error for r in (*first, *second) if r.error is not None]
    # Both batches decided on the same recovered state: the second write of each entity is
    # refused by the journal and runs again on the reloaded state.
    assert errors == []
    for n in range(10):
        live = processor.live[(ListEntity.type_name, f"e{n}")]
        assert live.seq_nr == 4 and sorted(live.state.values[2:]) == [7, 8]
        assert (await alone(ListEntity, f"e{n}", storage))[:2] == (live.state, live.seq_nr)
