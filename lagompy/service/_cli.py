"""``lagompy run`` (serve an app with uvicorn) and ``lagompy entities stats``.

``run`` binds its port before anything else starts, so a port in use fails at once, before Ray
and the read sides start. A failure to start (the app cannot be imported, the port is taken,
the app's lifespan startup raises) is one line, ``error: ...``, and exit status 1, without
uvicorn's traceback (``--log-level debug`` logs it). After SIGTERM or Ctrl-C the app shuts down
through its lifespan and ``run`` exits 0.

With ``--workers`` above 1, every worker process must reach the same shard hosts: ``run``
attaches them all to one Ray cluster, the one at ``--ray-address`` (or ``RAY_ADDRESS``) or else
a Ray head it starts itself for the lifetime of the command, and never lets each worker start a
Ray of its own. It also turns on prometheus_client's multiprocess mode (a temporary
``PROMETHEUS_MULTIPROC_DIR``) so that ``/metrics`` adds up every worker's figures.

``entities stats`` attaches to ``--address``, else ``RAY_ADDRESS``, else the local Rays that
lagompy processes of this machine started and recorded (see :mod:`lagompy.runtime._ray_cluster`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from lagompy._collector import tune_collector
from lagompy.errors import ConfigurationError, LagompyError

__all__ = ["entities_stats", "register_cli", "run"]

WORKERS_ENV = "LAGOMPY_WORKERS"  # the same name as lagompy.service._service.WORKERS_ENV
#: Set by ``run`` for its worker processes (``--workers`` above 1): the app to serve, the
#: directory where a worker that fails to start writes why, and the URL served.
TARGET_ENV = "LAGOMPY_RUN_TARGET"
FAILURES_ENV = "LAGOMPY_RUN_FAILURES"
#: The most worker processes ``run --workers`` starts: a bound against a typing slip (each
#: worker is a process with its own connections).
MAX_WORKERS = 256
#: ``run --collector``'s environment variable (the workers of ``--workers N`` read it too).
COLLECTOR_ENV = "LAGOMPY_RUN_COLLECTOR"
TUNED = "tuned"
#: The settings ``run --collector default`` sets to ``default`` when they are not set.
_COLLECTOR_SETTINGS = (
    "LAGOMPY_HTTP_COLLECTOR",
    "LAGOMPY_RUNTIME_COLLECTOR",
    "LAGOMPY_JOURNAL_COLLECTOR",
)


class Collector(StrEnum):
    """``run --collector``: the serving processes' garbage collector once the app started."""

    tuned = TUNED
    default = "default"


URL_ENV = "LAGOMPY_RUN_URL"
#: uvicorn's exit status for a server that failed to start.
STARTUP_FAILURE = 3

log = logging.getLogger("uvicorn.error")


def _describe(exc: BaseException) -> str:
    """One line about ``exc``: its message (a LagompyError) or its type and message, up to
    the first line break (what follows is often a remote traceback)."""
    message = str(exc).strip()
    if not isinstance(exc, LagompyError):
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message.splitlines()[0] if message else type(exc).__name__


def _load_app(target: str) -> Any:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{target!r} is not MODULE:APP (e.g. myservice.api:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: modules of the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the module's own code failed (a setting, a syntax error...)
        logging.getLogger("lagompy.run").debug("importing %s failed", module_name, exc_info=e)
        raise ConfigurationError(f"importing module {module_name!r} failed: {_describe(e)}") from e
    app = getattr(module, attribute, None)
    if app is None:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}")
    return app


def _service_of(app: Any) -> Any:
    state = getattr(app, "state", None)
    return getattr(state, "lagompy", None) if state is not None else None


def _bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (as uvicorn binds it: SO_REUSEADDR, inherited
    by worker processes); a port in use fails here, before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        raise ConfigurationError(f"cannot listen on {host}:{port}: {reason.lower()}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _StartupGuard:
    """Wraps the app for uvicorn: a failure of the lifespan's startup is kept here (and, in a
    worker process, written to ``failure_file``) instead of uvicorn printing its traceback;
    once startup is complete, says where the app listens."""

    def __init__(
        self, app: Any, *, url: str, failure_file: Path | None = None, collector: str = TUNED
    ) -> None:
        self.app = app
        self.url = url
        self.failure_file = failure_file
        self.collector = collector
        self.failure: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        started = False

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "lifespan.startup.failed":
                # Its message is a traceback: keep the last line, report it once below.
                lines = str(message.get("message") or "").strip().splitlines()
                self.failure = self.failure or (lines[-1] if lines else "startup failed")
                return
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                started = True
                self._started()

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as e:
            if started:
                raise
            logging.getLogger("lagompy.run").debug("the app's startup failed", exc_info=e)
            self.failure = _describe(e)
        if self.failure is not None and not started:
            if self.failure_file is not None:
                with contextlib.suppress(OSError):
                    self.failure_file.write_text(self.failure)
                    # Dated when the service's start failed, before its clean-up (which may
                    # fail other workers: see _serve_many, which reports the earliest).
                    service = getattr(getattr(self.app, "state", None), "lagompy", None)
                    failed_at = getattr(service, "failed_at", None)
                    if isinstance(failed_at, float):
                        os.utime(self.failure_file, (failed_at, failed_at))
            await send({"type": "lifespan.startup.failed", "message": ""})

    def _started(self) -> None:
        if self.collector == TUNED:
            # The app has started: its start-up objects are frozen out of the collector's way
            # (see lagompy/_collector.py: the subscribers' and read sides' pages).
            tune_collector()
        log.info("Uvicorn running on %s (Press CTRL+C to quit)", self.url)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            address = ray.get_runtime_context().gcs_address
            log.info("The app's entities run on the Ray cluster at %s", address)


class _QuietAfter(logging.Filter):
    """Drops uvicorn's error lines once ``failed()``: they repeat a failure ``run`` reports."""

    def __init__(self, failed: Callable[[], bool]) -> None:
        super().__init__()
        self.failed = failed

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not self.failed()


@contextlib.contextmanager
def _exit_cleanly_on_signals() -> Iterator[None]:
    """uvicorn, after its graceful shutdown on SIGTERM or SIGINT, puts back the handlers it
    found and raises the signal again. With the default handlers the process would then die
    of it (status -15 after a clean SIGTERM): here the handlers it finds do nothing, and
    ``run`` returns normally."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_app() -> Any:
    """The app of a worker process of ``run --workers N`` (a uvicorn factory)."""
    target = os.environ[TARGET_ENV]
    failures = Path(os.environ[FAILURES_ENV])
    guard = _StartupGuard(
        _load_app(target),
        url=os.environ.get(URL_ENV, ""),
        failure_file=failures / f"{os.getpid()}.txt",
        collector=os.environ.get(COLLECTOR_ENV, TUNED),
    )
    log.addFilter(_QuietAfter(lambda: guard.failure is not None))
    return guard


def run(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The ASGI app to serve.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")
    ] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_WORKERS, help="Worker processes; above 1 they share one Ray cluster."
        ),
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster for the workers (default: RAY_ADDRESS, else a Ray head started "
            "by this command when --workers > 1)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    collector: Annotated[
        Collector,
        typer.Option(
            envvar=COLLECTOR_ENV,
            help="The garbage collector of the serving processes once the app has started: "
            "'tuned' freezes the start-up objects and collects the young generation every "
            "50,000 allocations, as shard hosts do; 'default' leaves Python's (and sets "
            "LAGOMPY_HTTP_COLLECTOR, LAGOMPY_RUNTIME_COLLECTOR and LAGOMPY_JOURNAL_COLLECTOR "
            "to default when they are not set).",
        ),
    ] = Collector.tuned,
) -> None:
    """Serve a FastAPI app (MODULE:APP) with uvicorn."""
    if collector is Collector.default:
        # What the app starts or opens in this process tunes it too unless told otherwise
        # (a Service, start(), the journal's opening): told before the app is loaded, for
        # the settings it makes at import.
        for variable in _COLLECTOR_SETTINGS:
            os.environ.setdefault(variable, Collector.default.value)
    app = _load_app(target)
    service = _service_of(app)
    if workers > 1 and service is not None and service.entity_classes and not service.ray:
        raise ConfigurationError(
            f"{target} hosts its entities in-process (ray=False): {workers} workers would "
            "be that many writers per entity. Use ray=True or --workers 1"
        )
    listener = _bind(host, port)
    owned_dirs: list[str] = []
    owns_ray = False
    try:
        if workers == 1:
            if ray_address:
                os.environ["RAY_ADDRESS"] = ray_address
            _serve_one(target, app, listener, log_level, collector.value)
            return
        os.environ[WORKERS_ENV] = str(workers)
        os.environ[COLLECTOR_ENV] = collector.value
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            owned_dirs.append(tempfile.mkdtemp(prefix="lagompy-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_dirs[-1]
        if service is None or service.ray:
            address = ray_address or os.environ.get("RAY_ADDRESS")
            if not address:
                from lagompy.runtime._ray_cluster import start_head

                address, owns_ray = start_head(), True
                typer.echo(f"started a Ray head for the workers at {address}", err=True)
            os.environ["RAY_ADDRESS"] = address
        owned_dirs.append(tempfile.mkdtemp(prefix="lagompy-run-"))
        _serve_many(target, listener, workers, log_level, Path(owned_dirs[-1]))
    finally:
        listener.close()
        if owns_ray:
            from lagompy.runtime._ray_cluster import stop_head

            stop_head()
        for directory in owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def _serve_one(
    target: str, app: Any, listener: socket.socket, log_level: str, collector: str = TUNED
) -> None:
    import uvicorn

    guard = _StartupGuard(app, url=_url(listener), collector=collector)
    config = uvicorn.Config(guard, log_level=log_level, lifespan="on")
    quiet = _QuietAfter(lambda: guard.failure is not None)
    log.addFilter(quiet)
    try:
        with _exit_cleanly_on_signals():
            uvicorn.Server(config).run(sockets=[listener])
    except SystemExit as e:
        if guard.failure is None:
            raise
        raise ConfigurationError(f"{target} did not start: {guard.failure}") from e
    except KeyboardInterrupt:  # a second Ctrl-C: uvicorn stopped at once
        pass
    finally:
        log.removeFilter(quiet)


def _serve_many(
    target: str, listener: socket.socket, workers: int, log_level: str, failures: Path
) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ[TARGET_ENV] = target
    os.environ[FAILURES_ENV] = str(failures)
    os.environ[URL_ENV] = _url(listener)
    config = uvicorn.Config(
        f"{__name__}:_worker_app", factory=True, workers=workers, log_level=log_level
    )
    quiet = _QuietAfter(lambda: any(failures.iterdir()))
    log.addFilter(quiet)
    log.info("Uvicorn running on %s (Press CTRL+C to quit)", _url(listener))
    supervisor = Multiprocess(config, sockets=[listener])
    watched = threading.Event()
    watcher = threading.Thread(
        target=_stop_at_first_failure, args=(failures, supervisor, watched), daemon=True
    )
    watcher.start()
    try:
        supervisor.run()
    finally:
        watched.set()
        watcher.join()
        log.removeFilter(quiet)
    # The first failure (a file is dated when its worker's start failed, or else when it was
    # written): a later one may be its consequence (hosts it stopped).
    written = sorted(failures.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
    reasons = [p.read_text() for p in written]
    if reasons:
        raise ConfigurationError(f"{target} did not start: {reasons[0]}")
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise ConfigurationError(f"{target} did not start: a worker failed (see its log above)")


#: How often ``run --workers N`` looks for a worker's startup failure.
FAILURE_POLL = 0.05


def _stop_at_first_failure(failures: Path, supervisor: Any, done: threading.Event) -> None:
    """Stop ``supervisor`` as soon as a worker has written why it failed to start (until
    ``done``). uvicorn's supervisor finds such a worker by itself only through its health
    check, a ping answered within 5 s, and a worker that has failed no longer answers once its
    interpreter is exiting (Ray's exit hooks run then): the supervisor waited those 5 s out
    before it stopped (measured: ``run --workers 2`` whose workers could not open the journal
    exited 5.3 s after they had failed, 12.3 s after it was started)."""
    while not done.wait(FAILURE_POLL):
        if any(failures.iterdir()):
            supervisor.should_exit.set()
            return


def entities_stats(
    app: Annotated[str, typer.Option("--app", help="The app's name (lagompy.start(app=...)).")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (default: RAY_ADDRESS, else the local Rays that lagompy "
            "processes of this machine started)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the counters of an app's shard hosts on a running Ray cluster."""
    from lagompy.runtime._ray_cluster import local_rays

    given = address or os.environ.get("RAY_ADDRESS")
    if given:
        candidates = [given]
    else:
        found = local_rays()
        candidates = [r.address for r in found]
        if any(r.auth_mode == "token" for r in found):
            # A Ray started by ray.init uses token authentication (Ray 2.59+), with the token
            # in ~/.ray/auth_token; an attach by address sends it only in token mode.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not candidates:
        raise ConfigurationError(
            "no Ray cluster to attach to: give --address or set RAY_ADDRESS (no local Ray "
            "started by lagompy runs on this machine)"
        )
    others: set[str] = set()
    for candidate in candidates:
        stats = _host_stats(candidate, app, others)
        if stats is not None:
            break
    else:
        where = f"the Ray cluster at {given}" if given else "the local Rays of this machine"
        apps = ", ".join(sorted(others)) or "none"
        raise ConfigurationError(f"no app {app!r} runs on {where} (apps: {apps})")
    stats.sort(key=lambda s: int(s.get("index", 0)))
    if as_json:
        typer.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    columns = [
        "index", "pid", "commands", "events_persisted", "write_transactions", "batches",
        "live_entities", "activations", "new_entities", "new_refused", "passivations", "duplicates",
        "conflicts", "busy_seconds",
    ]  # fmt: skip
    rows = [[_cell(s.get(c)) for c in columns] for s in stats]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        typer.echo("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _host_stats(address: str, app: str, others: set[str]) -> list[dict[str, Any]] | None:
    """The stats of ``app``'s shard hosts on the Ray at ``address``; None (and the apps that
    run there added to ``others``) if it does not run there."""
    import asyncio

    import ray

    from lagompy.runtime._ray_cluster import actor_names, app_names, attached, namespace_of

    with attached(address):
        names = actor_names(app, lambda name: name.startswith("host-"))
        if not names:
            others.update(app_names())
            return None
        handles = [ray.get_actor(name, namespace=namespace_of(app)) for name in names]

        async def gather() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(h.stats.remote() for h in handles)))

        return asyncio.run(gather())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if not value.is_integer() else str(int(value))
    return "-" if value is None else str(value)


def register_cli(app: typer.Typer) -> None:
    """Add ``run`` and ``entities stats`` to ``app``."""
    app.command("run")(run)
    entities = typer.Typer(
        name="entities", help="Inspect an app's entities on Ray.", no_args_is_help=True
    )
    entities.command("stats")(entities_stats)
    app.add_typer(entities, name="entities")
