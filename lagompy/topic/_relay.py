"""Topics on a journal placed on several databases: the relay log.

A topic partition keeps one gap-free sequence of positions for its subscribers (the HTTP feed's
``after``, the broker's message id ``topic:partition:offset``, the groups' stored positions).
A journal placed on several databases has one offset sequence per database, and moving slices
gives the moved events new offsets: no journal offset can be a partition's position there. So
the producing service *relays* each partition into one log, in the home database::

    database home ── tag shard i ──▶ relay (topic, shard i, home) ──┐
    database b    ── tag shard i ──▶ relay (topic, shard i, b)    ──┼─▶ lagompy_topic_messages
                                                                    │   (topic, partition i,
                                                                    │    offsets 1, 2, 3...)
                                                                    └─ lagompy_topic_heads

* :class:`TopicRelay` is a read-side processor (one per topic, named ``topic-relay:<topic>``):
  the read side's workers run it per (tag shard, database) under their fenced leases, with
  their status, pause/resume and ``journal move-slices``' repositioning. Its handler maps each
  event with the topic's ``to_message`` (None: nothing is written, the position still moves)
  and inserts the messages into the home database's ``lagompy_topic_messages`` in the
  transaction that stores the relay's position: each message is relayed exactly once.
* Offsets are allocated by ``UPDATE lagompy_topic_heads ... RETURNING`` in that transaction:
  the row lock makes the next relay of the partition (another database's) wait for the commit,
  so offsets commit in order, without gaps, and a reader by offset never skips one.
* :class:`RelayLog` reads it (a :class:`~lagompy.topic._log.PartitionLog`, as
  :class:`~lagompy.topic._embedded.JournalLog` reads the tags of a journal on one database):
  the HTTP routes, embedded subscribers and the NATS producer read messages from whichever
  log their journal has, unchanged.

Per-key order holds: an entity's events are in one database at a time, and moving its slice
waits until every consumer of the source database, the relays included, has caught up.
The cost: one more write per message (and the relay's position), on placed journals only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import ConfigurationError, EventDecodeError
from lagompy.journal._journal import NOTIFY_CHANNEL, EventEnvelope, _collector_paused
from lagompy.journal._model import from_us, now_us
from lagompy.journal._placement import Placement
from lagompy.journal._tailing import JournalNotifier, Subscription, TailSettings, unsubscribe
from lagompy.readside._processor import SqlReadSideProcessor
from lagompy.serialization import Serializer
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database
from lagompy.topic._subscriber import offset_key, producer_key
from lagompy.topic._topic import Message, StartFrom, Topic
from lagompy.topic._transport import MessageBatch

__all__ = [
    "RELAY_PREFIX",
    "RelayFeed",
    "RelayLog",
    "TopicRelay",
    "refuse_journal_positions",
    "relay_for",
]

#: The read-side name of a topic's relay: ``topic-relay:<topic>``.
RELAY_PREFIX = "topic-relay:"

_messages = schema.topic_messages
_heads = schema.topic_heads
_new = object.__new__


class TopicRelay(SqlReadSideProcessor):
    """The relay of one topic (build it with :func:`relay_for`): a read-side processor of the
    topic's source tag whose handler writes the topic's messages into the relay log."""

    topic: Topic[Any]

    def __init__(self, topic: Topic[Any], placement: Placement | None = None) -> None:
        self.topic = topic
        self._serializer = topic.serializer()
        self._placement = placement

    async def global_prepare(self, conn: AsyncConnection) -> None:
        """The head row of every partition (0: nothing allocated yet). Two relays starting at
        once may both insert one: the loser's transaction fails and is retried."""
        topic = self.topic
        have = {
            row[0]
            for row in await conn.execute(
                select(_heads.c.partition).where(_heads.c.topic == topic.name)
            )
        }
        missing = [p for p in range(topic.partitions) if p not in have]
        if missing:
            await conn.execute(
                insert(_heads),
                [{"topic": topic.name, "partition": p, "last_offset": 0} for p in missing],
            )

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        await self.handle_batch(conn, [envelope])

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[Any]]
    ) -> None:
        """Map the events, allocate the messages' offsets per partition (in partition order:
        two relays never wait for each other's rows crosswise) and insert them."""
        topic = self.topic
        encode = self._serializer.encode
        database_of = self._placement.database_of if self._placement is not None else None
        rows: dict[int, list[dict[str, Any]]] = {}
        with _collector_paused():
            for envelope in envelopes:
                partition = topic.partition_of(envelope.entity_id)
                message = topic.message(envelope, partition)
                if message is None:
                    continue
                type_name, version, payload = encode(message.payload)
                rows.setdefault(partition, []).append(
                    {
                        "topic": topic.name,
                        "partition": partition,
                        "message_key": message.key,
                        "entity_type": envelope.entity_type,
                        "entity_id": envelope.entity_id,
                        "seq_nr": envelope.seq_nr,
                        "written_at_us": round(envelope.timestamp.timestamp() * 1_000_000),
                        "type_name": type_name,
                        "version": version,
                        "payload": payload,
                        "source_database": (
                            "" if database_of is None else database_of(envelope.entity_id)
                        ),
                        "source_offset": envelope.offset,
                    }
                )
        for partition in sorted(rows):
            batch = rows[partition]
            allocated = await conn.execute(
                update(_heads)
                .where(and_(_heads.c.topic == topic.name, _heads.c.partition == partition))
                .values(last_offset=_heads.c.last_offset + len(batch))
                .returning(_heads.c.last_offset)
            )
            last = allocated.scalar_one_or_none()
            if last is None:  # the head row went missing (a hand-made database): make it
                await conn.execute(
                    insert(_heads).values(
                        topic=topic.name, partition=partition, last_offset=len(batch)
                    )
                )
                last = len(batch)
            first = int(last) - len(batch) + 1
            for i, row in enumerate(batch):
                row["message_offset"] = first + i
            await conn.execute(insert(_messages), batch)
            await _wake_readers(conn, wake_tag(topic, partition))


def wake_tag(topic: Topic[Any], partition: int) -> str:
    """What a relay's commit names in its notification, and what readers of the partition's
    relay log listen for (not a journal tag: no event carries it)."""
    return f"{RELAY_PREFIX}{topic.name}:{partition}"


async def _wake_readers(conn: AsyncConnection, tag: str) -> None:
    """On PostgreSQL, NOTIFY the journal's channel naming ``tag``, delivered when the relay's
    transaction commits: the readers of the partition (their feeds subscribe to the process's
    LISTEN connection, as tag tailers do) read at once instead of at their next poll. SQLite
    has no NOTIFY: its readers poll (``TailSettings.poll_interval``)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": NOTIFY_CHANNEL, "payload": f"0\n{tag}"},
        )


def relay_for(topic: Topic[Any], placement: Placement | None = None) -> TopicRelay:
    """The relay of ``topic``: a :class:`TopicRelay` named ``topic-relay:<topic>`` that reads
    the topic's source tag (one worker per tag shard and database)."""
    cls: type[TopicRelay] = type(
        f"TopicRelay[{topic.name}]",
        (TopicRelay,),
        {
            "name": f"{RELAY_PREFIX}{topic.name}",
            "tag": topic.tag,
            "entities": (topic.source,),
            "__module__": __name__,
        },
    )
    cls.validate()
    relay: TopicRelay = cls(topic, placement)
    return relay


async def refuse_journal_positions(database: Database, topics: Sequence[Topic[Any]]) -> None:
    """Refuse to start the relays of topics that were published from this database while
    the journal was on it alone: their producer's and groups' positions there are journal
    offsets, which on a placed journal mean the relay log's offsets instead, so they would
    skip messages or take others for ones they have. Raises ``ConfigurationError`` naming
    them and the way through (docs/topics.md, "Placing a journal that publishes topics")
    when a topic's relay log has not started (no head row) and a producer or group of it
    in ``database`` holds a position past 0."""
    o = schema.readside_offsets.c
    found: list[str] = []
    async with database.read() as conn:
        for topic in topics:
            relayed = await conn.execute(
                select(func.count()).select_from(_heads).where(_heads.c.topic == topic.name)
            )
            if relayed.scalar():
                continue  # its relay log exists: positions are the log's already
            rows = await conn.execute(
                select(o.processor, o.tag, o.last_offset)
                .where(
                    (o.processor == producer_key(topic.name))
                    | o.processor.startswith(offset_key(topic.name, ""), autoescape=True),
                    o.last_offset > 0,
                )
                .order_by(o.processor, o.tag)
            )
            found += [f"{p} on {t} at {n}" for p, t, n in rows]
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ConfigurationError(
            "topics were published from this journal while it was on one database: "
            f"{shown} hold journal offsets, and on a journal placed on several a partition's "
            "positions are the relay log's, numbered anew. Set them to 0 (groups: lagompy "
            "topics reset TOPIC GROUP --to-offset 0; a broker's producer: delete the topic's "
            "stream, then lagompy projections set-offset topic-producer:TOPIC TAG 0 --force), "
            "start the relays with the writers stopped, then reset the groups --to-time the "
            "moment the writers stopped (see docs/topics.md, 'Placing a journal that "
            "publishes topics')"
        )


# --------------------------------------------------------------------------- reading


class RelayLog:
    """The messages of topics' partitions in the relay log of ``database`` (the home database
    of a placed journal): a :class:`~lagompy.topic._log.PartitionLog`."""

    def __init__(self, database: Database, *, tail: TailSettings | None = None) -> None:
        self.database = database
        self.tail = tail
        self._serializers: dict[str, Serializer] = {}

    def _serializer(self, topic: Topic[Any]) -> Serializer:
        serializer = self._serializers.get(topic.name)
        if serializer is None:
            serializer = self._serializers[topic.name] = topic.serializer()
        return serializer

    def feed(
        self, topic: Topic[Any], partition: int, *, tail: TailSettings | None = None
    ) -> RelayFeed:
        return RelayFeed(self, topic, partition, tail=tail or self.tail)

    async def read(self, topic: Topic[Any], partition: int, after: int, limit: int) -> MessageBatch:
        """Up to ``limit`` messages of the partition after ``after``, read now. Offsets commit
        in order (see the module), so what is read is a prefix: nothing below a message read
        can appear later. ``EventDecodeError`` for a payload that cannot be decoded."""
        topic.partition_tag(partition)
        m = _messages.c
        query = (
            select(
                m.message_offset,
                m.message_key,
                m.entity_type,
                m.entity_id,
                m.seq_nr,
                m.written_at_us,
                m.type_name,
                m.version,
                m.payload,
            )
            .where(and_(m.topic == topic.name, m.partition == partition, m.message_offset > after))
            .order_by(m.message_offset)
            .limit(limit)
        )
        async with self.database.read() as conn:
            rows = (await conn.execute(query)).all()
        decode = self._serializer(topic).decode
        messages: list[Message[Any]] = []
        with _collector_paused():
            for offset, key, etype, eid, seq_nr, us, type_name, version, payload in rows:
                try:
                    value = decode(type_name, version, payload)
                except Exception as exc:
                    if messages:
                        break  # the batch ends before it; the next read raises
                    raise EventDecodeError(
                        entity_type=etype,
                        entity_id=eid,
                        seq_nr=seq_nr,
                        type_name=type_name,
                        reason=f"topic {topic.name!r} partition {partition}'s message at "
                        f"offset {offset} (version {version}): {exc}",
                        offset=offset,
                    ) from exc
                message: Message[Any] = _new(Message)
                message.__dict__.update(
                    topic=topic.name,
                    payload=value,
                    key=key,
                    partition=partition,
                    offset=offset,
                    timestamp=from_us(us),
                    type_name=topic.type_name,
                    version=topic.version,
                    entity_type=etype,
                    entity_id=eid,
                    seq_nr=seq_nr,
                )
                messages.append(message)
        last = messages[-1].offset if messages else after
        return MessageBatch(messages, last, len(rows) >= limit and len(messages) == len(rows))

    async def position(self, topic: Topic[Any], partition: int, start: StartFrom) -> int:
        """Where a new group starts (see :meth:`MessageFeed.start_offset
        <lagompy.topic.MessageFeed.start_offset>`), in the partition's relay offsets."""
        if start.kind == "earliest":
            return 0
        if start.kind == "offset":
            assert start.offset is not None
            return start.offset
        before = None if start.time is None else start.time
        return await relay_position(self.database, topic.name, partition, before)

    async def lag(self, topic: Topic[Any], partition: int, after: int) -> tuple[int, int, float]:
        """(head, messages after ``after``, age in seconds of the oldest of them): offsets are
        gap-free, so the messages behind are the head minus the position."""
        m = _messages.c
        where = and_(m.topic == topic.name, m.partition == partition)
        async with self.database.read() as conn:
            head = int(
                (await conn.execute(select(func.max(m.message_offset)).where(where))).scalar() or 0
            )
            oldest = None
            if head > after:
                oldest = (
                    await conn.execute(
                        select(m.written_at_us).where(
                            and_(where, m.message_offset == literal(after + 1))
                        )
                    )
                ).scalar()
        seconds = 0.0 if oldest is None else max(0.0, (now_us() - int(oldest)) / 1_000_000)
        return head, max(0, head - after), seconds


async def relay_position(
    database: Database, topic: str, partition: int, before: datetime | None = None
) -> int:
    """The offset of the partition's last message in the relay log of ``database`` (0 if
    none), or of its last one whose event was written before ``before``."""
    m = _messages.c
    query = select(func.max(m.message_offset)).where(
        and_(m.topic == topic, m.partition == partition)
    )
    if before is not None:
        query = query.where(m.written_at_us < int(before.timestamp() * 1_000_000))
    async with database.read() as conn:
        return int((await conn.execute(query)).scalar() or 0)


async def relayed_partitions(database: Database, topic: str) -> int:
    """How many partitions of ``topic`` the relay log of ``database`` has (0: its journal
    relays nothing of it, a journal on one database say)."""
    h = _heads.c
    query = select(func.count()).select_from(_heads).where(h.topic == topic)
    async with database.read() as conn:
        return int((await conn.execute(query)).scalar() or 0)


class RelayFeed:
    """A :class:`~lagompy.topic.MessageFeed` of one partition, read from the relay log. After
    a short batch it waits for a relay's commit: on PostgreSQL its NOTIFY wakes the feed
    through the process's LISTEN connection (:class:`~lagompy.journal.JournalNotifier`, the
    tag tailers' own), with a safety-net poll every ``listen_poll_interval``; on SQLite (or
    with ``listen`` off, or while the connection is down) it polls every ``poll_interval``."""

    #: Reading acknowledges nothing: the consumer may read the next page while it commits.
    read_ahead = True

    def __init__(
        self,
        log: RelayLog,
        topic: Topic[Any],
        partition: int,
        *,
        tail: TailSettings | None = None,
    ) -> None:
        topic.partition_tag(partition)
        self.log = log
        self.topic = topic
        self.partition = partition
        self.settings = tail or TailSettings()
        self._woken = asyncio.Event()
        self._must_wait = False
        self._closed = False
        self._started = False
        self._notifier: JournalNotifier | None = None
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the relays' notifications (PostgreSQL with ``listen`` on)."""
        if self._started or self._closed:
            return
        self._started = True
        database = self.log.database
        if database.dialect != "postgresql" or not self.settings.listen:
            return
        notifier = await JournalNotifier.acquire(database, self.settings)
        if self._closed:
            await notifier.release()
            return
        self._notifier = notifier
        woken = self._woken
        self._subscription = notifier.subscribe(
            lambda _reason: woken.set(), wake_tag(self.topic, self.partition)
        )

    async def start_offset(self, start: StartFrom) -> int:
        return await self.log.position(self.topic, self.partition, start)

    async def lag(self, after: int) -> tuple[int, int, float]:
        return await self.log.lag(self.topic, self.partition, after)

    async def next_batch(self, after: int, limit: int) -> MessageBatch:
        self._woken.clear()
        batch = await self.log.read(self.topic, self.partition, after, limit)
        self._must_wait = not batch.full
        return batch

    async def wait(self, limit: float | None = None) -> None:
        if not self._must_wait or self._closed:
            return
        notifier = self._notifier
        interval = (
            self.settings.listen_poll_interval
            if notifier is not None and notifier.connected
            else self.settings.poll_interval
        )
        timeout = interval if limit is None else max(0.0, min(interval, limit))
        try:
            async with asyncio.timeout(timeout):
                await self._woken.wait()
        except TimeoutError:
            pass
        self._must_wait = False

    def wake(self) -> None:
        self._woken.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._woken.set()
        subscription, self._subscription = self._subscription, None
        notifier, self._notifier = self._notifier, None
        await unsubscribe(subscription, notifier)
