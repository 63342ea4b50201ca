"""The user service over HTTP: commands go to the User entity, reads come from the ``users``
projection, and the ``user-events`` topic publishes registrations (``GET /topics/...``), which
the notification service subscribes to.

Run it with ``lagompy run examples.user_service.api:app`` (or both services at once with
``python -m examples.user_service``). Environment:

* ``LAGOMPY_JOURNAL_URL`` (default ``sqlite:///lagompy.db``): the journal, and the projection's
  database; ``LAGOMPY_JOURNAL_POSTGRES_SCHEMA``, ``LAGOMPY_JOURNAL_AUTO_MIGRATE`` and the other
  ``JournalSettings`` variables apply.
* ``LAGOMPY_EXAMPLE_RAY`` (default ``1``): host the entities on Ray (a local Ray unless
  ``RAY_ADDRESS`` names a cluster); ``0`` hosts them in the service's process.
* ``LAGOMPY_EXAMPLE_APP`` (default ``users``): the app's name (its Ray namespace).
* ``LAGOMPY_SERVICE_NOTIFICATIONS``: the notification service's base URL(s), for
  ``GET /users/{id}/notifications``; ``LAGOMPY_BREAKER_NOTIFICATIONS_MAX_FAILURES``,
  ``..._RESET_TIMEOUT``, ``..._CALL_TIMEOUT``: its breaker.

Reads are eventually consistent: the projection follows the journal within milliseconds, so a
``GET /users/{id}`` right after the ``POST /users`` that registered the user may answer 404.
Writes answer with the entity's new state, which is always current.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Annotated, Any, Self

from fastapi import Depends, FastAPI, Path, Query, Response
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import func, select

from examples.user_service.entity import (
    ChangeDetails,
    DeactivateUser,
    RegisterUser,
    User,
    UserCommand,
    UserEntity,
)
from examples.user_service.projection import UsersProjection
from examples.user_service.projection import users as users_table
from examples.user_service.topics import user_events
from lagompy import NotFound
from lagompy.readside import ReadSideComponent
from lagompy.service import (
    BreakerRegistry,
    IdempotencyKey,
    Refs,
    Service,
    ServiceClient,
    ServiceLocator,
    client,
    refs,
)
from lagompy.settings import JournalSettings
from lagompy.topic import TopicsComponent

log = logging.getLogger("examples.user_service")


# --8<-- [start:models]
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
UserId = Annotated[str, Path(pattern=ID_PATTERN, description="The user's id.")]
Users = Annotated[Refs[UserCommand], Depends(refs(UserEntity))]
Notifier = Annotated[ServiceClient, Depends(client("notifications"))]


class Registration(BaseModel):
    name: str = Field(max_length=200)
    email: str = Field(max_length=320)
    user_id: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="The new user's id; by default made from the Idempotency-Key, else random.",
    )


class Changes(BaseModel):
    name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=320)

    @model_validator(mode="after")
    def _something_to_change(self) -> Self:
        if self.name is None and self.email is None:
            raise ValueError("give a name, an email or both")
        return self


class UserOut(BaseModel):
    user_id: str
    name: str
    email: str
    active: bool

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(user_id=user.user_id, name=user.name, email=user.email, active=user.active)


class UserPage(BaseModel):
    items: list[UserOut]
    next_after: str | None = Field(
        description="Pass it as `after` to get the next page; null on the last page."
    )


def new_user_id(idempotency_key: str | None) -> str:
    """The id of a user registered without a ``user_id``. A retried request (the same
    Idempotency-Key) must reach the same entity to get the first reply, so the id is made from
    the key; without a key, it is random."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(uuid.NAMESPACE_URL, f"lagompy-example:user:{idempotency_key}").hex


# --8<-- [end:models]


def create_app(
    *,
    journal_settings: JournalSettings | None = None,
    ray: bool | None = None,
    name: str | None = None,
    runtime_options: dict[str, Any] | None = None,
    locator: ServiceLocator | None = None,
    breakers: BreakerRegistry | None = None,
) -> FastAPI:
    """The user service's FastAPI app; its lifespan starts the entities, the ``users``
    projection's workers (in this process), the ``user-events`` topic's route and the
    notification service's client.
    Arguments left out come from the environment (see the module's docs)."""
    if ray is None:
        ray = os.environ.get("LAGOMPY_EXAMPLE_RAY", "1") != "0"
    if name is None:
        name = os.environ.get("LAGOMPY_EXAMPLE_APP", "users")
    journal = journal_settings or JournalSettings()
    # --8<-- [start:app]
    readside = ReadSideComponent([UsersProjection], journal_settings=journal)
    topics = TopicsComponent([user_events], journal_settings=journal)
    service = Service(
        name=name,
        entities=[UserEntity],
        journal_settings=journal,
        ray=ray,
        runtime_options=runtime_options,
        clients=["notifications"],
        components=[readside, topics],
        locator=locator,
        breakers=breakers,
    )
    app = FastAPI(title="users", lifespan=service.lifespan)
    service.install(app)

    @app.post("/users", status_code=201)
    async def register(
        body: Registration,
        users: Users,
        idempotency_key: IdempotencyKey,
        response: Response,
    ) -> UserOut:
        """Register a user; the answer is the entity's state. Safe to retry with the same
        Idempotency-Key: one user, one event, the first reply. The registration reaches the
        ``user-events`` topic with its event: nothing else to send."""
        user_id = body.user_id or new_user_id(idempotency_key)
        user = await users(user_id).ask(RegisterUser(body.name, body.email))
        response.headers["Location"] = f"/users/{user_id}"
        return UserOut.of(user)

    @app.get("/users/{user_id}")
    async def get_user(user_id: UserId) -> UserOut:
        """A user, from the ``users`` projection (which may lag the journal by milliseconds)."""
        async with readside.projection.read() as conn:
            query = select(users_table).where(users_table.c.user_id == user_id)
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"no user {user_id} in the users projection (yet)")
        return UserOut(user_id=row.user_id, name=row.name, email=row.email, active=row.active)

    @app.get("/users")
    async def list_users(
        name: Annotated[
            str | None,
            Query(min_length=1, max_length=200, description="Users whose name starts so."),
        ] = None,
        active: Annotated[bool | None, Query(description="Only (in)active users.")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
        after: Annotated[
            str | None, Query(pattern=ID_PATTERN, description="The previous page's next_after.")
        ] = None,
    ) -> UserPage:
        """Users in the order of their ids, a page at a time, from the projection."""
        query = select(users_table).order_by(users_table.c.user_id).limit(limit + 1)
        if name is not None:
            query = query.where(func.substr(users_table.c.name, 1, len(name)) == name)
        if active is not None:
            query = query.where(users_table.c.active == active)
        if after is not None:
            query = query.where(users_table.c.user_id > after)
        async with readside.projection.read() as conn:
            rows = (await conn.execute(query)).all()
        items = [
            UserOut(user_id=r.user_id, name=r.name, email=r.email, active=r.active)
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        return UserPage(items=items, next_after=items[-1].user_id if more else None)

    @app.patch("/users/{user_id}")
    async def change_user(user_id: UserId, body: Changes, users: Users) -> UserOut:
        """Change the name, the email or both: all or nothing."""
        return UserOut.of(await users(user_id).ask(ChangeDetails(body.name, body.email)))

    @app.post("/users/{user_id}/deactivate")
    async def deactivate(user_id: UserId, users: Users) -> UserOut:
        """Deactivate a user; a deactivated user cannot be changed (409)."""
        return UserOut.of(await users(user_id).ask(DeactivateUser()))

    # --8<-- [end:app]

    # --8<-- [start:sent]
    @app.get("/users/{user_id}/notifications")
    async def sent_to_user(user_id: UserId, notifier: Notifier) -> dict[str, Any]:
        """What the notification service sent to a user. Here the call to the other service is
        the answer: when it fails, the route fails with it (502, 503 or 504 naming the service,
        never its URL or what it answered)."""
        async with readside.projection.read() as conn:
            query = select(users_table.c.email).where(users_table.c.user_id == user_id)
            email = (await conn.execute(query)).scalar()
        if email is None:
            raise NotFound(f"no user {user_id} in the users projection (yet)")
        reply = await notifier.get("/notifications", params={"recipient": email})
        return {"items": reply.json()["items"]}

    # --8<-- [end:sent]
    return app


app = create_app()
