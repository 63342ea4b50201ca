"""Subscriber groups on Ray: one named, detached actor per (app, topic, group, replica), replaced
when it dies.

::

    subs = await start_subscribers_on_ray(
        [WelcomeMails], app="notifications", transport=HttpTransport("users")
    )
    await subs.wait_until_caught_up()
    print(await subs.status())
    await subs.close()                            # detach; the groups go on running
    await stop_subscribers_on_ray("notifications")  # stop them (they release their leases)

Each actor runs :func:`~lagompy.topic.start_subscribers` for its group, on an event loop of its
own: every partition of the group, with the group's ``prepare`` and start position. The actors
live in the app's Ray namespace (``lagompy-<app>``, beside its shard hosts and read-side
workers) under the names ``subscriber:<topic>:<group>:<replica>`` with ``max_restarts=-1``: Ray
restarts an actor whose process died, and the restarted one (same name, hence same lease owner)
takes its leases back at once and resumes after the stored positions. ``replicas=2`` runs a
second actor per group, which holds the partitions the first does not and stands by for the
others (one consumer per group and partition at any time: the leases). An actor killed for good
is created again by :meth:`RaySubscribers.ensure` (run every ``supervise_interval`` seconds).

The transport is described to the actors, not sent (:meth:`actor_spec` of the embedded, HTTP
and NATS transports): each actor makes its own, with the producing service's URLs as located
here, or the broker's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lagompy._collector import collector_state, tune_collector
from lagompy.closing import opener
from lagompy.errors import ConfigurationError
from lagompy.readside._projections import Projections, WorkerStatus
from lagompy.readside._runner import CAUGHT_UP_TIMEOUT
from lagompy.readside._settings import (
    ReadSideSettings,
    _journal_settings,
    _settings,
    projection_settings,
)
from lagompy.runtime._defaults import runtime_default
from lagompy.runtime._loading import check_importable, resolve_class
from lagompy.runtime._ray_cluster import (
    ActorLoop,
    SupervisedActors,
    actor_journal,
    actor_runtime_env,
    attach,
    namespace_of,
    release,
    start_named_actors,
    stop_actors,
)
from lagompy.settings import JournalSettings, RuntimeSettings, make_settings
from lagompy.sql._database import Database
from lagompy.sql._migrate import ensure_schema
from lagompy.topic._runner import GroupOperations, Subscribers, start_subscribers
from lagompy.topic._subscriber import Subscriber, offset_key
from lagompy.topic._transport import TopicTransport

log = logging.getLogger("lagompy.topic")

__all__ = [
    "RaySubscribers",
    "SubscriberGroupActor",
    "actor_name",
    "start_subscribers_on_ray",
    "stop_subscribers_on_ray",
]

ACTOR_PREFIX = "subscriber:"


def actor_name(topic: str, group: str, replica: int = 0) -> str:
    return f"{ACTOR_PREFIX}{topic}:{group}:{replica}"


def transport_spec(transport: TopicTransport | None) -> dict[str, Any]:
    """How an actor makes ``transport`` (None: the embedded one on the journal)."""
    if transport is None:
        return {"kind": "embedded"}
    spec = getattr(transport, "actor_spec", None)
    if spec is None:
        raise ConfigurationError(
            f"the {transport.kind!r} transport cannot run subscribers on Ray (it has no "
            "actor_spec()): run them in the service's process"
        )
    described: dict[str, Any] = spec()
    return described


def transport_from_spec(spec: dict[str, Any]) -> TopicTransport | None:
    """The transport an actor runs its group on (None: the embedded one on its journal)."""
    match spec.get("kind"):
        case "embedded":
            return None
        case "http":
            from lagompy.service._breaker import BreakerRegistry
            from lagompy.service._client import ServiceLocator
            from lagompy.topic._http import HttpTransport

            service = spec["service"]
            return HttpTransport(
                service,
                prefix=spec["prefix"],
                long_poll=spec["long_poll"],
                pull_limit=spec.get("pull_limit", 5000),
                locator=ServiceLocator({service: spec["urls"]}),
                breakers=BreakerRegistry(),
            )
        case "nats":
            from lagompy.topic._nats import BrokerSettings, NatsTransport

            return NatsTransport(BrokerSettings(**spec["broker"]))
    raise ConfigurationError(f"unknown transport description {spec!r:.100}")


class SubscriberGroupActor:
    """One subscriber group (every partition of its topic) in an actor process, on an event
    loop of its own (a thread), started in ``__init__`` so that a restart by Ray restarts it."""

    def __init__(
        self,
        subscriber_path: str,
        transport: dict[str, Any],
        journal: dict[str, Any],
        readside: dict[str, Any],
        owner: str,
    ) -> None:
        cls = resolve_class(subscriber_path)
        self._actor_loop = ActorLoop("lagompy-subscriber")
        self.owner = owner
        self.running: Subscribers = self._call(
            self._open(cls, transport, JournalSettings(**journal), ReadSideSettings(**readside))
        )
        tune_collector()  # a process of its own, started: see lagompy/_collector.py

    def _call(self, coroutine: Any, timeout: float | None = 60.0) -> Any:
        return self._actor_loop.call(coroutine, timeout)

    async def _open(
        self,
        cls: type[Subscriber[Any]],
        spec: dict[str, Any],
        journal: JournalSettings,
        settings: ReadSideSettings,
    ) -> Subscribers:
        self._transport = transport_from_spec(spec)
        return await start_subscribers(
            [cls],
            transport=self._transport,
            journal_settings=journal,
            settings=settings,
            owner=self.owner,
        )

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "owner": self.owner, "collector": collector_state()}

    def status(self) -> list[dict[str, Any]]:
        """The group's partitions as this actor sees them: stored position, lag (from the
        transport), state, and what its workers count in memory."""

        async def collect() -> list[dict[str, Any]]:
            rows = {(s.processor, s.tag): s.to_dict() for s in await self.running.status()}
            for w in self.running.workers:
                row = rows.setdefault((w.name, w.tag), {"processor": w.name, "tag": w.tag})
                row.update(
                    actor_owner=self.owner,
                    pid=os.getpid(),
                    worker_state=w.state,
                    events_handled=w.events_handled,
                    transactions=w.transactions,
                    failures=w.failures,
                )
            problems = self.running.problems()
            return [{**r, "problems": problems} for r in rows.values()]

        result: list[dict[str, Any]] = self._call(collect())
        return result

    def caught_up(self, timeout: float) -> None:
        """Return once every partition's stored position reaches its head as the transport
        sees it now (``TimeoutError`` after ``timeout`` seconds)."""
        self._call(self.running.wait_until_caught_up(timeout), timeout=None)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the group's workers (each releases its lease; the current transaction gets
        ``timeout`` seconds, default ``RuntimeSettings.stop_timeout``) and close its
        connections and transport."""
        limit = runtime_default("stop_timeout") if timeout is None else timeout
        with contextlib.suppress(Exception):
            self._call(self._close(), timeout=limit + 5)

    async def _close(self) -> None:
        await self.running.close()
        if self._transport is not None:
            await self._transport.close()

    def close(self) -> None:
        """:meth:`stop`: what every actor of an app answers before it is stopped
        (``shutdown_app``, :func:`stop_subscribers_on_ray`), so its leases are free at once."""
        self.stop()


class RaySubscribers(GroupOperations, SupervisedActors):
    """Subscriber groups running on Ray, as seen from this process: their status, the
    operations on their positions (pause, resume, skip, set offset: rows in the subscribers'
    database, whichever actor holds them), and supervision of their actors."""

    kind = "subscriber actor"

    def __init__(
        self,
        app: str,
        specs: list[tuple[str, str]],
        create: Callable[[str], Any],
        projections: Projections,
        keys: dict[tuple[str, str], Subscriber[Any]],
        *,
        owns_ray: bool,
        supervise_interval: float | None,
    ) -> None:
        creators = {name: functools.partial(create, name) for _, name in specs}
        super().__init__(app, creators, owns_ray=owns_ray, supervise_interval=supervise_interval)
        #: (group key ``topic:<topic>:<group>``, actor name) of every actor.
        self.specs = specs
        self.projections = projections
        self._by_key = {key: sub for (key, _), sub in keys.items()}

    def _groups(self) -> list[tuple[str, Subscriber[Any]]]:
        return list(self._by_key.items())

    async def actor_stats(self) -> list[dict[str, Any]]:
        """What each actor reports: per partition its position, lag, state and counters."""
        handles = self.handles()
        results = await asyncio.gather(
            *(h.status.remote() for h in handles.values()), return_exceptions=True
        )
        out: list[dict[str, Any]] = []
        for name, result in zip(handles, results, strict=True):
            if isinstance(result, BaseException):
                out.append({"actor": name, "error": repr(result)})
            else:
                out += [{"actor": name, **row} for row in result]
        return out

    async def status(self, group: str | None = None) -> list[WorkerStatus]:
        """Every (group, partition): the stored position and state from the subscribers'
        database (the lag, when the messages come from another service, is in
        :meth:`actor_stats`)."""
        keys = set(self._by_key) if group is None else {self._key(group, None)}
        return [s for s in await self.projections.status() if s.processor in keys]

    def problems(self) -> list[str]:
        """Nothing beyond what the subscribers' database shows (a replaced actor is the
        supervisor's job)."""
        return []

    async def wait_until_caught_up(self, timeout: float = CAUGHT_UP_TIMEOUT) -> None:
        """Wait until every group's partitions have stored positions at their heads as the
        transport sees them when called (``TimeoutError`` after ``timeout`` seconds)."""
        handles = self.handles()
        first = {}
        for key, name in self.specs:  # one actor per group answers for it
            if key not in first and name in handles:
                first[key] = handles[name]
        if len(first) < len({k for k, _ in self.specs}):
            raise TimeoutError("a subscriber group has no actor (being replaced)")
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(h.caught_up.remote(timeout) for h in first.values()))

    async def close(self, *, stop: bool = False) -> None:
        """Detach from the actors (they go on running); ``stop=True`` stops them first (each
        releases its leases)."""
        if not await self._detach():
            return
        if stop:
            await stop_subscribers_on_ray(self.app, self.actor_names)
        await self.projections.close()
        self._release_ray()


def subscriber_class(subscriber: Any) -> type[Subscriber[Any]]:
    if not (isinstance(subscriber, type) and issubclass(subscriber, Subscriber)):
        raise ConfigurationError(
            f"start_subscribers_on_ray() takes Subscriber classes (importable by Ray's "
            f"workers), got {subscriber!r}"
        )
    subscriber.validate()
    return subscriber


@opener
async def start_subscribers_on_ray(
    subscribers: Iterable[type[Subscriber[Any]]],
    *,
    app: str = "default",
    transport: TopicTransport | None = None,
    replicas: int = 1,
    journal_url: str | None = None,
    journal_settings: JournalSettings | None = None,
    settings: ReadSideSettings | None = None,
    runtime_settings: RuntimeSettings | None = None,
    supervise_interval: float | None = 5.0,
    start_timeout: float | None = None,
    **overrides: Any,
) -> RaySubscribers:
    """Get or create ``replicas`` actors per subscriber group in the app's namespace, each
    running the group on ``transport`` (None: the embedded one, reading the journal of
    ``journal_url`` / ``journal_settings`` in place; :class:`~lagompy.topic.HttpTransport` and
    :class:`~lagompy.topic.NatsTransport` are described to the actors, which make their own),
    and wait until they answer (``start_timeout`` seconds; None:
    ``runtime_settings.start_timeout``). Positions and the subscribers' writes go to the
    database of ``ReadSideSettings.url``, by default the journal's, as with
    :func:`~lagompy.topic.start_subscribers`. Subscriber classes must be importable by module
    name in Ray's workers (not defined in ``__main__``)."""
    classes = [subscriber_class(s) for s in subscribers]
    if not classes:
        raise ConfigurationError("start_subscribers_on_ray() needs at least one subscriber class")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigurationError(f"replicas must be an integer of at least 1, got {replicas!r}")
    keys = {(offset_key(c.topic.name, c.group), c.group): c() for c in classes}
    if len(keys) != len(classes):
        raise ConfigurationError("two subscribers share a topic and group")
    paths = {
        offset_key(c.topic.name, c.group): check_importable(c, "subscriber class") for c in classes
    }
    spec = transport_spec(transport)
    settings = _settings(settings, overrides)
    journal_settings = _journal_settings(journal_url, journal_settings)
    database = Database.create(projection_settings(journal_settings, settings))
    projections = Projections(database, None, settings=settings, owns=[database])
    try:
        await ensure_schema(database)
    except BaseException:
        await projections.close()
        raise

    runtime_settings = runtime_settings or RuntimeSettings()
    if start_timeout is None:
        start_timeout = runtime_settings.start_timeout
    owns_ray = attach(runtime_settings)
    try:
        import ray

        namespace = namespace_of(app)
        journal = actor_journal(journal_settings)
        readside = settings.model_dump()
        runtime_env = actor_runtime_env(
            [*classes, *(c.topic.source for c in classes), *(c.topic.message_type for c in classes)]
        )
        actor_cls: Any = ray.remote(SubscriberGroupActor)
        by_name: dict[str, str] = {}
        specs: list[tuple[str, str]] = []
        for c in classes:
            key = offset_key(c.topic.name, c.group)
            for replica in range(replicas):
                name = actor_name(c.topic.name, c.group, replica)
                by_name[name] = key
                specs.append((key, name))

        def create(name: str) -> Any:
            return actor_cls.options(
                name=name,
                namespace=namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=0,
                num_cpus=0,
                runtime_env=runtime_env,
            ).remote(paths[by_name[name]], spec, journal, readside, f"ray:{app}/{name}")

        await start_named_actors(
            app,
            {name: functools.partial(create, name) for _, name in specs},
            start_timeout,
            "subscriber actor",
            lambda names: stop_subscribers_on_ray(app, names),
        )
    except BaseException:
        await projections.close()
        if owns_ray:
            release()
        raise
    return RaySubscribers(
        app,
        specs,
        create,
        projections,
        keys,
        owns_ray=owns_ray,
        supervise_interval=supervise_interval,
    )


async def stop_subscribers_on_ray(
    app: str, actors: Sequence[str] | None = None, *, timeout: float | None = None
) -> int:
    """Stop the subscriber actors of ``app`` (those named, or all): each releases its leases
    (within ``timeout`` seconds; default: ``RuntimeSettings.stop_timeout``), then the actor is
    killed. Returns how many were stopped."""
    if timeout is None:
        timeout = make_settings(RuntimeSettings).stop_timeout
    named = None if actors is None else set(actors)
    return await stop_actors(
        app,
        timeout,
        lambda name: name.startswith(ACTOR_PREFIX) and (named is None or name in named),
    )
