"""Safe retries (command ids and stored replies), passivation and backpressure: the
EntityProcessor and the in-process runtime, on both journal backends."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lagompy import (
    Command,
    Effect,
    InvalidCommand,
    JournalSettings,
    PersistentEntity,
    Storage,
    open_storage,
    sharded_tag,
    start_in_process,
)
from lagompy.errors import AskTimeout, DuplicateCommandId, EncodeError, EventsMissing, Overloaded
from lagompy.journal import AtomicWrite, EventEnvelope, Journal, Replayed, WriteResult
from lagompy.journal._model import atomic_write, from_us, write_result
from lagompy.runtime._processing import EntityProcessor, Request, recover

# --------------------------------------------------------------------------- a counter entity


@dataclass(frozen=True)
class Increment(Command[int]):
    by: int = 1


@dataclass(frozen=True)
class Decrement(Command[int]):
    """Rejected while the count is 0."""


@dataclass(frozen=True)
class GetCount(Command[int]):
    pass


@dataclass(frozen=True)
class Reset(Command[int]):
    """Persists without ``then_reply``: its reply is None, whatever ``Command[int]`` says."""


@dataclass(frozen=True)
class Mislabel(Command[int]):
    """A bug: replies a str where it declares an int."""


CounterCommand = Increment | Decrement | GetCount | Reset | Mislabel


@dataclass(frozen=True)
class Changed:
    by: int


@dataclass(frozen=True)
class Count:
    value: int = 0


class CounterEntity(PersistentEntity[CounterCommand, Changed, Count]):
    type_name = "counter"
    initial_state = Count()

    def on_command(self, state: Count, command: CounterCommand) -> Effect[Count]:
        match command:
            case Increment(by=by):
                return Effect.persist(Changed(by)).then_reply(lambda s: s.value)
            case Decrement():
                if state.value == 0:
                    raise InvalidCommand(f"counter {self.entity_id} is at 0")
                return Effect.persist(Changed(-1)).then_reply(lambda s: s.value)
            case GetCount():
                return Effect.reply(state.value)
            case Reset():
                return Effect.persist(Changed(-state.value))
            case Mislabel():
                return Effect.persist(Changed(1)).then_reply("one")
        return Effect.unhandled()

    def on_event(self, state: Count, event: Changed) -> Count:
        return Count(state.value + event.by)


async def _events(storage: Storage, entity_id: str) -> list[Any]:
    return [e.event for e in await storage.journal.events("counter", entity_id)]


def _slow_appends(storage: Storage, delay: float) -> None:
    """Make every journal append of ``storage`` take ``delay`` seconds longer."""
    original = storage.journal.append

    async def slow(writes: Sequence[AtomicWrite]) -> list[WriteResult]:
        await asyncio.sleep(delay)
        return await original(writes)

    storage.journal.append = slow  # type: ignore[method-assign]


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(settings=journal_settings, entities=[CounterEntity]) as s:
        yield s


# --------------------------------------------------------------------------- safe retries


async def test_the_same_command_id_is_applied_once(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "c")
        assert await ref.ask(Increment(5), command_id="pay-1") == 5
        assert await ref.ask(Increment(5), command_id="pay-1") == 5  # not 10
        assert await ref.ask(Increment(1)) == 6  # no id: a new command
        # The same id twice in one batch: run once, both get its reply.
        both = await asyncio.gather(
            ref.ask(Increment(10), command_id="pay-2"), ref.ask(Increment(10), command_id="pay-2")
        )
        assert list(both) == [16, 16]
        assert await ref.ask(Increment(10), command_id="pay-2") == 16
        assert await _events(ents.storage, "c") == [Changed(5), Changed(1), Changed(10)]
        # Command ids are per entity: the same id on another entity is another command.
        assert await ents.ref_for(CounterEntity, "d").ask(Increment(3), command_id="pay-1") == 3
        stats = ents.stats()
        assert stats["duplicates"] == 3 and stats["events_persisted"] == 4


async def test_a_rejected_command_runs_again(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "r")
        with pytest.raises(InvalidCommand, match="at 0"):
            await ref.ask(Decrement(), command_id="dec")
        await ref.ask(Increment())
        # Nothing was stored for the rejection: the retry runs, and now it is accepted.
        assert await ref.ask(Decrement(), command_id="dec") == 0
        assert await ref.ask(Decrement(), command_id="dec") == 0  # and now it is stored
        assert await _events(ents.storage, "r") == [Changed(1), Changed(-1)]


async def test_a_read_only_command_runs_again(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "g")
        assert await ref.ask(GetCount(), command_id="get") == 0
        await ref.ask(Increment(2))
        assert await ref.ask(GetCount(), command_id="get") == 2
        assert ents.stats()["duplicates"] == 0


async def test_a_retry_after_a_restart_is_still_answered_from_the_journal(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        assert await ents.ref_for(CounterEntity, "p").ask(Increment(7), command_id="once") == 7
        told = ents.ref_for(CounterEntity, "p").tell(Increment(1))  # a generated id
        assert re.fullmatch("[0-9a-f]{32}", told)
    # A new runtime on the same database (a restarted process) knows both ids.
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "p")
        assert await ref.ask(Increment(7), command_id="once") == 7
        assert await ref.ask(Increment(1), command_id=told) == 8
        assert ents.stats()["activations"] == 0  # answered without even recovering it
        assert await ref.ask(GetCount()) == 8
        assert await _events(ents.storage, "p") == [Changed(7), Changed(1)]


async def test_replies_are_deleted_with_their_events(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        journal = ents.storage.journal
        ref = ents.ref_for(CounterEntity, "x")
        await ref.ask(Increment(1), command_id="first")
        await ref.ask(Increment(2), command_id="second")
        keys = [("counter", "x", "first"), ("counter", "x", "second")]
        assert sorted(await journal.stored_replies(keys)) == keys
        assert await journal.delete_events("counter", "x", 1) == 1
        assert sorted(await journal.stored_replies(keys)) == [("counter", "x", "second")]
        # With its reply gone, the first command id is new again.
        assert await ref.ask(Increment(1), command_id="first") == 4
        assert await ref.ask(Increment(2), command_id="second") == 3  # still stored


async def test_an_ask_timeout_carries_the_command_id(journal_settings: JournalSettings) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "t")
        _slow_appends(ents.storage, 0.3)
        with pytest.raises(AskTimeout) as info:
            await ref.ask(Increment(1), timeout=0.05, command_id="slow")
        assert info.value.command_id == "slow" and "slow" in str(info.value)
        with pytest.raises(AskTimeout) as info:
            await ref.ask(Increment(100), timeout=0.05)  # queued behind the slow batch
        generated = info.value.command_id
        assert generated is not None and re.fullmatch("[0-9a-f]{32}", generated)
        # Asking again with the id gives the outcome without applying the command twice.
        assert await ref.ask(Increment(1), command_id="slow") == 1
        # The ask that timed out while still queued never ran.
        assert await _events(ents.storage, "t") == [Changed(1)]


async def test_a_none_reply_is_stored_and_a_reply_that_cannot_be_is_an_error(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[CounterEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(CounterEntity, "n")
        await ref.ask(Increment(4))
        assert await ref.ask(Reset(), command_id="reset") is None
        await ref.ask(Increment(1))
        assert await ref.ask(Reset(), command_id="reset") is None  # stored: not applied again
        assert await ref.ask(GetCount()) == 1
        # A reply that does not fit the declared type cannot be stored: nothing is applied.
        with pytest.raises(EncodeError, match=r"Mislabel.*cannot be stored"):
            await ref.ask(Mislabel())
        assert await ref.ask(GetCount()) == 1
        assert await _events(ents.storage, "n") == [Changed(4), Changed(-4), Changed(1)]


async def test_command_ids_must_be_non_empty_and_fit_the_column(tmp_path: object) -> None:
    async with await start_in_process(
        entities=[CounterEntity], journal_url=f"sqlite:///{tmp_path}/ids.db"
    ) as ents:
        ref = ents.ref_for(CounterEntity, "v")
        for bad in ("", "x" * 256):
            with pytest.raises(ValueError, match="command id"):
                await ref.ask(Increment(), command_id=bad)
        assert await ref.ask(Increment(), command_id="x" * 255) == 1


async def test_the_processor_checks_stored_replies_once_per_batch(storage: Storage) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    lookups = 0
    original = storage.journal.stored_replies

    async def counting(keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], bytes]:
        nonlocal lookups
        lookups += 1
        return await original(keys)

    storage.journal.stored_replies = counting  # type: ignore[method-assign]
    first = await processor.process(
        [Request("counter", f"e{i}", Increment(i), command_id=f"c{i}") for i in range(5)]
    )
    assert [r.unwrap() for r in first] == [0, 1, 2, 3, 4]
    assert lookups == 0  # nothing asked to check
    again = await processor.process(
        [
            Request("counter", f"e{i}", Increment(i), command_id=f"c{i}", check_duplicate=True)
            for i in range(5)
        ]
        + [Request("counter", "e9", Increment(9), command_id="new", check_duplicate=True)]
    )
    assert lookups == 1
    assert [r.unwrap() for r in again] == [0, 1, 2, 3, 4, 9]
    assert [r.events for r in again] == [()] * 5 + [(Changed(9),)]
    assert processor.stats()["duplicates"] == 5


async def test_a_known_id_without_the_duplicate_check_fails_that_entity_alone(
    storage: Storage,
) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    await processor.process([Request("counter", "k", Increment(), command_id="used")])
    dup, other = await processor.process(
        [
            Request("counter", "k", Increment(), command_id="used"),
            Request("counter", "m", Increment(), command_id="used"),
        ]
    )
    assert isinstance(dup.error, DuplicateCommandId) and dup.error.command_id == "used"
    assert other.unwrap() == 1
    assert await _events(storage, "k") == [Changed(1)]
    # The entity is fine: the next command applies.
    (next_one,) = await processor.process([Request("counter", "k", Increment())])
    assert next_one.unwrap() == 2


def _counting_lookups(storage: Storage) -> list[int]:
    """Count the journal's stored-reply lookups (one list item per lookup: its key count)."""
    calls: list[int] = []
    original = storage.journal.stored_replies

    async def counting(keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], bytes]:
        calls.append(len(keys))
        return await original(keys)

    storage.journal.stored_replies = counting  # type: ignore[method-assign]
    return calls


def _checked(entity_id: str, command: Any, command_id: str) -> Request:
    return Request("counter", entity_id, command, command_id=command_id, check_duplicate=True)


async def test_new_command_ids_to_entities_in_memory_are_not_looked_up(storage: Storage) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    lookups = _counting_lookups(storage)
    await processor.process([_checked(f"w{i}", Increment(1), f"a{i}") for i in range(3)])
    assert lookups == []  # new entities: nothing stored
    again = await processor.process([_checked(f"w{i}", Increment(2), f"b{i}") for i in range(3)])
    assert [r.unwrap() for r in again] == [3, 3, 3]
    assert lookups == []  # in memory: their write confirmed the ids were new
    # A read-only command and a rejection persist nothing: looked up after, in one query.
    read, rejected = await processor.process(
        [_checked("w0", GetCount(), "g"), _checked("fresh", Decrement(), "d")]
    )
    assert read.unwrap() == 3 and isinstance(rejected.error, InvalidCommand)


@pytest.mark.parametrize("entities", [1, 80])  # one write, and a batch large enough for COPY
async def test_a_retry_to_an_entity_in_memory_gets_its_stored_reply(
    storage: Storage, entities: int
) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    ids = [f"m{i}" for i in range(entities)]
    first = await processor.process([_checked(e, Increment(5), "pay") for e in ids])
    assert [r.unwrap() for r in first] == [5] * entities
    assert processor.stats()["live_entities"] == entities
    # The retry persists events again when decided: the journal refuses its entity's write,
    # and the entity's commands run again after a lookup; the other entities commit.
    retry = await processor.process(
        [_checked("m0", Increment(5), "pay"), _checked("m0", Increment(1), "next")]
        + [_checked(e, Increment(1), "other") for e in ids[1:]]
    )
    assert (retry[0].reply, retry[0].stored, retry[0].events) == (5, True, ())
    assert retry[1].unwrap() == 6 and retry[1].events == (Changed(1),)
    assert [r.unwrap() for r in retry[2:]] == [6] * (entities - 1)
    assert await _events(storage, "m0") == [Changed(5), Changed(1)]
    stats = processor.stats()
    assert stats["duplicates"] == 1 and stats["failed_writes"] == 0


async def test_a_retry_now_rejected_gets_its_stored_reply(storage: Storage) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    await processor.process([_checked("z", Increment(1), "up")])
    (down,) = await processor.process([_checked("z", Decrement(), "down")])
    assert down.unwrap() == 0
    lookups = _counting_lookups(storage)
    # Decided again, the retry is rejected (the counter is at 0) and persists nothing: the
    # lookup after the commit answers it with its stored reply. The command after it was
    # decided on the right state (the retry changed nothing).
    retry, up = await processor.process(
        [_checked("z", Decrement(), "down"), _checked("z", Increment(4), "up-again")]
    )
    assert (retry.reply, retry.error, retry.stored) == (0, None, True)
    assert up.unwrap() == 4
    assert lookups == [1]  # the rejected one only
    assert await _events(storage, "z") == [Changed(1), Changed(-1), Changed(4)]


async def test_commands_decided_after_a_retry_run_again_on_the_true_state(
    storage: Storage,
) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    await processor.process([_checked("h", Increment(2), "two")])
    await processor.process([_checked("h", Decrement(), "d")])  # at 1
    # Decided at once, the retry of "d" takes the counter to 0 and "x" is rejected; the
    # journal refuses the write (d is stored), and run again "d" gets its reply, "x" takes
    # the counter from 1 to 0 and "y" is the one rejected.
    d, x, y = await processor.process(
        [
            _checked("h", Decrement(), "d"),
            _checked("h", Decrement(), "x"),
            _checked("h", Decrement(), "y"),
        ]
    )
    assert (d.reply, d.stored) == (1, True)
    assert x.unwrap() == 0 and x.events == (Changed(-1),)
    assert isinstance(y.error, InvalidCommand)
    assert await _events(storage, "h") == [Changed(2), Changed(-1), Changed(-1)]


_ID_COMMANDS = st.one_of(
    st.builds(Increment, st.integers(1, 3)), st.just(Decrement()), st.just(GetCount())
)
#: one ask: (entity, command, command id from a small pool, so that ids repeat)
_ASKS = st.tuples(st.sampled_from("ab"), _ID_COMMANDS, st.sampled_from([f"c{i}" for i in range(6)]))


def _model_batch(
    asks: Sequence[tuple[str, Any, str]],
    counts: dict[str, int],
    stored: dict[tuple[str, str], int],
) -> list[Any]:
    """What a batch of checked asks must answer, one command after the other: a stored id gets
    its stored reply; an id seen earlier in the batch gets that one's answer; otherwise the
    command runs (its reply stored when it persists an event)."""
    answers: list[Any] = []
    first: dict[tuple[str, str], Any] = {}
    for entity, command, cid in asks:
        key = (entity, cid)
        if key in stored:
            answers.append(stored[key])
            continue
        if key in first:
            answers.append(first[key])
            continue
        value = counts.get(entity, 0)
        answer: Any
        if isinstance(command, GetCount):
            answer = value
        elif isinstance(command, Decrement) and value == 0:
            answer = "rejected"
        else:
            value += command.by if isinstance(command, Increment) else -1
            counts[entity] = value
            answer = stored[key] = value
        first[key] = answer
        answers.append(answer)
    return answers


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(_ASKS, min_size=1, max_size=6), min_size=1, max_size=5),
    evictions=st.lists(st.booleans(), min_size=5, max_size=5),
)
async def test_checked_command_ids_apply_once_whatever_the_batches(
    storage: Storage, batches: list[list[tuple[str, Any, str]]], evictions: list[bool]
) -> None:
    """Random batches of asks with repeating command ids, the entities in memory or dropped
    between batches: the answers are those of running the commands one by one with stored
    replies, and the state in memory is the state recovered from the journal."""
    run = uuid.uuid4().hex[:8]
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    counts: dict[str, int] = {}
    stored: dict[tuple[str, str], int] = {}
    for batch, evict in zip(batches, evictions, strict=False):
        if evict:
            for entity in "ab":
                processor.evict("counter", f"{run}-{entity}")
        results = await processor.process(
            [_checked(f"{run}-{e}", command, cid) for e, command, cid in batch]
        )
        seen = ["rejected" if isinstance(r.error, InvalidCommand) else r.unwrap() for r in results]
        assert seen == _model_batch(batch, counts, stored)
    for entity in "ab":
        live = processor.live.get(("counter", f"{run}-{entity}"))
        recovered = await recover(
            CounterEntity, f"{run}-{entity}", storage.journal, storage.snapshots
        )
        assert recovered.state == Count(counts.get(entity, 0))
        if live is not None:
            assert (live.state, live.seq_nr) == (recovered.state, recovered.seq_nr)


# --------------------------------------------------------------------------- passivation


async def test_the_lru_bound_holds_and_reactivation_restores_the_state(storage: Storage) -> None:
    processor = EntityProcessor([CounterEntity], storage.journal, storage.snapshots, max_entities=3)
    for i in range(6):
        await processor.process([Request("counter", f"e{i}", Increment(i + 1))])
        assert len(processor.live) <= 3
    await processor.process([Request("counter", "e3", GetCount())])  # e3 is used again
    await processor.process([Request("counter", "e0", Increment(10))])  # reactivates e0
    assert list(processor.live) == [("counter", "e5"), ("counter", "e3"), ("counter", "e0")]
    stats = processor.stats()
    assert stats["passivations"] == 4 and stats["activations"] == 7
    assert stats["live_entities"] == 3
    # A batch bigger than the bound keeps all of its entities until it is done.
    results = await processor.process([Request("counter", f"e{i}", GetCount()) for i in range(6)])
    assert [r.unwrap() for r in results] == [11, 2, 3, 4, 5, 6]
    assert len(processor.live) == 3
    for i in range(6):
        assert len(await _events(storage, f"e{i}")) == (2 if i == 0 else 1)


async def test_passivate_idle_drops_only_idle_entities(storage: Storage) -> None:
    processor = EntityProcessor(
        [CounterEntity], storage.journal, storage.snapshots, idle_timeout=10
    )
    await processor.process([Request("counter", "old", Increment(3))])
    before = processor.live[("counter", "old")].state
    now = time.monotonic()
    await processor.process([Request("counter", "new", Increment())])
    processor.live[("counter", "old")].last_used = now - 20
    assert processor.passivate_idle(now) == 1
    assert list(processor.live) == [("counter", "new")]
    assert processor.passivate_idle(now + 5) == 0
    assert processor.passivate_idle(now + 11) == 1
    assert processor.stats()["passivations"] == 2
    (again,) = await processor.process([Request("counter", "old", GetCount())])
    assert again.unwrap() == 3
    assert processor.live[("counter", "old")].state == before
    assert await _events(storage, "old") == [Changed(3)]
    # Without an idle timeout nothing is ever idle.
    plain = EntityProcessor([CounterEntity], storage.journal, storage.snapshots)
    await plain.process([Request("counter", "old", GetCount())])
    assert plain.passivate_idle(time.monotonic() + 10**9) == 0


async def test_an_entity_in_a_batch_in_progress_is_never_passivated(storage: Storage) -> None:
    processor = EntityProcessor(
        [CounterEntity], storage.journal, storage.snapshots, idle_timeout=0.01
    )
    # In memory (a new entity enters memory only once its first write committed).
    (first,) = await processor.process([Request("counter", "busy", Increment())])
    assert first.unwrap() == 1
    _slow_appends(storage, 0.3)
    batch = asyncio.create_task(processor.process([Request("counter", "busy", Increment())]))
    await asyncio.sleep(0.1)  # the batch waits on its write
    assert not batch.done()
    assert processor.passivate_idle(time.monotonic() + 100) == 0
    assert ("counter", "busy") in processor.live
    (result,) = await batch
    assert result.unwrap() == 2
    assert processor.live[("counter", "busy")].seq_nr == 2
    assert processor.passivate_idle(time.monotonic() + 100) == 1


async def test_idle_entities_are_passivated_without_any_call(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(
        entities=[CounterEntity], settings=journal_settings, idle_timeout=0.1
    ) as ents:
        await asyncio.gather(
            ents.ref_for(CounterEntity, "a").ask(Increment(2)),
            ents.ref_for(CounterEntity, "b").ask(Increment(3)),
        )
        assert ents.stats()["live_entities"] == 2
        deadline = time.monotonic() + 2
        while ents.stats()["live_entities"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # no asks: only the background sweep can passivate
        assert ents.stats()["live_entities"] == 0
        assert ents.stats()["passivations"] == 2
        assert await ents.ref_for(CounterEntity, "a").ask(GetCount()) == 2
        assert await ents.ref_for(CounterEntity, "b").ask(Increment()) == 4
    assert ents._passivator is not None and ents._passivator.done()


# --------------------------------------------------------------------------- backpressure


async def test_asks_beyond_max_pending_are_overloaded_and_not_run(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(
        entities=[CounterEntity], settings=journal_settings, max_pending=3
    ) as ents:
        ref = ents.ref_for(CounterEntity, "o")
        outcomes = await asyncio.gather(
            *(ref.ask(Increment(), command_id=f"o{i}") for i in range(4)),
            return_exceptions=True,
        )
        assert outcomes[:3] == [1, 2, 3]
        assert isinstance(outcomes[3], Overloaded)
        assert "max_pending" in str(outcomes[3]) and "3" in str(outcomes[3])
        with pytest.raises(Overloaded):
            for _ in range(4):
                ref.tell(Increment())
        await asyncio.sleep(0.05)
        assert ents.pending == 0
        assert len(await _events(ents.storage, "o")) == 6  # 3 asks + 3 tells, nothing more
        assert await ref.ask(GetCount()) == 6  # room again once the batch is done


class SnapshottedCounter(CounterEntity):
    type_name = "snap-counter"
    snapshot_every = 3


async def test_recovery_refuses_to_skip_deleted_events(journal_settings: JournalSettings) -> None:
    """Events deleted with no snapshot covering them: replaying the rest would give a wrong
    state, so recovery raises EventsMissing naming the entity and the missing numbers; with a
    snapshot that covers them it recovers; an entity whose whole history was deleted (and its
    snapshots) starts again from its initial state."""
    entities = [CounterEntity, SnapshottedCounter]
    async with await start_in_process(entities=entities, settings=journal_settings) as ents:
        for _ in range(4):
            await ents.ref_for(CounterEntity, "gap").ask(Increment(1))
            await ents.ref_for(SnapshottedCounter, "ok").ask(Increment(1))
            await ents.ref_for(SnapshottedCounter, "beyond").ask(Increment(1))
            await ents.ref_for(CounterEntity, "forgotten").ask(Increment(1))
        journal, snapshots = ents.storage.journal, ents.storage.snapshots
        await journal.delete_events("counter", "gap", 2)
        await journal.delete_events("snap-counter", "ok", 3)  # the snapshot is at 3
        await journal.delete_events("snap-counter", "beyond", 4)  # beyond the snapshot
        await journal.delete_events("counter", "forgotten", 4)

        with pytest.raises(EventsMissing, match=r"counter/gap .* events 1\.\.2 were deleted"):
            await recover(CounterEntity, "gap", journal, snapshots)
        ok = await recover(SnapshottedCounter, "ok", journal, snapshots)
        assert (ok.state, ok.seq_nr) == (Count(4), 4)
        with pytest.raises(EventsMissing, match=r"events 4\.\.4 .* covers only up to 3"):
            await recover(SnapshottedCounter, "beyond", journal, snapshots)
        forgotten = await recover(CounterEntity, "forgotten", journal, snapshots)
        assert (forgotten.state, forgotten.seq_nr) == (Count(0), 4)

        # Through the runtime the ask gets the error; the entity's history is untouched.
        ents.processor.evict("counter", "gap")
        with pytest.raises(EventsMissing):
            await ents.ref_for(CounterEntity, "gap").ask(Increment(1))
        assert [e.seq_nr for e in await journal.events("counter", "gap")] == [3, 4]


async def test_recovery_reads_in_one_transaction(journal_settings: JournalSettings) -> None:
    """Recovery reads the snapshot, the events after it and the deletions in one read
    transaction (the journal's reads join it), with or without a snapshot; reads in another
    task never join it, and each recovery opens its own."""
    from sqlalchemy import event

    async with await start_in_process(
        entities=[CounterEntity, SnapshottedCounter], settings=journal_settings
    ) as ents:
        for _ in range(7):
            await ents.ref_for(SnapshottedCounter, "s").ask(Increment(1))
            await ents.ref_for(CounterEntity, "c").ask(Increment(1))
        journal, snapshots = ents.storage.journal, ents.storage.snapshots
        begun: list[object] = []
        engine = journal.database.engine.sync_engine
        listener = lambda conn: begun.append(conn)  # noqa: E731
        event.listen(engine, "begin", listener)
        try:
            recovered = await recover(SnapshottedCounter, "s", journal, snapshots)
            assert (recovered.state, recovered.seq_nr, recovered.snapshot_seq_nr) == (
                Count(7),
                7,
                6,
            )
            assert len(begun) == 1
            plain = await recover(CounterEntity, "c", journal, snapshots)
            assert (plain.state, plain.seq_nr) == (Count(7), 7)
            assert len(begun) == 2

            async with journal.database.read() as outer:
                inner_conns: list[object] = []
                async with journal.database.read() as inner:
                    inner_conns.append(inner)

                async def elsewhere() -> object:
                    async with journal.database.read() as conn:
                        return conn

                other = await asyncio.create_task(elsewhere())
            assert inner_conns == [outer] and other is not outer
            assert len(begun) == 4
        finally:
            event.remove(engine, "begin", listener)


class RacingJournal(Journal):
    """A journal whose next replay of one entity lets a second, real writer (another storage
    on the same database, with a connection pool of its own, as a zombie copy of a shard host
    has) commit events right after the replay read the entity's events: the interleaving under
    which recovery once claimed that events had been deleted."""

    def __init__(self, journal: Journal, writer: Journal, key: tuple[str, str], events: int):
        super().__init__(journal.database, journal.serializer)
        self.writer = writer
        self.race: tuple[tuple[str, str], int] | None = (key, events)

    async def replay(
        self, entity_type: str, entity_id: str, *, from_seq_nr: int = 1, page_size: int = 1000
    ) -> list[EventEnvelope[Any]]:
        envelopes = await super().replay(
            entity_type, entity_id, from_seq_nr=from_seq_nr, page_size=page_size
        )
        if self.race is not None and self.race[0] == (entity_type, entity_id):
            (_, count), self.race = self.race, None
            seen = envelopes[-1].seq_nr if envelopes else from_seq_nr - 1
            await self.writer.append_one(
                AtomicWrite(entity_type, entity_id, seen, [Changed(1)] * count)
            )
        return envelopes

    async def replay_many(
        self, entity_type: str, from_seq_nrs: Mapping[str, int], *, page_size: int = 1000
    ) -> dict[str, Replayed]:
        """The same race for a batch's recovery: the events commit once the batch's read of
        events and deletions is done."""
        read = await super().replay_many(entity_type, from_seq_nrs, page_size=page_size)
        if self.race is not None and self.race[0][0] == entity_type:
            ((_, entity_id), count), self.race = self.race, None
            if entity_id in read:
                envelopes = read[entity_id].events
                seen = envelopes[-1].seq_nr if envelopes else from_seq_nrs[entity_id] - 1
                await self.writer.append_one(
                    AtomicWrite(entity_type, entity_id, seen, [Changed(1)] * count)
                )
        return read


@pytest.mark.parametrize("entity", [SnapshottedCounter, CounterEntity], ids=lambda c: c.type_name)
async def test_recovery_never_takes_a_concurrent_write_for_deleted_events(
    journal_settings: JournalSettings, entity: type[CounterEntity]
) -> None:
    """Recovery reads the events after the snapshot and finds none; another writer then
    commits two. Before: with a snapshot, recovery saw the higher sequence number and raised
    EventsMissing ("events 4..5 were deleted"); without one, it took the higher number on the
    initial state and the next command committed on a state that missed those events. Now the
    deletions decide: the entity starts at what it replayed, its write meets a conflict, it
    reloads and the command runs again on the whole history."""
    classes = [CounterEntity, SnapshottedCounter]
    async with await start_in_process(entities=classes, settings=journal_settings) as ents:
        before = 3 if entity is SnapshottedCounter else 0
        for _ in range(before):  # SnapshottedCounter saves a snapshot at 3
            await ents.ref_for(entity, "z").ask(Increment(1))
        if before:
            snapshot = await ents.storage.snapshots.load(entity.type_name, "z")
            assert snapshot is not None and snapshot.seq_nr == 3
        async with await open_storage(settings=journal_settings, entities=classes) as zombie:
            journal = RacingJournal(
                ents.storage.journal, zombie.journal, (entity.type_name, "z"), events=2
            )
            # Recovered, not presumed new (a counter never written would be written at once:
            # no recovery for the other writer to race).
            processor = EntityProcessor(classes, journal, ents.storage.snapshots, presume_new=False)
            (result,) = await processor.process(
                [Request(entity.type_name, "z", Increment(1), "after-the-race", True)]
            )
        assert result.error is None, result.error
        assert result.reply == before + 2 + 1
        assert processor.stats()["conflicts"] == 1
        events = await ents.storage.journal.events(entity.type_name, "z")
        assert [e.seq_nr for e in events] == list(range(1, before + 4))


# ------------------------------------------------------------------ tags, hot-path values


class TaggedCounter(CounterEntity):
    """The counter with a sharded tag: every event carries its entity's shard of the tag."""

    type_name = "tagged-counter"
    tag = sharded_tag("tagged-counter", shards=4)


class EventTaggedCounter(CounterEntity):
    """The counter with its own ``tags_for``: the tags depend on the event."""

    type_name = "event-tagged-counter"

    def tags_for(self, event: Changed) -> tuple[str, ...]:
        return ("up",) if event.by > 0 else ("down", "changes")


async def test_events_carry_their_entitys_tags_whichever_way_they_are_given(
    journal_settings: JournalSettings,
) -> None:
    classes = [CounterEntity, TaggedCounter, EventTaggedCounter]
    async with await open_storage(settings=journal_settings, entities=classes) as s:
        processor = EntityProcessor(classes, s.journal, s.snapshots)
        requests = [
            Request(cls.type_name, "t", command)
            for cls in classes
            for command in (Increment(2), Decrement(), Increment(1))
        ]
        results = await processor.process(requests)
        assert [r.reply for r in results] == [2, 1, 2] * 3
        shard = TaggedCounter.tag.for_entity("t")
        expected = {
            CounterEntity: [(), (), ()],
            TaggedCounter: [(shard,)] * 3,
            EventTaggedCounter: [("up",), ("down", "changes"), ("up",)],
        }
        for cls, tags in expected.items():
            events = await s.journal.events(cls.type_name, "t")
            assert [e.tags for e in events] == tags, cls.type_name
        by_tag = await s.journal.read_tag(shard, after_offset=0)
        assert [e.entity_type for e in by_tag.envelopes] == ["tagged-counter"] * 3
        down = await s.journal.read_tag("changes", after_offset=0)
        assert [(e.entity_type, e.seq_nr) for e in down.envelopes] == [("event-tagged-counter", 2)]


def test_journal_values_built_on_the_hot_path_equal_their_constructors() -> None:
    events = [Changed(1), Changed(2)]
    replies = [("cmd-1", 2, b"\x01")]
    fast = atomic_write("counter", "c", 3, events, [("a",), ()], replies)
    slow = AtomicWrite("counter", "c", 3, events, [("a",), ()], None, replies)
    assert fast == slow and repr(fast) == repr(slow) and hash(fast.key) == hash(slow.key)
    assert dataclasses.replace(fast, expected_seq_nr=4) == dataclasses.replace(
        slow, expected_seq_nr=4
    )
    assert set(vars(fast)) == {f.name for f in dataclasses.fields(AtomicWrite)}
    result = write_result(fast, (7, 8), 1_000_000)
    assert result == WriteResult(slow, (7, 8), 1_000_000) and result.ok and result.error is None
    assert set(vars(result)) == {f.name for f in dataclasses.fields(WriteResult)}
    assert [(e.seq_nr, e.offset, e.tags) for e in result.unwrap()] == [
        (4, 7, ("a",)),
        (5, 8, ()),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.entity_id = "d"  # type: ignore[misc]
    # The envelopes of a committed write, built field by field: equal to the constructor's.
    tagged = AtomicWrite("counter", "c", 3, events, [("a", "b", "a"), ()], {"k": [1]}, replies)
    when = from_us(1_000_000)
    made = write_result(tagged, (7, 8), 1_000_000).envelopes
    built = tuple(
        EventEnvelope("counter", "c", seq, offset, when, event, tags, {"k": [1]})
        for seq, offset, event, tags in ((4, 7, events[0], ("a", "b")), (5, 8, events[1], ()))
    )
    assert made == built and repr(made) == repr(built)
    assert [set(vars(e)) for e in made] == [{f.name for f in dataclasses.fields(EventEnvelope)}] * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        made[0].offset = 9  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 events but 1 offsets"):
        _ = write_result(tagged, (7,), 1_000_000).envelopes
