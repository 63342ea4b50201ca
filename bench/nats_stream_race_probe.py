"""Broker probe: does the installed nats-server survive what several producing processes do
when they start at once on a topic whose stream does not exist yet?

Each round, ``--clients`` connections (4) to a nats-server of the probe's own (a free loopback
port, a temporary store) each create the same new stream (file storage, the subjects lagompy
uses) and then ask for the last message of one subject of it, as a producer does when it takes
its partition. nats-server 2.9.10 crashed here within a few hundred rounds (a nil pointer in its
message-get handler); ``--ask info`` asks for the stream's info instead, which it survived.

``--via link`` goes through lagompy's own calls instead of raw nats-py: each client is a NATS
transport's connection (``_Link``), a round's stream is a new topic's, and each client does
what a producer does when it takes its partition: ``ensure_stream``, then ``last_message``
(guarded since: see ``_Link._settled``). To try another checkout's library (main's, before the
guard): ``git archive main lagompy | tar -x -C /tmp/main`` and ``PYTHONPATH=/tmp/main``.

The streams stay (as a topic's would) unless ``--delete-streams``: kept, each holds open files
of the server's, and near 10,000 of them the server runs out (20,000 here: ``ulimit -n``), fails
to create the next streams' stores, and a message-get that reaches such a stream before the
server drops it crashes 2.9.10 as well (the guard cannot tell such a stream from a created one:
see ``_Link._settled``). ``--delete-streams`` deletes each round's stream after the round, so
that a long run tries the creation race alone.

Prints the rounds run, the calls that failed while the server was up, the streams whose store
the server failed to create, and whether the server is still up; exit status 1 if it died.

    .venv/bin/python bench/nats_stream_race_probe.py [--seconds 60] [--clients 4]
        [--ask info | --via link] [--delete-streams]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import lagompy
from lagompy.testkit.nats import NatsServer, nats_server
from lagompy.testkit.topics import contract_topic
from lagompy.topic._nats import BrokerSettings, _Link, stream_name, subject


async def one_round(jetstreams: list[Any], n: int, ask: str, delete: bool) -> None:
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
    if delete:
        with contextlib.suppress(Exception):
            await jetstreams[0].delete_stream(stream)


async def link_round(links: list[_Link], n: int, delete: bool) -> int:
    """One round through lagompy's calls; the number of calls that failed."""
    topic = dataclasses.replace(contract_topic, name=f"probe-{n}")

    async def producer(link: _Link, partition: int) -> bool:
        try:
            stream = await link.ensure_stream(topic)
            await link.last_message(stream, subject(link.settings.stream_prefix, topic, partition))
        except Exception:
            return False
        return True

    done = await asyncio.gather(*(producer(link, p) for p, link in enumerate(links)))
    if delete:
        with contextlib.suppress(Exception):
            js = await links[0].js()
            await js.delete_stream(stream_name(links[0].settings.stream_prefix, topic))
    return done.count(False)


async def probe(seconds: float, clients: int, ask: str, via: str, delete: bool) -> bool:
    import nats

    async with nats_server() as server:
        connections = [
            await nats.connect(server.url, allow_reconnect=False, error_cb=_quiet)
            for _ in range(clients if via == "nats-py" else 0)
        ]
        settings = BrokerSettings(url=server.url, stream_prefix="probe", ack_timeout=2.0)
        links = [_Link(settings) for _ in range(clients if via == "link" else 0)]
        rounds = failed = 0
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end and alive(server):
                rounds += 1
                if links:
                    failures = await link_round(links, rounds, delete)
                    if alive(server):
                        failed += failures
                else:
                    await one_round([c.jetstream() for c in connections], rounds, ask, delete)
        finally:
            for c in connections:
                with contextlib.suppress(Exception):
                    await c.close()
            for link in links:
                await link.close()
        up = alive(server)
        what = "ensure_stream, then last_message" if links else f"add_stream, then {ask}"
        if links:
            print(f"lagompy from {Path(lagompy.__file__).parent}")
        print(
            f"{rounds} rounds of {clients} clients ({what}): "
            f"{failed} calls failed while the server was up; server up: {up}"
        )
        log = server.log.read_text(errors="replace").splitlines()
        failed_stores = [line for line in log if "Stream create failed" in line]
        if failed_stores:
            print(f"{len(failed_stores)} stream stores failed; the first: {failed_stores[0]}")
        if not up:
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
    parser.add_argument("--via", choices=["nats-py", "link"], default="nats-py")
    parser.add_argument("--delete-streams", action="store_true")
    args = parser.parse_args()
    up = asyncio.run(probe(args.seconds, args.clients, args.ask, args.via, args.delete_streams))
    sys.exit(0 if up else 1)


if __name__ == "__main__":
    main()
