"""Finding and reaching a Ray cluster: the local Rays lagompy started, and a quick check that an
address can be attached to before ``ray.init`` spends a minute retrying.

**Local Rays.** A process whose ``lagompy.start()`` (or ``lagompy run``) starts a local Ray
records its address in a small file, ``<LAGOMPY_LOCAL_RAY_DIR>/<pid>.json`` (default
``<temp dir>/lagompy-<uid>/local-ray``), with the authentication mode of that Ray but never its
token; ``lagompy entities stats`` reads these records to reach the app without an address.
A record whose process is gone, or whose Ray no longer answers, is ignored and removed.

**Attach check.** ``ray.init(address=...)`` retries a refused connection or a rejected token for
20 to 60 seconds, printing a warning a second, and then says only "Failed to connect". Before it,
:func:`check_attach` opens a TCP connection to the address (a few seconds at most), then asks
the cluster for its id in a child process (a second or two): an address that refuses
connections, a token the cluster rejects (Ray 2.59 and later turn token authentication on for
clusters started where a token exists, and a process attaching with an explicit address sends
none unless ``RAY_AUTH_MODE=token``), or something that is not a Ray cluster each fail with a
``ConfigurationError`` that says which, within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lagompy.errors import ConfigurationError

__all__ = [
    "LocalRay",
    "check_attach",
    "forget_local_ray",
    "local_ray_dir",
    "local_rays",
    "record_local_ray",
]

#: Environment variable naming the directory of local Ray records.
LOCAL_RAY_DIR_ENV = "LAGOMPY_LOCAL_RAY_DIR"
#: Seconds to open a TCP connection to a Ray address.
CONNECT_TIMEOUT = 3.0
#: Seconds the child process may take to get the cluster's id.
PROBE_TIMEOUT = 20.0
#: Where Ray looks for a token when RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are not set.
TOKEN_SOURCES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


@dataclass(frozen=True)
class LocalRay:
    """A local Ray a lagompy process started: its GCS address, the process, the auth mode."""

    address: str
    pid: int
    auth_mode: str


def local_ray_dir() -> Path:
    given = os.environ.get(LOCAL_RAY_DIR_ENV)
    if given:
        return Path(given)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"lagompy-{uid}" / "local-ray"


def record_local_ray(address: str, auth_mode: str | None) -> Path | None:
    """Record that this process started a local Ray at ``address`` (best effort: a directory
    that cannot be written only costs ``lagompy entities stats`` its default)."""
    record = LocalRay(address, os.getpid(), auth_mode or "disabled")
    directory = local_ray_dir()
    path = directory / f"{record.pid}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.__dict__))
        temporary.replace(path)
    except OSError:
        return None
    return path


def forget_local_ray(pid: int | None = None) -> None:
    """Remove the record of process ``pid`` (default: this process)."""
    with contextlib.suppress(OSError):
        (local_ray_dir() / f"{os.getpid() if pid is None else pid}.json").unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_rays() -> list[LocalRay]:
    """The recorded local Rays whose process is alive and whose address accepts connections,
    newest first; records of dead processes are removed."""
    found: list[tuple[float, LocalRay]] = []
    directory = local_ray_dir()
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            record = LocalRay(**json.loads(path.read_text()))
            modified = path.stat().st_mtime
        except (OSError, ValueError, TypeError):
            continue
        if not _alive(record.pid):
            forget_local_ray(record.pid)
            continue
        if _connect_error(record.address, 1.0) is None:
            found.append((modified, record))
    return [record for _, record in sorted(found, key=lambda f: f[0], reverse=True)]


# --------------------------------------------------------------------------- attach check


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _connect_error(address: str, timeout: float) -> str | None:
    target = _host_port(address)
    if target is None:
        return f"{address!r} is not HOST:PORT"
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)


_PROBE = """
import json, sys
try:
    from ray._raylet import GcsClient
except Exception:
    print(json.dumps({"result": "skipped"}))
    sys.exit(0)
try:
    GcsClient(address=sys.argv[1])
    print(json.dumps({"result": "ok"}))
except Exception as e:
    kind = "auth" if type(e).__name__ == "AuthenticationError" else "error"
    print(json.dumps({"result": kind, "error": type(e).__name__, "message": str(e)[:300]}))
"""


def _auth_hint() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        return (
            "the cluster requires token authentication and this process sends no token: set "
            f"RAY_AUTH_MODE=token, with the cluster's token in {TOKEN_SOURCES}"
        )
    return f"the cluster rejected this process's token ({TOKEN_SOURCES}): give it the cluster's"


def check_attach(address: str) -> None:
    """Raise ``ConfigurationError`` within seconds if ``address`` (a Ray GCS ``HOST:PORT``)
    cannot be attached to. ``auto``, ``local`` and ``ray://`` (Ray Client) addresses are not
    checked here."""
    if address in ("auto", "local") or "://" in address:
        return
    where = f"cannot attach to the Ray cluster at {address}"
    problem = _connect_error(address, CONNECT_TIMEOUT)
    if problem is not None:
        raise ConfigurationError(f"{where}: {problem} (is a Ray head running there?)")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ConfigurationError(
            f"{where}: it accepts connections but did not answer as a Ray cluster within "
            f"{PROBE_TIMEOUT:g} s"
        ) from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    result = answer.get("result")
    if result in ("ok", "skipped"):
        return
    if result == "auth":
        raise ConfigurationError(f"{where}: {_auth_hint()}")
    if result == "error":
        raise ConfigurationError(
            f"{where}: {answer.get('error')}: {' '.join(str(answer.get('message')).split())}"
        )
    # The probe itself failed (e.g. a broken interpreter): let ray.init have its say.
