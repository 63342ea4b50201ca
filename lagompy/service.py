"""lagompy in a FastAPI app: lifespan, dependencies, errors as problem JSON, health and metrics.

::

    service = Service(name="users", entities=[UserEntity], journal_url="sqlite:///users.db")
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    Users = Annotated[Refs[UserCommand], Depends(refs(UserEntity))]

    @app.post("/users/{user_id}")
    async def register(user_id: str, body: Registration, users: Users) -> UserOut:
        user = await users(user_id).ask(RegisterUser(body.name, body.email))
        return UserOut.from_state(user)

* ``service.lifespan`` starts the entity runtime (or uses the one given), the service
  clients and the components (read-side workers...), and stops them in reverse order.
* ``service.install(app)`` adds the exception handlers, the request-id middleware and the
  routes ``/health/live``, ``/health/ready``, ``/metrics`` and ``/_status/circuit-breakers``
  (plus any router a component brings).
* Dependencies: :func:`refs` (refs to an entity type whose asks take their command ids from
  the request's ``Idempotency-Key``, bound to the request: see :mod:`lagompy.idempotency`),
  :data:`IdempotencyKey`, :data:`EntitiesDep`, :func:`client`, :data:`ServiceDep`.

Errors become RFC 9457 problem documents (``application/problem+json``) carrying the
request's ``request_id``::

    CommandRejected (InvalidCommand, NotFound, yours) -> its http_status (400, 404, ...)
    request validation                                -> 422, with the errors
    Idempotency-Key reused with another request       -> 422 (409 while the first is in flight)
    ConcurrencyConflict, DuplicateCommandId           -> 409
    Overloaded, JournalUnavailable                    -> 503 with Retry-After
    CircuitBreakerOpen                                -> 503 with Retry-After (the breaker's)
    ServiceUnavailable / ServiceCallFailed            -> 503 / 502
    ServiceCallTimeout                                -> 504
    AskTimeout, OutcomeUnknown                        -> 504 (with the command id)
    InvalidId (a bad entity or command id)            -> 400 (a CommandRejected)
    RefusedValue (a NUL in a string), WriteRefused    -> 422
    IdempotencyKeyReused                              -> 422, or 409 while the first is in flight
    UndeliverableOutcome                              -> 500 with command_id and committed
    anything else                                     -> 500, no detail

No problem document leaks internals: a failed service call names the service and the kind of
failure ("the inventory service answered 500", "... cannot be reached", "... did not answer
within 2 s", "... is not called: its circuit breaker is open"), never its URL or the
upstream's body; a journal outage says only that. Every 5xx is logged in full with the
request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any, Generic, Protocol, TypeVar, runtime_checkable

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lagompy import metrics
from lagompy.breaker import BreakerRegistry, default_registry
from lagompy.client import REQUEST_ID_HEADER, ServiceClient, ServiceLocator, current_request_id
from lagompy.entity import Command, PersistentEntity
from lagompy.errors import (
    AskTimeout,
    CircuitBreakerOpen,
    CommandRejected,
    ConcurrencyConflict,
    ConfigurationError,
    DuplicateCommandId,
    IdempotencyKeyReused,
    JournalUnavailable,
    LagompyError,
    OutcomeUnknown,
    Overloaded,
    RefusedValue,
    RuntimeFailure,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
    UndeliverableOutcome,
    WriteRefused,
)
from lagompy.idempotency import (
    HELD_SCOPE_KEY,
    KEY_HEADER,
    MAX_KEY_LENGTH,
    Held,
    KeyRelease,
    KeyStore,
    RequestKey,
    fingerprint_of,
    key_problem,
)
from lagompy.runtime._in_process import InProcessEntities
from lagompy.runtime._ray import ShardedEntities
from lagompy.settings import JournalSettings

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "Component",
    "EntitiesDep",
    "IdempotencyKey",
    "Refs",
    "RequestRef",
    "Service",
    "ServiceDep",
    "ServiceSettings",
    "client",
    "problem_for",
    "refs",
]

log = logging.getLogger("lagompy.service")

C = TypeVar("C")
R = TypeVar("R")

PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Environment variable ``lagompy run`` sets to the number of uvicorn worker processes.
WORKERS_ENV = "LAGOMPY_WORKERS"

Entities = ShardedEntities | InProcessEntities


class ServiceSettings(BaseSettings):
    """HTTP side settings. Environment prefix ``LAGOMPY_HTTP_``."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_HTTP_", frozen=True, extra="forbid")

    ask_timeout: float = Field(
        10.0, gt=0, description="Seconds a route's ask waits for its reply (then 504)."
    )
    retry_after: int = Field(
        1, ge=0, description="Retry-After seconds sent with 503 for Overloaded and outages."
    )
    ready_timeout: float = Field(
        2.0, gt=0, description="Seconds each /health/ready check may take."
    )
    metrics: bool = Field(True, description="Serve /metrics.")
    status_routes: bool = Field(True, description="Serve /_status/circuit-breakers.")
    idempotency_key_lifetime: float = Field(
        86_400.0,
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
    ``router`` (an APIRouter mounted by ``install``) and
    ``metric_samples() -> list[metrics.Sample]`` (awaitable; pulled at scrape time)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Service:
    """The lagompy side of one FastAPI app (see the module docs).

    ``entities`` and ``journal_url``/``journal_settings``/``ray``/``runtime_options`` start
    the app's entity runtime in the lifespan (``lagompy.start``); ``runtime`` attaches an
    already started one instead (then the caller closes it). ``clients`` are service names
    (or ``ServiceClient`` objects) made available through :func:`client`. With
    ``stop_runtime=True`` stopping the service also stops the app's shard hosts (for tests
    and single-process deployments; by default they outlive it, for the next start)."""

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
        self.runtime_options = dict(runtime_options or {})
        if journal_settings is not None and journal_url is not None:
            raise ConfigurationError("pass journal_settings or journal_url, not both")
        journal: dict[str, Any] = {} if journal_url is None else {"url": journal_url}
        self._journal_given = journal_settings is not None or journal_url is not None
        #: Where the journal is (default: JournalSettings from the environment).
        self.journal_settings = journal_settings or JournalSettings(**journal)
        self._given_runtime = runtime
        self._runtime: Entities | None = runtime
        self.locator = locator or ServiceLocator()
        self.breakers = default_registry if breakers is None else breakers
        self._client_specs = list(clients)
        self.clients: dict[str, ServiceClient] = {}
        self.components = list(components)
        no_overrides: dict[str, Any] = {}
        self.settings = settings or ServiceSettings(**no_overrides)
        self._started: list[Component] = []
        self._probe: Any = None  # a small Database for the journal check of /health/ready
        #: the last failure of each readiness check (logged when it changes)
        self._ready_failures: dict[str, str] = {}
        self._keys: KeyStore | None = None  # where Idempotency-Keys are bound
        self.started = False

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
                from lagompy.runtime._ray import start

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
            if self.entity_classes and isinstance(self._runtime, ShardedEntities):
                from lagompy.sql._database import Database

                self._probe = Database.create(self.journal_settings, pool_size=1, max_overflow=0)
            self._keys = self._key_store()
            for spec in self._client_specs:
                made = spec if isinstance(spec, ServiceClient) else self._make_client(spec)
                self.clients[made.service] = made
            for component in self.components:
                await component.start()
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise
        self.started = True

    def _key_store(self) -> KeyStore | None:
        """Idempotency-Keys are bound in the journal's database (no store without entities,
        or for a runtime on Ray given without where its journal is)."""
        runtime = self._runtime
        if isinstance(runtime, InProcessEntities):
            settings = runtime.storage.database.settings
        elif isinstance(runtime, ShardedEntities) and (self.entity_classes or self._journal_given):
            settings = self.journal_settings
        else:
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
        if self._probe is not None:
            await self._probe.dispose()
            self._probe = None
        if self._runtime is not None and self._runtime is not self._given_runtime:
            if isinstance(self._runtime, ShardedEntities):
                await self._runtime.close(shutdown=self.stop_runtime)
            else:
                await self._runtime.close()
            self._runtime = None
        metrics.mark_process_dead()

    # ----------------------------------------------------------------- install

    def install(self, app: FastAPI) -> FastAPI:
        """Add the exception handlers, the request-id middleware and lagompy's routes."""
        app.state.lagompy = self
        app.add_exception_handler(LagompyError, _lagompy_error_handler)
        app.add_exception_handler(RequestValidationError, _validation_handler)
        app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
        app.add_middleware(RequestIdMiddleware)
        app.add_middleware(KeyRelease)
        app.include_router(self.router())
        for component in self.components:
            router = getattr(component, "router", None)
            if isinstance(router, APIRouter):
                app.include_router(router)
        return app

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
            elif isinstance(runtime, ShardedEntities):
                checks["runtime"] = runtime.host_stats
            else:
                checks["journal"] = lambda: _select_one(runtime.storage.database)
        if self._probe is not None:
            checks["journal"] = lambda: _select_one(self._probe)
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
        if isinstance(runtime, ShardedEntities):
            try:
                hosts = await asyncio.wait_for(
                    runtime.host_stats(require_journal=False), self.settings.ready_timeout
                )
                samples += metrics.host_samples(hosts)
            except Exception as e:  # a scrape must still answer
                log.warning("could not pull the shard hosts' stats: %s", e)
        elif isinstance(runtime, InProcessEntities):
            samples += metrics.host_samples([runtime.stats()])
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


# --------------------------------------------------------------------------- dependencies


async def get_service(request: Request) -> Service:
    """Dependency: the app's :class:`Service`."""
    return _service_of(request)


async def get_entities(request: Request) -> Entities:
    """Dependency: the app's entity runtime."""
    return _service_of(request).entities


ServiceDep = Annotated[Service, Depends(get_service)]
EntitiesDep = Annotated[Entities, Depends(get_entities)]


_KEY_DESCRIPTION = (
    "Makes the request safe to retry: a retry with the same key and the same request gets the "
    "first reply and applies nothing again. The key is bound to the request it first came "
    "with: another request with it gets 422 (409 while the first is in flight). 1 to "
    f"{MAX_KEY_LENGTH} printable ASCII characters without spaces; bound for the service's "
    "key lifetime (24 h by default)."
)


async def _request_key(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=KEY_HEADER,
            description=_KEY_DESCRIPTION,
            json_schema_extra={
                "minLength": 1,
                "maxLength": MAX_KEY_LENGTH,
                "pattern": "^[\\x21-\\x7e]+$",
            },
        ),
    ] = None,
) -> RequestKey | None:
    """The request's key, validated once and bound to the request (one per request, however
    many dependencies use it); :class:`~lagompy.idempotency.KeyRelease` releases it."""
    if idempotency_key is None:
        return None
    problem = key_problem(idempotency_key)
    if problem is not None:
        raise RequestValidationError(
            [
                {
                    "type": "idempotency_key",
                    "loc": ("header", KEY_HEADER),
                    "msg": f"{KEY_HEADER} {problem}",
                    "input": idempotency_key,
                }
            ]
        )
    store = _service_of(request)._keys
    if store is None:  # no entities: nothing to bind, the key is only handed to the route
        return RequestKey(idempotency_key, None)
    held = request.scope.get(HELD_SCOPE_KEY)
    if not isinstance(held, Held):
        raise ConfigurationError(
            "this app does not release Idempotency-Keys: call service.install(app)"
        )
    return await held.bind(store, idempotency_key, await fingerprint_of(request))


_RequestKeyDep = Annotated[RequestKey | None, Depends(_request_key)]


async def _idempotency_key(key: _RequestKeyDep) -> str | None:
    return None if key is None else key.key


#: Dependency: the request's ``Idempotency-Key`` header (None without one), validated and
#: bound to the request.
IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]


class RequestRef(Generic[C]):
    """A ref to one entity, for one request: its asks carry command ids derived from the
    request's idempotency key, time out after the service's ``ask_timeout`` and are counted
    in ``/metrics``."""

    __slots__ = ("_refs", "entity_id")

    def __init__(self, refs: Refs[C], entity_id: str) -> None:
        self._refs = refs
        self.entity_id = entity_id

    async def ask(
        self, command: Command[R], *, timeout: float | None = None, command_id: str | None = None
    ) -> R:
        refs = self._refs
        type_name = refs.entity.type_name
        if command_id is None and refs.key is not None:
            command_id = refs.key.command_id(type_name, self.entity_id, command)
        ref = refs.entities.ref_for(refs.entity, self.entity_id)
        started = time.perf_counter()
        outcome = "failed"
        try:
            reply = await ref.ask(
                command,
                timeout=refs.ask_timeout if timeout is None else timeout,
                command_id=command_id,
            )
            outcome = "ok"
            return reply
        except CommandRejected:
            outcome = "rejected"
            raise
        finally:
            metrics.ASKS.labels(type_name, outcome).inc()
            metrics.ASK_SECONDS.labels(type_name).observe(time.perf_counter() - started)


class Refs(Generic[C]):
    """Refs to the entities of one type, for one request: ``refs(entity_id).ask(cmd)``.

    With an ``Idempotency-Key`` header each ask's command id is derived from the key, the
    key's binding, the command's type and how many asks of that type this request made to
    the entity before (see :mod:`lagompy.idempotency`): a retried request maps onto the same
    command ids, whatever its other asks."""

    def __init__(
        self,
        entities: Entities,
        entity: type[PersistentEntity[C, Any, Any]],
        key: RequestKey | None,
        ask_timeout: float,
    ) -> None:
        self.entities = entities
        self.entity = entity
        self.key = key
        self.ask_timeout = ask_timeout

    @property
    def idempotency_key(self) -> str | None:
        """The request's ``Idempotency-Key`` (None without one)."""
        return None if self.key is None else self.key.key

    def __call__(self, entity_id: str) -> RequestRef[C]:
        return RequestRef(self, str(entity_id))


def refs(
    entity: type[PersistentEntity[C, Any, Any]],
) -> Callable[[Request, RequestKey | None], Awaitable[Refs[C]]]:
    """Dependency factory: ``Annotated[Refs[UserCommand], Depends(refs(UserEntity))]``."""

    async def dependency(request: Request, key: _RequestKeyDep) -> Refs[C]:
        service = _service_of(request)
        return Refs(service.entities, entity, key, service.settings.ask_timeout)

    dependency.__name__ = f"refs_{entity.type_name}"
    return dependency


def client(name: str) -> Callable[[Request], Awaitable[ServiceClient]]:
    """Dependency factory: ``Annotated[ServiceClient, Depends(client("inventory"))]`` gives
    the service's client of that name (listed in ``Service(clients=...)``)."""

    async def dependency(request: Request) -> ServiceClient:
        service = _service_of(request)
        try:
            return service.clients[name]
        except KeyError:
            raise ConfigurationError(
                f"service {service.name!r} has no client {name!r} (clients: "
                f"{sorted(service.clients)}); list it in Service(clients=...)"
            ) from None

    dependency.__name__ = f"client_{name}"
    return dependency


# --------------------------------------------------------------------------- problems


def _words(name: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", name)]


def _problem(
    status: int,
    title: str,
    detail: str | None,
    *,
    type_: str = "about:blank",
    instance: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extensions.items() if v is not None})
    return body


def _error_type(exc: BaseException) -> tuple[str, str]:
    words = _words(type(exc).__name__)
    return "urn:lagompy:problem:" + "-".join(words), " ".join(words).capitalize()


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


#: A service or breaker name shown to callers as it is; any other (a URL, a host name) is not.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def _called(exc: ServiceCallError) -> str:
    """The called service as a caller may see it: its name, never a URL or a host."""
    name = exc.service
    if name and _PLAIN_NAME.match(name):
        return f"the {name} service"
    return "a service this one depends on"


def _service_call_problem(
    exc: ServiceCallError, retry_after: int
) -> tuple[int, str, dict[str, Any], dict[str, str]]:
    """Status, detail, extensions and headers of a failed service call. The detail names the
    service and the kind of failure only: the exception's message (URL, upstream body) is for
    the log."""
    called = _called(exc)
    if isinstance(exc, CircuitBreakerOpen):
        breaker = exc.breaker_id if _PLAIN_NAME.match(exc.breaker_id) else None
        if exc.service is None and breaker is not None:
            detail = f"circuit breaker {breaker!r} is open"
        else:
            detail = f"{called} is not called: its circuit breaker is open"
        return 503, detail, {"breaker_id": breaker}, _retry_after(exc.retry_after)
    if isinstance(exc, ServiceCallTimeout):
        within = f"within {exc.timeout:g} s" if exc.timeout is not None else "in time"
        return 504, f"{called} did not answer {within}", {}, {}
    if isinstance(exc, ServiceUnavailable):
        return 503, f"{called} cannot be reached", {}, _retry_after(retry_after)
    if isinstance(exc, ServiceCallFailed):
        status = exc.status
        return 502, f"{called} answered {status}", {"upstream_status": status}, {}
    return 502, f"the call to {called} failed", {}, {}


def problem_for(
    exc: LagompyError, *, retry_after: int = 1
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, problem body and headers a lagompy error is answered with.

    The body never carries internals: a rejection keeps the entity's own words, a failed
    service call names the service and the kind of failure, a journal outage says only that,
    and anything else (configuration, journal, serialization, handler bugs) is a bare 500.
    The full message belongs in the log (the handler logs it with the request id)."""
    type_, title = _error_type(exc)
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    detail: str | None = str(exc)
    if isinstance(exc, CommandRejected):
        status = int(exc.http_status)
    elif isinstance(exc, (ConcurrencyConflict, DuplicateCommandId)):
        status = 409
        extra["command_id"] = getattr(exc, "command_id", None)
    elif isinstance(exc, ServiceCallError):
        status, detail, extra, headers = _service_call_problem(exc, retry_after)
        if exc.service and _PLAIN_NAME.match(exc.service):
            extra["service"] = exc.service
    elif isinstance(exc, (Overloaded, JournalUnavailable)):
        status = 503
        headers = _retry_after(retry_after)
        if isinstance(exc, JournalUnavailable):
            detail = "the journal's database cannot be reached"
    elif isinstance(exc, (AskTimeout, OutcomeUnknown)):
        status = 504
        extra["command_id"] = exc.command_id
    elif isinstance(exc, IdempotencyKeyReused):
        status = exc.http_status  # 422, or 409 while the first request is in flight
        extra["idempotency_key"] = exc.key
        extra["in_flight"] = exc.in_flight
    elif isinstance(exc, RefusedValue):
        status = 422  # the request's data (a NUL character): the message names the field
    elif isinstance(exc, WriteRefused):
        status = 422
        detail = (
            f"the journal refused the data of this command for {exc.entity_type}/"
            f"{exc.entity_id}; nothing of it was stored"
        )
    elif isinstance(exc, UndeliverableOutcome):
        # A bug (a reply that does not pickle), but the caller must learn whether the command
        # was applied, and under which id to ask again.
        status = 500
        detail = (
            "the command was applied, but its reply cannot be sent back"
            if exc.committed
            else "the command's outcome cannot be sent back; nothing was applied"
        )
        extra["command_id"] = exc.command_id
        extra["committed"] = exc.committed
    else:
        status, type_, title, detail = 500, "about:blank", "Internal Server Error", None
    return status, _problem(status, title, detail, type_=type_, **extra), headers


def _problem_response(
    request: Request, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body.setdefault("instance", request.url.path)
    request_id = current_request_id.get()
    if request_id:
        body.setdefault("request_id", request_id)
    return JSONResponse(
        jsonable_encoder(body),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_CONTENT_TYPE,
    )


async def _lagompy_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LagompyError)
    service = getattr(request.app.state, "lagompy", None)
    retry_after = service.settings.retry_after if isinstance(service, Service) else 1
    status, body, headers = problem_for(exc, retry_after=retry_after)
    if status >= 500:
        # What the caller does not see (URLs, upstream bodies, database errors), under the
        # request id the response carries.
        log.log(
            logging.ERROR if status == 500 else logging.WARNING,
            "%s %s answered %d (request id %s): %s: %s",
            request.method,
            request.url.path,
            status,
            current_request_id.get(),
            type(exc).__name__,
            exc,
            exc_info=exc if status == 500 else None,
        )
    return _problem_response(request, status, body, headers)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {k: v for k, v in e.items() if k in ("loc", "msg", "type")}
        for e in exc.errors()
        if isinstance(e, dict)
    ]
    body = _problem(
        422,
        "Request validation failed",
        "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)[:1000],
        type_="urn:lagompy:problem:validation",
        errors=errors,
    )
    return _problem_response(request, 422, body)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    from http import HTTPStatus

    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    body = _problem(exc.status_code, title, detail)
    return _problem_response(request, exc.status_code, body, exc.headers)


# --------------------------------------------------------------------------- middleware

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


class RequestIdMiddleware:
    """Takes the request's ``X-Request-ID`` (or makes one), makes it the current request id
    (sent along by service clients), returns it in the response, and counts the request.
    An exception no handler took is logged and answered with a 500 problem document that
    says nothing of it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = current_request_id.set(request_id)
        status = 500
        started = False
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error(
                "%s %s answered 500 (request id %s)",
                scope["method"],
                scope["path"],
                request_id,
                exc_info=exc,
            )
            if started:
                raise
            body = _problem(500, "Internal Server Error", None, instance=scope["path"])
            body["request_id"] = request_id
            response = JSONResponse(body, status_code=500, media_type=PROBLEM_CONTENT_TYPE)
            await response(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
