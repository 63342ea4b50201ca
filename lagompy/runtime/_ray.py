"""Entities sharded over Ray actors: ``start()``, entity refs, and the app's lifecycle.

The only module that makes and calls the entities' actors; attaching to Ray, releasing it and
stopping an app's actors go through ``_ray_cluster.py``. ``start()`` attaches to Ray (starting a
local one on demand), records or checks the app's topology, gets or creates the app's shard
hosts (named, detached actors in the namespace ``lagompy-<app>``) and returns
:class:`ShardedEntities`, whose refs send commands through a
:class:`~lagompy.runtime._region.Region` client::

    async with start(app="users", entities=[UserEntity], journal_url="sqlite:///u.db") as entities:
        user = await entities.ref_for(UserEntity, "42").ask(RegisterUser("Ada", "ada@example.org"))

Any process attached to the same Ray cluster that calls ``start()`` for the same app reaches the
same hosts, hence the same entities.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import pickle
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, cast, overload

from lagompy._collector import tune_collector_once
from lagompy.closing import AsyncClosing, Opening, opener
from lagompy.entity import PersistentEntity
from lagompy.errors import (
    ConfigurationError,
    JournalUnavailable,
    RuntimeFailure,
    SerializationError,
)
from lagompy.runtime._defaults import default_hosts
from lagompy.runtime._host import JOURNAL_OPEN, Coordinator, ShardHost
from lagompy.runtime._in_process import InProcessEntities, start_in_process
from lagompy.runtime._loading import EntityClass, check_entity_importable
from lagompy.runtime._processing import Request
from lagompy.runtime._ray_cluster import (
    COORDINATOR,
    actor_journal,
    actor_runtime_env,
    attach,
    namespace_of,
    node_cpus,
    release,
    stop_actors,
)
from lagompy.runtime._refs import EntityRef
from lagompy.runtime._region import HostUnreachable, Outcome, Region
from lagompy.runtime._sharding import DEFAULT_SHARDS, Topology, topology_for
from lagompy.settings import JournalSettings, RuntimeSettings, make_settings

log = logging.getLogger("lagompy.runtime")

R = TypeVar("R")
C = TypeVar("C")


def host_name(index: int) -> str:
    return f"host-{index}"


# --------------------------------------------------------------------------- refs


#: The sharded runtime's refs are the same class as the in-process runtime's.
ShardedEntityRef = EntityRef


# --------------------------------------------------------------------------- Ray links


#: How long a lookup of the app's coordinator may take before re-creating a host.
COORDINATOR_TIMEOUT = 10.0


class _RayHostLink:
    def __init__(
        self,
        handle: Any,
        index: int,
        app: str,
        topology_key: str,
        create: Callable[[int], Any] | None = None,
    ) -> None:
        self.handle = handle
        self.index = index
        self.app = app
        self.namespace = namespace_of(app)
        self.topology_key = topology_key
        #: makes (or gets) the named host actor, with the options start() made it with
        self._create = create

    async def call(self, requests: list[Request]) -> list[Outcome]:
        return await self.begin(requests)

    def begin(self, requests: list[Request]) -> Awaitable[list[Outcome]]:
        """:meth:`call`, begun before this returns: the batch is pickled and handed to Ray
        now, the awaitable gives its outcomes. The region begins its calls from its flush, so
        that a batch leaves in the tick that flushes it rather than in the next one, where a
        task's first step would run (see ``Region._dispatch``)."""
        try:
            packed = self._pack(requests)
        except Exception:  # e.g. a command holding a lambda, or a lock
            return self._begin_apart(requests)
        return self._outcomes(self._submit(self.handle.process_packed, packed))

    def _pack(self, requests: list[Request]) -> bytes:
        """The argument of ``ShardHost.process_packed``: the topology key and the requests as
        plain tuples (the host rebuilds the named tuples, ``Request._make``), pickled with the
        standard C pickler."""
        rows = [tuple(r) for r in requests]
        return pickle.dumps((self.topology_key, rows), protocol=pickle.HIGHEST_PROTOCOL)

    def _submit(self, method: Any, *args: Any) -> Awaitable[Any]:
        """Make the host's call now; a future of its answer, set on this event loop.

        Ray's own ``await ref`` goes through a ``concurrent.futures.Future`` (a condition
        variable, locked to set) that ``asyncio.wrap_future`` chains to an asyncio future;
        this sets one asyncio future from Ray's completion callback, as that chain's last
        step does, with Ray's own rule for errors (``_set_future_helper``). The callback
        holds the object ref until it runs, as Ray's future does."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        try:
            ref = method.remote(*args)
            on_completed = getattr(ref, "_on_completed", None)
            settle = _ray_settle()
            if on_completed is None or settle is None:  # a Ray without them: its own await
                return cast(Awaitable[Any], ref)
            on_completed(functools.partial(_answered, loop, future, ref, settle))
        except Exception as e:
            future.set_exception(e)
        return future

    async def _outcomes(self, answer: Awaitable[Any]) -> list[Outcome]:
        import ray.exceptions

        try:
            result = await answer
        except ray.exceptions.RayActorError as e:  # ActorDiedError, ActorUnavailableError
            raise HostUnreachable(f"{type(e).__name__}: {str(e)[:300]}") from e
        outcomes: list[Outcome] = pickle.loads(result) if isinstance(result, bytes) else result
        return outcomes

    def _begin_apart(self, requests: list[Request]) -> Awaitable[list[Outcome]]:
        """Some command of the batch does not pickle with the standard pickler: pickle each
        request apart. A request that Ray's cloudpickle cannot pickle either is not sent (so
        not run) and alone gets a ``SerializationError`` naming its command; the others go
        now (before this returns, like any batch: an entity's later batch, sent meanwhile,
        must not overtake them), as objects for Ray's cloudpickle when one of them needs it."""
        cloudpickle: Any = importlib.import_module("ray.cloudpickle")
        outcomes: list[Outcome] = [(None, None)] * len(requests)
        sent: list[int] = []
        plain = True
        for n, request in enumerate(requests):
            try:
                pickle.dumps(tuple(request), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                try:
                    cloudpickle.dumps(request)
                except Exception as e:
                    outcomes[n] = (None, _unpicklable_command(request, e))
                    continue
                plain = False
            sent.append(n)
        if not sent:
            return _ready(outcomes)
        chosen = [requests[n] for n in sent]
        answer = (
            self._submit(self.handle.process_packed, self._pack(chosen))
            if plain
            else self._submit(self.handle.process, self.topology_key, chosen)
        )
        return self._merge_apart(answer, outcomes, sent)

    async def _merge_apart(
        self, answer: Awaitable[Any], outcomes: list[Outcome], sent: list[int]
    ) -> list[Outcome]:
        """The outcomes of a batch sent apart: those of the requests ``sent``, in their places
        among the refusals."""
        answered = await self._outcomes(answer)
        if len(answered) != len(sent):
            return answered  # the region reports the mismatch
        for n, outcome in zip(sent, answered, strict=True):
            outcomes[n] = outcome
        return outcomes

    async def reconnect(self) -> None:
        await self.ensure()

    async def ensure(self) -> bool:
        """Look the host up again by name; when it is gone for good (killed without restart,
        or its constructor failed), create it again, the way start() did. Returns whether it
        was created.

        A host is re-created only while the app's coordinator records this link's topology:
        ``shutdown_app`` and ``replace_hosts`` stop the coordinator before the hosts, so a
        process still attached to the old hosts never brings them back. Two processes that
        re-create the same host at once get one actor: the name decides (``get_if_exists``)."""
        import ray

        try:
            self.handle = ray.get_actor(host_name(self.index), namespace=self.namespace)
            return False
        except ValueError:
            pass
        if self._create is None:
            return False
        running = await _running_topology(self.app, COORDINATOR_TIMEOUT)
        if running is None or running.key != self.topology_key:
            log.warning(
                "shard host %d of app %r is gone and the app no longer runs this process's "
                "topology: not re-creating it",
                self.index,
                self.app,
            )
            return False
        log.warning("shard host %d of app %r is gone: re-creating it", self.index, self.app)
        self.handle = self._create(self.index)
        return True

    async def stats(self) -> dict[str, Any]:
        """The host's stats; a host that does not answer is looked up (or re-created) and
        asked once more."""
        import ray.exceptions

        for attempt in (1, 2):
            try:
                stats: dict[str, Any] = await self.handle.stats.remote()
                return stats
            except ray.exceptions.RayActorError as e:
                if attempt == 2:
                    raise RuntimeFailure(
                        f"shard host {self.index} of app {self.app!r} does not answer "
                        f"({type(e).__name__})"
                    ) from e
                await self.ensure()
        raise AssertionError("unreachable")


async def _ready(outcomes: list[Outcome]) -> list[Outcome]:
    return outcomes


@functools.cache
def _ray_settle() -> Callable[..., None] | None:
    """Ray's rule for setting a future from a completed call's result (its value, or the
    error it stands for), as Ray's own ``await ref`` applies it; None when this Ray has no
    such function (private to Ray: :meth:`_RayHostLink._submit` then awaits the ref itself,
    never a future that nothing would set)."""
    try:
        from ray._raylet import _set_future_helper
    except ImportError:
        return None
    return cast(Callable[..., None], _set_future_helper)


def _answered(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    ref: Any,
    settle: Callable[..., None],
    result: Any,
) -> None:
    """Ray's completion callback (on one of Ray's threads): hand ``result`` to ``future``'s
    event loop, unless that loop is closed (the process is shutting down)."""
    del ref  # held until now: see _RayHostLink._submit
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(_settle, settle, future, result)


def _settle(settle: Callable[..., None], future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # not cancelled meanwhile
        try:
            settle(result, py_future=future)
        except Exception as e:  # a Ray whose rule takes other arguments: the caller hears
            if not future.done():
                future.set_exception(e)


def _unpicklable_command(request: Request, error: Exception) -> SerializationError:
    reason = f"{type(error).__name__}: {error}"
    return SerializationError(
        f"command {type(request.command).__qualname__} for {request.entity_type}/"
        f"{request.entity_id} (command id {request.command_id}) cannot be sent to its shard "
        f"host: it does not pickle ({reason[:300]}); it was not run. Commands sent to entities "
        "on Ray must pickle"
    )


# --------------------------------------------------------------------------- entities


class ShardedEntities(AsyncClosing):
    """An app's entities on its shard hosts, as seen from this process."""

    #: ``/health/ready`` names the check "runtime": it asks the shard hosts.
    check_name = "runtime"
    #: The shard hosts write the journal, not this process.
    local_journal: JournalSettings | None = None

    def __init__(
        self,
        app: str,
        topology: Topology,
        entity_classes: Sequence[EntityClass],
        hosts: Sequence[Any],
        settings: RuntimeSettings,
        *,
        owns_ray: bool,
        create_host: Callable[[int], Any] | None = None,
    ) -> None:
        self.app = app
        self.topology = topology
        self.settings = settings
        self.namespace = namespace_of(app)
        self._types = {cls.type_name: cls for cls in entity_classes}
        self._links = [
            _RayHostLink(h, i, app, topology.key, create_host) for i, h in enumerate(hosts)
        ]
        self.region = Region(
            self._links,
            shards=topology.shards,
            max_batch=settings.max_batch,
            max_in_flight=settings.max_in_flight,
            max_pending=settings.max_pending,
            retries=settings.retries,
            retry_backoff=settings.retry_backoff,
            retry_backoff_max=settings.retry_backoff_max,
        )
        self._owns_ray = owns_ray
        self._closed = False

    def ref_for(
        self, entity: type[PersistentEntity[C, Any, Any]] | str, entity_id: str
    ) -> EntityRef[C]:
        """A ref to the entity ``entity_id`` of this type. Raises ``InvalidEntityId`` (a
        ``ValueError``) for an id that is not a ``str`` of 1 to 255 characters without NUL or
        lone surrogates (other types are refused, never turned into text), and
        ``ConfigurationError`` for an entity type that is not registered."""
        type_name = entity if isinstance(entity, str) else entity.type_name
        if type_name not in self._types:
            raise ConfigurationError(
                f"no entity with type_name {type_name!r} is registered in app {self.app!r} "
                f"(known: {sorted(self._types)})"
            )
        return EntityRef(self.region.submit, type_name, entity_id)

    async def host_stats(self, *, require_journal: bool = True) -> list[dict[str, Any]]:
        """Counters of every shard host: batches, requests, write transactions, events, live
        entities, passivated entities..., and its journal's state (``journal``: ``open``,
        ``opening``, ``unavailable``; ``journal_open_attempts``; ``journal_error``).

        Raises ``RuntimeFailure`` naming a host that does not answer (a host gone for good is
        re-created meanwhile) and, unless ``require_journal=False``, ``JournalUnavailable``
        naming the hosts that have not opened the journal: a service's readiness check calls
        this, so such a service reports itself not ready."""
        results = await asyncio.gather(
            *(link.stats() for link in self._links), return_exceptions=True
        )
        stats: list[dict[str, Any]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            stats.append(result)
        if require_journal:
            closed = [s for s in stats if s.get("journal", JOURNAL_OPEN) != JOURNAL_OPEN]
            if closed:
                which = ", ".join(
                    f"{s['index']} ({s['journal']} after {s['journal_open_attempts']} attempts)"
                    for s in closed
                )
                raise JournalUnavailable(
                    f"shard hosts of app {self.app!r} have not opened the journal yet: {which}; "
                    "their asks answer JournalUnavailable until they can reach the database"
                )
        return stats

    async def check(self) -> None:
        """Return when every shard host answers and has its journal open; else raise
        ``RuntimeFailure`` or ``JournalUnavailable`` naming the hosts (see
        :meth:`host_stats`)."""
        await self.host_stats()

    async def ensure_hosts(self) -> int:
        """Create again every shard host that is gone for good (killed without restart, or
        dead after its restarts ran out); returns how many. Asks do this by themselves for
        the host they need (before they are resent); this brings them all back at once."""
        created = 0
        for link in self._links:
            created += await link.ensure()
        return created

    def stats(self) -> dict[str, Any]:
        """This process's region client: asks, batches, resends, outcome_unknown, overloaded,
        outstanding asks, queue depth and calls in flight per host, batch sizes, asks/s, and ask
        latency percentiles (p50/p99/max over the last 10,000 asks)."""
        return self.region.stats()

    async def close(self, *, shutdown: bool = False) -> None:
        """Wait for the asks already made, then detach. With ``shutdown=True`` also stop the
        app's shard hosts (every process's asks to them fail). A local Ray that ``start()``
        started is shut down when its last user closes."""
        if self._closed:
            return
        self._closed = True
        await self.region.close()
        if shutdown:
            await shutdown_app(self.app)
        if self._owns_ray:
            release()


# --------------------------------------------------------------------------- start


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    runtime: dict[str, Any] = {}
    journal: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in RuntimeSettings.model_fields:
            runtime[key] = value
        elif key in JournalSettings.model_fields:
            journal[key] = value
        else:
            raise ConfigurationError(
                f"start() got an unknown setting {key!r}: not a field of RuntimeSettings or "
                "JournalSettings"
            )
    return runtime, journal


@overload
def start(
    *,
    app: str = ...,
    entities: Iterable[EntityClass],
    journal_url: str | None = ...,
    ray: Literal[True] = ...,
    settings: RuntimeSettings | None = ...,
    journal_settings: JournalSettings | None = ...,
    replace_hosts: bool = ...,
    **overrides: Any,
) -> Opening[ShardedEntities]: ...


@overload
def start(
    *,
    app: str = ...,
    entities: Iterable[EntityClass],
    journal_url: str | None = ...,
    ray: Literal[False],
    settings: RuntimeSettings | None = ...,
    journal_settings: JournalSettings | None = ...,
    replace_hosts: bool = ...,
    **overrides: Any,
) -> Opening[InProcessEntities]: ...


@opener
async def start(
    *,
    app: str = "default",
    entities: Iterable[EntityClass],
    journal_url: str | None = None,
    ray: bool = True,
    settings: RuntimeSettings | None = None,
    journal_settings: JournalSettings | None = None,
    replace_hosts: bool = False,
    **overrides: Any,
) -> ShardedEntities | InProcessEntities:
    """Start (or attach to) the app's entities.

    With ``ray=True`` (the default) the entities run on the app's shard hosts on Ray; with
    ``ray=False`` they run in this process (:func:`lagompy.start_in_process`). Keyword
    ``overrides`` set fields of :class:`~lagompy.settings.RuntimeSettings` (``hosts=2``) or of
    :class:`~lagompy.settings.JournalSettings` (``pool_size=2``); they, and ``journal_url``,
    replace those fields of ``settings`` and ``journal_settings`` when these are given too
    (:func:`~lagompy.settings.make_settings`). Once started, this process's garbage collector
    is tuned as shard hosts tune theirs, unless ``collector="default"`` (see
    :class:`~lagompy.settings.RuntimeSettings`).

    Raises ``ConfigurationError`` when an entity class cannot be imported by Ray's workers,
    when the app already runs with another topology (the message names what differs; pass
    ``replace_hosts=True`` to stop the old hosts and start new ones), or when a host cannot
    start.
    """
    entity_list = list(entities)
    if not entity_list:
        raise ConfigurationError("start() needs at least one entity class")
    runtime_overrides, journal_overrides = _split_overrides(overrides)
    if journal_url is not None:
        journal_overrides["url"] = journal_url
    journal_settings = make_settings(JournalSettings, journal_settings, **journal_overrides)
    settings = make_settings(RuntimeSettings, settings, **runtime_overrides)
    for cls in entity_list:
        cls.validate()
    started: ShardedEntities | InProcessEntities
    if not ray:
        started = await start_in_process(
            entities=entity_list,
            max_batch=settings.max_batch,
            max_entities=settings.max_entities,
            idle_timeout=settings.idle_timeout,
            conflict_retries=settings.conflict_retries,
            max_pending=settings.max_pending,
            settings=journal_settings,
            # The journal opens in this process, whose collector is this start()'s to tune.
            collector=settings.collector,
        )
    else:
        paths = [check_entity_importable(cls) for cls in entity_list]
        owns_ray = attach(settings)
        try:
            started = await _start_on_ray(
                app, entity_list, paths, journal_settings, settings, replace_hosts, owns_ray
            )
        except BaseException:
            if owns_ray:
                release()
            raise
    if settings.collector == "tuned":
        # This process runs the region client (on Ray) or the entities themselves (in
        # process): it is on the path of every ask. See lagompy/_collector.py.
        tune_collector_once()
    return started


async def _start_on_ray(
    app: str,
    entity_list: list[EntityClass],
    paths: list[str],
    journal_settings: JournalSettings,
    settings: RuntimeSettings,
    replace_hosts: bool,
    owns_ray: bool,
) -> ShardedEntities:
    import ray

    namespace = namespace_of(app)
    if replace_hosts:
        # The shard hosts and the coordinator only: the app's read-side workers go on.
        await stop_actors(app, settings.stop_timeout, _is_entity_actor)
    running = await _running_topology(app, settings.start_timeout)
    shards = settings.shards or (running.shards if running else DEFAULT_SHARDS)
    hosts = settings.hosts or (running.hosts if running else default_hosts(node_cpus()))
    topology = topology_for(app, entity_list, journal_settings, shards=shards, hosts=hosts)
    create_host = _host_factory(app, topology, entity_list, paths, journal_settings, settings)
    # With no coordinator yet (a first start, or after replace_hosts) the hosts start beside
    # it: each actor is a process of its own, and one after the other put the coordinator's
    # start before the hosts' (measured on 2 cores: a first start(hosts=1) and its first ask
    # took 3.15 s, now 2.14 s; means of 5 alternating pairs). Only a concurrent start with
    # another topology can then win the coordinator: the hosts made here for the refused
    # topology are stopped below.
    early = [create_host(i) for i in range(hosts)] if running is None else None

    try:
        coordinator: Any = (
            ray.remote(Coordinator)
            .options(
                name=COORDINATOR,
                namespace=namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=-1,
            )
            .remote(topology.to_dict())
        )
        recorded = Topology.from_dict(
            await asyncio.wait_for(coordinator.topology.remote(), settings.start_timeout)
        )
        differences = topology.differences(recorded)
        if differences:
            raise ConfigurationError(
                f"app {app!r} already runs with another topology; "
                + "; ".join(differences)
                + f". To move the app onto these settings or this code, start(..., "
                f"replace_hosts=True) or lagompy.runtime.shutdown_app({app!r}) first"
            )
    except Exception:
        if early is not None:
            await _stop_hosts_of(topology, early, settings.stop_timeout)
        raise

    handles = early if early is not None else [create_host(i) for i in range(hosts)]
    try:
        for attempt in range(_RESTARTS_AFTER_A_STOP + 1):
            try:
                pings = await _ping_all(handles, settings.start_timeout)
                break
            except ray.exceptions.RayActorError as e:
                if attempt == _RESTARTS_AFTER_A_STOP or not _maybe_stopped(e):
                    raise
            # Another process stopped the app's hosts while this one started them: its own
            # start found that they could not run (``run --workers N``: each worker starts the
            # app, and the first to see a journal without its tables stops the hosts). Start
            # them again, once their names are free, to meet the cause here too (a host that
            # cannot start for a reason of its own fails the same way each time).
            await asyncio.sleep(0.2 * (attempt + 1))
            handles = [create_host(i) for i in range(hosts)]
    except TimeoutError:
        raise ConfigurationError(
            f"the shard hosts of app {app!r} did not answer within {settings.start_timeout} s"
        ) from None
    except ray.exceptions.RayActorError as e:
        cause = str(e)
        await shutdown_app(app)
        raise ConfigurationError(
            f"a shard host of app {app!r} could not start (entity classes {paths}): "
            f"{_last_error_line(cause)}\n{cause}"
        ) from e
    for ping in pings:
        if ping["topology_key"] != topology.key:
            raise ConfigurationError(
                f"shard host {ping['index']} of app {app!r} runs another topology than the "
                "one recorded (a host from an earlier start survived); start(..., "
                "replace_hosts=True) to replace the hosts"
            )
    for ping in pings:
        if ping.get("journal_misconfigured"):
            await shutdown_app(app)
            raise ConfigurationError(
                f"shard host {ping['index']} of app {app!r} cannot open the journal: "
                f"{ping['journal_error']}"
            )
        if ping.get("journal", JOURNAL_OPEN) != JOURNAL_OPEN:
            # A host never needs the database to start: it keeps trying in the background
            # and its asks answer JournalUnavailable meanwhile.
            log.warning(
                "shard host %d of app %r started without its journal (%s): its asks answer "
                "JournalUnavailable until it opens",
                ping["index"],
                app,
                ping.get("journal_error") or ping.get("journal"),
            )
    return ShardedEntities(
        app, topology, entity_list, handles, settings, owns_ray=owns_ray, create_host=create_host
    )


#: How many times start() makes the hosts again when another process stopped them meanwhile.
_RESTARTS_AFTER_A_STOP = 3


async def _ping_all(handles: list[Any], timeout: float) -> list[dict[str, Any]]:
    pings: list[dict[str, Any]] = await asyncio.wait_for(
        asyncio.gather(*(h.ping.remote() for h in handles)), timeout
    )
    return pings


def _maybe_stopped(error: Exception) -> bool:
    """Whether an actor may have died of ``ray.kill`` (a stop: ``shutdown_app``,
    ``replace_hosts``) rather than of an error raised while it was made. Ray names a kill
    only in its message, and only once its control store has recorded the death: a call
    that fails before that reads "died unexpectedly", without the cause (seen with
    ``run --workers 2`` on a loaded machine). An error of the actor's ``__init__`` is known
    at once (``actor_init_failed``): starting it again would fail the same way."""
    return "killed by `ray.kill`" in str(error) or not getattr(error, "actor_init_failed", False)


async def _stop_hosts_of(topology: Topology, handles: list[Any], timeout: float) -> None:
    """Stop the hosts among ``handles`` that run ``topology`` (those this process made for a
    topology the coordinator refused); leave the others (another start's) alone."""
    import ray

    async def stop(handle: Any) -> None:
        with contextlib.suppress(Exception):  # gone, or never started: nothing to stop
            ping = await asyncio.wait_for(handle.ping.remote(), timeout)
            if ping["topology_key"] == topology.key:
                ray.kill(handle, no_restart=True)

    await asyncio.gather(*(stop(h) for h in handles))


def _host_factory(
    app: str,
    topology: Topology,
    entity_list: list[EntityClass],
    paths: list[str],
    journal_settings: JournalSettings,
    settings: RuntimeSettings,
) -> Callable[[int], Any]:
    """A function that gets or creates shard host ``i`` of the app (a named, detached actor):
    start() makes the hosts with it, and the app's region clients make a host again with it
    when it is gone for good. ``get_if_exists`` makes every caller converge on one actor per
    name, however many create it at once."""
    import ray

    journal = actor_journal(journal_settings)
    journal["pool_size"] = settings.host_pool_size
    journal["max_overflow"] = settings.host_max_overflow
    runtime_env = actor_runtime_env(entity_list)
    host_cls: Any = ray.remote(ShardHost)
    namespace = namespace_of(app)
    recorded = topology.to_dict()

    def create(index: int) -> Any:
        return host_cls.options(
            name=host_name(index),
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=settings.host_max_restarts,
            max_task_retries=0,
            max_concurrency=1,
            num_cpus=settings.host_num_cpus,
            # Over the nodes, best effort: the default host count is one per node.
            scheduling_strategy="SPREAD",
            runtime_env=runtime_env,
        ).remote(
            recorded,
            index,
            paths,
            journal,
            max_entities=settings.max_entities,
            idle_timeout=settings.idle_timeout,
            conflict_retries=settings.conflict_retries,
            passivate_interval=settings.passivate_interval,
        )

    return create


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else text


async def _running_topology(app: str, timeout: float) -> Topology | None:
    import ray

    try:
        coordinator = ray.get_actor(COORDINATOR, namespace=namespace_of(app))
    except ValueError:
        return None
    try:
        return Topology.from_dict(await asyncio.wait_for(coordinator.topology.remote(), timeout))
    except ray.exceptions.RayActorError:
        return None


async def shutdown_app(app: str, *, timeout: float | None = None) -> int:
    """Stop every actor of the app (its shard hosts, its coordinator and its read-side
    workers): the next ``start()`` records a new topology and starts hosts on the code on disk
    now. Each actor is stopped through its own ``close()`` first, within ``timeout`` seconds
    (default: ``RuntimeSettings.stop_timeout``): hosts release their journal connections and
    read-side workers their leases, which another worker can take at once. Returns how many
    actors were stopped. Needs Ray to be initialized (a ``start()`` in this process, or
    ``ray.init``)."""
    if timeout is None:
        timeout = make_settings(RuntimeSettings).stop_timeout
    return await stop_actors(app, timeout)


def _is_entity_actor(name: str) -> bool:
    return name.startswith("host-") or name == COORDINATOR


__all__ = [
    "ShardedEntities",
    "ShardedEntityRef",
    "namespace_of",
    "shutdown_app",
    "start",
]
