"""The pure entity API: commands, effects, tags, entity validation, decide/apply."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

import pytest

from examples.user_service.entity import (
    ChangeName,
    GetUser,
    NameChanged,
    NoUser,
    RegisterUser,
    User,
    UserEntity,
    UserRegistered,
)
from lagompy import (
    Command,
    CommandRejected,
    ConfigurationError,
    Effect,
    InvalidCommand,
    NotFound,
    PersistentEntity,
    UnhandledCommand,
    sharded_tag,
    stable_hash,
    tag,
)
from lagompy.entity import reply_type_of
from lagompy.errors import CommandHandlerFailed, EventHandlerFailed, UnhandledEvent
from lagompy.runtime._processing import apply_event, decide
from lagompy.testkit import EntityTestDriver


def test_stable_hash_is_crc32_of_utf8_and_never_changes() -> None:
    # Literal values: a change of hash function would move every entity to another shard.
    assert stable_hash("42") == 841265288
    assert stable_hash("user-1") == 2116437524
    assert stable_hash("") == 0


def test_stable_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from lagompy import sharded_tag; print(sharded_tag('t', 16).for_entity('user-1'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert outputs == {sharded_tag("t", 16).for_entity("user-1")}


def test_sharded_tag_names_and_shards() -> None:
    t = sharded_tag("user-events", shards=4)
    assert t.all_tags == ("user-events0", "user-events1", "user-events2", "user-events3")
    assert t.for_entity("42") == f"user-events{841265288 % 4}"
    assert tag("all").for_entity("x") == "all"
    for shards in (0, -1, 1025, 10**9, "4", True, 2.0):
        with pytest.raises(ConfigurationError, match=f"shards from 1 to 1024.*got {shards!r}"):
            sharded_tag("x", shards)  # type: ignore[arg-type]
    assert len(sharded_tag("x", 1024).all_tags) == 1024
    with pytest.raises(ConfigurationError, match="non-empty"):
        tag("")
    # The journal's tag columns hold 255 characters: a longer tag is refused where it is
    # declared, not when the first event is written.
    assert tag("t" * 255).name == "t" * 255 and sharded_tag("s" * 253, 100).shards == 100
    with pytest.raises(ConfigurationError, match="256 characters where the journal stores"):
        tag("t" * 256)
    with pytest.raises(ConfigurationError, match="256 characters where the journal stores"):
        sharded_tag("s" * 253, 101)  # its last shard, s...s100, is 256 characters


def test_command_carries_its_reply_type() -> None:
    assert reply_type_of(RegisterUser) is User
    assert reply_type_of(GetUser) is User

    @dataclass(frozen=True)
    class Ping(Command[int]):
        pass

    @dataclass(frozen=True)
    class SubPing(Ping):
        pass

    assert reply_type_of(Ping) is int
    assert reply_type_of(SubPing) is int


def test_decide_persists_and_replies_with_new_state() -> None:
    entity = UserEntity("7")
    d = decide(entity, NoUser(), RegisterUser("Ada", "ada@example.org"))
    assert d.error is None
    assert d.events == (UserRegistered("7", "Ada", "ada@example.org"),)
    assert d.reply == User("7", "Ada", "ada@example.org")
    assert d.state_after == d.reply


def test_decide_rejections_reach_the_caller_with_type_message_and_status() -> None:
    entity = UserEntity("7")
    d = decide(entity, NoUser(), ChangeName("x"))
    assert isinstance(d.error, NotFound) and d.error.http_status == 404
    assert "user 7 is not registered" in str(d.error)
    d = decide(entity, User("7", "a", "a@b.c"), RegisterUser("a", "a@b.c"))
    assert isinstance(d.error, InvalidCommand) and d.error.http_status == 409  # a conflict
    assert d.events == ()
    d = decide(entity, NoUser(), RegisterUser("Ada", "not-an-email"))
    assert isinstance(d.error, InvalidCommand)
    assert "not-an-email" in str(d.error)


class Insufficient(CommandRejected):
    http_status = 409


@dataclass(frozen=True)
class Counter:
    n: int = 0


@dataclass(frozen=True)
class Add(Command[int]):
    amount: int


@dataclass(frozen=True)
class Boom(Command[None]):
    pass


@dataclass(frozen=True)
class Ignored(Command[None]):
    pass


@dataclass(frozen=True)
class Added:
    amount: int


@dataclass(frozen=True)
class Weird:
    pass


CounterCommand = Add | Boom | Ignored


class CounterEntity(PersistentEntity[CounterCommand, Added | Weird, Counter]):
    type_name = "counter"
    initial_state = Counter()

    def on_command(self, state: Counter, command: CounterCommand) -> Effect[Counter]:
        match command:
            case Add(amount=a) if a < 0 and state.n + a < 0:
                raise Insufficient(f"cannot take {-a} from {state.n}")
            case Add(amount=0):
                return Effect.persist(Weird())
            case Add(amount=a):
                return Effect.persist(Added(a), Added(a)).then_reply(lambda s: s.n)
            case Boom():
                raise KeyError("bug")
        return Effect.unhandled()

    def on_event(self, state: Counter, event: Added | Weird) -> Counter:
        match event:
            case Added(amount=a):
                return Counter(state.n + a)
        return self.unhandled_event(state, event)


def test_persist_several_events_atomically_and_user_rejection_status() -> None:
    entity = CounterEntity("c")
    d = decide(entity, Counter(), Add(2))
    assert d.events == (Added(2), Added(2)) and d.reply == 4
    d = decide(entity, Counter(1), Add(-5))
    assert isinstance(d.error, Insufficient) and d.error.http_status == 409


def test_other_exceptions_are_bugs_distinct_from_rejections() -> None:
    d = decide(CounterEntity("c"), Counter(), Boom())
    assert isinstance(d.error, CommandHandlerFailed)
    assert not isinstance(d.error, CommandRejected)
    assert "KeyError" in str(d.error) and isinstance(d.error.__cause__, KeyError)
    assert d.events == ()


def test_unhandled_command_and_unhandled_event() -> None:
    d = decide(CounterEntity("c"), Counter(), Ignored())
    assert isinstance(d.error, UnhandledCommand)
    assert "Ignored" in str(d.error) and "Counter" in str(d.error)
    d = decide(CounterEntity("c"), Counter(), Add(0))
    assert isinstance(d.error, UnhandledEvent)
    assert "Weird" in str(d.error) and "Counter" in str(d.error)
    with pytest.raises(UnhandledEvent, match=r"NameChanged.*NoUser"):
        apply_event(UserEntity("1"), NoUser(), NameChanged("1", "x"))


def test_event_handler_exception_is_event_handler_failed() -> None:
    class Broken(CounterEntity):
        def on_event(self, state: Counter, event: Added | Weird) -> Counter:
            raise ValueError("nope")

    with pytest.raises(EventHandlerFailed, match="ValueError: nope"):
        apply_event(Broken("b"), Counter(), Added(1))


def test_effect_constructors() -> None:
    assert Effect.reply(3).reply_value == 3 and Effect.reply(3).events == ()
    assert Effect.persist_all([]).events == ()
    with pytest.raises(TypeError):
        Effect.reject(ValueError("x"))  # type: ignore[arg-type]
    e = Effect.persist(Added(1)).then_reply(5).then_run(print)
    assert e.reply_value == 5 and e.side_effects == (print,)


@dataclass(frozen=True)
class AddAll(Command[int]):
    amounts: tuple[int, ...]
    spread: bool = False  # Effect.persist(*events) rather than Effect.persist_all(events)


class ListCounterEntity(PersistentEntity[AddAll, Added, Counter]):
    type_name = "list-counter"
    initial_state = Counter()

    def on_command(self, state: Counter, command: AddAll) -> Effect[Counter]:
        events = [Added(a) for a in command.amounts]
        effect = Effect.persist(*events) if command.spread else Effect.persist_all(events)
        return effect.then_reply(lambda s: s.n)

    def on_event(self, state: Counter, event: Added) -> Counter:
        return Counter(state.n + event.amount)


def test_persist_with_no_events_is_persist_all_of_none_a_read_only_command() -> None:
    # One rule for both: no events persist nothing and reply as a read-only command would. A
    # handler that computes its events (ChangeDetails in the example) needs no special case.
    assert Effect.persist() == Effect.persist_all([]) == Effect.persist_all(iter(()))
    assert Effect.persist().events == () and Effect.persist().then_reply(7).reply_value == 7
    entity = ListCounterEntity("c")
    for spread in (False, True):
        d = decide(entity, Counter(3), AddAll((), spread))
        assert d.error is None
        assert (d.events, d.state_after, d.reply) == ((), Counter(3), 3)
        d = decide(entity, Counter(3), AddAll((1, 2), spread))
        assert (d.events, d.reply) == ((Added(1), Added(2)), 6)


async def test_a_command_that_persists_no_events_writes_nothing() -> None:
    async with EntityTestDriver(ListCounterEntity, "c") as driver:
        outcome = await driver.run(
            AddAll((1, 2)), AddAll((), spread=True), AddAll(()), AddAll((4,), spread=True)
        )
        assert outcome.replies == [3, 3, 3, 7]
        assert outcome.events == [Added(1), Added(2), Added(4)]
        assert outcome.issues == []
        assert await driver.seq_nr() == 3


def test_rejections_survive_pickling_with_their_status() -> None:
    err = InvalidCommand("bad", http_status=422)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is InvalidCommand and back.message == "bad" and back.http_status == 422
    back2 = pickle.loads(pickle.dumps(Insufficient("x")))
    assert back2.http_status == 409 and str(back2) == "x"


def test_entity_validation_names_what_is_wrong() -> None:
    class NoTypeName(PersistentEntity[Add, Added, Counter]):
        initial_state = Counter()

        def on_command(self, state: Counter, command: Add) -> Effect[Counter]:
            return Effect.none()

        def on_event(self, state: Counter, event: Added) -> Counter:
            return state

    with pytest.raises(ConfigurationError, match="NoTypeName needs a non-empty `type_name`"):
        NoTypeName.validate()

    class WrongState(NoTypeName):
        type_name = "w"
        initial_state = Added(1)  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="initial_state is a Added"):
        WrongState.validate()

    class NotGeneric(PersistentEntity):  # type: ignore[type-arg]
        type_name = "g"
        initial_state = Counter()

        def on_command(self, state, command):  # type: ignore[no-untyped-def]
            return Effect.none()

        def on_event(self, state, event):  # type: ignore[no-untyped-def]
            return state

    with pytest.raises(ConfigurationError, match=r"PersistentEntity\[Command, Event, State\]"):
        NotGeneric.validate()
    UserEntity.validate()
