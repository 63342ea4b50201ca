"""The region client: routes asks to shard hosts, in batches, from the calling process.

Every ask is queued for the host that runs its entity's shard. At the end of the current tick of
the event loop (``loop.call_soon``: no timer) each host's queue is sent, shared evenly among the
host's free calls, each of at most ``max_batch`` asks. At most ``max_in_flight`` calls per host
are outstanding; while they run, new asks accumulate and leave as the next batch as soon as a
call returns, so batches grow with the load by themselves. Replies come back in order and
resolve each ask's future; an error in a reply is raised by that ask only.

When a call fails because its host died or could not be reached (the batch may or may not have
run), the batch is sent again, up to ``retries`` times, with the same command ids and the
duplicate check on: a command that already persisted its events answers with its stored reply
instead of running twice. A resent ask answered with ``JournalUnavailable`` could not be
checked (its host cannot reach the journal, e.g. a host restarted during a database outage), so
its first send's outcome is still unknown: it is resent again in the next round rather than
answered with an error that would read as "not applied". When the retries run out, each ask
raises ``OutcomeUnknown``. Before each round the link looks its host up again
(:meth:`HostLink.reconnect`), which may create it again when it is gone for good.
While a host's failed batches wait to be resent, no new batch goes to that host: the resends go
first, in the order the batches were first sent, so an entity's commands keep their order
across the failure.

This module does not import Ray: hosts are reached through :class:`HostLink` objects (see
:mod:`lagompy.runtime` for the Ray one), so the batching logic is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from lagompy.errors import JournalUnavailable, OutcomeUnknown, Overloaded, RuntimeFailure
from lagompy.runtime._defaults import runtime_default
from lagompy.runtime._processing import Request
from lagompy.runtime._sharding import host_of

log = logging.getLogger("lagompy.region")

#: (reply, None) or (None, error), one per request.
Outcome = tuple[Any, BaseException | None]


class HostUnreachable(Exception):
    """Raised by a :class:`HostLink` when a call failed in a way that leaves its outcome
    unknown (the host died or could not be reached): the region resends the batch."""


class HostLink(Protocol):
    """How the region reaches one shard host.

    A link may also have ``begin(requests)``: :meth:`call` begun before it returns (the
    batch handed over at once), returning the awaitable of its outcomes. The region then
    begins each batch's call from its flush, in the order the batches were cut, and awaits
    it in the batch's task; without it, the task calls :meth:`call` when it first runs, one
    turn of the event loop later.
    """

    async def call(self, requests: list[Request]) -> list[Outcome]:
        """Process a batch on the host; raise :class:`HostUnreachable` when the outcome is
        unknown."""
        ...

    async def reconnect(self) -> None:
        """Called before a resend: look the host up again (it may have been restarted, or
        need to be created again)."""
        ...


@dataclass(eq=False, slots=True)
class _Ask:
    request: Request
    future: asyncio.Future[Any]
    submitted: float = 0.0


#: How many recent ask latencies the percentiles are computed from.
LATENCY_WINDOW = 10_000


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max (milliseconds) of latency samples in seconds; zeros when empty."""
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "p50_ms": ordered[round(0.50 * last)] * 1000,
        "p99_ms": ordered[round(0.99 * last)] * 1000,
        "max_ms": ordered[last] * 1000,
    }


class Region:
    """Pending asks of this process, grouped per shard host."""

    def __init__(
        self,
        links: Sequence[HostLink],
        *,
        shards: int,
        max_batch: int = runtime_default("max_batch"),
        max_in_flight: int = runtime_default("max_in_flight"),
        max_pending: int = runtime_default("max_pending"),
        retries: int = runtime_default("retries"),
        retry_backoff: float = runtime_default("retry_backoff"),
        retry_backoff_max: float = runtime_default("retry_backoff_max"),
    ) -> None:
        self.links = list(links)
        self.shards = shards
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._queues: list[list[_Ask]] = [[] for _ in self.links]
        self._in_flight = [0] * len(self.links)
        #: per host: batches whose call failed, by the order they were first sent
        self._failed: list[list[tuple[int, list[_Ask]]]] = [[] for _ in self.links]
        #: per host: the task resending its failed batches (None: the host is healthy)
        self._resender: list[asyncio.Task[None] | None] = [None] * len(self.links)
        #: per host: set when no call to it is in flight
        self._settled = [asyncio.Event() for _ in self.links]
        for event in self._settled:
            event.set()
        self._sent = 0
        self._outstanding = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.counters = {
            "asks": 0,
            "batches": 0,
            "resends": 0,
            "outcome_unknown": 0,
            "overloaded": 0,
        }
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._batch_sizes: deque[int] = deque(maxlen=1000)
        self._started = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """This process's view: counters, outstanding asks, queue depth per host, batch sizes,
        asks/s since start, and ask latency percentiles over the last asks."""
        sizes = list(self._batch_sizes)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            **self.counters,
            "outstanding": self._outstanding,
            "queue_depth": [len(q) for q in self._queues],
            "in_flight": list(self._in_flight),
            "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
            "max_batch_seen": max(sizes, default=0),
            "asks_per_second": self.counters["asks"] / elapsed,
            "latency": percentiles(list(self._latencies)),
        }

    @property
    def outstanding(self) -> int:
        """Asks queued or in flight."""
        return self._outstanding

    def submit(self, request: Request) -> asyncio.Future[Any]:
        """Queue one request; its future resolves with the reply or the error."""
        if self._closed:
            raise RuntimeFailure("these entities are closed")
        if self._outstanding >= self.max_pending:
            self.counters["overloaded"] += 1
            raise Overloaded(
                f"{self._outstanding} asks are outstanding in this process (max_pending "
                f"{self.max_pending}); command {request.command_id} was not sent"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        queues = self._queues
        host = host_of(request.entity_id, self.shards, len(queues)) if len(queues) > 1 else 0
        queues[host].append(_Ask(request, future, time.perf_counter()))
        self._outstanding += 1
        self.counters["asks"] += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        for host in range(len(self.links)):
            self._dispatch(host)

    def _dispatch(self, host: int) -> None:
        if self._resender[host] is not None:
            return  # the host's failed batches are resent first; the queue waits behind them
        queue = self._queues[host]
        while queue and self._in_flight[host] < self.max_in_flight:
            # The queue is shared evenly among the free calls, not cut at max_batch: 1,024
            # queued asks with two free calls leave as 512 + 512, not 1,000 + 24. The host
            # then always has a full batch waiting behind the one it runs, and the time this
            # process takes to turn a batch's replies around into the next batch is hidden.
            free = self.max_in_flight - self._in_flight[host]
            size = min(self.max_batch, -(-len(queue) // free))
            batch = queue[:size]
            del queue[:size]
            live = [ask for ask in batch if not ask.future.done()]
            self._outstanding -= len(batch) - len(live)  # abandoned before they were sent
            if not live:
                continue
            self._in_flight[host] += 1
            self._settled[host].clear()
            self._sent += 1
            self._start(self._send(host, self._sent, live, self._begin(host, live)))

    def _begin(self, host: int, batch: list[_Ask]) -> Awaitable[list[Outcome]] | None:
        """The host's call begun now, when its link can (a ``begin`` method, see
        :class:`HostLink`): the batch leaves in this tick of the event loop, not in the next,
        where the task that waits for it first runs. None: ``_send`` calls the link."""
        begin = getattr(self.links[host], "begin", None)
        if begin is None:
            return None
        try:
            return cast(Awaitable[list[Outcome]], begin([ask.request for ask in batch]))
        except Exception as e:  # raised by the awaitable instead, in _send
            failed: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed

    def _start(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        host: int,
        order: int,
        batch: list[_Ask],
        begun: Awaitable[list[Outcome]] | None = None,
    ) -> None:
        handed_over = False
        try:
            self._batch_sizes.append(len(batch))
            self.counters["batches"] += 1
            try:
                outcomes = await (
                    begun
                    if begun is not None
                    else self.links[host].call([a.request for a in batch])
                )
            except HostUnreachable as e:
                if self.retries == 0:
                    self._outcome_unknown(batch)
                    return
                log.info("shard host %d unreachable (%s); its batches will be resent", host, e)
                self._failed[host].append((order, batch))
                handed_over = True
                if self._resender[host] is None:
                    task = asyncio.get_running_loop().create_task(self._resend(host))
                    self._resender[host] = task
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                return
            self._answer(host, batch, outcomes)
        except BaseException as e:  # a bug here must not leave asks hanging
            self._fail(batch, e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._in_flight[host] -= 1
            if not self._in_flight[host]:
                self._settled[host].set()
            if not handed_over:
                self._outstanding -= len(batch)
            if not self._closed or self._queues[host]:
                self._dispatch(host)

    async def _resend(self, host: int) -> None:
        """Resend the host's failed batches, oldest first, until they are answered or the
        retries run out; new batches for the host wait meanwhile."""
        link = self.links[host]
        failed = self._failed[host]
        try:
            for attempt in range(1, self.retries + 1):
                await asyncio.sleep(
                    min(self.retry_backoff * 2 ** (attempt - 1), self.retry_backoff_max)
                )
                # Calls still in flight to the host fail or succeed first, so that every
                # failed batch is resent in this round, in the order they were first sent.
                await self._settled[host].wait()
                try:
                    await link.reconnect()
                except Exception as e:  # the resend then fails (or not) by itself
                    log.warning("looking up shard host %d again failed: %s", host, e)
                failed.sort(key=lambda entry: entry[0])
                asks = [ask for _, batch in failed for ask in batch]
                failed.clear()
                live = [ask for ask in asks if not ask.future.done()]
                self._outstanding -= len(asks) - len(live)  # abandoned (timed out) meanwhile
                for start in range(0, len(live), self.max_batch):
                    chunk = live[start : start + self.max_batch]
                    self.counters["resends"] += 1
                    self.counters["batches"] += 1
                    log.info("resending %d asks to shard host %d (%d)", len(chunk), host, attempt)
                    requests = [ask.request._replace(check_duplicate=True) for ask in chunk]
                    try:
                        outcomes = await link.call(requests)
                    except HostUnreachable as e:
                        log.info("shard host %d still unreachable: %s", host, e)
                        failed.append((-1, live[start:]))  # first in the next round
                        break
                    except Exception as e:
                        self._fail(chunk, e)
                        self._outstanding -= len(chunk)
                    else:
                        unchecked = self._answer_resent(host, chunk, outcomes)
                        if unchecked:
                            failed.append((-1, unchecked))  # in their order, next round
                        self._outstanding -= len(chunk) - len(unchecked)
                if not failed:
                    return
            log.warning("shard host %d unreachable, retries exhausted", host)
            for _, batch in failed:
                self._outcome_unknown(batch)
                self._outstanding -= len(batch)
            failed.clear()
        except BaseException as e:  # a bug here must not leave asks hanging
            for _, batch in failed:
                self._fail(batch, e)
                self._outstanding -= len(batch)
            failed.clear()
            if not isinstance(e, Exception):
                raise
        finally:
            self._resender[host] = None
            if not self._closed or self._queues[host]:
                self._dispatch(host)

    def _outcome_unknown(self, batch: list[_Ask]) -> None:
        for ask in batch:
            if not ask.future.done():
                self.counters["outcome_unknown"] += 1
                assert ask.request.command_id is not None
                ask.future.set_exception(OutcomeUnknown(ask.request.command_id))

    @staticmethod
    def _fail(batch: list[_Ask], error: BaseException) -> None:
        if not isinstance(error, Exception):
            error = RuntimeFailure("delivery cancelled")
        for ask in batch:
            if not ask.future.done():
                ask.future.set_exception(error)

    def _answer_resent(self, host: int, chunk: list[_Ask], outcomes: list[Outcome]) -> list[_Ask]:
        """Answer the asks of a resent chunk, except those answered ``JournalUnavailable``:
        their duplicate check could not run, so whether their first send committed is still
        unknown. Returns those, to be resent again."""
        if len(outcomes) != len(chunk):
            self._answer(host, chunk, outcomes)  # answers each with the mismatch
            return []
        unchecked = [
            ask
            for ask, (_, error) in zip(chunk, outcomes, strict=True)
            if isinstance(error, JournalUnavailable) and not ask.future.done()
        ]
        if not unchecked:
            self._answer(host, chunk, outcomes)
            return []
        log.info(
            "shard host %d could not check %d resent asks (the journal is unavailable); "
            "they will be resent",
            host,
            len(unchecked),
        )
        answered = [
            (ask, outcome)
            for ask, outcome in zip(chunk, outcomes, strict=True)
            if not isinstance(outcome[1], JournalUnavailable)
        ]
        self._answer(host, [a for a, _ in answered], [o for _, o in answered])
        return unchecked

    def _answer(self, host: int, batch: list[_Ask], outcomes: list[Outcome]) -> None:
        if len(outcomes) != len(batch):
            mismatch = RuntimeFailure(
                f"shard host {host} answered {len(outcomes)} results for {len(batch)} commands"
            )
            outcomes = [(None, mismatch)] * len(batch)
        now = time.perf_counter()
        record = self._latencies.append
        for ask, (reply, error) in zip(batch, outcomes, strict=True):
            if ask.future.done():
                continue
            record(now - ask.submitted)
            if error is not None:
                ask.future.set_exception(error)
            else:
                ask.future.set_result(reply)

    async def close(self) -> None:
        """Stop taking asks; wait until every ask already made is answered."""
        self._closed = True
        while True:
            for host, queue in enumerate(self._queues):
                if queue:
                    self._dispatch(host)
            if not self._tasks:
                break
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
