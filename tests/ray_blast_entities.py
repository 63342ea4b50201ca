"""An entity whose commands, replies and rejections may not pickle, for the tests of one bad ask
failing alone on Ray. A module of its own (not a test module) so that Ray's worker processes
import it by name."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from lagompy import Command, CommandRejected, Effect, PersistentEntity


@dataclass(frozen=True)
class Tally:
    value: int = 0


@dataclass(frozen=True)
class Sealed:
    """A reply the journal can store (its fields encode) but that refuses to pickle."""

    value: int

    def __reduce__(self) -> Any:
        raise TypeError("Sealed values do not pickle")


@dataclass(frozen=True)
class Bump(Command[int]):
    """Add ``amount``; the reply is the tally after it."""

    amount: int = 1


@dataclass(frozen=True)
class Guarded(Command[int]):
    """Carries a lock: the command itself does not pickle, so it cannot reach a shard host."""

    lock: Any


@dataclass(frozen=True)
class Peek(Command[Any]):
    """Read-only; its reply holds a lock (it does not pickle)."""


@dataclass(frozen=True)
class Refuse(Command[int]):
    """Always rejected, with a rejection that carries a lock (it does not pickle)."""


@dataclass(frozen=True)
class Seal(Command[Sealed]):
    """Persists a bump, then replies with a ``Sealed`` tally: committed, but the reply cannot
    travel back."""


@dataclass(frozen=True)
class Value(Command[int]):
    pass


BlastCommand = Bump | Guarded | Peek | Refuse | Seal | Value


@dataclass(frozen=True)
class Bumped:
    amount: int


class Locked(CommandRejected):
    """A rejection with an attribute that does not pickle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BlastEntity(PersistentEntity[BlastCommand, Bumped, Tally]):
    type_name = "blast"
    initial_state = Tally()

    def on_command(self, state: Tally, command: BlastCommand) -> Effect[Tally]:
        match command:
            case Bump(amount=amount):
                return Effect.persist(Bumped(amount)).then_reply(lambda s: s.value)
            case Guarded():
                return Effect.reply(state.value)
            case Peek():
                return Effect.reply({"value": state.value, "lock": threading.Lock()})
            case Refuse():
                raise Locked(f"tally {self.entity_id} refuses, holding a lock")
            case Seal():
                return Effect.persist(Bumped(1)).then_reply(lambda s: Sealed(s.value))
            case Value():
                return Effect.reply(state.value)
        return Effect.unhandled()

    def on_event(self, state: Tally, event: Bumped) -> Tally:
        return Tally(state.value + event.amount)
