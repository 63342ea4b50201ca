"""The ASGI middleware ``service.install`` adds: :class:`RequestIdMiddleware` (the request id,
the request count, a last-resort 500) and :class:`KeyRelease` (releases a request's
``Idempotency-Key``)."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lagompy.service import _metrics as metrics
from lagompy.service._client import REQUEST_ID_HEADER, current_request_id
from lagompy.service._idempotency import _HEADER_BYTES, HELD_SCOPE_KEY, Held
from lagompy.service._problems import PROBLEM_CONTENT_TYPE, _problem

__all__ = [
    "KeyRelease",
    "RequestIdMiddleware",
]

log = logging.getLogger("lagompy.service")


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


class KeyRelease:
    """ASGI middleware: a request with an ``Idempotency-Key`` header gets a :class:`Held` in
    its scope, which the key's dependency fills and this releases before the response starts
    (so a client that has the answer finds the first request answered, not in flight), or
    when the request ends. Requests without the header pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(k == _HEADER_BYTES for k, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        held = scope[HELD_SCOPE_KEY] = Held()

        async def send_released(message: Message) -> None:
            if message["type"] == "http.response.start":
                await held.response_started(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_released)
        finally:
            await held.release()
