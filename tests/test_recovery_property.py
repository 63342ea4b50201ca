"""Recovered state equals live state (invariant 6), for random command sequences, with and
without snapshots, and with a second writer appending behind the entity's back (invariant 2).

A Hypothesis state machine drives a ``Wallet`` entity (several event types, rejections,
read-only commands, commands that persist several events at once) on a SQLite file, through two
hosts sharing the journal: an :class:`~lagompy.testkit.EntityTestDriver` (the entity's regular
host) and a second :class:`~lagompy.runtime._processing.EntityProcessor` (a zombie host that still
thinks it owns the entity). The model is the list of events the journal must hold; every state
a host holds is checked against the fold of that list, and so is every recovery.

Async code runs on a private event loop per example (``asyncio.Runner``): Hypothesis' state
machines are synchronous.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from lagompy import (
    Command,
    CommandRejected,
    ConcurrencyConflict,
    Effect,
    InvalidCommand,
    NotFound,
    PersistentEntity,
    sharded_tag,
)
from lagompy.runtime._processing import EntityProcessor, LiveEntity, Request, recover
from lagompy.testkit import EntityTestDriver

T = TypeVar("T")

# --------------------------------------------------------------------------- the entity


@dataclass(frozen=True)
class Unopened:
    """No wallet under this id yet."""


@dataclass(frozen=True)
class Wallet:
    owner: str
    balance: int = 0
    frozen: bool = False
    #: the last few amounts moved, newest last: makes the state depend on the order of events
    recent: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClosedWallet:
    owner: str
    paid_out: int


WalletState = Unopened | Wallet | ClosedWallet


@dataclass(frozen=True)
class Open(Command[Wallet]):
    owner: str


@dataclass(frozen=True)
class Deposit(Command[int]):
    amount: int


@dataclass(frozen=True)
class DepositAll(Command[int]):
    """Several deposits, persisted atomically as one event each (none if the tuple is empty)."""

    amounts: tuple[int, ...]


@dataclass(frozen=True)
class Withdraw(Command[int]):
    amount: int


@dataclass(frozen=True)
class Freeze(Command[None]):
    pass


@dataclass(frozen=True)
class Unfreeze(Command[None]):
    pass


@dataclass(frozen=True)
class Close(Command[int]):
    """Pays out the balance and closes the wallet: two events at once when the balance is > 0."""


@dataclass(frozen=True)
class GetBalance(Command[int]):
    pass


@dataclass(frozen=True)
class Statement(Command[tuple[int, ...]]):
    pass


WalletCommand = (
    Open | Deposit | DepositAll | Withdraw | Freeze | Unfreeze | Close | GetBalance | Statement
)


@dataclass(frozen=True)
class Opened:
    owner: str


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    amount: int


@dataclass(frozen=True)
class FrozenWallet:
    pass


@dataclass(frozen=True)
class Unfrozen:
    pass


@dataclass(frozen=True)
class WalletClosed:
    paid_out: int


WalletEvent = Opened | Deposited | Withdrawn | FrozenWallet | Unfrozen | WalletClosed

RECENT = 4


class WalletEntity(PersistentEntity[WalletCommand, WalletEvent, WalletState]):
    """Snapshots off."""

    type_name = "wallet"
    initial_state = Unopened()
    tag = sharded_tag("wallets", shards=2)
    snapshot_every: ClassVar[int | None] = None

    def on_command(self, state: WalletState, command: WalletCommand) -> Effect[WalletState]:
        match state, command:
            case Unopened(), Open(owner=owner):
                if not owner:
                    raise InvalidCommand("a wallet needs an owner")
                return Effect.persist(Opened(owner)).then_reply(lambda s: s)
            case Unopened(), _:
                raise NotFound(f"wallet {self.entity_id} is not open")
            case ClosedWallet(), Open(owner=owner):  # reopening starts afresh
                if not owner:
                    raise InvalidCommand("a wallet needs an owner")
                return Effect.persist(Opened(owner)).then_reply(lambda s: s)
            case Wallet(), Open():
                raise InvalidCommand(f"wallet {self.entity_id} is already open")
            case Wallet(balance=balance), GetBalance():
                return Effect.reply(balance)
            case ClosedWallet(), GetBalance():
                return Effect.reply(0)
            case Wallet(recent=recent), Statement():
                return Effect.reply(recent)
            case ClosedWallet(), _:
                raise InvalidCommand(f"wallet {self.entity_id} is closed")
            case Wallet(frozen=True), Unfreeze():
                return Effect.persist(Unfrozen())
            case Wallet(), Unfreeze():
                return Effect.none()  # not frozen: nothing to do
            case Wallet(frozen=True), Freeze():
                return Effect.none()
            case Wallet(frozen=True), _:
                raise InvalidCommand(f"wallet {self.entity_id} is frozen")
            case Wallet(), Freeze():
                return Effect.persist(FrozenWallet())
            case Wallet(), Deposit(amount=amount):
                _check_amount(amount)
                return Effect.persist(Deposited(amount)).then_reply(_balance)
            case Wallet(), DepositAll(amounts=amounts):
                for amount in amounts:
                    _check_amount(amount)
                return Effect.persist_all(Deposited(a) for a in amounts).then_reply(_balance)
            case Wallet(balance=balance), Withdraw(amount=amount):
                _check_amount(amount)
                if amount > balance:
                    raise InvalidCommand(f"cannot withdraw {amount}: the balance is {balance}")
                return Effect.persist(Withdrawn(amount)).then_reply(_balance)
            case Wallet(balance=balance), Close():
                if balance:
                    return Effect.persist(Withdrawn(balance), WalletClosed(balance)).then_reply(
                        balance
                    )
                return Effect.persist(WalletClosed(0)).then_reply(0)
        return Effect.unhandled()

    def on_event(self, state: WalletState, event: WalletEvent) -> WalletState:
        match state, event:
            case Unopened() | ClosedWallet(), Opened(owner=owner):
                return Wallet(owner)
            case Wallet(), Deposited(amount=amount):
                return replace(
                    state, balance=state.balance + amount, recent=_push(state.recent, amount)
                )
            case Wallet(), Withdrawn(amount=amount):
                return replace(
                    state, balance=state.balance - amount, recent=_push(state.recent, -amount)
                )
            case Wallet(), FrozenWallet():
                return replace(state, frozen=True)
            case Wallet(), Unfrozen():
                return replace(state, frozen=False)
            case Wallet(), WalletClosed(paid_out=paid_out):
                return ClosedWallet(state.owner, paid_out)
        return self.unhandled_event(state, event)


class SnapshottedWalletEntity(WalletEntity):
    """The same entity, with a snapshot every 3 events."""

    snapshot_every = 3


def _check_amount(amount: int) -> None:
    if amount <= 0:
        raise InvalidCommand(f"amounts are positive, not {amount}")


def _balance(state: WalletState) -> int:
    return state.balance if isinstance(state, Wallet) else 0


def _push(recent: tuple[int, ...], amount: int) -> tuple[int, ...]:
    return (*recent, amount)[-RECENT:]


commands = st.one_of(
    st.builds(Open, st.sampled_from(["ann", "bob", ""])),
    st.builds(Deposit, st.integers(-2, 30)),
    st.builds(DepositAll, st.lists(st.integers(-1, 20), max_size=4).map(tuple)),
    st.builds(Withdraw, st.integers(-1, 40)),
    st.just(Freeze()),
    st.just(Unfreeze()),
    st.just(Close()),
    st.just(GetBalance()),
    st.just(Statement()),
)
#: Commands that usually persist something once the wallet is open.
money = st.one_of(
    st.builds(Deposit, st.integers(1, 30)),
    st.builds(Withdraw, st.integers(1, 20)),
    st.builds(DepositAll, st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)),
)

ENTITY_ID = "w"


def fold(entity_cls: type[WalletEntity], events: Sequence[Any]) -> WalletState:
    """The state these events lead to, from the initial state."""
    entity = entity_cls(ENTITY_ID)
    state: WalletState = entity_cls.initial_state
    for evt in events:
        state = entity.on_event(state, evt)
    return state


# --------------------------------------------------------------------------- the state machine


class TwoHostsMachine(RuleBasedStateMachine):
    """The entity's regular host (the driver) and a zombie host, sharing one journal."""

    entity_cls: ClassVar[type[WalletEntity]] = WalletEntity

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.Runner()
        self.driver = EntityTestDriver(self.entity_cls, ENTITY_ID, sqlite_synchronous="OFF")
        self.run(self.driver.start())
        storage = self.driver.storage
        # The zombie answers a refused write with the conflict; the driver's host (default
        # settings) reloads and runs the command again.
        self.zombie = EntityProcessor(
            [self.entity_cls], storage.journal, storage.snapshots, conflict_retries=0
        )
        #: what the journal must hold
        self.events: list[Any] = []
        #: the sequence number of the newest snapshot the hosts must have saved
        self.snapshot_seq_nr: int | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.driver.close())
        finally:
            self.loop.close()

    # ------------------------------------------------------------ helpers

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity_cls.type_name, ENTITY_ID)

    def is_stale(self, processor: EntityProcessor) -> bool:
        """The host holds the entity in memory, behind the journal."""
        live = processor.live.get(self.key)
        return live is not None and live.seq_nr != len(self.events)

    def process(
        self,
        processor: EntityProcessor,
        command: Any,
        run: Callable[[Any], tuple[Any, tuple[Any, ...]]],
    ) -> tuple[Any, tuple[Any, ...]]:
        """Run one command on a host; check and record what it persisted; (reply, events)."""
        stale = self.is_stale(processor)
        seq_before = len(self.events)
        reruns_before = processor.stats()["conflict_retries"]
        reply, events = run(command)
        reran = processor.stats()["conflict_retries"] - reruns_before
        if isinstance(reply, ConcurrencyConflict):
            # Only a host behind the journal conflicts, and then it forgets the entity.
            assert stale, f"conflict on a host that was up to date: {reply}"
            assert events == () and reran == 0
            # It forgot the entity (the driver then reloads it to report the state).
            assert not self.is_stale(processor)
            return reply, events
        assert not isinstance(reply, BaseException) or isinstance(reply, CommandRejected), reply
        # A host behind the journal persists only after its first write was refused and the
        # command ran again on the reloaded state: never merged into history.
        assert not (stale and events and reran != 1), "a stale host persisted events"
        assert reran == 0 or stale, "a host that was up to date ran a command again"
        self.events.extend(events)
        every = self.entity_cls.snapshot_every
        seq_after = seq_before + len(events)
        if every and seq_after // every > seq_before // every:
            self.snapshot_seq_nr = seq_after
        return reply, events

    def on_driver(self, command: Any) -> tuple[Any, tuple[Any, ...]]:
        outcome = self.run(self.driver.run(command))
        assert outcome.issues == [], outcome.issues
        (reply,) = outcome.replies
        return reply, tuple(outcome.events)

    def on_zombie(self, command: Any) -> tuple[Any, tuple[Any, ...]]:
        (result,) = self.run(
            self.zombie.process([Request(self.entity_cls.type_name, ENTITY_ID, command)])
        )
        return (result.error if result.error is not None else result.reply), result.events

    # ------------------------------------------------------------ rules

    @initialize(open_first=st.booleans())
    def maybe_open(self, open_first: bool) -> None:
        """Usually start with an open wallet, so that most commands persist something."""
        if open_first:
            self.process(self.driver.processor, Open("ann"), self.on_driver)

    @rule(command=commands)
    def command(self, command: Any) -> None:
        self.process(self.driver.processor, command, self.on_driver)

    @rule(command=money)
    def money_command(self, command: Any) -> None:
        self.process(self.driver.processor, command, self.on_driver)

    @rule(command=commands)
    def zombie_command(self, command: Any) -> None:
        """The second writer: another host that still has (or loads) the entity."""
        self.process(self.zombie, command, self.on_zombie)

    @rule()
    def zombie_forgets(self) -> None:
        self.zombie.evict(*self.key)

    @rule()
    def zombie_restarts(self) -> None:
        """The second writer starts afresh: nothing in memory and nothing remembered, so its
        next command presumes the entity new, and the journal says whether it is."""
        storage = self.driver.storage
        self.zombie = EntityProcessor(
            [self.entity_cls], storage.journal, storage.snapshots, conflict_retries=0
        )

    @rule()
    def restart(self) -> None:
        """The regular host restarts: recover from the snapshot (if any) and later events."""
        if self.is_stale(self.driver.processor):
            # Its memory is legitimately behind the journal: a crash loses it.
            self.driver.processor.evict(*self.key)
        recovered = self.run(self.driver.restart())
        assert self.driver.all_issues == [], self.driver.all_issues
        assert recovered == fold(self.entity_cls, self.events)
        assert self.run(self.driver.seq_nr()) == len(self.events)
        stored = self.run(self.driver.storage.journal.events(*self.key))
        assert [e.event for e in stored] == self.events
        assert [e.seq_nr for e in stored] == list(range(1, len(self.events) + 1))
        snapshot = self.run(self.driver.storage.snapshots.load(*self.key))
        used_snapshot = self.run(self.driver.recovered_from_snapshot())
        if self.snapshot_seq_nr is None:
            assert snapshot is None and not used_snapshot
        else:
            assert used_snapshot, "a snapshot was saved but recovery did not use it"
            assert snapshot is not None and snapshot.seq_nr == self.snapshot_seq_nr
            assert snapshot.seq_nr <= len(self.events)
            assert snapshot.state == fold(self.entity_cls, self.events[: snapshot.seq_nr])

    # ------------------------------------------------------------ invariants

    @invariant()
    def hosts_that_are_up_to_date_hold_the_journals_state(self) -> None:
        expected = fold(self.entity_cls, self.events)
        for processor in (self.driver.processor, self.zombie):
            live: LiveEntity | None = processor.live.get(self.key)
            if live is not None and not self.is_stale(processor):
                assert live.state == expected
                assert live.seq_nr == len(self.events)

    @invariant()
    def recovery_now_gives_the_journals_state(self) -> None:
        """A third host recovering the entity at this point (without disturbing the others)."""
        storage = self.driver.storage
        recovered = self.run(
            recover(self.entity_cls, ENTITY_ID, storage.journal, storage.snapshots)
        )
        assert recovered.state == fold(self.entity_cls, self.events)
        assert recovered.seq_nr == len(self.events)
        assert recovered.recovered_from_snapshot == (self.snapshot_seq_nr is not None)
        assert recovered.snapshot_seq_nr == (self.snapshot_seq_nr or 0)


class SnapshottedTwoHostsMachine(TwoHostsMachine):
    entity_cls = SnapshottedWalletEntity


@pytest.mark.parametrize(
    "machine",
    [TwoHostsMachine, SnapshottedTwoHostsMachine],
    ids=["snapshots-off", "snapshot-every-3"],
)
def test_recovered_state_equals_live_state(machine: type[TwoHostsMachine]) -> None:
    run_state_machine_as_test(machine, settings=settings(stateful_step_count=30))


# --------------------------------------------------------------------------- a second writer


@given(
    before=st.lists(money, max_size=6),
    behind_its_back=st.lists(money, max_size=4),
    snapshot_every=st.sampled_from([None, 3]),
)
def test_a_conflict_reloads_the_other_writers_events(
    before: list[Any], behind_its_back: list[Any], snapshot_every: int | None
) -> None:
    """Another host appends behind the entity's back: the entity's next write is refused (and
    writes nothing), it reloads, picks up the other writer's events, and the command runs again
    on top of them."""
    entity_cls = SnapshottedWalletEntity if snapshot_every else WalletEntity

    async def scenario() -> None:
        async with EntityTestDriver(entity_cls, ENTITY_ID, sqlite_synchronous="OFF") as driver:
            await driver.run(Open("ann"), *before)
            storage = driver.storage
            other = EntityProcessor([entity_cls], storage.journal, storage.snapshots)
            results = await other.process(
                [Request(entity_cls.type_name, ENTITY_ID, c) for c in behind_its_back]
            )
            written_behind = [e for r in results for e in r.events]
            journal = [e.event for e in await storage.journal.events("wallet", ENTITY_ID)]

            outcome = await driver.run(Deposit(1))
            (reply,) = outcome.replies
            # With written_behind, the first write was refused; the entity reloaded the other
            # writer's events and the deposit ran again on top of them.
            reruns = driver.processor.stats()["conflict_retries"]
            assert reruns == (1 if written_behind else 0)
            assert outcome.state == fold(entity_cls, [*journal, Deposited(1)])
            assert not isinstance(reply, BaseException), reply
            assert outcome.events == [Deposited(1)]
            final = [e.event for e in await storage.journal.events("wallet", ENTITY_ID)]
            assert final == [*journal, Deposited(1)]
            assert outcome.state == fold(entity_cls, final)
            assert await driver.restart() == outcome.state
            assert driver.all_issues == []

    asyncio.run(scenario())
