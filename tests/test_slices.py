"""Slices: every event's slice, derived from its entity, stored with it, and reads by slice range.

The slice lines up with the runtime's logical shards and a sharded tag's shards (one hash);
``Journal.read_slices`` reads the events of a slice range in offset order, on both backends.
The ordering guarantee under concurrent slowed commits is in test_ordering.py (``slices``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from lagompy import AtomicWrite, JournalSettings, open_storage, sharded_tag
from lagompy.errors import ConfigurationError
from lagompy.journal import SLICES, SliceRange, Storage, slice_of, slice_ranges
from lagompy.runtime._sharding import DEFAULT_SHARDS, shard_of
from lagompy.sql import _schema as schema


@dataclass(frozen=True)
class Noted:
    n: int


IDS = [f"item-{n}" for n in range(300)] + ["ünïcode-id", "日本", "a b/c"]


@pytest.fixture
async def storage(journal_settings: JournalSettings) -> AsyncIterator[Storage]:
    s = await open_storage(settings=journal_settings)
    s.serializer.register(Noted)
    try:
        yield s
    finally:
        await s.close()


def test_the_slice_is_crc32_of_the_id_modulo_1024() -> None:
    assert SLICES == 1024
    for entity_id in IDS:
        assert slice_of(entity_id) == zlib.crc32(entity_id.encode()) % 1024
    assert slice_of("user-42") == 115  # a fixed value: a change of hash would move data


def test_slices_line_up_with_runtime_shards_and_tag_shards() -> None:
    for entity_id in IDS:
        assert slice_of(entity_id) % DEFAULT_SHARDS == shard_of(entity_id, DEFAULT_SHARDS)
        for shards in (1, 2, 4, 8, 16):
            tag = sharded_tag("t", shards)
            assert slice_of(entity_id) % shards == tag.shard_of(entity_id)


def test_slice_ranges_cover_every_slice_once() -> None:
    for count in (1, 2, 3, 4, 7, 1024):
        ranges = slice_ranges(count)
        assert len(ranges) == count
        covered = [s for r in ranges for s in range(r.first, r.last + 1)]
        assert covered == list(range(SLICES))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert slice_ranges(4)[1] == SliceRange(256, 511)
    assert str(SliceRange(256, 511)) == "256-511"
    assert 300 in SliceRange(256, 511) and 512 not in SliceRange(256, 511)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 3), "first must be an int from 0 to 1023, got -1"),
        ((0, 1024), "last must be an int from 0 to 1023, got 1024"),
        ((5, 4), r"first slice \(5\) is after its last \(4\)"),
        (("0", 4), "first must be an int from 0 to 1023, got '0'"),
    ],
)
def test_a_bad_slice_range_names_what_is_wrong(args: tuple[object, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SliceRange(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, 1025, 2.0])
def test_a_bad_range_count_is_refused(count: object) -> None:
    with pytest.raises(ConfigurationError, match="count must be an int from 1 to 1024"):
        slice_ranges(count)  # type: ignore[arg-type]


async def _write(storage: Storage, ids: list[str], seq: int = 0) -> None:
    writes = [AtomicWrite("thing", i, seq, [Noted(seq + 1), Noted(seq + 2)]) for i in ids]
    for result in await storage.journal.append(writes):
        assert result.ok, result.error


async def test_every_event_row_stores_its_entity_slice(storage: Storage) -> None:
    # Small batches (one statement) and large ones (COPY on PostgreSQL) alike.
    await _write(storage, IDS[:3])
    await _write(storage, IDS[3:])
    e = schema.events
    async with storage.database.read() as conn:
        rows = (await conn.execute(select(e.c.entity_id, e.c.slice))).all()
    assert len(rows) == 2 * len(IDS)
    assert {(i, s) for i, s in rows} == {(i, slice_of(i)) for i in IDS}


async def test_read_slices_reads_a_range_in_offset_order(storage: Storage) -> None:
    await _write(storage, IDS)
    await _write(storage, IDS[::2], seq=2)
    everything = await storage.journal.all_events(limit=10_000)
    seen: list[int] = []
    for r in slice_ranges(4):
        page = await storage.journal.read_slices(r, limit=10_000)
        expected = [e for e in everything if e.slice in r]
        assert page.envelopes == expected
        assert not page.full
        seen += [e.offset for e in page.envelopes]
        assert all(e.slice == slice_of(e.entity_id) for e in page.envelopes)
    assert sorted(seen) == [e.offset for e in everything]
    whole = await storage.journal.read_slices(SliceRange(0, SLICES - 1), limit=10_000)
    assert whole.envelopes == everything


async def test_read_slices_pages_after_an_offset(storage: Storage) -> None:
    await _write(storage, IDS)
    r = slice_ranges(2)[1]
    expected = [e for e in await storage.journal.all_events(limit=10_000) if e.slice in r]
    got = []
    after = 0
    while True:
        page = await storage.journal.read_slices(r, after_offset=after, limit=25)
        got += page.envelopes
        if not page.full:
            break
        after = page.last_offset
    assert got == expected
    assert (await storage.journal.read_slices(r, after_offset=expected[-1].offset)).envelopes == []


async def test_read_slices_takes_a_slice_range(storage: Storage) -> None:
    with pytest.raises(TypeError, match="read_slices takes a SliceRange, got tuple"):
        await storage.journal.read_slices((0, 3))  # type: ignore[arg-type]
