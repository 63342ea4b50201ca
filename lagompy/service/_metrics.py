"""Prometheus metrics of a lagompy service, served at ``/metrics``.

Two kinds of figures, so that a scrape is right whichever uvicorn worker answers it:

* **Per-process** figures (HTTP requests, asks made by routes and their latencies, circuit
  breaker calls and states) are prometheus_client counters, histograms and gauges updated as
  things happen. With several workers, ``lagompy run`` sets ``PROMETHEUS_MULTIPROC_DIR`` and
  prometheus_client's multiprocess mode adds up every worker's values at scrape time.
* **Shared** figures that live in other processes (the shard hosts' commands, journal write
  transactions and events, live entities; read-side lag) are pulled when ``/metrics`` is
  scraped, by the worker that answers it, so they are counted once.

Metric names start with ``lagompy_``. Breaker states are 0 (closed), 1 (half-open), 2 (open).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lagompy.service._breaker import CircuitBreaker

__all__ = [
    "ASKS",
    "ASK_SECONDS",
    "BREAKER_CALLS",
    "BREAKER_STATE",
    "CONTENT_TYPE_LATEST",
    "HTTP_REQUESTS",
    "REGISTRY",
    "Sample",
    "breaker_listener",
    "multiprocess_dir",
    "render",
]

#: The registry of lagompy's per-process metrics (not prometheus_client's global one).
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HTTP_REQUESTS = Counter(
    "lagompy_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
ASKS = Counter(
    "lagompy_asks",
    "Asks made by the service's routes, by entity type and outcome (ok, rejected, failed).",
    ["entity_type", "outcome"],
    registry=REGISTRY,
)
ASK_SECONDS = Histogram(
    "lagompy_ask_duration_seconds",
    "Time from ask to reply, for asks made by the service's routes.",
    ["entity_type"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
BREAKER_CALLS = Counter(
    "lagompy_circuit_breaker_calls",
    "Calls under each circuit breaker, by outcome (success, failure, excluded, cancelled, "
    "rejected = failed fast).",
    ["breaker", "outcome"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "lagompy_circuit_breaker_state",
    "State of each circuit breaker: 0 closed, 1 half-open, 2 open (per worker process).",
    ["breaker"],
    multiprocess_mode="liveall",
    registry=REGISTRY,
)

_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


def breaker_listener(breaker: CircuitBreaker, event: str) -> None:
    """A breaker listener that keeps the breaker metrics up to date."""
    if event == "state":
        BREAKER_STATE.labels(breaker.id).set(_STATE_VALUES.get(breaker.last_state, 0))
    else:
        BREAKER_CALLS.labels(breaker.id, event).inc()


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, if it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


#: A sample pulled at scrape time: (name, help, kind "counter" or "gauge", labels, value).
Sample = tuple[str, str, str, Mapping[str, str], float]

#: Host counters exported at scrape time: stats key -> (metric name, kind, help).
HOST_FIGURES: dict[str, tuple[str, str, str]] = {
    "commands": ("lagompy_host_commands", "counter", "Commands received by each shard host."),
    "write_transactions": (
        "lagompy_journal_write_transactions",
        "counter",
        "Journal write transactions committed by each shard host.",
    ),
    "events_persisted": (
        "lagompy_journal_events_written",
        "counter",
        "Events written to the journal by each shard host.",
    ),
    "batches": ("lagompy_host_batches", "counter", "Batches processed by each shard host."),
    "busy_seconds": (
        "lagompy_host_busy_seconds",
        "counter",
        "Seconds each shard host spent processing batches.",
    ),
    "activations": (
        "lagompy_entity_activations",
        "counter",
        "Entities brought into memory by each shard host (recovered, or new: presumed new and "
        "confirmed by their first write).",
    ),
    "new_entities": (
        "lagompy_entity_new",
        "counter",
        "Entities activated without a read: presumed new, and confirmed by their first write.",
    ),
    "new_refused": (
        "lagompy_entity_new_refused",
        "counter",
        "Entities presumed new whose first write found that they existed (then recovered).",
    ),
    "passivations": (
        "lagompy_entity_passivations",
        "counter",
        "Entities dropped from memory by each shard host.",
    ),
    "duplicates": (
        "lagompy_entity_duplicate_commands",
        "counter",
        "Commands answered with a stored reply (retries with the same command id).",
    ),
    "conflicts": (
        "lagompy_journal_conflicts",
        "counter",
        "Writes refused because another writer appended first.",
    ),
    "live_entities": ("lagompy_live_entities", "gauge", "Entities in memory on each shard host."),
}


def host_samples(hosts: Iterable[Mapping[str, Any]]) -> list[Sample]:
    """Samples of the shard hosts' stats (``ShardedEntities.host_stats()``, or the in-process
    runtime's stats with ``host="local"``)."""
    samples: list[Sample] = []
    for stats in hosts:
        labels = {"host": str(stats.get("index", "local"))}
        for key, (name, kind, help_text) in HOST_FIGURES.items():
            if key in stats:
                samples.append((name, help_text, kind, labels, float(stats[key])))
    return samples


class _Pulled(Collector):
    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, help_text, kind, labels, value in self.samples:
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(name, help_text, labels=sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


def render(pulled: Sequence[Sample] = ()) -> bytes:
    """The text exposition of every per-process metric (all workers' in multiprocess mode)
    plus the ``pulled`` samples."""
    directory = multiprocess_dir()
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(_Pulled(pulled))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter(self.source.collect())


def mark_process_dead(pid: int | None = None) -> None:
    """In multiprocess mode, drop a finished worker's live gauges (called at shutdown)."""
    directory = multiprocess_dir()
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), directory)  # type: ignore[no-untyped-call]
