"""``lagompy run`` with several uvicorn workers attached to one Ray cluster: every worker serves
the same entities, /metrics adds up every worker's asks and counts the shard hosts' figures once,
and ``lagompy entities stats`` shows the hosts' counters. Plus the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from lagompy.cli import build_app
from lagompy.testkit.server import free_port
from tests.test_service import sample

REPO = Path(__file__).resolve().parent.parent
LAGOMPY = [sys.executable, "-m", "lagompy"]


def test_run_errors_are_one_line(tmp_path: Path) -> None:
    for args, message in [
        (["run", "nocolon"], "error: 'nocolon' is not MODULE:APP"),
        (["run", "no_such_module_xyz:app"], "error: cannot import module 'no_such_module_xyz'"),
        (["run", "examples.user_service.api:nothing"], "has no attribute 'nothing'"),
        (["entities", "stats", "--app", "x"], "error: no Ray cluster to attach to"),
    ]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(
            [*LAGOMPY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


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
            time.sleep(0.5)
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
        stats = subprocess.run(
            [*LAGOMPY, "entities", "stats", "--app", app_name, "--json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert stats.returncode == 0, stats.stderr
        hosts = json.loads(stats.stdout)
        assert len(hosts) == 1 and hosts[0]["commands"] == users
        assert hosts[0]["events_persisted"] == users
        table = subprocess.run(
            [*LAGOMPY, "entities", "stats", "--app", app_name],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert table.returncode == 0 and "live_entities" in table.stdout.splitlines()[0]
        missing = subprocess.run(
            [*LAGOMPY, "entities", "stats", "--app", "no-such-app"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert missing.returncode == 1 and "no app 'no-such-app'" in missing.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
        import asyncio

        asyncio.run(shutdown_app(app_name))
