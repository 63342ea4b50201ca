"""Topics as parts of a service: :class:`TopicsComponent` publishes (serves the topic route),
:class:`SubscribersComponent` subscribes (runs subscriber groups)::

    # the producing service
    topics = TopicsComponent([user_registrations], journal_settings=journal)
    Service(name="users", ..., components=[topics])        # GET /topics/...

    # a subscribing service (its own database), pulling over HTTP from "users"
    subscribers = SubscribersComponent(
        [WelcomeMails], transport=HttpTransport("users"), journal_settings=own_database
    )
    Service(name="notifications", components=[subscribers])

``/health/ready`` fails while a group's partition is ``failed`` (stopped by a message it could
not get past) or ``stalled`` (its transport keeps failing: the producer is down, say), naming
the group, partition and error; ``GET /topics/subscribers`` shows every group's status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

from lagompy.errors import ConfigurationError
from lagompy.journal._journal import Journal
from lagompy.journal._placement import HOME, Placement
from lagompy.journal._storage import Storage, open_storage, serializer_for
from lagompy.journal._tailing import JournalNotifier, TailSettings
from lagompy.readside._projections import STUCK_STATES, ReadSide, WorkerStatus, start_readside
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import ReadSideSettings
from lagompy.settings import JournalSettings
from lagompy.topic._http import _topics_by_name, topic_router
from lagompy.topic._log import PartitionLog, partition_log
from lagompy.topic._nats import BrokerSettings, NatsTransport
from lagompy.topic._producers import Producers, start_producers
from lagompy.topic._ray import RaySubscribers
from lagompy.topic._relay import RELAY_PREFIX, refuse_journal_positions, relay_for
from lagompy.topic._runner import SubscriberArg, Subscribers, start_subscribers
from lagompy.topic._schema import schema_router
from lagompy.topic._topic import Topic
from lagompy.topic._transport import TopicTransport

if TYPE_CHECKING:  # the service's type of a metric sample: topics do not import it
    from lagompy.service._metrics import Sample

__all__ = ["SubscribersComponent", "TopicsComponent"]


class TopicsComponent:
    """A :class:`~lagompy.service.Component` that publishes ``topics`` from the service's
    journal over HTTP (the embedded transport: see :func:`~lagompy.topic.topic_router`).
    ``journal_settings``: the journal (default: from the environment, like ``Service``'s).
    On a journal placed on several databases it also runs the topics' relays (:attr:`relays`,
    see ``_relay.py``), and the routes and producers read their relay log.

    ``transport``: a transport with producers (a broker's) that publishes the topics too: its
    producers run with the service (:func:`~lagompy.topic.start_producers`), and a topic it
    cannot serve fails the start; the component closes it when the service stops.

    ``broker``: without a ``transport``, a broker URL (``BrokerSettings(url=...)``, or
    ``LAGOMPY_BROKER_URL`` in the environment) selects the NATS JetStream transport: its
    producers publish the topics from the service's journal (the HTTP routes stay), with
    ``producer_settings`` (page size, leases, retries; default ``ReadSideSettings()``)."""

    name = "topics"

    def __init__(
        self,
        topics: Iterable[Topic[Any]],
        *,
        journal_settings: JournalSettings | None = None,
        prefix: str = "/topics",
        transport: TopicTransport | None = None,
        broker: BrokerSettings | None = None,
        producer_settings: ReadSideSettings | None = None,
    ) -> None:
        self.topics = list(_topics_by_name(topics).values())
        self.producer_settings = producer_settings
        self.journal_settings = journal_settings
        self.transport = transport
        self.broker = broker
        self._broker_transport: TopicTransport | None = None
        self.producers: Producers | None = None
        self._storage: Storage | None = None
        self._log: PartitionLog | None = None
        #: On a journal placed on several databases, the topics' relays (read-side workers
        #: that write each partition's messages into the relay log: see ``_relay.py``).
        self.relays: ReadSide | None = None
        self._notifier: JournalNotifier | None = None
        #: The topic routes, out of the OpenAPI schema like lagompy's other routes (they are
        #: lagompy's protocol between services, documented in docs/reference/http.md).
        self.router = APIRouter()
        self.router.include_router(
            topic_router(self.topics, self._journal, prefix=prefix), include_in_schema=False
        )

        @self.router.get(f"{prefix}/relays", include_in_schema=False)
        async def relays() -> list[dict[str, Any]]:
            """The relays' partitions (a journal placed on several databases), else none."""
            return [s.to_dict() for s in await self.relay_status()]

        # The AsyncAPI document (in the OpenAPI docs) and each topic's JSON Schema.
        subjects = (broker or BrokerSettings()).stream_prefix
        if isinstance(transport, NatsTransport):
            subjects = transport.broker.stream_prefix
        self.router.include_router(
            schema_router(self.topics, prefix=prefix, subject_prefix=subjects)
        )

    def _journal(self) -> PartitionLog:
        if self._log is None:
            raise HTTPException(status_code=503, detail="the topics are not served yet")
        return self._log

    @property
    def journal(self) -> Journal:
        """The journal the topics are read from, once started."""
        if self._storage is None:
            raise RuntimeError("the topics component is not started")
        return self._storage.journal

    async def start(self) -> None:
        serializer = serializer_for(list({t.source for t in self.topics}))
        for t in self.topics:
            serializer.register(t.message_type)
        settings = self.journal_settings or JournalSettings()
        placement = Placement.of(settings)
        if placement.several and self.transport is not None:
            raise ConfigurationError(
                "a transport made beforehand reads one database's journal, and this journal is "
                f"placed on several (home, {', '.join(settings.databases)}): give the broker "
                "instead (TopicsComponent(..., broker=BrokerSettings(url=...))), whose "
                "producers then publish the relay log (see docs/topics.md, 'Topics on a "
                "journal placed on several databases')"
            )
        tail = TailSettings()
        # On a journal placed on several databases the routes (and producers) read the relay
        # log of the home database, which the relays write (see _relay.py).
        home = placement.settings_of(HOME) if placement.several else settings
        self._storage = await open_storage(settings=home, serializer=serializer)
        self._log = partition_log(self._storage.journal, placed=placement.several, tail=tail)
        if placement.several:
            try:
                await refuse_journal_positions(self._storage.database, self.topics)
                self.relays = await start_readside(
                    [relay_for(t, placement) for t in self.topics],
                    journal_settings=settings,
                    settings=self.producer_settings,
                    # The relay's positions go with its messages, in the home database.
                    url=None,
                    postgres_schema=None,
                )
            except BaseException:
                await self.stop()
                raise
        if self._storage.database.dialect == "postgresql" and tail.listen:
            # Held for the component's life: the long polls share this process's LISTEN
            # connection instead of opening and closing it request by request.
            self._notifier = await JournalNotifier.acquire(self._storage.database, tail)
        transport = self.transport
        if transport is None:
            broker = self.broker or BrokerSettings()
            if broker.url is not None:
                from lagompy.topic._nats import NatsTransport

                transport = NatsTransport(
                    broker,
                    journal=self._storage.journal,
                    settings=self.producer_settings,
                    # On a placed journal the producers publish the relay log.
                    messages=self._log if placement.several else None,
                )
                self._broker_transport = transport
        if transport is not None:
            self.producers = await start_producers(self.topics, transport)

    async def relay_status(self) -> list[WorkerStatus]:
        """On a journal placed on several databases, every relay's partition (a row per topic,
        tag shard and database, named ``topic-relay:<topic>``): position in its database's
        journal, lag, state, owner, last failure. Empty on a journal of one database."""
        if self.relays is None:
            return []
        # The projection database holds every consumer's rows: the relays' only.
        return [s for s in await self.relays.status() if s.processor.startswith(RELAY_PREFIX)]

    async def metric_samples(self) -> list[Sample]:
        """Per producer partition (a broker transport's): its position, its lag behind the
        journal in events and seconds, its state, and the messages this process published;
        per relay partition (a placed journal's) its position, lag and state."""
        samples = status_samples(
            "relay",
            "the relay",
            await self.relay_status(),
            lambda s: {"topic": s.processor.split(":", 1)[1], "partition": s.tag},
        )
        if self.producers is None:
            return samples
        samples += status_samples(
            "producer",
            "the producer",
            await self.producers.status(),
            lambda s: {"topic": s.processor.split(":", 1)[1], "partition": s.tag},
        )
        for (topic, partition), producer in self.producers.producers.items():
            published = getattr(producer, "published", None)
            if isinstance(published, int):
                samples.append(
                    (
                        "lagompy_topic_producer_published_total",
                        "Messages this process published (acknowledged by the broker).",
                        "counter",
                        {"topic": topic, "partition": str(partition)},
                        float(published),
                    )
                )
        return samples

    async def ready(self) -> bool | str:
        """True unless a producer's or a relay's task ended with an error, or a producer
        cannot publish (``stalled``: the broker is down, say) or a producer or a relay (a
        placed journal's) is stopped by an event (``failed``) or cannot go on (``stalled``)."""
        problems = [] if self.relays is None else self.relays.problems()
        problems += [
            f"topic relay {s.processor!r}, partition {s.tag!r}: {s.state} at offset {s.offset}"
            + ("" if s.failure is None else f": {s.failure.error[:300]}")
            for s in await self.relay_status()
            if s.state in STUCK_STATES
        ]
        if self.producers is None:
            return True if not problems else "; ".join(problems[:5])
        problems += self.producers.problems()
        problems += [
            f"topic producer {s.processor!r}, partition tag {s.tag!r}: {s.state} at offset "
            f"{s.offset}" + ("" if s.failure is None else f": {s.failure.error[:300]}")
            for s in await self.producers.status()
            if s.state in STUCK_STATES
        ]
        return True if not problems else "; ".join(problems[:5])

    async def stop(self) -> None:
        relays, self.relays = self.relays, None
        if relays is not None:
            await relays.close()
        producers, self.producers = self.producers, None
        if producers is not None:
            await producers.close()
        if self.transport is not None:
            await self.transport.close()
        made, self._broker_transport = self._broker_transport, None
        if made is not None:
            await made.close()
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.release()
        storage, self._storage = self._storage, None
        self._log = None
        if storage is not None:
            await storage.close()


class SubscribersComponent:
    """A :class:`~lagompy.service.Component` that runs subscriber groups in the service's
    process (see :func:`~lagompy.topic.start_subscribers`, whose arguments it takes), or on Ray
    with ``ray=True`` (see :func:`~lagompy.topic.start_subscribers_on_ray`: ``app`` names the
    Ray namespace, ``replicas`` the actors per group; ``stop_on_close=True`` stops the actors
    when the service stops, by default they run on for the next start)."""

    name = "subscribers"

    def __init__(
        self,
        subscribers: Iterable[SubscriberArg],
        *,
        transport: TopicTransport | None = None,
        broker: BrokerSettings | None = None,
        journal_settings: JournalSettings | None = None,
        prefix: str = "/topics/subscribers",
        settings: ReadSideSettings | None = None,
        ray: bool = False,
        app: str = "default",
        replicas: int = 1,
        stop_on_close: bool = False,
        **overrides: Any,
    ) -> None:
        self.subscribers = list(subscribers)
        self.ray = ray
        self.app = app
        self.replicas = replicas
        self.stop_on_close = stop_on_close
        if transport is None:
            # A broker URL (here, or LAGOMPY_BROKER_URL) selects NATS JetStream; else the
            # embedded transport on the journal's database.
            broker = broker or BrokerSettings()
            if broker.url is not None:
                from lagompy.topic._nats import NatsTransport

                transport = NatsTransport(broker)
        self.transport = transport
        self.journal_settings = journal_settings
        self.settings = settings
        self.overrides = overrides
        self._running: Subscribers | RaySubscribers | None = None
        self.router = APIRouter(include_in_schema=False)

        @self.router.get(prefix)
        async def status() -> list[dict[str, Any]]:
            return [s.to_dict() for s in await self.running.status()]

    @property
    def running(self) -> Subscribers | RaySubscribers:
        """The running subscribers (pause, resume, status...), once started."""
        if self._running is None:
            raise HTTPException(status_code=503, detail="the subscribers are not running")
        return self._running

    async def start(self) -> None:
        journal = self.journal_settings or JournalSettings()
        if self.ray:
            from lagompy.topic._ray import start_subscribers_on_ray, subscriber_class

            self._running = await start_subscribers_on_ray(
                [subscriber_class(s) for s in self.subscribers],
                app=self.app,
                transport=self.transport,
                replicas=self.replicas,
                journal_settings=journal,
                settings=self.settings,
                **self.overrides,
            )
            return
        self._running = await start_subscribers(
            self.subscribers,
            transport=self.transport,
            journal_settings=journal,
            settings=self.settings,
            **self.overrides,
        )

    async def stop(self) -> None:
        running, self._running = self._running, None
        if isinstance(running, RaySubscribers):
            await running.close(stop=self.stop_on_close)
        elif running is not None:
            await running.close()
        if self.transport is not None:
            await self.transport.close()

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        await self.running.wait_until_caught_up(timeout)

    async def metric_samples(self) -> list[Sample]:
        """Per (group, partition): position, lag in events and seconds (when known), and
        state."""
        if self._running is None:
            return []

        def labels(s: WorkerStatus) -> dict[str, str]:
            _, topic, group = s.processor.split(":", 2)
            return {"topic": topic, "group": group, "partition": s.tag}

        samples = status_samples("subscriber", "the group", await self._running.status(), labels)
        return samples

    async def ready(self) -> bool | str:
        """True while every group's partition can make progress; else which cannot, why."""
        running = self._running
        if running is None:
            return "the subscribers are not running"
        problems = [
            f"subscriber {s.processor!r}, partition tag {s.tag!r}: {s.state} at offset "
            f"{s.offset if s.failure is None else s.failure.offset}"
            + ("" if s.failure is None else f": {s.failure.error[:300]}")
            for s in await running.status()
            if s.state in STUCK_STATES
        ]
        problems += running.problems()
        return True if not problems else "; ".join(problems[:5])


def status_samples(
    kind: str,
    whose: str,
    statuses: list[WorkerStatus],
    labels: Callable[[WorkerStatus], dict[str, str]],
    *,
    prefix: str = "lagompy_topic_",
) -> list[Sample]:
    """``<prefix><kind>_offset``, ``_lag_events``, ``_lag_seconds`` (when known) and
    ``_state`` of each partition's status (``whose``: who holds the position, for the help)."""
    samples: list[Sample] = []
    for s in statuses:
        labelled = labels(s)
        for name, value, text in (
            ("offset", s.offset, f"The stored position of {whose}."),
            ("lag_events", s.lag_events, f"Events of the partition after {whose}'s position."),
            (
                "lag_seconds",
                s.lag_seconds,
                f"Age in seconds of the oldest event after {whose}'s position.",
            ),
        ):
            if value is not None:
                samples.append((f"{prefix}{kind}_{name}", text, "gauge", labelled, float(value)))
        if prefix == "lagompy_topic_" and kind == "subscriber":
            samples.append(
                (
                    "lagompy_topic_subscriber_parked",
                    f"Messages {whose} parked (on_failure park), not retried or discarded yet.",
                    "gauge",
                    labelled,
                    float(s.parked),
                )
            )
        samples.append(
            (
                f"{prefix}{kind}_state",
                f"1 for the current state of {whose}'s partition (label state).",
                "gauge",
                {**labelled, "state": s.state},
                1.0,
            )
        )
    return samples
