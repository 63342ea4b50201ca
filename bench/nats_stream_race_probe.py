"""Broker probe: does the installed nats-server survive what several producing processes do
when they start at once on a topic whose stream does not exist yet?

Each round, ``--clients`` connections (4) to a nats-server of the probe's own (a free loopback
port, a temporary store) each create the same new stream (file storage, the subjects lagompy
uses) and then ask for the last message of one subject of it, as a producer does when it takes
its partition. nats-server 2.9.10 crashed here within a few hundred rounds (a nil pointer in its
message-get handler); ``--ask info`` asks for the stream's info instead, which it survived.
Prints the rounds run and whether the server is still up; exit status 1 if it died.

    .venv/bin/python bench/nats_stream_race_probe.py [--seconds 60] [--clients 4] [--ask info]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

from lagompy.testkit.nats import NatsServer, nats_server


async def one_round(jetstreams: list[Any], n: int, ask: str) -> None:
    from nats.js import api

    stream = f"probe_{n}"

    async def producer(js: Any, partition: int) -> None:
        with contextlib.suppress(Exception):
            await js.add_stream(
                name=stream,
                subjects=[f"probe.{n}.*"],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
            )
        with contextlib.suppress(Exception):
            if ask == "info":
                await js.stream_info(stream)
            else:
                await js.get_last_msg(stream, f"probe.{n}.{partition}")

    await asyncio.gather(*(producer(js, p) for p, js in enumerate(jetstreams)))


async def probe(seconds: float, clients: int, ask: str) -> bool:
    import nats

    async with nats_server() as server:
        connections = [
            await nats.connect(server.url, allow_reconnect=False, error_cb=_quiet)
            for _ in range(clients)
        ]
        rounds = 0
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end and alive(server):
                rounds += 1
                await one_round([c.jetstream() for c in connections], rounds, ask)
        finally:
            for c in connections:
                with contextlib.suppress(Exception):
                    await c.close()
        up = alive(server)
        print(f"{rounds} rounds of {clients} clients (add_stream, then {ask}): server up: {up}")
        if not up:
            log = server.log.read_text(errors="replace").splitlines()
            start = next((i for i, line in enumerate(log) if line.startswith("panic")), 0)
            print("\n".join(log[start : start + 6]))
            # Its death is this probe's finding, not an error of the server's teardown.
            await server.stop()
        return up


async def _quiet(error: Exception) -> None:
    """The connections' errors once the server died: the probe reports the death once."""


def alive(server: NatsServer) -> bool:
    return server.process is not None and server.process.poll() is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--ask", choices=["last-message", "info"], default="last-message")
    args = parser.parse_args()
    sys.exit(0 if asyncio.run(probe(args.seconds, args.clients, args.ask)) else 1)


if __name__ == "__main__":
    main()
