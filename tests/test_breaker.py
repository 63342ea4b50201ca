"""Circuit breakers and service clients against a real downstream server on loopback that fails
on demand: open after N failures, zero requests while open, exactly one trial call when
half-open, closed after a success; cancellations not counted, timeouts counted, excluded answers
(4xx) neither counted nor closing a half-open breaker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lagompy.errors import (
    CircuitBreakerOpen,
    ConfigurationError,
    ServiceCallFailed,
    ServiceCallTimeout,
    ServiceUnavailable,
)
from lagompy.service import (
    BreakerRegistry,
    CircuitBreaker,
    ServiceClient,
    ServiceLocator,
    breaker_settings,
    current_request_id,
)
from lagompy.testkit.server import serve_in_thread


@dataclass
class Downstream:
    """What the downstream server answers, set by the test, and what it received."""

    status: int = 200
    delay: float = 0.0
    name: str = "a"
    requests: int = 0
    request_ids: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def downstream_app(d: Downstream) -> FastAPI:
    app = FastAPI()

    @app.api_route("/work", methods=["GET", "POST"])
    async def work(request: Request) -> JSONResponse:
        with d.lock:
            d.requests += 1
            d.request_ids.append(request.headers.get("x-request-id"))
        if d.delay:
            await asyncio.sleep(d.delay)
        return JSONResponse({"server": d.name, "status": d.status}, status_code=d.status)

    return app


@pytest.fixture
def downstream() -> Iterator[tuple[Downstream, str]]:
    d = Downstream()
    with serve_in_thread(downstream_app(d)) as url:
        yield d, url


def client_for(url: str, **breaker: Any) -> ServiceClient:
    b = CircuitBreaker("downstream", **breaker)
    return ServiceClient(url, breaker=b, registry=BreakerRegistry())


async def test_opens_after_max_failures_and_sends_nothing_while_open(
    downstream: tuple[Downstream, str],
) -> None:
    d, url = downstream
    async with client_for(url, max_failures=3, reset_timeout=30) as client:
        assert (await client.get("/work")).json() == {"server": "a", "status": 200}
        assert client.breaker is not None
        d.status = 500
        for i in range(3):
            assert client.breaker is not None and client.breaker.state == "closed"
            with pytest.raises(ServiceCallFailed) as failed:
                await client.get("/work")
            assert failed.value.status == 500 and failed.value.body["status"] == 500
            assert client.breaker.failure_count == i + 1
        assert client.breaker.state == "open"
        assert d.requests == 4
        d.status = 200  # healthy again, but the breaker does not know it yet
        started = time.perf_counter()
        for _ in range(50):
            with pytest.raises(CircuitBreakerOpen) as rejected:
                await client.get("/work")
        fast_fail = (time.perf_counter() - started) / 50
        assert d.requests == 4, "an open breaker let a request through"
        assert fast_fail < 0.005
        assert rejected.value.breaker_id == "downstream"
        assert 29 < rejected.value.retry_after <= 30
        status = client.breaker.status()
        assert status["rejected"] == 50 and status["failures"] == 3 and status["opened"] == 1


async def test_half_open_lets_exactly_one_trial_call_then_closes(
    downstream: tuple[Downstream, str],
) -> None:
    d, url = downstream
    async with client_for(url, max_failures=2, reset_timeout=0.3) as client:
        breaker = client.breaker
        assert breaker is not None
        d.status = 500
        for _ in range(2):
            with pytest.raises(ServiceCallFailed):
                await client.get("/work")
        assert breaker.state == "open"
        await asyncio.sleep(0.35)
        d.status, d.delay = 200, 0.3
        before = d.requests
        results = await asyncio.gather(
            *(client.get("/work") for _ in range(10)), return_exceptions=True
        )
        answered = [r for r in results if isinstance(r, httpx.Response)]
        rejected = [r for r in results if isinstance(r, CircuitBreakerOpen)]
        assert len(answered) == 1 and len(rejected) == 9, results
        assert d.requests - before == 1, "half-open breaker let more than one call through"
        assert breaker.state == "closed" and breaker.failure_count == 0
        d.delay = 0
        healthy = await asyncio.gather(*(client.get("/work") for _ in range(5)))
        assert all(r.status_code == 200 for r in healthy)
        assert d.requests - before == 6


async def test_failed_trial_call_opens_again(downstream: tuple[Downstream, str]) -> None:
    d, url = downstream
    async with client_for(url, max_failures=1, reset_timeout=0.2) as client:
        breaker = client.breaker
        assert breaker is not None
        d.status = 503
        with pytest.raises(ServiceCallFailed):
            await client.get("/work")
        await asyncio.sleep(0.25)
        with pytest.raises(ServiceCallFailed):  # the trial, and it fails
            await client.get("/work")
        assert breaker.state == "open" and breaker.status()["opened"] == 2
        requests = d.requests
        with pytest.raises(CircuitBreakerOpen):
            await client.get("/work")
        assert d.requests == requests


async def test_cancelled_call_is_not_counted(downstream: tuple[Downstream, str]) -> None:
    d, url = downstream
    async with client_for(url, max_failures=1, reset_timeout=0.2) as client:
        breaker = client.breaker
        assert breaker is not None
        d.delay = 1.0
        task = asyncio.create_task(client.get("/work"))
        while d.requests == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.state == "closed" and breaker.failure_count == 0
        assert breaker.status()["cancelled"] == 1
        # A cancelled trial call gives its place to the next caller.
        d.delay, d.status = 0, 500
        with pytest.raises(ServiceCallFailed):
            await client.get("/work")
        assert breaker.state == "open"
        await asyncio.sleep(0.25)
        d.delay, d.status = 1.0, 200
        trial = asyncio.create_task(client.get("/work"))
        await asyncio.sleep(0.05)
        assert breaker.state == "half-open"
        with pytest.raises(CircuitBreakerOpen):
            await client.get("/work")
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert breaker.state == "half-open"
        d.delay = 0
        assert (await client.get("/work")).status_code == 200
        assert breaker.state == "closed"


async def test_call_timeout_counts_as_failure(downstream: tuple[Downstream, str]) -> None:
    d, url = downstream
    async with client_for(url, max_failures=2, call_timeout=0.1, reset_timeout=30) as client:
        breaker = client.breaker
        assert breaker is not None
        d.delay = 0.6
        for i in range(2):
            started = time.perf_counter()
            with pytest.raises(ServiceCallTimeout):
                await client.get("/work")
            assert time.perf_counter() - started < 1.0
            assert breaker.status()["timeouts"] == i + 1
        assert breaker.state == "open"
        # A per-call timeout overrides the breaker's.
        fresh = CircuitBreaker("other", call_timeout=0.05)
        d.delay = 0.2
        assert (await client.get("/work", breaker=fresh, timeout=1.0)).status_code == 200


async def test_excluded_answers_neither_count_nor_close_a_half_open_breaker(
    downstream: tuple[Downstream, str],
) -> None:
    d, url = downstream
    async with client_for(url, max_failures=2, reset_timeout=0.2) as client:
        breaker = client.breaker
        assert breaker is not None
        d.status = 404
        for _ in range(5):
            with pytest.raises(ServiceCallFailed) as failed:
                await client.get("/work")
            assert failed.value.status == 404
        assert breaker.state == "closed" and breaker.failure_count == 0
        d.status = 500
        for _ in range(2):
            with pytest.raises(ServiceCallFailed):
                await client.get("/work")
        assert breaker.state == "open"
        await asyncio.sleep(0.25)
        d.status = 404
        with pytest.raises(ServiceCallFailed):  # trial call answered 404
            await client.get("/work")
        assert breaker.state == "half-open", "a 404 closed the half-open breaker"
        d.status = 500
        with pytest.raises(ServiceCallFailed):  # the next caller is the trial: it fails
            await client.get("/work")
        assert breaker.state == "open"
        assert breaker.status()["excluded"] == 6


async def test_custom_exclusions_and_plain_breaker_use() -> None:
    class Business(Exception):
        pass

    breaker = CircuitBreaker("plain", max_failures=1, exclude=[Business])

    async def business() -> None:
        raise Business("no")

    async def broken() -> None:
        raise RuntimeError("down")

    for _ in range(3):
        with pytest.raises(Business):
            await breaker.call(business)
    assert breaker.state == "closed"
    with pytest.raises(RuntimeError):
        await breaker.call(broken)
    assert breaker.state == "open"


async def test_stale_outcome_does_not_move_the_new_state(
    downstream: tuple[Downstream, str],
) -> None:
    """A slow call admitted while closed, failing after the breaker opened and half-opened,
    must not re-open it (nor count)."""
    d, url = downstream
    async with client_for(url, max_failures=1, reset_timeout=0.1) as client:
        breaker = client.breaker
        assert breaker is not None

        async def slow_failure() -> None:
            await asyncio.sleep(0.4)
            raise RuntimeError("late")

        slow = asyncio.create_task(breaker.call(slow_failure))
        d.status = 500
        with pytest.raises(ServiceCallFailed):
            await client.get("/work")
        assert breaker.state == "open"
        await asyncio.sleep(0.15)
        d.status = 200
        assert (await client.get("/work")).status_code == 200
        assert breaker.state == "closed"
        with pytest.raises(RuntimeError):
            await slow
        assert breaker.state == "closed" and breaker.failure_count == 0


async def test_status_reports_latency_percentiles_and_throughput(
    downstream: tuple[Downstream, str],
) -> None:
    d, url = downstream
    async with client_for(url) as client:
        d.delay = 0.02
        for _ in range(20):
            await client.get("/work")
        assert client.breaker is not None
        s = client.breaker.status()
    assert s["id"] == "downstream" and s["state"] == "closed"
    assert s["successes"] == 20 and s["failures"] == 0 and s["calls"] == 20
    lat = s["latency"]
    assert set(lat) == {"p50", "p98", "p99", "p99.9", "mean", "max"}
    assert 0.02 <= lat["p50"] <= lat["p98"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] < 2
    assert 0.02 <= lat["mean"] <= lat["max"]
    assert s["throughput_one_minute"] == pytest.approx(20 / 60)


def test_settings_from_the_environment_per_breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    default = breaker_settings("users")
    assert (default.max_failures, default.call_timeout, default.reset_timeout) == (10, 10.0, 15.0)
    monkeypatch.setenv("LAGOMPY_BREAKER_MAX_FAILURES", "4")
    monkeypatch.setenv("LAGOMPY_BREAKER_USER_SERVICE_MAX_FAILURES", "2")
    monkeypatch.setenv("LAGOMPY_BREAKER_USER_SERVICE_RESET_TIMEOUT", "1.5")
    assert breaker_settings("orders").max_failures == 4
    users = CircuitBreaker("user-service")
    assert users.settings.max_failures == 2 and users.settings.reset_timeout == 1.5
    assert CircuitBreaker("user-service", max_failures=7).settings.max_failures == 7
    monkeypatch.setenv("LAGOMPY_BREAKER_USER_SERVICE_CALL_TIMEOUT", "soon")
    with pytest.raises(ConfigurationError, match=r"user-service.*call_timeout"):
        CircuitBreaker("user-service")


async def test_round_robin_request_ids_and_errors() -> None:
    a, b = Downstream(name="a"), Downstream(name="b")
    with serve_in_thread(downstream_app(a)) as url_a, serve_in_thread(downstream_app(b)) as url_b:
        locator = ServiceLocator(environ={"LAGOMPY_SERVICE_INVENTORY_API": f"{url_a}, {url_b}"})
        async with ServiceClient(
            "inventory-api", locator=locator, registry=BreakerRegistry()
        ) as client:
            servers = [(await client.get("/work")).json()["server"] for _ in range(4)]
            assert servers == ["a", "b", "a", "b"]
            token = current_request_id.set("req-123")
            try:
                await client.post("/work", json={})
                await client.post("/work", json={}, headers={"X-Request-ID": "mine"})
            finally:
                current_request_id.reset(token)
            assert a.request_ids[-1] == "req-123" and b.request_ids[-1] == "mine"
            assert a.request_ids[0] is None
            assert client.breaker is not None and client.breaker.id == "inventory-api"
    with pytest.raises(ServiceUnavailable, match="LAGOMPY_SERVICE_NOWHERE"):
        await ServiceClient("nowhere", locator=ServiceLocator(environ={})).get("/")
    with pytest.raises(ConfigurationError):
        ServiceLocator({"x": "ftp://example.org"})


async def test_unreachable_service_counts_as_failure() -> None:
    from lagompy.testkit.server import free_port

    port = free_port()  # nothing listens on it
    client = client_for(f"http://127.0.0.1:{port}", max_failures=2)
    async with client:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                await client.get("/work")
        assert client.breaker is not None and client.breaker.state == "open"


async def test_transport_is_replaceable() -> None:
    d = Downstream(name="in-process")
    transport = httpx.ASGITransport(app=downstream_app(d))
    async with ServiceClient(
        "http://downstream.test", transport=transport, registry=BreakerRegistry()
    ) as client:
        assert (await client.get("/work")).json()["server"] == "in-process"
    assert d.requests == 1
