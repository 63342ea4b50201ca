"""The embedded transport over HTTP: the producing service serves its topics' partitions, a
subscriber in another service pulls them, keeping its position in its own database.

Producer side, :func:`topic_router` (mounted by :class:`~lagompy.topic.TopicsComponent`)::

    GET /topics                                       the topics: name, partitions, type, version
    GET /topics/{name}/partitions/{p}?after=&limit=&wait=
        {"topic": ..., "partition": p, "messages": [...], "last_offset": n, "full": bool}
        messages after journal offset `after` (default 0), at most `limit` (1-10000, default
        100); when there is none yet, waits up to `wait` seconds (0-30, default 0) for one
        (long poll); `last_offset` is where the subscriber's position moves to, past the
        events the topic filters out.
    GET /topics/{name}/partitions/{p}/position?time=&after=
        {"offset": n}: the partition's head now, or (with `time`, ISO 8601 with a zone) the
        offset of its last event written before that time; with `after` (a subscriber's
        position) also "behind" (the partition's events after it) and "lag_seconds" (the age
        of the oldest of them), for the subscriber's status.

Each message is :func:`~lagompy.topic._codec.message_to_json`'s object. A client whose ``Accept``
names ``application/vnd.lagompy.columns+msgpack`` (lagompy's feeds) gets the batch as columns in
MessagePack instead (:func:`~lagompy.topic._codec.messages_to_columns`), one naming only
``application/msgpack`` the objects' body in MessagePack; both when the topic's encoding is
msgpack (the default), JSON otherwise. Bad input gets a problem document: 404 for an unknown
topic or partition, 422 for a bad parameter.

Subscriber side, :class:`HttpTransport`: its :class:`HttpFeed` reads a batch with ``wait=0``
and, once caught up, long-polls inside :meth:`HttpFeed.wait` (bounded by the worker's next
lease renewal and by ``long_poll``), so a message reaches the subscriber within a round trip of
its commit. Requests go through a :class:`~lagompy.service.ServiceClient`, so its circuit
breaker and locator apply; its failures reach the subscriber's status without URLs.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import httpx
import msgpack
from fastapi import APIRouter, Header, HTTPException, Query, Response

from lagompy.errors import (
    CircuitBreakerOpen,
    ConfigurationError,
    EventDecodeError,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    TopicError,
    TopicMessageInvalid,
)
from lagompy.journal._journal import MAX_POSITION, Journal, _collector_paused
from lagompy.journal._tailing import TailSettings
from lagompy.service._breaker import BreakerRegistry, CircuitBreaker
from lagompy.service._client import ServiceClient, ServiceLocator
from lagompy.topic._codec import (
    COLUMNS,
    JSON,
    MSGPACK,
    messages_from_columns,
    messages_from_json,
    messages_to_columns,
    messages_to_json,
)
from lagompy.topic._embedded import JournalLog
from lagompy.topic._log import PartitionLog
from lagompy.topic._topic import Message, StartFrom, Topic
from lagompy.topic._transport import MessageBatch, until_woken

log = logging.getLogger("lagompy.topic")

__all__ = ["HttpFeed", "HttpTransport", "topic_router"]

#: Most messages per request, and most seconds of a long poll.
MAX_LIMIT = 10_000
#: ... before 2026-12-05: what a feed falls back to with a producer that refuses more.
_OLD_MAX_LIMIT = 1000
MAX_WAIT = 30.0


def _topics_by_name(topics: Iterable[Topic[Any]]) -> dict[str, Topic[Any]]:
    found: dict[str, Topic[Any]] = {}
    for t in topics:
        if not isinstance(t, Topic):
            raise ConfigurationError(f"expected a lagompy.topic.Topic, got {t!r}")
        if t.name in found:
            raise ConfigurationError(f"two topics are named {t.name!r}")
        found[t.name] = t
    return found


def topic_router(
    topics: Iterable[Topic[Any]],
    journal: Journal | PartitionLog | Callable[[], Journal | PartitionLog],
    *,
    prefix: str = "/topics",
    tail: TailSettings | None = None,
    tags: list[str] | None = None,
) -> APIRouter:
    """The routes of the module's docs for ``topics``, read from ``journal`` (or a callable
    returning it, called per request: a journal opened in the service's lifespan). A journal
    is read by its tags; on a journal placed on several databases, the producing service
    gives the relay log instead (a ``PartitionLog``: see ``_relay.py``)."""
    by_name = _topics_by_name(topics)
    router = APIRouter(prefix=prefix, tags=list(tags or ["topics"]))
    tail = tail or TailSettings()
    ahead = _ReadAhead()

    def current() -> PartitionLog:
        found = journal() if callable(journal) and not isinstance(journal, Journal) else journal
        return JournalLog(found) if isinstance(found, Journal) else found

    def find(name: str, partition: int) -> tuple[Topic[Any], str]:
        topic = by_name.get(name)
        if topic is None:
            raise HTTPException(status_code=404, detail=f"no topic named {name!r:.120}")
        if not 0 <= partition < topic.partitions:
            raise HTTPException(
                status_code=404,
                detail=f"topic {name!r} has partitions 0 to {topic.partitions - 1}, "
                f"not {partition}",
            )
        return topic, topic.partition_tag(partition)

    @router.get("", summary="The topics this service publishes")
    async def list_topics() -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "partitions": t.partitions,
                "type": t.type_name,
                "version": t.version,
            }
            for t in by_name.values()
        ]

    @router.get("/{name}/partitions/{partition}", summary="Messages of one partition")
    async def read(
        name: str,
        partition: int,
        after: Annotated[
            int, Query(ge=0, le=MAX_POSITION, description="The position: messages after it.")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most messages.")] = 100,
        wait: Annotated[
            float, Query(ge=0, le=MAX_WAIT, description="Seconds to wait for a message.")
        ] = 0.0,
        accept: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> Response:
        topic, _ = find(name, partition)
        media_type = _media_type(topic, accept)
        source = current()
        answer = await ahead.take((name, partition, after, limit, media_type))
        if answer is None:
            deadline = time.monotonic() + wait
            feed = source.feed(topic, partition, tail=tail)
            try:
                await feed.start()

                def next_batch(start: int) -> Awaitable[MessageBatch]:
                    return feed.next_batch(start, limit)

                while True:
                    # The collector waits while a page is read, mapped and encoded (a query's
                    # time, never a long poll's): the page's envelopes, messages and payloads
                    # are freed by their last reference when _answer returns, instead of being
                    # walked by the collections their making triggered (see _answer).
                    with _collector_paused():
                        answer = await _answer(
                            next_batch, topic, partition, after, media_type, deadline
                        )
                    if answer is not None:
                        break
                    await feed.wait(limit=deadline - time.monotonic())
            finally:
                await feed.close()
        if answer.full:
            # More follows at once: the page after this one is read while this one travels.
            def read(start: int) -> Awaitable[MessageBatch]:
                return source.read(topic, partition, start, limit)

            ahead.start(
                (name, partition, answer.last_offset, limit, media_type),
                _answer(read, topic, partition, answer.last_offset, media_type, 0.0),
            )
        return answer.response

    @router.get("/{name}/partitions/{partition}/position", summary="Where a position starts")
    async def position(
        name: str,
        partition: int,
        at: Annotated[
            datetime | None,
            Query(
                alias="time",
                description="ISO 8601 with a zone: the offset before the first event written "
                "at or after it; without: the partition's head.",
            ),
        ] = None,
        after: Annotated[
            int | None,
            Query(ge=0, le=MAX_POSITION, description="A position: how far behind the head it is."),
        ] = None,
    ) -> dict[str, Any]:
        topic, _ = find(name, partition)
        if at is not None and at.tzinfo is None:
            raise HTTPException(
                status_code=422, detail="time needs a zone (e.g. 2026-12-04T18:00:00Z)"
            )
        start = StartFrom.latest() if at is None else StartFrom.at_time(at)
        source = current()
        offset = await source.position(topic, partition, start)
        body: dict[str, Any] = {"topic": name, "partition": partition, "offset": offset}
        if after is not None:
            _, behind, seconds = await source.lag(topic, partition, after)
            body |= {"behind": behind, "lag_seconds": seconds}
        return body

    return router


@dataclass(frozen=True)
class _Answer:
    """A pull's response, and where its batch ended."""

    response: Response
    last_offset: int
    full: bool


async def _answer(
    read: Callable[[int], Awaitable[MessageBatch]],
    topic: Topic[Any],
    partition: int,
    after: int,
    media_type: str,
    deadline: float,
) -> _Answer | None:
    """The answer to a pull: the messages after ``after``, or where the partition moved past
    it, or (at ``deadline``) that nothing came; None: nothing yet, wait.

    Called with the collector paused: in the producing process, collections run while a page
    was alive walked its thousands of young objects each time, and the full ones (a page's
    objects had reached the oldest generation across the query's await) the whole heap: 40% of
    the process's time in a catch-up over HTTP (SQLite, 100,000 events, 2026-12-05)."""
    try:
        batch = await read(after)
    except EventDecodeError as error:
        raise _undecodable(topic, partition, error) from None
    if batch.messages or batch.last_offset > after or time.monotonic() >= deadline:
        response = _encode(topic, partition, batch, media_type)
        return _Answer(response, batch.last_offset, batch.full)
    return None


class _ReadAhead:
    """Answers made ahead: after a full page, the route reads, maps and encodes the page after
    it while the first travels to the subscriber and is decoded and committed there, so that
    the subscriber's next pull (it asks at once after a full page) finds it made. Only a full
    answer is served from here: the journal's reads are prefixes of what will ever be there (a
    page stops below a writer still in flight), so a full page after an offset never changes,
    while a short one may have grown since. A pull that finds nothing here reads as before.

    Measured (HTTP catch-up of 100,000 events, PostgreSQL, before it): a pull took 54 ms from
    the subscriber's side, of which the producer's read 20 ms, while the subscriber's commit
    took 22 ms; both processes were idle half the time."""

    #: Most answers kept (a subscriber group that left leaves one behind), and for how long.
    SIZE = 32
    TTL = 10.0

    def __init__(self) -> None:
        self._answers: OrderedDict[tuple[Any, ...], tuple[float, asyncio.Task[Any]]]
        self._answers = OrderedDict()

    def start(self, key: tuple[Any, ...], work: Coroutine[Any, Any, _Answer | None]) -> None:
        if key in self._answers:
            work.close()
            return
        task = asyncio.ensure_future(self._paused(work))
        task.add_done_callback(_retrieve)  # a failure is the real pull's to raise
        self._answers[key] = (time.monotonic() + self.TTL, task)
        while len(self._answers) > self.SIZE:
            _, (_, old) = self._answers.popitem(last=False)
            old.cancel()

    @staticmethod
    async def _paused(work: Coroutine[Any, Any, _Answer | None]) -> _Answer | None:
        with _collector_paused():  # as for a pull (see _answer)
            return await work

    async def take(self, key: tuple[Any, ...]) -> _Answer | None:
        """The full answer made ahead for ``key``, or None."""
        found = self._answers.pop(key, None)
        if found is None:
            return None
        expires, task = found
        if time.monotonic() > expires:
            task.cancel()
            return None
        try:
            answer: _Answer | None = await asyncio.shield(task)
        except Exception:
            return None
        return answer if answer is not None and answer.full else None


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _media_type(topic: Topic[Any], accept: str | None) -> str:
    """What a batch is sent as: JSON, unless the topic's encoding is msgpack (the default) and
    the client's ``Accept`` names a MessagePack form (columns first: lagompy's feeds ask for
    both, columns first; an older feed only for the objects)."""
    if accept is None or topic.encoding != "msgpack":
        return JSON
    if COLUMNS in accept:
        return COLUMNS
    return MSGPACK if MSGPACK in accept else JSON


def _encode(topic: Topic[Any], partition: int, batch: MessageBatch, media_type: str) -> Response:
    """A batch's body, serialized here: FastAPI's encoder walked every message again (and,
    through a response model, validated it), for a body that is JSON-ready already. Made with
    the collector paused, as the journal decodes its pages (synchronous: nothing else of this
    event loop runs meanwhile)."""
    with _collector_paused():
        if media_type == COLUMNS:
            columns = messages_to_columns(topic, partition, batch.messages)
            columns |= {"last_offset": batch.last_offset, "full": batch.full}
            return Response(msgpack.packb(columns), media_type=COLUMNS)
        body = {
            "topic": topic.name,
            "partition": partition,
            "messages": messages_to_json(batch.messages, topic.message_type),
            "last_offset": batch.last_offset,
            "full": batch.full,
        }
        if media_type == MSGPACK:
            return Response(msgpack.packb(body), media_type=MSGPACK)
        return Response(json.dumps(body, separators=(",", ":")), media_type=JSON)


def _undecodable(topic: Topic[Any], partition: int, error: EventDecodeError) -> HTTPException:
    log.error(
        "topic %r, partition %d: the event at offset %s cannot be decoded: %s",
        topic.name,
        partition,
        error.offset,
        error,
    )
    return HTTPException(
        status_code=503,
        detail=f"topic {topic.name!r} partition {partition} cannot be read past offset "
        f"{error.offset} now (see the producing service's log)",
    )


def _offset(message: Message[Any]) -> int:
    return message.offset


def _public(error: ServiceCallError, service: str) -> str:
    """A client error as the subscriber's status shows it: no URL, no upstream body."""
    if service.startswith(("http://", "https://")):
        service = "the producing service"
    else:
        service = f"service {service!r}"
    if isinstance(error, CircuitBreakerOpen):
        return f"the circuit breaker of {service} is open"
    if isinstance(error, ServiceCallTimeout):
        return f"{service} did not answer in time"
    if isinstance(error, ServiceCallFailed):
        return f"{service} answered {error.status}"
    return f"{service} cannot be reached"


#: What a feed asks the producing service for: the batch as MessagePack columns when the
#: topic's encoding is msgpack (the smallest, and the fastest to make and decode), else JSON;
#: the object form in MessagePack from a producer that has no columns yet.
_ACCEPT_MESSAGES = {"Accept": f"{COLUMNS}, {MSGPACK};q=0.9, {JSON};q=0.8"}


class HttpFeed:
    """A :class:`~lagompy.topic.MessageFeed` pulled from the producing service's route."""

    #: Reading acknowledges nothing: the consumer may read the next batch while it commits.
    read_ahead = True

    def __init__(
        self,
        client: ServiceClient,
        topic: Topic[Any],
        partition: int,
        *,
        prefix: str = "/topics",
        long_poll: float = 2.0,
        pull_limit: int = 5000,
    ) -> None:
        topic.partition_tag(partition)  # out of range: ConfigurationError now
        self.client = client
        self.topic = topic
        self.partition = partition
        self.path = f"{prefix}/{topic.name}/partitions/{partition}"
        self.long_poll = long_poll
        self.pull_limit = pull_limit
        self._caught_up = False
        #: (after, batch): the last pull's messages after ``after`` that next_batch has not
        #: handed out yet (a pull brings up to ``pull_limit``, a batch has up to its limit),
        #: or what a long poll in wait() brought back.
        self._pulled: tuple[int, MessageBatch] | None = None
        self._position = 0
        self._limit = 100
        self._woken = asyncio.Event()

    async def start(self) -> None:
        """Nothing to open: the client is the transport's."""

    def _who(self) -> str:
        """The producing service as errors name it: by its name, never its URL."""
        service = self.client.service
        if service.startswith(("http://", "https://")):
            return "the producing service"
        return f"service {service!r}"

    async def _get(self, path: str, params: dict[str, Any], timeout: float) -> Any:
        return self._body(await self._call(path, params, timeout))

    async def _call(self, path: str, params: dict[str, Any], timeout: float) -> httpx.Response:
        try:
            try:
                return await self.client.get(
                    path, params=params, timeout=timeout, headers=_ACCEPT_MESSAGES
                )
            except ServiceCallFailed as e:
                if e.status != 422 or params.get("limit", 0) <= _OLD_MAX_LIMIT:
                    raise
                # A producer of an older lagompy takes at most 1,000 per pull.
                self.pull_limit = _OLD_MAX_LIMIT
                params = {**params, "limit": _OLD_MAX_LIMIT}
                return await self.client.get(
                    path, params=params, timeout=timeout, headers=_ACCEPT_MESSAGES
                )
        except ServiceCallError as e:
            raise TopicError(
                f"topic {self.topic.name!r} partition {self.partition}: "
                f"{_public(e, self.client.service)}"
            ) from None

    def _body(self, reply: httpx.Response) -> Any:
        as_msgpack = reply.headers.get("content-type", "").startswith((MSGPACK, COLUMNS))
        try:
            return msgpack.unpackb(reply.content) if as_msgpack else reply.json()
        except Exception:  # msgpack raises several unrelated types for bad input
            raise TopicMessageInvalid(
                f"topic {self.topic.name!r} partition {self.partition}: the answer of "
                f"{self._who()} is not {'MessagePack' if as_msgpack else 'JSON'}"
            ) from None

    async def _fetch(self, after: int, limit: int, wait: float) -> MessageBatch:
        params = {"after": after, "limit": limit, "wait": round(wait, 3)}
        reply = await self._call(self.path, params, timeout=wait + 10.0)
        # Decoded with the collector paused, as the journal decodes its pages: the body's
        # temporary objects are gone before it runs (synchronous: nothing else runs meanwhile).
        with _collector_paused():
            data = self._body(reply)
            if not isinstance(data, dict):
                raise self._unexpected()
            if reply.headers.get("content-type", "").startswith(COLUMNS):
                messages = messages_from_columns(self.topic, data, partition=self.partition)
            elif isinstance(data.get("messages"), list):
                messages = messages_from_json(
                    self.topic, data["messages"], partition=self.partition
                )
            else:
                raise self._unexpected()
        last = data.get("last_offset")
        if not isinstance(last, int) or isinstance(last, bool) or last < after:
            raise TopicMessageInvalid(
                f"topic {self.topic.name!r} partition {self.partition}: bad last_offset "
                f"{last!r:.40} from {self._who()}"
            )
        offsets = [m.offset for m in messages]
        if offsets != sorted(offsets) or (offsets and (offsets[0] <= after or offsets[-1] > last)):
            raise TopicMessageInvalid(
                f"topic {self.topic.name!r} partition {self.partition}: messages out of order "
                f"from {self._who()}"
            )
        return MessageBatch(messages, last, bool(data.get("full")))

    def _unexpected(self) -> TopicMessageInvalid:
        return TopicMessageInvalid(
            f"topic {self.topic.name!r} partition {self.partition}: unexpected answer from "
            f"{self._who()}"
        )

    async def start_offset(self, start: StartFrom) -> int:
        if start.kind == "earliest":
            return 0
        if start.kind == "offset":
            assert start.offset is not None
            return start.offset
        params = {} if start.time is None else {"time": start.time.isoformat()}
        data = await self._get(f"{self.path}/position", params, timeout=10.0)
        offset = data.get("offset") if isinstance(data, dict) else None
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise TopicMessageInvalid(
                f"topic {self.topic.name!r} partition {self.partition}: bad position from "
                f"{self._who()}"
            )
        return offset

    async def lag(self, after: int) -> tuple[int, int, float]:
        """(head, events behind, age in seconds of the oldest of them) of ``after``, as the
        producer's journal sees it (for the status)."""
        data = await self._get(f"{self.path}/position", {"after": after}, timeout=10.0)
        try:
            return int(data["offset"]), int(data["behind"]), float(data["lag_seconds"])
        except (KeyError, TypeError, ValueError):
            raise TopicMessageInvalid(
                f"topic {self.topic.name!r} partition {self.partition}: bad position from "
                f"{self._who()}"
            ) from None

    async def next_batch(self, after: int, limit: int) -> MessageBatch:
        self._woken.clear()
        batch = self._take(after, limit)
        if batch is None:
            pulled = await self._fetch(after, max(limit, self.pull_limit), 0.0)
            self._pulled = (after, pulled)
            batch = self._take(after, limit)
            assert batch is not None
        self._caught_up = not batch.full
        self._position = batch.last_offset
        self._limit = limit
        return batch

    def _take(self, after: int, limit: int) -> MessageBatch | None:
        """Up to ``limit`` messages after ``after`` from the last pull, when it covers
        ``after`` (None: pull). Pulls bigger than a batch (``pull_limit``): requests cost the
        subscriber more than the messages' decoding (HTTP catch-up, 2026-12-05)."""
        if self._pulled is None:
            return None
        start, pulled = self._pulled
        if not (start <= after < pulled.last_offset or after == start):
            self._pulled = None  # the position moved (a retry, a set-offset) or all handed out
            return None
        messages = pulled.messages
        if after != start:
            messages = messages[bisect.bisect_right(messages, after, key=_offset) :]
        if len(messages) > limit:
            end = messages[limit - 1].offset
            self._pulled = (end, MessageBatch(messages[limit:], pulled.last_offset, pulled.full))
            return MessageBatch(messages[:limit], end, True)
        self._pulled = None
        return MessageBatch(messages, pulled.last_offset, pulled.full)

    async def wait(self, limit: float | None = None) -> None:
        """Long-poll for the next batch (kept for :meth:`next_batch`), at most ``limit`` and
        ``long_poll`` seconds; :meth:`wake` ends it at once."""
        if not self._caught_up or self._woken.is_set():
            return
        seconds = self.long_poll if limit is None else max(0.0, min(self.long_poll, limit))
        if seconds <= 0:
            return
        after = self._position
        pull = self._fetch(after, max(self._limit, self.pull_limit), seconds)
        poll = await until_woken(pull, self._woken)
        if poll.cancelled():
            return
        if poll.exception() is not None:
            return  # next_batch asks again, and raises what is still wrong
        self._pulled = (after, poll.result())
        self._caught_up = False

    def wake(self) -> None:
        self._woken.set()

    async def close(self) -> None:
        self._woken.set()


class HttpTransport:
    """Topics pulled over HTTP from the service that publishes them (``service``: its name for
    the locator, or a base URL; or a :class:`~lagompy.service.ServiceClient`, then the caller
    closes it). No producer: the producing service serves its journal through
    :func:`topic_router`.

    Every pull goes through the client's circuit breaker (``breaker``: as
    :class:`~lagompy.service.ServiceClient` takes it; by default the service's own). While it
    is open the subscribers retry with their backoff and show ``stalled``; they resume at most
    the breaker's ``reset_timeout`` after the producer is back, so a dedicated breaker with a
    short reset timeout suits a subscriber. ``long_poll``: most seconds a pull waits for
    messages when caught up (keep it under the breaker's call timeout). ``pull_limit``: most
    messages a pull brings (1 to 10,000; the subscriber still commits them in transactions of
    its ``max_batch``): a request costs more than the decoding of a thousand messages, so a
    catch-up pulls several batches at once (a producer of an older lagompy, whose limit is
    1,000, gets 1,000)."""

    kind = "http"

    def __init__(
        self,
        service: str | ServiceClient,
        *,
        prefix: str = "/topics",
        long_poll: float = 2.0,
        pull_limit: int = 5000,
        locator: ServiceLocator | None = None,
        breakers: BreakerRegistry | None = None,
        breaker: CircuitBreaker | str | bool | None = None,
    ) -> None:
        if not 0 < long_poll <= MAX_WAIT:
            raise ConfigurationError(
                f"long_poll must be above 0 and at most {MAX_WAIT} seconds, got {long_poll!r}"
            )
        if isinstance(pull_limit, bool) or not isinstance(pull_limit, int):
            raise ConfigurationError(f"pull_limit must be an int, got {pull_limit!r:.40}")
        if not 1 <= pull_limit <= MAX_LIMIT:
            raise ConfigurationError(f"pull_limit must be 1 to {MAX_LIMIT:,}, got {pull_limit}")
        self._owns_client = not isinstance(service, ServiceClient)
        self.client = (
            service
            if isinstance(service, ServiceClient)
            else ServiceClient(service, locator=locator, registry=breakers, breaker=breaker)
        )
        self.prefix = prefix
        self.long_poll = long_poll
        self.pull_limit = pull_limit

    def producer(self, topic: Topic[Any], partition: int) -> None:
        topic.partition_tag(partition)
        return None

    def actor_spec(self) -> dict[str, Any]:
        """What a subscriber actor on Ray needs to make the same transport: the producing
        service's name and its URLs as this process locates them (the actor gets no
        environment of its own), the route's prefix, the long poll and the pull limit."""
        service = self.client.service
        return {
            "kind": "http",
            "service": service,
            "urls": self.client.locator.urls(service),
            "prefix": self.prefix,
            "long_poll": self.long_poll,
            "pull_limit": self.pull_limit,
        }

    def feed(self, topic: Topic[Any], partition: int, *, group: str) -> HttpFeed:
        return HttpFeed(
            self.client,
            topic,
            partition,
            prefix=self.prefix,
            long_poll=self.long_poll,
            pull_limit=self.pull_limit,
        )

    async def close(self) -> None:
        if self._owns_client:
            await self.client.close()
