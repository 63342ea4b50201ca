"""What a subscriber declares and implements: :class:`Subscriber`."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import ConfigurationError
from lagompy.topic._topic import Message, StartFrom, Topic, _check_name

__all__ = ["GROUP_PREFIX", "PRODUCER_PREFIX", "Subscriber", "offset_key", "producer_key"]

M = TypeVar("M")


#: The offset store's rows of topics begin with these: a group's, and a topic's producers'.
GROUP_PREFIX = "topic:"
PRODUCER_PREFIX = "topic-producer:"


def offset_key(topic: str, group: str) -> str:
    """The key of a group's positions in the offset store (one row per partition, beside the
    read sides' rows): ``topic:<topic>:<group>``."""
    return f"{GROUP_PREFIX}{topic}:{group}"


def producer_key(topic: str) -> str:
    """The key of a topic's producers' positions in the offset store (one row per partition,
    for the transports that keep them there): ``topic-producer:<topic>``."""
    return f"{PRODUCER_PREFIX}{topic}"


class Subscriber(Generic[M]):
    """A consumer group of a topic: ``group`` (its name: the key of its positions, one per
    partition), ``topic`` (the :class:`Topic` it reads, imported from the producing
    service's module), ``start_from`` (where the group starts the first time) and
    ``handle(conn, message)``::

        class WelcomeMails(Subscriber[UserRegistration]):
            group = "welcome-mails"
            topic = user_registrations

            async def prepare(self, conn):            # CREATE TABLE IF NOT EXISTS ...
                ...

            async def handle(self, conn, message):    # INSERT ... (message.payload.email)
                ...

    ``conn`` is a SQLAlchemy ``AsyncConnection`` in an open transaction of the subscriber's
    database: lagompy commits the handler's writes **and** the message's position in it (or
    rolls both back), so a message redelivered after a crash finds its effect there or not at
    all (exactly-once effect). Never commit it yourself. A subscriber that calls entities
    gives each command :func:`~lagompy.topic.message_command_id` so that a redelivery is
    answered from the entity's stored replies.

    One consumer per (group, partition) handles messages at any time, whichever process or
    Ray actor runs it (a fenced lease, as for read sides); messages of a partition come in
    offset order, hence in order per entity.
    """

    group: ClassVar[str]
    topic: ClassVar[Topic[Any]]
    start_from: ClassVar[StartFrom] = StartFrom.earliest()

    async def prepare(self, conn: AsyncConnection) -> None:
        """Once per start, before any message, under the group's lease; retried with backoff
        until it succeeds, so make it idempotent (``CREATE TABLE IF NOT EXISTS``)."""

    async def handle(self, conn: AsyncConnection, message: Message[M]) -> None:
        """Write the effect of one message in ``conn``'s transaction."""
        raise NotImplementedError

    @classmethod
    def offset_key(cls) -> str:
        """The key of this group's positions: ``topic:<topic>:<group>``."""
        return offset_key(cls.topic.name, cls.group)

    @classmethod
    def validate(cls) -> None:
        """Raise ``ConfigurationError`` naming what is wrong with this subscriber class."""
        topic = getattr(cls, "topic", None)
        if not isinstance(topic, Topic):
            raise ConfigurationError(
                f"subscriber {cls.__qualname__} needs a topic (a lagompy.topic.Topic), "
                f"got {topic!r}"
            )
        _check_name(f"subscriber group of {cls.__qualname__}", getattr(cls, "group", None))
        if not isinstance(cls.start_from, StartFrom):
            raise ConfigurationError(
                f"subscriber {cls.__qualname__}: start_from must be a StartFrom, "
                f"got {cls.start_from!r}"
            )
        if cls.handle is Subscriber.handle:
            raise ConfigurationError(
                f"subscriber {cls.__qualname__} does not override handle(conn, message)"
            )
