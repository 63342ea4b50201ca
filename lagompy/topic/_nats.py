"""The NATS JetStream transport: topics published to a broker that other services (in any
language) read.

::

    producing service                        NATS JetStream                 subscribing service
    journal tag shard i ─▶ NatsProducer ─▶ stream <prefix>_<topic> ─▶ NatsFeed ─▶ handle + position
       (consumer core, lease             subject <prefix>.<topic>.<i>     (pull consumer of the
        topic-producer:<topic>)          message id topic:i:offset         subject, its own)

**Producer** (:class:`NatsProducer`, one per partition, run by :func:`start_producers`): an
:class:`~lagompy.consumer.EventConsumer` over the partition's journal tag whose commit strategy
publishes each page's messages, written by lagompy as one run of commands with their answers
awaited on one inbox (:mod:`lagompy.topic._nats_publish`; nats-py's ``publish_async`` where its
private parts differ), at most ``max_in_flight`` unacknowledged per connection, waits for every
acknowledgement, then stores the position. The
message id ``topic:partition:offset`` makes a re-publication a duplicate the stream drops (within
its ``duplicate_window``). Under a fresh lease it resumes after the offset in the *last message the
broker holds* on its subject, not after its own stored position: the journal is the source of
truth, and a message a crashed broker lost (its file store does not fsync every write) is
published again. Headers carry the offset, key, entity, sequence number, time, message type and
version; the body is the payload in the topic's encoding (a MessagePack map of its JSON form by
default, or that JSON: :mod:`lagompy.topic._codec`), named by the ``Content-Type`` header.

**Feed** (:class:`NatsFeed`, one per subscriber group and partition): the position is lagompy's,
stored with the subscriber's writes. The feed positions a pull consumer of its own (ephemeral,
named ``<group>_<partition>_<random>``, removed by the server after ``inactive_threshold``) at the
first stream message whose offset is above that position (a binary search over the stream's
sequence with ``next_by_subj`` lookups), and again whenever the position moves somewhere the
consumer is not (an operator's set-offset, a rollback) or the consumer failed (a broker
restart). Messages at or below the position are dropped. It acknowledges (``AckPolicy.ALL``) the
last message the subscriber committed. Its inbox's messages go from the connection's parser
straight to it (:mod:`lagompy.topic._nats_wire`: a read of lagompy's own messages split at them
in one call of the regex engine and handed over in columns, decoded a column at a time; other
reads a match per message), not through nats-py's message objects, queue and callback; the feed
keeps what it fetched in lists that it hands out and drops by slices. A
subscription that stops delivering while its subject has newer messages (pull subscriptions can
after a reconnect) is found by a check every ``stall_check`` seconds of silence, reported (the
subscriber's status shows the error) and re-positioned.

Measured here (nats-server 2.9.10, loopback, 2026-12-07, docs/benchmarks.md): producers
publishing the journal 34,000-42,000 messages/s, 1.3-1.6 times nats-py's ``publish_async`` of
the same messages at the same in-flight bound; a new group's catch-up of 100,000 messages
through a feed 105,000-132,000/s, about twice nats-py reading the same messages and doing
nothing with them, 0.53-0.60 of reading and decoding the same events from the journal.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from lagompy.consumer import EventConsumer, Lease, Membership
from lagompy.consumer._core import PageSource
from lagompy.errors import (
    ConfigurationError,
    EventDecodeError,
    JournalUnavailable,
    LeaseLost,
    ReadSideDecodeFailed,
    ReadSideHandlerFailed,
    TopicError,
    TopicMessageInvalid,
)
from lagompy.journal._journal import EventEnvelope, Journal, TagPage, _collector_paused
from lagompy.journal._tailing import PageTailer
from lagompy.readside._settings import ReadSideSettings
from lagompy.readside._store import OffsetStore
from lagompy.readside._worker import default_owner, membership_for
from lagompy.settings import LagompySettings, make_settings
from lagompy.topic._codec import encode_payloads
from lagompy.topic._log import PartitionLog
from lagompy.topic._nats_publish import Publications, fits, unacknowledged
from lagompy.topic._nats_wire import (
    Sink,
    _client_class,
    _header_block,
    _headers,
    _marker_headers,
    _offset_of,
    _own_offsets,
    _Received,
    _Run,
    _time_of,
    decode_batch,
    decode_run,
    header_block,
)
from lagompy.topic._subscriber import producer_key
from lagompy.topic._topic import Message, StartFrom, Topic
from lagompy.topic._transport import MessageBatch, until_woken
from lagompy.topic._worker import FeedPages

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext
    from nats.js.api import RawStreamMsg, StreamInfo

log = logging.getLogger("lagompy.topic")

__all__ = [
    "BrokerSettings",
    "NatsFeed",
    "NatsProducer",
    "NatsTransport",
    "producer_name",
]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class BrokerSettings(LagompySettings):
    """Where topics go when a broker carries them: the NATS JetStream transport's settings
    (environment: ``LAGOMPY_BROKER_*``)::

    BrokerSettings()                                   # LAGOMPY_BROKER_URL, else none
    BrokerSettings(url="nats://127.0.0.1:4222")
    """

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_BROKER_", frozen=True, extra="forbid")

    url: str | None = Field(
        default=None,
        description="The NATS server(s) (nats://host:port, several separated by commas). None: "
        "no broker (topics use the embedded transport).",
    )
    stream_prefix: str = Field(
        default="lagompy",
        description="Streams are named <prefix>_<topic>, subjects <prefix>.<topic>.<partition>.",
    )
    max_in_flight: int = Field(
        default=1000, ge=1, le=100_000, description="Unacknowledged publications per process."
    )
    ack_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a producer waits for the broker's acks (and for one to free a "
        "slot of max_in_flight); a page not acknowledged within them is published again.",
    )
    duplicate_window: float = Field(
        default=120.0, gt=0, description="Seconds the stream remembers message ids (dedup)."
    )
    long_poll: float = Field(
        default=2.0, gt=0, le=30, description="Seconds a caught-up feed waits in one fetch."
    )
    stall_check: float = Field(
        default=5.0,
        gt=0,
        description="Seconds of silence after which a feed checks that its subject has "
        "nothing newer (a pull subscription that stopped is re-positioned).",
    )
    connect_timeout: float = Field(default=2.0, gt=0, description="Seconds per connection try.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or not all(s.startswith(("nats://", "tls://")) for s in servers):
            raise ValueError("must be nats://host:port (or tls://), several separated by commas")
        return value

    @field_validator("stream_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or not set(value) <= _NAME_CHARS:
            raise ValueError("must be letters, digits, '-' or '_'")
        return value


def producer_name(topic: Topic[Any]) -> str:
    """The name of a topic's producers in the offset store (one row per partition)."""
    return producer_key(topic.name)


def _fresh_in_order(offsets: list[int], pos: int) -> bool:
    """Whether the (non-empty) ``offsets`` of an arrival are all above the feed's position
    ``pos``, each above the one before: the usual arrival, with no redelivery or repeat."""
    return offsets[0] > pos and sorted(set(offsets)) == offsets


def _broker_error(doing: str, error: BaseException) -> TopicError:
    """A broker failure as callers see it: what was being done and the error's class (never
    the server's address)."""
    return TopicError(f"{doing}: the broker failed ({type(error).__name__})")


# --------------------------------------------------------------------------- names and headers


def stream_name(prefix: str, topic: Topic[Any]) -> str:
    return f"{prefix}_{topic.name.replace('.', '_')}"


def subject(prefix: str, topic: Topic[Any], partition: int) -> str:
    return f"{prefix}.{topic.name}.{partition}"


def _wholly_created(info: StreamInfo) -> bool:
    """Whether a stream-info or stream-create answer shows the stream with its store (see
    :meth:`_Link._settled`): nats-server sends Go's zero time (year 1) as the creation time of
    a stream it is still creating. A server that sends no creation time is taken at its word."""
    return info.created is None or info.created.year > 1


def _seq(msg: RawStreamMsg) -> int:
    assert msg.seq is not None  # the server gives every stored message its sequence
    return msg.seq


class _Link:
    """One NATS connection of a transport, opened on first use, reconnecting on its own."""

    def __init__(self, settings: BrokerSettings) -> None:
        if settings.url is None:
            raise ConfigurationError(
                "the NATS transport needs a broker URL (BrokerSettings(url=...) or "
                "LAGOMPY_BROKER_URL=nats://host:port)"
            )
        self.settings = settings
        self.servers = [s.strip() for s in settings.url.split(",") if s.strip()]
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._streams: set[str] = set()
        #: Streams this link saw wholly created (see :meth:`_settled`).
        self._settled_streams: set[str] = set()
        self._closing = False
        #: Counts the reconnections: a broker that restarted may have lost what it
        #: acknowledged last, and the consumers it had (its pull requests certainly).
        self.generation = 0
        self._listeners: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()
        #: The connection's publications, written by lagompy (None: a nats-py without the
        #: parts they need, whose ``publish_async`` producers use instead).
        self.publications: Publications | None = None

    async def js(self) -> JetStreamContext:
        if self._js is not None:
            if self._nc is not None and not self._nc.is_connected:
                # Fail at once rather than after a request's timeout: the caller retries
                # with backoff, and shows stalled from max_attempts on.
                raise TopicError("the NATS broker cannot be reached (reconnecting)")
            return self._js
        async with self._lock:
            if self._js is None:

                async def error(e: Exception) -> None:
                    # Each reconnection attempt reports here: the disconnection said it once.
                    log.debug("NATS connection: %s", type(e).__name__)

                async def disconnected() -> None:
                    if not self._closing:
                        log.warning("NATS connection lost; reconnecting")

                async def reconnected() -> None:
                    log.info("NATS connection back")
                    self.generation += 1
                    # A restarted broker may have lost a stream another process creates anew.
                    self._settled_streams.clear()
                    for event in list(self._listeners):
                        event.set()

                nc = _client_class()()
                try:
                    # nats-py retries the first connection as often as a reconnection
                    # (forever here): bound it, so that a broker down at start is an error.
                    async with asyncio.timeout(self.settings.connect_timeout * 2):
                        await nc.connect(
                            servers=self.servers,
                            # Seconds, as floats (nats-py's hints say int; it awaits them).
                            connect_timeout=self.settings.connect_timeout,  # type: ignore[arg-type]
                            max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5,  # type: ignore[arg-type]
                            allow_reconnect=True,
                            error_cb=error,
                            disconnected_cb=disconnected,
                            reconnected_cb=reconnected,
                        )
                except BaseException as e:
                    with contextlib.suppress(Exception):
                        await nc.close()
                    if not isinstance(e, Exception):
                        raise
                    raise TopicError(
                        f"the NATS broker cannot be reached ({type(e).__name__})"
                    ) from None
                publications = None
                if fits(nc):
                    publications = Publications(nc, self.settings.max_in_flight)
                    try:
                        await publications.start()
                    except Exception as e:
                        with contextlib.suppress(Exception):
                            await nc.close()
                        raise _broker_error("subscribing to the broker's answers", e) from None
                self._nc = nc
                self.publications = publications
                self._closing = False
                self._js = nc.jetstream(
                    timeout=self.settings.ack_timeout,
                    publish_async_max_pending=self.settings.max_in_flight,
                )
        assert self._js is not None
        return self._js

    def listen(self, event: asyncio.Event) -> None:
        """Set ``event`` at every reconnection."""
        self._listeners.add(event)

    async def client(self) -> NatsClient:
        """The connection (opened on first use)."""
        await self.js()
        assert self._nc is not None
        return self._nc

    async def subscribe(self, sink: Sink) -> tuple[Any, str]:
        """A subscription of a fresh inbox whose messages go to ``sink`` (see
        :func:`_client_class`), and the inbox."""
        nc = cast(Any, await self.client())
        sinks: dict[int, Sink] | None = getattr(nc, "sinks", None)
        if sinks is None:  # a nats-py without the hooks (see _sinks_fit): its callback

            async def deliver(msg: Any) -> None:
                sink([_Received((msg.headers, msg.data, msg.reply, None))])

            sub = await nc.subscribe(nc.new_inbox(), cb=deliver)
            return sub, sub.subject
        sub = await nc.subscribe(nc.new_inbox())
        sinks[sub._id] = sink
        return sub, sub.subject

    async def unsubscribe(self, sub: Any) -> None:
        nc = cast(Any, self._nc)
        if nc is not None:
            nc.sinks.pop(sub._id, None)
        await sub.unsubscribe()

    async def ack(self, reply: str) -> None:
        """Acknowledge a message of a pull consumer, given its reply subject (what nats-py's
        ``Msg.ack`` sends)."""
        nc = await self.client()
        await nc.publish(reply)

    async def ensure_stream(self, topic: Topic[Any]) -> str:
        """Create the topic's stream if it is missing (idempotent); its name."""
        from nats.js import api
        from nats.js.errors import BadRequestError

        name = stream_name(self.settings.stream_prefix, topic)
        if name in self._streams:
            return name
        js = await self.js()
        subjects = [f"{self.settings.stream_prefix}.{topic.name}.*"]
        try:
            info = await js.add_stream(
                name=name,
                subjects=subjects,
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                duplicate_window=self.settings.duplicate_window,
            )
        except BadRequestError:
            info = await js.stream_info(name)  # exists with another configuration
            if list(info.config.subjects or []) != subjects:
                raise ConfigurationError(
                    f"topic {topic.name!r}: the broker's stream {name!r} has subjects "
                    f"{info.config.subjects!r}, not {subjects!r}"
                ) from None
        except Exception as e:
            raise _broker_error(f"topic {topic.name!r}: creating its stream", e) from None
        if _wholly_created(info):
            self._settled_streams.add(name)
        self._streams.add(name)
        return name

    def forget(self, name: str) -> None:
        """The stream may have gone (a broker that lost its store): create it again."""
        self._streams.discard(name)
        self._settled_streams.discard(name)

    async def _settled(self, stream: str) -> bool:
        """Whether ``stream`` exists, once it is wholly created: the guard that every
        message-get of this link passes first (false: there is no stream, hence no message).

        nats-server 2.9.10 crashes (a nil pointer in ``jsMsgGetRequest``, jetstream_api.go
        line 3028) on a message-get that reaches a stream another client is still creating:
        ``addStreamWithAssignment`` lists the stream before ``setupStore`` gives it its store,
        and the handler reads the store without a check. A second creator of the same stream
        gets its answer in that window too, so two producers starting at once on a new topic
        crashed it (``bench/nats_stream_race_probe.py``: 4 clients, stream after stream, dead
        after 16-519 streams through raw nats-py, 81-896 through these calls unguarded).

        ``setupStore`` sets the stream's creation time and its store under one hold of the
        stream's lock, and the stream-info and stream-create answers read that time under the
        lock: a creation time that is not zero (Go's zero time, year 1) proves the store is
        there. So a stream this link has not seen so is asked for its info until it is; a
        stream-create answer that says so spares the question (the usual case: the stream
        existed, or this link created it). Once per stream and connection, never per message.
        The probe through these calls then ran 8,475-10,580 streams (120-180 s) and lived.

        What no answer tells: a stream whose store the server failed to create (the probe's,
        near 10,000 kept streams, out of file descriptors) has its creation time until the
        server drops it, and a message-get in between still crashes 2.9.10."""
        if stream in self._settled_streams:
            return True
        from nats.js.errors import NotFoundError

        js = await self.js()
        give_up = time.monotonic() + self.settings.ack_timeout
        while True:
            try:
                info = await js.stream_info(stream)
            except NotFoundError:
                return False
            if _wholly_created(info):
                self._settled_streams.add(stream)
                return True
            if time.monotonic() > give_up:
                raise TopicError(
                    f"the broker's stream {stream!r} is still being created after "
                    f"{self.settings.ack_timeout:g} s"
                )
            await asyncio.sleep(0.005)

    async def last_message(self, stream: str, subj: str) -> RawStreamMsg | None:
        from nats.js.errors import NotFoundError

        if not await self._settled(stream):
            return None
        js = await self.js()
        try:
            return await js.get_last_msg(stream, subj)
        except NotFoundError:
            return None

    async def next_message(self, stream: str, subj: str, seq: int) -> RawStreamMsg | None:
        """The first message of ``subj`` at or after stream sequence ``seq``."""
        from nats.js.errors import NotFoundError

        if not await self._settled(stream):
            return None
        js = await self.js()
        try:
            return await js.get_msg(stream, seq=max(1, seq), subject=subj, next=True)
        except NotFoundError:
            return None

    async def seek(
        self, stream: str, subj: str, after: Callable[[RawStreamMsg], bool]
    ) -> tuple[int, RawStreamMsg | None]:
        """The stream sequence of the first message of ``subj`` for which ``after`` holds
        (``after`` must be monotone along the subject: false, then true), with that message;
        past the stream's end (and None) when there is none. A binary search: about
        log2(messages) lookups."""
        js = await self.js()
        # The stream's end first: a message of the subject written after it is the subject's
        # last (or before it), so either the search sees it or it lies past the end.
        end = (await js.stream_info(stream)).state.last_seq
        last = await self.last_message(stream, subj)
        if last is None or not after(last):
            return max(end, 0 if last is None else _seq(last)) + 1, None
        first = await self.next_message(stream, subj, 1)
        assert first is not None  # the subject has a last message
        if after(first):
            return _seq(first), first
        lo, hi = _seq(first) + 1, _seq(last)
        while lo < hi:
            mid = (lo + hi) // 2
            probe = await self.next_message(stream, subj, mid)
            if probe is None or after(probe):
                hi = mid
            else:
                lo = _seq(probe) + 1
        return lo, await self.next_message(stream, subj, lo)

    async def close(self) -> None:
        self._closing = True
        self._settled_streams.clear()
        nc, self._nc, self._js = self._nc, None, None
        publications, self.publications = self.publications, None
        if publications is not None:
            publications.close()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()


# --------------------------------------------------------------------------- the producer


class _Publish:
    """The producer's :class:`~lagompy.consumer.CommitStrategy`: publish a page's messages,
    wait for the broker's acks, then store the position (at least once, deduplicated by
    message id)."""

    def __init__(
        self,
        link: _Link,
        topic: Topic[Any],
        partition: int,
        store: OffsetStore,
        settings: ReadSideSettings,
        *,
        message_of: Callable[[EventEnvelope[Any], int], Message[Any] | None] | None = None,
    ) -> None:
        self.link = link
        self.topic = topic
        #: The message of a page's envelope: the topic's mapping of an event, or the message
        #: itself (a log's pages carry messages).
        self.message_of = message_of or topic.message
        self.partition = partition
        self.store = store
        self.settings = settings
        self.subject = subject(link.settings.stream_prefix, topic, partition)
        self.stream = stream_name(link.settings.stream_prefix, topic)
        #: The stored position when the lease was taken: events up to it that cannot be
        #: mapped or decoded were skipped by an operator before (or got past) and stay skipped.
        self._stored = 0
        #: Messages published (acknowledged) by this producer.
        self.published = 0
        #: The connection's generation when the producer last resumed from the broker.
        self.generation = -1

    async def prepare(self, consumer: EventConsumer, lease: Lease, *, clear_stall: bool) -> None:
        self._stored = lease.offset
        self.generation = self.link.generation
        self.link.forget(self.stream)
        await self.link.ensure_stream(self.topic)
        try:
            last = await self.link.last_message(self.stream, self.subject)
        except TopicError:
            raise
        except Exception as e:
            raise _broker_error(f"topic {self.topic.name!r}: reading its last message", e) from None
        held = 0 if last is None else _offset_of(last)
        if held != lease.offset:
            log.info(
                "%s: the broker holds up to offset %d, the stored position is %d: resuming "
                "after %d",
                consumer.where(),
                held,
                lease.offset,
                held,
            )
        async with self.store.database.write() as conn:
            flags = await self.store.commit(
                conn,
                lease,
                held,
                self.settings.lease_ttl,
                state="preparing",
                clear_failure=clear_stall,
            )
        consumer.moved(held, clear_stall, flags)

    async def commit(
        self, consumer: EventConsumer, lease: Lease, page: TagPage, *, ignore_pause: bool
    ) -> None:
        if consumer.flags.hold and not ignore_pause:
            return
        js = await self.link.js()
        pending: list[asyncio.Future[Any]] = []
        reached = consumer.offset
        messages: list[Message[Any]] = []
        failed: tuple[EventEnvelope[Any], Exception] | None = None
        for envelope in page.envelopes:
            try:
                message = self.message_of(envelope, self.partition)
            except Exception as e:
                if envelope.offset <= self._stored:
                    continue  # skipped before
                failed = (envelope, e)  # what comes before it is published first
                break
            reached = envelope.offset
            if message is not None:
                messages.append(message)
        try:
            payloads = encode_payloads(self.topic, [m.payload for m in messages])
            marker = None
            published_to = messages[-1].offset if messages else consumer.offset
            if failed is None and page.last_offset > published_to:
                at = page.envelopes[-1].timestamp if page.envelopes else datetime.now(UTC)
                marker = _marker_headers(self.topic, self.partition, page.last_offset, at)
            await self._publish(js, messages, payloads, marker, pending)
            if failed is not None:
                if reached > consumer.offset:
                    await self._store(consumer, lease, reached)
                envelope, error = failed
                await self._stop_at(consumer, lease, envelope.offset, envelope, error)
                raise AssertionError("unreachable")
        except (TopicError, LeaseLost, JournalUnavailable, ReadSideHandlerFailed):
            raise
        except Exception as e:
            raise _broker_error(f"topic {self.topic.name!r}: publishing", e) from None
        finally:
            for f in pending:
                f.cancel()
        await self._store(consumer, lease, page.last_offset)

    async def _publish(
        self,
        js: JetStreamContext,
        messages: list[Message[Any]],
        payloads: list[bytes],
        marker: dict[str, str] | None,
        pending: list[asyncio.Future[Any]],
    ) -> None:
        """Publish the messages (and the position ``marker``, when there is one) and wait
        until the broker acknowledged every one: through the link's own publications (see
        :mod:`lagompy.topic._nats_publish`), or nats-py's ``publish_async`` (``pending``: its
        futures, the caller's to cancel) where they cannot run."""
        media_type = self.topic.media_type
        stamps: dict[Any, str] = {}
        publications = self.link.publications
        if publications is not None:
            blocks = [_header_block(m, media_type, stamps) for m in messages]
            bodies = list(payloads)
            if marker is not None:
                blocks.append(header_block(marker))
                bodies.append(b"")
            if blocks:
                timeout = self.link.settings.ack_timeout
                try:
                    streams = await publications.publish(self.subject, blocks, bodies, timeout)
                except TopicError as e:
                    raise TopicError(f"topic {self.topic.name!r}: {e}") from None
                self._stored_by(streams)
            return
        from nats.js.errors import TooManyStalledMsgsError

        publish = js.publish_async
        # A stalled broker holds every pending slot: without ``wait_stall`` the page would
        # wait for a free one for as long as the stall lasts. Given only when no slot is free
        # (nats-py then waits for one): with a timeout, its ``wait_for`` makes a task and a
        # timer for every message, slot free or not.
        slots = getattr(js, "_publish_async_pending_semaphore", None)
        timeout = self.link.settings.ack_timeout

        def stall() -> float | None:
            return timeout if slots is None or slots.locked() else None

        try:
            for message, data in zip(messages, payloads, strict=True):
                headers = _headers(message, media_type, stamps)
                pending.append(
                    await publish(self.subject, data, headers=headers, wait_stall=stall())
                )
            if marker is not None:
                pending.append(await publish(self.subject, b"", headers=marker, wait_stall=stall()))
        except TooManyStalledMsgsError:
            raise self._unacknowledged(pending) from None
        await self._settle(pending)

    def _unacknowledged(self, pending: list[asyncio.Future[Any]]) -> TopicError:
        """What ``publish_async``'s futures not acknowledged within ``ack_timeout`` fail the
        page with (cancelled ones included: the wait for them ended)."""
        unanswered = sum(f.cancelled() or not f.done() for f in pending)
        error = unacknowledged(unanswered, len(pending), self.link.settings.ack_timeout)
        return TopicError(f"topic {self.topic.name!r}: {error}")

    def _stored_by(self, streams: list[str]) -> None:
        """Count acknowledged messages, each stored by the topic's stream."""
        for stream in set(streams):
            if stream != self.stream:
                raise TopicError(
                    f"topic {self.topic.name!r}: subject {self.subject!r} is stored by stream "
                    f"{stream!r}, not {self.stream!r}"
                )
        self.published += len(streams)

    async def _settle(self, pending: list[asyncio.Future[Any]]) -> None:
        if not pending:
            return
        try:
            acks = await asyncio.wait_for(
                asyncio.gather(*pending), timeout=self.link.settings.ack_timeout
            )
        except TimeoutError:
            raise self._unacknowledged(pending) from None
        except Exception as e:
            raise _broker_error(f"topic {self.topic.name!r}: publishing", e) from None
        self._stored_by([ack.stream for ack in acks])
        pending.clear()

    async def _store(self, consumer: EventConsumer, lease: Lease, offset: int) -> None:
        if offset <= consumer.offset:
            return
        clear = consumer.passes_failure(offset)
        async with self.store.database.write() as conn:
            flags = await self.store.commit(
                conn,
                lease,
                offset,
                self.settings.lease_ttl,
                events_per_s=consumer.committed(0),
                clear_failure=clear,
            )
        consumer.moved(offset, clear, flags)

    async def _stop_at(
        self,
        consumer: EventConsumer,
        lease: Lease,
        offset: int,
        envelope: Any,
        error: BaseException,
    ) -> None:
        kind = (
            ReadSideDecodeFailed if isinstance(error, EventDecodeError) else ReadSideHandlerFailed
        )
        failure = kind(
            f"{consumer.where()}: the event at offset {offset} cannot be published: "
            f"{type(error).__name__}: {error}",
            processor=consumer.name,
            tag=consumer.tag,
            offset=offset,
            entity_type=getattr(envelope, "entity_type", None),
            entity_id=getattr(envelope, "entity_id", None),
            seq_nr=getattr(envelope, "seq_nr", None),
            attempts=1,
        )
        consumer.failures += 1
        consumer.last_error = str(failure)
        log.error("%s", failure)
        flags = await self.store.record_failure(
            lease,
            error=str(failure),
            offset=offset,
            entity_type=failure.entity_type,
            entity_id=failure.entity_id,
            seq_nr=failure.seq_nr,
            attempts=1,
            state="failed",
        )
        consumer.failed_at(offset, flags)
        consumer.state = "failed"
        raise failure from error

    async def undecodable(
        self, consumer: EventConsumer, lease: Lease, error: EventDecodeError
    ) -> None:
        offset = error.offset
        assert offset is not None
        if offset <= self._stored:
            await self._store(consumer, lease, offset)  # skipped before
            return
        await self._stop_at(consumer, lease, offset, error, error)

    async def idle(self, consumer: EventConsumer, lease: Lease) -> None:
        """Nothing waits for the producer's lease holder."""

    async def hand_over(self, consumer: EventConsumer, lease: Lease) -> None:
        """Nothing runs under the lease between two batches."""


def _as_message(envelope: EventEnvelope[Any], partition: int) -> Message[Any] | None:
    """A log's page entry as it is: a message (see ``FeedPages``)."""
    return cast(Message[Any], envelope)


class _Watched:
    """The producer's journal tailer, watching the broker's connection too: once it has been
    re-established, the producer starts over from the broker's last message (a restarted
    broker may have lost messages it had acknowledged) instead of waiting for new events."""

    def __init__(self, tailer: PageSource, strategy: _Publish) -> None:
        self.tailer = tailer
        self.strategy = strategy
        self._reconnected = asyncio.Event()
        strategy.link.listen(self._reconnected)

    async def start(self) -> None:
        await self.tailer.start()

    async def next_page(self, after: int) -> TagPage:
        return await self.tailer.next_page(after)

    async def wait(self, limit: float | None = None) -> None:
        self._reconnected.clear()
        if self.strategy.generation == self.strategy.link.generation:
            await until_woken(self.tailer.wait(limit), self._reconnected)
        if self.strategy.generation not in (-1, self.strategy.link.generation):
            raise TopicError(
                f"topic {self.strategy.topic.name!r}: the broker connection was re-established; "
                "resuming after the broker's last message"
            )

    def wake(self) -> None:
        self.tailer.wake()

    async def close(self) -> None:
        await self.tailer.close()


class NatsProducer(EventConsumer):
    """Publishes one partition of a topic to JetStream (see the module's docs): a consumer of
    the partition's journal tag named :func:`producer_name`, whose status, pause, resume and
    skip are those of the offset store's rows in the journal's database."""

    strategy: _Publish

    def __init__(
        self,
        link: _Link,
        topic: Topic[Any],
        partition: int,
        *,
        journal: Journal,
        settings: ReadSideSettings,
        owner: str | None = None,
        membership: Membership | None = None,
        messages: PartitionLog | None = None,
    ) -> None:
        store = OffsetStore(journal.database)
        self.offsets = store
        tag = topic.partition_tag(partition)
        pages: Callable[[], PageSource]
        if messages is None:
            strategy = _Publish(link, topic, partition, store, settings)

            def pages() -> PageSource:
                tailer = PageTailer(
                    journal, tag=tag, page_size=settings.max_batch, settings=settings.tail
                )
                return _Watched(tailer, strategy)
        else:
            # The log's pages carry messages already (FeedPages): published as they are.
            strategy = _Publish(link, topic, partition, store, settings, message_of=_as_message)

            def pages() -> PageSource:
                feed = messages.feed(topic, partition, tail=settings.tail)
                return _Watched(FeedPages(feed, settings.max_batch, "reading the log"), strategy)

        super().__init__(
            producer_name(topic),
            topic.partition_tag(partition),
            journal=journal,
            store=store,
            strategy=strategy,
            settings=settings,
            owner=owner or default_owner(),
            membership=membership,
            kind="topic producer",
            describe_error=lambda e: f"{type(e).__name__}: {e}",
            logger=log,
            pages=pages,
        )
        self.topic = topic
        self.partition = partition
        #: The log it publishes when not the journal's tag (a placed journal's relay log).
        self.messages = messages

    @property
    def published(self) -> int:
        return self.strategy.published

    async def run(self) -> None:
        await self.offsets.ensure(self.name, [self.tag])
        await super().run()


# --------------------------------------------------------------------------- the feed


class NatsFeed:
    """A :class:`~lagompy.topic.MessageFeed` of one partition, pulled from JetStream (see the
    module's docs).

    It reads with a standing pull request (``batch`` messages, expiring after a few long
    polls) on an inbox subscription of its own: the broker sends each message as soon as it is
    stored, so a live message costs no round trip, and a request for the next batch goes out
    once half of one has arrived. The connection hands the inbox's messages to the feed as its
    parser reads them (:func:`_sink_run`), without nats-py's message objects, queue and
    callback. (nats-py's ``fetch`` waits for a whole batch or its
    timeout, which put a floor of that timeout under every message's lag.)"""

    #: Messages asked for per pull request.
    PULL = 1000

    def __init__(self, link: _Link, topic: Topic[Any], partition: int, *, group: str) -> None:
        topic.partition_tag(partition)  # out of range: ConfigurationError now
        self.link = link
        self.topic = topic
        self.partition = partition
        self.group = group
        prefix = link.settings.stream_prefix
        self.stream = stream_name(prefix, topic)
        self.subject = subject(prefix, topic, partition)
        safe_group = "".join(c if c in _NAME_CHARS else "-" for c in group)[:80]
        self._consumer_prefix = f"{safe_group}_{partition}"
        self._consumer: str | None = None
        self._inbox: Any = None
        self._reply_to = ""
        self._next_subject = ""
        #: Broker messages arrived (from the connection's parser), not yet looked at: runs
        #: of lagompy's own messages, and messages of other forms.
        self._incoming: deque[_Run | _Received] = deque()
        self._arrived = asyncio.Event()
        link.listen(self._arrived)
        self._generation = link.generation
        #: Messages the current pull request may still bring (0: none is outstanding), and
        #: when it expires.
        self._outstanding = 0
        self._request_until = 0.0
        #: The consumer is gone (a status said so): position again.
        self._lost: str | None = None
        #: (offset, error) of a message that does not fit the topic: the feed stops before it.
        self._bad: tuple[int, TopicMessageInvalid] | None = None
        #: What was fetched above the committed position, in offset order, from ``_head`` on:
        #: the offsets, the messages (None for a position marker) and the reply subjects to
        #: acknowledge them with, in three lists, and how many markers they hold (see
        #: :meth:`next_batch`).
        self._offsets: list[int] = []
        self._messages: list[Message[Any] | None] = []
        self._replies: list[str] = []
        self._head = 0
        self._markers = 0
        #: The committed position the feed knows of, and the highest offset it fetched.
        self._base = 0
        self._pos = 0
        self._positioned = False
        self._handed = 0
        self._woken = asyncio.Event()
        self._silent_since = time.monotonic()
        #: Subscriptions found stopped and re-positioned.
        self.restarts = 0

    def where(self) -> str:
        return f"topic {self.topic.name!r} partition {self.partition} (group {self.group!r})"

    async def start(self) -> None:
        """Nothing until the first batch: the consumer is made under the group's lease."""

    async def start_offset(self, start: StartFrom) -> int:
        if start.kind == "earliest":
            return 0
        if start.kind == "offset":
            assert start.offset is not None
            return start.offset
        try:
            await self.link.ensure_stream(self.topic)
            if start.kind == "latest":
                last = await self.link.last_message(self.stream, self.subject)
                return 0 if last is None else _offset_of(last)
            assert start.time is not None
            when = start.time
            _, first = await self.link.seek(
                self.stream, self.subject, lambda m: _time_of(dict(m.headers or {})) >= when
            )
        except (TopicError, ConfigurationError):
            raise
        except Exception as e:
            raise _broker_error(f"{self.where()}: finding where to start", e) from None
        if first is not None:
            return max(0, _offset_of(first) - 1)
        last = await self.link.last_message(self.stream, self.subject)
        return 0 if last is None else _offset_of(last)

    async def lag(self, after: int) -> tuple[int, int, float]:
        """(head, messages behind, age in seconds of the oldest of them) of ``after``, as the
        broker sees it: the head is the offset of the subject's last message; the count comes
        from a consumer made for the question at the first message above ``after`` (its
        pending count), then deleted."""

        try:
            last = await self.link.last_message(self.stream, self.subject)
            head = 0 if last is None else _offset_of(last)
            if head <= after:
                return head, 0, 0.0
            seq, first = await self.link.seek(
                self.stream, self.subject, lambda m: _offset_of(m) > after
            )
            if first is None:
                return head, 0, 0.0
            js = await self.link.js()
            name = f"{self._consumer_prefix}_lag_{uuid.uuid4().hex[:8]}"
            info = await js.add_consumer(self.stream, self._config(name, seq, reading=False))
            with contextlib.suppress(Exception):
                await js.delete_consumer(self.stream, name)
        except (TopicError, ConfigurationError):
            raise
        except Exception as e:
            raise _broker_error(f"{self.where()}: reading its lag", e) from None
        age = time.time() - _time_of(dict(first.headers or {})).timestamp()
        return head, int(info.num_pending or 0), max(0.0, round(age, 3))

    # ------------------------------------------------------------------ the consumer

    def _config(self, name: str, seq: int, *, reading: bool) -> Any:
        """A consumer of the partition's subject from stream sequence ``seq``: the feed's own
        (``reading``: acknowledged as committed, removed a minute after its last pull), or one
        made only to count what follows (no acks, removed after 5 s)."""
        from nats.js import api

        acks: dict[str, Any] = (
            {"ack_policy": api.AckPolicy.ALL, "ack_wait": 300.0, "max_ack_pending": 100_000}
            if reading
            else {"ack_policy": api.AckPolicy.NONE}
        )
        return api.ConsumerConfig(
            name=name,
            filter_subject=self.subject,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=seq,
            inactive_threshold=60.0 if reading else 5.0,
            **acks,
        )

    async def _drop_consumer(self) -> None:
        inbox, name, self._inbox, self._consumer = self._inbox, self._consumer, None, None
        self._outstanding = 0
        self._incoming.clear()
        if inbox is not None:
            with contextlib.suppress(Exception):
                await self.link.unsubscribe(inbox)
        if name is not None:
            with contextlib.suppress(Exception):
                js = await self.link.js()
                await js.delete_consumer(self.stream, name)

    async def _position(self, after: int) -> None:
        """A fresh pull consumer from the first message above ``after``, and a fresh inbox
        (nothing a former request still sends can reach the new position)."""

        await self._drop_consumer()
        self._forget_fetched()
        self._positioned = False
        self._lost = None
        await self.link.ensure_stream(self.topic)
        seq, _ = await self.link.seek(self.stream, self.subject, lambda m: _offset_of(m) > after)
        name = f"{self._consumer_prefix}_{uuid.uuid4().hex[:10]}"
        js = await self.link.js()
        await js.add_consumer(self.stream, self._config(name, seq, reading=True))
        self._consumer = name
        self._inbox, self._reply_to = await self.link.subscribe(self._received)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}"
        self._base = self._pos = after
        self._positioned = True
        self._silent_since = time.monotonic()
        log.info("%s: reading from stream sequence %d (after offset %d)", self.where(), seq, after)

    def _forget_fetched(self) -> None:
        self._offsets, self._messages, self._replies = [], [], []
        self._head = self._markers = 0

    def _fetched(self) -> int:
        """How many fetched messages are above the committed position."""
        return len(self._offsets) - self._head

    def _drop_committed(self, after: int) -> str | None:
        """Drop the fetched messages at or below ``after`` (committed); the reply subject of
        the last of them, to acknowledge (with ``AckPolicy.ALL``, the ones before it too)."""
        offsets, head = self._offsets, self._head
        if head == len(offsets) or offsets[head] > after:
            return None
        cut = bisect.bisect_right(offsets, after, head)
        if self._markers:
            self._markers -= sum(1 for m in self._messages[head:cut] if m is None)
        committed = self._replies[cut - 1]
        if cut * 2 > len(offsets):  # the lists' front is dropped once it is most of them
            del offsets[:cut], self._messages[:cut], self._replies[:cut]
            cut = 0
        self._head = cut
        return committed

    def _received(self, msgs: _Run | list[_Received]) -> None:
        """The inbox subscription's sink: a run of messages, or a status ending the request
        (alone: see :data:`Sink`)."""
        if isinstance(msgs, _Run):
            self._incoming.append(msgs)
            self._outstanding = max(0, self._outstanding - len(msgs))
            self._arrived.set()
            return
        msg = msgs[0]
        headers = msg[0]
        if headers is None:  # messages without a header block (lagompy's come as a _Run)
            self._incoming.extend(msgs)
            self._outstanding = max(0, self._outstanding - len(msgs))
            self._arrived.set()
            return
        status = headers.get("Status") if headers else None  # (none with lagompy's block)
        if status is None or msg[1]:
            self._incoming.append(msg)
            self._outstanding = max(0, self._outstanding - 1)
        elif status == "100":  # an idle heartbeat
            return
        else:  # 404/408: the request ended; 409: it was cut; 503: no consumer any more
            self._outstanding = 0
            description = (headers or {}).get("Description", "")
            if status == "503" or "Deleted" in description:
                self._lost = f"status {status} {description}".strip()
        self._arrived.set()

    async def _request(self) -> None:
        """Keep a pull request outstanding (a reconnection loses the ones there were), and
        ask for the next batch once half of the current one has arrived: the broker sends it
        while the subscriber handles what came (asked only when all had arrived, the broker
        waited for each request, 2026-12-06)."""
        now = time.monotonic()
        live = now < self._request_until and self._generation == self.link.generation
        if live and self._outstanding > self.PULL // 2:
            return
        self._generation = self.link.generation
        expires = max(1.0, self.link.settings.long_poll * 5)
        nc = await self.link.client()
        await nc.publish(
            self._next_subject,
            json.dumps({"batch": self.PULL, "expires": int(expires * 1e9)}).encode(),
            reply=self._reply_to,
        )
        self._outstanding = (self._outstanding if live else 0) + self.PULL
        self._request_until = now + expires + 1.0

    async def _take(self) -> None:
        """Move the arrived messages into the buffer (decoded, in order, without repeats).
        A message that does not fit the topic stops the taking there: the ones before it are
        delivered, then :meth:`next_batch` raises its error until the position moves past it
        (an operator's set-offset): nothing after it is taken meanwhile, so nothing is
        skipped."""
        if self._bad is not None:
            return
        pos = self._pos
        items = list(self._incoming)
        self._incoming.clear()  # (what arrives while a redelivery is acked waits there)
        if not items:
            return
        runs = [item for item in items if isinstance(item, _Run)]
        if len(runs) == len(items):
            run = runs[0] if len(runs) == 1 else _Run.joined(runs)
            if self._take_run(run):
                return
            items = [run]
        arrived: list[_Received] = []
        for item in items:
            if isinstance(item, _Run):
                arrived += item
            else:
                arrived.append(item)
        own = _own_offsets(arrived)
        # The usual run: lagompy's own messages (never position markers), each above the last.
        own_run = own is not None and _fresh_in_order(own, pos)
        if own is not None and own_run:
            offsets, fresh = own, arrived
        else:
            offsets, fresh = await self._fresh(arrived)
        if not fresh:
            return
        try:
            with _collector_paused():
                messages = decode_batch(self.topic, self.partition, fresh, self.where())
        except (TopicMessageInvalid, ValidationError):
            messages = []
            for offset, msg in zip(offsets, fresh, strict=True):
                try:
                    one = decode_batch(self.topic, self.partition, [msg], self.where())
                except (TopicMessageInvalid, ValidationError) as e:
                    text = str(e).removeprefix(f"{self.where()}, offset {offset}: ")
                    self._bad = (
                        offset,
                        TopicMessageInvalid(f"{self.where()}, offset {offset}: {text}"),
                    )
                    self._incoming.clear()
                    break
                messages += one
            offsets, fresh = offsets[: len(messages)], fresh[: len(messages)]
        markers = 0 if own_run else sum(1 for m in messages if m is None)
        if offsets:
            self._offsets += offsets
            self._messages += messages
            self._replies += [m[2] for m in fresh]
            self._markers += markers
            self._pos = offsets[-1]
        self._silent_since = time.monotonic()

    def _take_run(self, run: _Run) -> bool:
        """:meth:`_take` of the usual arrival, a run of lagompy's own messages each above the
        last, decoded by columns (:func:`decode_run`); False, with nothing taken, for any
        other (a redelivery, an offset or a value that does not read: :meth:`_take` then
        goes message by message)."""
        offsets = run.offsets()
        if offsets is None or not _fresh_in_order(offsets, self._pos):
            return False
        with _collector_paused():
            messages = decode_run(self.topic, self.partition, run, offsets)
        if messages is None:
            return False
        self._offsets += offsets
        self._messages += messages
        self._replies += run.replies
        self._pos = offsets[-1]
        self._silent_since = time.monotonic()
        return True

    async def _fresh(self, arrived: list[_Received]) -> tuple[list[int], list[_Received]]:
        """The offsets and messages of ``arrived`` above the fetched position, in order
        (redeliveries at or below the committed position acknowledged); when reading one
        fails, the ones not taken go back to the front of the incoming queue."""
        pos, base = self._pos, self._base
        offsets: list[int] = []
        fresh: list[_Received] = []
        msg = None
        try:
            for msg in arrived:
                own = msg[3]
                offset = _offset_of(msg) if own is None else int(own[1])
                if offset <= pos:
                    if offset <= base:
                        await self.link.ack(msg[2])  # committed already: a redelivery
                    continue
                offsets.append(offset)
                fresh.append(msg)
                pos = offset
        except BaseException:
            # Taken again next time: the ones before the failing message, and those after.
            after = next(i for i, m in enumerate(arrived) if m is msg) + 1
            self._incoming.extendleft(reversed(fresh + arrived[after:]))
            raise
        return offsets, fresh

    # ------------------------------------------------------------------ the feed

    async def next_batch(self, after: int, limit: int) -> MessageBatch:
        self._woken.clear()
        self._arrived.clear()
        try:
            if self._lost is not None:
                self.restarts += 1
                lost, self._lost = self._lost, None
                self._positioned = False
                raise TopicError(f"{self.where()}: the broker's consumer is gone ({lost})")
            if self._bad is not None and after >= self._bad[0]:
                self._bad = None  # moved past it (an operator's set-offset)
            if not self._positioned or after < self._base or after > self._pos:
                await self._position(after)
            committed = self._drop_committed(after)
            if committed is not None:
                await self.link.ack(committed)
            self._base = after
            await self._take()
            if self._bad is not None and not self._fetched():
                raise self._bad[1]
            await self._request()
        except TopicMessageInvalid:
            raise  # stays positioned before the message: raised again until moved past it
        except (TopicError, ConfigurationError):
            self._positioned = False
            raise
        except Exception as e:
            self._positioned = False
            raise _broker_error(f"{self.where()}: reading", e) from None
        head, fetched = self._head, self._fetched()
        if not self._markers:  # the usual case: a slice (a loop per message was 5-6% of a
            # catch-up's samples, 2026-12-07)
            handed = min(fetched, limit)
            messages = cast(list[Message[Any]], self._messages[head : head + handed])
            last = self._offsets[head + handed - 1] if handed else after
        else:
            messages = []
            last = after
            handed = 0
            for offset, message in zip(self._offsets[head:], self._messages[head:], strict=True):
                if message is not None:
                    if len(messages) == limit:
                        break
                    messages.append(message)
                last = offset
                handed += 1
        self._handed = handed
        full = fetched > handed or len(messages) == limit
        return MessageBatch(messages, last, full)

    async def wait(self, limit: float | None = None) -> None:
        """Until messages arrive (the standing pull request brings them as they are stored),
        at most ``limit`` and ``long_poll`` seconds; :meth:`wake` ends it at once."""
        if (
            self._woken.is_set()
            or self._incoming
            or self._fetched() > self._handed
            or not self._positioned
        ):
            return
        settings = self.link.settings
        seconds = settings.long_poll if limit is None else max(0.0, min(settings.long_poll, limit))
        if seconds <= 0.001:
            return
        arrived = asyncio.ensure_future(self._arrived.wait())
        woken = asyncio.ensure_future(self._woken.wait())
        try:
            await asyncio.wait(
                [arrived, woken], timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            arrived.cancel()
            woken.cancel()
        if not self._incoming and time.monotonic() - self._silent_since >= settings.stall_check:
            await self._check_stall()

    async def _check_stall(self) -> None:
        """Silence for ``stall_check`` seconds: is the subject really quiet?"""
        self._silent_since = time.monotonic()
        try:
            last = await self.link.last_message(self.stream, self.subject)
        except Exception:
            self._positioned = False
            return
        if last is not None and _offset_of(last) > self._pos and not self._incoming:
            self.restarts += 1
            self._positioned = False
            log.warning(
                "%s: the subscription delivered nothing while the subject holds offset %d "
                "(above %d): subscribing again (restart %d)",
                self.where(),
                _offset_of(last),
                self._pos,
                self.restarts,
            )

    def wake(self) -> None:
        self._woken.set()

    async def close(self) -> None:
        self._woken.set()
        await self._drop_consumer()


# --------------------------------------------------------------------------- the transport


class NatsTransport:
    """Topics carried by NATS JetStream (see the module's docs)::

        transport = NatsTransport(BrokerSettings(url="nats://127.0.0.1:4222"), journal=journal)

    ``journal``: the producing service's journal (producers read it and keep their positions in
    its database); a service that only subscribes gives none. ``messages``: where the producers
    read the messages, when not the journal's tags: on a journal placed on several databases,
    the relay log of its home database (``journal``), which
    :class:`~lagompy.topic.TopicsComponent` gives (see ``_relay.py``). ``settings``: the producers'
    consumer settings (page size, leases; default :class:`~lagompy.readside.ReadSideSettings`).
    With ``settings.rebalance`` (the default) the producing processes of a topic share its
    partitions about evenly, as read sides do: the transport is one member of each topic's
    producers, and a partition is handed over between two publications.
    """

    kind = "nats"

    def __init__(
        self,
        broker: BrokerSettings | None = None,
        *,
        journal: Journal | None = None,
        settings: ReadSideSettings | None = None,
        messages: PartitionLog | None = None,
        **overrides: Any,
    ) -> None:
        self.broker = make_settings(BrokerSettings, broker, **overrides)
        self.link = _Link(self.broker)
        self.journal = journal
        self.messages = messages
        self.settings = settings or ReadSideSettings()
        #: This transport's name as a member of its topics' producers (their lease owner).
        self.member = default_owner()
        #: topic name -> this transport's membership of its producers (rebalance on).
        self.memberships: dict[str, Membership | None] = {}

    def producer(self, topic: Topic[Any], partition: int) -> NatsProducer:
        topic.partition_tag(partition)
        if self.journal is None:
            raise ConfigurationError(
                f"topic {topic.name!r}: publishing to NATS needs the producing service's "
                "journal (NatsTransport(..., journal=...))"
            )
        if topic.name not in self.memberships:
            tags = [topic.partition_tag(p) for p in range(topic.partitions)]
            self.memberships[topic.name] = membership_for(
                producer_name(topic), tags, self.journal.database, self.settings, self.member
            )
        return NatsProducer(
            self.link,
            topic,
            partition,
            journal=self.journal,
            settings=self.settings,
            owner=self.member,
            membership=self.memberships[topic.name],
            messages=self.messages,
        )

    def actor_spec(self) -> dict[str, Any]:
        """What a subscriber actor on Ray needs to make the same transport: the broker
        settings (its URL in full)."""
        return {"kind": "nats", "broker": self.broker.model_dump()}

    def feed(self, topic: Topic[Any], partition: int, *, group: str) -> NatsFeed:
        return NatsFeed(self.link, topic, partition, group=group)

    async def close(self) -> None:
        """Close the broker connection; leave the topics' producers (after they stopped)."""
        for membership in self.memberships.values():
            if membership is not None:
                await membership.leave()
        await self.link.close()
