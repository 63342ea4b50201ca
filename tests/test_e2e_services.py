"""End to end: the example's user service and notification service as real ``lagompy run``
processes on loopback ports, driven over HTTP with httpx.

Two set-ups: the journal on a SQLite file with the entities in the service's process, and the
journal in a PostgreSQL schema with the entities on the test session's Ray (the service
attaches to it through ``RAY_ADDRESS``). Each set-up starts its two processes once for this
module; they are stopped, and the app's Ray actors killed, whatever the tests' outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from examples.user_service.entity import UserEntity
from lagompy import open_storage
from lagompy.settings import JournalSettings
from lagompy.testkit.server import free_port
from tests.conftest import POSTGRES_URL, REPO_ROOT, _create_schema, _drop_schema, require_postgres

T = TypeVar("T")

LAGOMPY = [sys.executable, "-m", "lagompy"]
USERS_APP = "examples.user_service.api:app"
NOTIFICATIONS_APP = "examples.notification_service.api:app"
#: The notification breaker's settings in these tests: opens after 2 failures, for 5 s.
MAX_FAILURES = 2
RESET_TIMEOUT = 5.0
PROBLEM = "application/problem+json"


def eventually(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Call ``check`` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)


@dataclass
class Process:
    """One service: a ``lagompy run`` process in a session of its own."""

    app: str
    port: int
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [*LAGOMPY, "run", self.app, "--port", str(self.port), "--log-level", "info"]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                pytest.fail(f"{self.app} exited with {self.popen.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"{self.app} was not ready within {timeout} s:\n{self.output()}")

    def stop(self) -> int | None:
        """SIGTERM (uvicorn runs the lifespan's shutdown), then SIGKILL the whole session;
        returns the exit status (0: it shut down cleanly)."""
        if self.popen is None:
            return None
        popen, self.popen = self.popen, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        return popen.wait()

    def kill(self) -> None:
        """SIGKILL the whole session at once: no shutdown, like a crash."""
        if self.popen is None:
            return
        popen, self.popen = self.popen, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Services:
    users: Process
    notifications: Process
    journal: JournalSettings
    ray_app: str | None = None
    processes: list[Process] = field(default_factory=list)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.users.url, timeout=30)

    def notified(self, recipient: str, client: httpx.Client | None = None) -> list[dict[str, Any]]:
        """The notifications of ``recipient``; through ``client`` when given (a kept-alive
        connection: ``httpx.get`` makes a client, and its SSL context, per call: ~35 ms each)."""
        get = httpx.get if client is None else client.get
        r = get(f"{self.notifications.url}/notifications", params={"recipient": recipient})
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def breaker(self) -> dict[str, Any]:
        status = httpx.get(f"{self.users.url}/_status/circuit-breakers", timeout=10).json()
        (breaker,) = [b for b in status if b["id"] == "notifications"]
        return dict(breaker)


def _clean_environment() -> dict[str, str]:
    drop = ("LAGOMPY_", "RAY_ADDRESS", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres-ray", marks=pytest.mark.postgres)]
)
def services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp(f"e2e-{request.param}")
    if request.param != "sqlite":
        require_postgres()
        # Before the environment is copied: attaching to this Ray may need what ray.init set.
        request.getfixturevalue("ray_session")
    env = _clean_environment()
    users_port = free_port()
    notifications_env = env | {
        # The welcome notifications come from the user service's topic, pulled over HTTP.
        "LAGOMPY_SERVICE_USERS": f"http://127.0.0.1:{users_port}",
        "LAGOMPY_EXAMPLE_NOTIFICATIONS_DB": f"sqlite:///{tmp / 'notifications.db'}",
        # A killed process's leases expire sooner: its restart takes them back sooner.
        "LAGOMPY_READSIDE_LEASE_TTL": "2",
        "LAGOMPY_READSIDE_RENEW_INTERVAL": "0.5",
    }
    notifications = Process(NOTIFICATIONS_APP, free_port(), notifications_env, tmp / "n.log")
    env |= {
        "LAGOMPY_SERVICE_NOTIFICATIONS": notifications.url,
        "LAGOMPY_BREAKER_NOTIFICATIONS_MAX_FAILURES": str(MAX_FAILURES),
        "LAGOMPY_BREAKER_NOTIFICATIONS_RESET_TIMEOUT": str(RESET_TIMEOUT),
        "LAGOMPY_BREAKER_NOTIFICATIONS_CALL_TIMEOUT": "3",
    }
    schema: str | None = None
    ray_app: str | None = None
    if request.param == "sqlite":
        journal = JournalSettings(url=f"sqlite:///{tmp / 'journal.db'}")
        env |= {"LAGOMPY_JOURNAL_URL": journal.url, "LAGOMPY_EXAMPLE_RAY": "0"}
    else:
        ray = request.getfixturevalue("ray_session")
        schema = asyncio.run(_create_schema())
        journal = JournalSettings(url=POSTGRES_URL, postgres_schema=schema, auto_migrate=True)
        ray_app = f"e2e-users-{uuid.uuid4().hex[:8]}"
        env |= {
            "LAGOMPY_JOURNAL_URL": POSTGRES_URL,
            "LAGOMPY_JOURNAL_POSTGRES_SCHEMA": schema,
            "LAGOMPY_JOURNAL_AUTO_MIGRATE": "true",
            "LAGOMPY_EXAMPLE_RAY": "1",
            "LAGOMPY_EXAMPLE_APP": ray_app,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "LAGOMPY_RUNTIME_HOSTS": "1",
            "LAGOMPY_RUNTIME_SHARDS": "8",
        }
    users = Process(USERS_APP, users_port, env, tmp / "users.log")
    running = Services(users, notifications, journal, ray_app)
    try:
        notifications.start()
        users.start()
        users.wait_ready()
        notifications.wait_ready()
        yield running
    finally:
        status = users.stop()
        running.notifications.stop()
        if ray_app is not None:
            from lagompy.runtime import namespace_of, shutdown_app

            asyncio.run(shutdown_app(ray_app))
            import ray as ray_module

            left = [
                a
                for a in ray_module.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == namespace_of(ray_app)
            ]
            assert not left, f"actors left behind: {left}"
        if schema is not None:
            asyncio.run(_drop_schema(schema))
    # SIGTERM ran the lifespan's shutdown, also with Ray attached (ray.init installs a SIGTERM
    # handler of its own that would exit at once), and `lagompy run` exited 0 (uvicorn raises
    # the signal again once shut down: run's own handler takes it).
    assert status == 0, f"exit status {status}:\n{users.output()}"
    assert "Application shutdown complete." in users.output(), users.output()


def get_when_projected(http: httpx.Client, path: str, until: Callable[[Any], bool]) -> Any:
    """GET ``path`` until its JSON satisfies ``until``: the projection follows the journal."""

    def attempt() -> Any:
        r = http.get(path)
        if r.status_code == 200 and until(r.json()):
            return r.json()
        assert r.status_code in (200, 404), r.text
        return None

    return eventually(attempt, f"GET {path} as expected")


def assert_problem(r: httpx.Response, status: int, detail: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"]
    if detail is not None:
        assert detail in body.get("detail", ""), body
    return body


# --------------------------------------------------------------------------- the tests


def test_register_read_change_deactivate(services: Services) -> None:
    with services.http() as http:
        r = http.post("/users", json={"name": "Ada Lovelace", "email": "ada@example.org"})
        assert r.status_code == 201, r.text
        ada = r.json()
        uid = ada["user_id"]
        assert ada == {"user_id": uid, "name": "Ada Lovelace", "email": "ada@example.org",
                       "active": True}  # fmt: skip
        assert r.headers["location"] == f"/users/{uid}"
        # The read side catches up within the bounded wait.
        assert get_when_projected(http, f"/users/{uid}", lambda u: True) == ada

        r = http.patch(f"/users/{uid}", json={"name": "Ada King", "email": "ada@king.example"})
        assert r.status_code == 200 and r.json()["name"] == "Ada King", r.text
        get_when_projected(http, f"/users/{uid}", lambda u: u["email"] == "ada@king.example")
        # All or nothing: a bad email rejects the valid name change too.
        assert_problem(
            http.patch(f"/users/{uid}", json={"name": "Augusta", "email": "nope"}),
            400,
            "not an email address",
        )
        assert_problem(http.patch(f"/users/{uid}", json={"name": " "}), 400, "must not be empty")
        assert_problem(http.patch(f"/users/{uid}", json={}), 422, "give a name, an email or both")

        r = http.post(f"/users/{uid}/deactivate")
        assert r.status_code == 200 and r.json()["active"] is False
        assert_problem(http.post(f"/users/{uid}/deactivate"), 409, "is deactivated")
        assert_problem(http.patch(f"/users/{uid}", json={"name": "Ada"}), 409, "is deactivated")
        final = get_when_projected(http, f"/users/{uid}", lambda u: u["active"] is False)
        assert final["name"] == "Ada King"  # the rejected changes left nothing behind

        taken = {"name": "Ada", "email": "ada@example.org", "user_id": uid}
        assert_problem(http.post("/users", json=taken), 409, "already registered")
        assert_problem(http.get("/users/nobody-here"), 404, "no user nobody-here")
        assert_problem(http.patch("/users/nobody-here", json={"name": "N"}), 404)
        assert_problem(http.post("/users/nobody-here/deactivate"), 404)
        assert_problem(http.get("/users/bad%20id"), 422)
        assert_problem(http.post("/users", json={"name": "X"}), 422, "email")
        assert_problem(http.post("/users", content=b"{not json", headers={
            "content-type": "application/json"}), 422)  # fmt: skip
        bad_name = {"name": "a\u0000b", "email": "x@example.org"}
        assert_problem(http.post("/users", json=bad_name), 400, "control characters")

        readside = http.get("/readside/users").json()
        assert {s["tag"] for s in readside} == {f"user-events{i}" for i in range(4)}
        assert all(s["failure"] is None for s in readside)
        scrape = http.get("/metrics").text
        assert 'lagompy_readside_lag_events{processor="users",tag="user-events0"}' in scrape


def test_list_by_name_with_paging(services: Services) -> None:
    prefix = f"Grace-{uuid.uuid4().hex[:6]}"
    with services.http() as http:
        ids = [f"{prefix}-{i}" for i in range(5)]
        for i, uid in enumerate(ids):
            body = {"name": f"{prefix} {i}", "email": f"g{i}@example.org", "user_id": uid}
            assert http.post("/users", json=body).status_code == 201
        http.post("/users", json={"name": "Someone Else", "email": "s@example.org"})
        assert http.post(f"/users/{ids[1]}/deactivate").status_code == 200

        def page(**params: Any) -> Any:
            r = http.get("/users", params={"name": prefix, **params})
            assert r.status_code == 200, r.text
            return r.json()

        eventually(
            lambda: True if [u["active"] for u in page(limit=10)["items"]] ==
            [True, False, True, True, True] else None, "the five users listed",
        )  # fmt: skip
        seen, after, pages = [], None, 0
        while True:
            got = page(limit=2, **({"after": after} if after else {}))
            seen += [u["user_id"] for u in got["items"]]
            pages += 1
            after = got["next_after"]
            if after is None:
                break
            assert pages < 10
        assert seen == ids and pages == 3
        assert [u["user_id"] for u in page(active="false")["items"]] == [ids[1]]
        assert page(name=prefix + " 3")["items"][0]["user_id"] == ids[3]
        assert page(name="no such prefix " + prefix) == {"items": [], "next_after": None}
        assert_problem(http.get("/users", params={"limit": 0}), 422, "limit")
        assert_problem(http.get("/users", params={"limit": 101}), 422, "limit")
        assert_problem(http.get("/users", params={"after": "../x"}), 422, "after")
        assert_problem(http.get("/users", params={"name": ""}), 422, "name")
        assert_problem(http.get("/users", params={"active": "maybe"}), 422, "active")


def test_idempotency_key_retry_gives_one_user_one_event(services: Services) -> None:
    key = f"signup-{uuid.uuid4().hex}"
    body = {"name": "Grace Hopper", "email": f"{key}@example.org"}
    with services.http() as http:
        first = http.post("/users", json=body, headers={"Idempotency-Key": key})
        retry = http.post("/users", json=body, headers={"Idempotency-Key": key})
        other = http.post("/users", json=body, headers={"Idempotency-Key": key + "-b"})
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert other.status_code == 201 and other.json()["user_id"] != first.json()["user_id"]

    async def events() -> list[Any]:
        async with await open_storage(settings=services.journal, entities=[UserEntity]) as s:
            return [e.event for e in await s.journal.events("user", first.json()["user_id"])]

    assert [type(e).__name__ for e in asyncio.run(events())] == ["UserRegistered"]
    # One event, one message on the topic, one welcome: the retry sent nothing more.
    # (Two users, maybe in two partitions: their welcomes may come in either order.)
    welcomes = sorted(f"welcome:{r.json()['user_id']}" for r in (first, other))
    eventually(
        lambda: True if sorted(n["id"] for n in services.notified(body["email"])) == welcomes
        else None,
        "the two welcome notifications",
    )  # fmt: skip


def register(http: httpx.Client, label: str) -> str:
    email = f"{label}-{uuid.uuid4().hex[:8]}@example.org"
    r = http.post("/users", json={"name": label, "email": email})
    assert r.status_code == 201, r.text
    return email


def test_every_user_gets_one_welcome_across_a_killed_notification_service(
    services: Services,
) -> None:
    """Users register while the notification service is killed (SIGKILL: no shutdown) and
    restarted: each gets exactly one welcome notification, from the user-events topic."""
    emails: list[str] = []
    stop = threading.Event()

    def keep_registering() -> None:
        with services.http() as http:
            while not stop.is_set():
                emails.append(register(http, f"kill{len(emails)}"))
                time.sleep(0.01)

    registering = threading.Thread(target=keep_registering)
    registering.start()
    try:
        eventually(lambda: True if len(emails) >= 5 else None, "registrations")
        services.notifications.kill()
        eventually(lambda: True if len(emails) >= 15 else None, "registrations while down")
        services.notifications.start()
        services.notifications.wait_ready()
        eventually(lambda: True if len(emails) >= 25 else None, "registrations after")
    finally:
        stop.set()
        registering.join(30)

    def welcomed() -> bool | None:
        counts = [len(services.notified(email, client)) for email in emails]
        assert max(counts) <= 1, "a user was welcomed twice"
        return True if min(counts) == 1 else None

    # One client for every poll: a few ms a user instead of ~35 (a new client per GET made each
    # poll of a few hundred users take seconds, and this wait tens of seconds under load).
    with httpx.Client(timeout=30) as client:
        eventually(welcomed, "a welcome for every user", timeout=30)
    with services.http() as http:  # the user service's call to it works again
        user = http.get("/users", params={"name": "kill0"}).json()["items"]
        if user:
            r = http.get(f"/users/{user[0]['user_id']}/notifications")
            assert r.status_code == 200 and len(r.json()["items"]) == 1, r.text
