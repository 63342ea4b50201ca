"""The transfer service over HTTP: accounts (an entity) and transfers (a durable workflow).

Run it with ``lagompy run examples.transfer_service.api:app --port 8002`` (with the
notification service on 8001: ``LAGOMPY_SERVICE_NOTIFICATIONS=http://127.0.0.1:8001``).
Environment: ``LAGOMPY_JOURNAL_URL`` (default ``sqlite:///lagompy.db``),
``LAGOMPY_EXAMPLE_RAY`` (default ``1``: the entities on a local Ray), ``LAGOMPY_EXAMPLE_APP``
(default ``transfers``).

* ``POST /accounts/{id}/deposits``, ``POST /accounts/{id}/close``, ``GET /accounts/{id}``;
* ``PUT /transfers/{id}`` starts a transfer (the id is the idempotency key: the same body
  again returns the same transfer, another body answers 409);
* ``GET /transfers/{id}``: its status (``running``, ``completed``, ``failed``, ``cancelled``),
  steps and receipt; ``POST /transfers/{id}/cancel``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path
from pydantic import BaseModel, Field

from examples.transfer_service.entity import (
    AccountCommand,
    AccountEntity,
    CloseAccount,
    Deposit,
    GetAccount,
)
from examples.transfer_service.workflow import Receipt, Transfer, transfer_workflows
from lagompy.errors import WorkflowFailed
from lagompy.service import BreakerRegistry, Refs, Service, ServiceLocator, refs
from lagompy.settings import JournalSettings
from lagompy.workflow import WorkflowRun, WorkflowsComponent, WorkflowSettings

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
AccountId = Annotated[str, Path(pattern=ID_PATTERN)]
TransferId = Annotated[str, Path(pattern=ID_PATTERN)]
Accounts = Annotated[Refs[AccountCommand], Depends(refs(AccountEntity))]


class AccountOut(BaseModel):
    account_id: str
    balance: int
    closed: bool


class Amount(BaseModel):
    amount: int = Field(gt=0, le=10**12)


class TransferIn(BaseModel):
    source: str = Field(pattern=ID_PATTERN)
    target: str = Field(pattern=ID_PATTERN)
    amount: int = Field(gt=0, le=10**12)


class TransferOut(BaseModel):
    transfer_id: str
    status: str
    steps: list[str]
    failed_steps: list[str]
    error: str | None
    receipt: dict[str, Any] | None


def create_app(
    *,
    journal_settings: JournalSettings | None = None,
    ray: bool | None = None,
    name: str | None = None,
    locator: ServiceLocator | None = None,
    breakers: BreakerRegistry | None = None,
    workflow_settings: WorkflowSettings | None = None,
) -> FastAPI:
    if ray is None:
        ray = os.environ.get("LAGOMPY_EXAMPLE_RAY", "1") != "0"
    journal = journal_settings or JournalSettings()
    service: Service

    async def notify(transfer_id: str, t: Transfer) -> None:
        notifications = service.clients["notifications"]  # its circuit breaker included
        await notifications.post(
            "/notifications",
            json={
                "id": f"transfer:{transfer_id}",  # idempotent: a retried call records it once
                "recipient": t.source,
                "subject": f"{t.amount} sent to {t.target}",
            },
        )

    workflows = WorkflowsComponent(transfer_workflows(notify), settings=workflow_settings)
    service = Service(
        name=name or os.environ.get("LAGOMPY_EXAMPLE_APP", "transfers"),
        entities=[AccountEntity, WorkflowRun],  # WorkflowRun: the runs, as entities
        journal_settings=journal,
        ray=ray,
        clients=["notifications"],
        components=[workflows],
        locator=locator,
        breakers=breakers,
    )
    app = FastAPI(title="transfers", lifespan=service.lifespan)
    service.install(app)

    @app.post("/accounts/{account_id}/deposits")
    async def deposit(account_id: AccountId, body: Amount, accounts: Accounts) -> AccountOut:
        account = await accounts(account_id).ask(Deposit(body.amount))
        return AccountOut(account_id=account_id, balance=account.balance, closed=account.closed)

    @app.post("/accounts/{account_id}/close")
    async def close(account_id: AccountId, accounts: Accounts) -> AccountOut:
        account = await accounts(account_id).ask(CloseAccount())
        return AccountOut(account_id=account_id, balance=account.balance, closed=account.closed)

    @app.get("/accounts/{account_id}")
    async def get_account(account_id: AccountId, accounts: Accounts) -> AccountOut:
        account = await accounts(account_id).ask(GetAccount())
        return AccountOut(account_id=account_id, balance=account.balance, closed=account.closed)

    async def transfer_out(transfer_id: str) -> TransferOut:
        engine = workflows.engine
        status = await engine.status(transfer_id)
        receipt: dict[str, Any] | None = None
        if status.status == "completed":
            value: Receipt = await engine.result(transfer_id)
            receipt = {
                "source_balance": value.source_balance,
                "target_balance": value.target_balance,
                "notified": value.notified,
            }
        return TransferOut(
            transfer_id=transfer_id,
            status=status.status,
            steps=list(status.steps),
            failed_steps=list(status.failed_steps),
            error=status.error,
            receipt=receipt,
        )

    @app.put("/transfers/{transfer_id}", status_code=202)
    async def start_transfer(transfer_id: TransferId, body: TransferIn) -> TransferOut:
        """Start a transfer; the id is its idempotency key."""
        transfer = Transfer(body.source, body.target, body.amount)
        await workflows.engine.start("transfer", transfer, id=transfer_id)
        return await transfer_out(transfer_id)

    @app.get("/transfers/{transfer_id}")
    async def get_transfer(transfer_id: TransferId, wait: float = 0) -> TransferOut:
        """A transfer's status; ``wait``: seconds to wait for it to finish first."""
        if wait > 0:
            try:
                await workflows.engine.result(transfer_id, timeout=min(wait, 30))
            except (TimeoutError, WorkflowFailed):
                pass
        return await transfer_out(transfer_id)

    @app.post("/transfers/{transfer_id}/cancel")
    async def cancel_transfer(transfer_id: TransferId) -> TransferOut:
        await workflows.engine.cancel(transfer_id, "cancelled over HTTP")
        return await transfer_out(transfer_id)

    return app


app = create_app()
