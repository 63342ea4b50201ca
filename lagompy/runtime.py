"""Entities sharded over Ray actors: ``start()``, entity refs, and the app's lifecycle.

This is the only module that talks to Ray. ``start()`` attaches to Ray (starting a local one on
demand), records or checks the app's topology, gets or creates the app's shard hosts (named,
detached actors in the namespace ``lagompy-<app>``) and returns :class:`ShardedEntities`, whose
refs send commands through a :class:`~lagompy.region.Region` client::

    entities = await start(app="users", entities=[UserEntity], journal_url="sqlite:///u.db")
    user = await entities.ref_for(UserEntity, "42").ask(RegisterUser("Ada", "ada@example.org"))
    await entities.close()

Any process attached to the same Ray cluster that calls ``start()`` for the same app reaches the
same hosts, hence the same entities.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

from lagompy.closing import AsyncClosing
from lagompy.entity import PersistentEntity
from lagompy.errors import ConfigurationError
from lagompy.host import Coordinator, ShardHost
from lagompy.in_process import InProcessEntities, start_in_process
from lagompy.processing import EntityClass, Request
from lagompy.refs import EntityRef
from lagompy.region import HostUnreachable, Outcome, Region
from lagompy.settings import JournalSettings, RuntimeSettings, make_settings
from lagompy.sharding import (
    DEFAULT_SHARDS,
    Topology,
    check_entity_importable,
    import_roots,
    topology_for,
)

log = logging.getLogger("lagompy.runtime")

R = TypeVar("R")
C = TypeVar("C")

COORDINATOR = "coordinator"

_ray_owned = False  # start() initialized Ray in this process
_ray_users = 0  # open ShardedEntities that rely on a Ray this process started


def namespace_of(app: str) -> str:
    """The Ray namespace that holds an app's coordinator and shard hosts."""
    return f"lagompy-{app}"


def host_name(index: int) -> str:
    return f"host-{index}"


# --------------------------------------------------------------------------- refs


#: The sharded runtime's refs are the same class as the in-process runtime's.
ShardedEntityRef = EntityRef


# --------------------------------------------------------------------------- Ray links


class _RayHostLink:
    def __init__(self, handle: Any, index: int, namespace: str, topology_key: str) -> None:
        self.handle = handle
        self.index = index
        self.namespace = namespace
        self.topology_key = topology_key

    async def call(self, requests: list[Request]) -> list[Outcome]:
        import ray.exceptions

        batch: list[Request] | bytes
        try:
            # Plain tuples: the host rebuilds the named tuples (Request._make).
            batch = pickle.dumps([tuple(r) for r in requests], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # e.g. a command holding a lambda: let Ray's cloudpickle try
            batch = requests
        try:
            answer = await self.handle.process.remote(self.topology_key, batch)
        except ray.exceptions.RayActorError as e:  # ActorDiedError, ActorUnavailableError
            raise HostUnreachable(f"{type(e).__name__}: {str(e)[:300]}") from e
        outcomes: list[Outcome] = pickle.loads(answer) if isinstance(answer, bytes) else answer
        return outcomes

    async def reconnect(self) -> None:
        import ray

        try:
            self.handle = ray.get_actor(host_name(self.index), namespace=self.namespace)
        except ValueError:
            pass  # gone for good: the resend fails and the asks end in OutcomeUnknown


# --------------------------------------------------------------------------- entities


class ShardedEntities(AsyncClosing):
    """An app's entities on its shard hosts, as seen from this process."""

    def __init__(
        self,
        app: str,
        topology: Topology,
        entity_classes: Sequence[EntityClass],
        hosts: Sequence[Any],
        settings: RuntimeSettings,
        *,
        owns_ray: bool,
    ) -> None:
        self.app = app
        self.topology = topology
        self.settings = settings
        self.namespace = namespace_of(app)
        self._types = {cls.type_name: cls for cls in entity_classes}
        self._hosts = list(hosts)
        self.region = Region(
            [_RayHostLink(h, i, self.namespace, topology.key) for i, h in enumerate(self._hosts)],
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
        type_name = entity if isinstance(entity, str) else entity.type_name
        if type_name not in self._types:
            raise ConfigurationError(
                f"no entity with type_name {type_name!r} is registered in app {self.app!r} "
                f"(known: {sorted(self._types)})"
            )
        return EntityRef(self.region.submit, type_name, str(entity_id))

    async def host_stats(self) -> list[dict[str, Any]]:
        """Counters of every shard host: batches, requests, write transactions, events, live
        entities, passivated entities..."""
        return list(await asyncio.gather(*(h.stats.remote() for h in self._hosts)))

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
            _release_ray()




# --------------------------------------------------------------------------- start


def _ensure_ray(settings: RuntimeSettings) -> bool:
    """Attach to Ray if needed; True if this call started or attached it (then close() shuts
    it down)."""
    global _ray_owned, _ray_users
    import ray

    if ray.is_initialized():
        if _ray_owned:
            _ray_users += 1
            return True
        return False
    import atexit

    from lagompy import ray_cluster

    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        context: Any = ray.init(
            address="local",
            object_store_memory=settings.object_store_memory,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        # Recorded so that `lagompy entities stats` finds this Ray without an address.
        gcs_address = str(context.address_info["gcs_address"])
        if ray_cluster.record_local_ray(gcs_address, os.environ.get("RAY_AUTH_MODE")):
            atexit.register(ray_cluster.forget_local_ray)
        log.info("started a local Ray at %s", gcs_address)
    else:
        # Fails in seconds, saying why, where ray.init would retry for a minute.
        ray_cluster.check_attach(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConfigurationError(f"cannot attach to the Ray cluster at {address}: {e}") from e
    _ray_owned = True
    _ray_users += 1
    return True


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
async def start(
    *,
    app: str = ...,
    entities: Iterable[EntityClass],
    journal_url: str | None = ...,
    ray: Literal[True] = ...,
    settings: RuntimeSettings | None = ...,
    journal_settings: JournalSettings | None = ...,
    replace_hosts: bool = ...,
    **overrides: Any,
) -> ShardedEntities: ...


@overload
async def start(
    *,
    app: str = ...,
    entities: Iterable[EntityClass],
    journal_url: str | None = ...,
    ray: Literal[False],
    settings: RuntimeSettings | None = ...,
    journal_settings: JournalSettings | None = ...,
    replace_hosts: bool = ...,
    **overrides: Any,
) -> InProcessEntities: ...


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
    :class:`~lagompy.settings.JournalSettings` (``pool_size=2``).

    Raises ``ConfigurationError`` when an entity class cannot be imported by Ray's workers,
    when the app already runs with another topology (the message names what differs; pass
    ``replace_hosts=True`` to stop the old hosts and start new ones), or when a host cannot
    start.
    """
    entity_list = list(entities)
    if not entity_list:
        raise ConfigurationError("start() needs at least one entity class")
    runtime_overrides, journal_overrides = _split_overrides(overrides)
    if journal_settings is None:
        if journal_url is not None:
            journal_overrides["url"] = journal_url
        journal_settings = make_settings(JournalSettings, **journal_overrides)
    elif journal_url is not None or journal_overrides:
        raise ConfigurationError("pass journal_settings or journal_url/journal keywords, not both")
    if settings is None:
        settings = make_settings(RuntimeSettings, **runtime_overrides)
    elif runtime_overrides:
        settings = make_settings(RuntimeSettings, settings, **runtime_overrides)
    for cls in entity_list:
        cls.validate()
    if not ray:
        return await start_in_process(
            entities=entity_list,
            max_batch=settings.max_batch,
            max_entities=settings.max_entities,
            idle_timeout=settings.idle_timeout,
            conflict_retries=settings.conflict_retries,
            max_pending=settings.max_pending,
            settings=journal_settings,
        )
    paths = [check_entity_importable(cls) for cls in entity_list]
    owns_ray = _ensure_ray(settings)
    try:
        return await _start_on_ray(
            app, entity_list, paths, journal_settings, settings, replace_hosts, owns_ray
        )
    except BaseException:
        if owns_ray:
            _release_ray()
        raise


def _release_ray() -> None:
    global _ray_users, _ray_owned
    _ray_users -= 1
    if _ray_users == 0 and _ray_owned:
        import ray

        ray.shutdown()
        _ray_owned = False


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
        await _stop_actors(app, 5.0, _is_entity_actor)
    running = await _running_topology(app, settings.start_timeout)
    shards = settings.shards or (running.shards if running else DEFAULT_SHARDS)
    hosts = settings.hosts or (running.hosts if running else max(1, int(_cluster_cpus())))
    topology = topology_for(app, entity_list, journal_settings, shards=shards, hosts=hosts)

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

    journal = journal_settings.model_dump()
    from lagompy.database import normalize_url

    journal["url"] = normalize_url(journal_settings.url).render_as_string(hide_password=False)
    journal["pool_size"] = settings.host_pool_size
    journal["max_overflow"] = settings.host_max_overflow
    roots = import_roots(entity_list)
    existing = os.environ.get("PYTHONPATH")
    pythonpath = os.pathsep.join([*roots, *([existing] if existing else [])])
    host_cls: Any = ray.remote(ShardHost)
    handles = [
        host_cls.options(
            name=host_name(i),
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=settings.host_max_restarts,
            max_task_retries=0,
            max_concurrency=1,
            num_cpus=settings.host_num_cpus,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None,
        ).remote(
            topology.to_dict(),
            i,
            paths,
            journal,
            max_entities=settings.max_entities,
            idle_timeout=settings.idle_timeout,
            conflict_retries=settings.conflict_retries,
            passivate_interval=settings.passivate_interval,
        )
        for i in range(hosts)
    ]
    try:
        pings = await asyncio.wait_for(
            asyncio.gather(*(h.ping.remote() for h in handles)), settings.start_timeout
        )
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
    return ShardedEntities(app, topology, entity_list, handles, settings, owns_ray=owns_ray)


def _cluster_cpus() -> float:
    import ray

    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return resources.get("CPU", 1.0)


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


async def shutdown_app(app: str, *, timeout: float = 5.0) -> int:
    """Stop every actor of the app (its shard hosts, its coordinator and its read-side
    workers): the next ``start()`` records a new topology and starts hosts on the code on disk
    now. Hosts release their journal connections first (within ``timeout`` seconds). Returns
    how many actors were stopped. Needs Ray to be initialized (a ``start()`` in this process,
    or ``ray.init``)."""
    return await _stop_actors(app, timeout, lambda name: True)


def _is_entity_actor(name: str) -> bool:
    return name.startswith("host-") or name == COORDINATOR


async def _stop_actors(app: str, timeout: float, which: Callable[[str], bool]) -> int:
    import ray

    namespace = namespace_of(app)
    actors = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and which(entry["name"])
    ]
    handles = []
    for name in actors:
        try:
            handles.append((name, ray.get_actor(name, namespace=namespace)))
        except ValueError:
            continue
    closing = [h.close.remote() for name, h in handles if name.startswith("host-")]
    if closing:
        try:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), timeout)
        except TimeoutError:
            log.warning("shard hosts of app %r did not close within %s s", app, timeout)
    for _, handle in handles:
        ray.kill(handle, no_restart=True)
    # Wait until the names are free, so that a start() right after creates new actors
    # instead of getting the dying ones.
    deadline = time.monotonic() + timeout
    for name, _ in handles:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            await asyncio.sleep(0.05)
    return len(handles)


__all__ = [
    "ShardedEntities",
    "ShardedEntityRef",
    "namespace_of",
    "shutdown_app",
    "start",
]
