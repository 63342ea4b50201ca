"""``lagompy run`` with several uvicorn workers attached to one Ray cluster: every worker serves
the same entities, /metrics adds up every worker's asks and counts the shard hosts' figures once,
and ``lagompy entities stats`` shows the hosts' counters. Startup failures are one line and exit
status 1, a clean SIGTERM exits 0, ``entities stats`` finds the local Ray a service started, and
attaching to a Ray head started as docs/howto/ray-cluster.md says works (and fails fast, saying
why, when the token is missing or wrong)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lagompy.cli import build_app
from lagompy.testkit.server import free_port
from tests.conftest import POSTGRES_URL, _create_schema, _drop_schema, require_postgres
from tests.test_service import sample

REPO = Path(__file__).resolve().parent.parent
LAGOMPY = [sys.executable, "-m", "lagompy"]
USERS_APP = "examples.user_service.api:app"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without lagompy's and Ray's settings (nor a Ray the test session set
    up), plus ``extra``."""
    drop = ("LAGOMPY_", "RAY_ADDRESS", "RAY_AUTH_", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | extra


def lagompy(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAGOMPY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def lagompy_together(
    *commands: list[str], env: dict[str, str] | list[dict[str, str]], timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """``lagompy`` commands that do not depend on each other, run at once (each is a Python
    start and lagompy's imports, ~2 s, mostly CPU: two cores do two at a time); their results
    in the order given. ``env``: one for all, or one per command."""
    envs = env if isinstance(env, list) else [env] * len(commands)
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        running = [
            pool.submit(lagompy, *args, env=e, timeout=timeout)
            for args, e in zip(commands, envs, strict=True)
        ]
        return [r.result() for r in running]


class Server:
    """``lagompy run`` in a session of its own, output to a file; stopped by PID."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [*LAGOMPY, "run", *args, "--port", str(self.port)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"not ready within {timeout} s:\n{self.output()[-3000:]}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the server's PID; its exit status."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """Whatever is left of its session (Ray's processes too), by its process group id."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def test_run_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_app_module.py").write_text("raise ValueError('no such setting: X')\n")
    env = clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    cases = [
        (["run", "nocolon"], "error: 'nocolon' is not MODULE:APP"),
        (["run", "no_such_module_xyz:app"], "error: cannot import module 'no_such_module_xyz'"),
        (["run", "examples.user_service.api:nothing"], "has no attribute 'nothing'"),
        (["run", "broken_app_module:app"],
         "error: importing module 'broken_app_module' failed: ValueError: no such setting: X"),
    ]  # fmt: skip
    runs = lagompy_together(*(args for args, _ in cases), env=env, timeout=60)
    for (_, message), done in zip(cases, runs, strict=True):
        assert done.returncode == 1, done
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    rays = tmp_path / "rays"
    env = clean_env(
        LAGOMPY_EXAMPLE_RAY="1",  # a Ray would start in the lifespan, and record itself here
        LAGOMPY_LOCAL_RAY_DIR=str(rays),
        LAGOMPY_JOURNAL_URL=f"sqlite:///{tmp_path / 'journal.db'}",
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        runs = lagompy_together(
            *(["run", USERS_APP, "--port", str(port), "--workers", n] for n in ("1", "2")),
            env=env,
        )
        for done in runs:
            assert done.returncode == 1, done
            assert done.stderr == (
                f"error: cannot listen on 127.0.0.1:{port}: address already in use\n"
            ), done.stderr
        assert time.monotonic() - started < 30
    assert not rays.exists()  # no Ray was started
    assert not (tmp_path / "journal.db").exists()  # nor the journal opened


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_startup_failure_is_one_line(backend: str, tmp_path: Path) -> None:
    env = clean_env(LAGOMPY_EXAMPLE_RAY="0")
    schema = None
    if backend == "sqlite":
        env["LAGOMPY_JOURNAL_URL"] = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
        expected = "does not exist"
    else:
        require_postgres()
        schema = asyncio.run(_create_schema())  # empty, and auto_migrate is off
        env |= {"LAGOMPY_JOURNAL_URL": POSTGRES_URL, "LAGOMPY_JOURNAL_POSTGRES_SCHEMA": schema}
        expected = f"(schema {schema}) are missing and auto_migrate is off: run `lagompy migrate"
    try:
        done = lagompy("run", USERS_APP, "--port", str(free_port()), env=env)
    finally:
        if schema is not None:
            asyncio.run(_drop_schema(schema))
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if not line.startswith("INFO:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert f"error: {USERS_APP} did not start: " in errors[0] and expected in errors[0], errors
    assert "Traceback" not in done.stderr and "ERROR:" not in done.stderr


def test_sigterm_shuts_down_cleanly_and_exits_0(tmp_path: Path) -> None:
    env = clean_env(LAGOMPY_EXAMPLE_RAY="0", LAGOMPY_JOURNAL_URL=f"sqlite:///{tmp_path / 'j.db'}")
    server = Server([USERS_APP], env, tmp_path / "server.log")
    try:
        server.wait_ready()
        assert f"Uvicorn running on {server.url}" in server.output()
        assert server.terminate() == 0, server.output()
        assert "Application shutdown complete." in server.output()
    finally:
        server.kill()


def test_entities_stats_finds_the_local_ray_a_service_started(tmp_path: Path) -> None:
    """The service starts a local Ray (no RAY_ADDRESS) and records where; ``entities stats``
    with no address finds it, authenticating with the token that Ray made. SIGTERM then shuts
    the service and its Ray down, with status 0, and the record is gone."""
    rays = tmp_path / "rays"
    app_name = f"stats-{uuid.uuid4().hex[:8]}"
    env = clean_env(
        LAGOMPY_EXAMPLE_RAY="1",
        LAGOMPY_EXAMPLE_APP=app_name,
        LAGOMPY_LOCAL_RAY_DIR=str(rays),
        LAGOMPY_JOURNAL_URL=f"sqlite:///{tmp_path / 'j.db'}",
        LAGOMPY_RUNTIME_HOSTS="1",
        LAGOMPY_RUNTIME_SHARDS="8",
    )
    server = Server([USERS_APP], env, tmp_path / "server.log")
    try:
        server.wait_ready()
        assert "The app's entities run on the Ray cluster at" in server.output()
        (record,) = [json.loads(p.read_text()) for p in rays.glob("*.json")]
        assert record["pid"] == server.popen.pid
        r = httpx.post(f"{server.url}/users", json={"name": "Ada", "email": "a@example.org"})
        assert r.status_code == 201, r.text
        stats, missing = lagompy_together(
            ["entities", "stats", "--app", app_name, "--json"],
            ["entities", "stats", "--app", "no-such-app"],
            env=env,
        )
        assert stats.returncode == 0, stats.stderr
        (host,) = json.loads(stats.stdout)
        assert host["commands"] == 1 and host["events_persisted"] == 1
        assert missing.returncode == 1, missing
        assert "no app 'no-such-app' runs on the local Rays of this machine" in missing.stderr
        assert app_name in missing.stderr  # the apps that do run there
        assert server.terminate() == 0, server.output()[-3000:]
        assert not list(rays.glob("*.json"))
    finally:
        server.kill()
    nothing = lagompy("entities", "stats", "--app", app_name, env=env)
    assert nothing.returncode == 1
    assert nothing.stderr.startswith("error: no Ray cluster to attach to"), nothing.stderr


@contextlib.contextmanager
def ray_head(token: str, log: Path) -> Iterator[str]:
    """``ray start --head`` on a free port with a temporary directory, as the how-to says,
    with token authentication; yields its address; stopped by its PID (then its session)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="lagompy-ray-", dir="/tmp")  # short: Ray's socket paths
    ray = str(Path(sys.executable).parent / "ray")
    # Ray 2.60's `ray start --block` answers SIGTERM by draining its node for up to
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default), and a head node never finishes
    # draining: the stop below would wait those 30 s out. 0 turns the drain off (immediate
    # teardown); it only changes how this test stops its head, not what the head does before.
    env = clean_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"
    )
    command = [
        ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1",
        "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
        "--block",
    ]  # fmt: skip
    with log.open("ab") as out:
        head = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_attach_to_a_ray_head_started_as_the_howto_says(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    app_name = f"howto-{uuid.uuid4().hex[:8]}"
    with ray_head(token, tmp_path / "head.log") as address:
        # As the how-to says: the cluster's token, and RAY_AUTH_MODE=token.
        env = clean_env(
            RAY_ADDRESS=address,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=token,
            LAGOMPY_EXAMPLE_RAY="1",
            LAGOMPY_EXAMPLE_APP=app_name,
            LAGOMPY_JOURNAL_URL=f"sqlite:///{tmp_path / 'j.db'}",
            LAGOMPY_RUNTIME_HOSTS="1",
            LAGOMPY_RUNTIME_SHARDS="8",
        )
        server = Server([USERS_APP], env, tmp_path / "server.log")
        try:
            # While the server starts (they do not depend on it): without the token, or with
            # another one, one line, within seconds, saying why.
            wrong = [
                ({}, "the cluster requires token authentication and this process sends no "
                     "token: set RAY_AUTH_MODE=token"),
                ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-" + token},
                 "the cluster rejected this process's token"),
            ]  # fmt: skip
            started = time.monotonic()
            runs = lagompy_together(
                *(["entities", "stats", "--app", app_name] for _ in wrong),
                # HOME: no ~/.ray token
                env=[clean_env(RAY_ADDRESS=address, HOME=str(tmp_path), **a) for a, _ in wrong],
                timeout=60,
            )
            for (_, expected), done in zip(wrong, runs, strict=True):
                assert done.returncode == 1, done
                assert done.stderr.startswith(
                    f"error: cannot attach to the Ray cluster at {address}"
                ), done.stderr
                assert expected in done.stderr, done.stderr
                assert done.stderr.count("\n") == 1, done.stderr
            assert time.monotonic() - started < 30
            server.wait_ready()
            r = httpx.post(f"{server.url}/users", json={"name": "Ada", "email": "a@example.org"})
            assert r.status_code == 201, r.text
            stats = lagompy("entities", "stats", "--app", app_name, "--json", env=env)
            assert stats.returncode == 0, stats.stderr
            assert json.loads(stats.stdout)[0]["commands"] == 1
            assert server.terminate() == 0, server.output()[-3000:]
        finally:
            server.kill()


@pytest.mark.postgres
def test_a_worker_that_cannot_start_is_one_line_too(ray_session: Any, postgres_schema: str) -> None:
    """--workers 2: the workers' startup fails (the journal's tables are missing and
    auto_migrate is off); ``run`` says so in one line and exits 1."""
    address = ray_session.get_runtime_context().gcs_address
    env = {
        **clean_env(),
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "LAGOMPY_EXAMPLE_APP": f"nostart-{uuid.uuid4().hex[:8]}",
        "LAGOMPY_JOURNAL_URL": POSTGRES_URL,
        "LAGOMPY_JOURNAL_POSTGRES_SCHEMA": postgres_schema,
        "LAGOMPY_RUNTIME_HOSTS": "1",
    }
    done = lagompy("run", USERS_APP, "--port", str(free_port()), "--workers", "2", env=env,
                   timeout=180)  # fmt: skip
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert f"{USERS_APP} did not start" in errors[0] and "auto_migrate is off" in errors[0]
    assert "ERROR:" not in done.stderr, done.stderr


def test_in_process_entities_refuse_several_workers(tmp_path: Path) -> None:
    env = {**os.environ, "LAGOMPY_EXAMPLE_RAY": "0"}
    done = subprocess.run(
        [*LAGOMPY, "run", "examples.user_service.api:app", "--workers", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "in-process (ray=False)" in done.stderr


def test_help_lists_the_commands() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(build_app(), ["--help"])
    assert result.exit_code == 0
    for command in ("run", "entities"):
        assert command in result.output


@pytest.mark.postgres
def test_several_workers_share_one_ray_and_one_metrics_view(
    ray_session: object, postgres_schema: str, tmp_path: Path
) -> None:
    import ray

    from lagompy.runtime import shutdown_app
    from tests.conftest import POSTGRES_URL

    address = ray.get_runtime_context().gcs_address
    app_name = f"users-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "RAY_ADDRESS": address,
        "LAGOMPY_EXAMPLE_RAY": "1",
        "LAGOMPY_EXAMPLE_APP": app_name,
        "LAGOMPY_JOURNAL_URL": POSTGRES_URL,
        "LAGOMPY_JOURNAL_POSTGRES_SCHEMA": postgres_schema,
        "LAGOMPY_JOURNAL_AUTO_MIGRATE": "true",
        "LAGOMPY_RUNTIME_HOSTS": "1",
        "LAGOMPY_RUNTIME_SHARDS": "8",
        "PYTHONPATH": str(REPO),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*LAGOMPY, "run", "examples.user_service.api:app", "--workers", "2", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("the server never became ready:\n" + (tmp_path / "server.log").read_text())
        users = 24
        for i in range(users):  # a new connection each time: requests spread over the workers
            r = httpx.post(
                f"{url}/users", json={"name": f"W{i}", "email": "w@example.org"}, timeout=30
            )
            assert r.status_code == 201, r.text
        for _ in range(6):  # whichever worker answers, the figures are the whole service's
            scrape = httpx.get(f"{url}/metrics", timeout=30).text
            assert sample(scrape, "lagompy_asks_total", entity_type="user", outcome="ok") == users
            assert sample(scrape, "lagompy_host_commands_total") == users
            assert sample(scrape, "lagompy_journal_events_written_total") == users
        stats, table, missing = lagompy_together(
            ["entities", "stats", "--app", app_name, "--json"],
            ["entities", "stats", "--app", app_name],
            ["entities", "stats", "--app", "no-such-app"],
            env=env,
        )
        assert stats.returncode == 0, stats.stderr
        hosts = json.loads(stats.stdout)
        assert len(hosts) == 1 and hosts[0]["commands"] == users
        assert hosts[0]["events_persisted"] == users
        assert table.returncode == 0 and "live_entities" in table.stdout.splitlines()[0]
        assert missing.returncode == 1 and "no app 'no-such-app'" in missing.stderr
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(60) == 0, (tmp_path / "server.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
        import asyncio

        asyncio.run(shutdown_app(app_name))


GC_APP = """
import gc

from fastapi import FastAPI

app = FastAPI()


@app.get("/gc")
def collector() -> dict[str, int]:
    return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}


@app.get("/health/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}
"""


#: GC_APP whose lifespan starts entities in process: start() tunes its process's collector
#: too (RuntimeSettings.collector), which ``run --collector default`` must turn off as well.
GC_APP_WITH_ENTITIES = GC_APP.replace(
    "app = FastAPI()", "app = FastAPI(lifespan=lifespan)"
).replace(
    "from fastapi import FastAPI",
    """import contextlib
import os

from fastapi import FastAPI

import lagompy
from examples.user_service.entity import UserEntity


@contextlib.asynccontextmanager
async def lifespan(app):
    url = os.environ["GC_APP_JOURNAL"]
    async with lagompy.start(entities=[UserEntity], ray=False, journal_url=url):
        yield
""",
)


#: GC_APP whose lifespan opens the journal itself: opening it tunes the process's collector
#: (JournalSettings.collector), which ``run --collector default`` must turn off as well.
GC_APP_WITH_JOURNAL = GC_APP_WITH_ENTITIES.replace(
    "lagompy.start(entities=[UserEntity], ray=False, journal_url=url)",
    "lagompy.open_storage(url, entities=[UserEntity])",
)


GC_SOURCES = {"bare": GC_APP, "entities": GC_APP_WITH_ENTITIES, "journal": GC_APP_WITH_JOURNAL}
#: (options of ``run``, LAGOMPY_RUN_COLLECTOR, whether the collector is tuned)
GC_CASES = [([], None, True), (["--collector", "default"], None, False), ([], "default", False)]


@pytest.fixture(scope="module")
def gc_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, int], Server]]:
    """The servers of every case of ``test_run_tunes_the_collector_of_the_serving_process``,
    started at once (each is a Python start, lagompy's imports and an app's start-up, ~2 s of
    mostly CPU: two cores start two at a time), each from a directory of its own; each test
    waits for its own and stops it; whatever is left is killed at the end."""
    servers: dict[tuple[str, int], Server] = {}
    try:
        for name, source in GC_SOURCES.items():
            for case, (args, env_value, _) in enumerate(GC_CASES):
                tmp = tmp_path_factory.mktemp(f"gc-{name}-{case}")
                (tmp / "gc_app_module.py").write_text(source)
                env = clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp}")
                env["GC_APP_JOURNAL"] = f"sqlite:///{tmp / 'journal.db'}"
                if env_value is not None:
                    env["LAGOMPY_RUN_COLLECTOR"] = env_value
                servers[name, case] = Server(["gc_app_module:app", *args], env, tmp / "server.log")
        yield servers
    finally:
        for server in servers.values():
            server.kill()


@pytest.mark.parametrize("source", list(GC_SOURCES))
@pytest.mark.parametrize("case", range(len(GC_CASES)))
def test_run_tunes_the_collector_of_the_serving_process(
    gc_servers: dict[tuple[str, int], Server], case: int, source: str
) -> None:
    """Once the app has started, ``run`` freezes its start-up objects and raises the young
    generation's threshold, as shard hosts do (lagompy/_collector.py); ``--collector default``
    or ``LAGOMPY_RUN_COLLECTOR=default`` leaves Python's collector as it was."""
    from lagompy._collector import GC_THRESHOLD

    expect_tuned = GC_CASES[case][2]
    server = gc_servers[source, case]
    try:
        server.wait_ready(timeout=60)
        state = httpx.get(f"{server.url}/gc", timeout=5).json()
        if expect_tuned:
            assert state["threshold"] == GC_THRESHOLD and state["frozen"] > 1000, state
        else:
            assert state["threshold"] < GC_THRESHOLD and state["frozen"] == 0, state
        assert server.terminate() == 0, server.output()
    finally:
        server.kill()


def test_a_port_or_a_worker_count_out_of_range_is_a_usage_error() -> None:
    """Refused by the option itself (a port above 65535 reached the socket as OverflowError)."""
    from typer.testing import CliRunner

    for args in (["--port", "70000"], ["--port", "-1"], ["--workers", "100000"]):
        result = CliRunner().invoke(build_app(), ["run", "examples.user_service.api:app", *args])
        assert result.exit_code == 2, (args, result.output)
        text = result.output + (result.stderr or "")
        assert f"Invalid value for '{args[0]}'" in text, text
        assert "OverflowError" not in text and "Traceback" not in text


def test_a_worker_s_failure_is_dated_when_its_service_failed_to_start(tmp_path: Path) -> None:
    """The failure file of a worker is dated with the service's ``failed_at`` (taken before
    its clean-up, which may stop shard hosts other workers use), so that ``run --workers N``
    reports the first failure, not one that clean-up caused elsewhere. Without a service, the
    file keeps the time it was written."""
    from fastapi import FastAPI

    from lagompy.service import Service
    from lagompy.service._cli import _StartupGuard
    from lagompy.settings import JournalSettings

    async def fail_starting(app: FastAPI) -> Any:
        service = Service(name="fails", journal_settings=JournalSettings(url="sqlite://"))
        app.state.lagompy = service
        service.failed_at = 1_000.0  # as Service.start sets it when it fails
        raise RuntimeError("the journal's tables are missing")
        yield  # pragma: no cover

    async def run(app: Any, failure: Path) -> list[dict[str, Any]]:
        guard = _StartupGuard(app, url="http://127.0.0.1:1", failure_file=failure)
        sent: list[dict[str, Any]] = []
        messages = iter([{"type": "lifespan.startup"}])

        async def receive() -> dict[str, Any]:
            return next(messages, {"type": "lifespan.shutdown"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await guard({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        return sent

    failure = tmp_path / "1.txt"
    sent = asyncio.run(run(FastAPI(lifespan=fail_starting), failure))
    assert sent[-1]["type"] == "lifespan.startup.failed"
    assert "the journal's tables are missing" in failure.read_text()
    assert failure.stat().st_mtime == 1_000.0

    async def plain_failure(app: FastAPI) -> Any:
        raise RuntimeError("no service here")
        yield  # pragma: no cover

    other = tmp_path / "2.txt"
    asyncio.run(run(FastAPI(lifespan=plain_failure), other))
    assert other.stat().st_mtime > 1_000_000.0


def test_a_service_whose_start_fails_says_when(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.user_service.entity import UserEntity
    from lagompy.errors import ConfigurationError
    from lagompy.service import Service
    from lagompy.settings import JournalSettings

    monkeypatch.setenv("LAGOMPY_WORKERS", "2")  # in-process entities refuse several workers
    service = Service(
        name="fails", entities=[UserEntity], journal_settings=JournalSettings(url="sqlite://"),
        ray=False,
    )  # fmt: skip
    before = time.time()
    with pytest.raises(ConfigurationError):
        asyncio.run(service.start())
    assert service.failed_at is not None and before <= service.failed_at <= time.time()
