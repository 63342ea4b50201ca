"""ReadSideComponent in a service over real HTTP: the workers start and stop with the app, the
status route and the lag metrics are served, and a worker stopped by a failing handler makes the
service not ready (and names the failure) until the event is fixed by an operator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import RegisterUser, UserEntity, UserRegistered
from lagompy import EventEnvelope
from lagompy.breaker import BreakerRegistry
from lagompy.readside import SqlReadSideProcessor
from lagompy.readside_service import ReadSideComponent
from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from tests.test_service import sample


class Names(SqlReadSideProcessor):
    """Records registered names; a name "boom" makes the handler fail."""

    name = "names"
    tag = UserEntity.tag
    entities = (UserEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS names (name TEXT)"))

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if isinstance(envelope.event, UserRegistered):
            if envelope.event.name == "boom":
                raise RuntimeError("cannot project boom")
            await conn.execute(text("INSERT INTO names VALUES (:n)"), {"n": envelope.event.name})


def test_component_serves_status_lag_and_readiness(tmp_path: Path) -> None:
    journal = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    names = ReadSideComponent(
        [Names], journal_settings=journal, max_attempts=1, retry_initial_delay=0
    )
    service = Service(
        name="names", entities=[UserEntity], journal_settings=journal, ray=False,
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

    def wait_for(check: Any, what: str) -> None:
        deadline = time.monotonic() + 15
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        assert http.post("/register/u1/Ada").status_code == 200
        wait_for(
            lambda: sum(s["offset"] for s in http.get("/readside/names").json()) >= 1,
            "the event handled",
        )
        assert http.get("/health/ready").json()["checks"]["readside"] == "ok"
        assert http.get("/readside/nothing").status_code == 404
        assert "/readside" not in str(app.openapi()["paths"])  # a status route, like the others

        assert http.post("/register/u2/boom").status_code == 200
        wait_for(lambda: http.get("/health/ready").status_code == 503, "not ready")
        ready = http.get("/health/ready").json()
        assert ready["checks"]["readside"] == "RuntimeError: not ready"
        (failed,) = [s for s in http.get("/readside/names").json() if s["state"] == "failed"]
        assert "cannot project boom" in failed["failure"]["error"]
        scrape = http.get("/metrics").text
        assert sample(scrape, "lagompy_readside_lag_events", tag=failed["tag"]) == 1
        assert sample(scrape, "lagompy_readside_offset", processor="names") >= 1

    # Stopped with the service: the status route answers 503 without a running read side.
    async def status_after_stop() -> int:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return (await http.get("/readside")).status_code

    assert asyncio.run(status_after_stop()) == 503
