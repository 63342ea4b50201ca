"""Errors as RFC 9457 problem documents (``application/problem+json``): :func:`problem_for` and
the exception handlers ``service.install`` adds. The table of statuses is in the docs of
:mod:`lagompy.service`. No problem document leaks internals: the full message of a 5xx goes to
the log with the request id."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lagompy.errors import (
    AskTimeout,
    CircuitBreakerOpen,
    CommandRejected,
    ConcurrencyConflict,
    DuplicateCommandId,
    IdempotencyKeyReused,
    InvalidWorkflowInput,
    JournalUnavailable,
    LagompyError,
    OutcomeUnknown,
    Overloaded,
    RefusedValue,
    ServiceCallError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
    UndeliverableOutcome,
    UnknownWorkflow,
    WriteRefused,
)
from lagompy.service._client import current_request_id

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "problem_for",
]

log = logging.getLogger("lagompy.service")


PROBLEM_CONTENT_TYPE = "application/problem+json"


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
    elif isinstance(exc, (UnknownWorkflow, InvalidWorkflowInput)):
        status = exc.http_status  # 404 / 422: the request named or sent what cannot run
    elif isinstance(exc, RefusedValue):
        # The request's data (a NUL character, an integer beyond 64 bits): the message names
        # the field.
        status = 422
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
    # _service installs this handler, so it imports this module: Service is looked up here.
    from lagompy.service._service import Service

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
