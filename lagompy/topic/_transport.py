"""The transport protocol: what carries a topic's messages from the journal to subscribers.

lagompy runs everything else: the subscriber's lease (one consumer per group and partition),
its stored position, its transactions (the handler's writes and the position, committed
together), retries, pause/resume, status. A transport only has to do two things::

    producing service                                   subscribing service
    ─────────────────                                   ───────────────────
    journal, tag shard i ── producer(topic, i) ──▶ (broker) ── feed(topic, i) ──▶ MessageBatch
                            may be nothing                      messages after a position

Three transports implement it:

* **embedded, same database** (``_embedded.py``): no producer; the feed reads the journal's
  tag directly (``Journal.read_tag``) and maps events to messages.
* **embedded over HTTP** (``_http.py``): no producer either; the producing service serves
  ``GET /topics/{name}/partitions/{p}?after=&limit=&wait=`` and the feed pulls from it through
  a :class:`~lagompy.service.ServiceClient`.
* **NATS JetStream** (``_nats.py``): the producer is a consumer-core worker per partition that
  publishes each page to the partition's subject; the feed is a pull consumer.

The contract each implementation must keep (``lagompy.testkit.topics`` checks it):

1. **Positions are journal offsets.** A message's ``offset`` is the journal offset of its
   source event; a subscriber's position is the offset of the last message (or filtered
   event) whose effect is committed. Every transport reports the same offsets for the same
   events, so a group can move from one transport to another. On a journal placed on several
   databases the position is the message's offset in its partition's relay log instead (one
   gap-free sequence per partition: see ``_relay.py``), the same for every transport again.
2. **Order.** A feed delivers a partition's messages in increasing offset order, each once
   per call: never a gap (a message the journal has, below the batch's ``last_offset``, that
   the batch lacks), never out of order. Redelivery of messages at or below a position is
   allowed (at-least-once); the subscriber side drops them.
3. **Filtered events advance.** ``MessageBatch.last_offset`` is the offset reached, which may
   be past the last message (events ``to_message`` filtered out, or whole pages of them):
   the subscriber stores it. A feed that cannot know (a broker that only carries messages)
   reports the last message's offset.
4. **The position is given back.** :meth:`MessageFeed.next_batch` gets ``after``, the
   subscriber's committed position: everything at or below it is done for good (a broker may
   acknowledge it then). ``after`` may move *back* (a transaction failed and is retried, or
   an operator set an offset) or jump forward: deliver from there either way.
5. **No silent end.** A feed whose source is unreachable raises from :meth:`next_batch`
   (the subscriber retries with backoff and shows ``stalled`` in its status); it never
   returns an empty batch for an error. A topic that a transport cannot serve raises
   ``ConfigurationError`` when the producer or the feed is made, never later.
6. **Producers are at least once, fenced, resumable.** A producer for (topic, partition)
   runs under the lease ``topic-producer:<topic>`` / partition tag (one active per
   partition), publishes in offset order with the message id ``Message.position``
   (``topic:partition:offset``) so a broker deduplicates re-publications, and resumes after
   the last offset the broker holds (the journal is the source of truth: a lost broker
   write is published again).

The protocol keeps the shape of the journal's own tail loop
(:class:`~lagompy.journal.PageTailer`: ``next_page``, then ``wait``), so that the consumer
core drives a feed exactly as it drives a journal tag: see ``_feed.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lagompy.topic._topic import Message, StartFrom, Topic

T = TypeVar("T")

__all__ = [
    "MessageBatch",
    "MessageFeed",
    "TopicProducer",
    "TopicTransport",
    "until_woken",
]


@dataclass(frozen=True)
class MessageBatch:
    """What one :meth:`MessageFeed.next_batch` returns."""

    #: The messages after the position, in increasing offset order (possibly none).
    messages: list[Message[Any]]
    #: The position the batch reaches: at least the last message's offset, and past the
    #: events filtered out after it when the feed knows of them; ``after`` when nothing new.
    last_offset: int
    #: True when more may follow at once (the batch was cut at ``limit``): the consumer asks
    #: again without waiting.
    full: bool


class MessageFeed(Protocol):
    """The messages of one partition of one topic, for one subscriber group, after a position.

    The consumer core calls, in a loop::

        await feed.start()
        batch = await feed.next_batch(after=position, limit=max_batch)
        ... handler writes + new position committed in one transaction ...
        await feed.wait(limit=seconds_until_the_lease_renewal)   # only after a short batch
        batch = await feed.next_batch(after=new_position, limit=max_batch)
        ...
        await feed.close()

    A feed is used by one task at a time, but for one exception: a feed whose
    :meth:`next_batch` has no side effect (it acknowledges nothing, as the embedded feeds)
    sets ``read_ahead = True``, and the consumer then asks for the batch after a full one
    while it commits that one (the next call's ``after`` is then the committed position only
    once the commit succeeded; the read-ahead batch is dropped if not). A broker feed that
    acknowledges in :meth:`next_batch` leaves it out (False).

    A feed may long-poll in :meth:`next_batch` or in :meth:`wait` (the HTTP feed long-polls
    in :meth:`wait`, bounded by its own setting; the embedded feed waits for
    the journal's NOTIFY there); either must return within a few seconds at most, since the
    consumer renews its lease between calls (its ``renew_interval``).
    """

    async def start(self) -> None:
        """Connect, subscribe... (called once, before the first batch)."""
        ...

    async def start_offset(self, start: StartFrom) -> int:
        """The position a group that has none yet starts from (messages *after* it are
        delivered): ``earliest``: 0; ``latest``: the offset of the partition's last event
        now (its head); ``offset``: that offset; ``time``: the offset of the partition's last
        event written before ``start.time`` (0 if none). Called once per partition, when a
        group starts for the first time, possibly before :meth:`start`."""
        ...

    async def next_batch(self, after: int, limit: int) -> MessageBatch:
        """Up to ``limit`` messages of the partition with an offset above ``after``, in offset
        order (see the module's contract: ``after`` is committed; it may move back).
        Raises when the source cannot be read (never an empty batch for an error)."""
        ...

    async def wait(self, limit: float | None = None) -> None:
        """After a batch that was not full: wait for new messages (a notification, a poll
        interval...) but at most ``limit`` seconds; return at once after a full batch, or
        if :meth:`wake` was called since the last :meth:`next_batch`."""
        ...

    def wake(self) -> None:
        """End the current (or next) :meth:`wait` at once."""
        ...

    # Optional, looked up by name: ``async def lag(after) -> (head, behind, seconds)``, the
    # partition's head offset, how many of its events follow ``after`` and the age of the
    # oldest of them: the subscribers' status shows it when a feed has it.

    async def close(self) -> None:
        """Release connections and subscriptions; a pending :meth:`wait` ends."""
        ...


class TopicProducer(Protocol):
    """The producing side of one partition, when a transport has one (a broker's): runs until
    :meth:`stop`, holding the partition's producer lease. A consumer-core
    :class:`~lagompy.consumer.EventConsumer` with a publishing commit strategy has exactly
    this shape."""

    async def run(self) -> None:
        """Publish the partition's messages until :meth:`stop` (retrying with backoff when the
        broker is unreachable)."""
        ...

    async def stop(self) -> None:
        """Ask :meth:`run` to end after its current publication; it releases the lease."""
        ...


class TopicTransport(Protocol):
    """Carries topics' messages from the producing service's journal to subscribers.

    ``kind`` names it in status and logs (``"embedded"``, ``"http"``, ``"nats"``). One
    transport object serves many topics; :meth:`close` releases what it opened (the broker
    connection...). Make the producers in the producing service and the feeds in each
    subscribing service: a transport object may be made in both, with different roles.
    """

    kind: str

    # A transport gets what its producers need (the journal to read, the store of their
    # leases and positions, the broker's address...) when it is built: the protocol's methods
    # take only the topic and the partition.

    def producer(self, topic: Topic[Any], partition: int) -> TopicProducer | None:
        """The producer of ``partition`` (None: this transport needs none, the embedded ones).
        Raise ``ConfigurationError`` at once when the topic cannot be served."""
        ...

    def feed(self, topic: Topic[Any], partition: int, *, group: str) -> MessageFeed:
        """A feed of ``partition`` for the subscriber group ``group`` (a broker may keep a
        durable consumer per group and partition; the position stays lagompy's). Raise
        ``ConfigurationError`` at once when the topic cannot be served."""
        ...

    async def close(self) -> None:
        """Close what the transport opened (after every producer and feed it made is done)."""
        ...


async def until_woken(work: Awaitable[T], woken: asyncio.Event) -> asyncio.Future[T]:
    """Run ``work`` until it ends or ``woken`` is set, whichever comes first (``work`` is then
    cancelled); returns its future, done or cancelled. An error of ``work`` is raised."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(woken.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return task
