"""Actors of ``bench/runtime_tail_probe.py``, ``bench/runtime_call_probe.py`` and
``bench/runtime_bench.py``: a shard host that timestamps its batches, one that measures the CPU
of each and of Ray's handling between them, and the floor's two baselines composed in one actor
call (a one-row asyncpg transaction run by an actor, which records when each call began and
ended). A module of its own so that Ray's workers import it by name."""

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
        self._calls: list[tuple[float, float]] = []
        self._conn = self._loop.run_until_complete(
            asyncpg.connect(url, server_settings={"search_path": schema})
        )
        self._loop.run_until_complete(
            self._conn.execute("CREATE TABLE IF NOT EXISTS tx_actor (k bigserial, v bytea)")
        )

    def tx(self, value: object = None) -> object:
        enter = time.perf_counter()
        self._loop.run_until_complete(_one_row(self._conn))
        self._calls.append((enter, time.perf_counter()))
        return value

    def traces(self) -> list[tuple[float, float]]:
        """When each ``tx`` call since the last ``traces()`` began and ended in the actor (the
        machine's monotonic clock, as :class:`TracingHost` records its batches)."""
        calls, self._calls = self._calls, []
        return calls

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


#: (thread CPU, wall) of the last journal append in this process, once a CallProbeHost started.
_LAST_APPEND = [0.0, 0.0]


def _time_append_cpu() -> None:
    """Record the thread CPU time and the wall time of each ``PostgresBackend.append`` in this
    process (a shard host's worker), once."""
    original = PostgresBackend.append
    if getattr(original, "timed_cpu", False):
        return

    async def timed(self: Any, batch: Any, full_check: bool) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return await original(self, batch, full_check)
        finally:
            _LAST_APPEND[:] = [time.thread_time() - cpu, time.perf_counter() - wall]

    timed.timed_cpu = True  # type: ignore[attr-defined]
    PostgresBackend.append = timed  # type: ignore[method-assign]


class CallProbeHost(ShardHost):
    """A shard host for ``bench/runtime_call_probe.py``: per batch, its thread's CPU time in
    ``process_packed`` and in the journal append, the append's wall time, and the CPU its
    process spent between two calls (in the actor's thread: Ray's handling of the call; in
    the others); ``looped`` runs packed batches inside one call, ``raw_tx`` a one-row
    transaction (BEGIN, INSERT, COMMIT) on the journal's own write connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _time_append_cpu()
        super().__init__(*args, **kwargs)
        self._rows: list[dict[str, float]] = []
        self._raw: list[float] = []
        self._left: tuple[float, float] | None = None

    def process_packed(self, packed: bytes) -> Any:
        return self._measured(packed, between=True)

    def _measured(self, packed: bytes, between: bool) -> Any:
        thread, process = time.thread_time(), time.process_time()
        out = super().process_packed(packed)
        row = {
            "cpu": time.thread_time() - thread,
            "append_cpu": _LAST_APPEND[0],
            "append_wall": _LAST_APPEND[1],
        }
        if between and self._left is not None:
            row["ray_thread"] = thread - self._left[0]
            row["ray_others"] = (process - self._left[1]) - row["ray_thread"]
        self._rows.append(row)
        self._left = (time.thread_time(), time.process_time()) if between else None
        return out

    def looped(self, packs: list[bytes]) -> int:
        """Run the packed batches one after the other inside this one call."""
        for packed in packs:
            self._measured(packed, between=False)
        return len(packs)

    def raw_tx(self) -> None:
        started = time.perf_counter()
        with self._lock:
            storage: Any = self.storage
            self._loop.run_until_complete(_one_host_row(storage.database))
        self._raw.append(time.perf_counter() - started)
        self._left = None  # the next batch's "between" would count this call

    def measured(self) -> dict[str, Any]:
        """The batches and raw transactions recorded since the last call."""
        rows, self._rows = self._rows, []
        raw, self._raw = self._raw, []
        self._left = None
        return {"batches": rows, "raw_tx": raw}


#: Whether ``_one_host_row`` made its table in this process.
_HOST_TABLE: list[bool] = []


async def _one_host_row(database: Any) -> None:
    """A one-row transaction on the journal's write connection (a function, not a method: see
    :func:`_one_row`)."""
    async with database.raw_writer() as pg:
        if not _HOST_TABLE:
            await pg.execute("CREATE TABLE IF NOT EXISTS tx_host (k bigserial, v bytea)")
            _HOST_TABLE.append(True)
        async with pg.transaction():
            await pg.execute("INSERT INTO tx_host (v) VALUES ($1)", b"x" * 40)
