"""The management console over real HTTP (uvicorn on loopback), on SQLite files and PostgreSQL
schemas: every page and JSON route answers; read-only mode refuses every action with a 403
problem and renders no control; with a token, actions need it (bearer or a logged-in session
with its CSRF token), destructive ones a confirmation, and each is written to the audit table;
bad input gets a 4xx problem that leaks nothing of where the databases are."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import RegisterUser, UserEntity, UserRegistered
from lagompy import ConfigurationError, EventEnvelope
from lagompy.console import ACTIONS, ConsoleSettings
from lagompy.console._backend import MASK, RebuildProgress, jsonable
from lagompy.journal import TailSettings
from lagompy.readside import ReadSideComponent, SqlReadSideProcessor
from lagompy.readside._store import OffsetStore
from lagompy.service import BreakerRegistry, Service
from lagompy.settings import JournalSettings
from lagompy.sql import Database
from lagompy.testkit.server import serve_in_thread

TOKEN = "console-test-token-0123456789"
PAGES = ["/console/", "/console/readsides", "/console/topics", "/console/failed",
         "/console/entities", "/console/breakers", "/console/audit", "/console/login"]  # fmt: skip
JSON_ROUTES = ["/console/api/overview", "/console/api/readsides", "/console/api/topics",
               "/console/api/failed",
               "/console/api/breakers", "/console/api/audit"]  # fmt: skip
FAST: dict[str, Any] = {
    "max_attempts": 1,
    "retry_initial_delay": 0,
    "lease_ttl": 2.0,
    "renew_interval": 0.1,
    "tail": TailSettings(poll_interval=0.02),
}
#: What no problem document may name: where the databases are.
SECRETS = ("sqlite", "postgresql", "lagompy_test_", ".db", "Traceback")


class ConsoleNames(SqlReadSideProcessor):
    """Records registered names; a name starting with "boom" always fails."""

    name = "console-names"
    tag = UserEntity.tag
    entities = (UserEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS console_names (name TEXT)"))

    async def reset(self, conn: AsyncConnection) -> None:
        await conn.execute(text("DELETE FROM console_names"))

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        if isinstance(envelope.event, UserRegistered):
            if envelope.event.name.startswith("boom"):
                raise RuntimeError("cannot project boom")
            await conn.execute(
                text("INSERT INTO console_names VALUES (:n)"), {"n": envelope.event.name}
            )


def console_app(
    journal: JournalSettings,
    console: ConsoleSettings,
    *,
    ray: bool = False,
    breakers: BreakerRegistry | None = None,
) -> FastAPI:
    """A service with users, a read side, a breaker and the console; POST /register/{id}/{name}.
    With ``ray``, the users live on two shard hosts (8 shards), stopped with the service."""
    readside = ReadSideComponent([ConsoleNames], journal_settings=journal, **FAST)
    breakers = BreakerRegistry() if breakers is None else breakers
    breakers.get("inventory")
    service = Service(
        name=f"console-test-{uuid.uuid4().hex[:8]}" if ray else "console-test",
        entities=[UserEntity], journal_settings=journal, ray=ray,
        runtime_options={"hosts": 2, "shards": 8} if ray else None, stop_runtime=ray,
        components=[readside], breakers=breakers,
    )  # fmt: skip
    app = FastAPI(lifespan=service.lifespan)
    service.install(app, console=console)

    @app.post("/register/{user_id}/{name}")
    async def register(user_id: str, name: str) -> dict[str, str]:
        user = await service.entities.ref_for(UserEntity, user_id).ask(
            RegisterUser(name, f"{name}@example.org")
        )
        return {"name": user.name}

    return app


@contextlib.contextmanager
def serving(
    journal: JournalSettings, console: ConsoleSettings, **options: Any
) -> Iterator[httpx.Client]:
    with (
        serve_in_thread(console_app(journal, console, **options)) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        yield http


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def tag_of(user_id: str) -> str:
    return UserEntity.tag.for_entity(user_id)


def state(http: httpx.Client, tag: str) -> str:
    (row,) = [s for s in http.get("/console/api/readsides").json() if s["tag"] == tag]
    return str(row["state"])


def handled(http: httpx.Client, count: int) -> None:
    wait_for(
        lambda: sum(s["offset"] for s in http.get("/console/api/readsides").json()) >= count,
        f"{count} events handled",
    )


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    for word in words:
        assert word in body.get("detail", ""), body
    for secret in SECRETS:
        assert secret not in response.text, (secret, response.text)
    return body


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


# --------------------------------------------------------------------------- read-only


def test_read_only_console_shows_everything_and_refuses_every_action(
    journal_settings: JournalSettings,
) -> None:
    breakers = BreakerRegistry()
    console = ConsoleSettings(show_payloads=True)
    with serving(journal_settings, console, breakers=breakers) as http:
        assert http.post("/register/u1/Ada").status_code == 200
        handled(http, 1)
        for page in PAGES:
            response = http.get(page)
            assert response.status_code == 200, page
            assert response.headers["content-type"].startswith("text/html")
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert "read-only" in response.text
            # No action control anywhere: no form posts to an action, no login form.
            assert "/actions/" not in response.text, page
            assert 'method="post"' not in response.text, page
        for route in JSON_ROUTES:
            assert http.get(route).status_code == 200, route
        assert http.get("/console", follow_redirects=False).status_code == 307
        assert http.get("/console/static/console.js").status_code == 200
        assert_problem(http.get("/console/static/../../etc/passwd"), 404)

        # Every action answers 403, whatever credentials come with it.
        for action in ACTIONS:
            body = {"processor": "console-names", "confirm": True}
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                response = http.post(f"/console/actions/{action}", json=body, headers=headers)
                assert_problem(response, 403, "read-only")
        assert_problem(http.post("/console/login", data={"token": TOKEN}), 403, "read-only")
        assert state(http, tag_of("u1")) != "paused"
        assert http.get("/console/api/audit").json() == []

        # Payloads shown when the setting says so; the overview names the parts.
        found = http.get("/console/api/entities/user/u1").json()
        (event,) = found["events"]
        assert (event["seq_nr"], event["type"], event["payload"]["name"]) == (
            1, "UserRegistered", "Ada",
        )  # fmt: skip
        assert found["masked"] is False
        assert found["state"] == {
            "user_id": "u1", "name": "Ada", "email": "Ada@example.org", "active": True,
        }  # fmt: skip
        (command,) = found["commands"]  # the ask's reply, stored with its event
        assert command["seq_nr"] == 1 and "Ada@example.org" in str(command["reply"])
        assert "Ada@example.org" in http.get("/console/entities?type=user&id=u1").text
        overview = http.get("/console/api/overview").json()
        assert overview["checks"]["readside"] == "ok"
        assert overview["hosts"][0]["index"] == "local"
        assert overview["hosts"][0]["live_entities"] == 1
        assert overview["breakers"] == {"total": 1, "open": 0, "not_closed": []}
        assert "inventory" in http.get("/console/breakers").text
        # The breakers' state changes, newest first.
        breakers.get("inventory").open()
        breakers.get("inventory").close()
        changes = http.get("/console/api/breaker-changes").json()
        assert [(c["breaker"], c["state"]) for c in changes] == [
            ("inventory", "closed"), ("inventory", "open"),
        ]  # fmt: skip
        assert "state-open" in http.get("/console/breakers").text

        # Beyond 64 tags, one line per processor, each linking to its tags (with their lag).
        async def many_tags() -> None:
            database = Database.create(journal_settings)
            try:
                await OffsetStore(database).ensure("many", [f"t{i:02d}" for i in range(70)])
            finally:
                await database.dispose()

        asyncio.run(many_tags())
        page = http.get("/console/readsides").text
        assert 'id="processors"' in page and "70 stopped" in page
        assert 'href="/console/readsides?processor=many"' in page
        detail = http.get("/console/readsides", params={"processor": "many"}).text
        assert detail.count('data-processor="many"') == 70 and "console-names" not in detail
        assert http.get("/console/readsides", params={"processor": "nope"}).status_code == 404
        assert_problem(http.get("/console/api/readsides?processor=nope"), 404, "'nope'")
        assert len(http.get("/console/api/readsides?lag=false").json()) == 74


def test_the_overview_shows_the_shard_hosts_on_ray(
    journal_settings: JournalSettings, ray_session: object
) -> None:
    with serving(journal_settings, ConsoleSettings(), ray=True) as http:
        for user in ("u1", "u2", "u3"):
            assert http.post(f"/register/{user}/Ada").status_code == 200
        overview = http.get("/console/api/overview").json()
        assert overview["checks"]["runtime"] == "ok"
        hosts = overview["hosts"]
        assert [(h["index"], h["shards"]) for h in hosts] == [(0, 4), (1, 4)]
        assert sum(h["live_entities"] for h in hosts) == 3
        assert all(isinstance(h["pid"], int) for h in hosts)
        page = http.get("/console/").text
        assert 'data-host="0"' in page and 'data-host="1"' in page
        # Commands per second since the last reading (none at the first).
        assert all(h["commands_per_s"] is None for h in hosts)
        time.sleep(0.6)
        for user in ("u4", "u5", "u6", "u7"):
            assert http.post(f"/register/{user}/Ada").status_code == 200
        hosts = http.get("/console/api/overview").json()["hosts"]
        assert sum(h["commands_per_s"] for h in hosts) > 0
        # Seven users, each new: activated without a read, none of them refused.
        assert sum(h["new_entities"] for h in hosts) == 7
        assert sum(h["new_refused"] for h in hosts) == 0
        fragment = http.get("/console/?fragment=hosts").text
        assert fragment.count("<tr data-host=") == 2 and "<html" not in fragment
        # The entity's events are read from the journal the hosts write.
        found = http.get("/console/api/entities/user/u2").json()
        assert [e["type"] for e in found["events"]] == ["UserRegistered"]


# --------------------------------------------------------------------------- actions


def test_actions_need_the_token_csrf_and_confirmation_and_are_audited(
    journal_settings: JournalSettings,
) -> None:
    console = ConsoleSettings(token=TOKEN, user_header="X-Forwarded-User")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with serving(journal_settings, console) as http:
        assert http.post("/register/u1/Ada").status_code == 200
        handled(http, 1)
        tag = tag_of("u1")

        # Refused without the token, or with a wrong one.
        body = {"processor": "console-names", "tag": tag}
        refused = http.post("/console/actions/pause", json=body)
        assert_problem(refused, 401, "token")
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer not-the-token-at-all-0000"}
        assert_problem(http.post("/console/actions/pause", json=body, headers=wrong), 401)
        assert state(http, tag) != "paused"
        page = http.get("/console/readsides").text
        assert "/actions/" not in page and "Log in to act" in page

        # With the bearer token: done and audited, with the proxy's user name.
        done = http.post(
            "/console/actions/pause", json=body, headers={**bearer, "X-Forwarded-User": "ada"}
        )
        assert done.status_code == 200, done.text
        assert done.json()["result"] == "ok"
        assert state(http, tag) == "paused"
        (entry,) = http.get("/console/api/audit").json()
        assert (entry["actor"].split()[0], entry["action"], entry["result"]) == (
            "ada", "pause", "ok",
        )  # fmt: skip
        assert tag in entry["target"]

        # Bad input: a 4xx problem naming what was wrong, never a 500.
        act = "/console/actions/"
        assert_problem(http.post(act + "nuke", json=body, headers=bearer), 404, "nuke")
        assert_problem(http.post(act + "pause", json={}, headers=bearer), 400, "processor")
        assert_problem(http.post(act + "pause", json=[1], headers=bearer), 400, "JSON object")
        assert_problem(
            http.post(act + "pause", content=b"{", headers={**bearer, "content-type":
                      "application/json"}), 400, "JSON",
        )  # fmt: skip
        assert_problem(
            http.post(act + "pause", content=b"x", headers={**bearer, "content-type":
                      "text/plain"}), 415,
        )  # fmt: skip
        unknown = http.post(act + "pause", json={"processor": "nope"}, headers=bearer)
        assert_problem(unknown, 404, "no read-side processor 'nope'")
        for offset in ("ten", "-1", "²", "1e3", 10**20):
            bad_offset = {**body, "offset": offset, "confirm": True}
            response = http.post(act + "set-offset", json=bad_offset, headers=bearer)
            assert_problem(response, 400, "offset")
        beyond = {**body, "offset": 10**9, "confirm": True}
        assert_problem(http.post(act + "set-offset", json=beyond, headers=bearer), 409, "beyond")
        # Destructive without confirmation: refused, nothing done.
        assert_problem(http.post(act + "skip", json=body, headers=bearer), 400, "confirm=true")
        results = [(e["action"], e["result"]) for e in http.get("/console/api/audit").json()]
        assert results == [("set-offset", "refused"), ("pause", "refused"), ("pause", "ok")]

        # A rebuild runs in the background; its progress reaches 100%, its end is audited.
        assert_problem(http.post(act + "rebuild", json=body, headers=bearer), 400, "confirm")
        rebuild = {"processor": "console-names", "confirm": True}
        started = http.post(act + "rebuild", json=rebuild, headers=bearer)
        assert started.json()["detail"] == "rebuild started", started.text

        def rebuilt() -> dict[str, Any] | None:
            (progress,) = http.get("/console/api/rebuilds").json()
            return progress if progress["state"] != "running" else None

        wait_for(rebuilt, "the rebuild done")
        assert rebuilt() == {**(rebuilt() or {}), "state": "done", "percent": 100, "done": 1}
        missing = {"processor": "nope", "confirm": True}
        assert_problem(http.post(act + "rebuild", json=missing, headers=bearer), 404, "'nope'")
        actions = [(e["action"], e["result"]) for e in http.get("/console/api/audit").json()]
        assert actions[:3] == [
            ("rebuild", "refused"),
            ("rebuild-finished", "ok"),
            ("rebuild", "ok"),
        ]
        handled(http, 1)

        # The browser: log in with the token (wrong first), a cookie for the console only.
        assert http.post("/console/login", data={"token": "wrong"}).status_code == 401
        login = http.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        page = http.get("/console/readsides").text
        assert "/actions/resume" in page
        csrf = csrf_of(page)
        form = {"processor": "console-names", "tag": tag, "next": "/console/readsides"}
        # The form without its CSRF token, or with another: refused.
        assert_problem(http.post(act + "resume", data=form), 403, "CSRF")
        assert_problem(http.post(act + "resume", data={**form, "csrf": "0" * 64}), 403, "CSRF")
        assert_problem(http.post(act + "resume", data={**form, "csrf": "é"}), 403, "CSRF")
        # A forged or mangled session cookie is no session.
        with httpx.Client(base_url=str(http.base_url)) as other:
            for raw in ("lagompy_console=x.é".encode("latin-1"), b"lagompy_console=abc.def"):
                with_cookie = {b"Cookie": raw}
                post = other.post(act + "resume", data={**form, "csrf": csrf}, headers=with_cookie)
                assert_problem(post, 401)
                page = other.get("/console/readsides", headers=with_cookie).text
                assert "/actions/" not in page
        assert state(http, tag) == "paused"
        resumed = http.post(act + "resume", data={**form, "csrf": csrf}, follow_redirects=False)
        assert resumed.status_code == 303
        assert resumed.headers["location"].startswith("/console/readsides?done=resume")
        wait_for(lambda: state(http, tag) != "paused", "resumed")
        # An outside "next" is not followed.
        again = http.post(
            act + "pause", data={**form, "csrf": csrf, "next": "https://evil.example/"},
            follow_redirects=False,
        )  # fmt: skip
        assert again.headers["location"].startswith("/console/?done=")
        http.post(act + "resume", data={**form, "csrf": csrf})

        # A failing event: listed under Failed, filtered by processor and error class.
        assert http.post("/register/u2/boom").status_code == 200
        boom = tag_of("u2")
        wait_for(lambda: state(http, boom) == "failed", "failed")
        (failed,) = http.get("/console/api/failed", params={"error": "RuntimeError"}).json()
        assert (failed["tag"], failed["error_class"]) == (boom, "RuntimeError")
        assert http.get("/console/api/failed", params={"error": "KeyError"}).json() == []
        assert http.get("/console/api/failed", params={"processor": "other"}).json() == []
        for entity, count in (("user/u2", 1), ("user", 1), ("user/u1", 0), ("robot", 0)):
            found = http.get("/console/api/failed", params={"entity": entity}).json()
            assert len(found) == count, entity
        page = http.get("/console/failed", params={"error": "RuntimeError"}).text
        assert "cannot project boom" in page and "/actions/skip-failed" in page
        # Retry (resume): it fails again. Skip: the browser is asked to confirm first.
        filt = {"error": "RuntimeError", "entity": "user", "csrf": csrf, "next": "/console/failed"}
        assert http.post(act + "retry-failed", data=filt, follow_redirects=False).status_code == 303
        wait_for(lambda: state(http, boom) == "failed", "failed again")
        confirm = http.post(act + "skip-failed", data=filt)
        assert confirm.status_code == 200 and 'name="confirm" value="yes"' in confirm.text
        assert state(http, boom) == "failed"
        skipped = http.post(
            act + "skip-failed", data={**filt, "confirm": "yes"}, follow_redirects=True
        )
        assert skipped.status_code == 200 and "skipped the failing event of 1" in skipped.text
        wait_for(lambda: state(http, boom) not in ("failed",), "skipped")
        refusal = http.post(act + "skip-failed", data={**filt, "confirm": "yes"})
        assert refusal.status_code == 409 and "no failed read-side tag" in refusal.text
        audit = http.get("/console/audit").text
        for words in ("skip-failed", "retry-failed", "login", "refused"):
            assert words in audit

        # Entities: masked payloads by default; bad lookups are 4xx problems.
        found = http.get("/console/api/entities/user/u1").json()
        assert found["events"][0]["payload"] == {"user_id": MASK, "name": MASK, "email": MASK}
        assert found["state"] == {"user_id": MASK, "name": MASK, "email": MASK, "active": MASK}
        (command,) = found["commands"]
        assert "Ada" not in str(command["reply"]) and MASK in str(command["reply"])
        assert "Ada@example.org" not in http.get("/console/entities?type=user&id=u1").text
        entity = "/console/api/entities/"
        assert_problem(http.get(entity + "robot/1"), 404, "no entity type 'robot'", "user")
        # No workflows here: not found (a 503 said "try again later" to what never comes).
        assert_problem(http.get("/console/api/workflows"), 404, "runs no workflows")
        assert_problem(http.get(entity + "user/nobody"), 404, "no events")
        assert_problem(http.get(entity + "user/" + "x" * 300), 400)
        assert_problem(http.get(entity + "user/u1", params={"from_seq_nr": 0}), 422)
        assert_problem(http.get(entity + "user/u1", params={"from_seq_nr": 2**63}), 422)
        assert_problem(http.get("/console/api/parked", params={"after": 2**63}), 422)
        assert http.get("/console/entities?type=robot&id=1").status_code == 404

        # Log out: the session ends.
        out = http.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
        assert out.status_code == 303
        assert "/actions/" not in http.get("/console/readsides").text


# --------------------------------------------------------------------------- settings


def test_settings_refuse_a_short_token_and_a_bad_prefix() -> None:
    with pytest.raises(ConfigurationError, match=r"LAGOMPY_CONSOLE_TOKEN.*at least 16") as e:
        ConsoleSettings(token="short-secret")
    assert "short-secret" not in str(e.value)
    with pytest.raises(ConfigurationError, match="LAGOMPY_CONSOLE_PREFIX"):
        ConsoleSettings(prefix="console/")
    assert TOKEN not in repr(ConsoleSettings(token=TOKEN))


def test_the_console_is_mounted_only_when_asked(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def has_console() -> bool:
        app = FastAPI()
        Service(name="s", breakers=BreakerRegistry()).install(app)

        async def get() -> int:
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
                return (await http.get("/console/api/breakers")).status_code

        return asyncio.run(get()) == 200

    assert not has_console()
    monkeypatch.setenv("LAGOMPY_CONSOLE_ENABLED", "true")
    assert has_console()


def test_links_and_the_cookie_carry_the_root_path_of_a_proxy() -> None:
    app = FastAPI()
    Service(name="s", breakers=BreakerRegistry()).install(app, console=ConsoleSettings())

    async def page() -> httpx.Response:
        transport = httpx.ASGITransport(app, root_path="/users")
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return await http.get("/console/breakers")

    response = asyncio.run(page())
    assert response.status_code == 200
    assert 'href="/users/console/audit"' in response.text
    assert 'src="/users/console/static/console.js"' in response.text


def test_masking_keeps_the_shape_and_hides_every_value() -> None:
    value = UserRegistered("u1", "Ada", "ada@example.org")
    assert jsonable(value, masked=True) == {"user_id": MASK, "name": MASK, "email": MASK}
    assert jsonable({"a": [1, (2, b"xy")]}, masked=False) == {"a": [1, [2, "<2 bytes>"]]}


def test_a_rebuild_shows_100_percent_only_once_it_is_done() -> None:
    # Every event replayed is not the end yet (the rebuild still releases its leases and audits
    # its end): the page showed 100% next to `running` once, under load.
    running = RebuildProgress("p", "now", done=10, total=10)
    assert (running.percent, RebuildProgress("p", "now", done=5, total=10).percent) == (99, 50)
    assert RebuildProgress("p", "now", state="done", done=10, total=10).percent == 100
    assert RebuildProgress("p", "now", state="failed", done=3, total=10).percent == 30
