"""Contract test suites every journal and snapshot-store backend must pass.

They are plain pytest classes without the ``Test`` prefix, so pytest does not collect them
itself. Subclass one under a ``Test...`` name and provide the ``storage`` fixture: a **fresh,
empty** :class:`~lagompy.journal.Storage` opened with :func:`contract_serializer` (the suites
write their own small event and state types, defined in this module)::

    import pytest
    import pytest_asyncio

    from lagompy import open_storage
    from lagompy.testkit import JournalContract, SnapshotStoreContract, contract_serializer


    class TestMyBackend(JournalContract, SnapshotStoreContract):
        @pytest_asyncio.fixture
        async def storage(self, tmp_path):
            url = f"sqlite:///{tmp_path}/journal.db"
            async with open_storage(url, serializer=contract_serializer()) as storage:
                yield storage

        @pytest.fixture
        def reopen(self, tmp_path):        # optional: a second storage on the same database
            url = f"sqlite:///{tmp_path}/journal.db"
            return lambda serializer: open_storage(url, serializer=serializer)

The optional ``reopen`` fixture returns an async callable ``reopen(serializer) -> Storage``
that opens *another* storage on the same database as ``storage``, with the given serializer;
the suites close what it returns. Cases that read with a different serializer (an event or a
snapshot that cannot be decoded) or through a second connection pool need it; without it they
are skipped, with the reason.

The test methods are coroutines marked ``pytest.mark.asyncio``, so the suites run under
pytest-asyncio in ``strict`` mode as well as in ``auto`` mode; in strict mode, declare your
async ``storage`` fixture with ``pytest_asyncio.fixture``. This module needs pytest and
pytest-asyncio; ``lagompy.testkit`` imports it only when one of its names is used.

The suites follow the eventsourcing library's recorder test cases and Lagom's
``AbstractReadSideSpec``: each case is one behaviour, named after it, that a backend must have
for entities to recover correctly and for read sides to see every event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from lagompy.errors import (
    ConcurrencyConflict,
    DuplicateCommandId,
    EventDecodeError,
    LagompyError,
    SerializationError,
    WriteRefused,
)
from lagompy.journal._journal import AtomicWrite, EventEnvelope, WriteResult
from lagompy.journal._slices import SLICES, SliceRange, slice_of, slice_ranges
from lagompy.journal._snapshots import Snapshot, SnapshotToSave
from lagompy.journal._storage import Storage
from lagompy.serialization import Serializer, serializable

__all__ = [
    "CONTRACT_TYPES",
    "ENTITY_TYPE",
    "OTHER_ENTITY_TYPE",
    "Happened",
    "JournalContract",
    "NoThing",
    "NotSerializable",
    "Noted",
    "SnapshotStoreContract",
    "StorageContract",
    "StorageOpener",
    "Thing",
    "contract_serializer",
]

#: The entity type the suites write under.
ENTITY_TYPE = "lagompy-contract"
#: A second entity type, to check that streams are keyed by type *and* id.
OTHER_ENTITY_TYPE = "lagompy-contract-other"

#: Opens another storage on the same database as the ``storage`` fixture, with this serializer.
StorageOpener = Callable[[Serializer], Awaitable[Storage]]

#: How far a backend's clock (a database server's, say) may be from this process's clock.
CLOCK_LEEWAY = timedelta(seconds=2)


# --------------------------------------------------------------------------- contract types


@serializable("lagompy.contract.Happened")
@dataclass(frozen=True)
class Happened:
    """The suites' main event: the ``n``-th thing that happened to an entity."""

    entity_id: str
    n: int
    note: str = ""


@serializable("lagompy.contract.Noted")
@dataclass(frozen=True)
class Noted:
    """A second event type, so streams mix types."""

    text: str


@serializable("lagompy.contract.NotSerializable")
@dataclass(frozen=True)
class NotSerializable:
    """Deliberately left out of :func:`contract_serializer`: it cannot be encoded."""

    x: int


@serializable("lagompy.contract.NoThing")
@dataclass(frozen=True)
class NoThing:
    """A state: nothing there yet."""


@serializable("lagompy.contract.Thing")
@dataclass(frozen=True)
class Thing:
    """A state, with room for a large payload (``blob``)."""

    label: str
    count: int = 0
    items: tuple[str, ...] = ()
    blob: bytes = b""


#: The types :func:`contract_serializer` registers.
CONTRACT_TYPES: tuple[type, ...] = (Happened, Noted, NoThing, Thing)


def contract_serializer() -> Serializer:
    """A new serializer that knows the suites' event and state types (:data:`CONTRACT_TYPES`)."""
    return Serializer(CONTRACT_TYPES)


# --------------------------------------------------------------------------- helpers


def _write(
    entity_id: str,
    expected: int,
    *events: Any,
    tags: Sequence[str] = (),
    metadata: dict[str, Any] | None = None,
    entity_type: str = ENTITY_TYPE,
) -> AtomicWrite:
    """One entity's write; every event gets ``tags``."""
    return AtomicWrite(
        entity_type,
        entity_id,
        expected,
        list(events),
        [tuple(tags)] * len(events) if tags else [],
        metadata,
    )


def _happened(entity_id: str, first: int, count: int) -> list[Happened]:
    return [Happened(entity_id, n) for n in range(first, first + count)]


def _seqs(envelopes: Sequence[EventEnvelope[Any]]) -> list[int]:
    return [e.seq_nr for e in envelopes]


def _offsets(envelopes: Sequence[EventEnvelope[Any]]) -> list[int]:
    return [e.offset for e in envelopes]


def _ids(envelopes: Sequence[EventEnvelope[Any]]) -> list[str]:
    return [e.entity_id for e in envelopes]


def _strictly_increasing(values: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _ok(results: Sequence[WriteResult]) -> list[EventEnvelope[Any]]:
    """The envelopes of a batch whose writes must all have succeeded."""
    envelopes: list[EventEnvelope[Any]] = []
    for r in results:
        assert r.error is None, f"write for {r.write.entity_id} failed: {r.error!r}"
        envelopes.extend(r.envelopes)
    return envelopes


async def _wait_for_the_clock() -> None:
    """Sleep long enough that the next write gets a later timestamp (microsecond clocks)."""
    await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the suites


class StorageContract:
    """The fixtures the suites need; subclass :class:`JournalContract` and/or
    :class:`SnapshotStoreContract` rather than this class."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def storage(self, *args: Any, **kwargs: Any) -> AsyncIterator[Storage]:
        """Override: a fresh, empty storage opened with :func:`contract_serializer`."""
        pytest.fail(
            f"{type(self).__name__} must provide the `storage` fixture: a fresh, empty "
            "lagompy.journal.Storage opened with lagompy.testkit.contract_serializer()",
            pytrace=False,
        )
        yield  # pragma: no cover - a generator fixture, like the overrides

    @pytest.fixture
    def reopen(self, *args: Any, **kwargs: Any) -> StorageOpener:
        """Override (optional): open another storage on the same database as ``storage``."""
        pytest.skip(
            f"{type(self).__name__} does not provide the `reopen` fixture (a second storage "
            "on the same database with another serializer), which this case needs"
        )

    @staticmethod
    @contextlib.asynccontextmanager
    async def opened(reopen: StorageOpener, serializer: Serializer) -> AsyncIterator[Storage]:
        """``async with self.opened(reopen, serializer) as other:`` -- closed on exit."""
        other = await reopen(serializer)
        try:
            yield other
        finally:
            await other.close()


class JournalContract(StorageContract):
    """What every :class:`~lagompy.journal.Journal` backend must do.

    Invariants covered: per-entity sequence numbers are gap-free and unique, a stale writer is
    rejected alone and never merged, a batch is atomic per entity, offsets are unique and only
    grow (never reused, even after deletes), tags match exactly, and bad input gets a clear
    error and leaves nothing behind.
    """

    # ------------------------------------------------------------ appending

    async def test_append_writes_all_events_of_a_write_with_contiguous_seq_nrs(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        events = [Happened("a", 1), Noted("second"), Happened("a", 3, "third")]
        envelopes = await j.append_one(_write("a", 0, *events, tags=("t",)))
        assert _seqs(envelopes) == [1, 2, 3]
        assert [e.event for e in envelopes] == events
        assert _strictly_increasing(_offsets(envelopes))
        assert all((e.entity_type, e.entity_id) == (ENTITY_TYPE, "a") for e in envelopes)
        assert await j.events(ENTITY_TYPE, "a") == list(envelopes)
        assert await j.highest_seq_nr(ENTITY_TYPE, "a") == 3
        more = await j.append_one(_write("a", 3, Happened("a", 4)))
        assert _seqs(more) == [4]
        assert more[0].offset > envelopes[-1].offset

    async def test_a_large_batch_for_many_entities_round_trips(self, storage: Storage) -> None:
        # Large batches may take another path (PostgreSQL switches to COPY): same results.
        j = storage.journal
        await j.append_one(_write("e7", 0, Happened("e7", 1)))
        writes = [
            _write(f"e{n}", 1 if n == 7 else 0, *_happened(f"e{n}", 1, 3), tags=("big", "t"))
            for n in range(150)
        ]
        results = await j.append(writes)
        assert [r.ok for r in results] == [True] * 150
        envelopes = [e for r in results for e in r.envelopes]
        assert _strictly_increasing(_offsets(envelopes))
        assert len(envelopes) == 450
        assert await j.events(ENTITY_TYPE, "e7") == [
            *(await j.events(ENTITY_TYPE, "e7", to_seq_nr=1)),
            *results[7].envelopes,
        ]
        assert _seqs(results[7].envelopes) == [2, 3, 4]
        assert await j.events_by_tag("big", limit=1000) == envelopes
        assert len(await j.events_by_tag("t", limit=1000)) == 450

    async def test_a_write_with_an_unencodable_event_fails_alone_and_leaves_nothing_behind(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        bad = _write("bad", 0, Happened("bad", 1), NotSerializable(2), Noted("3"), tags=("t",))
        good = _write("good", 0, Happened("good", 1), tags=("t",))
        results = await j.append([bad, good])
        assert isinstance(results[0].error, SerializationError)
        assert results[1].ok and _seqs(results[1].envelopes) == [1]
        # Not even the encodable events before and after the bad one were written.
        assert await j.events(ENTITY_TYPE, "bad") == []
        assert await j.highest_seq_nr(ENTITY_TYPE, "bad") == 0
        assert _ids(await j.events_by_tag("t")) == ["good"]
        assert _ids(await j.all_events()) == ["good"]
        # The entity is unharmed: a correct write still starts at 1.
        assert _seqs(await j.append_one(_write("bad", 0, Happened("bad", 1)))) == [1]

    async def test_a_failed_write_has_its_error_and_no_envelopes(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("taken", 0, Happened("taken", 1)))
        conflict, unencodable = await j.append(
            [_write("taken", 0, Happened("taken", 1)), _write("bad", 0, NotSerializable(1))]
        )
        assert isinstance(conflict.error, ConcurrencyConflict) and not conflict.ok
        assert isinstance(unencodable.error, SerializationError) and not unencodable.ok
        for failed in (conflict, unencodable):
            assert failed.envelopes == ()
            with pytest.raises(LagompyError) as info:
                failed.unwrap()
            assert info.value is failed.error

    async def test_a_write_with_unencodable_metadata_fails_alone(self, storage: Storage) -> None:
        j = storage.journal
        bad = _write("bad", 0, Happened("bad", 1), metadata={"ids": {1, 2}})  # a set
        good = _write("good", 0, Happened("good", 1))
        results = await j.append([bad, good])
        assert isinstance(results[0].error, SerializationError), results[0]
        assert results[1].ok
        assert await j.highest_seq_nr(ENTITY_TYPE, "bad") == 0
        assert await j.highest_seq_nr(ENTITY_TYPE, "good") == 1

    async def test_an_empty_write_succeeds_and_writes_nothing(self, storage: Storage) -> None:
        j = storage.journal
        (result,) = await j.append([_write("e", 0)])
        assert result.ok and result.envelopes == ()
        assert await j.highest_seq_nr(ENTITY_TYPE, "e") == 0
        assert await j.all_events() == []

    async def test_a_stale_writer_in_a_mixed_batch_gets_its_own_conflict(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append_one(_write("stale", 0, Happened("stale", 1), Happened("stale", 2)))
        writes = [
            _write("new1", 0, Happened("new1", 1), Noted("x")),
            _write("stale", 1, Happened("stale", 2, "zombie")),  # the journal is at 2
            _write("new2", 0, Happened("new2", 1)),
            _write("ahead", 3, Happened("ahead", 4)),  # ahead of the journal (at 0)
        ]
        results = await j.append(writes)
        assert [r.write for r in results] == writes  # one result per write, in input order
        assert [r.ok for r in results] == [True, False, True, False]
        stale = results[1].error
        assert isinstance(stale, ConcurrencyConflict)
        assert (stale.entity_type, stale.entity_id) == (ENTITY_TYPE, "stale")
        assert (stale.expected_seq_nr, stale.actual_seq_nr) == (1, 2)
        assert "stale" in str(stale)
        ahead = results[3].error
        assert isinstance(ahead, ConcurrencyConflict)
        assert (ahead.entity_id, ahead.expected_seq_nr, ahead.actual_seq_nr) == ("ahead", 3, 0)
        with pytest.raises(ConcurrencyConflict):
            results[1].unwrap()
        # The conflicting writes changed nothing; the others committed.
        assert [e.event for e in await j.events(ENTITY_TYPE, "stale")] == [
            Happened("stale", 1),
            Happened("stale", 2),
        ]
        assert await j.events(ENTITY_TYPE, "ahead") == []
        assert await j.highest_seq_nr(ENTITY_TYPE, "new1") == 2
        assert await j.highest_seq_nr(ENTITY_TYPE, "new2") == 1
        # append_one raises the write's own error.
        with pytest.raises(ConcurrencyConflict):
            await j.append_one(_write("stale", 0, Happened("stale", 1)))

    async def test_every_kind_of_conflict_fails_alone_in_a_large_batch(
        self, storage: Storage
    ) -> None:
        # Large batches may check differently (PostgreSQL looks up each write's expected event
        # and leaves a stale writer to the (entity, seq_nr) key, then checks in full on a
        # retry): the same writes must fail, with the journal's real highest number.
        j = storage.journal
        await j.append_one(_write("stale", 0, *_happened("stale", 1, 2)))
        await j.append_one(_write("trimmed", 0, *_happened("trimmed", 1, 3)))
        await j.delete_events(ENTITY_TYPE, "trimmed", 3)  # no events left, highest still 3
        await j.append_one(_write("gone", 0, *_happened("gone", 1, 2)))
        await j.delete_events(ENTITY_TYPE, "gone", 2)
        await j.append_one(_write("half", 0, *_happened("half", 1, 4)))
        await j.delete_events(ENTITY_TYPE, "half", 2)
        # entity -> (expected, actual), per batch: each of these must fail with a
        # ConcurrencyConflict. A stale writer whose next event is stored has a batch of its
        # own: it sends PostgreSQL to the full check, which would hide the others' cases.
        conflicts = [
            {
                "ahead": (3, 0),  # ahead of an entity that has no events
                "gone": (0, 2),  # a new entity expected, but its events were deleted
                "half": (1, 4),  # behind, and its expected event was deleted
            },
            {"stale": (1, 2)},  # behind the journal
            {"gone": (1, 2)},  # behind, every event deleted
        ]
        for round_, odd in enumerate(conflicts):
            writes = [
                _write(f"f{round_}-{n}", 0, *_happened("f", 1, 2), tags=("big",)) for n in range(40)
            ]
            for entity, (expected, _) in odd.items():
                writes.insert(20, _write(entity, expected, Happened(entity, 99)))
            if round_ == 0:
                writes.append(_write("trimmed", 3, Happened("trimmed", 4), tags=("big",)))
                writes.append(_write("half-new", 0, Happened("half-new", 1), tags=("big",)))
            results = await j.append(writes)
            failed = {
                r.write.entity_id: (r.error.expected_seq_nr, r.error.actual_seq_nr)
                for r in results
                if isinstance(r.error, ConcurrencyConflict)
            }
            assert failed == odd
            assert all(r.ok for r in results if r.write.entity_id not in odd)
        assert _seqs(await j.events(ENTITY_TYPE, "trimmed")) == [4]
        assert _seqs(await j.events(ENTITY_TYPE, "half-new")) == [1]
        assert len(await j.events_by_tag("big", limit=1000)) == 242
        assert _seqs(await j.events(ENTITY_TYPE, "stale")) == [1, 2]
        assert _seqs(await j.events(ENTITY_TYPE, "half")) == [3, 4]
        assert await j.events(ENTITY_TYPE, "ahead") == []
        assert await j.events(ENTITY_TYPE, "gone") == []

    async def test_tags_and_replies_of_a_mixed_batch_belong_to_the_writes_that_committed(
        self, storage: Storage
    ) -> None:
        # Backends may check and insert in one statement: the refused writes' events must not
        # shift the offsets, tags or replies of the writes after them.
        j = storage.journal
        await j.append_one(_write("old", 0, Happened("old", 1)))
        stale = _write("old", 0, Happened("old", 1, "zombie"), Noted("z"), tags=("t", "z"))
        first = AtomicWrite(
            ENTITY_TYPE,
            "m1",
            0,
            [Happened("m1", 1), Noted("m1-2")],
            [("t",), ("t", "u")],
            replies=[("r1", 2, b"m1")],
        )
        second = AtomicWrite(
            ENTITY_TYPE, "m2", 0, [Noted("m2-1")], [("u",)], replies=[("r2", 1, b"m2")]
        )
        ahead = AtomicWrite(
            ENTITY_TYPE, "m3", 5, [Noted("m3")], [("t",)], replies=[("r3", 6, b"m3")]
        )
        results = await j.append([stale, first, ahead, second])
        assert [r.ok for r in results] == [False, True, False, True]
        committed = [*results[1].unwrap(), *results[3].unwrap()]
        assert _strictly_increasing(_offsets(committed))
        assert [e.tags for e in committed] == [("t",), ("t", "u"), ("u",)]
        assert await j.events_by_tag("t") == committed[:2]
        assert await j.events_by_tag("u") == committed[1:]
        assert await j.events_by_tag("z") == []
        assert await j.all_events(after_offset=_offsets(committed)[0] - 1) == committed
        assert await j.stored_replies(
            [(ENTITY_TYPE, "m1", "r1"), (ENTITY_TYPE, "m2", "r2"), (ENTITY_TYPE, "m3", "r3")]
        ) == {(ENTITY_TYPE, "m1", "r1"): b"m1", (ENTITY_TYPE, "m2", "r2"): b"m2"}

    async def test_concurrent_writers_for_one_entity_exactly_one_wins(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        outcomes = await asyncio.gather(
            *(j.append([_write("race", 0, Happened("race", 1, f"writer {i}"))]) for i in range(8))
        )
        errors = [r.error for (r,) in outcomes]
        winners = [r for (r,) in outcomes if r.ok]
        assert len(winners) == 1, errors
        assert all(isinstance(e, ConcurrencyConflict) for e in errors if e is not None), errors
        assert [e.event for e in await j.events(ENTITY_TYPE, "race")] == [
            winners[0].write.events[0]
        ]

    async def test_two_writes_for_the_same_entity_in_one_batch_are_refused(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        with pytest.raises(ValueError, match="dup"):
            await j.append(
                [
                    _write("other", 0, Happened("other", 1)),
                    _write("dup", 0, Happened("dup", 1)),
                    _write("dup", 1, Happened("dup", 2)),
                ]
            )
        assert await j.all_events() == []  # the whole batch was refused, before any write
        # The same id under two entity types is two entities: allowed in one batch.
        results = await j.append(
            [
                _write("same", 0, Happened("same", 1)),
                _write("same", 0, Noted("other type"), entity_type=OTHER_ENTITY_TYPE),
            ]
        )
        assert [r.ok for r in results] == [True, True]

    async def test_a_write_with_a_tag_tuple_count_that_does_not_match_is_refused(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        write = AtomicWrite(ENTITY_TYPE, "t", 0, [Happened("t", 1), Happened("t", 2)], [("x",)])
        with pytest.raises(ValueError):
            await j.append([write])
        assert await j.all_events() == []

    async def test_a_tag_given_twice_for_one_event_is_refused_or_stored_once(
        self, storage: Storage
    ) -> None:
        """Either ``ValueError`` before anything is written, or the event appears once under
        the tag; never a database error (nor a retried "conflict")."""
        j = storage.journal
        write = AtomicWrite(ENTITY_TYPE, "twice", 0, [Happened("twice", 1)], [("t", "t")])
        try:
            results = await j.append([write, _write("plain", 0, Happened("plain", 1))])
        except ValueError as e:
            assert "twice" in str(e) or "'t'" in str(e)
            assert await j.all_events() == []
            return
        assert [r.ok for r in results] == [True, True]
        assert _ids(await j.events_by_tag("t")) == ["twice"]

    # ------------------------------------------------------------ reading an entity

    async def test_events_with_bounds_and_limits(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("e", 0, *_happened("e", 1, 10)))

        async def seqs(**kwargs: Any) -> list[int]:
            return _seqs(await j.events(ENTITY_TYPE, "e", **kwargs))

        assert await seqs() == list(range(1, 11))
        assert await seqs(from_seq_nr=3, to_seq_nr=5) == [3, 4, 5]
        assert await seqs(from_seq_nr=4, to_seq_nr=4) == [4]
        assert await seqs(from_seq_nr=8) == [8, 9, 10]
        assert await seqs(to_seq_nr=2) == [1, 2]
        assert await seqs(from_seq_nr=9, to_seq_nr=100) == [9, 10]
        assert await seqs(from_seq_nr=11) == []
        assert await seqs(from_seq_nr=6, to_seq_nr=5) == []  # lower > upper: empty
        assert await seqs(limit=0) == []
        assert await seqs(limit=1) == [1]
        assert await seqs(limit=3) == [1, 2, 3]
        assert await seqs(limit=10) == list(range(1, 11))
        assert await seqs(limit=50) == list(range(1, 11))
        assert await seqs(from_seq_nr=5, to_seq_nr=9, limit=2) == [5, 6]
        assert await seqs(from_seq_nr=5, to_seq_nr=6, limit=5) == [5, 6]

    async def test_replay_reads_every_page(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("r", 0, *_happened("r", 1, 10)))
        for page_size in (1, 3, 5, 10, 1000):
            replayed = await j.replay(ENTITY_TYPE, "r", page_size=page_size)
            assert _seqs(replayed) == list(range(1, 11)), page_size
        assert _seqs(await j.replay(ENTITY_TYPE, "r", from_seq_nr=2, page_size=3)) == list(
            range(2, 11)
        )
        assert await j.replay(ENTITY_TYPE, "r", from_seq_nr=11) == []
        assert await j.replay(ENTITY_TYPE, "nobody") == []

    async def test_replay_many_reads_what_replay_and_deleted_to_read(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append(
            [
                _write("m1", 0, *_happened("m1", 1, 7)),
                _write("m2", 0, *_happened("m2", 1, 3)),
                _write("m3", 0, *_happened("m3", 1, 4)),
                _write("m1", 0, Noted("other type"), entity_type=OTHER_ENTITY_TYPE),
            ]
        )
        await j.delete_events(ENTITY_TYPE, "m3", 2)
        starts = {"m1": 2, "m2": 4, "m3": 1, "nobody": 1}
        for page_size in (1, 2, 3, 5, 1000):
            read = await j.replay_many(ENTITY_TYPE, starts, page_size=page_size)
            assert set(read) == set(starts), page_size
            for entity_id, start in starts.items():
                one = await j.replay(ENTITY_TYPE, entity_id, from_seq_nr=start)
                assert read[entity_id].events == one, (page_size, entity_id)
                assert read[entity_id].deleted_to == await j.deleted_to(ENTITY_TYPE, entity_id)
                assert read[entity_id].error is None
        assert _seqs((await j.replay_many(ENTITY_TYPE, {"m3": 1}))["m3"].events) == [3, 4]
        assert (await j.replay_many(ENTITY_TYPE, {"m3": 1}))["m3"].deleted_to == 2
        assert await j.replay_many(ENTITY_TYPE, {}) == {}
        with pytest.raises(ValueError):
            await j.replay_many(ENTITY_TYPE, starts, page_size=0)

    async def test_replay_refuses_a_page_size_below_one(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("p", 0, Happened("p", 1)))
        for page_size in (0, -1):
            with pytest.raises(ValueError):
                await asyncio.wait_for(j.replay(ENTITY_TYPE, "p", page_size=page_size), 10)

    async def test_an_unknown_entity_has_no_events_and_highest_seq_nr_zero(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append_one(_write("known", 0, Happened("known", 1)))
        assert await j.events(ENTITY_TYPE, "unknown") == []
        assert await j.events(ENTITY_TYPE, "unknown", from_seq_nr=1, to_seq_nr=10, limit=5) == []
        assert await j.highest_seq_nr(ENTITY_TYPE, "unknown") == 0
        # Streams are keyed by entity type and id: the same id under another type is unknown.
        assert await j.events(OTHER_ENTITY_TYPE, "known") == []
        assert await j.highest_seq_nr(OTHER_ENTITY_TYPE, "known") == 0

    async def test_entity_ids_are_opaque_strings(self, storage: Storage) -> None:
        j = storage.journal
        ids = ["a/b", "with space", "ünïcødé ✓", "1", "01", "%_", "x" * 200]
        # What array literals, CSV or SQL quoting would read otherwise (ids, tags and command
        # ids may travel in such a form).
        ids += ['q"uote', "back\\slash", '\\"', "{b,r}", "NULL", " pad ", "a\nb", "'"]
        results = await j.append(
            [
                dataclasses.replace(
                    _write(i, 0, Happened(i, 1), tags=(f"tag {i}",)),
                    replies=[(f"cmd {i}", 1, i.encode())],
                )
                for i in ids
            ]
        )
        _ok(results)
        for i in ids:
            (envelope,) = await j.events(ENTITY_TYPE, i)
            assert envelope.entity_id == i and envelope.event == Happened(i, 1)
            assert envelope.tags == (f"tag {i}",)
            assert await j.highest_seq_nr(ENTITY_TYPE, i) == 1
            assert _ids(await j.events_by_tag(f"tag {i}")) == [i]
        stored = await j.stored_replies([(ENTITY_TYPE, i, f"cmd {i}") for i in ids])
        assert stored == {(ENTITY_TYPE, i, f"cmd {i}"): i.encode() for i in ids}
        # The same in a large batch (PostgreSQL's other path), with a write that expects more
        # than its entity has: it fails alone, naming what the journal holds.
        big = [_write(i, 1, *_happened(i, 2, 20), tags=(f"tag {i}", f"big {i}")) for i in ids] + [
            _write(f"{ids[-1]} new", 5, Happened("x", 6))
        ]
        results = await j.append(big)
        _ok(results[:-1])
        conflict = results[-1].error
        assert isinstance(conflict, ConcurrencyConflict) and conflict.actual_seq_nr == 0
        for i in ids:
            assert _seqs(await j.events(ENTITY_TYPE, i)) == list(range(1, 22))
            assert len(await j.events_by_tag(f"big {i}")) == 20

    async def test_a_write_with_an_id_or_tag_that_breaks_the_rules_fails_alone(
        self, storage: Storage
    ) -> None:
        # Every backend refuses the same writes, whatever its columns would take: an entity
        # id or a tag must be a str of 1 to 255 characters, without NUL or lone surrogates.
        # The other writes of the batch commit.
        j = storage.journal
        bad_ids: list[Any] = ["x" * 256, "", "a\x00b", "a\ud800b", 7]
        bad_tags = ["t" * 256, "", "t\x00", "t\udfff"]
        writes = [_write("good-0", 0, Happened("good-0", 1), tags=("t",))]
        for n, bad in enumerate(bad_ids):
            writes.append(_write(bad, 0, Happened("bad", 1), tags=("t",)))
            writes.append(_write(f"good-{n + 1}", 0, Happened("good", 1), tags=("t",)))
        for bad_tag in bad_tags:
            writes.append(_write(f"tagged-{len(writes)}", 0, Happened("bad", 1), tags=(bad_tag,)))
        results = await j.append(writes)
        for write, result in zip(writes, results, strict=True):
            if isinstance(write.entity_id, str) and write.entity_id.startswith("good-"):
                assert result.ok, result
                continue
            assert isinstance(result.error, WriteRefused), result
            assert result.envelopes == ()
            tagged = str(write.entity_id).startswith("tagged-")
            what = "tag" if tagged else "entity id"
            assert f"{what} " in str(result.error)
        assert sorted(_ids(await j.events_by_tag("t"))) == [f"good-{n}" for n in range(6)]
        assert len(await j.all_events()) == 6

    # ------------------------------------------------------------ highest seq nr and deletion

    async def test_deleting_some_events_never_lowers_the_highest_seq_nr(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append_one(_write("d", 0, *_happened("d", 1, 3)))
        assert await j.delete_events(ENTITY_TYPE, "d", 2) == 2
        assert _seqs(await j.events(ENTITY_TYPE, "d")) == [3]
        assert await j.highest_seq_nr(ENTITY_TYPE, "d") == 3
        assert await j.delete_events(ENTITY_TYPE, "d", 1) == 0  # already gone
        assert await j.highest_seq_nr(ENTITY_TYPE, "d") == 3

    async def test_deleting_everything_keeps_the_highest_seq_nr(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("d", 0, *_happened("d", 1, 3)))
        assert await j.delete_events(ENTITY_TYPE, "d", 100) == 3
        assert await j.events(ENTITY_TYPE, "d") == []
        assert await j.replay(ENTITY_TYPE, "d") == []
        assert await j.highest_seq_nr(ENTITY_TYPE, "d") == 3  # not 0, and not 100
        # A writer that expects a lower number conflicts; the next write continues after 3.
        for stale in (0, 2):
            with pytest.raises(ConcurrencyConflict) as info:
                await j.append_one(_write("d", stale, Happened("d", 1)))
            assert info.value.actual_seq_nr == 3
        with pytest.raises(ConcurrencyConflict):
            await j.append_one(_write("d", 100, Happened("d", 101)))
        envelopes = await j.append_one(_write("d", 3, Happened("d", 4), Happened("d", 5)))
        assert _seqs(envelopes) == [4, 5]
        assert _seqs(await j.events(ENTITY_TYPE, "d")) == [4, 5]
        assert await j.highest_seq_nr(ENTITY_TYPE, "d") == 5

    async def test_a_deletion_that_leaves_no_event_records_where_the_entity_restarted(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append_one(_write("f", 0, *_happened("f", 1, 4)))
        # Some events left: a partial deletion, no restart.
        assert await j.delete_events(ENTITY_TYPE, "f", 2) == 2
        assert await j.deletions(ENTITY_TYPE, "f") == (2, 0)
        # None left: forgotten at its highest number.
        assert await j.delete_events(ENTITY_TYPE, "f", 100) == 2
        assert await j.deletions(ENTITY_TYPE, "f") == (4, 4)
        assert await j.restarted_at(ENTITY_TYPE, "f") == 4
        # Written again, then trimmed in part: the restart stays where it was.
        await j.append_one(_write("f", 4, *_happened("f", 5, 3)))
        assert await j.delete_events(ENTITY_TYPE, "f", 5) == 1
        assert await j.deletions(ENTITY_TYPE, "f") == (5, 4)
        read = (await j.replay_many(ENTITY_TYPE, {"f": 1}))["f"]
        assert (read.deleted_to, read.restarted_at) == (5, 4)
        assert _seqs(read.events) == [6, 7]
        assert await j.deletions(ENTITY_TYPE, "never") == (0, 0)

    async def test_concurrent_deletions_of_one_entity_keep_the_highest(
        self, storage: Storage
    ) -> None:
        """Deletions of one entity that run at once take turns: none fails, the entity's
        deletion mark ends at the highest one, and its numbers are never used again."""
        j = storage.journal
        ids = [f"cd-{n}" for n in range(8)]
        _ok(await j.append([_write(i, 0, *_happened(i, 1, 30)) for i in ids]))
        tos = [5, 30, 10, 25, 15, 20]
        deleted = await asyncio.gather(
            *(j.delete_events(ENTITY_TYPE, i, to) for to in tos for i in ids)
        )
        by_entity = [sum(deleted[k * len(ids) + n] for k in range(len(tos))) for n in range(8)]
        assert by_entity == [30] * len(ids)
        for i in ids:
            assert await j.deletions(ENTITY_TYPE, i) == (30, 30)
            assert await j.highest_seq_nr(ENTITY_TYPE, i) == 30
            assert _seqs(await j.append_one(_write(i, 30, Happened(i, 31)))) == [31]

    async def test_deleting_touches_only_that_entity(self, storage: Storage) -> None:
        j = storage.journal
        _ok(
            await j.append(
                [
                    _write("a", 0, *_happened("a", 1, 2), tags=("t",)),
                    _write("b", 0, *_happened("b", 1, 2), tags=("t",)),
                    _write("a", 0, Noted("a"), entity_type=OTHER_ENTITY_TYPE, tags=("t",)),
                ]
            )
        )
        assert await j.delete_events(ENTITY_TYPE, "a", 2) == 2
        assert _seqs(await j.events(ENTITY_TYPE, "b")) == [1, 2]
        assert _seqs(await j.events(OTHER_ENTITY_TYPE, "a")) == [1]
        # Deleted events are gone from the tag and global streams too.
        assert [(e.entity_type, e.entity_id) for e in await j.events_by_tag("t")] == [
            (ENTITY_TYPE, "b"),
            (ENTITY_TYPE, "b"),
            (OTHER_ENTITY_TYPE, "a"),
        ]
        assert len(await j.all_events()) == 3
        # Deleting an unknown entity deletes nothing and invents no sequence number.
        assert await j.delete_events(ENTITY_TYPE, "nobody", 10) == 0
        assert await j.highest_seq_nr(ENTITY_TYPE, "nobody") == 0
        assert _seqs(await j.append_one(_write("nobody", 0, Happened("nobody", 1)))) == [1]

    # ------------------------------------------------------------ offsets

    async def test_offsets_are_unique_and_increase_across_batches(self, storage: Storage) -> None:
        j = storage.journal
        written: list[EventEnvelope[Any]] = []
        for batch in range(4):
            writes = [
                _write(f"e{k}", batch * 2, *_happened(f"e{k}", batch * 2 + 1, 2)) for k in range(3)
            ]
            written.extend(_ok(await j.append(writes)))
        offsets = _offsets(written)
        assert len(set(offsets)) == len(offsets) == 24
        assert _strictly_increasing(offsets)  # in commit order, whatever the batch held
        assert await j.all_events(limit=100) == written

    async def test_offsets_are_never_reused_after_deleting_the_newest_events(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        first = await j.append_one(_write("o1", 0, *_happened("o1", 1, 3)))
        assert await j.delete_events(ENTITY_TYPE, "o1", 3) == 3  # the newest events of all
        (second,) = await j.append_one(_write("o2", 0, Happened("o2", 1)))
        assert second.offset > first[-1].offset
        (third,) = await j.append_one(_write("o1", 3, Happened("o1", 4)))
        assert third.offset > second.offset

    # ------------------------------------------------------------ tags and the global stream

    async def test_tags_match_exactly(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("x1", 0, Happened("x1", 1), tags=("t1",)))
        await j.append_one(_write("x12", 0, Happened("x12", 1), tags=("t12",)))
        await j.append_one(_write("x2", 0, Happened("x2", 1), tags=("t1", "all")))
        await j.append_one(_write("none", 0, Happened("none", 1)))
        assert _ids(await j.events_by_tag("t1")) == ["x1", "x2"]
        assert _ids(await j.events_by_tag("t12")) == ["x12"]
        assert _ids(await j.events_by_tag("all")) == ["x2"]
        for no_match in ("t", "T1", "t1 ", "t_", "t%", "%", ""):
            assert await j.events_by_tag(no_match) == [], no_match
        (x2,) = await j.events_by_tag("all")
        assert x2.tags == ("t1", "all")

    async def test_events_by_tag_in_offset_order_with_after_offset_and_limit(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        tagged: list[EventEnvelope[Any]] = []
        for n in range(1, 4):  # three batches, interleaving entities and tags
            results = await j.append(
                [
                    _write("a", n - 1, Happened("a", n), tags=("t",)),
                    _write("u", n - 1, Happened("u", n), tags=("u",)),
                    _write("b", n - 1, Happened("b", n), tags=("t", "u")),
                ]
            )
            tagged.extend(results[0].unwrap())
            tagged.extend(results[2].unwrap())
        read = await j.events_by_tag("t")
        assert read == tagged  # whole envelopes: event, seq nr, offset, tags, timestamp...
        assert _strictly_increasing(_offsets(read))
        offsets = _offsets(tagged)
        assert await j.events_by_tag("t", after_offset=offsets[2]) == tagged[3:]
        assert await j.events_by_tag("t", after_offset=offsets[2] + 1) == tagged[3:]
        assert await j.events_by_tag("t", after_offset=offsets[-1]) == []
        assert await j.events_by_tag("t", limit=1) == tagged[:1]
        assert await j.events_by_tag("t", after_offset=offsets[0], limit=2) == tagged[1:3]
        assert await j.events_by_tag("t", limit=0) == []
        # Paging with after_offset = the last offset seen sees every event exactly once.
        paged: list[EventEnvelope[Any]] = []
        while page := await j.events_by_tag(
            "t", after_offset=paged[-1].offset if paged else 0, limit=4
        ):
            paged.extend(page)
        assert paged == tagged

    async def test_all_events_in_offset_order_with_after_offset_and_limit(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        assert await j.all_events() == []
        written: list[EventEnvelope[Any]] = []
        written.extend(await j.append_one(_write("a", 0, *_happened("a", 1, 3), tags=("t",))))
        written.extend(
            _ok(await j.append([_write("b", 0, Noted("b")), _write("a", 3, Noted("a"))]))
        )
        written.extend(await j.append_one(_write("c", 0, Happened("c", 1), tags=("u",))))
        assert await j.all_events() == written
        offsets = _offsets(written)
        assert await j.all_events(after_offset=offsets[1]) == written[2:]
        assert await j.all_events(after_offset=offsets[-1]) == []
        assert await j.all_events(limit=1) == written[:1]
        assert await j.all_events(limit=0) == []
        assert await j.all_events(after_offset=offsets[2], limit=2) == written[3:5]
        # Every envelope equals the one read for its entity.
        for e in written:
            (same,) = await j.events(
                e.entity_type, e.entity_id, from_seq_nr=e.seq_nr, to_seq_nr=e.seq_nr
            )
            assert same == e

    async def test_read_slices_reads_each_range_in_offset_order(self, storage: Storage) -> None:
        # 200 entities over a small batch and a large one: every range reads exactly the events
        # of its entities' slices, in offset order, page by page; the ranges add up to all.
        j = storage.journal
        ids = [f"s{n}" for n in range(200)]
        _ok(await j.append([_write(i, 0, Noted(i)) for i in ids[:5]]))
        _ok(await j.append([_write(i, 0, *_happened(i, 1, 2)) for i in ids[5:]]))
        everything = await j.all_events(limit=10_000)
        assert {e.slice for e in everything} == {slice_of(i) for i in ids}
        seen: list[int] = []
        for r in slice_ranges(3):
            expected = [e for e in everything if e.slice in r]
            assert expected, "200 entities left a third of the slices empty"
            got: list[EventEnvelope[Any]] = []
            after = 0
            while True:
                page = await j.read_slices(r, after_offset=after, limit=50)
                got.extend(page.envelopes)
                if not page.full:
                    break
                after = page.last_offset
            assert got == expected
            seen.extend(_offsets(got))
        assert sorted(seen) == _offsets(everything)
        whole = await j.read_slices(SliceRange(0, SLICES - 1), limit=10_000)
        assert whole.envelopes == everything

    # ------------------------------------------------------------ timestamps and metadata

    async def test_timestamps_round_trip(self, storage: Storage) -> None:
        j = storage.journal
        before = datetime.now(UTC)
        written = await j.append_one(_write("ts", 0, *_happened("ts", 1, 2), tags=("t",)))
        after = datetime.now(UTC)
        for e in written:
            assert e.timestamp.tzinfo is not None and e.timestamp.utcoffset() == timedelta(0)
            assert before - CLOCK_LEEWAY <= e.timestamp <= after + CLOCK_LEEWAY
        assert [e.timestamp for e in await j.events(ENTITY_TYPE, "ts")] == [
            e.timestamp for e in written
        ]
        assert [e.timestamp for e in await j.events_by_tag("t")] == [e.timestamp for e in written]
        await _wait_for_the_clock()
        (later,) = await j.append_one(_write("ts", 2, Happened("ts", 3)))
        assert later.timestamp > written[-1].timestamp

    async def test_metadata_round_trips(self, storage: Storage) -> None:
        j = storage.journal
        metadata: dict[str, Any] = {
            "user": "ada",
            "n": 1,
            "big": 2**62,
            "ratio": 0.5,
            "flags": [True, False, None],
            "nested": {"k": ["v", 2, {"deep": "ü✓"}]},
            "raw": b"\x00\xff",
        }
        written = await j.append_one(
            _write("m", 0, Happened("m", 1), Noted("2"), tags=("t",), metadata=metadata)
        )
        (plain,) = await j.append_one(_write("plain", 0, Happened("plain", 1)))
        assert [e.metadata for e in written] == [metadata, metadata]
        assert [e.metadata for e in await j.events(ENTITY_TYPE, "m")] == [metadata, metadata]
        assert [e.metadata for e in await j.events_by_tag("t")] == [metadata, metadata]
        assert [e.metadata for e in await j.all_events()] == [metadata, metadata, {}]
        assert plain.metadata == {}

    # ------------------------------------------------------------ command replies

    async def test_command_replies_round_trip_with_their_events(self, storage: Storage) -> None:
        j = storage.journal
        write = AtomicWrite(
            ENTITY_TYPE,
            "r",
            0,
            _happened("r", 1, 3),
            replies=[("cmd-1", 1, b"first"), ("cmd-2", 3, b"\x00second\xff")],
        )
        assert _seqs(await j.append_one(write)) == [1, 2, 3]
        found = await j.stored_replies(
            [
                (ENTITY_TYPE, "r", "cmd-1"),
                (ENTITY_TYPE, "r", "cmd-2"),
                (ENTITY_TYPE, "r", "unknown"),
                (ENTITY_TYPE, "other", "cmd-1"),  # command ids are per entity
                (OTHER_ENTITY_TYPE, "r", "cmd-1"),  # ... and per entity type
            ]
        )
        assert found == {
            (ENTITY_TYPE, "r", "cmd-1"): b"first",
            (ENTITY_TYPE, "r", "cmd-2"): b"\x00second\xff",
        }
        assert await j.stored_replies([]) == {}
        # The same command id on another entity is another command.
        await j.append_one(
            AtomicWrite(
                ENTITY_TYPE, "other", 0, [Happened("other", 1)], replies=[("cmd-1", 1, b"o")]
            )
        )
        assert await j.stored_replies([(ENTITY_TYPE, "other", "cmd-1")]) == {
            (ENTITY_TYPE, "other", "cmd-1"): b"o"
        }

    async def test_a_large_batch_stores_every_reply(self, storage: Storage) -> None:
        # Large batches may take another path (PostgreSQL switches to COPY): same results.
        j = storage.journal
        writes = [
            AtomicWrite(
                ENTITY_TYPE,
                f"e{n}",
                0,
                _happened(f"e{n}", 1, 2),
                [("t",), ("t",)] if n % 2 else [],
                replies=[(f"c{n}", 2, f"reply {n}".encode())],
            )
            for n in range(100)
        ]
        _ok(await j.append(writes))
        keys = [(ENTITY_TYPE, f"e{n}", f"c{n}") for n in range(100)]
        found = await j.stored_replies(keys)
        assert found == {k: f"reply {n}".encode() for n, k in enumerate(keys)}
        assert len(await j.events_by_tag("t", limit=1000)) == 100

    async def test_a_write_that_fails_stores_no_reply(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(_write("taken", 0, Happened("taken", 1)))
        conflict, unencodable, good = await j.append(
            [
                AtomicWrite(
                    ENTITY_TYPE, "taken", 0, [Happened("taken", 1)], replies=[("a", 1, b"a")]
                ),
                AtomicWrite(ENTITY_TYPE, "bad", 0, [NotSerializable(1)], replies=[("b", 1, b"b")]),
                AtomicWrite(
                    ENTITY_TYPE, "good", 0, [Happened("good", 1)], replies=[("c", 1, b"c")]
                ),
            ]
        )
        assert isinstance(conflict.error, ConcurrencyConflict)
        assert isinstance(unencodable.error, SerializationError)
        assert good.ok
        assert await j.stored_replies(
            [(ENTITY_TYPE, "taken", "a"), (ENTITY_TYPE, "bad", "b"), (ENTITY_TYPE, "good", "c")]
        ) == {(ENTITY_TYPE, "good", "c"): b"c"}

    async def test_a_command_id_already_stored_fails_that_write_alone(
        self, storage: Storage
    ) -> None:
        j = storage.journal
        await j.append_one(
            AtomicWrite(ENTITY_TYPE, "d", 0, [Happened("d", 1)], replies=[("once", 1, b"1")])
        )
        again, other = await j.append(
            [
                AtomicWrite(ENTITY_TYPE, "d", 1, [Happened("d", 2)], replies=[("once", 2, b"2")]),
                AtomicWrite(ENTITY_TYPE, "e", 0, [Happened("e", 1)], replies=[("once", 1, b"e")]),
            ]
        )
        assert isinstance(again.error, DuplicateCommandId), again.error
        assert again.error.command_id == "once" and "once" in str(again.error)
        assert other.ok
        assert _seqs(await j.events(ENTITY_TYPE, "d")) == [1]
        assert await j.stored_replies([(ENTITY_TYPE, "d", "once")]) == {
            (ENTITY_TYPE, "d", "once"): b"1"
        }
        # The entity is unharmed: the same write under a new command id commits.
        await j.append_one(
            AtomicWrite(ENTITY_TYPE, "d", 1, [Happened("d", 2)], replies=[("twice", 2, b"2")])
        )
        assert _seqs(await j.events(ENTITY_TYPE, "d")) == [1, 2]

    async def test_replies_that_do_not_fit_their_write_are_refused(self, storage: Storage) -> None:
        j = storage.journal
        events = [Happened("v", 1), Happened("v", 2)]
        bad_replies: list[list[tuple[Any, Any, Any]]] = [
            [("same", 1, b"1"), ("same", 2, b"2")],  # one command id twice in a write
            [("c", 0, b"")],  # not one of the write's sequence numbers
            [("c", 3, b"")],
            [("", 1, b"")],  # an empty command id
            [("x" * 256, 1, b"")],  # longer than the column
            [("c\x00", 1, b"")],  # a NUL character
            [("c\ud800", 1, b"")],  # a lone surrogate: not UTF-8
            [("c", 1, "not bytes")],
        ]
        for replies in bad_replies:
            with pytest.raises(ValueError):
                await j.append([AtomicWrite(ENTITY_TYPE, "v", 0, events, replies=replies)])
        assert await j.all_events() == []
        assert await j.stored_replies([(ENTITY_TYPE, "v", "same"), (ENTITY_TYPE, "v", "c")]) == {}

    async def test_replies_are_deleted_with_their_events(self, storage: Storage) -> None:
        j = storage.journal
        await j.append_one(
            AtomicWrite(
                ENTITY_TYPE,
                "x",
                0,
                _happened("x", 1, 4),
                replies=[("c1", 1, b"1"), ("c3", 3, b"3"), ("c4", 4, b"4")],
            )
        )
        await j.append_one(
            AtomicWrite(ENTITY_TYPE, "y", 0, [Happened("y", 1)], replies=[("c1", 1, b"y")])
        )
        keys = [(ENTITY_TYPE, "x", c) for c in ("c1", "c3", "c4")] + [(ENTITY_TYPE, "y", "c1")]
        assert await j.delete_events(ENTITY_TYPE, "x", 3) == 3
        assert sorted(await j.stored_replies(keys)) == [
            (ENTITY_TYPE, "x", "c4"),
            (ENTITY_TYPE, "y", "c1"),
        ]
        assert await j.delete_events(ENTITY_TYPE, "x", 100) == 1
        assert sorted(await j.stored_replies(keys)) == [(ENTITY_TYPE, "y", "c1")]

    # ------------------------------------------------------------ decoding and other readers

    async def test_an_undecodable_event_names_entity_seq_nr_and_type(
        self, storage: Storage, reopen: StorageOpener
    ) -> None:
        j = storage.journal
        await j.append_one(_write("u", 0, Happened("u", 1), Noted("2"), tags=("t",)))
        await j.append_one(_write("fine", 0, Happened("fine", 1)))
        # A reader that knows Happened but not Noted:
        async with self.opened(reopen, Serializer([Happened])) as other:
            reader = other.journal
            assert _seqs(await reader.events(ENTITY_TYPE, "u", to_seq_nr=1)) == [1]
            assert _seqs(await reader.events(ENTITY_TYPE, "fine")) == [1]
            reads: list[Callable[[], Awaitable[Any]]] = [
                lambda: reader.events(ENTITY_TYPE, "u"),
                lambda: reader.replay(ENTITY_TYPE, "u"),
                lambda: reader.events_by_tag("t"),
                lambda: reader.all_events(),
            ]
            for read in reads:
                with pytest.raises(EventDecodeError) as info:
                    await read()
                err = info.value
                assert (err.entity_type, err.entity_id, err.seq_nr) == (ENTITY_TYPE, "u", 2)
                assert err.type_name == "lagompy.contract.Noted"
                message = str(err)
                assert f"{ENTITY_TYPE}/u" in message and "2" in message and "Noted" in message
            # Reading many entities at once, the undecodable event is its entity's alone.
            many = await reader.replay_many(ENTITY_TYPE, {"u": 1, "fine": 1})
            assert _seqs(many["fine"].events) == [1] and many["fine"].error is None
            assert _seqs(many["u"].events) == [1]
            error = many["u"].error
            assert error is not None and (error.entity_id, error.seq_nr) == ("u", 2)
        # A reader that knows nothing fails on the first event.
        async with self.opened(reopen, Serializer()) as other:
            with pytest.raises(EventDecodeError) as info:
                await other.journal.events(ENTITY_TYPE, "u")
            assert info.value.seq_nr == 1
            assert info.value.type_name == "lagompy.contract.Happened"

    async def test_another_storage_on_the_same_database_sees_the_same_journal(
        self, storage: Storage, reopen: StorageOpener
    ) -> None:
        j = storage.journal
        written = await j.append_one(_write("s", 0, *_happened("s", 1, 3), tags=("t",)))
        await j.delete_events(ENTITY_TYPE, "s", 3)
        async with self.opened(reopen, contract_serializer()) as other:
            reader = other.journal
            assert await reader.highest_seq_nr(ENTITY_TYPE, "s") == 3
            with pytest.raises(ConcurrencyConflict):
                await reader.append_one(_write("s", 0, Happened("s", 1)))
            (next_one,) = await reader.append_one(_write("s", 3, Happened("s", 4)))
            assert next_one.seq_nr == 4 and next_one.offset > written[-1].offset
        assert await j.events(ENTITY_TYPE, "s") == [next_one]


class SnapshotStoreContract(StorageContract):
    """What every :class:`~lagompy.journal.SnapshotStore` backend must do."""

    async def test_an_unknown_entity_has_no_snapshot(self, storage: Storage) -> None:
        s = storage.snapshots
        await s.save(ENTITY_TYPE, "known", 1, Thing("known"))
        assert await s.load(ENTITY_TYPE, "unknown") is None
        assert await s.load(ENTITY_TYPE, "unknown", max_seq_nr=10) is None
        assert await s.load(OTHER_ENTITY_TYPE, "known") is None
        assert await s.delete(ENTITY_TYPE, "unknown") == 0

    async def test_load_picks_the_latest_snapshot_at_or_below_max_seq_nr(
        self, storage: Storage
    ) -> None:
        s = storage.snapshots
        before = datetime.now(UTC)
        for seq_nr in (10, 5, 15):  # saved out of order
            await s.save(ENTITY_TYPE, "s", seq_nr, Thing(f"at {seq_nr}", seq_nr))
        after = datetime.now(UTC)
        latest = await s.load(ENTITY_TYPE, "s")
        assert isinstance(latest, Snapshot)
        assert (latest.entity_type, latest.entity_id, latest.seq_nr) == (ENTITY_TYPE, "s", 15)
        assert latest.state == Thing("at 15", 15)
        assert latest.timestamp.utcoffset() == timedelta(0)
        assert before - CLOCK_LEEWAY <= latest.timestamp <= after + CLOCK_LEEWAY

        async def seq_at(max_seq_nr: int) -> int | None:
            snap = await s.load(ENTITY_TYPE, "s", max_seq_nr=max_seq_nr)
            return None if snap is None else snap.seq_nr

        assert [await seq_at(n) for n in (100, 15, 14, 10, 9, 5, 4, 0)] == [
            15, 15, 10, 10, 5, 5, None, None,
        ]  # fmt: skip

    async def test_load_by_time(self, storage: Storage) -> None:
        s = storage.snapshots
        await s.save(ENTITY_TYPE, "t", 1, Thing("one"))
        await _wait_for_the_clock()
        await s.save(ENTITY_TYPE, "t", 2, Thing("two"))
        first = await s.load(ENTITY_TYPE, "t", max_seq_nr=1)
        second = await s.load(ENTITY_TYPE, "t")
        assert first is not None and second is not None
        assert first.timestamp < second.timestamp

        async def seq_at(when: datetime) -> int | None:
            snap = await s.load(ENTITY_TYPE, "t", max_timestamp=when)
            return None if snap is None else snap.seq_nr

        between = first.timestamp + (second.timestamp - first.timestamp) / 2
        assert await seq_at(first.timestamp - timedelta(milliseconds=1)) is None
        assert await seq_at(first.timestamp) == 1  # the bound is inclusive
        assert await seq_at(between) == 1
        assert await seq_at(second.timestamp) == 2
        assert await seq_at(datetime.now(UTC) + timedelta(days=1)) == 2
        both = await s.load(ENTITY_TYPE, "t", max_seq_nr=1, max_timestamp=second.timestamp)
        assert both is not None and both.seq_nr == 1

    async def test_saving_again_at_the_same_seq_nr_replaces_the_snapshot(
        self, storage: Storage
    ) -> None:
        s = storage.snapshots
        await s.save(ENTITY_TYPE, "o", 10, Thing("first"))
        await s.save(ENTITY_TYPE, "o", 10, Thing("second", items=("x",)))
        await s.save(ENTITY_TYPE, "o", 10, NoThing())  # another state type
        loaded = await s.load(ENTITY_TYPE, "o")
        assert loaded is not None and loaded.seq_nr == 10 and loaded.state == NoThing()
        assert await s.delete(ENTITY_TYPE, "o", max_seq_nr=10) == 1  # one snapshot, not three

    async def test_save_many_saves_every_snapshot(self, storage: Storage) -> None:
        s = storage.snapshots
        await s.save(ENTITY_TYPE, "a", 3, Thing("old a"))
        await s.save_many(
            [
                SnapshotToSave(ENTITY_TYPE, "a", 3, Thing("new a")),  # replaces
                SnapshotToSave(ENTITY_TYPE, "b", 7, Thing("b")),
                SnapshotToSave(OTHER_ENTITY_TYPE, "a", 1, NoThing()),
            ]
        )
        await s.save_many([])
        a = await s.load(ENTITY_TYPE, "a")
        b = await s.load(ENTITY_TYPE, "b")
        other = await s.load(OTHER_ENTITY_TYPE, "a")
        assert a is not None and (a.seq_nr, a.state) == (3, Thing("new a"))
        assert b is not None and (b.seq_nr, b.state) == (7, Thing("b"))
        assert other is not None and other.state == NoThing()

    async def test_save_many_with_one_seq_nr_twice_is_refused_or_keeps_the_last(
        self, storage: Storage
    ) -> None:
        """Either ``ValueError`` and nothing saved, or the later snapshot wins (as two saves
        would); never a database error."""
        s = storage.snapshots
        twice = [
            SnapshotToSave(ENTITY_TYPE, "d", 4, Thing("earlier")),
            SnapshotToSave(ENTITY_TYPE, "d", 4, Thing("later")),
        ]
        try:
            await s.save_many(twice)
        except ValueError:
            assert await s.load(ENTITY_TYPE, "d") is None
            return
        loaded = await s.load(ENTITY_TYPE, "d")
        assert loaded is not None and loaded.state == Thing("later")

    async def test_a_large_snapshot_round_trips(self, storage: Storage) -> None:
        s = storage.snapshots
        big = Thing(
            "ü" * 300_000,
            items=tuple(f"item {i}" for i in range(10_000)),
            blob=os.urandom(1_500_000),  # incompressible
        )
        await s.save(ENTITY_TYPE, "big", 1, big)
        loaded = await s.load(ENTITY_TYPE, "big")
        assert loaded is not None and loaded.state == big

    async def test_delete_by_seq_nr(self, storage: Storage) -> None:
        s = storage.snapshots
        for seq_nr in (1, 2, 3, 4):
            await s.save(ENTITY_TYPE, "d", seq_nr, Thing(str(seq_nr)))
        await s.save(ENTITY_TYPE, "keep", 1, Thing("keep"))
        assert await s.delete(ENTITY_TYPE, "d", max_seq_nr=2) == 2
        assert await s.load(ENTITY_TYPE, "d", max_seq_nr=2) is None
        latest = await s.load(ENTITY_TYPE, "d")
        assert latest is not None and latest.seq_nr == 4
        assert await s.delete(ENTITY_TYPE, "d", max_seq_nr=2) == 0
        assert await s.load(ENTITY_TYPE, "keep") is not None

    async def test_delete_by_time(self, storage: Storage) -> None:
        s = storage.snapshots
        await s.save(ENTITY_TYPE, "d", 1, Thing("one"))
        await _wait_for_the_clock()
        await s.save(ENTITY_TYPE, "d", 2, Thing("two"))
        first = await s.load(ENTITY_TYPE, "d", max_seq_nr=1)
        assert first is not None
        assert await s.delete(ENTITY_TYPE, "d", max_timestamp=first.timestamp - timedelta(1)) == 0
        assert await s.delete(ENTITY_TYPE, "d", max_timestamp=first.timestamp) == 1
        remaining = await s.load(ENTITY_TYPE, "d")
        assert remaining is not None and remaining.seq_nr == 2
        # Both bounds together: only snapshots within both are deleted.
        assert await s.delete(ENTITY_TYPE, "d", max_seq_nr=1, max_timestamp=datetime.now(UTC)) == 0
        assert await s.load(ENTITY_TYPE, "d") is not None

    async def test_delete_all(self, storage: Storage) -> None:
        s = storage.snapshots
        for seq_nr in (1, 5, 9):
            await s.save(ENTITY_TYPE, "d", seq_nr, Thing(str(seq_nr)))
        await s.save(OTHER_ENTITY_TYPE, "d", 1, Thing("other type"))
        assert await s.delete(ENTITY_TYPE, "d") == 3
        assert await s.load(ENTITY_TYPE, "d") is None
        assert await s.load(OTHER_ENTITY_TYPE, "d") is not None
        # A new snapshot after deleting all of them is found again.
        await s.save(ENTITY_TYPE, "d", 12, Thing("12"))
        again = await s.load(ENTITY_TYPE, "d")
        assert again is not None and again.seq_nr == 12

    async def test_load_many_gives_each_entitys_latest_snapshot(self, storage: Storage) -> None:
        s = storage.snapshots
        for entity_id, seq_nrs in (("a", (3, 9, 6)), ("b", (2,)), ("c", ())):
            for seq_nr in seq_nrs:
                await s.save(ENTITY_TYPE, entity_id, seq_nr, Thing(f"{entity_id}{seq_nr}", seq_nr))
        await s.save(OTHER_ENTITY_TYPE, "c", 4, Thing("other type"))
        loaded = await s.load_many(ENTITY_TYPE, ["a", "b", "c", "nobody", "a"])
        assert sorted(loaded) == ["a", "b"]
        for entity_id, snapshot in loaded.items():
            assert snapshot == await s.load(ENTITY_TYPE, entity_id)
        assert await s.load_many(ENTITY_TYPE, []) == {}

    async def test_an_undecodable_snapshot_is_a_serialization_error(
        self, storage: Storage, reopen: StorageOpener
    ) -> None:
        await storage.snapshots.save(ENTITY_TYPE, "u", 3, Thing("u"))
        # Recovery relies on this error type to fall back to a full replay.
        async with self.opened(reopen, Serializer()) as other:
            with pytest.raises(SerializationError, match=r"lagompy\.contract\.Thing"):
                await other.snapshots.load(ENTITY_TYPE, "u")
            # Loading many at once, the error is that entity's alone.
            many = await other.snapshots.load_many(ENTITY_TYPE, ["u", "none"])
            assert list(many) == ["u"] and isinstance(many["u"], SerializationError)
        async with self.opened(reopen, contract_serializer()) as other:
            loaded = await other.snapshots.load(ENTITY_TYPE, "u")
            assert loaded is not None and loaded.state == Thing("u")
