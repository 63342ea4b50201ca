"""The User entity: commands, events, state and handlers."""

from __future__ import annotations

# --8<-- [start:entity]
import unicodedata
from dataclasses import dataclass, replace

from lagompy import (
    Command,
    Effect,
    InvalidCommand,
    NotFound,
    PersistentEntity,
    sharded_tag,
)

# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class NoUser:
    """Nobody registered under this id yet."""


@dataclass(frozen=True)
class User:
    user_id: str
    name: str
    email: str
    active: bool = True


UserState = NoUser | User

# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class RegisterUser(Command[User]):
    name: str
    email: str


@dataclass(frozen=True)
class ChangeName(Command[User]):
    name: str


@dataclass(frozen=True)
class ChangeEmail(Command[User]):
    email: str


@dataclass(frozen=True)
class ChangeDetails(Command[User]):
    """Change the name, the email or both, all or nothing (``None``: keep it)."""

    name: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class DeactivateUser(Command[User]):
    pass


@dataclass(frozen=True)
class GetUser(Command[User]):
    pass


UserCommand = RegisterUser | ChangeName | ChangeEmail | ChangeDetails | DeactivateUser | GetUser

# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class UserRegistered:
    user_id: str
    name: str
    email: str


@dataclass(frozen=True)
class NameChanged:
    user_id: str
    name: str


@dataclass(frozen=True)
class EmailChanged:
    user_id: str
    email: str


@dataclass(frozen=True)
class UserDeactivated:
    user_id: str


UserEvent = UserRegistered | NameChanged | EmailChanged | UserDeactivated


class UserConflict(InvalidCommand):
    """The command does not fit the user's state (already registered, deactivated)."""

    http_status = 409  # Conflict: the request is well formed, the state forbids it


def _check_text(what: str, value: str) -> None:
    # Control characters and lone surrogates could not be stored in every projection database.
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidCommand(f"{what} must not contain control characters")


def _check_name(name: str) -> None:
    _check_text("name", name)
    if not name.strip():
        raise InvalidCommand("name must not be empty")
    if len(name) > 200:
        raise InvalidCommand("name must be at most 200 characters")


def _check_email(email: str) -> None:
    _check_text("email", email)
    if len(email) > 320:
        raise InvalidCommand("email must be at most 320 characters")
    local, at, domain = email.partition("@")
    if not (local and at and "." in domain):
        raise InvalidCommand(f"email {email!r} is not an email address")


# ----------------------------------------------------------------------------- entity


class UserEntity(PersistentEntity[UserCommand, UserEvent, UserState]):
    type_name = "user"
    initial_state = NoUser()
    tag = sharded_tag("user-events", shards=4)
    snapshot_every = 100

    def on_command(self, state: UserState, command: UserCommand) -> Effect[UserState]:
        match state, command:
            case NoUser(), RegisterUser(name=name, email=email):
                _check_name(name)
                _check_email(email)
                return Effect.persist(UserRegistered(self.entity_id, name, email)).then_reply(
                    lambda s: s
                )
            case NoUser(), _:
                raise NotFound(f"user {self.entity_id} is not registered")
            case User(), RegisterUser():
                raise UserConflict(f"user {self.entity_id} is already registered")
            case User(), GetUser():
                return Effect.reply(state)
            case User(active=False), _:
                raise UserConflict(f"user {self.entity_id} is deactivated")
            case User(), ChangeName(name=name):
                _check_name(name)
                if name == state.name:
                    return Effect.reply(state)
                return Effect.persist(NameChanged(self.entity_id, name)).then_reply(lambda s: s)
            case User(), ChangeEmail(email=email):
                _check_email(email)
                if email == state.email:
                    return Effect.reply(state)
                return Effect.persist(EmailChanged(self.entity_id, email)).then_reply(lambda s: s)
            case User(), ChangeDetails(name=name, email=email):
                events: list[UserEvent] = []
                if name is not None:
                    _check_name(name)
                    if name != state.name:
                        events.append(NameChanged(self.entity_id, name))
                if email is not None:
                    _check_email(email)
                    if email != state.email:
                        events.append(EmailChanged(self.entity_id, email))
                return Effect.persist_all(events).then_reply(lambda s: s)
            case User(), DeactivateUser():
                return Effect.persist(UserDeactivated(self.entity_id)).then_reply(lambda s: s)
        return Effect.unhandled()

    def on_event(self, state: UserState, event: UserEvent) -> UserState:
        match state, event:
            case NoUser(), UserRegistered(user_id=uid, name=name, email=email):
                return User(uid, name, email)
            case User(), NameChanged(name=name):
                return replace(state, name=name)
            case User(), EmailChanged(email=email):
                return replace(state, email=email)
            case User(), UserDeactivated():
                return replace(state, active=False)
        return self.unhandled_event(state, event)


# --8<-- [end:entity]
