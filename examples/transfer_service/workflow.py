"""The transfer workflow: withdraw, deposit, notify; a rejected deposit compensates the
withdrawal.

The notification is an external step: a call to the notification service's idempotent
``POST /notifications`` through a :class:`~lagompy.service.ServiceClient` and its circuit
breaker, retried (at least once: the notification's id makes a repeat harmless). A
notification that cannot be sent does not undo a transfer: the step's failure is recorded and
the transfer completes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from examples.transfer_service.entity import AccountEntity, Deposit, Withdraw
from lagompy.errors import StepFailed
from lagompy.serialization import serializable
from lagompy.workflow import RetryPolicy, WorkflowContext, Workflows


@serializable(name="transfers.Transfer")
@dataclass(frozen=True)
class Transfer:
    source: str
    target: str
    amount: int


@serializable(name="transfers.Receipt")
@dataclass(frozen=True)
class Receipt:
    source_balance: int
    target_balance: int
    notified: bool


Notify = Callable[[str, Transfer], Awaitable[None]]


def transfer_workflows(notify: Notify) -> Workflows:
    """The service's workflows; ``notify(transfer_id, transfer)`` tells the notification
    service (the app passes a ServiceClient call)."""
    workflows = Workflows()

    @workflows.workflow("transfer", version=1)
    async def transfer(ctx: WorkflowContext, t: Transfer) -> Receipt:
        # Registered before the step it undoes: runs if anything after the withdrawal fails
        # (or the transfer is cancelled), exactly once (its command id derives from the run).
        ctx.compensate_ask(AccountEntity, t.source, Deposit(t.amount))
        source = await ctx.ask(AccountEntity, t.source, Withdraw(t.amount))
        target = await ctx.ask(AccountEntity, t.target, Deposit(t.amount))  # may be rejected
        try:
            await ctx.step(
                notify,
                ctx.run_id,
                t,
                name="notify",
                retry=RetryPolicy(max_attempts=5, initial_delay=0.2),
                timeout=5,
            )
            notified = True
        except StepFailed:
            notified = False  # recorded: a replay takes the same branch
        return Receipt(source.balance, target.balance, notified)

    return workflows
