"""FastAPI dependencies: the app's :class:`~lagompy.service.Service` and entity runtime, refs whose
asks take their command ids from the request's ``Idempotency-Key`` (:func:`refs`), the key
itself (:data:`IdempotencyKey`) and the service's clients (:func:`client`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError

from lagompy.entity import Command, PersistentEntity
from lagompy.errors import CommandRejected, ConfigurationError
from lagompy.service import _metrics as metrics
from lagompy.service._client import ServiceClient
from lagompy.service._idempotency import (
    HELD_SCOPE_KEY,
    KEY_HEADER,
    MAX_KEY_LENGTH,
    Held,
    RequestKey,
    fingerprint_of,
    key_problem,
)
from lagompy.service._service import Entities, Service, _service_of

__all__ = [
    "EntitiesDep",
    "IdempotencyKey",
    "Refs",
    "RequestRef",
    "ServiceDep",
    "client",
    "get_entities",
    "get_service",
    "refs",
]


C = TypeVar("C")
R = TypeVar("R")


async def get_service(request: Request) -> Service:
    """Dependency: the app's :class:`Service`."""
    return _service_of(request)


async def get_entities(request: Request) -> Entities:
    """Dependency: the app's entity runtime (an :class:`~lagompy.runtime.EntityRuntime`)."""
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
    many dependencies use it); :class:`~lagompy.service._middleware.KeyRelease` releases it."""
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
    the entity before (see :mod:`lagompy.service._idempotency`): a retried request maps onto
    the same command ids, whatever its other asks."""

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
