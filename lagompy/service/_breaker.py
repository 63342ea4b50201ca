"""Circuit breakers for asyncio calls, on pybreaker's state machine.

A breaker guards calls to one dependency. While it is **closed** calls go through and
consecutive failures are counted; after ``max_failures`` of them it **opens**: calls fail at once
with :class:`~lagompy.errors.CircuitBreakerOpen`, without touching the dependency. After
``reset_timeout`` seconds it turns **half-open** and lets exactly one trial call through (the
other callers keep failing fast); the trial's success closes it, its failure opens it again::

    breaker = CircuitBreaker("users", max_failures=5, call_timeout=2.0)
    reply = await breaker.call(lambda: client.get("/users/42"))

pybreaker's ``CircuitBreaker`` holds the state, the counters and the listeners; this module
adds what asyncio needs and pybreaker lacks (its ``call_async`` needs Tornado):

* a **call timeout**: a call still running after ``call_timeout`` seconds is cancelled and
  counts as a failure (:class:`~lagompy.errors.ServiceCallTimeout`);
* **one trial call** in half-open, instead of letting every concurrent caller through;
* a **cancelled** call (``asyncio.CancelledError``: the caller went away) is re-raised and
  counted neither way;
* **excluded** exceptions (by default 4xx answers: the caller's fault, not the dependency's)
  are re-raised and ignored by the state machine: they neither count as failures nor, as a
  pybreaker success would, close a half-open breaker;
* the outcome of a call admitted before the breaker last changed state (a slow call of the
  closed breaker that ends after it opened) does not move the new state.

Settings (:class:`BreakerSettings`) come from keyword arguments, then the environment for
this breaker id (``LAGOMPY_BREAKER_<ID>_MAX_FAILURES``, id upper-cased with every other
character than letters and digits turned into ``_``), then the environment for all breakers
(``LAGOMPY_BREAKER_MAX_FAILURES``), then the defaults.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import pybreaker
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lagompy.errors import (
    CircuitBreakerOpen,
    InvalidSettings,
    ServiceCallFailed,
    ServiceCallTimeout,
)
from lagompy.settings import LagompySettings, make_settings

__all__ = [
    "BreakerRegistry",
    "BreakerSettings",
    "CircuitBreaker",
    "breaker_settings",
    "default_registry",
    "is_client_error",
]

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED  # "closed"
OPEN = pybreaker.STATE_OPEN  # "open"
HALF_OPEN = pybreaker.STATE_HALF_OPEN  # "half-open"

#: Latencies kept per breaker for its percentiles.
LATENCY_WINDOW = 1000
#: Seconds over which ``throughput_one_minute`` counts calls.
THROUGHPUT_WINDOW = 60

Exclusion = type[BaseException] | Callable[[BaseException], bool]

#: Called with the breaker and what happened: ``"success"``, ``"failure"``, ``"excluded"``,
#: ``"cancelled"``, ``"rejected"`` (failed fast) or ``"state"`` (the state changed).
BreakerListener = Callable[["CircuitBreaker", str], None]


class BreakerSettings(LagompySettings):
    """One circuit breaker's settings. Environment prefix ``LAGOMPY_BREAKER_`` for all breakers
    and ``LAGOMPY_BREAKER_<ID>_`` for the breaker ``<ID>`` (see :func:`breaker_settings`)."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_BREAKER_", frozen=True, extra="ignore")

    enabled: bool = Field(default=True, description="False lets every call through, uncounted.")
    max_failures: int = Field(
        default=10, ge=1, description="Consecutive failures that open a closed breaker."
    )
    call_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a call may take; a slower one is cancelled and fails.",
    )
    reset_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Seconds an open breaker waits before it lets one trial call.",
    )
    exclude_client_errors: bool = Field(
        default=True,
        description=(
            "Ignore 4xx answers (ServiceCallFailed with a status below 500): they neither count "
            "as failures nor close a half-open breaker."
        ),
    )

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variables that set ``field`` (``<ID>``: the breaker's id)."""
        return f"LAGOMPY_BREAKER_<ID>_{field.upper()} or LAGOMPY_BREAKER_{field.upper()}"


def env_id(breaker_id: str) -> str:
    """The breaker id as it appears in environment variable names."""
    return re.sub(r"[^A-Za-z0-9]", "_", breaker_id).upper()


def breaker_settings(breaker_id: str, **overrides: Any) -> BreakerSettings:
    """The settings of breaker ``breaker_id``: ``overrides``, else the environment for this
    breaker, else the environment for all breakers, else the defaults."""
    prefix = f"LAGOMPY_BREAKER_{env_id(breaker_id)}_"
    specific = {
        name: os.environ[prefix + name.upper()]
        for name in BreakerSettings.model_fields
        if prefix + name.upper() in os.environ
    }
    try:
        return BreakerSettings(**{**specific, **overrides})
    except InvalidSettings as e:
        named = str(e).replace("<ID>", env_id(breaker_id))
        raise InvalidSettings(f"circuit breaker {breaker_id!r}: {named}", fields=e.fields) from None


def is_client_error(exc: BaseException) -> bool:
    """True for a 4xx answer: the caller's fault, not a sign the callee is unhealthy."""
    return isinstance(exc, ServiceCallFailed) and 400 <= exc.status < 500


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.owner._state_changed(new_state.name)


class CircuitBreaker:
    """An asyncio circuit breaker named ``breaker_id``: closed, then open after
    ``max_failures`` consecutive failures (calls fail at once with ``CircuitBreakerOpen``),
    then half-open after ``reset_timeout`` seconds with one trial call; each call limited to
    ``call_timeout`` seconds (see docs/howto/circuit-breakers.md).

    Keyword arguments set :class:`BreakerSettings` fields (replacing those of ``settings``
    when it is given too, :func:`~lagompy.settings.make_settings`); ``exclude`` adds exception
    classes or predicates whose exceptions the breaker ignores (by default, with
    ``exclude_client_errors``, 4xx answers). ``clock`` (seconds, monotonic) is for tests."""

    def __init__(
        self,
        breaker_id: str,
        *,
        settings: BreakerSettings | None = None,
        exclude: Iterable[Exclusion] = (),
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> None:
        self.id = breaker_id
        if settings is None:
            settings = breaker_settings(breaker_id, **overrides)
        else:
            settings = make_settings(BreakerSettings, settings, **overrides)
        self.settings = settings
        self._clock = clock
        exclusions: list[Callable[[BaseException], bool]] = [_as_predicate(e) for e in exclude]
        if settings.exclude_client_errors:
            exclusions.append(is_client_error)
        self._machine = pybreaker.CircuitBreaker(
            fail_max=settings.max_failures,
            reset_timeout=settings.reset_timeout,
            exclude=exclusions,
            listeners=[_StateListener(self)],
            name=breaker_id,
            throw_new_error_on_trip=False,
        )
        self.listeners: list[BreakerListener] = []
        #: The state this breaker last changed to (as told to listeners).
        self.last_state = CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._seconds: deque[list[int]] = deque()  # [second, calls] for the last minute
        self.counters: dict[str, int] = {
            "calls": 0,
            "successes": 0,
            "failures": 0,
            "timeouts": 0,
            "excluded": 0,
            "cancelled": 0,
            "rejected": 0,
            "opened": 0,
        }

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (open turns half-open at the next call
        after ``reset_timeout``)."""
        return str(self._machine.current_state)

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted by the closed breaker."""
        return int(self._machine.fail_counter)

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 if it would now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def _state_changed(self, new_state: str) -> None:
        # pybreaker notifies before its storage holds the new state: remember it here.
        self.last_state = new_state
        self._generation += 1
        if new_state == OPEN:
            self._opened_at = self._clock()
            self.counters["opened"] += 1
        self._emit("state")

    def _emit(self, event: str) -> None:
        for listener in self.listeners:
            listener(self, event)

    def open(self) -> None:
        """Open the breaker now (e.g. from an admin route)."""
        self._machine.open()

    def close(self) -> None:
        """Close the breaker now and forget the failures counted."""
        self._machine.close()

    # ----------------------------------------------------------------- calls

    async def call(self, fn: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Await ``fn()`` under this breaker, within ``timeout`` (default: ``call_timeout``)
        seconds. Raises ``CircuitBreakerOpen`` without calling ``fn`` while the breaker is open
        (or half-open with its trial call in flight), ``ServiceCallTimeout`` when the call takes
        too long, and whatever ``fn`` raises."""
        if not self.settings.enabled:
            return await fn()
        generation, trial = self._admit()
        limit = self.settings.call_timeout if timeout is None else timeout
        started = self._clock()
        try:
            async with asyncio.timeout(limit) as deadline:
                result = await fn()
        except TimeoutError as e:
            if not deadline.expired():  # fn's own TimeoutError
                self._record(generation, trial, e, self._clock() - started)
                raise
            self.counters["timeouts"] += 1
            error = ServiceCallTimeout(
                f"call under circuit breaker {self.id!r} took longer than {limit} s",
                timeout=limit,
            )
            self._record(generation, trial, error, self._clock() - started)
            raise error from e
        except Exception as e:
            self._record(generation, trial, e, self._clock() - started)
            raise
        except BaseException:
            # Cancelled (or the process is stopping): the dependency did nothing wrong.
            self.counters["cancelled"] += 1
            if trial:
                self._trial_in_flight = False
            self._emit("cancelled")
            raise
        self._record(generation, trial, None, self._clock() - started)
        return result

    def _admit(self) -> tuple[int, bool]:
        """Let a call in or raise ``CircuitBreakerOpen``; returns (generation, is_trial)."""
        state = self.state
        if state == OPEN:
            wait = self.retry_after()
            if wait > 0:
                self.counters["rejected"] += 1
                self._emit("rejected")
                raise CircuitBreakerOpen(
                    f"circuit breaker {self.id!r} is open after {self.settings.max_failures} "
                    f"failures; next trial call in {wait:.1f} s",
                    breaker_id=self.id,
                    retry_after=wait,
                )
            self._machine.half_open()
            state = HALF_OPEN
        if state == HALF_OPEN:
            if self._trial_in_flight:
                self.counters["rejected"] += 1
                self._emit("rejected")
                raise CircuitBreakerOpen(
                    f"circuit breaker {self.id!r} is half-open and its trial call is in flight",
                    breaker_id=self.id,
                    retry_after=min(self.settings.call_timeout, self.settings.reset_timeout),
                )
            self._trial_in_flight = True
            return self._generation, True
        return self._generation, False

    def _record(
        self, generation: int, trial: bool, error: BaseException | None, latency: float
    ) -> None:
        if trial:
            self._trial_in_flight = False
        self.counters["calls"] += 1
        self._latencies.append(latency)
        self._count_second()
        if error is not None and not self._machine.is_system_error(error):
            self.counters["excluded"] += 1
            self._emit("excluded")
            return  # neither a failure nor a success
        self.counters["successes" if error is None else "failures"] += 1
        self._emit("success" if error is None else "failure")
        if generation != self._generation:
            return  # admitted before the last state change: its outcome is stale
        if error is None:
            self._machine.call(_nothing)
        else:
            try:
                self._machine.call(_raise, error)
            except BaseException:  # pybreaker re-raises the failure it was told about
                pass

    def _count_second(self) -> None:
        now = int(self._clock())
        seconds = self._seconds
        if seconds and seconds[-1][0] == now:
            seconds[-1][1] += 1
        else:
            seconds.append([now, 1])
        while seconds and seconds[0][0] <= now - THROUGHPUT_WINDOW:
            seconds.popleft()

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Id, state, counters, latency percentiles (seconds, over the last calls that were
        made) and one-minute throughput (calls per second)."""
        ordered = sorted(self._latencies)
        now = int(self._clock())
        recent = sum(n for second, n in self._seconds if second > now - THROUGHPUT_WINDOW)
        return {
            "id": self.id,
            "state": self.state,
            "failure_count": self.failure_count,
            "retry_after": round(self.retry_after(), 3),
            **self.counters,
            "latency": {
                "p50": _percentile(ordered, 0.50),
                "p98": _percentile(ordered, 0.98),
                "p99": _percentile(ordered, 0.99),
                "p99.9": _percentile(ordered, 0.999),
                "mean": sum(ordered) / len(ordered) if ordered else 0.0,
                "max": ordered[-1] if ordered else 0.0,
            },
            "throughput_one_minute": recent / THROUGHPUT_WINDOW,
        }

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.id!r}, state={self.state!r})"


def _nothing() -> None:
    return None


def _raise(error: BaseException) -> None:
    raise error


def _as_predicate(exclusion: Exclusion) -> Callable[[BaseException], bool]:
    # pybreaker tells classes from predicates by `type(x) is type`, which calls a class with a
    # metaclass as if it were a predicate: hand it predicates only.
    if isinstance(exclusion, type):
        cls = exclusion
        return lambda e: isinstance(e, cls)
    return exclusion


class BreakerRegistry:
    """The breakers of a process by id: ``get`` makes one on first use."""

    def __init__(self) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}
        self._listeners: list[BreakerListener] = []

    def get(self, breaker_id: str, **settings: Any) -> CircuitBreaker:
        """The breaker ``breaker_id``, made with ``settings`` if it does not exist yet."""
        breaker = self._breakers.get(breaker_id)
        if breaker is None:
            breaker = self.add(CircuitBreaker(breaker_id, **settings))
        return breaker

    def add(self, breaker: CircuitBreaker) -> CircuitBreaker:
        """Register ``breaker`` (replacing one with the same id); it gets the registry's
        listeners."""
        self._breakers[breaker.id] = breaker
        for listener in self._listeners:
            if listener not in breaker.listeners:
                breaker.listeners.append(listener)
        return breaker

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener`` on the events of every breaker, present and future (once)."""
        if listener not in self._listeners:
            self._listeners.append(listener)
        for breaker in self:
            if listener not in breaker.listeners:
                breaker.listeners.append(listener)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def status(self) -> list[dict[str, Any]]:
        """:meth:`CircuitBreaker.status` of every breaker, by id."""
        return [b.status() for b in sorted(self, key=lambda b: b.id)]


#: The process's breakers, unless a client is given another registry.
default_registry = BreakerRegistry()
