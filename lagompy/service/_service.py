"""The :class:`Service`: the lagompy side of one FastAPI app, its lifespan, readiness and routes.

``service.lifespan`` starts the entity runtime (or uses the one given), the service clients and
the components (read-side workers...), and stops them in reverse order; ``service.install(app)``
adds the exception handlers (``_problems.py``), the middleware (``_middleware.py``) and the
routes ``/health/live``, ``/health/ready``, ``/metrics`` and ``/_status/circuit-breakers``
(plus any router a component brings)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from lagompy._collector import CollectorPolicy
from lagompy.entity import PersistentEntity
from lagompy.errors import ConfigurationError, JournalUnavailable, LagompyError, RuntimeFailure
from lagompy.runtime import EntityRuntime, start
from lagompy.service import _metrics as metrics
from lagompy.service._breaker import BreakerRegistry, default_registry
from lagompy.service._client import ServiceClient, ServiceLocator
from lagompy.service._idempotency import KeyStore
from lagompy.service._middleware import BodyLimit, KeyRelease, RequestIdMiddleware
from lagompy.service._problems import (
    _http_exception_handler,
    _lagompy_error_handler,
    _validation_handler,
)
from lagompy.settings import JournalSettings, LagompySettings, make_settings

if TYPE_CHECKING:
    from lagompy.console import ConsoleSettings

__all__ = [
    "Component",
    "Service",
    "ServiceSettings",
]

log = logging.getLogger("lagompy.service")


#: Environment variable ``lagompy run`` sets to the number of uvicorn worker processes.
WORKERS_ENV = "LAGOMPY_WORKERS"

#: The type of :attr:`Service.entities`: either runtime, through the protocol they share.
Entities = EntityRuntime


class ServiceSettings(LagompySettings):
    """HTTP side settings. Environment prefix ``LAGOMPY_HTTP_``."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_HTTP_", frozen=True, extra="forbid")

    ask_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a route's ask waits for its reply (then 504)."
    )
    retry_after: int = Field(
        default=1, ge=0, description="Retry-After seconds sent with 503 for Overloaded and outages."
    )
    ready_timeout: float = Field(
        default=2.0, gt=0, description="Seconds each /health/ready check may take."
    )
    max_body_size: int = Field(
        default=1_048_576,
        ge=1,
        description=(
            "Largest request body, in bytes, a route may read (1 MiB); a larger one is "
            "answered 413 before it is buffered."
        ),
    )
    metrics: bool = Field(default=True, description="Serve /metrics.")
    status_routes: bool = Field(default=True, description="Serve /_status/circuit-breakers.")
    collector: CollectorPolicy = Field(
        default="tuned",
        description=(
            "The garbage collector of the service's process: 'default' keeps Python's (the "
            "service starts its entities with RuntimeSettings.collector='default' and its "
            "journal settings, which its components open, have collector='default'); 'tuned' "
            "lets start() and the journal's opening tune it as they do by default (see "
            "lagompy/_collector.py). `lagompy run --collector default` sets "
            "LAGOMPY_HTTP_COLLECTOR=default."
        ),
    )
    idempotency_key_lifetime: float = Field(
        default=86_400.0,
        gt=0,
        description=(
            "Seconds an Idempotency-Key stays bound to the request it first came with (then "
            "it may be used again, for any request)."
        ),
    )

    @property
    def idempotency_key_in_flight(self) -> float:
        """Most seconds a keyed request counts as in flight (409 for another request with
        its key) if it never answers: ``max(60, 3 * ask_timeout)``."""
        return max(60.0, 3 * self.ask_timeout)


@runtime_checkable
class Component(Protocol):
    """Something the service starts and stops with itself, e.g. read-side workers.

    Optional extras are looked up by name: ``ready() -> bool | str`` (awaitable; part of
    ``/health/ready``: True when ready, else False or the reason, which the check shows),
    ``router`` (an APIRouter mounted by ``install``),
    ``metric_samples() -> list[metrics.Sample]`` (awaitable; pulled at scrape time) and
    ``bind(service)`` (called before ``start``: for a component that needs the
    service's entities or settings)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Service:
    """The lagompy side of one FastAPI app (see the module docs).

    ``entities`` and ``journal_url``/``journal_settings``/``ray``/``runtime_options`` start
    the app's entity runtime in the lifespan (``lagompy.start``); ``runtime`` attaches an
    already started one instead (any :class:`~lagompy.runtime.EntityRuntime`; then the caller
    closes it). ``clients`` are service names (or ``ServiceClient`` objects) made available
    through :func:`client`. With ``stop_runtime=True`` stopping the service also stops the
    app's shard hosts (for tests and single-process deployments; by default they outlive it,
    for the next start)."""

    def __init__(
        self,
        *,
        name: str = "default",
        entities: Iterable[type[PersistentEntity[Any, Any, Any]]] = (),
        journal_url: str | None = None,
        journal_settings: JournalSettings | None = None,
        ray: bool = True,
        runtime: Entities | None = None,
        runtime_options: Mapping[str, Any] | None = None,
        clients: Iterable[str | ServiceClient] = (),
        components: Iterable[Component] = (),
        locator: ServiceLocator | None = None,
        breakers: BreakerRegistry | None = None,
        settings: ServiceSettings | None = None,
        stop_runtime: bool = False,
    ) -> None:
        self.name = name
        self.stop_runtime = stop_runtime
        self.entity_classes = list(entities)
        self.ray = ray
        self.settings = settings or ServiceSettings()
        self.runtime_options = dict(runtime_options or {})
        journal: dict[str, Any] = {} if journal_url is None else {"url": journal_url}
        if self.settings.collector == "default":
            # Python's collector for this process: what the service starts or opens in it
            # (its entities with ray=False, its components' journal) must not tune it.
            self.runtime_options["collector"] = journal["collector"] = "default"
        self._journal_given = journal_settings is not None or journal_url is not None
        #: Where the journal is: ``journal_settings`` with ``journal_url`` as its url, when
        #: given (default: JournalSettings from the environment).
        self.journal_settings = make_settings(JournalSettings, journal_settings, **journal)
        self._given_runtime = runtime
        self._runtime: Entities | None = runtime
        self.locator = locator or ServiceLocator()
        self.breakers = default_registry if breakers is None else breakers
        self._client_specs = list(clients)
        self.clients: dict[str, ServiceClient] = {}
        self.components = list(components)
        self._started: list[Component] = []
        #: Small Databases for the journal checks of /health/ready: "journal" (and
        #: "journal@name" for each other database of a journal placed on several).
        self._probes: dict[str, Any] = {}
        #: the last failure of each readiness check (logged when it changes)
        self._ready_failures: dict[str, str] = {}
        self._keys: KeyStore | None = None  # where Idempotency-Keys are bound
        self.started = False
        #: When ``start`` failed (``time.time()``), taken before it stopped what it had
        #: started: ``lagompy run --workers N`` reports the earliest workers' failure, not
        #: one that another worker's clean-up caused (its shard hosts stopped).
        self.failed_at: float | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def entities(self) -> Entities:
        """The entity runtime (after the lifespan started it)."""
        if self._runtime is None:
            raise ConfigurationError(
                f"service {self.name!r} has no entity runtime: give it entities (or a runtime) "
                "and run the app with service.lifespan"
            )
        return self._runtime

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: ``FastAPI(lifespan=service.lifespan)``."""
        app.state.lagompy = self
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        """Start the runtime, the clients and the components (the lifespan calls this)."""
        self.breakers.add_listener(metrics.breaker_listener)
        for breaker in self.breakers:
            metrics.breaker_listener(breaker, "state")
        workers = int(os.environ.get(WORKERS_ENV, "1") or 1)
        try:
            if self._runtime is None and self.entity_classes:
                if not self.ray and workers > 1:
                    raise ConfigurationError(
                        f"service {self.name!r} hosts its entities in-process (ray=False) but "
                        f"runs in {workers} worker processes: each entity would have {workers} "
                        "writers. Use ray=True, or one worker"
                    )
                common: dict[str, Any] = {
                    "app": self.name,
                    "entities": self.entity_classes,
                    "journal_settings": self.journal_settings,
                    **self.runtime_options,
                }
                if self.ray:
                    with _keep_sigterm_handler():
                        self._runtime = await start(ray=True, **common)
                else:
                    self._runtime = await start(ray=False, **common)
            if (
                self.entity_classes
                and self._runtime is not None
                and self._runtime.local_journal is None
            ):
                # The shard hosts write the journal: this process checks that it reaches it
                # (each of its databases, when it is placed on several).
                from lagompy.journal._placement import Placement, partition_key
                from lagompy.sql._database import Database

                placement = Placement.of(self.journal_settings)
                self._probes = {
                    partition_key("journal", name): Database.create(
                        placement.settings_of(name), pool_size=1, max_overflow=0
                    )
                    for name in placement.names
                }
            self._keys = self._key_store()
            for spec in self._client_specs:
                made = spec if isinstance(spec, ServiceClient) else self._make_client(spec)
                self.clients[made.service] = made
            for component in self.components:
                bind = getattr(component, "bind", None)
                if callable(bind):  # a component that needs the service (its runtime...)
                    bind(self)
                await component.start()
                self._started.append(component)
        except BaseException:
            self.failed_at = time.time()
            await self.stop()
            raise
        self.started = True

    def _key_store(self) -> KeyStore | None:
        """Idempotency-Keys are bound in the journal's database (no store without entities,
        or for a runtime on Ray given without where its journal is)."""
        runtime = self._runtime
        if runtime is None:
            return None
        settings = runtime.local_journal
        if settings is None and (self.entity_classes or self._journal_given):
            settings = self.journal_settings
        if settings is None:
            return None
        return KeyStore(
            settings,
            self.name,
            lifetime=self.settings.idempotency_key_lifetime,
            in_flight=self.settings.idempotency_key_in_flight,
        )

    def _make_client(self, name: str) -> ServiceClient:
        return ServiceClient(name, locator=self.locator, registry=self.breakers)

    async def stop(self) -> None:
        """Stop what ``start`` started, in reverse order."""
        self.started = False
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)
        for made in self.clients.values():
            await made.close()
        self.clients.clear()
        if self._keys is not None:
            await self._keys.close()
            self._keys = None
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            await probe.dispose()
        if self._runtime is not None and self._runtime is not self._given_runtime:
            await self._runtime.close(shutdown=self.stop_runtime)
            self._runtime = None
        metrics.mark_process_dead()

    # ----------------------------------------------------------------- install

    def install(self, app: FastAPI, *, console: bool | ConsoleSettings | None = None) -> FastAPI:
        """Add the exception handlers, the request-id middleware and lagompy's routes.

        ``console``: mount the management console (``lagompy.console``): True (its settings
        from the environment), a :class:`~lagompy.console.ConsoleSettings`, or None (the
        default: mounted when ``LAGOMPY_CONSOLE_ENABLED`` says so)."""
        app.state.lagompy = self
        app.add_exception_handler(LagompyError, _lagompy_error_handler)
        app.add_exception_handler(RequestValidationError, _validation_handler)
        app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
        # The last added is the outermost: the request id is set before a 413.
        app.add_middleware(BodyLimit, limit=self.settings.max_body_size)
        app.add_middleware(RequestIdMiddleware)
        app.add_middleware(KeyRelease)
        app.include_router(self.router())
        for component in self.components:
            router = getattr(component, "router", None)
            if isinstance(router, APIRouter):
                app.include_router(router)
        if console is not False:
            self._install_console(app, console)
        return app

    def _install_console(self, app: FastAPI, console: bool | ConsoleSettings | None) -> None:
        from lagompy.console import Console, ConsoleSettings

        settings = console if isinstance(console, ConsoleSettings) else ConsoleSettings()
        if console is None and not settings.enabled:
            return
        made = Console(self, settings)
        app.include_router(made.router())
        self.components.append(made.backend)  # closes its connections with the service

    def router(self) -> APIRouter:
        """lagompy's own routes (health, metrics, status), kept out of the OpenAPI schema."""
        router = APIRouter(include_in_schema=False)
        router.add_api_route("/health/live", _live, methods=["GET"])
        router.add_api_route("/health/ready", _ready, methods=["GET"])
        if self.settings.metrics:
            router.add_api_route("/metrics", _metrics, methods=["GET"])
        if self.settings.status_routes:
            router.add_api_route("/_status/circuit-breakers", _breaker_status, methods=["GET"])
        return router

    # ----------------------------------------------------------------- health

    async def readiness(self) -> dict[str, str]:
        """Each check's result: ``"ok"`` or why it failed."""
        checks: dict[str, Callable[[], Awaitable[Any]]] = {}
        runtime = self._runtime
        if self.entity_classes or self._given_runtime is not None:
            if runtime is None:
                checks["runtime"] = _fail("not started")
            else:
                checks[runtime.check_name] = runtime.check
        for check_name, probe in self._probes.items():
            checks[check_name] = functools.partial(_select_one, probe)
        for component in self.components:
            ready = getattr(component, "ready", None)
            if callable(ready):
                checks[_component_name(component)] = _expect_true(ready)
        results: dict[str, str] = {"service": "ok" if self.started else "not started"}
        for name, check in checks.items():
            try:
                await asyncio.wait_for(check(), self.settings.ready_timeout)
                results[name] = "ok"
            except TimeoutError:
                results[name] = f"no answer within {self.settings.ready_timeout} s"
            except _NotReady as e:
                results[name] = str(e)
            except Exception as e:
                results[name] = _public_reason(e)
                text = f"{type(e).__name__}: {e}"
                if self._ready_failures.get(name) != text:
                    # The full text (it may name hosts and addresses) goes to the log only,
                    # once per change: probes call this every few seconds.
                    log.warning("readiness check %r failed: %s", name, text)
                self._ready_failures[name] = text
                continue
            self._ready_failures.pop(name, None)
        return results

    async def pulled_metrics(self) -> list[metrics.Sample]:
        """Figures from other processes, pulled at scrape time."""
        samples: list[metrics.Sample] = []
        runtime = self._runtime
        if runtime is not None:
            try:
                hosts = await asyncio.wait_for(
                    runtime.host_stats(require_journal=False), self.settings.ready_timeout
                )
                samples += metrics.host_samples(hosts)
            except Exception as e:  # a scrape must still answer
                log.warning("could not pull the shard hosts' stats: %s", e)
        for component in self.components:
            pull = getattr(component, "metric_samples", None)
            if callable(pull):
                try:
                    samples += await pull()
                except Exception as e:
                    log.warning("could not pull metrics of %r: %s", component, e)
        return samples


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep the server's SIGTERM handler through ``ray.init``, which installs its own (a bare
    ``sys.exit``): under uvicorn, SIGTERM must still shut the app down through its lifespan."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous):  # a handler of the server's: put it back
            signal.signal(signal.SIGTERM, previous)


def _component_name(component: object) -> str:
    return str(getattr(component, "name", None) or type(component).__name__)


def _public_reason(error: Exception) -> str:
    """Why a readiness check failed, in words that name no host, address or path: lagompy's
    own messages about hosts and read sides as they are, a database outage as just that, and
    anything else as its kind (the log has its text)."""
    kind = type(error).__name__
    if isinstance(error, JournalUnavailable):
        if error.__cause__ is None:  # lagompy's own words (e.g. which hosts lack a journal)
            return f"{kind}: {error}"[:300]
        return f"{kind}: the journal's database cannot be reached"
    if isinstance(error, RuntimeFailure):
        return f"{kind}: {error}"[:300]
    return f"{kind} (see the service's log)"


def _fail(reason: str) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        raise _NotReady(reason)

    return check


class _NotReady(Exception):
    """A component's ``ready()`` said why it is not ready."""


def _expect_true(ready: Callable[[], Awaitable[bool | str]]) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        result = await ready()
        if isinstance(result, str):
            raise _NotReady(result)
        if not result:
            raise _NotReady("not ready")

    return check


async def _select_one(database: Any) -> None:
    from sqlalchemy import text

    async with database.read() as conn:
        await conn.execute(text("SELECT 1"))


# --------------------------------------------------------------------------- routes


def _service_of(request: Request) -> Service:
    service = getattr(request.app.state, "lagompy", None)
    if not isinstance(service, Service):
        raise ConfigurationError(
            "this app has no lagompy Service: call service.install(app) and use "
            "FastAPI(lifespan=service.lifespan)"
        )
    return service


async def _live() -> dict[str, str]:
    return {"status": "live"}


async def _ready(request: Request) -> JSONResponse:
    service = _service_of(request)
    checks = await service.readiness()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status_code=200 if ok else 503,
    )


async def _metrics(request: Request) -> Response:
    service = _service_of(request)
    body = metrics.render(await service.pulled_metrics())
    return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)


async def _breaker_status(request: Request) -> list[dict[str, Any]]:
    return _service_of(request).breakers.status()
