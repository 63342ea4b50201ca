"""Finding and reaching a Ray cluster: the local Rays lagompy started, and a quick check that an
address can be attached to before ``ray.init`` spends a minute retrying.

**Local Rays.** A process whose ``lagompy.start()`` (or ``lagompy run``) starts a local Ray
records its address in a small file, ``<LAGOMPY_LOCAL_RAY_DIR>/<pid>.json`` (default
``<temp dir>/lagompy-<uid>/local-ray``), with the authentication mode of that Ray but never its
token; ``lagompy entities stats`` reads these records to reach the app without an address.
A record whose process is gone, or whose Ray no longer answers, is ignored and removed.

**Attach check.** ``ray.init(address=...)`` retries a refused connection or a rejected token for
20 to 60 seconds, printing a warning a second, and then says only "Failed to connect". Before it,
:func:`check_attach` opens a TCP connection to the address (a few seconds at most), then asks
the cluster for its id in a child process (a second or two): an address that refuses
connections, a token the cluster rejects (Ray 2.59 and later turn token authentication on for
clusters started where a token exists, and a process attaching with an explicit address sends
none unless ``RAY_AUTH_MODE=token``), or something that is not a Ray cluster each fail with a
``ConfigurationError`` that says which, within seconds.

**This process's Ray.** :func:`attach` attaches this process to Ray (a new local Ray unless
``RuntimeSettings.ray_address`` or ``RAY_ADDRESS`` names a cluster) for the entities' and the
read sides' handles; each handle that relied on it calls :func:`release` when it closes, and the
last one shuts down a Ray that :func:`attach` started. ``lagompy run`` starts (and stops) a
head for its worker processes with :func:`start_head` and :func:`stop_head`; ``lagompy entities
stats`` attaches for a moment with :func:`attached`.

**An app's actors.** An app's actors are named, detached actors in its namespace
(:func:`namespace_of`): the coordinator, the shard hosts, the read-side workers.
:func:`stop_actors` stops them the one way: each is asked to ``close()`` (a shard host releases
its journal connections, a read-side worker stops and releases its lease at once), then killed,
the coordinator first; it returns once their names are free.

Every other module reaches Ray's cluster through these functions; the actor classes and the calls
to them stay with their owners (``_ray.py`` and ``_host.py`` for entities,
``lagompy.readside._ray`` for read sides).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lagompy.closing import AsyncClosing
from lagompy.errors import ConfigurationError
from lagompy.runtime._loading import import_roots, installed_root, program_path
from lagompy.settings import JournalSettings, RuntimeSettings

__all__ = [
    "COORDINATOR",
    "ActorLoop",
    "LocalRay",
    "SupervisedActors",
    "actor_journal",
    "actor_names",
    "actor_runtime_env",
    "app_names",
    "attach",
    "attached",
    "check_attach",
    "forget_local_ray",
    "job_config",
    "local_ray_dir",
    "local_rays",
    "namespace_of",
    "node_cpus",
    "record_local_ray",
    "release",
    "start_head",
    "start_named_actors",
    "stop_actors",
    "stop_head",
]

log = logging.getLogger("lagompy.runtime")

T = TypeVar("T")

#: Environment variable naming the directory of local Ray records.
LOCAL_RAY_DIR_ENV = "LAGOMPY_LOCAL_RAY_DIR"
#: Seconds to open a TCP connection to a Ray address.
CONNECT_TIMEOUT = 3.0
#: Seconds the child process may take to get the cluster's id.
PROBE_TIMEOUT = 20.0
#: Where Ray looks for a token when RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are not set.
TOKEN_SOURCES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


@dataclass(frozen=True)
class LocalRay:
    """A local Ray a lagompy process started: its GCS address, the process, the auth mode."""

    address: str
    pid: int
    auth_mode: str


def local_ray_dir() -> Path:
    given = os.environ.get(LOCAL_RAY_DIR_ENV)
    if given:
        return Path(given)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"lagompy-{uid}" / "local-ray"


def record_local_ray(address: str, auth_mode: str | None) -> Path | None:
    """Record that this process started a local Ray at ``address`` (best effort: a directory
    that cannot be written only costs ``lagompy entities stats`` its default)."""
    record = LocalRay(address, os.getpid(), auth_mode or "disabled")
    directory = local_ray_dir()
    path = directory / f"{record.pid}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.__dict__))
        temporary.replace(path)
    except OSError:
        return None
    return path


def forget_local_ray(pid: int | None = None) -> None:
    """Remove the record of process ``pid`` (default: this process)."""
    with contextlib.suppress(OSError):
        (local_ray_dir() / f"{os.getpid() if pid is None else pid}.json").unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_rays() -> list[LocalRay]:
    """The recorded local Rays whose process is alive and whose address accepts connections,
    newest first; records of dead processes are removed."""
    found: list[tuple[float, LocalRay]] = []
    directory = local_ray_dir()
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            record = LocalRay(**json.loads(path.read_text()))
            modified = path.stat().st_mtime
        except (OSError, ValueError, TypeError):
            continue
        if not _alive(record.pid):
            forget_local_ray(record.pid)
            continue
        if _connect_error(record.address, 1.0) is None:
            found.append((modified, record))
    return [record for _, record in sorted(found, key=lambda f: f[0], reverse=True)]


# --------------------------------------------------------------------------- attach check


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _connect_error(address: str, timeout: float) -> str | None:
    target = _host_port(address)
    if target is None:
        return f"{address!r} is not HOST:PORT"
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)


_PROBE = """
import json, sys
try:
    from ray._raylet import GcsClient
except Exception:
    print(json.dumps({"result": "skipped"}))
    sys.exit(0)
try:
    GcsClient(address=sys.argv[1])
    print(json.dumps({"result": "ok"}))
except Exception as e:
    kind = "auth" if type(e).__name__ == "AuthenticationError" else "error"
    print(json.dumps({"result": kind, "error": type(e).__name__, "message": str(e)[:300]}))
"""


def _auth_hint() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        return (
            "the cluster requires token authentication and this process sends no token: set "
            f"RAY_AUTH_MODE=token, with the cluster's token in {TOKEN_SOURCES}"
        )
    return f"the cluster rejected this process's token ({TOKEN_SOURCES}): give it the cluster's"


def check_attach(address: str) -> None:
    """Raise ``ConfigurationError`` within seconds if ``address`` (a Ray GCS ``HOST:PORT``)
    cannot be attached to. ``auto``, ``local`` and ``ray://`` (Ray Client) addresses are not
    checked here."""
    if address in ("auto", "local") or "://" in address:
        return
    where = f"cannot attach to the Ray cluster at {address}"
    problem = _connect_error(address, CONNECT_TIMEOUT)
    if problem is not None:
        raise ConfigurationError(f"{where}: {problem} (is a Ray head running there?)")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ConfigurationError(
            f"{where}: it accepts connections but did not answer as a Ray cluster within "
            f"{PROBE_TIMEOUT:g} s"
        ) from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    result = answer.get("result")
    if result in ("ok", "skipped"):
        return
    if result == "auth":
        raise ConfigurationError(f"{where}: {_auth_hint()}")
    if result == "error":
        raise ConfigurationError(
            f"{where}: {answer.get('error')}: {' '.join(str(answer.get('message')).split())}"
        )
    # The probe itself failed (e.g. a broken interpreter): let ray.init have its say.


# --------------------------------------------------------------------------- this process's Ray

_owned = False  # attach() initialized Ray in this process
_users = 0  # open handles (entities, read sides) that rely on a Ray this process started


def attach(settings: RuntimeSettings) -> bool:
    """Attach this process to Ray if it is not yet; True if the caller now relies on a Ray
    this process started (it calls :func:`release` when it closes)."""
    global _owned, _users
    import ray

    if ray.is_initialized():
        if _owned:
            _users += 1
            return True
        return False
    import atexit

    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        context: Any = ray.init(
            address="local",
            object_store_memory=settings.object_store_memory,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            job_config=job_config(),
        )
        # Recorded so that `lagompy entities stats` finds this Ray without an address.
        gcs_address = str(context.address_info["gcs_address"])
        if record_local_ray(gcs_address, os.environ.get("RAY_AUTH_MODE")):
            atexit.register(forget_local_ray)
        log.info("started a local Ray at %s", gcs_address)
    else:
        # Fails in seconds, saying why, where ray.init would retry for a minute.
        check_attach(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, job_config=job_config())
        except ConnectionError as e:
            raise ConfigurationError(f"cannot attach to the Ray cluster at {address}: {e}") from e
    _owned = True
    _users += 1
    return True


def release() -> None:
    """A handle that :func:`attach` returned True to is closed: the last one shuts down the
    Ray this process started."""
    global _users, _owned
    _users -= 1
    if _users == 0 and _owned:
        import ray

        ray.shutdown()
        _owned = False


def start_head() -> str:
    """Start a local Ray head for other processes to attach to (``lagompy run`` with several
    workers) and record it; returns its address."""
    import ray

    context: Any = ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    address = str(context.address_info["gcs_address"])
    record_local_ray(address, os.environ.get("RAY_AUTH_MODE"))
    return address


def stop_head() -> None:
    """Shut down the head :func:`start_head` started, and forget its record."""
    import ray

    ray.shutdown()
    forget_local_ray()


@contextlib.contextmanager
def attached(address: str) -> Iterator[None]:
    """This process attached to the Ray cluster at ``address`` for the block (checked first,
    see :func:`check_attach`), detached after it."""
    import ray

    check_attach(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:
        raise ConfigurationError(f"cannot attach to the Ray cluster at {address}: {e}") from e
    try:
        yield
    finally:
        ray.shutdown()


def node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray cluster this process is attached to."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes if n.get("Alive")]


# --------------------------------------------------------------------------- an app's actors


def job_config() -> Any:
    """The ``JobConfig`` lagompy gives ``ray.init``: the directories this process imports its
    code from (:func:`~lagompy.runtime._loading.program_path`) go on the ``sys.path`` of every
    worker of its job (Ray's ``py_driver_sys_path``, to which Ray adds the script's directory
    and the current directory), so that its actors import the app's classes without a
    ``runtime_env`` of their own (see :func:`actor_runtime_env`). None (Ray's default) when
    this Ray's ``JobConfig`` does not take them."""
    from ray.job_config import JobConfig

    try:
        # Workers insert each entry at the front of sys.path: reversed keeps this order.
        return JobConfig(_py_driver_sys_path=list(reversed(program_path())))
    except TypeError:
        return None


def _job_path() -> tuple[set[str], list[str]]:
    """The directories that the workers of this process's Ray job put on ``sys.path`` (its
    ``py_driver_sys_path``; none known through Ray Client), and the ``PYTHONPATH`` of the job's
    ``runtime_env``."""
    import ray

    dirs: set[str] = set()
    pythonpath: list[str] = []
    # Unknown (a Ray without these, Ray Client): every class's directory goes in the actors'
    # runtime_env, as it always did.
    with contextlib.suppress(Exception):
        worker: Any = ray._private.worker.global_worker
        dirs.update(
            os.path.realpath(p) for p in worker.core_worker.get_job_config().py_driver_sys_path
        )
    with contextlib.suppress(Exception):
        env_vars = ray.get_runtime_context().runtime_env.get("env_vars") or {}
        pythonpath = [p for p in str(env_vars.get("PYTHONPATH", "")).split(os.pathsep) if p]
    dirs.update(os.path.realpath(p) for p in pythonpath)
    return dirs, pythonpath


def actor_runtime_env(classes: Iterable[type]) -> dict[str, Any] | None:
    """The ``runtime_env`` of an app's actors (this process attached to Ray): None when every
    class is importable in the job's workers as they are (its directory is on the job's path,
    see :func:`job_config`, or it is an installed package's), else a ``PYTHONPATH`` with the
    directories of the others ahead of the job's and this process's ``PYTHONPATH``.

    None is the fast way: an actor with a ``runtime_env`` of its own (even one equal to the
    job's) waits for a new worker process set up for it, where one without takes a worker Ray
    started ahead (``bench/actor_start_probe.py``, docs/benchmarks.md: 0.60 s against 0.35 s
    an actor one after another, 2.0 s against 1.2 s for six at once, on a quiet 2-core
    machine)."""
    covered, job_pythonpath = _job_path()
    missing = [
        root
        for root in import_roots(classes)
        if os.path.realpath(root) not in covered and not installed_root(root)
    ]
    if not missing:
        return None
    existing = os.environ.get("PYTHONPATH")
    pythonpath = [*missing, *job_pythonpath, *([existing] if existing else [])]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(pythonpath)}}


def actor_journal(settings: JournalSettings) -> dict[str, Any]:
    """Journal settings to hand to an actor: its URL in full (the async driver chosen, a
    SQLite path made absolute here, the password kept)."""
    from lagompy.sql._database import normalize_url

    def full(url: str) -> str:
        return normalize_url(url).render_as_string(hide_password=False)

    journal = settings.model_dump()
    journal["url"] = full(settings.url)
    for placed in journal["databases"].values():
        placed["url"] = full(placed["url"])
    return journal


#: The name of an app's coordinator, which holds its recorded topology.
COORDINATOR = "coordinator"


def namespace_of(app: str) -> str:
    """The Ray namespace that holds an app's coordinator, shard hosts and read-side workers."""
    return f"lagompy-{app}"


def actor_names(app: str, which: Callable[[str], bool] | None = None) -> list[str]:
    """The names of the app's live named actors (those ``which`` accepts), sorted."""
    import ray

    namespace = namespace_of(app)
    return sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and (which is None or which(entry["name"]))
    )


def app_names() -> list[str]:
    """The apps that have named actors on the cluster (from their namespaces), sorted."""
    import ray

    prefix = namespace_of("")
    return sorted(
        {
            entry["namespace"].removeprefix(prefix)
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"].startswith(prefix)
        }
    )


async def stop_actors(app: str, timeout: float, which: Callable[[str], bool] | None = None) -> int:
    """Stop the app's actors (those ``which`` accepts): ask each to ``close()`` (within
    ``timeout`` seconds), then kill them, the coordinator first. Returns how many."""
    import ray

    namespace = namespace_of(app)
    handles = []
    for name in actor_names(app, which):
        with contextlib.suppress(ValueError):
            handles.append((name, ray.get_actor(name, namespace=namespace)))
    closing: list[Any] = []
    for _, handle in handles:
        with contextlib.suppress(AttributeError):  # an actor of older code, without close()
            closing.append(handle.close.remote())
    if closing:
        try:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), timeout)
        except TimeoutError:
            log.warning("actors of app %r did not release what they hold within %s s", app, timeout)
    # The coordinator goes first, and is gone before the hosts are killed: a region client
    # that finds a host missing re-creates it only while the coordinator records its
    # topology, so a process still attached to the old hosts does not bring them back.
    # Each group's names are free before the next: a start() right after creates new
    # actors instead of getting the dying ones.
    deadline = time.monotonic() + timeout
    for group in (
        [entry for entry in handles if entry[0] == COORDINATOR],
        [entry for entry in handles if entry[0] != COORDINATOR],
    ):
        for _, handle in group:
            ray.kill(handle, no_restart=True)
        for name, _ in group:
            await _name_freed(name, namespace, deadline)
    return len(handles)


async def _name_freed(name: str, namespace: str, deadline: float) -> None:
    import ray

    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        await asyncio.sleep(0.05)


class SupervisedActors(AsyncClosing):
    """Named, detached actors of an app (read-side workers, subscriber groups...) as seen from
    the process that started them: their handles, and a supervisor that creates again, every
    ``supervise_interval`` seconds, those killed for good (Ray restarts the others itself).

    ``creators`` maps each actor's name to a function that gets or creates it (``.remote()``
    with ``get_if_exists``). Subclasses close with :meth:`_detach` after their own work."""

    #: What the actors are, for the log (``"read-side worker"``...).
    kind = "actor"

    def __init__(
        self,
        app: str,
        creators: Mapping[str, Callable[[], Any]],
        *,
        owns_ray: bool,
        supervise_interval: float | None,
    ) -> None:
        self.app = app
        self._creators = dict(creators)
        self._owns_ray = owns_ray
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        if supervise_interval is not None:
            self._supervisor = asyncio.create_task(self._supervise(supervise_interval))

    @property
    def namespace(self) -> str:
        return namespace_of(self.app)

    @property
    def actor_names(self) -> list[str]:
        return list(self._creators)

    def handles(self) -> dict[str, Any]:
        """The live handle of every actor (missing ones are left out)."""
        import ray

        out = {}
        for name in self._creators:
            with contextlib.suppress(ValueError):
                out[name] = ray.get_actor(name, namespace=self.namespace)
        return out

    async def ensure(self) -> int:
        """Create every actor that does not exist (killed for good); returns how many were
        created."""
        present = self.handles()
        missing = [name for name in self._creators if name not in present]
        for name in missing:
            log.warning("%s %s of app %r is gone: replacing it", self.kind, name, self.app)
            await self._creators[name]().ping.remote()
        return len(missing)

    async def _supervise(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ensure()
            except Exception:
                log.exception("supervising the %ss of app %r failed", self.kind, self.app)

    async def _detach(self) -> bool:
        """Stop supervising and drop this process's use of Ray; False if it was done before
        (the caller's close does nothing more then)."""
        if self._closed:
            return False
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        return True

    def _release_ray(self) -> None:
        if self._owns_ray:
            release()


#: The niceness lagompy's actors (shard hosts, read-side workers, subscriber groups) run their
#: work at. Ray lowers the priority of its workers' task threads to niceness 15 (Ray's
#: ``worker_niceness``, so that its own processes stay responsive under heavy tasks); an actor
#: on the path of every ask or event then gets about a twenty-eighth of the CPU share of a
#: process at niceness 0 (the database, the callers, other work) when they compete for a core,
#: and waits behind them at every wake-up: single asks' p99 46 against 106 ms with two busy
#: processes beside them (docs/runtime.md, "Latency of one ask").
ACTOR_NICENESS = 0


def run_at_niceness(niceness: int | None) -> int | None:
    """Lower the calling thread's niceness to ``niceness`` (on Linux a niceness is per thread,
    and threads inherit their creator's; a Ray actor runs its tasks on the thread its
    constructor ran on), if it is higher; None leaves it. Returns the niceness the thread runs
    at (None where the platform has none). Lowering a niceness needs the privilege to (root,
    ``CAP_SYS_NICE`` or ``RLIMIT_NICE``): without it the actor runs where Ray put it, and says
    so in its log."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):  # no niceness on this platform
        return None
    if niceness is None or current <= niceness:
        return current
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError as e:
        log.warning(
            "this actor runs at niceness %d: it may not lower it to %d (%s). Start Ray's "
            "workers at niceness 0 (RAY_worker_niceness=0 in the environment of `ray start`) "
            "or grant CAP_SYS_NICE, or its work waits behind other work on a busy node",
            current,
            niceness,
            e,
        )
        return current
    return niceness


class ActorLoop:
    """An event loop on a thread of its own, for a synchronous actor (Ray calls its methods
    one at a time on its main thread) whose work is asyncio: a worker started in ``__init__``
    runs there, so that a restart by Ray restarts it. The loop's thread runs at
    :data:`ACTOR_NICENESS`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        #: The niceness the loop runs at (None where the platform has none).
        self.niceness = run_at_niceness(ACTOR_NICENESS)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the loop; its future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coroutine`` on the loop and wait for its result (``timeout`` seconds)."""
        return self.submit(coroutine).result(timeout)


async def start_named_actors(
    app: str,
    creators: Mapping[str, Callable[[], Any]],
    timeout: float,
    what: str,
    stop: Callable[[list[str]], Awaitable[Any]],
) -> None:
    """Get or create each actor (``creators``: name -> ``.remote()`` maker) and wait until all
    answer ``ping`` (within ``timeout`` seconds); else ``ConfigurationError`` naming ``what``
    (``"read-side worker"``...), after ``stop`` of them all when one could not start."""
    import ray

    handles = [create() for create in creators.values()]
    try:
        await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in handles)), timeout)
    except TimeoutError:
        raise ConfigurationError(
            f"the {what}s of app {app!r} did not answer within {timeout} s"
        ) from None
    except ray.exceptions.RayActorError as e:
        await stop(list(creators))
        raise ConfigurationError(f"a {what} of app {app!r} could not start: {e}") from e
