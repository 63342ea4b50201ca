"""Entities and process managers of tests/test_process_managers.py, in a module of their own so
that Ray workers import them by name.

Orders (the source, on a sharded tag) drive a ledger (the target): placing an order charges it
on the ledger and schedules a reminder; cancelling refunds it and ends the order's process.
The ledger keeps every entry it was sent, so a command applied twice shows as two entries."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from lagompy import Command, Effect, InvalidCommand, PersistentEntity, sharded_tag
from lagompy.process import ProcessContext, ProcessManager
from lagompy.topic import Topic

# --------------------------------------------------------------------------- orders


@dataclass(frozen=True)
class Order:
    placed: bool = False
    cancelled: bool = False


@dataclass(frozen=True)
class PlaceOrder(Command[Order]):
    amount: int
    remind_after: float = 3600.0


@dataclass(frozen=True)
class CancelOrder(Command[Order]):
    pass


@dataclass(frozen=True)
class OrderPlaced:
    amount: int
    remind_after: float


@dataclass(frozen=True)
class OrderCancelled:
    pass


OrderCommand = PlaceOrder | CancelOrder
OrderEvent = OrderPlaced | OrderCancelled


class OrderEntity(PersistentEntity[OrderCommand, OrderEvent, Order]):
    type_name = "pm-order"
    initial_state = Order()
    tag = sharded_tag("pm-orders", shards=2)

    def on_command(self, state: Order, command: OrderCommand) -> Effect[Order]:
        match command:
            case PlaceOrder(amount=a, remind_after=r):
                if state.placed:
                    raise InvalidCommand(f"order {self.entity_id} is placed already")
                return Effect.persist(OrderPlaced(a, r)).then_reply(lambda s: s)
            case CancelOrder():
                return Effect.persist(OrderCancelled()).then_reply(lambda s: s)
        return Effect.unhandled()

    def on_event(self, state: Order, event: OrderEvent) -> Order:
        match event:
            case OrderPlaced():
                return replace(state, placed=True)
            case OrderCancelled():
                return replace(state, cancelled=True)
        return state


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class Entry:
    kind: str
    order_id: str
    amount: int


@dataclass(frozen=True)
class Ledger:
    entries: tuple[Entry, ...] = ()

    def of(self, kind: str) -> list[str]:
        return [e.order_id for e in self.entries if e.kind == kind]


@dataclass(frozen=True)
class Record(Command[Ledger]):
    kind: str
    order_id: str
    amount: int = 0


@dataclass(frozen=True)
class Peek(Command[Ledger]):
    """Read the ledger (records nothing)."""


@dataclass(frozen=True)
class Recorded:
    entry: Entry


class LedgerEntity(PersistentEntity[Record | Peek, Recorded, Ledger]):
    type_name = "pm-ledger"
    initial_state = Ledger()

    def on_command(self, state: Ledger, command: Record | Peek) -> Effect[Ledger]:
        if isinstance(command, Peek):
            return Effect.reply(state)
        if command.kind == "refuse":
            raise InvalidCommand(f"the ledger refuses order {command.order_id}")
        entry = Entry(command.kind, command.order_id, command.amount)
        return Effect.persist(Recorded(entry)).then_reply(lambda s: s)

    def on_event(self, state: Ledger, event: Recorded) -> Ledger:
        return replace(state, entries=(*state.entries, event.entry))


# --------------------------------------------------------------------------- the manager


@dataclass(frozen=True)
class Fulfilment:
    status: str = "new"
    charged: int = 0
    reminded: bool = False
    reminder: str | None = None


@dataclass(frozen=True)
class Remind:
    amount: int


class Fulfil(ProcessManager[Fulfilment]):
    """Charges each order on the ``main`` ledger, reminds after the order's delay unless it is
    cancelled first (then refunds it and ends)."""

    name = "fulfil"
    source = OrderEntity
    initial_state = Fulfilment()
    timer_messages = (Remind,)

    async def handle(self, ctx: ProcessContext, state: Fulfilment, event: object) -> Fulfilment:
        match event:
            case OrderPlaced(amount=a, remind_after=delay):
                if a < 0:
                    raise ValueError(f"negative amount {a}")
                await ctx.send(LedgerEntity, "main", Record("charge", ctx.key, a))
                reminder = ctx.after(delay, Remind(a))
                return replace(state, status="charged", charged=a, reminder=reminder)
            case OrderCancelled():
                await ctx.send(LedgerEntity, "main", Record("refund", ctx.key, state.charged))
                ctx.end()
        return state

    async def on_timer(self, ctx: ProcessContext, state: Fulfilment, message: object) -> Fulfilment:
        match message:
            case Remind(amount=a):
                await ctx.send(LedgerEntity, "main", Record("remind", ctx.key, a))
                return replace(state, reminded=True, reminder=None)
        return state


class FulfilThenHang(Fulfil):
    """``Fulfil`` (the same name, hence the same command ids) that hangs after the sends for an
    order whose id starts with ``hang``: the worker is killed there, before its commit."""

    async def handle(self, ctx: ProcessContext, state: Fulfilment, event: object) -> Fulfilment:
        new = await super().handle(ctx, state, event)
        if ctx.key.startswith("hang"):
            await asyncio.Event().wait()
        return new


# --------------------------------------------------------------------------- a topic source


@dataclass(frozen=True)
class PaymentDue:
    """The public message of the orders' topic."""

    amount: int


def payment_due(event: OrderEvent) -> PaymentDue | None:
    return PaymentDue(event.amount) if isinstance(event, OrderPlaced) else None


payments_due = Topic(
    name="pm-payments-due", message_type=PaymentDue, source=OrderEntity, to_message=payment_due
)


class ChargeFromTopic(ProcessManager[Fulfilment]):
    """Charges each order from the topic's messages (keyed by order id)."""

    name = "charge-from-topic"
    source = payments_due
    initial_state = Fulfilment()

    async def handle(self, ctx: ProcessContext, state: Fulfilment, event: object) -> Fulfilment:
        assert isinstance(event, PaymentDue)
        await ctx.send(LedgerEntity, "main", Record("topic-charge", ctx.key, event.amount))
        return replace(state, status="charged", charged=state.charged + event.amount)
