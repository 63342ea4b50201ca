"""EntityRef's ask timeouts: shared timers per deadline step, no timer left behind."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, cast

import pytest

from examples.user_service.entity import ChangeName
from lagompy.errors import AskTimeout
from lagompy.runtime import EntityRef
from lagompy.runtime._processing import Request
from lagompy.runtime._refs import DEADLINE_STEP, _command_ids, _deadlines_of


class Pending:
    """A runtime whose asks are answered only when the test says so."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[Any]] = {}

    def submit(self, request: Request) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        assert request.command_id is not None
        self.futures[request.command_id] = future
        return future


async def test_asks_time_out_on_shared_timers_and_leave_none_behind() -> None:
    runtime = Pending()
    ref: EntityRef[Any] = EntityRef(runtime.submit, "user", "1")
    loop = asyncio.get_running_loop()
    deadlines = _deadlines_of(loop)
    started = time.monotonic()
    short: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(ref.ask(ChangeName("a"), timeout=0.05, command_id=f"s{i}"))
        for i in range(200)
    ]
    long: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(ref.ask(ChangeName("b"), timeout=30, command_id=f"l{i}"))
        for i in range(200)
    ]
    await asyncio.sleep(0)
    # 400 asks, two deadlines: at most a few timers, not one per ask.
    assert 1 <= len(deadlines.buckets) <= 4
    for outcome in await asyncio.gather(*short, return_exceptions=True):
        assert isinstance(outcome, AskTimeout)
    elapsed = time.monotonic() - started
    assert 0.05 <= elapsed < 0.05 + DEADLINE_STEP + 1.0
    assert {
        cast(AskTimeout, e).command_id for e in await asyncio.gather(*short, return_exceptions=True)
    } == {f"s{i}" for i in range(200)}
    # The long asks are answered before their deadline: their timer goes away with the last.
    for i in range(200):
        runtime.futures[f"l{i}"].set_result(i)
    assert await asyncio.gather(*long) == list(range(200))
    assert deadlines.buckets == {}


async def test_an_answered_ask_does_not_time_out_later() -> None:
    runtime = Pending()
    ref: EntityRef[Any] = EntityRef(runtime.submit, "user", "1")
    ask: asyncio.Future[Any] = asyncio.ensure_future(
        ref.ask(ChangeName("a"), timeout=0.02, command_id="x")
    )
    await asyncio.sleep(0)
    runtime.futures["x"].set_result("done")
    assert await ask == "done"
    await asyncio.sleep(0.05)
    assert _deadlines_of(asyncio.get_running_loop()).buckets == {}
    with pytest.raises(AskTimeout):
        await ref.ask(ChangeName("b"), timeout=0.01, command_id="y")


def test_generated_command_ids_are_distinct_and_a_forked_child_draws_new_ones() -> None:
    ids = [_command_ids.next() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not repeat the parent's next ones
        os.write(write, "\n".join(_command_ids.next() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    parent = [_command_ids.next() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent + ids)
    assert all(len(cid) == 32 for cid in child + parent)
