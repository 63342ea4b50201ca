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
  the request's ``Idempotency-Key``, bound to the request: see ``_idempotency.py``),
  :data:`IdempotencyKey`, :data:`EntitiesDep`, :func:`client`, :data:`ServiceDep`.
* Calls to other services: :class:`ServiceClient` (httpx, with a :class:`CircuitBreaker` per
  service from a :class:`BreakerRegistry`, and the request id sent along).

Errors become RFC 9457 problem documents (``application/problem+json``) carrying the
request's ``request_id``::

    CommandRejected (InvalidCommand, NotFound, yours) -> its http_status (400, 404, ...)
    request validation                                -> 422, with the errors
    a body above ServiceSettings.max_body_size        -> 413
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

The modules: ``_service.py`` (:class:`Service`, its lifespan, readiness and routes),
``_dependencies.py``, ``_idempotency.py`` (where ``Idempotency-Key`` s are bound),
``_problems.py`` (:func:`problem_for` and the exception handlers), ``_middleware.py``,
``_client.py``, ``_breaker.py``, ``_metrics.py`` and ``_cli.py`` (``lagompy run``,
``lagompy entities stats``). Every name below is imported on first use: ``import lagompy`` and
the ``lagompy`` command do not load FastAPI, httpx or prometheus_client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.service._breaker import (
        BreakerRegistry,
        BreakerSettings,
        CircuitBreaker,
        breaker_settings,
        default_registry,
        is_client_error,
    )
    from lagompy.service._client import (
        REQUEST_ID_HEADER,
        ClientSettings,
        ServiceClient,
        ServiceLocator,
        current_request_id,
    )
    from lagompy.service._dependencies import (
        EntitiesDep,
        IdempotencyKey,
        Refs,
        RequestRef,
        ServiceDep,
        client,
        get_entities,
        get_service,
        refs,
    )
    from lagompy.service._problems import PROBLEM_CONTENT_TYPE, problem_for
    from lagompy.service._service import Component, Service, ServiceSettings

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.service._breaker": (
        "BreakerRegistry",
        "BreakerSettings",
        "CircuitBreaker",
        "breaker_settings",
        "default_registry",
        "is_client_error",
    ),
    "lagompy.service._client": (
        "REQUEST_ID_HEADER",
        "ClientSettings",
        "ServiceClient",
        "ServiceLocator",
        "current_request_id",
    ),
    "lagompy.service._dependencies": (
        "EntitiesDep",
        "IdempotencyKey",
        "Refs",
        "RequestRef",
        "ServiceDep",
        "client",
        "get_entities",
        "get_service",
        "refs",
    ),
    "lagompy.service._problems": (
        "PROBLEM_CONTENT_TYPE",
        "problem_for",
    ),
    "lagompy.service._service": (
        "Component",
        "Service",
        "ServiceSettings",
    ),
}

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "REQUEST_ID_HEADER",
    "BreakerRegistry",
    "BreakerSettings",
    "CircuitBreaker",
    "ClientSettings",
    "Component",
    "EntitiesDep",
    "IdempotencyKey",
    "Refs",
    "RequestRef",
    "Service",
    "ServiceClient",
    "ServiceDep",
    "ServiceLocator",
    "ServiceSettings",
    "breaker_settings",
    "client",
    "current_request_id",
    "default_registry",
    "get_entities",
    "get_service",
    "is_client_error",
    "problem_for",
    "refs",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
