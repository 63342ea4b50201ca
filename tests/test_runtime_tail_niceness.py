"""A shard host runs its batches at niceness 0, not at the niceness 15 that Ray gives its
workers' task threads: at 15 a host on a busy node waits behind every other process at each
wake-up of every ask (the tail of single asks: docs/runtime.md, "Latency of one ask")."""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray_entities import Add, CounterEntity

from lagompy import start
from lagompy.runtime import shutdown_app
from lagompy.runtime._host import HOST_NICENESS, ShardHost
from lagompy.runtime._ray_cluster import ActorLoop, run_at_niceness
from lagompy.runtime._sharding import topology_for
from lagompy.settings import JournalSettings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness: Linux")


def _may_lower_niceness() -> bool:
    """Whether this process may lower a niceness (root, CAP_SYS_NICE or RLIMIT_NICE)."""
    result: list[bool] = []

    def attempt() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, 1)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            result.append(True)
        except PermissionError:
            result.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result[0]


needs_privilege = pytest.mark.skipif(
    not _may_lower_niceness(), reason="this process may not lower a niceness"
)


def _in_thread_at(niceness: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread of its own started at ``niceness`` (the way Ray starts an actor's
    task thread at its worker niceness), and that thread's niceness after it."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            value = fn()
            out.append((value, os.getpriority(os.PRIO_PROCESS, 0)))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


@needs_privilege
def test_a_thread_at_rays_worker_niceness_is_lowered_to_zero() -> None:
    assert HOST_NICENESS == 0
    assert _in_thread_at(15, lambda: run_at_niceness(0)) == (0, 0)


@needs_privilege
def test_an_actor_loop_started_at_niceness_15_runs_its_work_at_0() -> None:
    """The loop of a read-side worker or subscriber group actor (Ray made its thread at 15)."""

    async def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    def start_and_ask() -> int:
        actor_loop = ActorLoop("nice-loop")
        try:
            return actor_loop.call(niceness())
        finally:
            actor_loop.loop.call_soon_threadsafe(actor_loop.loop.stop)

    assert _in_thread_at(15, start_and_ask) == (0, 15)


def test_none_or_a_niceness_already_as_low_is_left_alone() -> None:
    assert _in_thread_at(15, lambda: run_at_niceness(None)) == (15, 15)
    assert _in_thread_at(5, lambda: run_at_niceness(10)) == (5, 5)


def test_without_the_privilege_the_host_runs_where_it_was_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(13, "Permission denied")

    def attempt() -> int | None:
        monkeypatch.setattr(os, "setpriority", refuse)  # after the thread went to 15
        return run_at_niceness(0)

    with caplog.at_level(logging.WARNING, logger="lagompy.runtime"):
        assert _in_thread_at(15, attempt) == (15, 15)
    assert "niceness 15" in caplog.text and "RAY_worker_niceness=0" in caplog.text


@needs_privilege
def test_a_host_started_on_a_thread_at_niceness_15_runs_its_batches_at_0(tmp_path: Path) -> None:
    js = JournalSettings(url=f"sqlite:///{tmp_path / 'j.db'}")
    topology = topology_for("nice", [CounterEntity], js, shards=1, hosts=1)
    paths = ["ray_entities:CounterEntity"]
    host, niceness = _in_thread_at(
        15, lambda: ShardHost(topology.to_dict(), 0, paths, js.model_dump())
    )
    try:
        assert niceness == 0
        assert host.ping()["niceness"] == 0 and host.stats()["niceness"] == 0
        # The threads it started (passivation, snapshots) inherit the niceness.
        assert host._sweeper.native_id is not None
        with open(f"/proc/self/task/{host._sweeper.native_id}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == 0
    finally:
        host.close()


@needs_privilege
async def test_the_hosts_of_an_app_on_ray_run_at_niceness_0(
    ray_session: Any, tmp_path: Path
) -> None:
    app = f"nice-{uuid.uuid4().hex[:8]}"
    settings = JournalSettings(url=f"sqlite:///{tmp_path}/nice.db")
    entities = await start(app=app, entities=[CounterEntity], journal_settings=settings, hosts=1)
    try:
        assert await entities.ref_for(CounterEntity, "c").ask(Add(1)) == 1
        (host,) = await entities.host_stats()
        assert host["niceness"] == 0
        # The thread that runs the host's batches (the process's main thread, where Ray runs a
        # sync actor's tasks), not only the one that reported it.
        with open(f"/proc/{host['pid']}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == 0
    finally:
        await entities.close()
        await shutdown_app(app)
