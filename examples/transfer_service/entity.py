"""The account entity of the transfer service."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lagompy import Command, Effect, InvalidCommand, PersistentEntity


@dataclass(frozen=True)
class Account:
    balance: int = 0
    closed: bool = False


@dataclass(frozen=True)
class Deposit(Command[Account]):
    amount: int


@dataclass(frozen=True)
class Withdraw(Command[Account]):
    amount: int


@dataclass(frozen=True)
class CloseAccount(Command[Account]):
    pass


@dataclass(frozen=True)
class GetAccount(Command[Account]):
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


AccountCommand = Deposit | Withdraw | CloseAccount | GetAccount
AccountEvent = Deposited | Withdrawn | AccountClosed


class AccountEntity(PersistentEntity[AccountCommand, AccountEvent, Account]):
    type_name = "account"
    initial_state = Account()

    def on_command(self, state: Account, command: AccountCommand) -> Effect[Account]:
        match command:
            case GetAccount():
                return Effect.reply(state)
            case _ if state.closed:
                raise InvalidCommand(f"account {self.entity_id} is closed")
            case Deposit(amount=amount) | Withdraw(amount=amount) if amount <= 0:
                raise InvalidCommand(f"an amount must be positive, got {amount}")
            case Deposit(amount=amount):
                return Effect.persist(Deposited(amount)).then_reply(lambda s: s)
            case Withdraw(amount=amount) if amount > state.balance:
                raise InvalidCommand(
                    f"account {self.entity_id} holds {state.balance}, cannot withdraw {amount}"
                )
            case Withdraw(amount=amount):
                return Effect.persist(Withdrawn(amount)).then_reply(lambda s: s)
            case CloseAccount():
                return Effect.persist(AccountClosed()).then_reply(lambda s: s)
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
