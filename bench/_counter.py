"""The entity the runtime benchmark drives. A module of its own so that Ray workers import it by
name (a class defined in the benchmark script would live in ``__main__``)."""

from __future__ import annotations

from dataclasses import dataclass

from lagompy import Command, Effect, PersistentEntity


@dataclass(frozen=True)
class Count:
    value: int = 0


@dataclass(frozen=True)
class Increment(Command[int]):
    pass


@dataclass(frozen=True)
class Read(Command[int]):
    pass


@dataclass(frozen=True)
class Incremented:
    by: int


class CounterEntity(PersistentEntity[Increment | Read, Incremented, Count]):
    type_name = "bench-counter"
    initial_state = Count()

    def on_command(self, state: Count, command: Increment | Read) -> Effect[Count]:
        match command:
            case Increment():
                return Effect.persist(Incremented(1)).then_reply(lambda s: s.value)
            case Read():
                return Effect.reply(state.value)
        return Effect.unhandled()

    def on_event(self, state: Count, event: Incremented) -> Count:
        return Count(state.value + event.by)


class UnsnapshottedCounterEntity(CounterEntity):
    """The same counter without snapshots (recovery replays every event)."""

    type_name = "bench-counter-nosnap"
    snapshot_every = None


class NoopActor:
    """A Ray actor that does nothing: the cost of one actor call."""

    def ping(self, value: object = None) -> object:
        return value
