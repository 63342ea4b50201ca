"""Entities for the runtime tests. A module of its own (not a test module) so that Ray's worker
processes import it by name: tests put this directory on the workers' path."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from lagompy import Command, CommandRejected, Effect, PersistentEntity


@dataclass(frozen=True)
class Counter:
    value: int = 0


@dataclass(frozen=True)
class Add(Command[int]):
    """Add ``amount``; the reply is the value after it. ``token`` lands in the event, so a test
    can check that no command was persisted twice."""

    amount: int
    token: str = ""


@dataclass(frozen=True)
class GetValue(Command[int]):
    pass


@dataclass(frozen=True)
class SlowAdd(Command[int]):
    """Add 1 after blocking the host for ``seconds`` (to make asks time out)."""

    seconds: float


@dataclass(frozen=True)
class AddThenCrash(Command[int]):
    """Add 1, then kill the host process after the commit and before the reply leaves: the
    caller cannot know whether it was applied."""

    token: str


CounterCommand = Add | GetValue | SlowAdd | AddThenCrash


@dataclass(frozen=True)
class Added:
    amount: int
    token: str


class LimitExceeded(CommandRejected):
    http_status: ClassVar[int] = 422


class CounterEntity(PersistentEntity[CounterCommand, Added, Counter]):
    type_name = "counter"
    initial_state = Counter()
    limit = 1_000_000

    def on_command(self, state: Counter, command: CounterCommand) -> Effect[Counter]:
        match command:
            case Add(amount=amount, token=token):
                if amount < 0:
                    raise LimitExceeded("negative amounts are refused", http_status=409)
                if state.value + amount > self.limit:
                    raise LimitExceeded(f"counter {self.entity_id} would exceed {self.limit}")
                return Effect.persist(Added(amount, token)).then_reply(lambda s: s.value)
            case GetValue():
                return Effect.reply(state.value)
            case SlowAdd(seconds=seconds):
                time.sleep(seconds)
                return Effect.persist(Added(1, "slow")).then_reply(lambda s: s.value)
            case AddThenCrash(token=token):
                return (
                    Effect.persist(Added(1, token))
                    .then_run(lambda s: os._exit(1))
                    .then_reply(lambda s: s.value)
                )
        return Effect.unhandled()

    def on_event(self, state: Counter, event: Added) -> Counter:
        return replace(state, value=state.value + event.amount)
