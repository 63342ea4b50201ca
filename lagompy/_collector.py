"""The garbage collector of the processes lagompy runs: :func:`tune_collector`.

Python's cyclic collector runs its young generation every 700 net allocations of container
objects, and a full collection walks the whole heap whenever enough objects have survived
into the oldest generation. lagompy's hot paths allocate many short-lived containers: a
command's effect, decision, result and event in a shard host; a page of events' envelopes and
messages in a read side or a subscriber. None of them forms a cycle (reference counting frees
them), yet with the defaults the collector walked them over and over:

* a shard host, a batch of 500 commands on 500 live entities: 15-25% of the processing time;
* a new subscriber group catching up over 100,000 events (SQLite, same database, 2026-12-06):
  206 collections in 2.8 s, ~550 ms of it, two of them full (~210 ms); tuned: none, 1.8 s.

:func:`tune_collector` is what those processes do once they have started: freeze what exists
(``gc.freeze``: the modules, classes and settings of the start-up are never walked again) and
collect the young generation every :data:`GC_THRESHOLD` net allocations. Cycles are still
collected, just less often (a few MB of cyclic garbage at most wait for it); objects made after
the freeze are collected as before.

Who calls it: every shard host once its journal is open; read-side workers and subscriber groups
on Ray when their actor starts; ``lagompy run`` once the app has started, unless ``--collector
default`` (``LAGOMPY_RUN_COLLECTOR=default``); and, through :func:`tune_collector_once`, the
process that calls ``start()``, once the app has started, unless
``RuntimeSettings(collector="default")`` (``LAGOMPY_RUNTIME_COLLECTOR=default``), and any
process that opens the journal (``open_storage``, ``open_placed_storage``: a program of your
own, or a consumer such as ``start_readside`` that opens it there), once it is open, unless
``JournalSettings(collector="default")`` (``LAGOMPY_JOURNAL_COLLECTOR=default``).

``start()`` runs the region client (on Ray: a future and a task's wake-up per ask, beside Ray's
large heap) or the entities themselves (``ray=False``): with Python's defaults, at 1,024
outstanding asks on PostgreSQL, the collector took 25-36% of its CPU on Ray and about half of
it in process, tuned none (2026-12-06: docs/runtime.md, "How batching works"). A program that
appends to the journal from 4 or 8 concurrent writers with Python's defaults reached 0.63-0.64
of raw executemany on PostgreSQL, in full collections of its start-up objects (docs/journal.md,
"The process's collector").

An owner that opts its process out passes the choice down to what it opens there: ``start()``
with ``collector="default"`` opens its journal (``ray=False``) with ``collector="default"``;
a :class:`~lagompy.service.Service` with ``ServiceSettings(collector="default")``
(``LAGOMPY_HTTP_COLLECTOR=default``) starts its entities and gives its components journal
settings with ``collector="default"``; ``lagompy run --collector default`` sets those three
environment variables (those not set) before it loads the app.
"""

from __future__ import annotations

import gc
from typing import Literal

__all__ = [
    "GC_THRESHOLD",
    "CollectorPolicy",
    "collector_state",
    "tune_collector",
    "tune_collector_once",
]

#: The ``collector`` setting of the runtime, the journal and a service: ``"tuned"`` (the
#: default: :func:`tune_collector_once` once started or open) or ``"default"`` (Python's).
CollectorPolicy = Literal["tuned", "default"]

#: The young generation's collection threshold of a tuned process (Python's default: 700).
GC_THRESHOLD = 50_000


def tune_collector() -> None:
    """Freeze the objects that exist now out of the cyclic collector's way and collect the
    young generation every :data:`GC_THRESHOLD` net allocations (see the module's docstring).
    Calling it again freezes what was made since; a higher threshold already set is kept."""
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], GC_THRESHOLD), *threshold[1:])


def tune_collector_once() -> bool:
    """:func:`tune_collector`, unless this process's collector is off or already collects its
    young generation at :data:`GC_THRESHOLD` or less often (tuned before, here or by the
    application: then it is left as it is, nothing more is frozen). Returns whether it tuned.
    For library code that runs in the application's process, where calling it at every start
    would freeze, each time, whatever cyclic garbage had not been collected yet."""
    if not gc.isenabled() or gc.get_threshold()[0] >= GC_THRESHOLD:
        return False
    tune_collector()
    return True


def collector_state() -> dict[str, int]:
    """This process's collector, for the actors' ``ping()``: its young generation's threshold
    and how many objects are frozen."""
    return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
