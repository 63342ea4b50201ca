"""Calling other services: ``ServiceClient`` over httpx, behind a circuit breaker.

::

    async with ServiceClient("users") as users:          # URL(s) from the service locator
        reply = await users.post("/users/42", json={"name": "Ada", "email": "ada@example.org"})
        print(reply.json())

* **Service locator**: a name maps to one or more base URLs, used round robin. They come from
  the ``services`` mapping given to :class:`ServiceLocator`, else from the environment variable
  ``LAGOMPY_SERVICE_<NAME>`` (name upper-cased, other characters than letters and digits
  turned into ``_``; several URLs separated by commas). A name that is itself an ``http://`` or
  ``https://`` URL is used as it is.
* **Errors**: a 4xx or 5xx answer raises :class:`~lagompy.errors.ServiceCallFailed` carrying the
  status and the body (decoded JSON, else text); a connection failure raises
  :class:`~lagompy.errors.ServiceUnavailable`; no answer in time raises
  :class:`~lagompy.errors.ServiceCallTimeout`. Every one carries the ``service`` name; their
  messages hold the URL (and the start of the body) for the logs. A lagompy route that lets
  one escape answers with a problem document that names only the service and the kind of
  failure (see :func:`lagompy.service.problem_for`).
* **Circuit breaker**: every call runs under a :class:`~lagompy.service.CircuitBreaker`, by
  default one per client whose id is the service name (``breaker=`` per client or per call
  chooses another; ``breaker=False`` none). 5xx answers, connection failures and timeouts
  count as failures; 4xx answers do not.
* **Request ids**: the ``X-Request-ID`` of the request being served (see
  :mod:`lagompy.service`) is sent along, so one id follows a request through every service.
* **Transport**: ``transport=`` takes any httpx transport, e.g. ``httpx.ASGITransport(app)``
  to call an app in the same process, or ``httpx.MockTransport`` in unit tests.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lagompy.closing import AsyncClosing
from lagompy.errors import (
    ConfigurationError,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
)
from lagompy.service._breaker import BreakerRegistry, CircuitBreaker, default_registry
from lagompy.settings import LagompySettings, make_settings

__all__ = [
    "REQUEST_ID_HEADER",
    "ClientSettings",
    "ServiceClient",
    "ServiceLocator",
    "current_request_id",
]

#: The header that carries a request's id from service to service.
REQUEST_ID_HEADER = "X-Request-ID"

#: The id of the request this task is serving (set by lagompy's service middleware).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lagompy_request_id", default=None
)

#: Most characters of a response body kept in an error message.
_MESSAGE_BODY_CHARS = 300


class ClientSettings(LagompySettings):
    """Service client settings. Environment prefix ``LAGOMPY_CLIENT_`` (e.g.
    ``LAGOMPY_CLIENT_TIMEOUT``)."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_CLIENT_", frozen=True, extra="forbid")

    timeout: float = Field(
        default=10.0,
        gt=0,
        description="httpx timeout (seconds) for connecting, reading and writing.",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to open a connection.")
    max_connections: int = Field(
        default=100, ge=1, description="Connections open at once per client."
    )


def _env_name(service: str) -> str:
    return "LAGOMPY_SERVICE_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper()


class ServiceLocator:
    """Maps service names to base URLs, round robin when a name has several."""

    def __init__(
        self,
        services: Mapping[str, str | Sequence[str]] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._services: dict[str, list[str]] = {}
        for name, urls in (services or {}).items():
            self._services[name] = _check_urls(name, [urls] if isinstance(urls, str) else urls)
        self._environ = os.environ if environ is None else environ
        self._cycles: dict[str, Iterator[str]] = {}

    def urls(self, service: str) -> list[str]:
        """Every base URL of ``service``; raises ``ServiceUnavailable`` when it has none."""
        if service.startswith(("http://", "https://")):
            return [service.rstrip("/")]
        if service in self._services:
            return self._services[service]
        variable = _env_name(service)
        value = self._environ.get(variable, "")
        urls = [u.strip() for u in value.split(",") if u.strip()]
        if not urls:
            raise ServiceUnavailable(
                f"no URL for service {service!r}: give it to the ServiceLocator or set {variable}",
                service=service,
            )
        return _check_urls(service, urls)

    def locate(self, service: str) -> str:
        """The next base URL of ``service`` (round robin)."""
        urls = self.urls(service)
        if len(urls) == 1:
            return urls[0]
        cycle = self._cycles.get(service)
        if cycle is None:
            cycle = self._cycles[service] = itertools.cycle(urls)
        return next(cycle)


def _check_urls(service: str, urls: Sequence[str]) -> list[str]:
    checked = []
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"service {service!r}: {url!r} is not an http:// or https:// URL"
            )
        checked.append(url.rstrip("/"))
    if not checked:
        raise ConfigurationError(f"service {service!r} has an empty list of URLs")
    return checked


def _decode_body(response: httpx.Response) -> Any:
    content_type = response.headers.get("content-type", "")
    if "json" in content_type:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return response.text


class ServiceClient(AsyncClosing):
    """Calls the service ``service`` (a name for the locator, or a base URL).

    ``breaker`` is the client's circuit breaker: ``None`` (the default) takes the breaker named
    after the service from ``registry`` (made on first use, with settings from the
    environment), a string takes the breaker of that id, ``False`` disables it. ``headers``
    are sent with every request."""

    def __init__(
        self,
        service: str,
        *,
        locator: ServiceLocator | None = None,
        breaker: CircuitBreaker | str | bool | None = None,
        registry: BreakerRegistry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        settings: ClientSettings | None = None,
        **overrides: Any,
    ) -> None:
        self.service = service
        self.locator = locator or ServiceLocator()
        self.registry = default_registry if registry is None else registry
        self.settings = make_settings(ClientSettings, settings, **overrides)
        self.breaker = self._resolve_breaker(service if breaker is None else breaker)
        timeout = httpx.Timeout(self.settings.timeout, connect=self.settings.connect_timeout)
        limits = httpx.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
        )
        self._http = httpx.AsyncClient(
            transport=transport, timeout=timeout, limits=limits, headers=dict(headers or {})
        )

    def _resolve_breaker(self, breaker: CircuitBreaker | str | bool) -> CircuitBreaker | None:
        if breaker is False:
            return None
        if breaker is True:
            breaker = self.service
        if isinstance(breaker, CircuitBreaker):
            return self.registry.add(breaker)
        return self.registry.get(breaker)

    async def request(
        self,
        method: str,
        path: str,
        *,
        breaker: CircuitBreaker | str | bool | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send ``method path`` (``path`` is appended to a base URL of the service) with
        httpx's keyword arguments (``json=``, ``params=``, ``headers=``, ``content=`` ...).

        Returns the response when its status is below 400. ``breaker`` overrides the
        client's breaker for this call; ``timeout`` its call timeout (seconds)."""
        chosen = self.breaker if breaker is None else self._resolve_breaker(breaker)
        try:
            if chosen is None:
                return await self._send(method, path, timeout, kwargs)
            return await chosen.call(
                lambda: self._send(method, path, timeout, kwargs), timeout=timeout
            )
        except ServiceCallError as e:
            if e.service is None:  # raised by the breaker, which does not know the service
                e.service = self.service
            raise

    async def _send(
        self, method: str, path: str, timeout: float | None, kwargs: dict[str, Any]
    ) -> httpx.Response:
        base = self.locator.locate(self.service)
        url = base + (path if path.startswith("/") else "/" + path)
        headers = httpx.Headers(kwargs.pop("headers", None))
        request_id = current_request_id.get()
        if request_id and REQUEST_ID_HEADER not in headers:
            headers[REQUEST_ID_HEADER] = request_id
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, url, headers=headers, **kwargs)
        except httpx.TimeoutException as e:
            limit = timeout if timeout is not None else self.settings.timeout
            if isinstance(e, httpx.ConnectTimeout):
                limit = min(limit, self.settings.connect_timeout)
            raise ServiceCallTimeout(
                f"{method} {url}: no response in time ({type(e).__name__})",
                service=self.service,
                timeout=limit,
            ) from e
        except httpx.TransportError as e:
            raise ServiceUnavailable(
                f"{method} {url}: {type(e).__name__}: {e}", service=self.service
            ) from e
        if response.status_code >= 400:
            body = _decode_body(response)
            shown = body if isinstance(body, str) else json.dumps(body)
            raise ServiceCallFailed(
                f"{method} {url} answered {response.status_code}: {shown[:_MESSAGE_BODY_CHARS]}",
                status=response.status_code,
                body=body,
                method=method,
                url=url,
                service=self.service,
            )
        return response

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)

    async def close(self) -> None:
        """Close the client's connections (``async with`` does it on leaving the block)."""
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"ServiceClient({self.service!r})"
