"""The README's run command, ``python -m examples.user_service``: both services start in order
(the user service, then the notification service that pulls its topic), the usage is printed
once both are ready, with no retry warnings on the way; a registered user gets the welcome
notification; Ctrl-C (SIGINT to the launcher) stops both, the notification service first (no
retry warning on the way out either), exit status 0, no process left.

The entities run in the service's process here (``LAGOMPY_EXAMPLE_RAY=0``): the test session
has its own Ray, and the e2e tests cover the services with their entities on Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lagompy.testkit.server import free_port
from tests.conftest import REPO_ROOT

READY = "The user service is ready at"


def _processes_with(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def _wait_for(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def test_the_readme_run_command_starts_both_services_and_ctrl_c_stops_them(
    tmp_path: Path,
) -> None:
    port, notifications_port = free_port(), free_port()
    keep = ("LAGOMPY_", "RAY_ADDRESS", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(keep)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["LAGOMPY_EXAMPLE_RAY"] = "0"
    log = tmp_path / "out.log"
    command = [
        sys.executable,
        "-m",
        "examples.user_service",
        "--port",
        str(port),
        "--notifications-port",
        str(notifications_port),
    ]
    # A child inherits an ignored SIGINT (and Python then installs no Ctrl-C handler): give it
    # the default disposition, as a terminal's foreground process has.
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("wb") as out:
            launcher = subprocess.Popen(
                command,
                cwd=tmp_path,  # ./lagompy.db and ./notifications.db go here
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)
    marker = f"--port {port}"
    try:

        def ready() -> bool:
            if launcher.poll() is not None:
                pytest.fail(f"the launcher exited with {launcher.returncode}:\n{log.read_text()}")
            return READY in log.read_text(errors="replace")

        _wait_for(ready, "the usage printed", timeout=120)
        started = log.read_text(errors="replace")
        assert "cannot be reached" not in started and "failed" not in started, started
        assert (tmp_path / "lagompy.db").exists()

        users = f"http://127.0.0.1:{port}"
        notifications = f"http://127.0.0.1:{notifications_port}"
        with httpx.Client(timeout=30) as http:
            created = http.post(
                f"{users}/users",
                json={"name": "Ada Lovelace", "email": "ada@example.org"},
                headers={"Idempotency-Key": "ada-1"},
            )
            assert created.status_code == 201, created.text

            def welcomed() -> bool:
                r = http.get(
                    f"{notifications}/notifications", params={"recipient": "ada@example.org"}
                )
                return r.status_code == 200 and len(r.json()["items"]) == 1

            _wait_for(welcomed, "the welcome notification", timeout=30)
            assert http.get(f"{notifications}/health/ready").status_code == 200

        os.kill(launcher.pid, signal.SIGINT)
        assert launcher.wait(timeout=40) == 0, log.read_text(errors="replace")
        # The notification service stops first: its subscriber never finds the user service gone.
        stopping = log.read_text(errors="replace")[len(started) :]
        assert "cannot be reached" not in stopping, stopping
        gone = [marker, f"--port {notifications_port}"]
        _wait_for(
            lambda: not any(_processes_with(m) for m in gone), "both services gone", timeout=10
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        for pid in _processes_with(marker) + _processes_with(f"--port {notifications_port}"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
