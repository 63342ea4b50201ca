"""The producing side of topics, for transports that have one: :func:`start_producers` runs
``transport.producer(topic, partition)`` for every partition of every topic, one asyncio task
each, until closed. The embedded transports have no producer (their ``producer`` returns None):
nothing runs, but a partition the transport cannot serve still fails here, at start, never
later ("a topic with no usable transport fails at start")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

from lagompy.closing import AsyncClosing, finish_tasks, opener
from lagompy.consumer import EventConsumer
from lagompy.errors import ConfigurationError, LagompyError
from lagompy.readside._projections import Projections, WorkerStatus
from lagompy.topic._log import PartitionLog
from lagompy.topic._topic import Topic
from lagompy.topic._transport import TopicProducer, TopicTransport

log = logging.getLogger("lagompy.topic")

__all__ = ["Producers", "start_producers"]


class Producers(AsyncClosing):
    """The producers of some topics running in this process (see :func:`start_producers`)."""

    def __init__(self, transport: TopicTransport) -> None:
        self.transport = transport
        #: (topic name, partition) -> its producer, for the partitions that have one.
        self.producers: dict[tuple[str, int], TopicProducer] = {}
        #: The topics served, by name.
        self.topics: dict[str, Topic[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _start(self, topics: Iterable[Topic[Any]]) -> None:
        made: list[tuple[Topic[Any], int, TopicProducer]] = []
        for topic in topics:
            if not isinstance(topic, Topic):
                raise ConfigurationError(f"expected a lagompy.topic.Topic, got {topic!r}")
            for partition in range(topic.partitions):
                producer = self.transport.producer(topic, partition)  # may refuse: at start
                if producer is not None:
                    made.append((topic, partition, producer))
        for topic, partition, producer in made:
            self.topics[topic.name] = topic
            self.producers[(topic.name, partition)] = producer
            self._tasks.append(
                asyncio.create_task(producer.run(), name=f"topic producer {topic.name} {partition}")
            )

    def projections(self) -> Projections | None:
        """The operations and status of the producers' rows (in the journal's database), when
        they run on the consumer core (a broker transport's); None otherwise."""
        for producer in self.producers.values():
            if isinstance(producer, EventConsumer) and producer.journal is not None:
                database = producer.journal.database
                # A producer of a log (a placed journal's relay log) has positions in it,
                # not in the journal's tags: its log gives its lag (see status).
                tags = None if _log_of(producer) is not None else database
                return Projections(database, tags)
        return None

    def published(self, topic: str) -> int:
        """Messages this process's producers of ``topic`` published (acknowledged)."""
        return sum(
            int(getattr(producer, "published", 0))
            for (name, _), producer in self.producers.items()
            if name == topic
        )

    async def status(self) -> list[WorkerStatus]:
        """Every partition of the producers that run on the consumer core (the broker
        transports'), as their rows in the journal's offset table show them: position, lag
        behind the journal in events and seconds, state, owner, events/s, last failure."""
        projections = self.projections()
        if projections is None:
            return []
        found: list[WorkerStatus] = []
        for name in sorted(
            {p.name for p in self.producers.values() if isinstance(p, EventConsumer)}
        ):
            with contextlib.suppress(ConfigurationError):  # no row yet: not started anywhere
                found += await projections.status(name)
        return [await self._with_lag(s) for s in found]

    async def _with_lag(self, status: WorkerStatus) -> WorkerStatus:
        """``status`` with its head and lag from its producer's log, when it reads one."""
        for (name, partition), producer in self.producers.items():
            log = _log_of(producer)
            if log is None or producer_key(producer) != (status.processor, status.tag):
                continue
            with contextlib.suppress(LagompyError):  # the status says what it knows
                head, behind, seconds = await log.lag(self.topics[name], partition, status.offset)
                return dataclasses.replace(
                    status, head_offset=head, lag_events=behind, lag_seconds=seconds
                )
        return status

    def problems(self) -> list[str]:
        """Producers whose task ended with an error (they retry on their own otherwise)."""
        found = []
        for task in self._tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                found.append(f"{task.get_name()} ended: {type(error).__name__}: {error}")
        return found

    async def close(self) -> None:
        """Stop every producer (after its current publication; each releases its lease)."""
        if self._closed:
            return
        self._closed = True
        for producer in self.producers.values():
            await producer.stop()
        await finish_tasks(self._tasks, what="a topic producer", logger=log)


def _log_of(producer: TopicProducer) -> PartitionLog | None:
    """The log a producer reads when not the journal's tags (a placed journal's relay log)."""
    log: PartitionLog | None = getattr(producer, "messages", None)
    return log


def producer_key(producer: TopicProducer) -> tuple[str, str]:
    """(row name, partition tag) of a producer on the consumer core."""
    return (getattr(producer, "name", ""), getattr(producer, "tag", ""))


@opener
async def start_producers(topics: Iterable[Topic[Any]], transport: TopicTransport) -> Producers:
    """Run the producers ``transport`` has for ``topics`` (one task per partition that has
    one) and return at once; close the result to stop them. ``ConfigurationError`` at once for
    a topic the transport cannot serve. The transport stays open: close it after."""
    producers = Producers(transport)
    try:
        producers._start(topics)
    except BaseException:
        await producers.close()
        raise
    return producers
