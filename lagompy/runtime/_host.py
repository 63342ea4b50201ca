"""The shard host: one process that owns a set of logical shards and processes their commands.

A :class:`ShardHost` is a plain class; :mod:`lagompy.runtime` runs it as a named, detached Ray
actor with ``max_concurrency=1``, so its batches run one at a time and each entity has exactly
one writer. The host owns an asyncio event loop of its own and drives an
:class:`~lagompy.runtime._processing.EntityProcessor` on it, one ``run_until_complete`` per batch.

Passivation does not need calls to arrive: a daemon thread started in ``__init__`` wakes every
``passivate_interval`` seconds and, holding the same lock that every batch holds, drops idle
entities. Snapshots are saved after the reply, not before: a batch that makes snapshots due
(an entity's every ``snapshot_every``-th event) leaves them to another daemon thread, which
saves them under the same lock once the batch has returned. Saved before the reply, they put
a second statement on the path of every ask in that batch: with the default
``snapshot_every = 100``, one write in a hundred, the 99th percentile of a single ask.
Nothing here imports Ray, so the host also runs (and is tested) in-process.

Constructing a host never needs the database. Ray treats an actor whose constructor raised as
dead for good, whatever its restart budget: a host restarted during a journal outage that
opened the journal in ``__init__`` would never come back. So a daemon thread opens the journal
on an event loop of its own, retrying with capped exponential backoff (``open_backoff``,
doubling up to ``open_backoff_max``), and hands the loop over to the host once it is open.
``__init__`` waits a little for the first attempt (``first_open_wait``), so that a host that
starts or restarts while the database is up is ready when it first answers. Until the journal
is open, every batch is answered at once with ``JournalUnavailable`` for each request: nothing
was run. ``ping()`` and ``stats()`` answer throughout and show the journal's state.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from typing import Any

from lagompy._collector import collector_state, tune_collector
from lagompy.errors import (
    ConfigurationError,
    JournalUnavailable,
    LagompyError,
    RuntimeFailure,
    UndeliverableOutcome,
)
from lagompy.journal._storage import PlacedStorage, Storage
from lagompy.runtime._defaults import runtime_default
from lagompy.runtime._loading import resolve_class
from lagompy.runtime._placed import PlacedProcessor, open_entity_storage, processor_for
from lagompy.runtime._processing import EntityProcessor, Request, Result
from lagompy.runtime._ray_cluster import ACTOR_NICENESS, run_at_niceness
from lagompy.runtime._sharding import Topology, host_of
from lagompy.settings import JournalSettings

log = logging.getLogger("lagompy.host")

#: The niceness a shard host runs its batches at (see :data:`ACTOR_NICENESS`: the host is on
#: the path of every ask). Measured with ``bench/runtime_tail_probe.py`` (docs/benchmarks.md,
#: "Runtime: asks through shard hosts on Ray").
HOST_NICENESS = ACTOR_NICENESS


#: What a host returns per request: (reply, None) or (None, error).
Outcome = tuple[Any, BaseException | None]

#: Seconds between the first two attempts to open the journal; doubled after each failure up to
#: ``OPEN_BACKOFF_MAX``. One attempt is one connection (refused at once while the database is
#: out), so a host in an outage costs the database one connection attempt every 2 s.
OPEN_BACKOFF = 0.1
OPEN_BACKOFF_MAX = 2.0
#: Longest one attempt to open the journal may take (a connection to an address that does not
#: answer would otherwise hang for the driver's own timeout).
OPEN_TIMEOUT = 30.0
#: How long ``__init__`` waits for the first attempt before the host answers without a journal.
FIRST_OPEN_WAIT = 10.0

#: Longest the snapshot thread sleeps before it looks at whether the host was closed.
SNAPSHOT_WAKE = 1.0

#: The journal's states as ``ping()`` and ``stats()`` report them.
JOURNAL_OPEN = "open"
JOURNAL_OPENING = "opening"  # the first attempt is under way
JOURNAL_UNAVAILABLE = "unavailable"  # an attempt failed; the next one follows its backoff
JOURNAL_CLOSED = "closed"


class WrongTopology(ConfigurationError):
    """A batch was routed with another topology than the one this host runs."""


class ShardHost:
    """Hosts the entities of the shards ``s`` with ``s % hosts == index``."""

    #: The niceness the host lowers its thread to when it starts (:data:`HOST_NICENESS`);
    #: None leaves the one it was started at.
    niceness: int | None = HOST_NICENESS

    def __init__(
        self,
        topology: dict[str, Any],
        index: int,
        entity_paths: Sequence[str],
        journal: dict[str, Any],
        *,
        max_entities: int | None = None,
        idle_timeout: float | None = None,
        passivate_interval: float = runtime_default("passivate_interval"),
        conflict_retries: int = runtime_default("conflict_retries"),
        open_backoff: float = OPEN_BACKOFF,
        open_backoff_max: float = OPEN_BACKOFF_MAX,
        first_open_wait: float = FIRST_OPEN_WAIT,
    ) -> None:
        # First: the threads started below inherit the niceness.
        self._niceness = run_at_niceness(self.niceness)
        self.topology = Topology.from_dict(topology)
        self.index = index
        self._classes = [resolve_class(path) for path in entity_paths]
        self._journal_settings = JournalSettings(**journal)
        self._processor_options: dict[str, Any] = {
            "max_entities": max_entities,
            "idle_timeout": idle_timeout,
            "conflict_retries": conflict_retries,
        }
        # Set together, under the lock, when the journal opens: the storage, its processor and
        # the event loop that the storage's connections live on (the loop here is a stand-in).
        self._loop = asyncio.new_event_loop()
        self.storage: Storage | PlacedStorage | None = None
        self.processor: EntityProcessor | PlacedProcessor | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._journal_state = JOURNAL_OPENING
        self._open_attempts = 0
        self._open_error: BaseException | None = None
        self._first_attempt = threading.Event()
        self.counters: dict[str, float] = {
            "batches": 0,
            "requests": 0,
            "write_transactions": 0,
            "events": 0,
            "busy_seconds": 0.0,
            "refused_batches": 0,  # answered JournalUnavailable: the journal was not open
            "snapshots_saved_after_reply": 0,
        }
        self._snapshots_due = threading.Event()
        self._opener = threading.Thread(
            target=self._open_journal,
            args=(open_backoff, open_backoff_max),
            name="lagompy-open-journal",
            daemon=True,
        )
        self._opener.start()
        self._first_attempt.wait(first_open_wait)
        self._sweeper = threading.Thread(
            target=self._sweep, args=(passivate_interval,), name="lagompy-passivate", daemon=True
        )
        self._sweeper.start()
        self._snapshotter = threading.Thread(
            target=self._save_snapshots, name="lagompy-snapshots", daemon=True
        )
        self._snapshotter.start()

    # ----------------------------------------------------------------- remote methods

    def ping(self) -> dict[str, Any]:
        """Who this host is: its index, process id, topology key and the niceness it runs
        its batches at (see :data:`HOST_NICENESS`), its garbage collector (``collector``: see
        lagompy/_collector.py), and its journal's state (``journal``:
        open, opening, unavailable or closed; ``journal_error``: why the last attempt to open
        it failed; ``journal_misconfigured``: that error is a ``ConfigurationError``, which
        waiting will not fix)."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "topology_key": self.topology.key,
            "niceness": self._niceness,
            "collector": collector_state(),
            **self._journal_status(),
        }

    def process(self, topology_key: str, batch: list[Request]) -> list[Outcome] | bytes:
        """Process one batch; one (reply, error) per request, in order, released only after
        the batch's events committed.

        The region sends its batches through :meth:`process_packed`: the requests as plain
        tuples pickled with the standard C pickler (much faster than the per-object dispatch
        of Ray's cloudpickle for hundreds of small objects). Batches that do not pickle that
        way come here, as objects, and their outcomes go back as objects. An outcome that does
        not pickle at all (a reply or a rejection holding a lock, say) is replaced with an
        ``UndeliverableOutcome`` for its ask alone: the others of the batch, committed ones
        included, get theirs.
        """
        return self._answer(topology_key, batch, False)

    def process_packed(self, packed: bytes) -> list[Outcome] | bytes:
        """:meth:`process` in one argument: the topology key and the requests' tuples pickled
        together, ``pickle.dumps((topology_key, [tuple(request), ...]))``; the outcomes come
        back pickled. The region sends its batches this way: Ray serializes, sends and
        deserializes every argument of a call apart, and a second one cost a single ask
        ~0.07 ms at p50 (a no-op actor call with one and with two small arguments, 2026-12-07,
        docs/benchmarks.md, "Runtime: asks through shard hosts on Ray")."""
        topology_key, rows = pickle.loads(packed)
        return self._answer(topology_key, list(map(Request._make, rows)), True)

    def _answer(
        self, topology_key: str, requests: list[Request], pickled: bool
    ) -> list[Outcome] | bytes:
        """The outcomes of the batch: pickled with the standard pickler when ``pickled`` and
        they can be, else as objects (see :meth:`process`)."""
        outcomes, results = self._run(topology_key, requests)
        try:
            data = pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            # Some outcome does not pickle this way: check them one by one (rare; they travel
            # as objects, for Ray's cloudpickle).
            return _deliverable(outcomes, requests, results)
        return data if pickled else outcomes

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
        if self.processor is None:
            return self._refuse(len(requests)), None
        with self._lock:
            started = time.perf_counter()
            results = self._loop.run_until_complete(self.processor.process(requests))
            self.counters["busy_seconds"] += time.perf_counter() - started
            if self.processor.due_snapshots:
                self._snapshots_due.set()  # saved by the snapshot thread, after the reply
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
        """The host's counters, its processor's (once the journal is open), its niceness and
        the journal's state (see :meth:`ping`)."""
        with self._lock:
            processor = dict(self.processor.stats()) if self.processor is not None else {}
        return {
            "index": self.index,
            "pid": os.getpid(),
            "niceness": self._niceness,
            **self.counters,
            **processor,
            **self._journal_status(),
        }

    def passivate(self) -> int:
        """Drop idle entities now; return how many."""
        with self._lock:
            return self.processor.passivate_idle() if self.processor is not None else 0

    def close(self) -> None:
        """Release the journal's connections (before the actor is killed)."""
        self._closed.set()
        with self._lock:
            self._journal_state = JOURNAL_CLOSED
            # Batches that still arrive are refused (nothing is run) rather than failing on
            # a closed loop; the snapshots still due are saved first.
            processor, self.processor = self.processor, None
            loop, storage = self._loop, self.storage
            if not loop.is_closed():
                if processor is not None:
                    loop.run_until_complete(processor.save_due_snapshots())
                if storage is not None:
                    loop.run_until_complete(storage.close())
                loop.close()

    # ----------------------------------------------------------------- internals

    def _journal_status(self) -> dict[str, Any]:
        error = self._open_error
        return {
            "journal": self._journal_state,
            "journal_open_attempts": self._open_attempts,
            "journal_error": None if error is None else f"{type(error).__name__}: {error}",
            "journal_misconfigured": isinstance(error, ConfigurationError),
        }

    def _refuse(self, count: int) -> list[Outcome]:
        """The answer to a batch that arrives before the journal is open: nothing was run.

        The message names the kind of the last failure, not its text: a driver's message may
        name the database's address, and this one travels to callers."""
        self.counters["refused_batches"] += 1
        error = self._open_error
        if self._journal_state == JOURNAL_CLOSED:
            why = "the host was closed (its app is being stopped or replaced)"
        elif error is None:
            why = "it is still opening it"
        elif isinstance(error, ConfigurationError):
            why = "the journal's settings or tables are wrong (see the host's log); it keeps trying"
        else:
            why = f"the database cannot be reached ({_root_kind(error)}); it keeps trying"
        refusal = JournalUnavailable(
            f"shard host {self.index} of app {self.topology.app!r} has not opened the journal: "
            f"{why}. The command was not run; ask again later"
        )
        return [(None, refusal)] * count

    def _open_journal(self, backoff: float, backoff_max: float) -> None:
        """The opener thread: open the journal on an event loop of its own, retrying with
        capped exponential backoff, then hand the loop and the storage over to the host."""
        loop = asyncio.new_event_loop()
        handed_over = False
        delay = backoff
        try:
            while not self._closed.is_set():
                self._open_attempts += 1
                try:
                    storage = loop.run_until_complete(
                        asyncio.wait_for(
                            open_entity_storage(self._classes, self._journal_settings),
                            OPEN_TIMEOUT,
                        )
                    )
                except Exception as e:
                    self._failed_to_open(e, delay)
                    if self._closed.wait(delay):
                        return
                    delay = min(delay * 2, backoff_max)
                    continue
                handed_over = self._adopt(loop, storage)
                return
        finally:
            self._first_attempt.set()
            if not handed_over:
                loop.close()

    def _failed_to_open(self, error: BaseException, delay: float) -> None:
        first = self._open_error is None
        self._open_error = error
        self._journal_state = JOURNAL_UNAVAILABLE
        self._first_attempt.set()
        # Once at warning level, then quietly: an outage must not flood the host's log.
        log.log(
            logging.WARNING if first else logging.INFO,
            "shard host %d cannot open the journal (attempt %d), next attempt in %.1f s: %s",
            self.index,
            self._open_attempts,
            delay,
            error,
        )

    def _adopt(self, loop: asyncio.AbstractEventLoop, storage: Storage | PlacedStorage) -> bool:
        """Make the opened storage (and the loop its connections live on) the host's; False
        when the host was closed meanwhile (then the storage is released here)."""
        with self._lock:
            if self._closed.is_set():
                loop.run_until_complete(storage.close())
                return False
            self.processor = processor_for(
                self._classes, storage, defer_snapshots=True, **self._processor_options
            )
            self._loop.close()
            self._loop, self.storage = loop, storage
            self._journal_state = JOURNAL_OPEN
            recovered = self._open_error is not None
            self._open_error = None
        if recovered:
            log.warning(
                "shard host %d opened the journal after %d attempts",
                self.index,
                self._open_attempts,
            )
        tune_collector()  # a process of its own: see lagompy/_collector.py
        return True

    def _save_snapshots(self) -> None:
        """The snapshot thread: save the snapshots the batches left due, after their replies
        (see the module's docstring)."""
        while not self._closed.is_set():
            if not self._snapshots_due.wait(SNAPSHOT_WAKE):
                continue
            self._snapshots_due.clear()
            try:
                with self._lock:
                    processor = self.processor
                    if processor is not None and processor.due_snapshots:
                        saved = self._loop.run_until_complete(processor.save_due_snapshots())
                        self.counters["snapshots_saved_after_reply"] += saved
            except Exception:  # never let the thread die
                log.exception("saving snapshots on shard host %d failed", self.index)

    def _sweep(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.passivate()
            except Exception:  # never let the sweeper die
                log.exception("passivation sweep of shard host %d failed", self.index)


def _root_kind(error: BaseException) -> str:
    """The class name of the innermost cause of ``error`` (e.g. ``ConnectionRefusedError``)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return type(error).__name__


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

    def close(self) -> None:
        """Nothing to release (every actor of an app answers ``close()`` before it is
        stopped)."""
