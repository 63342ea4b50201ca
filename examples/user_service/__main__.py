"""Run the example: the user service, then (once it is ready) the notification service that
pulls its topic, each a ``lagompy run`` process, until Ctrl-C (or SIGTERM) stops both.

    .venv/bin/python -m examples.user_service [--port 8000] [--notifications-port 8001]

The user service's entities run on a local Ray and its journal is ``./lagompy.db`` unless the
environment says otherwise (``LAGOMPY_JOURNAL_URL``, ``RAY_ADDRESS``, ``LAGOMPY_EXAMPLE_RAY``;
see :mod:`examples.user_service.api`). The notification service keeps its notifications, and
its position in the user service's ``user-events`` topic, in ``./notifications.db``
(``LAGOMPY_EXAMPLE_NOTIFICATIONS_DB``); it pulls the topic from the user service over HTTP.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx

USAGE = """\
The user service is ready at {url} (notifications at {notifications}). Try:

  curl -s -X POST {url}/users -H 'content-type: application/json' \\
       -H 'Idempotency-Key: ada-1' -d '{{"name": "Ada Lovelace", "email": "ada@example.org"}}'
  curl -s '{url}/users?name=Ada'
  curl -s {notifications}/notifications          # the welcome, from the user-events topic
  curl -s '{url}/topics/user-events/partitions/0?limit=10'
  curl -s {notifications}/topics/subscribers
  curl -s {url}/_status/circuit-breakers

Ctrl-C stops both services.
"""


def _serve(app: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lagompy", "run", app, "--port", str(port)]
    # A session of its own: Ctrl-C reaches this process only, which stops both with SIGTERM.
    return subprocess.Popen(command, env=env, start_new_session=True)


def _wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return False
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.user_service", description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="the user service's port")
    parser.add_argument("--notifications-port", type=int, default=8001)
    args = parser.parse_args(argv)
    notifications = f"http://127.0.0.1:{args.notifications_port}"
    url = f"http://127.0.0.1:{args.port}"
    env = {"LAGOMPY_SERVICE_NOTIFICATIONS": notifications, "LAGOMPY_SERVICE_USERS": url}
    env |= os.environ
    cwd = os.getcwd()  # so that `lagompy run` imports `examples` from here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))
    # The user service first: the notification service pulls its topic from it at start, and
    # started together it would retry (and log each retry) until the user service answered.
    processes = [_serve("examples.user_service.api:app", args.port, env)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ready = _wait_ready(url, processes, timeout=120)
        if ready:
            processes.append(
                _serve("examples.notification_service.api:app", args.notifications_port, env)
            )
            ready = _wait_ready(notifications, processes, timeout=60)
        if ready:
            print(USAGE.format(url=url, notifications=notifications), flush=True)
        else:
            print("a service did not start: see its output above", file=sys.stderr, flush=True)
            return 1
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        return max(p.returncode or 0 for p in processes if p.returncode is not None)
    except KeyboardInterrupt:
        return 0
    finally:
        # The notification service first: stopped together, its topic subscriber could find the
        # user service gone and log a retry while it stops.
        for p in reversed(processes):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
