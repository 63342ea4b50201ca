"""The console's parked events over real HTTP, on SQLite files and PostgreSQL schemas: the Failed
page and ``/console/api/parked`` list them with filters; read-only mode shows them with no
control and refuses retry and discard (403); with the token, retry (one, or all matching) runs
the handler again exactly once, a retry that fails keeps the row with the new error, discard
needs a confirmation, and every action is in the audit log; bad input gets a 4xx problem."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from test_console import SECRETS, TOKEN, assert_problem, wait_for

from examples.user_service.entity import RegisterUser, UserEntity, UserRegistered
from lagompy import EventEnvelope
from lagompy.console import ConsoleSettings
from lagompy.journal import TailSettings
from lagompy.readside import ReadSideComponent, SqlReadSideProcessor
from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread

PARKING: dict[str, Any] = {
    "max_attempts": 1,
    "retry_initial_delay": 0,
    "lease_ttl": 2.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
    "on_failure": "park",
}


class ParkingNames(SqlReadSideProcessor):
    """Records registered names; a name starting with "boom" fails while ``broken``."""

    name = "parking-names"
    tag = UserEntity.tag
    entities = (UserEntity,)
    broken: ClassVar[bool] = True

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS parking_names (name TEXT)"))

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if isinstance(envelope.event, UserRegistered):
            if envelope.event.name.startswith("boom") and type(self).broken:
                raise RuntimeError("cannot project boom")
            await conn.execute(
                text("INSERT INTO parking_names VALUES (:n)"), {"n": envelope.event.name}
            )


def parking_app(journal: JournalSettings, console: ConsoleSettings) -> FastAPI:
    """A service with users, a parking read side and the console; POST /register/{id}/{name};
    GET /names (the projection)."""
    readside = ReadSideComponent([ParkingNames], journal_settings=journal, **PARKING)
    service = Service(
        name="parking-test", entities=[UserEntity], journal_settings=journal, ray=False,
        components=[readside],
    )  # fmt: skip
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=console)

    @app.post("/register/{user_id}/{name}")
    async def register(user_id: str, name: str) -> dict[str, str]:
        user = await service.entities.ref_for(UserEntity, user_id).ask(
            RegisterUser(name, f"{name}@example.org")
        )
        return {"name": user.name}

    @app.get("/names")
    async def names() -> list[str]:
        async with readside.projection.read() as conn:
            rows = await conn.execute(text("SELECT name FROM parking_names ORDER BY name"))
            return [str(n) for (n,) in rows.all()]

    return app


@contextlib.contextmanager
def serving(journal: JournalSettings, console: ConsoleSettings) -> Iterator[httpx.Client]:
    ParkingNames.broken = True
    try:
        with (
            serve_in_thread(parking_app(journal, console)) as url,
            httpx.Client(base_url=url, timeout=30) as http,
        ):
            yield http
    finally:
        ParkingNames.broken = True


def parked(http: httpx.Client, **query: Any) -> list[dict[str, Any]]:
    reply = http.get("/console/api/parked", params=query)
    assert reply.status_code == 200, reply.text
    rows: list[dict[str, Any]] = reply.json()["parked"]
    return rows


def park_two(http: httpx.Client) -> None:
    for user, name in (("u1", "Ada"), ("u2", "boom1"), ("u3", "boom2")):
        assert http.post(f"/register/{user}/{name}").status_code == 200
    wait_for(lambda: len(parked(http)) == 2, "two events parked")
    wait_for(lambda: http.get("/names").json() == ["Ada"], "Ada projected")


def test_read_only_console_lists_parked_events_and_refuses_to_act(
    journal_settings: JournalSettings,
) -> None:
    with serving(journal_settings, ConsoleSettings()) as http:
        park_two(http)
        page = http.get("/console/failed")
        assert page.status_code == 200
        assert "2 parked event(s) match" in page.text
        assert "cannot project boom" in page.text and "user/u2" in page.text
        assert "/actions/" not in page.text and 'method="post"' not in page.text
        (one,) = parked(http, entity="user/u3")
        assert (one["consumer"], one["error_class"], one["attempts"]) == (
            "parking-names",
            "RuntimeError",
            1,
        )
        for action in ("retry-parked", "discard-parked"):
            body = {"id": one["id"], "confirm": True}
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                response = http.post(f"/console/actions/{action}", json=body, headers=headers)
                assert_problem(response, 403, "read-only")
        assert len(parked(http)) == 2
        # The read side's status counts them.
        statuses = http.get("/console/api/readsides").json()
        assert sum(s["parked"] for s in statuses) == 2
        assert http.get("/console/api/overview").json()["readsides"]["parked"] == 2
        assert "2 parked event(s)" in http.get("/console/").text

        # The read side's own route lists them too (read only), with problems for bad input.
        listed = http.get("/readside/parking-names/parked", params={"error": "RuntimeError"})
        assert listed.status_code == 200, listed.text
        assert listed.json()["total"] == 2 and len(listed.json()["parked"]) == 2
        one_page = http.get("/readside/parking-names/parked", params={"limit": 1}).json()
        assert one_page["total"] == 2 and len(one_page["parked"]) == 1
        for path, status, words in (
            ("/readside/nope/parked", 404, "no read-side processor 'nope'"),
            ("/readside/parking-names/parked?limit=0", 422, "limit"),
            ("/readside/parking-names/parked?after=x", 422, "after"),
            (f"/readside/parking-names/parked?after={2**63}", 422, "after"),
        ):
            problem = assert_problem(http.get(path), status, words)
            assert not any(s in str(problem) for s in SECRETS)


def test_retry_and_discard_parked_events_are_exactly_once_and_audited(
    journal_settings: JournalSettings,
) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with serving(journal_settings, ConsoleSettings(token=TOKEN)) as http:
        park_two(http)
        act = "/console/actions/"
        (first,) = parked(http, entity="user/u2")
        (second,) = parked(http, entity="user/u3")
        # Filters: by error class, entity, processor.
        assert len(parked(http, error="RuntimeError")) == 2
        assert parked(http, error="KeyError") == []
        assert [r["entity_id"] for r in parked(http, entity="user/u2")] == ["u2"]
        assert parked(http, processor="nope") == []
        assert "1 parked event(s) match" in http.get("/console/failed?entity=user/u2").text

        # Still broken: the retry fails again and keeps the row with the new error.
        done = http.post(act + "retry-parked", json={"id": first["id"]}, headers=bearer)
        assert done.status_code == 200, done.text
        assert done.json()["detail"] == "asked for a retry of 1 parked event(s)"
        wait_for(lambda: parked(http, entity="user/u2")[0]["retries"] == 1, "retried, failed")
        assert parked(http, entity="user/u2")[0]["retry_requested"] is False

        # Fixed: retry all matching the filter; each applies once and its row goes.
        ParkingNames.broken = False
        done = http.post(act + "retry-parked", json={"error": "RuntimeError"}, headers=bearer)
        assert done.status_code == 200 and "2 parked event(s)" in done.text
        wait_for(lambda: parked(http) == [], "both retried")
        assert http.get("/names").json() == ["Ada", "boom1", "boom2"]
        assert_problem(
            http.post(act + "retry-parked", json={"id": second["id"]}, headers=bearer),
            409,
            "no parked event matches",
        )

        # Discard: confirmed, audited.
        ParkingNames.broken = True
        assert http.post("/register/u4/boom3").status_code == 200
        wait_for(lambda: len(parked(http)) == 1, "parked again")
        (third,) = parked(http)
        assert_problem(
            http.post(act + "discard-parked", json={"id": third["id"]}, headers=bearer),
            400,
            "confirm=true",
        )
        done = http.post(
            act + "discard-parked", json={"id": third["id"], "confirm": True}, headers=bearer
        )
        assert done.status_code == 200 and done.json()["detail"] == "discarded 1 parked event(s)"
        assert parked(http) == []
        assert http.get("/names").json() == ["Ada", "boom1", "boom2"]
        audit = http.get("/console/api/audit").json()
        assert [(e["action"], e["result"]) for e in reversed(audit)] == [
            ("retry-parked", "ok"),
            ("retry-parked", "ok"),
            ("retry-parked", "refused"),
            ("discard-parked", "ok"),
        ]
        assert (
            audit[0]["target"]
            == f"parked events (consumer=*, error=*, entity=*, ids={third['id']})"
        )

        # Bad input: a problem naming what was wrong, nothing of the databases.
        for body, words in (
            ({"id": "abc"}, "id must be a whole number"),
            ({"id": "0"}, "id must be a whole number"),
            ({"entity": "x" * 300}, "entity must be at most 255"),
        ):
            problem = assert_problem(
                http.post(act + "retry-parked", json=body, headers=bearer), 400, words
            )
            assert not any(s in str(problem) for s in SECRETS)
        assert http.get("/console/api/parked", params={"limit": 0}).status_code == 422
        assert http.get("/console/api/parked", params={"after": -1}).status_code == 422
        assert_problem(http.get("/console/failed", params={"processor": "\x01"}), 400)


def test_the_failed_page_pages_through_many_parked_events(
    journal_settings: JournalSettings,
) -> None:
    with serving(journal_settings, ConsoleSettings()) as http:
        park_two(http)
        page = http.get("/console/failed", params={"after": parked(http)[0]["id"]}).text
        ids = re.findall(r'data-parked-id="(\d+)"', page)
        assert len(ids) == 1, page
        assert http.get("/console/failed", params={"fragment": "parked"}).status_code == 200
