"""What a read-side processor declares and implements: :class:`ReadSideProcessor` (its name,
tags and entities) and :class:`SqlReadSideProcessor` (its SQL hooks: ``global_prepare``,
``prepare``, ``handle`` or ``handle_batch``, ``reset``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.entity import PersistentEntity, ShardedTag, Tag
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import EventEnvelope
from lagompy.readside._store import GLOBAL_TAG
from lagompy.serialization import Serializer

__all__ = [
    "ProcessorArg",
    "ReadSideProcessor",
    "SqlReadSideProcessor",
    "serializer_for_processors",
]


class ReadSideProcessor:
    """What every read-side processor declares: ``name`` (the key of its offsets: renaming it
    starts from scratch), ``tag`` (a :func:`~lagompy.tag`, a :func:`~lagompy.sharded_tag`, whose
    shards get one worker each, or a tag name), and ``entities`` (the entity classes whose
    events it reads, for decoding). ``event_types``, when set, limits the events handed to the
    handlers (the others only move the offset); they are registered for decoding too."""

    name: ClassVar[str]
    tag: ClassVar[Tag | ShardedTag | str]
    entities: ClassVar[Sequence[type[PersistentEntity[Any, Any, Any]]]] = ()
    event_types: ClassVar[tuple[type, ...] | None] = None

    @classmethod
    def tags(cls) -> tuple[str, ...]:
        """The tags this processor reads: one worker each."""
        t = getattr(cls, "tag", None)
        if isinstance(t, (Tag, ShardedTag)):
            return t.all_tags
        if isinstance(t, str) and t:
            return (t,)
        raise ConfigurationError(
            f"read-side processor {cls.__qualname__} needs a tag: a tag(...), a "
            f"sharded_tag(...) or a tag name, got {t!r}"
        )

    @classmethod
    def validate(cls) -> None:
        """Raise ``ConfigurationError`` naming what is wrong with this processor class."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or len(name) > 255 or name == GLOBAL_TAG:
            raise ConfigurationError(
                f"read-side processor {cls.__qualname__} needs a name (a non-empty string of "
                f"at most 255 characters, its offset key), got {name!r}"
            )
        for t in cls.tags():
            if len(t) > 255 or t == GLOBAL_TAG:
                raise ConfigurationError(f"read-side processor {name!r}: unusable tag {t!r}")
        if cls.event_types is not None and not all(isinstance(t, type) for t in cls.event_types):
            raise ConfigurationError(
                f"read-side processor {name!r}: event_types must be a tuple of classes"
            )

    def wants(self, envelope: EventEnvelope[Any]) -> bool:
        types = self.event_types
        return types is None or isinstance(envelope.event, types)


class SqlReadSideProcessor(ReadSideProcessor):
    """A processor that writes a SQL projection in the projection database.

    Every hook gets ``conn``, a SQLAlchemy ``AsyncConnection`` inside an open transaction that
    lagompy commits (with the offset, for handlers) or rolls back: never commit it yourself.
    Override ``handle`` (one event) or ``handle_batch`` (the events of one transaction, for
    set-based writes such as executemany).

    ``keep_write_order``: when False (the default), the writes a batch's handlers make to
    different rows may go out in fewer runs than the order they were made in (writes to one
    row keep their order; see docs/readside.md, "How the writes of handle are batched"); True
    sends every write in the order it was made.
    """

    keep_write_order: ClassVar[bool] = False

    async def global_prepare(self, conn: AsyncConnection) -> None:
        """Once per start, before any handler, under the processor's lease; retried with
        backoff until it succeeds, so make it idempotent (``CREATE TABLE IF NOT EXISTS``)."""

    async def prepare(self, conn: AsyncConnection, tag: str) -> None:
        """Once per worker start for ``tag``, before its first handler (retried likewise)."""

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        """Write the effect of one event."""
        raise NotImplementedError

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[Any]]
    ) -> None:
        """Write the effect of several events, in offset order (default: ``handle`` each)."""
        for envelope in envelopes:
            await self.handle(conn, envelope)

    async def reset(self, conn: AsyncConnection) -> None:
        """Empty the projection before a rebuild (in the transaction that zeroes the offsets)."""
        raise ConfigurationError(
            f"read-side processor {self.name!r} defines no reset(conn): a rebuild needs it to "
            "empty the projection before replaying"
        )

    @classmethod
    def validate(cls) -> None:
        super().validate()
        base = SqlReadSideProcessor
        if cls.handle is base.handle and cls.handle_batch is base.handle_batch:
            raise ConfigurationError(
                f"read-side processor {cls.name!r} overrides neither handle(conn, envelope) "
                "nor handle_batch(conn, envelopes)"
            )

    @classmethod
    def batch_mode(cls) -> bool:
        return cls.handle_batch is not SqlReadSideProcessor.handle_batch

    @classmethod
    def can_reset(cls) -> bool:
        return cls.reset is not SqlReadSideProcessor.reset


ProcessorArg = type[SqlReadSideProcessor] | SqlReadSideProcessor


def _instance(processor: ProcessorArg) -> SqlReadSideProcessor:
    if isinstance(processor, type):
        if not issubclass(processor, SqlReadSideProcessor):
            raise ConfigurationError(
                f"{processor.__qualname__} is not a SqlReadSideProcessor subclass"
            )
        processor.validate()
        return processor()
    if not isinstance(processor, SqlReadSideProcessor):
        raise ConfigurationError(
            f"expected a SqlReadSideProcessor (class or instance), got {processor!r}"
        )
    type(processor).validate()
    return processor


def serializer_for_processors(processors: Iterable[ReadSideProcessor]) -> Serializer:
    """A serializer for the events of every processor: those of its ``entities``, and its
    ``event_types``."""
    from lagompy.journal._storage import serializer_for

    entities: list[type[PersistentEntity[Any, Any, Any]]] = []
    extra: list[type] = []
    for p in processors:
        if not p.entities and not p.event_types:
            raise ConfigurationError(
                f"read-side processor {p.name!r} declares no entities (the entity classes "
                "whose events it reads) and no event_types; declare them or pass serializer="
            )
        entities += [e for e in p.entities if e not in entities]
        extra += [t for t in p.event_types or () if t not in extra]
    serializer = serializer_for(entities)
    for t in extra:
        serializer.register(t)
    return serializer
