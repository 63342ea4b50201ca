"""Entities that are not in memory are presumed new (``EntityProcessor.presume_new``): their
commands are decided on the initial state without a read, and only a write that the journal
accepts at sequence number 0 makes that decision count. An existing entity (dropped from
memory, or held by another host) must get exactly what recovering it first gives: the same
replies, rejections and state, its stored replies for known command ids, and its sequence
numbers continued (after deletions too), with nothing of the discarded decision written,
replied or run. On both journal backends; the last test through shard hosts on Ray."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray_entities import Add, CounterEntity, GetValue, LimitExceeded
from test_batched_recovery import counting_selects

from lagompy import (
    Command,
    CommandRejected,
    Effect,
    JournalSettings,
    PersistentEntity,
    Storage,
    open_storage,
    start,
)
from lagompy.errors import DuplicateCommandId, EventsMissing
from lagompy.runtime import shutdown_app
from lagompy.runtime._processing import EntityProcessor, Request, Result

# --------------------------------------------------------------------------- the entity


@dataclass(frozen=True)
class Open(Command[int]):
    """Persists on a closed account, rejected on an open one."""


@dataclass(frozen=True)
class Deposit(Command[int]):
    """Rejected on a closed account, persists on an open one."""

    amount: int


@dataclass(frozen=True)
class Balance(Command[int]):
    """Read only: -1 on a closed account."""


@dataclass(frozen=True)
class Nudge(Command[None]):
    """Unhandled on a closed account."""


@dataclass(frozen=True)
class Label(Command[None]):
    """Persists ``Labelled(value)`` on a closed account (an event the journal cannot encode
    when ``value`` is no int), rejected on an open one."""

    value: Any


AccountCommand = Open | Deposit | Balance | Nudge | Label


@dataclass(frozen=True)
class Opened:
    pass


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Labelled:
    value: int


AccountEvent = Opened | Deposited | Labelled


@dataclass(frozen=True)
class Closed:
    pass


@dataclass(frozen=True)
class Account:
    balance: int = 0


AccountState = Closed | Account

#: what the side effects of committed commands saw: (entity id, state)
SIDE_EFFECTS: list[tuple[str, Any]] = []


class AccountEntity(PersistentEntity[AccountCommand, AccountEvent, AccountState]):
    type_name = "presumed-account"
    initial_state: ClassVar[AccountState] = Closed()
    snapshot_every: ClassVar[int | None] = None

    def on_command(self, state: AccountState, command: AccountCommand) -> Effect[AccountState]:
        match state, command:
            case Closed(), Open():
                return (
                    Effect.persist(Opened())
                    .then_run(lambda s: SIDE_EFFECTS.append((self.entity_id, s)))
                    .then_reply(lambda s: 0)
                )
            case Account(), Open():
                raise CommandRejected(f"{self.entity_id} is open already")
            case Closed(), Deposit():
                raise CommandRejected(f"{self.entity_id} is not open")
            case Account(), Deposit(amount=amount):
                return Effect.persist(Deposited(amount)).then_reply(lambda s: _balance(s))
            case _, Balance():
                return Effect.reply(_balance(state))
            case Account(), Nudge():
                return Effect.persist(Deposited(0))
            case Closed(), Label(value=value):
                return Effect.persist(Labelled(value))
            case Account(), Label():
                raise CommandRejected(f"{self.entity_id} is open: no labels")
        return Effect.unhandled()

    def on_event(self, state: AccountState, event: AccountEvent) -> AccountState:
        match state, event:
            case _, Opened():
                return Account()
            case Account(balance=b), Deposited(amount=a):
                return Account(b + a)
            case _, Labelled():
                return state
        return state


class SnapshottedAccount(AccountEntity):
    type_name = "presumed-account-snap"
    snapshot_every = 2


def _balance(state: AccountState) -> int:
    return state.balance if isinstance(state, Account) else -1


CLASSES = [AccountEntity, SnapshottedAccount]
T = AccountEntity.type_name


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    async with await open_storage(settings=journal_settings, entities=CLASSES) as storage:
        yield storage


def processor(storage: Storage, **kw: Any) -> EntityProcessor:
    """A processor with nothing in memory: a shard host just started (or one that dropped
    every entity)."""
    return EntityProcessor(CLASSES, storage.journal, storage.snapshots, **kw)


def req(entity_id: str, command: Any, type_name: str = T, **kw: Any) -> Request:
    return Request(type_name, entity_id, command, **kw)


def answers(results: Sequence[Result]) -> list[Any]:
    """What the callers see: the reply, or the error's type and message."""
    return [
        (type(r.error).__name__, str(r.error)) if r.error is not None else (r.reply, r.events)
        for r in results
    ]


async def seq_nrs(storage: Storage, entity_id: str, type_name: str = T) -> list[int]:
    return [e.seq_nr for e in await storage.journal.events(type_name, entity_id)]


async def open_with(storage: Storage, entity_id: str, *deposits: int) -> None:
    """An existing account (written by another processor, since gone)."""
    p = processor(storage, presume_new=False)
    (r,) = await p.process([req(entity_id, Open())])
    r.unwrap()
    for amount in deposits:
        (r,) = await p.process([req(entity_id, Deposit(amount))])
        r.unwrap()


# --------------------------------------------------------------------------- new entities


async def test_new_entities_are_written_without_a_read(storage: Storage) -> None:
    """A batch of commands (with command ids checked for duplicates, as ``ctx.ask`` sends) to
    entities never seen: no SELECT at all (no recovery, no stored-reply lookup), one write,
    the entities in memory after it."""
    p = processor(storage)
    batch = [req(f"new-{i}", Open(), command_id=f"c{i}", check_duplicate=True) for i in range(20)]
    batch += [req(f"new-{i}", Deposit(i)) for i in range(20)]
    with counting_selects(storage) as selects:
        results = await p.process(batch)
    assert selects == []
    assert answers(results) == [(0, (Opened(),))] * 20 + [(i, (Deposited(i),)) for i in range(20)]
    stats = p.stats()
    assert (stats["new_entities"], stats["activations"], stats["live_entities"]) == (20, 20, 20)
    assert (stats["new_refused"], stats["conflicts"], stats["failed_writes"]) == (0, 0, 0)
    assert await seq_nrs(storage, "new-7") == [1, 2]
    # In memory now: the next command needs no read either.
    with counting_selects(storage) as selects:
        (r,) = await p.process([req("new-7", Balance())])
    assert (r.reply, selects) == (7, [])
    # Off: the same batch recovers first (the reads the presumption saves).
    off = processor(storage, presume_new=False)
    with counting_selects(storage) as selects:
        await off.process([req(f"other-{i}", Open()) for i in range(3)])
    assert selects


async def test_read_only_rejected_and_unhandled_commands_to_new_entities_read_first(
    storage: Storage,
) -> None:
    """Commands that persist nothing are never answered from a presumed state: the entity is
    recovered first (it finds nothing, so the answers are the initial state's)."""
    p = processor(storage)
    with counting_selects(storage) as selects:
        results = await p.process(
            [req("ro", Balance()), req("rej", Deposit(1)), req("unh", Nudge())]
        )
    assert selects  # recovered
    assert answers(results)[:2] == [(-1, ()), ("CommandRejected", "rej is not open")]
    assert results[2].error is not None and "does not handle" in str(results[2].error)
    assert p.stats()["new_entities"] == 0 and p.stats()["activations"] == 3


# --------------------------------------------------------------------------- existing entities


async def test_an_existing_entity_gets_what_recovering_it_gives(storage: Storage) -> None:
    """An existing entity not in memory: a command that would persist on the initial state
    but is rejected on the real one, a command rejected on the initial state that persists
    on the real one, a read-only command, an unhandled one and a mixed batch: the same answers
    as with recovery first, nothing of the discarded decision written or run, sequence numbers
    continued, and neither a conflict nor a failed write in the stats."""
    for name in ("on", "off"):
        for n in range(6):
            await open_with(storage, f"{name}-{n}", 10, 5)
    SIDE_EFFECTS.clear()
    outcomes = {}
    for name, presume in (("on", True), ("off", False)):
        p = processor(storage, presume_new=presume)
        outcomes[name] = answers(
            await p.process(
                [
                    req(f"{name}-0", Open()),
                    req(f"{name}-1", Deposit(3)),
                    req(f"{name}-2", Balance()),
                    req(f"{name}-3", Nudge()),
                    # one entity, in order: persist, rejected, read, persist, read
                    req(f"{name}-4", Deposit(1)),
                    req(f"{name}-4", Open()),
                    req(f"{name}-4", Balance()),
                    req(f"{name}-4", Deposit(2)),
                    req(f"{name}-4", Balance()),
                    # would persist on the initial state, then read: all discarded, rerun
                    req(f"{name}-5", Open()),
                    req(f"{name}-5", Balance()),
                ]
            )
        )
        stats = p.stats()
        assert (stats["conflicts"], stats["failed_writes"], stats["conflict_retries"]) == (0, 0, 0)
        if presume:
            # -0 and -5 would open on the initial state; -1 (Deposit rejected there), -2, -3
            # persist nothing on it; -4's Deposit is rejected there, then Open persists.
            assert (stats["new_refused"], stats["new_entities"]) == (3, 0)
    on = [(a, str(b).replace("on-", "")) if isinstance(a, str) else a for a, b in outcomes["on"]]
    off = [(a, str(b).replace("off-", "")) if isinstance(a, str) else a for a, b in outcomes["off"]]
    assert on == off
    assert outcomes["on"][0] == ("CommandRejected", "on-0 is open already")
    assert outcomes["on"][1] == (18, (Deposited(3),))
    assert outcomes["on"][2] == (15, ())
    assert outcomes["on"][4:] == [
        (16, (Deposited(1),)),
        ("CommandRejected", "on-4 is open already"),
        (16, ()),
        (18, (Deposited(2),)),
        (18, ()),
        ("CommandRejected", "on-5 is open already"),
        (15, ()),
    ]
    assert SIDE_EFFECTS == []  # no Open committed: the presumed one's side effect never ran
    assert await seq_nrs(storage, "on-0") == [1, 2, 3]
    assert await seq_nrs(storage, "on-4") == [1, 2, 3, 4, 5]


async def test_an_existing_entity_with_a_snapshot(storage: Storage) -> None:
    """Snapshots keep working: the entity is recovered from its snapshot after the refusal."""
    S = SnapshottedAccount.type_name
    p = processor(storage)
    await p.process([req("s", Open(), S), req("s", Deposit(4), S), req("s", Deposit(5), S)])
    assert (await storage.snapshots.load(S, "s")) is not None
    again = processor(storage)
    (r,) = await again.process([req("s", Deposit(1), S)])
    assert r.reply == 10 and again.live[(S, "s")].recovered_from_snapshot
    assert await seq_nrs(storage, "s", S) == [1, 2, 3, 4]


async def test_known_command_ids_are_still_answered_from_their_stored_reply(
    storage: Storage,
) -> None:
    """A command id already applied to an entity not in memory: with the duplicate check the
    stored reply (not run again, even though on the initial state it would persist); without
    it, DuplicateCommandId, as with recovery first."""
    first = processor(storage)
    (r,) = await first.process([req("dup", Open(), command_id="open-1", check_duplicate=True)])
    assert r.reply == 0
    await first.process([req("dup", Deposit(7))])
    for presume in (True, False):
        p = processor(storage, presume_new=presume)
        checked, unchecked = await p.process(
            [
                req("dup", Open(), command_id="open-1", check_duplicate=True),
                req("dup", Open(), command_id="open-1"),
            ]
        )
        assert (checked.reply, checked.stored, checked.error) == (0, True, None)
        # The second is the same id in the batch: the first's result.
        assert unchecked.reply == 0
        p = processor(storage, presume_new=presume)
        (unchecked,) = await p.process([req("dup", Deposit(1), command_id="open-1")])
        assert isinstance(unchecked.error, DuplicateCommandId)
        assert p.stats()["duplicates"] == 0
    assert await seq_nrs(storage, "dup") == [1, 2]
    # A read-only command with a checked id on an entity not in memory: looked up first.
    p = processor(storage)
    (r,) = await p.process([req("dup", Balance(), command_id="open-1", check_duplicate=True)])
    assert (r.reply, r.stored) == (0, True)


async def test_an_entity_whose_events_were_deleted_is_not_restarted_at_1(
    storage: Storage,
) -> None:
    """Every event deleted (the deletions table remembers how far): the entity is not new; it
    starts again from its initial state after the deleted numbers, as recovery makes it."""
    await open_with(storage, "gone", 1, 2)
    assert await storage.journal.delete_events(T, "gone", 3) == 3
    p = processor(storage)
    (r,) = await p.process([req("gone", Open())])
    assert r.reply == 0 and r.events == (Opened(),)
    assert await seq_nrs(storage, "gone") == [4]
    assert p.stats()["new_refused"] == 1 and p.live[(T, "gone")].seq_nr == 4


async def test_a_large_batch_with_an_existing_entity_is_written_once(storage: Storage) -> None:
    """An entity presumed new that exists fails its write alone, also in a batch large enough
    for PostgreSQL's COPY path (whose first check would otherwise miss it, collide on the
    (entity, seq_nr) key and roll the whole batch back for a full check)."""
    await open_with(storage, "old", 1)
    calls: list[bool] = []
    backend = storage.journal.backend
    append = backend.append

    async def counting(batch: Any, full_check: bool) -> Any:
        calls.append(full_check)
        return await append(batch, full_check)

    backend.append = counting  # type: ignore[method-assign]
    p = processor(storage)
    results = await p.process([req("old", Open())] + [req(f"big-{i}", Open()) for i in range(100)])
    assert answers(results)[0] == ("CommandRejected", "old is open already")
    assert all(r.reply == 0 for r in results[1:])
    assert calls == [False]  # the batch, once; the rerun of "old" wrote nothing
    assert p.stats()["new_refused"] == 1 and p.stats()["new_entities"] == 100


async def test_two_writers_presuming_one_new_entity(storage: Storage) -> None:
    """Two batches (in one processor, and in two, as two hosts) presume the same entity new:
    one write wins, the other batch's commands run again on the winner's state."""
    p = processor(storage)
    a, b = await asyncio.gather(p.process([req("race", Open())]), p.process([req("race", Open())]))
    assert sorted(answers([a[0], b[0]]), key=str) == sorted(
        [(0, (Opened(),)), ("CommandRejected", "race is open already")], key=str
    )
    p1, p2 = processor(storage), processor(storage)
    a, b = await asyncio.gather(
        p1.process([req("race2", Open()), req("race2", Deposit(1))]),
        p2.process([req("race2", Open()), req("race2", Deposit(2))]),
    )
    replies = sorted([answers(a), answers(b)], key=str)
    assert ("CommandRejected", "race2 is open already") in replies[0] + replies[1]
    assert await seq_nrs(storage, "race2") == [1, 2, 3]
    assert p1.stats()["conflicts"] == p2.stats()["conflicts"] == 0


async def test_any_refusal_of_a_presumed_write_recovers_the_entity(storage: Storage) -> None:
    """A presumed decision whose write the journal refuses for another reason than a conflict
    (here: an event it cannot encode) is no answer for an existing entity either: it is
    recovered and the command decided again (rejected); a new entity gets the refusal."""
    await open_with(storage, "labelled")
    p = processor(storage)
    existing, new = await p.process(
        [req("labelled", Label(object())), req("fresh-label", Label(object()))]
    )
    assert answers([existing]) == [("CommandRejected", "labelled is open: no labels")]
    assert new.error is not None and "Labelled" in str(new.error)
    assert p.stats()["new_refused"] == 2 and p.stats()["failed_writes"] == 1
    assert await seq_nrs(storage, "labelled") == [1]
    assert await seq_nrs(storage, "fresh-label") == []


class PickyAccount(AccountEntity):
    """An entity whose constructor refuses some ids."""

    type_name = "presumed-picky"

    def __init__(self, entity_id: str) -> None:
        if entity_id.startswith("bad"):
            raise ValueError(f"no account may be called {entity_id!r}")
        super().__init__(entity_id)


async def test_an_entity_that_cannot_be_made_fails_its_own_commands(storage: Storage) -> None:
    """A handler object that cannot be made fails its entity's commands alone, presumed new
    or not, as its recovery always did; the batch's other entities are written."""
    P = PickyAccount.type_name
    p = EntityProcessor([PickyAccount], storage.journal, storage.snapshots)
    bad, good = await p.process([req("bad-1", Open(), P), req("good-1", Open(), P)])
    assert isinstance(bad.error, ValueError) and "bad-1" in str(bad.error)
    assert good.reply == 0 and p.stats()["new_entities"] == 1


async def test_entities_this_processor_dropped_are_recovered_not_presumed(
    storage: Storage,
) -> None:
    """An entity the processor passivated is known to exist: its next command recovers it
    first (no refused write), while a restarted processor presumes it new and is refused."""
    p = processor(storage, max_entities=1)
    await p.process([req("a", Open())])
    await p.process([req("b", Open())])  # "a" passivated (beyond max_entities)
    assert (T, "a") not in p.live
    (r,) = await p.process([req("a", Deposit(2))])
    assert r.reply == 2
    assert p.stats()["new_refused"] == 0 and p.stats()["new_entities"] == 2
    p.evict(T, "b")
    (r,) = await p.process([req("b", Open())])
    assert r.error is not None and p.stats()["new_refused"] == 0
    restarted = processor(storage)
    (r,) = await restarted.process([req("a", Open())])
    assert r.error is not None and restarted.stats()["new_refused"] == 1


# --------------------------------------------------------------------------- property


COMMANDS = st.one_of(
    st.just(Open()),
    st.builds(Deposit, st.integers(0, 5)),
    st.just(Balance()),
    st.just(Nudge()),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    history=st.lists(COMMANDS, max_size=5),
    batch=st.lists(COMMANDS, min_size=1, max_size=5),
    deleted=st.booleans(),
)
async def test_presumed_or_recovered_the_answers_and_state_are_the_same(
    storage: Storage, history: list[Any], batch: list[Any], deleted: bool
) -> None:
    """Any history (possibly none, possibly deleted), then any batch to the entity while it
    is not in memory: presumed new or recovered first, the same answers, the same events, and
    the entity in memory equals the entity recovered from the journal (invariant 6)."""
    run = uuid.uuid4().hex[:8]
    seen: dict[bool, tuple[Any, ...]] = {}
    for presume in (True, False):
        entity_id = f"{run}-{presume}"
        writer = processor(storage, presume_new=False)
        for command in history:
            await writer.process([req(entity_id, command)])
        if deleted and (high := await storage.journal.highest_seq_nr(T, entity_id)):
            await storage.journal.delete_events(T, entity_id, high)
        p = processor(storage, presume_new=presume)
        results = await p.process([req(entity_id, c) for c in batch])
        outcome = [
            (type(r.error).__name__, str(r.error).replace(entity_id, "X"))
            if r.error is not None
            else (r.reply, r.events)
            for r in results
        ]
        events = [(e.seq_nr, e.event) for e in await storage.journal.events(T, entity_id)]
        live = p.live.get((T, entity_id))
        try:
            recovered = await processor(storage).activate(T, entity_id)
        except EventsMissing as e:
            # An entity whose every event was deleted, then written again, is not recovered
            # (its events do not start at 1): the same either way.
            seen[presume] = (outcome, events, str(e).replace(entity_id, "X"))
            continue
        if live is not None:
            assert (live.state, live.seq_nr) == (recovered.state, recovered.seq_nr)
        seen[presume] = (outcome, events, recovered.state, recovered.seq_nr)
    assert seen[True] == seen[False]


# --------------------------------------------------------------------------- on Ray


async def test_shard_hosts_presume_new_and_recover_existing_entities(
    ray_session: Any, journal_settings: JournalSettings
) -> None:
    """Through shard hosts on Ray: a new app (its hosts hold nothing) asks counters that an
    earlier app wrote: a command that the initial state would accept and the real one rejects,
    a read-only command, a persisting one; new counters are written without a read."""
    first = f"pn1-{uuid.uuid4().hex[:8]}"
    ents = await start(
        app=first, entities=[CounterEntity], journal_settings=journal_settings, hosts=1
    )
    try:
        ref = ents.ref_for(CounterEntity, "near-limit")
        assert await ref.ask(Add(CounterEntity.limit - 1)) == CounterEntity.limit - 1
    finally:
        await ents.close()
        await shutdown_app(first)
    second = f"pn2-{uuid.uuid4().hex[:8]}"
    ents = await start(
        app=second, entities=[CounterEntity], journal_settings=journal_settings, hosts=1
    )
    try:
        ref = ents.ref_for(CounterEntity, "near-limit")
        with pytest.raises(LimitExceeded):
            await ref.ask(Add(2))  # fine on a new counter: the journal says it is not new
        assert await ref.ask(GetValue()) == CounterEntity.limit - 1
        assert await ref.ask(Add(1)) == CounterEntity.limit
        fresh = await asyncio.gather(
            *(ents.ref_for(CounterEntity, f"fresh-{i}").ask(Add(i)) for i in range(10))
        )
        assert fresh == list(range(10))
        (host,) = await ents.host_stats()
        assert host["new_refused"] == 1 and host["new_entities"] == 10
        assert host["conflicts"] == 0 and host["activations"] == 11
    finally:
        await ents.close()
        await shutdown_app(second)
    storage = await open_storage(settings=journal_settings, entities=[CounterEntity])
    async with storage:
        events = await storage.journal.events(CounterEntity.type_name, "near-limit")
        assert [e.seq_nr for e in events] == [1, 2]
