"""The user service over HTTP: a small FastAPI app on the User entity.

Run it with ``lagompy run examples.user_service.api:app`` (journal from LAGOMPY_JOURNAL_URL,
default ./lagompy.db; entities in-process unless LAGOMPY_EXAMPLE_RAY=1; app name from
LAGOMPY_EXAMPLE_APP, default users), or build one with
:func:`create_app` in tests.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path
from pydantic import BaseModel, Field

from examples.user_service.entity import (
    ChangeEmail,
    ChangeName,
    DeactivateUser,
    GetUser,
    RegisterUser,
    User,
    UserCommand,
    UserEntity,
)
from lagompy.service import Refs, Service, refs
from lagompy.settings import JournalSettings

UserId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The user's id.")]
Users = Annotated[Refs[UserCommand], Depends(refs(UserEntity))]


class Registration(BaseModel):
    name: str = Field(max_length=200)
    email: str = Field(max_length=320)


class NewName(BaseModel):
    name: str = Field(max_length=200)


class NewEmail(BaseModel):
    email: str = Field(max_length=320)


class UserOut(BaseModel):
    user_id: str
    name: str
    email: str
    active: bool

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(user_id=user.user_id, name=user.name, email=user.email, active=user.active)


def create_app(
    *,
    journal_settings: JournalSettings | None = None,
    ray: bool | None = None,
    name: str | None = None,
    runtime_options: dict[str, Any] | None = None,
) -> FastAPI:
    """The user service's FastAPI app; its lifespan starts the entities."""
    if ray is None:
        ray = os.environ.get("LAGOMPY_EXAMPLE_RAY", "0") == "1"
    if name is None:
        name = os.environ.get("LAGOMPY_EXAMPLE_APP", "users")
    service = Service(
        name=name,
        entities=[UserEntity],
        journal_settings=journal_settings,
        ray=ray,
        runtime_options=runtime_options,
    )
    app = FastAPI(title="users", lifespan=service.lifespan)
    service.install(app)

    @app.post("/users/{user_id}", status_code=201)
    async def register(user_id: UserId, body: Registration, users: Users) -> UserOut:
        """Register a user. Safe to retry with the same Idempotency-Key."""
        return UserOut.of(await users(user_id).ask(RegisterUser(body.name, body.email)))

    @app.get("/users/{user_id}")
    async def get_user(user_id: UserId, users: Users) -> UserOut:
        return UserOut.of(await users(user_id).ask(GetUser()))

    @app.put("/users/{user_id}/name")
    async def change_name(user_id: UserId, body: NewName, users: Users) -> UserOut:
        return UserOut.of(await users(user_id).ask(ChangeName(body.name)))

    @app.put("/users/{user_id}/email")
    async def change_email(user_id: UserId, body: NewEmail, users: Users) -> UserOut:
        return UserOut.of(await users(user_id).ask(ChangeEmail(body.email)))

    @app.post("/users/{user_id}/deactivate")
    async def deactivate(user_id: UserId, users: Users) -> UserOut:
        return UserOut.of(await users(user_id).ask(DeactivateUser()))

    return app


app = create_app()
