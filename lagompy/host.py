"""The shard host: one process that owns a set of logical shards and processes their commands.

A :class:`ShardHost` is a plain class; :mod:`lagompy.runtime` runs it as a named, detached Ray
actor with ``max_concurrency=1``, so its batches run one at a time and each entity has exactly
one writer. The host owns an asyncio event loop of its own and drives an
:class:`~lagompy.processing.EntityProcessor` on it, one ``run_until_complete`` per batch.

Passivation does not need calls to arrive: a daemon thread started in ``__init__`` wakes every
``passivate_interval`` seconds and, holding the same lock that every batch holds, drops idle
entities. Nothing here imports Ray, so the host also runs (and is tested) in-process.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from typing import Any

from lagompy.errors import ConfigurationError, LagompyError, RuntimeFailure, UndeliverableOutcome
from lagompy.processing import EntityProcessor, Request, Result
from lagompy.settings import JournalSettings
from lagompy.sharding import Topology, host_of, resolve_class
from lagompy.storage import Storage, open_storage

log = logging.getLogger("lagompy.host")

#: The host process's first-generation garbage collection threshold. Every command allocates a
#: few container objects (effect, decision, result, event); with Python's default (700) the
#: collector ran every couple of dozen commands and, measured on a batch of 500 commands on 500
#: live entities, took 15-25% of the processing time. The host is a process of its own (a Ray
#: actor), so it collects less often instead; objects that exist once the journal is open are
#: frozen out of the collector's way (``gc.freeze``).
GC_THRESHOLD = 50_000

#: What a host returns per request: (reply, None) or (None, error).
Outcome = tuple[Any, BaseException | None]


class WrongTopology(ConfigurationError):
    """A batch was routed with another topology than the one this host runs."""


class ShardHost:
    """Hosts the entities of the shards ``s`` with ``s % hosts == index``."""

    def __init__(
        self,
        topology: dict[str, Any],
        index: int,
        entity_paths: Sequence[str],
        journal: dict[str, Any],
        *,
        max_entities: int | None = None,
        idle_timeout: float | None = None,
        passivate_interval: float = 10.0,
        conflict_retries: int = 2,
    ) -> None:
        self.topology = Topology.from_dict(topology)
        self.index = index
        self.started_at = time.time()
        classes = [resolve_class(path) for path in entity_paths]
        self._loop = asyncio.new_event_loop()
        self.storage: Storage = self._loop.run_until_complete(
            open_storage(entities=classes, settings=JournalSettings(**journal))
        )
        gc.freeze()
        threshold = gc.get_threshold()
        gc.set_threshold(max(threshold[0], GC_THRESHOLD), *threshold[1:])
        self.processor = EntityProcessor(
            classes,
            self.storage.journal,
            self.storage.snapshots,
            max_entities=max_entities,
            idle_timeout=idle_timeout,
            conflict_retries=conflict_retries,
        )
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.counters: dict[str, float] = {
            "batches": 0,
            "requests": 0,
            "write_transactions": 0,
            "events": 0,
            "busy_seconds": 0.0,
        }
        self._sweeper = threading.Thread(
            target=self._sweep, args=(passivate_interval,), name="lagompy-passivate", daemon=True
        )
        self._sweeper.start()

    # ----------------------------------------------------------------- remote methods

    def ping(self) -> dict[str, Any]:
        """Who this host is: its index, process id and topology key."""
        return {"index": self.index, "pid": os.getpid(), "topology_key": self.topology.key}

    def process(self, topology_key: str, batch: list[Request] | bytes) -> list[Outcome] | bytes:
        """Process one batch; one (reply, error) per request, in order, released only after
        the batch's events committed.

        The region sends the requests as plain tuples pickled with the standard C pickler (much
        faster than the per-object dispatch of Ray's cloudpickle for hundreds of small
        objects); the outcomes come back pickled the same way. Batches that do not pickle that
        way travel as objects. An outcome that does not pickle at all (a reply or a rejection
        holding a lock, say) is replaced with an ``UndeliverableOutcome`` for its ask alone:
        the others of the batch, committed ones included, get theirs.
        """
        requests: list[Request] = (
            list(map(Request._make, pickle.loads(batch))) if isinstance(batch, bytes) else batch
        )
        outcomes, results = self._run(topology_key, requests)
        try:
            pickled = pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            # Some outcome does not pickle this way: check them one by one (rare; they travel
            # as objects, for Ray's cloudpickle).
            return _deliverable(outcomes, requests, results)
        return pickled if isinstance(batch, bytes) else outcomes

    def _process(self, topology_key: str, requests: list[Request]) -> list[Outcome]:
        """The outcomes of the batch, in order."""
        return self._run(topology_key, requests)[0]

    def _run(
        self, topology_key: str, requests: list[Request]
    ) -> tuple[list[Outcome], list[Result] | None]:
        """The outcomes of the batch, and the processor's results they came from (None when
        the batch was refused whole)."""
        if topology_key != self.topology.key:
            error = WrongTopology(
                f"shard host {self.index} of app {self.topology.app!r} runs topology "
                f"{self.topology.key}, the batch was routed with {topology_key}: the app's hosts "
                "were replaced; start() again in this process"
            )
            return [(None, error)] * len(requests), None
        shards, hosts = self.topology.shards, self.topology.hosts
        wrong = (
            [r for r in requests if host_of(r.entity_id, shards, hosts) != self.index]
            if hosts > 1
            else []  # one host runs every shard
        )
        if wrong:
            error = WrongTopology(
                f"entity {wrong[0].entity_id!r} does not live on shard host {self.index}"
            )
            return [(None, error)] * len(requests), None
        with self._lock:
            started = time.perf_counter()
            results = self._loop.run_until_complete(self.processor.process(requests))
            self.counters["busy_seconds"] += time.perf_counter() - started
        counters = self.counters
        counters["batches"] += 1
        counters["requests"] += len(requests)
        events = 0
        outcomes: list[Outcome] = []
        append = outcomes.append
        for r in results:
            if r.error is None:
                append((r.reply, None))
                if r.events:
                    events += len(r.events)
            else:
                append(_outcome(r))
        if events:
            counters["write_transactions"] += 1
            counters["events"] += events
        return outcomes, results

    def stats(self) -> dict[str, Any]:
        with self._lock:
            processor = dict(self.processor.stats())
        return {"index": self.index, "pid": os.getpid(), **self.counters, **processor}

    def passivate(self) -> int:
        """Drop idle entities now; return how many."""
        with self._lock:
            return self.processor.passivate_idle()

    def close(self) -> None:
        """Release the journal's connections (before the actor is killed)."""
        self._closed.set()
        with self._lock:
            if not self._loop.is_closed():
                self._loop.run_until_complete(self.storage.close())
                self._loop.close()

    # ----------------------------------------------------------------- internals

    def _sweep(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.passivate()
            except Exception:  # never let the sweeper die
                log.exception("passivation sweep of shard host %d failed", self.index)


def _outcome(result: Result) -> Outcome:
    error = result.error
    if error is None:
        return (result.reply, None)
    if not isinstance(error, LagompyError):
        error = _picklable(error)
    return (None, error)


def _picklable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeFailure that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeFailure(f"{type(error).__qualname__}: {error}")
    return error


def _deliverable(
    outcomes: list[Outcome], requests: list[Request], results: list[Result] | None
) -> list[Outcome]:
    """The outcomes, each that pickles neither with the standard pickler nor with Ray's
    cloudpickle (what Ray sends objects with) replaced with an ``UndeliverableOutcome`` for
    its ask: the caller learns which command it answers and whether it was applied."""
    fallback = _fallback_pickler()
    deliverable: list[Outcome] = []
    for n, outcome in enumerate(outcomes):
        problem = _pickle_problem(outcome, fallback)
        if problem is None:
            deliverable.append(outcome)
            continue
        result = results[n] if results is not None else None
        committed = result is not None and result.committed
        deliverable.append((None, _undeliverable(outcome, requests[n], committed, problem)))
    return deliverable


def _fallback_pickler() -> Any:
    """Ray's cloudpickle when Ray is installed (imported only when the standard pickler
    failed: this module does not need Ray), else None."""
    try:
        return importlib.import_module("ray.cloudpickle")
    except ImportError:
        return None


def _pickle_problem(value: Any, fallback: Any) -> str | None:
    """None if ``value`` pickles (with the standard pickler or the fallback), else why not."""
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return None
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    if fallback is not None:
        try:
            fallback.dumps(value)
            return None
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
    return problem[:300]


def _undeliverable(
    outcome: Outcome, request: Request, committed: bool, problem: str
) -> UndeliverableOutcome:
    reply, error = outcome
    what = (
        f"command {type(request.command).__qualname__} for {request.entity_type}/"
        f"{request.entity_id} (command id {request.command_id})"
    )
    if error is not None:
        message = (
            f"the {type(error).__qualname__} that answered {what} cannot be sent back from its "
            f"shard host: it does not pickle ({problem}); the command persisted nothing. "
            f"It said: {str(error)[:500]}"
        )
    elif committed:
        message = (
            f"{what} WAS applied (its events are committed), but its reply, a "
            f"{type(reply).__qualname__}, cannot be sent back from its shard host: it does not "
            f"pickle ({problem}). Do not apply the command again; make its reply picklable"
        )
    else:
        message = (
            f"the reply to {what}, a {type(reply).__qualname__}, cannot be sent back from its "
            f"shard host: it does not pickle ({problem}); the command persisted nothing"
        )
    return UndeliverableOutcome(message, command_id=request.command_id, committed=committed)


class Coordinator:
    """One per app: holds the app's recorded topology. Run as a named, detached actor."""

    def __init__(self, topology: dict[str, Any]) -> None:
        self._topology = topology

    def topology(self) -> dict[str, Any]:
        return self._topology
