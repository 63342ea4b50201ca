"""A NATS server with JetStream of a test's own, on a free loopback port with a temporary store,
that a fault test may kill and restart (never the shared server a machine runs)::

    async with nats_server() as server:          # nats-server -js, its own store
        transport = NatsTransport(url=server.url, journal=journal)
        ...
        await server.kill()                       # SIGKILL: what a crash does
        await server.start()                      # the same port and store
        with server.paused():                     # SIGSTOP: a broker that stops answering
            ...

The binary is ``nats-server`` on ``PATH`` (or ``/usr/sbin/nats-server``); :func:`find_server`
returns None when there is none, so tests can skip (or fail under CI) with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from lagompy.testkit.server import free_port

log = logging.getLogger("lagompy.testkit")

__all__ = ["NatsServer", "find_server", "nats_server"]


def find_server() -> str | None:
    """The nats-server binary, or None."""
    found = shutil.which("nats-server")
    if found is None and os.access("/usr/sbin/nats-server", os.X_OK):
        found = "/usr/sbin/nats-server"
    return found


class NatsServer:
    """One ``nats-server -js`` process on 127.0.0.1 (see the module's docs)."""

    def __init__(self, binary: str, store: Path, port: int | None = None) -> None:
        self.binary = binary
        self.store = store
        self.port = port or free_port()
        #: Its ``server_name``, which its greeting carries: how :meth:`start` tells it from
        #: another server that took the port first (a free port is free only until bound).
        self.name = f"lagompy-test-{uuid.uuid4().hex[:12]}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """Where the server's output goes (in its store)."""
        return self.store / "nats-server.log"

    def ended_by_itself(self) -> str | None:
        """Why the server is gone though nobody stopped it (its exit status and the end of
        its log), or None while it runs or once it was stopped."""
        if self.process is None or self.process.poll() is None:
            return None
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            tail = []
        return f"nats-server on port {self.port} exited with {self.process.returncode}; " + (
            "its log ends: " + " | ".join(tail) if tail else "no log"
        )

    async def start(self, timeout: float = 10.0) -> None:
        """Start it (again: same port, same store) and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        # Its own session: a signal sent to the process group of the tests (a child that
        # signals its group on exit) does not reach it. Its log goes to a file in the store,
        # which ``nats_server`` shows when the server ended on its own.
        args = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        args += ["--server_name", self.name]
        with open(self.log, "ab") as log_file:
            self.process = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        async with asyncio.timeout(timeout):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"nats-server exited with {self.process.returncode} (port "
                        f"{self.port} taken by another process?)"
                    )
                if _answers(self.port, self.name):
                    break
                # Nothing answers yet, or another server that took the port between
                # free_port() and our bind (ours then exits: the poll above says so).
                await asyncio.sleep(0.05)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) inside the block, resumed (SIGCONT) at its end: a
        broker that stops answering without closing its connections (a stall, a half-open
        network), which only timeouts notice."""
        process = self.process
        if process is None or process.poll() is not None:
            raise RuntimeError("the server is not running")
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL it (nothing flushed, like a crash) and wait for it to be gone."""
        await self._end(signal.SIGKILL)

    async def stop(self) -> None:
        """Stop it cleanly (SIGTERM), or kill it after 5 s."""
        await self._end(signal.SIGTERM)

    async def _end(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            await asyncio.to_thread(process.wait, 5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def _answers(port: int, name: str) -> bool:
    """Whether the NATS server named ``name`` greets on ``port``: its ``INFO`` line with that
    ``server_name``, not only an accepted connection (a connect to a free port of the
    ephemeral range can connect to itself, another program may listen there, and another
    test's server may have taken the port first: each once passed for a server not yet up;
    the last one had a test stop one server and talk to another)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            greeting = b""
            while b"\r\n" not in greeting and len(greeting) < 8192:
                chunk = s.recv(4096)
                if not chunk:
                    break
                greeting += chunk
    except OSError:
        return False
    line = greeting.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return False
    try:
        info = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(info, dict) and info.get("server_name") == name


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[NatsServer]:
    """A started :class:`NatsServer` with a temporary store, stopped and removed at the end.
    A server that ended by itself meanwhile (nobody stopped or killed it: a crash) makes the
    end raise ``RuntimeError`` with its exit status and the end of its log."""
    binary = find_server()
    if binary is None:
        raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
    with tempfile.TemporaryDirectory(prefix="lagompy-nats-") as store:
        for attempt in range(3):  # a free port another process took meanwhile: another one
            server = NatsServer(binary, Path(store))
            try:
                await server.start()
                break
            except RuntimeError:
                await server.kill()
                if attempt == 2:
                    raise
        try:
            yield server
        finally:
            gone = server.ended_by_itself()
            await server.stop()
            if gone is not None:
                log.warning("%s", gone)
        if gone is not None:
            # A server nobody stopped is gone: say why (its exit status and the end of its
            # log) as an error of the test's teardown, where a test that timed out cannot.
            raise RuntimeError(gone)
