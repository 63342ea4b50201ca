"""ReadSideComponent in a service over real HTTP, on SQLite files and PostgreSQL schemas: the
workers start and stop with the app, the status route and the lag metrics are served, an
operator's pause and a failure-stop look different in the status and the metrics, and a worker
stopped by a failing handler makes the service not ready, naming the processor, tag, offset and
error, until an operator resumes or skips it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import RegisterUser, UserEntity, UserRegistered
from lagompy import EventEnvelope
from lagompy.journal import TailSettings
from lagompy.readside import ReadSideComponent, SqlReadSideProcessor
from lagompy.service import BreakerRegistry, Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from tests.test_service import sample

FAST: dict[str, Any] = {
    "max_attempts": 1,
    "retry_initial_delay": 0,
    "lease_ttl": 2.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
}


class Names(SqlReadSideProcessor):
    """Records registered names; a name "boom" makes the handler fail while ``boom_fails``."""

    name = "names"
    tag = UserEntity.tag
    entities = (UserEntity,)
    boom_fails: ClassVar[bool] = True

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS names (name TEXT)"))

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if isinstance(envelope.event, UserRegistered):
            if envelope.event.name == "boom" and type(self).boom_fails:
                raise RuntimeError("cannot project boom")
            await conn.execute(text("INSERT INTO names VALUES (:n)"), {"n": envelope.event.name})


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + 15
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_component_serves_status_lag_and_readiness(journal_settings: JournalSettings) -> None:
    Names.boom_fails = True
    names = ReadSideComponent([Names], journal_settings=journal_settings, **FAST)
    service = Service(
        name="names", entities=[UserEntity], journal_settings=journal_settings, ray=False,
        components=[names], breakers=BreakerRegistry(),
    )  # fmt: skip
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    @app.post("/register/{user_id}/{name}")
    async def register(user_id: str, name: str) -> dict[str, str]:
        user = await service.entities.ref_for(UserEntity, user_id).ask(
            RegisterUser(name, "x@example.org")
        )
        return {"name": user.name}

    @app.post("/operate/{operation}")
    async def operate(operation: str, tag: str | None = None) -> dict[str, int]:
        projections = names._projections()
        done = await getattr(projections, operation)("names", tag)
        return {"done": done}

    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:

        def tag_state(tag: str) -> dict[str, Any]:
            (status,) = [s for s in http.get("/readside/names").json() if s["tag"] == tag]
            return dict(status)

        def ready() -> httpx.Response:
            return http.get("/health/ready")

        assert http.post("/register/u1/Ada").status_code == 200
        wait_for(
            lambda: sum(s["offset"] for s in http.get("/readside/names").json()) >= 1,
            "the event handled",
        )
        assert ready().json()["checks"]["readside"] == "ok"
        missing = http.get("/readside/nothing")
        assert missing.status_code == 404
        detail = missing.json()["detail"]
        assert "no read-side processor 'nothing'" in detail
        # Names the processor only: nothing of where the database is.
        for secret in ("sqlite", "postgresql", "127.0.0.1", ".db", "lagompy_test_"):
            assert secret not in detail
        assert "/readside" not in str(app.openapi()["paths"])  # a status route, like the others

        # An operator's pause: paused in the status and the metrics, not failed, still ready.
        boom_tag = UserEntity.tag.for_entity("u2")
        assert http.post("/operate/pause", params={"tag": boom_tag}).json() == {"done": 1}
        assert tag_state(boom_tag)["state"] == "paused"
        scrape = http.get("/metrics").text
        assert sample(scrape, "lagompy_readside_paused", tag=boom_tag) == 1
        assert sample(scrape, "lagompy_readside_failed", tag=boom_tag) == 0
        assert sample(scrape, "lagompy_readside_state", tag=boom_tag, state="paused") == 1
        assert ready().status_code == 200
        http.post("/operate/resume", params={"tag": boom_tag})

        # A failing handler: failed (not paused), not ready, naming processor, tag, offset and
        # error.
        assert http.post("/register/u2/boom").status_code == 200
        wait_for(lambda: ready().status_code == 503, "not ready")
        failed = tag_state(boom_tag)
        assert (failed["state"], failed["paused"]) == ("failed", False)
        offset = failed["failure"]["offset"]
        reason = ready().json()["checks"]["readside"]
        assert reason.startswith(
            f"read-side processor 'names', tag '{boom_tag}': failed at offset {offset}: "
            f"handler failed at offset {offset} (user/u2 sequence number 1)"
        )
        assert reason.endswith("RuntimeError: cannot project boom")
        scrape = http.get("/metrics").text
        assert sample(scrape, "lagompy_readside_lag_events", tag=boom_tag) == 1
        assert sample(scrape, "lagompy_readside_failed", tag=boom_tag) == 1
        assert sample(scrape, "lagompy_readside_paused", tag=boom_tag) == 0
        assert sample(scrape, "lagompy_readside_state", tag=boom_tag, state="failed") == 1
        assert sample(scrape, "lagompy_readside_offset", processor="names") >= 1

        # Resumed once the handler is fixed: ready again, the failure line gone.
        Names.boom_fails = False
        assert http.post("/operate/resume").json() == {"done": 4}
        wait_for(lambda: ready().status_code == 200, "ready after resume")
        assert ready().json()["checks"]["readside"] == "ok"
        wait_for(lambda: tag_state(boom_tag)["failure"] is None, "the failure line cleared")

        # Failing again, skipped by an operator: ready again, counted as skipped.
        Names.boom_fails = True
        assert http.post("/register/u2x/boom").status_code == 200
        again = UserEntity.tag.for_entity("u2x")
        wait_for(lambda: ready().status_code == 503, "not ready again")
        assert f"tag '{again}': failed at offset" in ready().json()["checks"]["readside"]
        assert http.post("/operate/skip").json() == {"done": 1}
        wait_for(lambda: ready().status_code == 200, "ready after skip")
        assert tag_state(again)["skipped"] == 1
        scrape = http.get("/metrics").text
        assert sample(scrape, "lagompy_readside_failed", tag=again) == 0
        assert sample(scrape, "lagompy_readside_lag_events", tag=again) == 0

    # Stopped with the service: the status route answers 503 without a running read side.
    async def status_after_stop() -> int:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return (await http.get("/readside")).status_code

    assert asyncio.run(status_after_stop()) == 503
