"""Actors of ``bench/runtime_tail_probe.py`` and ``bench/runtime_bench.py``: a shard host that
timestamps its batches, and the floor's two baselines composed in one actor call (a one-row
asyncpg transaction run by an actor). A module of its own so that Ray's workers import it by
name."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import asyncpg

from lagompy.journal._postgres import PostgresBackend
from lagompy.runtime._host import ShardHost

#: (start, end) of every journal append in this process, once a TracingHost started in it.
_APPENDS: list[tuple[float, float]] = []


def _time_appends() -> None:
    """Time ``PostgresBackend.append`` in this process (a shard host's worker), once."""
    original = PostgresBackend.append
    if getattr(original, "timed", False):
        return

    async def timed(self: Any, batch: Any, full_check: bool) -> Any:
        started = time.perf_counter()
        try:
            return await original(self, batch, full_check)
        finally:
            _APPENDS.append((started, time.perf_counter()))

    timed.timed = True  # type: ignore[attr-defined]
    PostgresBackend.append = timed  # type: ignore[method-assign]


class TracingHost(ShardHost):
    """A shard host that records, per batch, when ``process`` began and ended (the machine's
    monotonic clock, which every process shares), its thread's CPU time, the journal appends
    it made, and the garbage collector's collections in its process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _time_appends()
        super().__init__(*args, **kwargs)
        self._trace: list[dict[str, Any]] = []
        self._gcs: list[tuple[float, float, int]] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gcs.append((self._gc_start, time.perf_counter(), info["generation"]))

    def process(self, topology_key: str, batch: Any) -> Any:
        return self._traced(super().process, topology_key, batch)

    def process_packed(self, packed: bytes) -> Any:
        return self._traced(super().process_packed, packed)

    def _traced(self, method: Any, *args: Any) -> Any:
        enter = time.perf_counter()
        cpu = time.thread_time()
        appends = len(_APPENDS)
        out = method(*args)
        self._trace.append(
            {
                "enter": enter,
                "leave": time.perf_counter(),
                "cpu": time.thread_time() - cpu,
                "appends": _APPENDS[appends:],
            }
        )
        return out

    def traces(self) -> dict[str, Any]:
        """The batches and collections recorded since the last call."""
        trace, self._trace = self._trace, []
        gcs, self._gcs = self._gcs, []
        return {"trace": trace, "gcs": gcs}


class TxActor:
    """Runs a one-row asyncpg transaction (BEGIN, INSERT, COMMIT) per call, on an event loop
    of its own, one ``run_until_complete`` per call, the way a shard host drives its journal:
    the floor's two baselines (a no-op actor call and a one-row transaction) composed in one
    Ray call, without lagompy."""

    def __init__(self, url: str, schema: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(
            asyncpg.connect(url, server_settings={"search_path": schema})
        )
        self._loop.run_until_complete(
            self._conn.execute("CREATE TABLE IF NOT EXISTS tx_actor (k bigserial, v bytea)")
        )

    def tx(self, value: object = None) -> object:
        self._loop.run_until_complete(_one_row(self._conn))
        return value

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())


async def _one_row(conn: Any) -> None:
    """A function, not a method: a coroutine method makes Ray run the actor as an async one."""
    async with conn.transaction():
        await conn.execute("INSERT INTO tx_actor (v) VALUES ($1)", b"x" * 40)


class TracingHostAtRayNiceness(TracingHost):
    """A TracingHost that leaves its niceness where Ray put it (the code before hosts lowered
    it), to measure both in one run."""

    niceness = None
