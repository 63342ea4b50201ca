"""The user service's topics: what it publishes for other services, as public messages.

``user-events`` carries one message per registration (:class:`UserRegistration`), made from the
``UserRegistered`` events of the User entity's sharded tag: partition ``i`` is the tag's shard
``i``, so a user's messages are in order. The other events (renames, deactivations) are not
published: ``registration`` filters them out, and subscribers' positions move past them. The
message is a type of its own, not the domain event: the entity's events may change without
breaking the services that subscribe.

The user service serves it over HTTP (``TopicsComponent`` in :mod:`examples.user_service.api`);
the notification service subscribes (:mod:`examples.notification_service.api`).
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.user_service.entity import UserEntity, UserEvent, UserRegistered
from lagompy.topic import Topic


# --8<-- [start:topic]
@dataclass(frozen=True)
class UserRegistration:
    """A user registered: what other services may know of a new user."""

    user_id: str
    name: str
    email: str


def registration(event: UserEvent) -> UserRegistration | None:
    """The message of an event of the User entity; None for every event but a registration."""
    match event:
        case UserRegistered(user_id=user_id, name=name, email=email):
            return UserRegistration(user_id, name, email)
    return None


user_events = Topic("user-events", UserRegistration, source=UserEntity, to_message=registration)
# --8<-- [end:topic]
