"""The journal's values: an entity's events to write (:class:`AtomicWrite`), what became of
them (:class:`WriteResult`) and a persisted event with its coordinates (:class:`EventEnvelope`).

Shared by the :class:`~lagompy.journal.Journal` front and its backends (``_backend.py``); users
import them from :mod:`lagompy.journal` (or :mod:`lagompy`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Generic, TypeVar

from lagompy.errors import LagompyError
from lagompy.journal._slices import slice_of

E = TypeVar("E")


def now_us() -> int:
    return time.time_ns() // 1000


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


#: The last (microseconds, datetime) :func:`_timestamp` made: the writes of a batch share their
#: time of writing, so their envelopes share one datetime (~0.4 us each otherwise).
_last_timestamp: tuple[int, datetime | None] = (-1, None)


def _timestamp(us: int) -> datetime:
    """``from_us(us)``, made once for a run of equal ``us``."""
    global _last_timestamp
    last_us, last = _last_timestamp
    if last_us == us and last is not None:
        return last
    made = from_us(us)
    _last_timestamp = (us, made)
    return made


@dataclass(frozen=True)
class EventEnvelope(Generic[E]):
    """A persisted event with its coordinates in the journal."""

    entity_type: str
    entity_id: str
    seq_nr: int
    offset: int
    timestamp: datetime
    event: E
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slice(self) -> int:
        """The entity's slice (:func:`~lagompy.journal.slice_of`), stored with the event."""
        return slice_of(self.entity_id)


@dataclass(frozen=True)
class AtomicWrite:
    """Events for one entity, written all or none.

    ``expected_seq_nr`` is the highest sequence number the writer has seen (0 for a new entity);
    the events get ``expected_seq_nr + 1``, ``+ 2``, ... ``tags`` holds one tuple of tags per
    event (or is empty for untagged events).

    ``replies`` holds ``(command_id, seq_nr, encoded reply)`` for the commands whose events these
    are: each is stored in the same transaction as the events, under ``(entity_type, entity_id,
    command_id)``, until the events up to ``seq_nr`` (the highest sequence number of that
    command's events) are deleted. See :meth:`~lagompy.journal.Journal.stored_replies`.
    """

    entity_type: str
    entity_id: str
    expected_seq_nr: int
    events: Sequence[Any]
    tags: Sequence[Sequence[str]] = ()
    metadata: Mapping[str, Any] | None = None
    replies: Sequence[tuple[str, int, bytes]] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity_type, self.entity_id)


@dataclass(frozen=True)
class WriteResult:
    """What happened to one :class:`AtomicWrite` of a batch: the offsets its events got, or the
    error that stopped it (``ConcurrencyConflict``, ``EncodeError``, ``WriteRefused``...)."""

    write: AtomicWrite
    offsets: tuple[int, ...] = ()
    written_at_us: int = 0
    error: LagompyError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @cached_property
    def envelopes(self) -> tuple[EventEnvelope[Any], ...]:
        """The persisted events with their coordinates (built on first access)."""
        if self.error is not None:
            return ()
        w = self.write
        timestamp = _timestamp(self.written_at_us)
        metadata = dict(w.metadata or {})
        entity_type, entity_id, first = w.entity_type, w.entity_id, w.expected_seq_nr + 1
        events, offsets = w.events, self.offsets
        if len(events) != len(offsets):
            raise ValueError(f"{len(events)} events but {len(offsets)} offsets")
        envelopes: list[EventEnvelope[Any]] = []
        for n, offset in enumerate(offsets):
            # EventEnvelope's fields straight into its __dict__, as its generated __init__
            # would store them, without its eight object.__setattr__ calls (see
            # ``write_result`` below), and one datetime for the batch: a one-event write's
            # result and envelope, 4.3-4.6 -> 1.8 us (2026-12-06, CPU reference 12-15 ms); a
            # bench writer that unwraps every result spent ~20% of its CPU here before.
            envelope: EventEnvelope[Any] = _new(EventEnvelope)
            d = envelope.__dict__
            d["entity_type"] = entity_type
            d["entity_id"] = entity_id
            d["seq_nr"] = first + n
            d["offset"] = offset
            d["timestamp"] = timestamp
            d["event"] = events[n]
            d["tags"] = event_tags(w, n)
            d["metadata"] = metadata
            envelopes.append(envelope)
        return tuple(envelopes)

    def unwrap(self) -> tuple[EventEnvelope[Any], ...]:
        if self.error is not None:
            raise self.error
        return self.envelopes


#: The two values below are made once or twice per command by a shard host. A frozen
#: dataclass's ``__init__`` sets each field through ``object.__setattr__``: measured
#: 2026-12-05 (CPU reference 21-28 ms, a loaded machine), an ``AtomicWrite`` of six keyword
#: arguments took 5.2 us and a ``WriteResult`` 3.1 us, against 1.1 and 1.0 us when the fields
#: go straight into the instance's ``__dict__``, as below. The result is the same value (same
#: fields, ``==``, ``repr``, ``dataclasses.replace``): ``tests/test_processing.py`` checks it
#: against the constructors.
_new = object.__new__


def atomic_write(
    entity_type: str,
    entity_id: str,
    expected_seq_nr: int,
    events: Sequence[Any],
    tags: Sequence[Sequence[str]],
    replies: Sequence[tuple[str, int, bytes]],
) -> AtomicWrite:
    """``AtomicWrite(entity_type, entity_id, expected_seq_nr, events, tags, None, replies)``,
    built without the frozen ``__init__`` (the shard host's hot path; see above)."""
    w: AtomicWrite = _new(AtomicWrite)
    w.__dict__.update(
        entity_type=entity_type,
        entity_id=entity_id,
        expected_seq_nr=expected_seq_nr,
        events=events,
        tags=tags,
        metadata=None,
        replies=replies,
    )
    return w


def write_result(write: AtomicWrite, offsets: tuple[int, ...], written_at_us: int) -> WriteResult:
    """``WriteResult(write, offsets, written_at_us)`` (a committed write), built without the
    frozen ``__init__`` (the journal's hot path; see above)."""
    r: WriteResult = _new(WriteResult)
    r.__dict__.update(write=write, offsets=offsets, written_at_us=written_at_us, error=None)
    return r


def event_tags(w: AtomicWrite, n: int) -> tuple[str, ...]:
    """The tags of the write's n-th event, each once, in the order given."""
    if not w.tags:
        return ()
    tags = tuple(w.tags[n])
    if len(tags) < 2 or len(set(tags)) == len(tags):
        return tags
    return tuple(dict.fromkeys(tags))
