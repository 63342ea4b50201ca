"""Producers run with the producing service when its transport has some, and a topic the
transport cannot serve fails the start, never later. The transport here is a small one of the
test's own (the broker's transports have their own tests): its producers say when they run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lagompy.errors import ConfigurationError
from lagompy.testkit.topics import contract_topic
from lagompy.topic import MessageFeed, Topic, start_producers


class Producer:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self.log.append(f"run {self.name}")
        await self._stop.wait()
        self.log.append(f"end {self.name}")

    async def stop(self) -> None:
        self._stop.set()


class Transport:
    kind = "test"

    def __init__(self, refuse: int | None = None) -> None:
        self.log: list[str] = []
        self.refuse = refuse

    def producer(self, topic: Topic[Any], partition: int) -> Producer:
        if partition == self.refuse:
            raise ConfigurationError(f"topic {topic.name!r}: no subject for partition {partition}")
        return Producer(self.log, f"{topic.name}/{partition}")

    def feed(self, topic: Topic[Any], partition: int, *, group: str) -> MessageFeed:
        raise NotImplementedError

    async def close(self) -> None:
        self.log.append("closed")


@pytest.mark.asyncio
async def test_producers_run_until_closed_and_a_refused_topic_fails_at_start() -> None:
    transport = Transport()
    async with start_producers([contract_topic], transport) as producers:
        await asyncio.sleep(0.05)
        assert sorted(producers.producers) == [("contract-deposits", 0), ("contract-deposits", 1)]
        assert sorted(transport.log) == ["run contract-deposits/0", "run contract-deposits/1"]
    assert sorted(transport.log)[:2] == ["end contract-deposits/0", "end contract-deposits/1"]

    refusing = Transport(refuse=1)
    with pytest.raises(ConfigurationError, match="no subject for partition 1"):
        await start_producers([contract_topic], refusing)
    assert refusing.log == []  # nothing started: the start failed as a whole
