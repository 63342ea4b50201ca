"""The embedded transport, same database: a subscriber reads the producing entity's tag in the
journal directly. No producer, no broker: the journal is the log.

:class:`JournalFeed` reads a partition's tag shard with the journal's own tail loop
(:class:`~lagompy.journal.PageTailer`: PostgreSQL's NOTIFY or a short poll on SQLite, so a
message reaches the subscriber milliseconds after its event committed) and maps each page's
events to messages (:meth:`Topic.message <lagompy.topic.Topic.message>`), made straight from the
decoded rows when the topic's key is the default (:meth:`Topic.message_maker
<lagompy.topic.Topic.message_maker>`); the batch's ``last_offset`` is the page's, past the events
``to_message`` filtered out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, select

from lagompy.journal._journal import Journal, TagPage, _collector_paused, backend_for
from lagompy.journal._tailing import PageTailer, TailSettings
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.topic._topic import Message, StartFrom, Topic
from lagompy.topic._transport import MessageBatch, MessageFeed

if TYPE_CHECKING:
    from lagompy.topic._log import PartitionLog

__all__ = [
    "EmbeddedTransport",
    "JournalFeed",
    "JournalLog",
    "partition_lag",
    "partition_position",
    "read_partition",
]


async def partition_position(database: Database, tag: str, start: StartFrom) -> int:
    """Where a new group starts on the journal tag ``tag`` (see
    :meth:`MessageFeed.start_offset <lagompy.topic.MessageFeed.start_offset>`)."""
    if start.kind == "earliest":
        return 0
    if start.kind == "offset":
        assert start.offset is not None
        return start.offset
    tg, ev = schema.event_tags, schema.events
    query = select(func.max(tg.c.global_offset)).where(tg.c.tag == tag)
    if start.kind == "time":
        assert start.time is not None
        before_us = int(start.time.timestamp() * 1_000_000)
        query = query.join(ev, ev.c.global_offset == tg.c.global_offset).where(
            ev.c.written_at_us < before_us
        )
    async with database.read() as conn:
        # Not past a writer still in flight: its events, committed after the group started,
        # are the group's (PostgreSQL; see JournalBackend.visible). Asked before the query.
        bound = await backend_for(database).visible(conn)
        head = int((await conn.execute(query)).scalar() or 0)
    return head if bound is None else min(head, bound[0])


async def partition_lag(database: Database, tag: str, after: int) -> tuple[int, int, float]:
    """(head, events behind, age in seconds of the oldest of them) of position ``after`` on
    the journal tag ``tag``: the read side's measure of lag."""
    from lagompy.readside._projections import _journal_lag

    return await _journal_lag(database, tag, after)


def batch_of(
    topic: Topic[Any], partition: int, page: TagPage, *, made: bool = False
) -> MessageBatch:
    """A page of the partition's tag as a batch of messages (filtered events left out):
    ``made``, a page of messages already (:meth:`Journal.read_tag_made
    <lagompy.journal.Journal.read_tag_made>` with the topic's :meth:`Topic.message_maker`);
    else made of its envelopes with the collector paused as the journal decodes its pages (see
    ``_collector_paused``)."""
    if made:
        return MessageBatch(cast(list[Message[Any]], page.envelopes), page.last_offset, page.full)
    with _collector_paused():
        messages = topic.messages(page.envelopes, partition)
    return MessageBatch(messages, page.last_offset, page.full)


async def read_partition(
    journal: Journal, topic: Topic[Any], partition: int, after: int, limit: int
) -> MessageBatch:
    """One batch of the partition after ``after``, read now (the HTTP route's read)."""
    tag = topic.partition_tag(partition)
    make = topic.message_maker(partition)
    if make is None:
        page = await journal.read_tag(tag, after_offset=after, limit=limit)
    else:
        page = await journal.read_tag_made(tag, make, after_offset=after, limit=limit)
    if page.error is not None and not page.envelopes and page.last_offset <= after:
        raise page.error
    return batch_of(topic, partition, page, made=make is not None)


class JournalFeed:
    """A :class:`~lagompy.topic.MessageFeed` of one partition, read from the journal."""

    #: Reading acknowledges nothing: the consumer may read the next page while it commits.
    read_ahead = True

    def __init__(
        self,
        journal: Journal,
        topic: Topic[Any],
        partition: int,
        *,
        tail: TailSettings | None = None,
    ) -> None:
        self.journal = journal
        self.topic = topic
        self.partition = partition
        self.tag = topic.partition_tag(partition)
        self._tail = tail or TailSettings()
        self._tailer: PageTailer | None = None
        #: The tailer's pages are messages, made from the rows (None: envelopes).
        self._make = topic.message_maker(partition)

    def _tailer_for(self, limit: int) -> PageTailer:
        if self._tailer is None:
            self._tailer = PageTailer(
                self.journal, tag=self.tag, page_size=limit, settings=self._tail, make=self._make
            )
        return self._tailer

    async def start(self) -> None:
        """Subscribes to the journal's wake-ups (NOTIFY on PostgreSQL)."""

    async def start_offset(self, start: StartFrom) -> int:
        return await partition_position(self.journal.database, self.tag, start)

    async def lag(self, after: int) -> tuple[int, int, float]:
        """(head, events behind, age in seconds of the oldest of them) of ``after``."""
        return await partition_lag(self.journal.database, self.tag, after)

    async def next_batch(self, after: int, limit: int) -> MessageBatch:
        tailer = self._tailer_for(limit)
        await tailer.start()
        if limit != tailer.page_size:  # another page size than the first call's: read it now
            return await read_partition(self.journal, self.topic, self.partition, after, limit)
        page = await tailer.next_page(after)
        if page.error is not None and not page.envelopes and page.last_offset <= after:
            raise page.error  # the next event cannot be decoded: retried, then stalled
        return batch_of(self.topic, self.partition, page, made=self._make is not None)

    async def wait(self, limit: float | None = None) -> None:
        if self._tailer is not None:
            await self._tailer.wait(limit)

    def wake(self) -> None:
        if self._tailer is not None:
            self._tailer.wake()

    async def close(self) -> None:
        if self._tailer is not None:
            await self._tailer.close()


class JournalLog:
    """The messages of topics' partitions read from the journal's tags (a journal on one
    database): a :class:`~lagompy.topic._log.PartitionLog` whose positions are journal
    offsets."""

    def __init__(self, journal: Journal, *, tail: TailSettings | None = None) -> None:
        self.journal = journal
        self.database = journal.database
        self.tail = tail

    def feed(
        self, topic: Topic[Any], partition: int, *, tail: TailSettings | None = None
    ) -> JournalFeed:
        return JournalFeed(self.journal, topic, partition, tail=tail or self.tail)

    async def read(self, topic: Topic[Any], partition: int, after: int, limit: int) -> MessageBatch:
        return await read_partition(self.journal, topic, partition, after, limit)

    async def position(self, topic: Topic[Any], partition: int, start: StartFrom) -> int:
        return await partition_position(self.database, topic.partition_tag(partition), start)

    async def lag(self, topic: Topic[Any], partition: int, after: int) -> tuple[int, int, float]:
        return await partition_lag(self.database, topic.partition_tag(partition), after)


class EmbeddedTransport:
    """Topics carried by the producing service's database, for subscribers in it: no
    producer, and feeds of its :class:`~lagompy.topic._log.PartitionLog`: the journal's tags
    (:class:`JournalFeed`), or on a journal placed on several databases the relay log (give
    ``log``, see ``_relay.py``)."""

    kind = "embedded"

    def __init__(
        self,
        journal: Journal,
        *,
        tail: TailSettings | None = None,
        log: PartitionLog | None = None,
    ) -> None:
        self.journal = journal
        self.tail = tail
        self.log: PartitionLog = log if log is not None else JournalLog(journal, tail=tail)

    def producer(self, topic: Topic[Any], partition: int) -> None:
        topic.partition_tag(partition)  # a partition out of range fails here
        return None

    def actor_spec(self) -> dict[str, Any]:
        """A subscriber actor on Ray reads the journal of its own journal settings."""
        return {"kind": "embedded"}

    def feed(self, topic: Topic[Any], partition: int, *, group: str) -> MessageFeed:
        return self.log.feed(topic, partition, tail=self.tail)

    async def close(self) -> None:
        """Nothing to close: the journal belongs to whoever opened it."""
