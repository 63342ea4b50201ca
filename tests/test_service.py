"""lagompy in FastAPI over real HTTP on loopback: problem bodies for every error, Idempotency-Key
retries (same reply, one event) on both journals and on Ray, health, metrics with values,
circuit-breaker status, request-id propagation through a service client."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from examples.user_service.api import create_app
from examples.user_service.entity import UserEntity
from lagompy import open_storage
from lagompy.errors import (
    AskTimeout,
    CircuitBreakerOpen,
    CommandRejected,
    ConcurrencyConflict,
    InvalidCommand,
    JournalUnavailable,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
)
from lagompy.service import (
    BreakerRegistry,
    CircuitBreaker,
    Service,
    ServiceClient,
    ServiceLocator,
    client,
)
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread


class Teapot(CommandRejected):
    http_status = 418


ERRORS: dict[str, tuple[Exception, int, dict[str, Any]]] = {
    "invalid": (InvalidCommand("name must not be empty"), 400, {}),
    "not-found": (NotFound("user 7 is not registered"), 404, {}),
    "teapot": (Teapot("I am a teapot"), 418, {}),
    "per-instance": (CommandRejected("gone", http_status=410), 410, {}),
    "conflict": (
        ConcurrencyConflict(entity_type="user", entity_id="7", expected_seq_nr=1, actual_seq_nr=2),
        409,
        {},
    ),
    "overloaded": (Overloaded("queues are full"), 503, {"retry-after": "1"}),
    "journal-down": (JournalUnavailable("connection refused at 10.0.0.3"), 503, {}),
    "breaker": (
        CircuitBreakerOpen("open", breaker_id="inventory", retry_after=7.2),
        503,
        {"retry-after": "8"},
    ),
    "ask-timeout": (AskTimeout("no reply in 5 s", command_id="cmd-1"), 504, {}),
    "outcome-unknown": (OutcomeUnknown("cmd-2"), 504, {}),
    "upstream-timeout": (ServiceCallTimeout("slow"), 504, {}),
    "upstream-down": (ServiceUnavailable("refused"), 503, {}),
    "upstream-failed": (ServiceCallFailed("boom", status=500, body="x"), 502, {}),
    "bug": (RuntimeError("secret internals: password=hunter2"), 500, {}),
}


class Body(BaseModel):
    count: int


def error_app() -> FastAPI:
    service = Service(name="errors", breakers=BreakerRegistry())
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        raise ERRORS[kind][0]

    @app.post("/validate")
    async def validate(body: Body) -> int:
        return body.count

    return app


@pytest.fixture(scope="module")
def error_url() -> Iterator[str]:
    with serve_in_thread(error_app()) as url:
        yield url


@pytest.mark.parametrize("kind", list(ERRORS))
def test_errors_become_problem_documents(error_url: str, kind: str) -> None:
    error, status, headers = ERRORS[kind]
    r = httpx.get(f"{error_url}/raise/{kind}")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["instance"] == f"/raise/{kind}"
    assert body["request_id"] == r.headers["x-request-id"]
    for name, value in headers.items():
        assert r.headers[name] == value
    if status == 500:
        assert body == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "instance": f"/raise/{kind}",
            "request_id": r.headers["x-request-id"],
        }
        assert "hunter2" not in r.text
        return
    assert body["type"].startswith("urn:lagompy:problem:")
    if isinstance(error, CommandRejected):
        assert body["detail"] == str(error)
    if isinstance(error, (AskTimeout, OutcomeUnknown)):
        assert body["command_id"] == error.command_id
    if isinstance(error, JournalUnavailable):
        assert "10.0.0.3" not in r.text
        assert r.headers["retry-after"] == "1"
    if isinstance(error, CircuitBreakerOpen):
        assert body["breaker_id"] == "inventory"


def test_validation_and_unknown_routes_are_problems(error_url: str) -> None:
    r = httpx.post(f"{error_url}/validate", json={"count": "many"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["errors"][0]["loc"] == ["body", "count"]
    assert "count" in body["detail"]
    r = httpx.post(
        f"{error_url}/validate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    r = httpx.get(f"{error_url}/nowhere")
    assert r.status_code == 404 and r.json()["title"] == "Not Found"
    r = httpx.delete(f"{error_url}/validate")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"


def test_request_ids_are_kept_or_made(error_url: str) -> None:
    r = httpx.get(f"{error_url}/health/live", headers={"X-Request-ID": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    r = httpx.get(f"{error_url}/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


# --------------------------------------------------------------------------- the user app


def user_app(journal_settings: JournalSettings, *, ray: bool) -> FastAPI:
    return create_app(
        journal_settings=journal_settings,
        ray=ray,
        name=f"users-{uuid.uuid4().hex[:8]}",
        runtime_options={"hosts": 1, "shards": 8} if ray else None,
        breakers=BreakerRegistry(),
    )


async def events_of(journal_settings: JournalSettings, user_id: str) -> list[Any]:
    async with await open_storage(settings=journal_settings, entities=[UserEntity]) as storage:
        return [e.event for e in await storage.journal.events("user", user_id)]


def check_idempotent_registration(url: str) -> None:
    with httpx.Client(base_url=url) as http:
        body = {"name": "Ada", "email": "ada@example.org", "user_id": "ada"}
        first = http.post("/users", json=body, headers={"Idempotency-Key": "reg-ada-1"})
        assert first.status_code == 201, first.text
        renamed = http.patch("/users/ada", json={"name": "Ada King"})
        assert renamed.json()["name"] == "Ada King"
        # The retry gets the first reply (not "already registered"), and persists nothing.
        retry = http.post("/users", json=body, headers={"Idempotency-Key": "reg-ada-1"})
        assert retry.status_code == 201 and retry.json() == first.json()
        again = http.post("/users", json=body, headers={"Idempotency-Key": "reg-ada-2"})
        assert again.status_code == 409
        assert again.json()["detail"] == "user ada is already registered"
        missing = http.patch("/users/bob", json={"name": "Bob"})
        assert missing.status_code == 404 and missing.json()["title"] == "Not found"
        bad = http.post("/users", json={**body, "user_id": "bob", "email": "nope"})
        assert bad.status_code == 400 and "not an email address" in bad.json()["detail"]
        long_key = http.post("/users", json=body, headers={"Idempotency-Key": "k" * 300})
        assert long_key.status_code == 422


async def test_idempotency_key_in_process(journal_settings: JournalSettings) -> None:
    with serve_in_thread(user_app(journal_settings, ray=False)) as url:
        check_idempotent_registration(url)
    events = await events_of(journal_settings, "ada")
    assert [type(e).__name__ for e in events] == ["UserRegistered", "NameChanged"]


async def test_idempotency_key_on_ray(
    journal_settings: JournalSettings, ray_session: object
) -> None:
    with serve_in_thread(user_app(journal_settings, ray=True)) as url:
        check_idempotent_registration(url)
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "service": "ok",
            "runtime": "ok",
            "journal": "ok",
            "readside": "ok",
            "topics": "ok",  # the user-events topic's producers (none here: no broker)
        }
        scrape = httpx.get(f"{url}/metrics").text
        assert sample(scrape, "lagompy_host_commands_total", host="0") >= 6
        assert sample(scrape, "lagompy_journal_write_transactions_total", host="0") == 2
        assert sample(scrape, "lagompy_journal_events_written_total", host="0") == 2
    events = await events_of(journal_settings, "ada")
    assert [type(e).__name__ for e in events] == ["UserRegistered", "NameChanged"]


def sample(scrape: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (summed over other labels)."""
    total, found = 0.0, False
    for line in scrape.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"no sample {name}{labels} in:\n{scrape}"
    return total


def test_health_and_metrics_in_process(tmp_path: Any) -> None:
    settings = JournalSettings(url=f"sqlite:///{tmp_path / 'm.db'}")
    with serve_in_thread(user_app(settings, ray=False)) as url, httpx.Client(base_url=url) as http:
        before = http.get("/metrics").text
        ok_before = sample_or_zero(before, "lagompy_asks_total", entity_type="user", outcome="ok")
        for _ in range(5):
            r = http.post("/users", json={"name": "M", "email": "m@example.org"})
            assert r.status_code == 201
        assert http.patch("/users/nobody", json={"name": "N"}).status_code == 404
        scrape = http.get("/metrics").text
        assert (
            sample(scrape, "lagompy_asks_total", entity_type="user", outcome="ok") - ok_before == 5
        )
        assert sample(scrape, "lagompy_asks_total", entity_type="user", outcome="rejected") >= 1
        assert sample(scrape, "lagompy_ask_duration_seconds_count", entity_type="user") >= 6
        assert sample(scrape, "lagompy_journal_events_written_total", host="local") == 5
        assert sample(scrape, "lagompy_live_entities", host="local") == 6
        assert sample(scrape, "lagompy_http_requests_total", route="/users", status="201") >= 5
        assert http.get("/health/live").json() == {"status": "live"}
        ready = http.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["journal"] == "ok"


def sample_or_zero(scrape: str, name: str, **labels: str) -> float:
    try:
        return sample(scrape, name, **labels)
    except AssertionError:
        return 0.0


class Flaky:
    """A component (like a read-side worker) whose readiness the test sets."""

    name = "projections"

    def __init__(self) -> None:
        self.is_ready = False
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    async def ready(self) -> bool:
        return self.is_ready

    async def metric_samples(self) -> list[Any]:
        return [("lagompy_readside_lag", "Events behind.", "gauge", {"processor": "p"}, 3.0)]


def test_components_start_stop_and_take_part_in_readiness() -> None:
    component = Flaky()
    service = Service(name="components", components=[component], breakers=BreakerRegistry())
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    with serve_in_thread(app) as url:
        assert component.events == ["start"]
        r = httpx.get(f"{url}/health/ready")
        assert r.status_code == 503
        assert r.json()["checks"] == {"service": "ok", "projections": "not ready"}
        component.is_ready = True
        assert httpx.get(f"{url}/health/ready").status_code == 200
        assert sample(httpx.get(f"{url}/metrics").text, "lagompy_readside_lag", processor="p") == 3
    assert component.events == ["start", "stop"]


Inventory = Annotated[ServiceClient, Depends(client("inventory"))]
Nope = Annotated[ServiceClient, Depends(client("nope"))]


def test_clients_breakers_status_and_request_id_propagation() -> None:
    seen: list[str | None] = []
    downstream = FastAPI()

    @downstream.get("/stock/{item}")
    async def stock(item: str) -> dict[str, Any]:
        return {"item": item}

    @downstream.middleware("http")
    async def record(request: Any, call_next: Any) -> Any:
        seen.append(request.headers.get("x-request-id"))
        return await call_next(request)

    registry = BreakerRegistry()
    with serve_in_thread(downstream) as down_url:
        locator = ServiceLocator({"inventory": down_url})
        registry.add(CircuitBreaker("inventory", max_failures=1, reset_timeout=30))
        service = Service(name="shop", clients=["inventory"], locator=locator, breakers=registry)
        app = FastAPI(lifespan=service.lifespan)
        service.install(app)

        @app.get("/items/{item}")
        async def item(item: str, inventory: Inventory) -> Any:
            return (await inventory.get(f"/stock/{item}")).json()

        @app.get("/missing-client")
        async def missing(other: Nope) -> None:
            raise AssertionError("not reached")  # pragma: no cover

        with serve_in_thread(app) as url:
            r = httpx.get(f"{url}/items/apple", headers={"X-Request-ID": "trace-42"})
            assert r.json() == {"item": "apple"} and seen == ["trace-42"]
            status = httpx.get(f"{url}/_status/circuit-breakers").json()
            assert [s["id"] for s in status] == ["inventory"]
            assert status[0]["state"] == "closed" and status[0]["successes"] == 1
            assert set(status[0]["latency"]) == {"p50", "p98", "p99", "p99.9", "mean", "max"}
            assert "throughput_one_minute" in status[0]
            assert httpx.get(f"{url}/missing-client").status_code == 500
            registry.get("inventory").open()
            r = httpx.get(f"{url}/items/apple")
            assert r.status_code == 503 and 29 <= int(r.headers["retry-after"]) <= 30
            assert r.json()["breaker_id"] == "inventory" and len(seen) == 1
            scrape = httpx.get(f"{url}/metrics").text
            assert sample(scrape, "lagompy_circuit_breaker_state", breaker="inventory") == 2
            assert (
                sample(
                    scrape,
                    "lagompy_circuit_breaker_calls_total",
                    breaker="inventory",
                    outcome="rejected",
                )
                == 1
            )
