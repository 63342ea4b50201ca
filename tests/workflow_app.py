"""Entities and workflows of the workflow tests (a module, so Ray's workers import them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lagompy import Command, Effect, InvalidCommand, PersistentEntity
from lagompy.errors import StepFailed
from lagompy.serialization import serializable
from lagompy.workflow import WorkflowContext, Workflows


@dataclass(frozen=True)
class Account:
    balance: int = 0
    closed: bool = False


@dataclass(frozen=True)
class Deposit(Command[int]):
    amount: int


@dataclass(frozen=True)
class Withdraw(Command[int]):
    amount: int


@dataclass(frozen=True)
class CloseAccount(Command[None]):
    pass


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    amount: int


@dataclass(frozen=True)
class AccountClosed:
    pass


AccountCommand = Deposit | Withdraw | CloseAccount
AccountEvent = Deposited | Withdrawn | AccountClosed


class AccountEntity(PersistentEntity[AccountCommand, AccountEvent, Account]):
    type_name = "wf-account"
    initial_state = Account()

    def on_command(self, state: Account, command: AccountCommand) -> Effect[Account]:
        match command:
            case Deposit(amount=amount):
                if state.closed:
                    raise InvalidCommand(f"account {self.entity_id} is closed")
                return Effect.persist(Deposited(amount)).then_reply(lambda s: s.balance)
            case Withdraw(amount=amount):
                if state.closed:
                    raise InvalidCommand(f"account {self.entity_id} is closed")
                if amount > state.balance:
                    raise InvalidCommand(f"account {self.entity_id}: insufficient funds")
                return Effect.persist(Withdrawn(amount)).then_reply(lambda s: s.balance)
            case CloseAccount():
                return Effect.persist(AccountClosed())
        return Effect.unhandled()

    def on_event(self, state: Account, event: AccountEvent) -> Account:
        match event:
            case Deposited(amount=amount):
                return replace(state, balance=state.balance + amount)
            case Withdrawn(amount=amount):
                return replace(state, balance=state.balance - amount)
            case AccountClosed():
                return replace(state, closed=True)
        self.unhandled_event(state, event)


@serializable(name="wf-test.Transfer")
@dataclass(frozen=True)
class Transfer:
    source: str
    target: str
    amount: int


workflows = Workflows()


@workflows.workflow("transfer", version=1)
async def transfer(ctx: WorkflowContext, t: Transfer) -> str:
    ctx.compensate_ask(AccountEntity, t.source, Deposit(t.amount))
    await ctx.ask(AccountEntity, t.source, Withdraw(t.amount))
    try:
        await ctx.ask(AccountEntity, t.target, Deposit(t.amount))
    except StepFailed as e:
        raise StepFailed(
            f"deposit rejected: {e.error}", step=e.step, error_type=e.error_type, error=e.error
        ) from e
    return "done"


@workflows.workflow("sleeper", version=1)
async def sleeper(ctx: WorkflowContext, seconds: float) -> int:
    await ctx.sleep(seconds)
    return 1


@workflows.workflow("approval", version=1)
async def approval(ctx: WorkflowContext, who: str) -> str:
    try:
        answer = await ctx.receive("decision", timeout=30)
    except TimeoutError:
        return "timed out"
    return f"{who}: {answer}"


@workflows.workflow("parent", version=1)
async def parent(ctx: WorkflowContext, n: int) -> int:
    a = await ctx.child("double", n)
    b = await ctx.child("double", a)
    return int(b)


@workflows.workflow("double", version=1)
async def double(ctx: WorkflowContext, n: int) -> int:
    return int(await ctx.step(_double, n))


def _double(n: int) -> int:
    return n * 2


@workflows.workflow("gated-transfer", version=1)
async def gated_transfer(ctx: WorkflowContext, t: Transfer) -> str:
    """A transfer that waits for a "go" signal at each step boundary (the kill tests)."""
    ctx.compensate_ask(AccountEntity, t.source, Deposit(t.amount))
    await ctx.ask(AccountEntity, t.source, Withdraw(t.amount))
    await ctx.receive("go")
    await ctx.ask(AccountEntity, t.target, Deposit(t.amount))
    await ctx.receive("go")
    return "done"
