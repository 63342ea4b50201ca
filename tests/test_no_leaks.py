"""Errors that leak nothing: every error response of the example services, driven over HTTP on
loopback with failures provoked, is scanned for URLs, hosts, ports, file paths, database URLs
and credentials (tests/leaks.py); and every lagompy error's problem document is scanned too.

The notification service runs behind a switch that can make it fail the way real services do:
answer 500 with a body full of internals, answer 404, answer garbage, be slow, be down, have
no URL configured. The user service's ``GET /users/{id}/notifications`` lets those failures
reach its caller, who must learn which service failed and how, and nothing else; the details
go to the log under the request id the response carries. The schemathesis run
(tests/test_schemathesis.py) scans every response it provokes with the same scanner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from examples.notification_service.api import create_app as create_notifications
from examples.user_service.api import create_app as create_users
from lagompy import errors
from lagompy.errors import LagompyError, _rebuild_from_state
from lagompy.service import BreakerRegistry, CircuitBreaker, ServiceLocator, problem_for
from lagompy.settings import JournalSettings
from lagompy.testkit.server import free_port, serve_in_thread
from tests.conftest import POSTGRES_URL, _create_schema, _drop_schema, require_postgres
from tests.leaks import Leak, path_and_query, request_text, scan

#: What the failing upstream plants in its answers; none of it may reach a caller.
BAIT_DB = "postgresql://notify:s3cret-pw@db.internal:5432/notify"
BAIT_PATH = "/srv/notify/app/handlers.py"
BAIT_HOST = "10.1.2.3:8080"
BAIT_BODY = {
    "detail": f"could not connect to {BAIT_DB}",
    "trace": f'Traceback (most recent call last):\n  File "{BAIT_PATH}", line 12',
    "backend": BAIT_HOST,
    "windows": "C:\\notify\\config.ini",
}
BAITS = [BAIT_DB, "s3cret-pw", "db.internal", BAIT_PATH, BAIT_HOST, "C:\\notify", "handlers.py"]

CALL_TIMEOUT = 1.0
MAX_FAILURES = 3


class Upstream:
    """The real notification service, behind a switch that makes it misbehave."""

    def __init__(self, database_url: str, locator: ServiceLocator) -> None:
        # It subscribes to the user service's topic (the welcome notifications).
        self.real = create_notifications(database_url=database_url, users="users", locator=locator)
        self.mode = "ok"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.mode == "ok":
            await self.real(scope, receive, send)
            return
        if self.mode == "slow":
            await asyncio.sleep(CALL_TIMEOUT * 3)
            await self.real(scope, receive, send)
            return
        status, content_type, body = {
            "error": (500, b"application/json", httpx.Response(200, json=BAIT_BODY).content),
            "missing": (404, b"application/json", httpx.Response(200, json=BAIT_BODY).content),
            "garbage": (200, b"text/html", f"<pre>{BAIT_BODY['trace']}</pre>".encode()),
        }[self.mode]
        headers = [
            (b"content-type", content_type),
            (b"x-backend", BAIT_HOST.encode()),
            (b"x-database", BAIT_DB.encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Seen:
    """Every error response, with what its request carried."""

    forbidden: list[str]
    errors: list[tuple[str, httpx.Response]] = field(default_factory=list)
    leaks: list[tuple[str, Leak]] = field(default_factory=list)

    def record(self, label: str, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        request = response.request
        sent = request_text(
            path_and_query(str(request.url)),
            request.content,
            [v for k, v in request.headers.items() if k.lower() != "host"],
        )
        self.errors.append((label, response))
        found = scan(
            response.content, response.headers.items(), sent=sent, forbidden=self.forbidden
        )
        self.leaks += [(f"{label}: {request.method} {request.url.path}", leak) for leak in found]
        return response

    def statuses(self) -> set[int]:
        return {r.status_code for _, r in self.errors}

    def details(self, status: int) -> list[str]:
        return [str(r.json().get("detail", "")) for _, r in self.errors if r.status_code == status]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JournalSettings]:
    if request.param == "sqlite":
        yield JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}")
        return
    require_postgres()
    schema = asyncio.run(_create_schema())
    try:
        yield JournalSettings(url=POSTGRES_URL, postgres_schema=schema, auto_migrate=True)
    finally:
        asyncio.run(_drop_schema(schema))


def _forbidden(journal: JournalSettings) -> list[str]:
    from sqlalchemy.engine import make_url

    url = make_url(journal.url)
    words = [*BAITS, journal.url, str(url.database or "")]
    if url.get_backend_name() != "sqlite":
        words += [url.username or "", url.host or "", journal.postgres_schema or ""]
    return [w for w in words if w]


def _until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def test_no_error_of_the_example_services_leaks_internals(
    journal: JournalSettings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="lagompy.service")
    environ: dict[str, str] = {}
    upstream = Upstream(
        f"sqlite:///{tmp_path / 'notifications.db'}", ServiceLocator(environ=environ)
    )
    seen = Seen(_forbidden(journal))
    breakers = BreakerRegistry()
    breaker = breakers.add(
        CircuitBreaker(
            "notifications",
            max_failures=MAX_FAILURES,
            reset_timeout=60,
            call_timeout=CALL_TIMEOUT,
        )
    )
    users_app = create_users(
        journal_settings=journal,
        ray=False,
        name=f"leaks-{uuid.uuid4().hex[:6]}",
        locator=ServiceLocator(environ=environ),
        breakers=breakers,
    )
    with contextlib.ExitStack() as stack:
        notifications_url = stack.enter_context(serve_in_thread(upstream))
        environ["LAGOMPY_SERVICE_NOTIFICATIONS"] = notifications_url
        users_url = stack.enter_context(serve_in_thread(users_app))
        environ["LAGOMPY_SERVICE_USERS"] = users_url
        notifications = stack.enter_context(httpx.Client(base_url=notifications_url, timeout=30))
        users = stack.enter_context(httpx.Client(base_url=users_url, timeout=30))

        # ---- the notification service, directly: bad input, unknown routes
        n, u = seen.record, seen.record
        not_json: dict[str, Any] = {
            "content": b"{not json",
            "headers": {"content-type": "application/json"},
        }
        bad_id = {"id": "a b", "recipient": "r@example.org", "subject": "s"}
        n("notify: no body", notifications.post("/notifications", json={}))
        n("notify: bad id", notifications.post("/notifications", json=bad_id))
        n("notify: not JSON", notifications.post("/notifications", **not_json))
        n("notify: bad limit", notifications.get("/notifications", params={"limit": 0}))
        n("notify: unknown route", notifications.get("/nowhere"))
        n("notify: wrong method", notifications.delete("/notifications"))

        # ---- the user service: rejections, validation, unknown ids
        r = users.post("/users", json={"name": "Ada Lovelace", "email": "ada@example.org"})
        assert r.status_code == 201, r.text
        uid = r.json()["user_id"]
        _until(lambda: users.get(f"/users/{uid}").status_code == 200, "the user projected")
        _until(
            lambda: len(notifications.get("/notifications").json()["items"]) == 1,
            "the welcome notification, from the user-events topic",
        )
        taken = {"name": "A", "email": "a@example.org", "user_id": uid}
        control = {"name": "a\x00b", "email": "x@example.org"}
        keyed: dict[str, Any] = {
            "json": {"name": "K", "email": "k@example.org"},
            "headers": {"Idempotency-Key": "a b"},
        }
        u("taken", users.post("/users", json=taken))
        u("no email", users.post("/users", json={"name": "X"}))
        u("not JSON", users.post("/users", **not_json))
        u("control characters", users.post("/users", json=control))
        u("bad id", users.get("/users/bad%20id"))
        u("unknown user", users.get("/users/nobody-here"))
        u("unknown user, change", users.patch("/users/nobody-here", json={"name": "N"}))
        u("unknown user, deactivate", users.post("/users/nobody-here/deactivate"))
        u("unknown user, sent", users.get("/users/nobody-here/notifications"))
        u("bad email", users.patch(f"/users/{uid}", json={"email": "not an email"}))
        u("nothing to change", users.patch(f"/users/{uid}", json={}))
        u("bad limit", users.get("/users", params={"limit": 0}))
        u("bad after", users.get("/users", params={"after": "../etc/passwd"}))
        u("bad idempotency key", users.post("/users", **keyed))
        u("unknown route", users.get("/nowhere"))
        u("wrong method", users.delete("/users"))

        # ---- the call to the notification service, failing every way it can
        def sent(label: str) -> httpx.Response:
            return u(label, users.get(f"/users/{uid}/notifications"))

        def healthy() -> None:  # a success resets the breaker's count of failures
            upstream.mode = "ok"
            environ["LAGOMPY_SERVICE_NOTIFICATIONS"] = notifications_url
            r = sent("healthy")
            assert r.status_code == 200 and len(r.json()["items"]) == 1, r.text

        healthy()
        failures = [
            ("upstream 500", "error", None, 502, "the notifications service answered 500"),
            ("upstream 404", "missing", None, 502, "the notifications service answered 404"),
            ("upstream garbage", "garbage", None, 500, None),
            ("upstream slow", "slow", None, 504,
             f"the notifications service did not answer within {CALL_TIMEOUT:g} s"),
            ("upstream down", "ok", f"http://127.0.0.1:{free_port()}", 503,
             "the notifications service cannot be reached"),
            ("no URL", "ok", "", 503, "the notifications service cannot be reached"),
            ("not an http URL", "ok", f"ftp://{BAIT_HOST}/x", 500, None),
        ]  # fmt: skip
        for label, mode, url, status, detail in failures:
            upstream.mode = mode
            if url is not None:
                environ["LAGOMPY_SERVICE_NOTIFICATIONS"] = url
            r = sent(label)
            assert r.status_code == status, (label, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            body = r.json()
            assert body["request_id"] == r.headers["x-request-id"]
            if detail is not None:
                assert body["detail"] == detail, label
                assert body["service"] == "notifications"
            healthy()

        upstream.mode = "error"
        for i in range(MAX_FAILURES):
            assert sent(f"failure {i}").status_code == 502
        assert breaker.state == "open"
        r = sent("breaker open")
        assert r.status_code == 503, r.text
        assert (
            r.json()["detail"]
            == "the notifications service is not called: its circuit breaker is open"
        )
        assert 1 <= int(r.headers["retry-after"]) <= 60

    # Not vacuous: every kind of error was answered, and scanned.
    assert {400, 404, 405, 409, 422, 500, 502, 503, 504} <= seen.statuses(), seen.statuses()
    assert len(seen.errors) >= 30
    assert not seen.leaks, "internals in error responses:\n" + "\n".join(
        f"  {where}: {leak}" for where, leak in seen.leaks
    )
    # The details went to the log instead, under the request id the caller got.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for label, response in seen.errors:
        if response.status_code >= 500 and label != "breaker open":
            assert response.headers["x-request-id"] in logged, label
    assert BAIT_DB in logged  # the upstream's body, for whoever reads the log
    assert "127.0.0.1" in logged  # the URL that could not be reached


def test_unknown_processor_404_leaks_nothing(tmp_path: Path) -> None:
    journal = JournalSettings(url=f"sqlite:///{tmp_path / 'journal.db'}")
    seen = Seen(_forbidden(journal))
    app = create_users(journal_settings=journal, ray=False, locator=ServiceLocator(environ={}))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        r = seen.record("unknown processor", http.get("/readside/no-such-processor"))
    assert r.status_code == 404
    assert not seen.leaks, [str(leak) for _, leak in seen.leaks]


# --------------------------------------------------------------------------- every error


def _every_error_class() -> list[type[LagompyError]]:
    found: list[type[LagompyError]] = []
    todo: list[type[LagompyError]] = [LagompyError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted({c for c in found if c.__module__ == errors.__name__}, key=lambda c: c.__name__)


#: Errors whose message is the answer's detail: the entity's own words, or lagompy's words
#: about entity ids, command ids, queue lengths, workflow names, run ids and a request's input
#: (no URL, host or path can get in).
PASSED_THROUGH = {
    "CommandRejected", "InvalidCommand", "NotFound", "UnhandledCommand",
    "ConcurrencyConflict", "DuplicateCommandId", "Overloaded", "AskTimeout", "OutcomeUnknown",
    "InvalidId", "InvalidEntityId", "InvalidCommandId", "RefusedValue", "IdempotencyKeyReused",
    "UnknownWorkflow", "InvalidWorkflowInput", "DuplicateWorkflowId", "WorkflowNotFound",
}  # fmt: skip

BAIT_MESSAGE = (
    f"INSERT INTO lagompy_events failed on {BAIT_DB}: see {BAIT_PATH} "
    f"(host {BAIT_HOST}, password=hunter2)"
)


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("service", ["notifications", f"http://{BAIT_HOST}/api"])
def test_no_problem_document_carries_internals(cls: type[LagompyError], service: str) -> None:
    state: dict[str, Any] = {
        "service": service,
        "breaker_id": service,
        "retry_after": 3.0,
        "status": 500,
        "body": BAIT_BODY,
        "url": f"http://{BAIT_HOST}/api/x",
        "method": "GET",
        "timeout": 2.0,
        "command_id": "cmd-1",
        "committed": True,
        "key": "k-1",
        "in_flight": False,
        "http_status": 422,
        "entity_type": "account",
        "entity_id": "a1",
    }
    error = _rebuild_from_state(cls, BAIT_MESSAGE, state)
    status, body, headers = problem_for(error)
    assert status >= 400
    if cls.__name__ in PASSED_THROUGH:
        assert body["detail"] == BAIT_MESSAGE  # (what the test planted: real ones hold no URL)
        body = {k: v for k, v in body.items() if k != "detail"}
    else:
        assert "detail" not in body or "hunter2" not in body["detail"]
    sent = request_text("/", None, [])
    content = httpx.Response(200, json=body).content
    leaks = scan(content, headers.items(), sent=sent, forbidden=[*BAITS, "hunter2"])
    assert not leaks, [str(leak) for leak in leaks]
    if issubclass(cls, errors.ServiceCallError) and service == "notifications":
        assert body["service"] == "notifications" and "notifications service" in body["detail"]
    if status == 500 and cls is not errors.UndeliverableOutcome:
        assert set(body) == {"type", "title", "status"}


def test_every_error_class_is_covered() -> None:
    names = {c.__name__ for c in _every_error_class()}
    assert PASSED_THROUGH <= names
    assert {"ServiceCallFailed", "JournalError", "ConfigurationError", "EventsMissing"} <= names


def test_the_scanner_finds_each_kind_and_spares_what_the_caller_sent() -> None:
    leaky = {
        "detail": f"GET http://10.0.0.7:8001/notifications answered 500: {BAIT_BODY}",
        "more": "db at [::1]:5432, host notify.svc, /var/lib/app/x.db, user:pw@host",
        "echo": "'../etc/passwd' is not an email address",
    }
    content = httpx.Response(200, json=leaky).content
    headers = [("x-upstream", "cache.example.com:6379"), ("date", "Thu, 01 Jan 2026 10:11:12 GMT")]
    sent = request_text("/users/1?after=../etc/passwd", None, [])
    kinds = {leak.kind for leak in scan(content, headers, sent=sent, forbidden=["s3cret-pw"])}
    assert kinds == set(PATTERNS_KINDS), kinds
    assert not scan(content[:0] + b'{"detail": "../etc/passwd"}', [], sent=sent)
    problem = {"type": "urn:lagompy:problem:not-found", "title": "Not found", "status": 404,
               "detail": "no user x", "instance": "/users/x", "request_id": "a1"}  # fmt: skip
    sent = request_text("/users/x", None, [])
    assert not scan(httpx.Response(404, json=problem).content, headers[1:], sent=sent)


PATTERNS_KINDS = [
    "URL", "IPv4 address", "IPv6 address", "host name", "host:port", "file path",
    "Python source", "database", "credential", "forbidden",
]  # fmt: skip
