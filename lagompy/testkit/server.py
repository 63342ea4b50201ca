"""Serve an ASGI app over real HTTP on loopback, in a thread, for tests and examples::

    with serve_in_thread(app) as base_url:       # e.g. "http://127.0.0.1:40123"
        httpx.get(base_url + "/health/live")

The server listens on a free port of 127.0.0.1, runs the app's lifespan, and is stopped (the
lifespan's shutdown included) when the block ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["free_port", "serve_in_thread"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now (for a server started in
    another process, which binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, startup_timeout: float = 30.0, **uvicorn_settings: Any
) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio turns TCP_NODELAY on only for sockets that say so, and
    # without it every request with a body waited ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {"log_level": "warning", "lifespan": "on", **uvicorn_settings}
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # reported to the caller below
            failure.append(e)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise RuntimeError(f"the server did not start: {failure or 'timeout'}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
