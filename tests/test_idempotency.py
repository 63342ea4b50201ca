"""``Idempotency-Key`` over real HTTP on loopback, on both journals: a key is bound to the
request it first came with, so a reused key never looks like success.

* the same key on another route, or with another body, is refused (422; 409 while the first
  request is in flight) with a problem document that names the conflict and holds no reply,
  and nothing is applied;
* the same request again (also re-serialised) gets the first reply and applies nothing;
* derived command ids cannot collide with another key's (``x/2`` against the second ask of
  ``x``), count per entity and command type (a route whose asks vary keeps its ids), and are
  shared by every ``refs()`` dependency of the request;
* the header is validated once: one error, however many dependencies use it;
* a key expires after ``idempotency_key_lifetime``: then it may be used again, and its record
  is swept.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import func, select

from lagompy import Command, Effect, InvalidCommand, PersistentEntity
from lagompy.journal._journal import MAX_COMMAND_ID_LENGTH
from lagompy.service import BreakerRegistry, IdempotencyKey, Refs, Service, ServiceSettings, refs
from lagompy.service._idempotency import MAX_KEY_LENGTH, RequestKey
from lagompy.settings import JournalSettings
from lagompy.sql import Database
from lagompy.sql._schema import idempotency_keys
from lagompy.testkit.server import serve_in_thread

# --------------------------------------------------------------------------- an account


@dataclass(frozen=True)
class Account:
    balance: int = 0
    notes: int = 0


@dataclass(frozen=True)
class Deposit(Command[Account]):
    amount: int


@dataclass(frozen=True)
class Withdraw(Command[Account]):
    amount: int


@dataclass(frozen=True)
class AddNote(Command[Account]):
    text: str


@dataclass(frozen=True)
class GetAccount(Command[Account]):
    pass


AccountCommand = Deposit | Withdraw | AddNote | GetAccount


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    amount: int


@dataclass(frozen=True)
class NoteAdded:
    text: str


AccountEvent = Deposited | Withdrawn | NoteAdded


class AccountEntity(PersistentEntity[AccountCommand, AccountEvent, Account]):
    type_name = "account"
    initial_state = Account()

    def on_command(self, state: Account, command: AccountCommand) -> Effect[Any]:
        match command:
            case Deposit(amount=n):
                return Effect.persist(Deposited(n)).then_reply(lambda s: s)
            case Withdraw(amount=n):
                if n > state.balance:
                    raise InvalidCommand(f"balance {state.balance} is less than {n}")
                return Effect.persist(Withdrawn(n)).then_reply(lambda s: s)
            case AddNote(text=t):
                return Effect.persist(NoteAdded(t)).then_reply(lambda s: s)
            case GetAccount():
                return Effect.reply(state)
        return Effect.unhandled()

    def on_event(self, state: Account, event: AccountEvent) -> Account:
        match event:
            case Deposited(amount=n):
                return replace(state, balance=state.balance + n)
            case Withdrawn(amount=n):
                return replace(state, balance=state.balance - n)
            case NoteAdded():
                return replace(state, notes=state.notes + 1)
        return state


class Amount(BaseModel):
    amount: int
    memo: str = ""


class Knobs:
    """What the test changes between a request and its retry, and the gate of a slow route."""

    def __init__(self) -> None:
        self.note_first = False
        self.entered = threading.Event()
        self.gate = threading.Event()


# Two dependencies of one type: a route may take refs() twice (and the key itself).
Accounts = Annotated[Refs[AccountCommand], Depends(refs(AccountEntity))]
Others = Annotated[Refs[AccountCommand], Depends(refs(AccountEntity))]


def out(account: Account) -> dict[str, int]:
    return {"balance": account.balance, "notes": account.notes}


def bank_app(
    journal_settings: JournalSettings, knobs: Knobs, settings: ServiceSettings | None = None
) -> FastAPI:
    service = Service(
        name=f"bank-{uuid.uuid4().hex[:8]}",
        entities=[AccountEntity],
        journal_settings=journal_settings,
        ray=False,
        settings=settings,
        breakers=BreakerRegistry(),
    )
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    app.state.service = service

    @app.post("/accounts/{account_id}/deposit")
    async def deposit(account_id: str, body: Amount, accounts: Accounts) -> dict[str, int]:
        return out(await accounts(account_id).ask(Deposit(body.amount)))

    @app.post("/accounts/{account_id}/withdraw")
    async def withdraw(account_id: str, body: Amount, accounts: Accounts) -> dict[str, int]:
        return out(await accounts(account_id).ask(Withdraw(body.amount)))

    @app.post("/accounts/{account_id}/deposit-twice")
    async def deposit_twice(
        account_id: str, body: Amount, accounts: Accounts, others: Others, key: IdempotencyKey
    ) -> dict[str, int]:
        await accounts(account_id).ask(Deposit(body.amount))
        return out(await others(account_id).ask(Deposit(body.amount)))

    @app.post("/accounts/{account_id}/noted-deposit")
    async def noted_deposit(account_id: str, body: Amount, accounts: Accounts) -> dict[str, int]:
        if knobs.note_first:  # e.g. a decision made on state that changed since
            await accounts(account_id).ask(AddNote(body.memo))
        return out(await accounts(account_id).ask(Deposit(body.amount)))

    @app.post("/accounts/{account_id}/slow-deposit")
    async def slow_deposit(account_id: str, body: Amount, accounts: Accounts) -> dict[str, int]:
        knobs.entered.set()
        await asyncio.to_thread(knobs.gate.wait, 30)
        return out(await accounts(account_id).ask(Deposit(body.amount)))

    @app.get("/accounts/{account_id}")
    async def get(account_id: str, accounts: Accounts) -> dict[str, int]:
        return out(await accounts(account_id).ask(GetAccount()))

    return app


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def balance(http: httpx.Client, account_id: str) -> int:
    r = http.get(f"/accounts/{account_id}")
    assert r.status_code == 200, r.text
    return int(r.json()["balance"])


PROBLEM_FIELDS = {
    "type",
    "title",
    "status",
    "detail",
    "instance",
    "request_id",
    "idempotency_key",
    "in_flight",
}


def assert_reused(r: httpx.Response, status: int, *, names: str) -> dict[str, Any]:
    """A key-reuse problem document: the status, a detail that names the conflict, and no
    stored reply (only the problem's own fields)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert set(body) == PROBLEM_FIELDS, body
    assert body["type"] == "urn:lagompy:problem:idempotency-key-reused"
    assert body["status"] == status and body["in_flight"] is (status == 409)
    assert names in body["detail"], body["detail"]
    assert "balance" not in r.text
    return body


@pytest.fixture
def knobs() -> Knobs:
    return Knobs()


# --------------------------------------------------------------------------- reuse is refused


def test_a_deposit_key_on_the_withdrawal_route_is_refused(
    journal_settings: JournalSettings, knobs: Knobs
) -> None:
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url) as http,
    ):
        first = http.post("/accounts/a/deposit", json={"amount": 10}, headers=key("pay-1"))
        assert first.status_code == 200 and first.json() == {"balance": 10, "notes": 0}
        reused = http.post("/accounts/a/withdraw", json={"amount": 10}, headers=key("pay-1"))
        body = assert_reused(
            reused,
            422,
            names="first used with POST /accounts/{account_id}/deposit, "
            "not POST /accounts/{account_id}/withdraw",
        )
        assert body["idempotency_key"] == "pay-1"
        assert balance(http, "a") == 10  # nothing withdrawn
        # Another entity on the same route is another request too (path parameters differ).
        other = http.post("/accounts/b/deposit", json={"amount": 10}, headers=key("pay-1"))
        assert_reused(other, 422, names="a different request to POST /accounts/{account_id}")
        assert balance(http, "b") == 0


def test_the_same_key_with_another_amount_is_refused(
    journal_settings: JournalSettings, knobs: Knobs
) -> None:
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url) as http,
    ):
        # A request whose body failed validation made no ask: it leaves the key unbound, so
        # the corrected request may use it.
        invalid = http.post("/accounts/a/deposit", json={"amount": "many"}, headers=key("k"))
        assert invalid.status_code == 422 and invalid.json()["errors"][0]["loc"][0] == "body"
        first = http.post(
            "/accounts/a/deposit", json={"amount": 5, "memo": "rent"}, headers=key("k")
        )
        assert first.json() == {"balance": 5, "notes": 0}
        # The same request, serialised otherwise (key order, whitespace): the first reply.
        again = http.post(
            "/accounts/a/deposit",
            content=b'{ "memo" : "rent",\n  "amount": 5 }',
            headers={**key("k"), "content-type": "application/json"},
        )
        assert again.status_code == 200 and again.json() == first.json()
        changed = http.post("/accounts/a/deposit", json={"amount": 7}, headers=key("k"))
        assert_reused(changed, 422, names="its path or query parameters or its body differ")
        query = http.post(
            "/accounts/a/deposit?x=1", json={"amount": 5, "memo": "rent"}, headers=key("k")
        )
        assert_reused(query, 422, names="a different request")
        assert balance(http, "a") == 5  # applied once, the 7 never


def test_another_request_while_the_first_is_in_flight_gets_409(
    journal_settings: JournalSettings, knobs: Knobs
) -> None:
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        slow = pool.submit(
            http.post, "/accounts/a/slow-deposit", json={"amount": 5}, headers=key("f")
        )
        assert knobs.entered.wait(10)
        during = http.post("/accounts/a/withdraw", json={"amount": 1}, headers=key("f"))
        assert_reused(during, 409, names="which is still in flight")
        knobs.gate.set()
        assert slow.result(30).json() == {"balance": 5, "notes": 0}
        after = http.post("/accounts/a/withdraw", json={"amount": 1}, headers=key("f"))
        assert_reused(after, 422, names="/slow-deposit, not POST")
        assert balance(http, "a") == 5


def test_concurrent_requests_with_keys(journal_settings: JournalSettings, knobs: Knobs) -> None:
    # Per key: the same deposit twice and another deposit, all at once (they share rounds of
    # the key store). Per key one request's effect, once; its repeat gets the same reply; the
    # other request is refused.
    keys = [f"c-{i}" for i in range(8)]
    jobs = [(k, amount) for k in keys for amount in (1, 1, 100)]
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        ThreadPoolExecutor(len(jobs)) as pool,
    ):

        def deposit(job: tuple[str, int]) -> httpx.Response:
            k, amount = job
            return http.post(f"/accounts/{k}/deposit", json={"amount": amount}, headers=key(k))

        answers = list(pool.map(deposit, jobs))
        for k in keys:
            mine = [(amount, r) for (kk, amount), r in zip(jobs, answers, strict=True) if kk == k]
            ok = [(amount, r.json()) for amount, r in mine if r.status_code == 200]
            refused = [r for _, r in mine if r.status_code in (409, 422)]
            assert len(ok) + len(refused) == 3, [r.text for _, r in mine]
            amount = ok[0][0]  # the request that bound the key: it and its repeat succeed
            assert ok == [(amount, {"balance": amount, "notes": 0})] * len(ok)
            assert len(ok) == (2 if amount == 1 else 1), [r.text for _, r in mine]
            assert all(r.json()["type"].endswith("idempotency-key-reused") for r in refused)
            assert balance(http, k) == amount


# --------------------------------------------------------------------------- derived ids


def test_derived_ids_do_not_collide_and_do_not_shift(
    journal_settings: JournalSettings, knobs: Knobs
) -> None:
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url) as http,
    ):
        # Two asks of one type to one entity, through two refs() dependencies: two deposits.
        twice = http.post("/accounts/a/deposit-twice", json={"amount": 1}, headers=key("x"))
        assert twice.json() == {"balance": 2, "notes": 0}
        assert http.post(
            "/accounts/a/deposit-twice", json={"amount": 1}, headers=key("x")
        ).json() == {"balance": 2, "notes": 0}
        # The key "x/2" is a key of its own, not the second ask of "x".
        other = http.post("/accounts/a/deposit", json={"amount": 10}, headers=key("x/2"))
        assert other.json() == {"balance": 12, "notes": 0}
        assert balance(http, "a") == 12

        # A route that asks one command more on the first try than on the retry.
        knobs.note_first = True
        first = http.post(
            "/accounts/b/noted-deposit", json={"amount": 5, "memo": "m"}, headers=key("n")
        )
        assert first.json() == {"balance": 5, "notes": 1}
        knobs.note_first = False
        retry = http.post(
            "/accounts/b/noted-deposit", json={"amount": 5, "memo": "m"}, headers=key("n")
        )
        assert retry.status_code == 200 and retry.json() == first.json()
        assert balance(http, "b") == 5


def test_derived_ids_fit_and_are_unique() -> None:
    longest = RequestKey("k" * MAX_KEY_LENGTH, 1_733_000_000_000_000)

    @dataclass(frozen=True)
    class AVeryLongCommandNameThatWouldOverflowTheCommandIdColumnOfTheJournal(Command[int]):
        pass

    command = AVeryLongCommandNameThatWouldOverflowTheCommandIdColumnOfTheJournal()
    ids = [longest.command_id("t", "1", command) for _ in range(3)]
    ids.append(longest.command_id("t", "1", Deposit(1)))
    assert len(set(ids)) == 4
    assert all(len(i) <= MAX_COMMAND_ID_LENGTH for i in ids)
    # Counted per entity: another entity's first deposit has the first deposit's id.
    assert longest.command_id("t", "2", Deposit(1)) == ids[3]
    # Another binding of the same key (after it expired) never meets the old ids.
    assert RequestKey("k" * MAX_KEY_LENGTH, 1).command_id("t", "1", Deposit(1)) != ids[3]


# --------------------------------------------------------------------------- the header


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("k" * (MAX_KEY_LENGTH + 1), f"must have 1 to {MAX_KEY_LENGTH} characters, got 201"),
        ("k" * 300, f"must have 1 to {MAX_KEY_LENGTH} characters, got 300"),
        ("has space", "printable ASCII without spaces"),
    ],
)
def test_a_bad_key_is_one_error(
    journal_settings: JournalSettings, knobs: Knobs, value: str, message: str
) -> None:
    with (
        serve_in_thread(bank_app(journal_settings, knobs)) as url,
        httpx.Client(base_url=url) as http,
    ):
        # The route takes refs() twice and the key itself: still one error.
        r = http.post("/accounts/a/deposit-twice", json={"amount": 1}, headers=key(value))
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        errors = r.json()["errors"]
        assert len(errors) == 1, errors
        assert errors[0]["loc"] == ["header", "Idempotency-Key"]
        assert message in errors[0]["msg"]
        assert balance(http, "a") == 0
        longest = http.post(
            "/accounts/a/deposit-twice", json={"amount": 1}, headers=key("k" * MAX_KEY_LENGTH)
        )
        assert longest.json() == {"balance": 2, "notes": 0}


# --------------------------------------------------------------------------- expiry


async def key_rows(journal_settings: JournalSettings, scope: str) -> int:
    database = Database.create(journal_settings)
    try:
        async with database.read() as conn:
            query = select(func.count()).where(idempotency_keys.c.scope == scope)
            return int(await conn.scalar(query) or 0)
    finally:
        await database.dispose()


async def test_an_expired_key_may_be_used_again_and_is_swept(
    journal_settings: JournalSettings, knobs: Knobs
) -> None:
    settings = ServiceSettings(idempotency_key_lifetime=1.0)
    app = bank_app(journal_settings, knobs, settings)
    scope = app.state.service.name
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        assert http.post("/accounts/a/deposit", json={"amount": 5}, headers=key("e")).json() == {
            "balance": 5,
            "notes": 0,
        }
        assert await key_rows(journal_settings, scope) == 1
        refused = http.post("/accounts/a/withdraw", json={"amount": 3}, headers=key("e"))
        assert refused.status_code == 422
        await asyncio.sleep(1.2)
        # Expired: the key is free, and its new request's asks are new commands.
        reused = http.post("/accounts/a/withdraw", json={"amount": 3}, headers=key("e"))
        assert reused.status_code == 200 and reused.json() == {"balance": 2, "notes": 0}
        again = http.post("/accounts/a/deposit", json={"amount": 5}, headers=key("e2"))
        assert again.status_code == 200
        await asyncio.sleep(1.2)
        # A keyed request after the lifetime starts a sweep of the expired records.
        http.post("/accounts/a/deposit", json={"amount": 1}, headers=key("e3"))
        deadline = time.monotonic() + 10
        while await key_rows(journal_settings, scope) > 1:
            assert time.monotonic() < deadline, "the expired keys were not swept"
            await asyncio.sleep(0.05)
        assert balance(http, "a") == 8


# --------------------------------------------------------------------------- on Ray


async def test_reuse_is_refused_on_ray(
    journal_settings: JournalSettings, ray_session: object
) -> None:
    from examples.user_service.api import create_app

    app = create_app(
        journal_settings=journal_settings,
        ray=True,
        name=f"users-{uuid.uuid4().hex[:8]}",
        runtime_options={"hosts": 1, "shards": 8},
        breakers=BreakerRegistry(),
    )
    body = {"name": "Ada", "email": "ada@example.org", "user_id": "ada"}
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        first = http.post("/users", json=body, headers=key("reg-1"))
        assert first.status_code == 201, first.text
        retry = http.post("/users", json=body, headers=key("reg-1"))
        assert retry.status_code == 201 and retry.json() == first.json()
        renamed = http.patch("/users/ada", json={"name": "Ada King"}, headers=key("reg-1"))
        assert_ray_reused(renamed, "POST /users, not PATCH /users/{user_id}")
        other = http.post("/users", json={**body, "name": "Bob"}, headers=key("reg-1"))
        assert_ray_reused(other, "a different request to POST /users")
        renamed = http.patch("/users/ada", json={"name": "Ada King"}, headers=key("rename-1"))
        assert renamed.status_code == 200 and renamed.json()["name"] == "Ada King"


def assert_ray_reused(r: httpx.Response, names: str) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["type"] == "urn:lagompy:problem:idempotency-key-reused"
    assert names in r.json()["detail"]
    assert "ada@example.org" not in r.text
