"""Slices: every event belongs to one of :data:`SLICES` slices, derived from its entity.

An entity's slice is ``stable_hash(entity_id) % SLICES`` (CRC-32 of the id, the hash that places
entities on the runtime's logical shards and on the shards of a sharded tag), stored with each of
its events (the ``slice`` column, migration 0013). The count is fixed for every journal, so a
slice never changes and a position can be kept per slice or per slice range.

What the slices line up with, because they share the hash:

* the runtime's logical shards: with ``shards`` dividing :data:`SLICES` (the default, 256,
  does), shard ``k`` holds exactly the slices ``s`` with ``s % shards == k``, so a shard host's
  batch touches only slices that no other host writes;
* a sharded tag's shards, in the same way: ``sharded_tag(name, 4)``'s shard ``i`` is the events
  of the slices ``s % 4 == i``.

Order: the journal orders events by offset, and every event of a slice (and of an entity) keeps
that order; a reader of a slice range sees its events in offset order and never skips one that
commits late (the journal's ordering fence). Nothing more is promised across slices than across
entities.
"""

from __future__ import annotations

from dataclasses import dataclass

from lagompy.entity import stable_hash
from lagompy.errors import ConfigurationError

#: How many slices every journal has. Fixed: it is part of the stored data.
SLICES = 1024


def slice_of(entity_id: str) -> int:
    """The slice of an entity: ``stable_hash(entity_id) % SLICES``."""
    return stable_hash(entity_id) % SLICES


@dataclass(frozen=True)
class SliceRange:
    """The slices ``first`` to ``last``, both included (``SliceRange(0, SLICES - 1)``: all)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < SLICES:
                raise ConfigurationError(
                    f"a slice range's {name} must be an int from 0 to {SLICES - 1}, got {value!r}"
                )
        if self.first > self.last:
            raise ConfigurationError(
                f"a slice range's first slice ({self.first}) is after its last ({self.last})"
            )

    def __contains__(self, slice_: object) -> bool:
        return type(slice_) is int and self.first <= slice_ <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def slice_ranges(count: int) -> tuple[SliceRange, ...]:
    """All slices cut into ``count`` contiguous ranges of equal size (the first ones one slice
    larger when ``count`` does not divide :data:`SLICES`): how ``count`` readers or databases
    share the journal."""
    if type(count) is not int or not 1 <= count <= SLICES:
        raise ConfigurationError(f"slice ranges: count must be an int from 1 to {SLICES}")
    size, extra = divmod(SLICES, count)
    ranges = []
    first = 0
    for i in range(count):
        last = first + size + (1 if i < extra else 0) - 1
        ranges.append(SliceRange(first, last))
        first = last + 1
    return tuple(ranges)
