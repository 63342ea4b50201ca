"""EntityTestDriver and the in-process runtime, on both journal backends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from examples.user_service.entity import (
    ChangeName,
    DeactivateUser,
    EmailChanged,
    GetUser,
    NameChanged,
    NoUser,
    RegisterUser,
    User,
    UserDeactivated,
    UserEntity,
    UserRegistered,
)
from lagompy import (
    Command,
    Effect,
    InvalidCommand,
    JournalSettings,
    NotFound,
    PersistentEntity,
    start_in_process,
)
from lagompy.errors import CommandHandlerFailed, ConcurrencyConflict, UnhandledCommand
from lagompy.journal import AtomicWrite, WriteResult
from lagompy.runtime._processing import Request
from lagompy.testkit import EntityTestDriver


async def test_driver_runs_commands_and_reports_events_state_replies(
    journal_settings: JournalSettings,
) -> None:
    async with EntityTestDriver(UserEntity, "42", settings=journal_settings) as driver:
        outcome = await driver.run(RegisterUser("Ada", "ada@example.org"), ChangeName("Ada K"))
        assert outcome.events == [
            UserRegistered("42", "Ada", "ada@example.org"),
            NameChanged("42", "Ada K"),
        ]
        assert outcome.state == User("42", "Ada K", "ada@example.org")
        assert outcome.replies == [User("42", "Ada", "ada@example.org"), outcome.state]
        assert outcome.issues == []

        outcome = await driver.run(RegisterUser("Bob", "bob@example.org"))
        (rejection,) = outcome.replies
        assert isinstance(rejection, InvalidCommand)
        assert outcome.events == [] and outcome.state == User("42", "Ada K", "ada@example.org")

        assert await driver.restart() == outcome.state
        assert await driver.seq_nr() == 2
        assert driver.all_issues == []


async def test_driver_defaults_to_a_temporary_sqlite_journal() -> None:
    async with EntityTestDriver(UserEntity, "t") as driver:
        outcome = await driver.run(ChangeName("x"))
        assert isinstance(outcome.replies[0], NotFound)
        assert outcome.state == NoUser()


# An entity with mistakes the driver should report.


@dataclass(frozen=True)
class Bag:
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Put(Command[int]):
    item: str


@dataclass(frozen=True)
class Shake(Command[None]):
    pass


@dataclass(frozen=True)
class Crash(Command[None]):
    pass


@dataclass(frozen=True)
class Put_(Command[None]):
    """Persists an event the event handler does not handle."""


@dataclass(frozen=True)
class Lossy:
    """Its field is declared as a tuple but the handler stores a list: it cannot be encoded."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Hidden:
    """A field with init=False is not serialized: a value set behind its back is lost."""

    note: str = field(default="", init=False)


@dataclass(frozen=True)
class Hide(Command[None]):
    pass


@dataclass(frozen=True)
class Stray:
    pass


@dataclass(frozen=True)
class Dropped(Command[None]):
    pass


@dataclass(frozen=True)
class Put2:
    item: str


BagCommand = Put | Shake | Crash | Put_ | Dropped | Hide
BagEvent = Put2 | Stray | Lossy | Hidden


class BagEntity(PersistentEntity[BagCommand, BagEvent, Bag]):
    type_name = "bag"
    initial_state = Bag()
    snapshot_every = 3

    def on_command(self, state: Bag, command: BagCommand) -> Effect[Bag]:
        match command:
            case Put(item=item):
                return Effect.persist(Put2(item)).then_reply(lambda s: len(s.items))
            case Crash():
                return {}["missing"]  # type: ignore[index]
            case Put_():
                return Effect.persist(Stray())
            case Dropped():
                return Effect.persist(Lossy(["a", "b"]))  # type: ignore[arg-type]
            case Hide():
                hidden = Hidden()
                object.__setattr__(hidden, "note", "set after init")
                return Effect.persist(hidden)
        return Effect.unhandled()

    def on_event(self, state: Bag, event: BagEvent) -> Bag:
        match event:
            case Put2(item=item):
                return Bag((*state.items, item))
            case Lossy() | Hidden():
                return state
        return self.unhandled_event(state, event)


async def test_driver_reports_issues(journal_settings: JournalSettings) -> None:
    async with EntityTestDriver(BagEntity, "b", settings=journal_settings) as driver:
        outcome = await driver.run(Shake())
        assert [i.kind for i in outcome.issues] == ["unhandled-command"]
        assert isinstance(outcome.replies[0], UnhandledCommand)

        outcome = await driver.run(Put_())
        assert [i.kind for i in outcome.issues] == ["unhandled-event"]
        assert "Stray" in outcome.issues[0].message and "Bag" in outcome.issues[0].message
        assert outcome.events == [] and await driver.seq_nr() == 0  # nothing persisted

        outcome = await driver.run(Crash())
        assert isinstance(outcome.replies[0], CommandHandlerFailed)
        assert outcome.events == []

        outcome = await driver.run(Dropped())
        assert [i.kind for i in outcome.issues] == ["serialization"]
        assert "Lossy.items" in outcome.issues[0].message
        assert await driver.seq_nr() == 0

        outcome = await driver.run(Hide())
        assert [i.kind for i in outcome.issues] == ["serialization"]
        assert "came back as" in outcome.issues[0].message


async def test_restart_uses_the_snapshot_and_recovers_the_same_state(
    journal_settings: JournalSettings,
) -> None:
    async with EntityTestDriver(BagEntity, "s", settings=journal_settings) as driver:
        await driver.run(*(Put(str(i)) for i in range(7)))
        live = await driver.state()
        assert await driver.restart() == live
        assert await driver.recovered_from_snapshot()
        snap = await driver.storage.snapshots.load("bag", "s")
        assert snap is not None and snap.seq_nr == 6
        # Events after the snapshot are replayed on top of it.
        assert live == Bag(tuple(str(i) for i in range(7)))


async def test_an_unreadable_snapshot_falls_back_to_a_full_replay(
    journal_settings: JournalSettings, caplog: pytest.LogCaptureFixture
) -> None:
    async with EntityTestDriver(BagEntity, "u", settings=journal_settings) as driver:
        await driver.run(*(Put(str(i)) for i in range(4)))
        live = await driver.state()
        from sqlalchemy import update

        from lagompy.sql import _schema as schema

        async with driver.storage.database.write() as conn:
            await conn.execute(update(schema.snapshots).values(state_type="NoSuchType"))
        assert await driver.restart() == live
        assert not await driver.recovered_from_snapshot()
        assert "replaying all events instead" in caplog.text


# --------------------------------------------------------------------------- in-process runtime


async def test_in_process_asks_in_one_tick_are_group_committed(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[UserEntity], settings=journal_settings) as ents:
        appends = 0
        original = ents.storage.journal.append

        async def counting_append(writes: Sequence[AtomicWrite]) -> list[WriteResult]:
            nonlocal appends
            appends += 1
            return await original(writes)

        ents.storage.journal.append = counting_append  # type: ignore[method-assign]
        replies = await asyncio.gather(
            *(
                ents.ref_for(UserEntity, f"u{i}").ask(RegisterUser(f"N{i}", f"{i}@example.org"))
                for i in range(50)
            )
        )
        assert [r.name for r in replies] == [f"N{i}" for i in range(50)]
        assert appends == 1
        # Commands for one entity run in arrival order, the second seeing the first's events.
        a = ents.ref_for(UserEntity, "u0")
        r1, r2, r3 = await asyncio.gather(
            a.ask(ChangeName("one")), a.ask(ChangeName("two")), a.ask(GetUser())
        )
        assert (r1.name, r2.name, r3.name) == ("one", "two", "two")
        events = await ents.storage.journal.events("user", "u0")
        assert [type(e.event) for e in events] == [UserRegistered, NameChanged, NameChanged]
        with pytest.raises(InvalidCommand, match="already registered"):
            await a.ask(RegisterUser("x", "x@example.org"))


async def test_in_process_conflict_reloads_the_entity_and_runs_the_command_again(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(entities=[UserEntity], settings=journal_settings) as ents:
        ref = ents.ref_for(UserEntity, "c")
        await ref.ask(RegisterUser("A", "a@example.org"))
        # Another writer (a zombie host, say) appends behind our back.
        await ents.storage.journal.append_one(
            AtomicWrite("user", "c", 1, [EmailChanged("c", "z@example.org")])
        )
        # Our write of NameChanged is refused (seq 2 is taken); the entity reloads, sees the
        # other writer's event, and the command runs again on that state.
        state = await ref.ask(ChangeName("B"))
        assert state == User("c", "B", "z@example.org")
        stats = ents.processor.stats()
        assert (stats["conflicts"], stats["conflict_retries"]) == (1, 1)
        # The other writer applies a command with an id while our copy decides the same
        # command (a resend): after the conflict the id is found in the journal, and the
        # stored reply is the answer; the command is not applied a second time.
        stored = User("c", "C", "z@example.org")
        encoded = ents.storage.journal.serializer.encode_value(stored, User)
        await ents.storage.journal.append_one(
            AtomicWrite("user", "c", 3, [NameChanged("c", "C")], replies=[("cmd-9", 4, encoded)])
        )
        (result,) = await ents.processor.process(
            [Request("user", "c", ChangeName("D"), command_id="cmd-9")]
        )
        assert (result.reply, result.error) == (stored, None)
        events = await ents.storage.journal.events("user", "c")
        assert [type(e.event) for e in events] == [
            UserRegistered,
            EmailChanged,
            NameChanged,
            NameChanged,
        ]
        assert await ref.ask(DeactivateUser()) == User("c", "C", "z@example.org", active=False)
        assert isinstance(UserDeactivated("c"), UserDeactivated)


async def test_a_conflict_is_the_answer_when_retries_are_off(
    journal_settings: JournalSettings,
) -> None:
    async with await start_in_process(
        entities=[UserEntity], settings=journal_settings, conflict_retries=0
    ) as ents:
        ref = ents.ref_for(UserEntity, "c")
        await ref.ask(RegisterUser("A", "a@example.org"))
        await ents.storage.journal.append_one(
            AtomicWrite("user", "c", 1, [EmailChanged("c", "z@example.org")])
        )
        with pytest.raises(ConcurrencyConflict):
            await ref.ask(ChangeName("B"))
        # The entity reloaded: it now sees the other writer's event and accepts commands.
        assert await ref.ask(ChangeName("B")) == User("c", "B", "z@example.org")


async def test_then_run_runs_after_the_events_are_durable(tmp_path: object) -> None:
    seen: list[tuple[int, int]] = []

    @dataclass(frozen=True)
    class Note(Command[None]):
        text: str

    @dataclass(frozen=True)
    class Noted:
        text: str

    @dataclass(frozen=True)
    class Notes:
        count: int = 0

    holder: dict[str, object] = {}

    class NoteEntity(PersistentEntity[Note, Noted, Notes]):
        type_name = "note"
        initial_state = Notes()

        def on_command(self, state: Notes, command: Note) -> Effect[Notes]:
            async def record(s: Notes) -> None:
                journal = holder["journal"]
                durable = await journal.highest_seq_nr("note", self.entity_id)  # type: ignore[attr-defined]
                seen.append((s.count, durable))

            return Effect.persist(Noted(command.text)).then_run(record)

        def on_event(self, state: Notes, event: Noted) -> Notes:
            return Notes(state.count + 1)

    async with await start_in_process(
        entities=[NoteEntity], journal_url=f"sqlite:///{tmp_path}/n.db"
    ) as ents:
        holder["journal"] = ents.storage.journal
        await ents.ref_for(NoteEntity, "n").ask(Note("a"))
        await ents.ref_for(NoteEntity, "n").ask(Note("b"))
    assert seen == [(1, 1), (2, 2)]


async def test_asking_with_a_foreign_command_is_rejected(tmp_path: object) -> None:
    async with await start_in_process(
        entities=[UserEntity], journal_url=f"sqlite:///{tmp_path}/f.db"
    ) as ents:
        with pytest.raises(UnhandledCommand, match="does not accept Put"):
            await ents.ref_for(UserEntity, "x").ask(Put("a"))
