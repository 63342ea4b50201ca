"""The ASGI middleware ``service.install`` adds: :class:`RequestIdMiddleware` (the request id,
the request count, a last-resort 500), :class:`BodyLimit` (413 for a body above
``ServiceSettings.max_body_size``) and :class:`KeyRelease` (releases a request's
``Idempotency-Key``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from http import HTTPStatus

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lagompy.service import _metrics as metrics
from lagompy.service._client import REQUEST_ID_HEADER, current_request_id
from lagompy.service._idempotency import _HEADER_BYTES, HELD_SCOPE_KEY, Held
from lagompy.service._problems import PROBLEM_CONTENT_TYPE, _problem, _problem_response

__all__ = [
    "BodyLimit",
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


#: How much of a refused body is read and dropped before the 413 goes out, and for how long. A
#: client that writes its whole body before it reads (no ``Expect: 100-continue``: urllib, most
#: scripts) reads the answer only if the server read what it sent: answered unread, it found the
#: connection reset (ConnectionResetError, no 413). Past these bounds the answer goes out anyway
#: and such a client may see the reset.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a refused request body, within the bounds above."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while dropped < DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


class BodyTooLarge(HTTPException):
    """A request body above the service's limit (413). Raised from the body's stream, inside
    the route that reads it, so the service's HTTP exception handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit:,} bytes")


class BodyLimit:
    """ASGI middleware: answers 413 (a problem document) for a request whose body is larger
    than ``limit`` bytes. A ``Content-Length`` above it is refused before anything reads the
    body; a body sent without one (chunked) is counted as it streams in, and the read that
    goes past the limit raises :class:`BodyTooLarge`, so the body is never buffered whole.
    Without it, a route that reads a JSON body buffers whatever it is sent. What the client
    sends of a refused body is read and dropped before the answer (within ``DRAIN_BYTES`` and
    ``DRAIN_SECONDS``), so that a client that writes before it reads gets the 413; a client that
    asked ``Expect: 100-continue`` is answered at once, before it sends the body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = None
        waits = False  # the client waits for a 100 Continue before it sends the body
        for key, value in scope["headers"]:
            if key == b"content-length":
                with contextlib.suppress(ValueError):  # refused by the server; count instead
                    declared = int(value)
            elif key == b"expect":
                waits = value.lower() == b"100-continue"
        if declared is not None and declared > limit:
            if not waits:
                await _drain(receive)
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            # Read outside a route (by middleware of the app's own, say): answer it here.
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(self.limit)
        body = _problem(413, HTTPStatus(413).phrase, error.detail)
        await _problem_response(Request(scope), 413, body)(scope, receive, send)
