"""One :class:`SubscriberWorker` per (subscriber group, partition): the consumer core fed by a
transport's :class:`~lagompy.topic.MessageFeed`, committing like a read side.

The worker is an :class:`~lagompy.consumer.EventConsumer` (fenced lease, stored position, catch
up then live, backoff, stalls, pause/resume, status) whose pages come from the feed
(:class:`FeedPages` turns a :class:`~lagompy.topic.MessageBatch` into the page the core
expects) and whose commit strategy is the read side's
:class:`~lagompy.readside._worker.ProjectionCommit`: the subscriber's writes and the position
in one transaction of the subscriber's database, fenced by the lease's epoch (exactly-once
effect), a failing message retried ``max_attempts`` times then ``on_failure`` (stop, skip or
park: a parked message keeps its JSON form in ``lagompy_parked``, since HTTP and NATS messages
are not in this database's journal, and an operator's retry decodes it from there).
The positions live in the read side's offset table, under ``topic:<topic>:<group>`` and the
partition's tag, so pause, resume, skip and set-offset work as for read sides.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.consumer import EventConsumer, Membership
from lagompy.errors import ConfigurationError
from lagompy.journal._journal import TagPage
from lagompy.journal._model import EventEnvelope
from lagompy.readside._parked import ConsumerKind, ParkedEvent
from lagompy.readside._processor import SqlReadSideProcessor
from lagompy.readside._settings import ReadSideSettings
from lagompy.readside._store import OffsetStore
from lagompy.readside._worker import ProjectionCommit, default_owner, describe_error
from lagompy.sql._database import Database
from lagompy.topic._codec import message_from_json, message_to_json
from lagompy.topic._subscriber import Subscriber
from lagompy.topic._topic import Message, Topic
from lagompy.topic._transport import MessageBatch, MessageFeed

log = logging.getLogger("lagompy.topic")

__all__ = [
    "FeedPages",
    "ParkedMessages",
    "SubscriberProcessor",
    "SubscriberWorker",
    "processor_for",
]


class ParkedMessages:
    """A subscriber's :class:`~lagompy.readside._worker.ParkedSource`: a parked message keeps
    its JSON form (the topic codec's), decoded again for a retry."""

    kind: ConsumerKind = "subscriber"

    def __init__(self, topic: Topic[Any], partition: int) -> None:
        self.topic = topic
        self.partition = partition

    def event_type(self, envelope: EventEnvelope[Any]) -> str | None:
        return cast(Message[Any], envelope).type_name

    def message_of(self, envelope: EventEnvelope[Any]) -> str | None:
        return json.dumps(message_to_json(cast(Message[Any], envelope)))

    async def envelope_of(self, row: ParkedEvent) -> EventEnvelope[Any]:
        if row.message is None:
            raise ConfigurationError(
                f"the message at offset {row.offset} could not be decoded when it was parked: "
                "there is nothing to retry; discard it (or set the group's offset back)"
            )
        message = message_from_json(self.topic, json.loads(row.message), partition=self.partition)
        return cast(EventEnvelope[Any], message)


class FeedPages:
    """A :class:`~lagompy.topic.MessageFeed` as the consumer core's page source. The page's
    "envelopes" are the messages themselves: a :class:`~lagompy.topic.Message` has every
    attribute the read side's commit strategy reads of an envelope (``offset``,
    ``entity_type``, ``entity_id``, ``seq_nr``, ``timestamp``), and
    :class:`SubscriberProcessor` hands it on as it is (wrapping each message in an envelope
    cost a tenth of a catch-up's time)."""

    def __init__(self, feed: MessageFeed, page_size: int, reading: str) -> None:
        self.feed = feed
        self.page_size = page_size
        #: What a failing read was doing, as the status says it (see ``PageSource``).
        self.reading = reading
        self._started = False
        #: A feed that acknowledges nothing may be read ahead (see MessageFeed.read_ahead).
        self._read_ahead = bool(getattr(feed, "read_ahead", False))
        #: The batch after a full page, read while that page commits: (task, its after).
        self._ahead: tuple[asyncio.Future[MessageBatch], int] | None = None

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.feed.start()

    async def next_page(self, after: int) -> TagPage:
        await self.start()  # a catch-up reads without starting its source
        batch = await self._batch(after)
        messages = batch.messages
        if messages and messages[0].offset <= after:  # redelivered: done already
            messages = [m for m in messages if m.offset > after]
        last = max(batch.last_offset, messages[-1].offset if messages else after)
        envelopes = cast(list[EventEnvelope[Any]], messages)
        if self._read_ahead and batch.full and last > after:
            ahead = asyncio.ensure_future(self.feed.next_batch(last, self.page_size))
            self._ahead = (ahead, last)
        return TagPage(envelopes, last, len(envelopes), batch.full)

    async def _batch(self, after: int) -> MessageBatch:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            task, at = ahead
            if at == after:
                return await task  # its error, if it failed, is the read's
            await self._drop(task)  # the position moved otherwise (a failure, a set-offset)
        return await self.feed.next_batch(after, self.page_size)

    @staticmethod
    async def _drop(task: asyncio.Future[MessageBatch]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def wait(self, limit: float | None = None) -> None:
        if self._ahead is not None:
            return  # the next batch is on its way already: no wait before it
        await self.feed.wait(limit)

    def wake(self) -> None:
        self.feed.wake()

    async def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await self._drop(ahead[0])
        await self.feed.close()


class SubscriberProcessor(SqlReadSideProcessor):
    """A subscriber as the read side's commit strategy sees it: ``prepare`` is its
    ``global_prepare``, each envelope's event is a message for its ``handle``."""

    subscriber: Subscriber[Any]

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await self.subscriber.prepare(conn)

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        # The "envelope" is a Message (see FeedPages).
        await self.subscriber.handle(conn, cast(Message[Any], envelope))


def processor_for(subscriber: Subscriber[Any]) -> SubscriberProcessor:
    """The processor of one subscriber instance (named by its offset key, one tag per
    partition)."""
    cls = type(subscriber)
    cls.validate()
    processor_cls = type(
        f"{cls.__name__}Processor",
        (SubscriberProcessor,),
        {"name": cls.offset_key(), "tag": cls.topic.tag, "__module__": __name__},
    )
    processor: SubscriberProcessor = processor_cls()
    processor.subscriber = subscriber
    # The subscriber's own method, called where the commit strategy calls the processor's
    # (the same arguments: the "envelope" is the message), one coroutine per message less.
    processor.handle = subscriber.handle  # type: ignore[method-assign,assignment]
    return processor


class SubscriberWorker(EventConsumer):
    """Runs one subscriber group on one partition of its topic (see the module's docs).
    :meth:`run` goes on until :meth:`stop`; :meth:`catch_up` handles what the feed has now."""

    settings: ReadSideSettings
    store: OffsetStore
    strategy: ProjectionCommit

    def __init__(
        self,
        processor: SubscriberProcessor,
        partition: int,
        feed: MessageFeed,
        *,
        database: Database,
        settings: ReadSideSettings,
        owner: str | None = None,
        membership: Membership | None = None,
    ) -> None:
        topic = processor.subscriber.topic
        store = OffsetStore(database)
        super().__init__(
            processor.name,
            topic.partition_tag(partition),
            journal=None,
            store=store,
            strategy=ProjectionCommit(
                processor, database, store, settings, ParkedMessages(topic, partition)
            ),
            settings=settings,
            owner=owner or default_owner(),
            kind="subscriber",
            describe_error=describe_error,
            logger=log,
            pages=lambda: FeedPages(
                feed, settings.max_batch, f"reading topic {topic.name!r} partition {partition}"
            ),
            membership=membership,
        )
        self.processor = processor
        self.partition = partition
        self.feed = feed
