"""The event journal: append batches for many entities at once, read them back.

One call to :meth:`Journal.append` is one database transaction (group commit). Each entity's
write carries the highest sequence number its writer has seen; an entity whose number is stale
(another writer got there first) gets its own :class:`~lagompy.errors.ConcurrencyConflict` and
writes nothing, while the other entities of the batch commit. The unique constraint on
``(entity_type, entity_id, seq_nr)`` backs this up should two writers race. A write whose data
breaks the id rules, or that the database refuses (a value too long, a constraint), fails alone
with :class:`~lagompy.errors.WriteRefused` the same way: the batch is written again in parts
down to the refused write (see :meth:`Journal._isolate`).

This module is the front, the same on every database: it checks and encodes the writes, retries
a batch that raced, isolates refused data and reads with SQLAlchemy Core. What differs per
database (the write path, the ordering fence and the notification, the driver's errors, the
reads and upserts that need its own SQL) is a :class:`~lagompy.journal._backend.JournalBackend`:
``_sqlite.py`` or ``_postgres.py``, chosen once, when the journal is built (:func:`backend_for`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, TypeGuard, cast

import msgpack
from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from lagompy.entity import MAX_ID_LENGTH
from lagompy.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    EventDecodeError,
    InvalidCommandId,
    InvalidEntityId,
    JournalError,
    LagompyError,
    SerializationError,
    UnknownType,
    WriteRefused,
)
from lagompy.journal._backend import Batch, EncodedWrite, JournalBackend
from lagompy.journal._model import (
    AtomicWrite,
    EventEnvelope,
    WriteResult,
    event_tags,
    from_us,
    now_us,
)
from lagompy.journal._postgres import _LOCK_EVENTS, NOTIFY_CHANNEL, PostgresBackend
from lagompy.journal._slices import SLICES, SliceRange, slice_of
from lagompy.journal._sqlite import SqliteBackend
from lagompy.serialization import Serializer, _plain_init
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database

# The rest of lagompy imports the journal's values (and, for the tailers and the ordering tests,
# PostgreSQL's channel and fence) from here.
__all__ = [
    "MAX_COMMAND_ID_LENGTH",
    "MAX_ID_LENGTH",
    "NOTIFY_CHANNEL",
    "_LOCK_EVENTS",
    "AtomicWrite",
    "EventEnvelope",
    "Journal",
    "Replayed",
    "TagPage",
    "WriteResult",
    "backend_for",
    "check_command_id",
    "check_entity_id",
    "from_us",
    "id_problem",
    "now_us",
]

#: How many times a batch is re-checked and retried when the unique constraint caught a race.
_APPEND_ATTEMPTS = 5
#: Events per read of a replay. A replay keeps every event it read anyway; each read is a
#: transaction and a round trip (on SQLite, several hops to aiosqlite's thread). Recovery of
#: 10,000 events (bench/runtime_bench.py --recovery), four runs interleaved, 2026-12-03, CPU
#: reference 11.1-12.0 ms, medians: pages of 1,000: SQLite 41.4-52.8 ms, PostgreSQL 36.8-40.5;
#: pages of 5,000: SQLite 35.5-38.1, PostgreSQL 31.8-35.2.
_REPLAY_PAGE = 5000


class _MakeBackend(Protocol):
    def __call__(self, database: Database, *, ordering_fence: bool = True) -> JournalBackend: ...


#: The journal's backends, by the dialect of their database (:attr:`Database.dialect`).
_BACKENDS: Mapping[str, _MakeBackend] = {
    "sqlite": SqliteBackend,
    "postgresql": PostgresBackend,
}


def backend_for(database: Database, *, ordering_fence: bool = True) -> JournalBackend:
    """The journal backend for ``database``'s dialect (``ConfigurationError`` naming an
    unknown one). Called once per :class:`Journal` and :class:`SnapshotStore`: nothing after
    looks at the dialect."""
    try:
        make = _BACKENDS[database.dialect]
    except KeyError:
        raise ConfigurationError(
            f"no journal backend for the database dialect {database.dialect!r} "
            f"({database.describe()}): lagompy's journal runs on "
            f"{' or '.join(sorted(_BACKENDS))}"
        ) from None
    return make(database, ordering_fence=ordering_fence)


#: The highest offset or sequence number a journal can hold (SQL's BIGINT): routes and commands
#: that take a position refuse a larger one up front (the drivers raise OverflowError on it).
MAX_POSITION = 2**63 - 1
#: The bound of a read by offset where the backend sets none.
_NO_BOUND = MAX_POSITION


def is_position(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a usable offset: an int (not a bool) from 0 to
    :data:`MAX_POSITION`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_POSITION


#: The columns ``Journal._envelope`` takes, in its parameter order.
_ENVELOPE_COLUMNS = (
    schema.events.c.entity_type,
    schema.events.c.entity_id,
    schema.events.c.seq_nr,
    schema.events.c.global_offset,
    schema.events.c.event_type,
    schema.events.c.event_version,
    schema.events.c.payload,
    schema.events.c.tags,
    schema.events.c.written_at_us,
    schema.events.c.metadata,
)


class _BadTag(ValueError):
    """A tag breaks the id rules (see :func:`id_problem`)."""


@lru_cache(maxsize=4096)
def _packed_tags(tags: tuple[str, ...]) -> bytes:
    """The tags, packed, once they are checked (the same few tuples come again and again: the
    check costs nothing per event)."""
    for t in tags:
        problem = id_problem(t)
        if problem is not None:
            raise _BadTag(f"a tag {problem}")
    packed: bytes = msgpack.packb(list(tags))
    return packed


#: The longest command id the replies table holds.
MAX_COMMAND_ID_LENGTH = MAX_ID_LENGTH


def id_problem(value: object) -> str | None:
    """What is wrong with ``value`` as an entity id, a command id or a tag, or None.

    The rules, the same on every backend: a ``str`` of 1 to :data:`MAX_ID_LENGTH` characters,
    with no NUL character and no lone surrogate (the text must encode as UTF-8: PostgreSQL
    refuses both, and SQLite's driver the second). Costs a few C calls for an ASCII id.
    """
    if type(value) is not str:
        if isinstance(value, str):
            return id_problem(str.__str__(value))
        return (
            f"must be a str, got {type(value).__qualname__} {_shorten(value)} (lagompy never "
            "turns another type into an id: pass str(...) if that is the id you mean)"
        )
    n = len(value)
    if not n:
        return "must not be empty"
    if n > MAX_ID_LENGTH:
        return f"may have at most {MAX_ID_LENGTH} characters, got {n} ({_shorten(value)})"
    if "\x00" in value:
        return f"must not contain a NUL character ({_shorten(value)})"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"must not contain a lone surrogate: it is not valid UTF-8 ({_shorten(value)})"
    return None


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:40]}...{text[-5:]}"


def _plain(value: str) -> str:
    """A ``str`` subclass's value (a StrEnum member, say) as a plain ``str``."""
    return value if value.__class__ is str else str.__str__(value)


def check_entity_id(entity_id: object) -> str:
    """``entity_id`` if it is a valid entity id (see :func:`id_problem`), as a plain ``str``;
    else :class:`~lagompy.errors.InvalidEntityId` (a ``ValueError``) naming the rule."""
    if (
        type(entity_id) is str
        and 0 < len(entity_id) <= MAX_ID_LENGTH
        and "\x00" not in entity_id
        and entity_id.isascii()
    ):
        return entity_id
    problem = id_problem(entity_id)
    if problem is not None:
        raise InvalidEntityId(f"an entity id {problem}")
    assert isinstance(entity_id, str)
    return _plain(entity_id)


def _fine_command_id(command_id: object) -> TypeGuard[str]:
    """The common case of :func:`check_command_id`, in a few C calls: a plain ``str`` that
    breaks none of the rules."""
    return (
        type(command_id) is str
        and 0 < len(command_id) <= MAX_ID_LENGTH
        and "\x00" not in command_id
        and command_id.isascii()
    )


def check_command_id(command_id: object) -> str:
    """``command_id`` if it is a valid command id (the rules of :func:`id_problem`), as a
    plain ``str``; else :class:`~lagompy.errors.InvalidCommandId` (a ``ValueError``) naming
    the rule."""
    if _fine_command_id(command_id):
        return command_id
    problem = id_problem(command_id)
    if problem is not None:
        raise InvalidCommandId(f"a command id {problem}")
    assert isinstance(command_id, str)
    return _plain(command_id)


def _check_replies(w: AtomicWrite) -> None:
    """Refuse replies that cannot belong to the write (ValueError, before anything is written)."""
    first, last = w.expected_seq_nr + 1, w.expected_seq_nr + len(w.events)
    replies = w.replies
    if len(replies) == 1:
        # The usual case (one command per entity and batch), in a few C calls.
        command_id, seq_nr, payload = replies[0]
        if (
            _fine_command_id(command_id)
            and seq_nr.__class__ is int
            and first <= seq_nr <= last
            and payload.__class__ is bytes
        ):
            return
    where = f"write for {w.entity_type}/{w.entity_id}"
    seen: set[str] = set()
    for command_id, seq_nr, payload in replies:
        try:
            check_command_id(command_id)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if command_id in seen:
            raise ValueError(f"{where}: two replies for command id {command_id!r}")
        seen.add(command_id)
        if not isinstance(seq_nr, int) or not first <= seq_nr <= last:
            raise ValueError(
                f"{where}: the reply to command {command_id!r} has seq_nr {seq_nr!r}, not one "
                f"of the write's events ({first}..{last})"
            )
        if not isinstance(payload, bytes):
            raise ValueError(
                f"{where}: the reply to command {command_id!r} must be encoded bytes, got "
                f"{type(payload).__qualname__}"
            )


def _where(w: AtomicWrite) -> str:
    """The write's entity, for messages (a long or odd id shortened and quoted)."""
    entity_id = w.entity_id
    if type(entity_id) is str and len(entity_id) <= 60 and entity_id.isprintable():
        return f"{w.entity_type}/{entity_id}"
    return f"{w.entity_type}/{_shorten(entity_id)}"


def _check_write_ids(w: AtomicWrite) -> None:
    """Refuse a write whose entity type or id breaks the id rules (WriteRefused): every
    backend refuses the same writes, before the database sees them."""
    for what, value in (("entity type", w.entity_type), ("entity id", w.entity_id)):
        problem = id_problem(value)
        if problem is not None:
            raise WriteRefused(
                f"write for {_where(w)} refused: an {what} {problem}",
                entity_type=str(w.entity_type),
                entity_id=str(w.entity_id),
            )


def _tuples(result: Any) -> Sequence[Any]:
    """A result's rows as processed tuples, without a ``Row`` each: SQLAlchemy's
    ``_raw_all_tuples`` (2.1; what its ORM loads with), or ``all()`` where it lacks it. A page
    of 1,000 events read ~1 us per event faster, and the tuples of plain values are dropped
    by the collector's first pass instead of aging with the page (2026-12-04, CPU reference
    15 ms)."""
    raw = getattr(result, "_raw_all_tuples", None)
    return cast(Sequence[Any], result.all() if raw is None else raw())


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic collector paused while a page of events is decoded (synchronous: nothing else
    of this event loop runs meanwhile), so that it runs once per page instead of every 700
    objects: the envelopes a replay or a read side keeps alive then reach the oldest generation
    half as often, whose full collections walk the whole heap. Recovery of 10,000 events, 7 in
    a row, 2026-12-03 (CPU reference 12 ms): full collections 6 -> 3, medians 67-74 -> 40-49 ms
    (SQLite and PostgreSQL). A collector turned off by the application stays off."""
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


_new = object.__new__

#: What :meth:`Journal.read_tag_made` makes of each event: ``make(entity_type, entity_id,
#: seq_nr, offset, timestamp, event)``, or None to leave it out.
MakeFromEvent = Callable[[str, str, int, int, Any, Any], Any]


def _undecodable(
    entity_type: str, entity_id: str, seq_nr: int, type_name: str, offset: int, error: Exception
) -> EventDecodeError:
    """The error of an event that cannot be decoded (its cause: ``error``)."""
    found = EventDecodeError(
        entity_type=entity_type,
        entity_id=entity_id,
        seq_nr=seq_nr,
        type_name=type_name,
        reason=str(error),
        offset=offset,
    )
    found.__cause__ = error
    return found


#: EventEnvelope is built field by field in its __dict__ (see ``Journal._envelope``).
_FAST_ENVELOPE = _plain_init(EventEnvelope) and tuple(
    f.name for f in dataclasses.fields(EventEnvelope)
) == ("entity_type", "entity_id", "seq_nr", "offset", "timestamp", "event", "tags", "metadata")


class Journal:
    """Append and read events. Build one with :func:`lagompy.storage.open_storage` or directly
    from a :class:`~lagompy.sql.Database` and a :class:`~lagompy.serialization.Serializer`."""

    def __init__(
        self, database: Database, serializer: Serializer, *, ordering_fence: bool = True
    ) -> None:
        self.database = database
        self.serializer = serializer
        #: the last (microseconds, datetime) an envelope's timestamp was made from
        self._last_timestamp: tuple[int, Any] = (-1, None)
        #: the last (encoded tags, tuple of tags) an envelope's tags were made from
        self._last_tags: tuple[bytes | None, tuple[str, ...]] = (None, ())
        #: What this database's flavour does (``_sqlite.py``, ``_postgres.py``), chosen here once.
        self.backend: JournalBackend = backend_for(database, ordering_fence=ordering_fence)
        #: The query of read_tag, per set of wanted event types (see _tag_page_statement)
        self._tag_page: dict[frozenset[str] | None, Any] = {}

    @property
    def ordering_fence(self) -> bool:
        """On PostgreSQL, every write transaction first takes the journal's write lock (a
        transaction-level advisory lock; readers are not blocked). Writers then allocate
        offsets and commit one after the other, so offsets become visible in order and a
        reader tailing by offset can never skip an event that commits late. Turning it off
        exists only to demonstrate, in the tests, the skips it prevents. (SQLite's writers
        always take turns.)"""
        return self.backend.ordering_fence

    @ordering_fence.setter
    def ordering_fence(self, value: bool) -> None:
        self.backend.ordering_fence = value

    # ------------------------------------------------------------------ writing

    async def append(self, writes: Sequence[AtomicWrite]) -> list[WriteResult]:
        """Append the writes of many entities in one transaction; one result per write.

        A write whose events cannot be encoded or whose expected sequence number is stale fails
        alone (its result carries the error); the others commit. So does a write whose entity
        type, entity id or tags break the id rules (:func:`id_problem`), or whose data the
        database refuses (a value too long, a constraint, a trigger): ``WriteRefused``, naming
        the entity and the reason. Two writes for the same entity in one batch are refused
        (``ValueError``): merge them first. Any other database failure raises a
        ``JournalError`` and nothing of the batch is committed.

        A write's ``replies`` are stored in the same transaction as its events. Two replies with
        one command id in a write, or a reply whose ``seq_nr`` is not one of the write's events,
        are refused (``ValueError``); a command id already stored for the entity fails that write
        alone with ``DuplicateCommandId``.
        """
        seen: set[tuple[str, str]] = set()
        for w in writes:
            key = (w.entity_type, w.entity_id)
            if key in seen:
                raise ValueError(f"two writes for {w.entity_type}/{w.entity_id} in one batch")
            seen.add(key)
            if w.tags and len(w.tags) != len(w.events):
                raise ValueError(
                    f"write for {w.entity_type}/{w.entity_id}: {len(w.events)} events but "
                    f"{len(w.tags)} tag tuples"
                )
            if w.replies:
                _check_replies(w)
        results: dict[int, WriteResult] = {}
        encoded: Batch = []
        for i, w in enumerate(writes):
            if not w.events:
                results[i] = WriteResult(w)
                continue
            try:
                encoded.append((i, self._encode(w)))
            except (SerializationError, WriteRefused) as e:
                results[i] = WriteResult(w, error=e)
        if encoded:
            results.update(await self._append_encoded(encoded))
        return [results[i] for i in range(len(writes))]

    async def append_one(self, write: AtomicWrite) -> tuple[EventEnvelope[Any], ...]:
        """Append one entity's events; raise its error (e.g. ``ConcurrencyConflict``)."""
        (result,) = await self.append([write])
        return result.unwrap()

    def _encode(self, w: AtomicWrite) -> EncodedWrite:
        entity_type, entity_id = w.entity_type, w.entity_id
        if not (
            type(entity_id) is str
            and 0 < len(entity_id) <= MAX_ID_LENGTH
            and "\x00" not in entity_id
            and entity_id.isascii()
            and type(entity_type) is str
        ):
            _check_write_ids(w)
        try:
            meta = msgpack.packb(dict(w.metadata), use_bin_type=True) if w.metadata else None
        except (TypeError, ValueError, OverflowError) as e:
            raise EncodeError(
                f"metadata of the write for {w.entity_type}/{w.entity_id} cannot be encoded "
                f"(only msgpack-native values are allowed): {e}"
            ) from e
        rows: list[tuple[Any, ...]] = []
        tags: list[tuple[str, ...]] = []
        tagged = bool(w.tags)
        first = w.expected_seq_nr + 1
        slice_ = slice_of(entity_id)
        encode = self.serializer.encode
        for n, evt in enumerate(w.events):
            type_name, version, payload = encode(evt)
            these_tags = event_tags(w, n) if tagged else ()
            tags.append(these_tags)
            try:
                packed_tags = _packed_tags(these_tags) if these_tags else None
            except _BadTag as e:
                raise WriteRefused(
                    f"write for {_where(w)} refused: event {n + 1} has {e}",
                    entity_type=entity_type,
                    entity_id=entity_id,
                ) from None
            # In the order of EVENT_COLUMNS (_backend.py), between global_offset and written_at_us.
            rows.append(
                (
                    entity_type,
                    entity_id,
                    first + n,
                    type_name,
                    version,
                    payload,
                    packed_tags,
                    meta,
                    slice_,
                )
            )
        if not w.replies:  # most writes: no list to build
            return EncodedWrite(w, rows, tags)
        replies = [
            (entity_type, entity_id, command_id, seq_nr, payload)
            for command_id, seq_nr, payload in w.replies
        ]
        return EncodedWrite(w, rows, tags, replies)

    async def _append_encoded(self, encoded: Batch) -> dict[int, WriteResult]:
        try:
            return await self._append_checked(encoded)
        except Exception as e:
            if not self._refused_data(e):
                raise  # an outage, a bug: nothing of the batch committed, or its fate is unknown
            refused = e
        return await self._isolate(encoded, refused)

    async def _isolate(self, encoded: Batch, refused: BaseException) -> dict[int, WriteResult]:
        """The database refused the batch because of the data of some write (a value too long,
        a character it does not take, a constraint or a trigger): its statement failed, so
        nothing of the batch committed. Write the batch again in halves, each a transaction of
        its own, down to the writes the database refuses: each of those fails alone with a
        ``WriteRefused`` that names its entity and the database's reason; the others commit.
        Rare, and about two transactions per halving: 2 x log2(n) for one bad write in n.

        A part that fails for another reason (the database went away meanwhile) gets that
        error in each of its writes' results, as a whole batch would; the parts written before
        it stay committed and keep their results."""
        if len(encoded) == 1:
            ((i, enc),) = encoded
            return {i: WriteResult(enc.write, error=_refusal(enc.write, refused))}
        middle = len(encoded) // 2
        results: dict[int, WriteResult] = {}
        for part in (encoded[:middle], encoded[middle:]):
            try:
                results.update(await self._append_checked(part))
            except Exception as e:
                if self._refused_data(e):
                    results.update(await self._isolate(part, e))
                    continue
                error = (
                    e
                    if isinstance(e, LagompyError)
                    else JournalError(f"write failed: {type(e).__name__}: {e}")
                )
                if error is not e:
                    error.__cause__ = e
                for i, enc in part:
                    results[i] = WriteResult(enc.write, error=error)
        return results

    async def _append_checked(self, encoded: Batch) -> dict[int, WriteResult]:
        last_error: BaseException | None = None
        # Command replies are inserted optimistically: a command id already stored for its
        # entity (rare: callers look ids up first) violates the replies' primary key and rolls
        # the batch back. So does, in a large PostgreSQL batch, a write whose expected sequence
        # number is behind the journal (see _postgres.py). The next attempt runs the full check
        # (every entity's highest sequence number and the command ids) and fails such a write
        # alone.
        full_check = False
        for _ in range(_APPEND_ATTEMPTS):
            try:
                return await self.backend.append(encoded, full_check)
            except JournalError as e:
                if not self.backend.is_unique_violation(e.__cause__):
                    raise
                # A concurrent writer committed between our check and our insert, a command id
                # was known already, or a large batch held a stale write: check in full.
                last_error = e.__cause__
                full_check = True
        raise JournalError(
            f"append failed after {_APPEND_ATTEMPTS} attempts: concurrent writers kept conflicting"
        ) from last_error

    def _refused_data(self, error: BaseException) -> bool:
        """Whether the database (or its driver) refused a batch because of the data of one of
        its writes: a statement failed before anything committed, and writing the writes apart
        finds the one it refuses. Not an outage, a lost connection or a race on the unique keys
        (the backend reads its driver's error)."""
        cause = error.__cause__ if isinstance(error, JournalError) else error
        return cause is not None and self.backend.refused_data(cause)

    # ------------------------------------------------------------------ reading

    async def highest_seq_nr(self, entity_type: str, entity_id: str) -> int:
        """The highest sequence number ever written for the entity (deletions never lower it)."""
        async with self.database.read() as conn:
            highest = await _highest_many(conn, [(entity_type, entity_id)])
        return highest.get((entity_type, entity_id), 0)

    async def deleted_to(self, entity_type: str, entity_id: str) -> int:
        """The highest sequence number of the entity's events ever deleted (0: none ever was).

        What recovery decides a deletion from: unlike :meth:`highest_seq_nr`, a concurrent
        writer's new events never change it."""
        return (await self.deletions(entity_type, entity_id))[0]

    async def restarted_at(self, entity_type: str, entity_id: str) -> int:
        """The highest sequence number at which a deletion left the entity no event at all (0:
        none ever did): it was forgotten there. Recovery starts it again from its initial
        state at this number (unless a snapshot reaches it) and replays the events after it;
        events deleted above it are missing, as they would be above 0."""
        return (await self.deletions(entity_type, entity_id))[1]

    async def deletions(self, entity_type: str, entity_id: str) -> tuple[int, int]:
        """:meth:`deleted_to` and :meth:`restarted_at` of the entity, in one query."""
        d = schema.deletions
        async with self.database.read() as conn:
            row = (
                await conn.execute(
                    select(d.c.deleted_to, d.c.restarted_at).where(
                        d.c.entity_type == entity_type, d.c.entity_id == entity_id
                    )
                )
            ).first()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def events(
        self,
        entity_type: str,
        entity_id: str,
        *,
        from_seq_nr: int = 1,
        to_seq_nr: int | None = None,
        limit: int | None = None,
    ) -> list[EventEnvelope[Any]]:
        """The entity's events with ``from_seq_nr <= seq_nr <= to_seq_nr``, in order."""
        if limit is not None and limit <= 0:
            return []
        if to_seq_nr is not None and to_seq_nr < from_seq_nr:
            return []
        t = schema.events
        # The entity's type and id are known: not fetched again for every row.
        stmt = (
            select(*_ENVELOPE_COLUMNS[2:])
            .where(t.c.entity_type == entity_type, t.c.entity_id == entity_id)
            .where(t.c.seq_nr >= from_seq_nr)
            .order_by(t.c.seq_nr)
        )
        if to_seq_nr is not None:
            stmt = stmt.where(t.c.seq_nr <= to_seq_nr)
        if limit is not None:
            stmt = stmt.limit(limit)
        async with self.database.read() as conn:
            rows = (await conn.execute(stmt)).all()
        envelope = self._envelope
        with _collector_paused():
            return [envelope(entity_type, entity_id, *row) for row in rows]

    async def replay(
        self,
        entity_type: str,
        entity_id: str,
        *,
        from_seq_nr: int = 1,
        page_size: int = _REPLAY_PAGE,
    ) -> list[EventEnvelope[Any]]:
        """All of the entity's events from ``from_seq_nr``, read in pages."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        out: list[EventEnvelope[Any]] = []
        start = from_seq_nr
        while True:
            page = await self.events(entity_type, entity_id, from_seq_nr=start, limit=page_size)
            out.extend(page)
            if len(page) < page_size:
                return out
            start = page[-1].seq_nr + 1

    async def replay_many(
        self,
        entity_type: str,
        from_seq_nrs: Mapping[str, int],
        *,
        page_size: int = _REPLAY_PAGE,
    ) -> dict[str, Replayed]:
        """What :meth:`replay` and :meth:`deletions` read for one entity, for many entities of
        one type at once (entity id -> the first sequence number wanted): one
        :class:`Replayed` per id given.

        One query learns every entity's highest sequence number and deletions; then the events
        are read by as few queries as hold them, none of more than ``page_size`` events (an
        entity with more is read in several). Entities with nothing to replay cost no events
        query. An event that cannot be decoded ends its own entity's events (``error``), not
        the others'. Inside a :meth:`Database.read <lagompy.sql.Database.read>` every query
        joins that read transaction.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        starts = {str(i): max(int(s), 1) for i, s in from_seq_nrs.items()}
        ids = list(starts)
        out: dict[str, Replayed] = {}
        async with self.database.read() as conn:
            highest: dict[str, int] = {}
            deleted: dict[str, tuple[int, int]] = {}
            for n in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[n : n + _IDS_PER_QUERY]
                found = await _positions(conn, entity_type, chunk)
                for entity_id, (high, gone, restarted) in found.items():
                    highest[entity_id] = high
                    deleted[entity_id] = (gone, restarted)
                    # No event at or below a restart is left (numbers are never reused): a
                    # forgotten entity's new events are planned as what they are, not as the
                    # whole range from the number asked for (pages of nothing).
                    if starts[entity_id] <= restarted:
                        starts[entity_id] = restarted + 1
            events: dict[str, list[EventEnvelope[Any]]] = {i: [] for i in ids}
            errors: dict[str, EventDecodeError] = {}
            for ranges in _plan(starts, highest, page_size):
                rows = _tuples(await conn.execute(_ranges_query(entity_type, ranges)))
                self._decode_into(entity_type, rows, events, errors)
        for entity_id in ids:
            gone, restarted = deleted.get(entity_id, (0, 0))
            out[entity_id] = Replayed(events[entity_id], gone, errors.get(entity_id), restarted)
        return out

    def _decode_into(
        self,
        entity_type: str,
        rows: Sequence[Any],
        events: dict[str, list[EventEnvelope[Any]]],
        errors: dict[str, EventDecodeError],
    ) -> None:
        """Decode ``(entity_id, seq_nr, ...)`` rows onto each entity's list of events; an
        entity's first undecodable event goes to ``errors`` and ends its events."""
        envelope = self._envelope
        with _collector_paused():
            for row in rows:
                entity_id = row[0]
                if entity_id in errors:
                    continue
                try:
                    events[entity_id].append(envelope(entity_type, *row))
                except EventDecodeError as e:
                    errors[entity_id] = e

    async def events_by_tag(
        self, tag: str, *, after_offset: int = 0, limit: int = 1000
    ) -> list[EventEnvelope[Any]]:
        """Events carrying exactly ``tag``, with offsets above ``after_offset``, in offset order
        (``EventDecodeError`` if one cannot be decoded)."""
        page = await self.read_tag(tag, after_offset=after_offset, limit=limit)
        if page.error is not None:
            raise page.error
        return page.envelopes

    async def read_tag(
        self,
        tag: str,
        *,
        after_offset: int = 0,
        limit: int = 1000,
        event_types: Collection[str] | None = None,
    ) -> TagPage:
        """The next page of up to ``limit`` events carrying exactly ``tag`` after
        ``after_offset``, for a reader that moves its position past every event of the tag.

        With ``event_types`` (stored type names, see ``Serializer.type_names_of``) only the
        events of those types are decoded and returned (the others are not even fetched: their
        payload stays in the database) while the page still covers ``limit`` events of the
        tag. An event that cannot be decoded ends the page early: the page holds the events
        before it and its ``error`` says which one it is."""
        if limit <= 0:
            return TagPage([], after_offset, 0, False)
        wanted = None if event_types is None else frozenset(event_types)
        rows, held = await self._tag_rows(tag, after_offset, limit, wanted)
        envelopes: list[EventEnvelope[Any]] = []
        last = after_offset
        envelope = self._envelope
        with _collector_paused():
            for covered, row in enumerate(rows):
                if wanted is None or row[4] in wanted:
                    try:
                        envelopes.append(envelope(*row))
                    except EventDecodeError as error:
                        return TagPage(envelopes, last, covered, False, error, held)
                last = row[3]
        return TagPage(envelopes, last, len(rows), len(rows) == limit, held=held)

    async def read_tag_made(
        self, tag: str, make: MakeFromEvent, *, after_offset: int = 0, limit: int = 1000
    ) -> TagPage:
        """:meth:`read_tag` for a reader that wants its own objects rather than envelopes:
        each event, decoded, becomes ``make(entity_type, entity_id, seq_nr, offset,
        timestamp, event)`` (None: left out; the page still moves past it) and the page's
        ``envelopes`` are what ``make`` returned; the events' tags and metadata are not
        decoded. An event that cannot be decoded ends the page as in :meth:`read_tag`; an error
        of ``make`` propagates.

        The topics' messages are made so (``lagompy.topic``): through an envelope each, a page
        of 1,000 took 2.55 us per message, made here 2.06 (2026-12-07, CPU reference 14 ms)."""
        if limit <= 0:
            return TagPage([], after_offset, 0, False)
        rows, held = await self._tag_rows(tag, after_offset, limit, None)
        made: list[Any] = []
        append = made.append
        decode = self.serializer.decode
        last = after_offset
        timestamp = self._timestamp
        with _collector_paused():
            for covered, row in enumerate(rows):
                entity_type, entity_id, seq_nr, offset, event_type, version, payload = row[:7]
                try:
                    event = decode(event_type, version, payload)
                except (UnknownType, DecodeError) as e:
                    error = _undecodable(entity_type, entity_id, seq_nr, event_type, offset, e)
                    return TagPage(made, last, covered, False, error, held)
                item = make(entity_type, entity_id, seq_nr, offset, timestamp(row[8]), event)
                if item is not None:
                    append(item)
                last = offset
        return TagPage(made, last, len(rows), len(rows) == limit, held=held)

    async def _tag_rows(
        self, tag: str, after_offset: int, limit: int, wanted: frozenset[str] | None
    ) -> tuple[Sequence[Sequence[Any]], bool]:
        """The rows of a page of ``tag`` (see :meth:`read_tag`), and whether a writer still in
        flight held the read back."""
        stmt = self._tag_page.get(wanted)
        if stmt is None:
            stmt = self._tag_page[wanted] = _tag_page_statement(wanted)
        parameters = {"tag": tag, "after": after_offset, "limit": limit, "visible": _NO_BOUND}
        read = await self.backend.read_page(stmt, parameters)
        if read is not None:
            return read
        async with self.database.read() as conn:
            parameters["visible"], held = await self._visible(conn)
            return _tuples(await conn.execute(stmt, parameters)), held

    async def _visible(self, conn: AsyncConnection) -> tuple[int, bool]:
        """Up to which offset a read by offset on ``conn`` may go, and whether a writer still
        in flight holds it below the offsets allocated so far (see
        :meth:`JournalBackend.visible`). Run before the read's own statement."""
        bound = await self.backend.visible(conn)
        if bound is None:
            return _NO_BOUND, False
        return bound[0], bound[0] < bound[1]

    async def all_events(
        self, *, after_offset: int = 0, limit: int = 1000
    ) -> list[EventEnvelope[Any]]:
        """Events of every entity with an offset above ``after_offset``, in offset order."""
        return (await self.read_all(after_offset=after_offset, limit=limit)).envelopes

    async def read_all(self, *, after_offset: int = 0, limit: int = 1000) -> TagPage:
        """The next page of up to ``limit`` events of every entity after ``after_offset``, as a
        :class:`TagPage` (``EventDecodeError`` if one cannot be decoded)."""
        return await self._read_events((), after_offset, limit)

    async def read_slices(
        self, slices: SliceRange, *, after_offset: int = 0, limit: int = 1000
    ) -> TagPage:
        """The next page of up to ``limit`` events of the entities in ``slices`` (see
        :func:`~lagompy.journal.slice_of`) after ``after_offset``, in offset order, as a
        :class:`TagPage`: what a reader positioned on a slice range reads. Like every read by
        offset it stops below writers still in flight, so it never skips an event that commits
        late (``EventDecodeError`` if one cannot be decoded).

        The events are read in offset order and filtered by slice: a range that holds a good
        part of the journal's entities reads about as fast as the whole journal does."""
        if not isinstance(slices, SliceRange):
            raise TypeError(f"read_slices takes a SliceRange, got {type(slices).__name__}")
        within = (
            (schema.events.c.slice.between(slices.first, slices.last),)
            if len(slices) < SLICES
            else ()
        )
        return await self._read_events(within, after_offset, limit)

    async def _read_events(
        self, where: tuple[ColumnElement[bool], ...], after_offset: int, limit: int
    ) -> TagPage:
        """The page of :meth:`read_all` (``where``: nothing more) and :meth:`read_slices`."""
        e = schema.events
        stmt = (
            select(*_ENVELOPE_COLUMNS)
            .where(
                e.c.global_offset > after_offset,
                e.c.global_offset <= bindparam("visible"),
                *where,
            )
            .order_by(e.c.global_offset)
            .limit(limit)
        )
        async with self.database.read() as conn:
            visible, held = await self._visible(conn)
            rows = _tuples(await conn.execute(stmt, {"visible": visible}))
        envelopes = [self._envelope(*row) for row in rows]
        last = envelopes[-1].offset if envelopes else after_offset
        return TagPage(envelopes, last, len(envelopes), len(envelopes) >= limit, held=held)

    def _timestamp(self, written_at_us: int) -> Any:
        """The datetime of ``written_at_us``. Events written in one transaction share their
        timestamp: one datetime for a run of them (0.37 us each otherwise)."""
        last = self._last_timestamp
        if last[0] == written_at_us:
            return last[1]
        timestamp = from_us(written_at_us)
        self._last_timestamp = (written_at_us, timestamp)
        return timestamp

    def _envelope(
        self,
        entity_type: str,
        entity_id: str,
        seq_nr: int,
        offset: int,
        event_type: str,
        version: int,
        payload: bytes,
        tags: bytes | None,
        written_at_us: int,
        meta: bytes | None,
    ) -> EventEnvelope[Any]:
        try:
            event = self.serializer.decode(event_type, version, payload)
        except (UnknownType, DecodeError) as e:
            raise _undecodable(entity_type, entity_id, seq_nr, event_type, offset, e) from e
        timestamp = self._timestamp(written_at_us)
        # Events of one tag mostly carry the same tags: one tuple for a run of them.
        last_tags = self._last_tags
        if tags == last_tags[0]:
            tag_tuple = last_tags[1]
        else:
            tag_tuple = tuple(msgpack.unpackb(tags)) if tags else ()
            self._last_tags = (tags, tag_tuple)
        metadata = msgpack.unpackb(meta, raw=False) if meta else {}
        if not _FAST_ENVELOPE:  # pragma: no cover - EventEnvelope is a plain frozen dataclass
            return EventEnvelope(
                entity_type, entity_id, seq_nr, offset, timestamp, event, tag_tuple, metadata
            )
        # What EventEnvelope's generated __init__ stores, without its eight object.__setattr__
        # calls: 1.2 -> 0.3 us per envelope, measured 2026-12-03 (CPU reference 12 ms).
        envelope: EventEnvelope[Any] = _new(EventEnvelope)
        d = envelope.__dict__
        d["entity_type"] = entity_type
        d["entity_id"] = entity_id
        d["seq_nr"] = seq_nr
        d["offset"] = offset
        d["timestamp"] = timestamp
        d["event"] = event
        d["tags"] = tag_tuple
        d["metadata"] = metadata
        return envelope

    # ------------------------------------------------------------------ command replies

    async def stored_replies(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], bytes]:
        """The stored replies of the given ``(entity_type, entity_id, command_id)`` that have
        one (unknown ids are absent), as the encoded bytes given to :class:`AtomicWrite`.

        One query, however many keys.
        """
        if not keys:
            return {}
        unique = list(dict.fromkeys((str(t), str(i), str(c)) for t, i, c in keys))
        return await self.backend.stored_replies(unique)

    # ------------------------------------------------------------------ deleting

    async def delete_events(self, entity_type: str, entity_id: str, to_seq_nr: int) -> int:
        """Delete the entity's events up to ``to_seq_nr``; returns how many were deleted.

        The highest sequence number is remembered, so new events never reuse deleted numbers.
        The stored replies of the commands whose events are deleted go with them. A deletion
        that leaves the entity no event at all forgets it: it is recovered from its initial
        state at its highest sequence number, then the events it writes after
        (:meth:`restarted_at`).
        """
        e, tg, d, r = schema.events, schema.event_tags, schema.deletions, schema.command_replies
        async with self.database.write() as conn:
            highest = (await _highest_many(conn, [(entity_type, entity_id)])).get(
                (entity_type, entity_id), 0
            )
            upto = min(to_seq_nr, highest)
            if upto <= 0:
                return 0
            where = (e.c.entity_type == entity_type, e.c.entity_id == entity_id, e.c.seq_nr <= upto)
            offsets = select(e.c.global_offset).where(*where).scalar_subquery()
            await conn.execute(tg.delete().where(tg.c.global_offset.in_(offsets)))
            deleted = (await conn.execute(e.delete().where(*where))).rowcount
            await conn.execute(
                r.delete().where(
                    r.c.entity_type == entity_type,
                    r.c.entity_id == entity_id,
                    r.c.seq_nr <= upto,
                )
            )
            entity = (d.c.entity_type == entity_type, d.c.entity_id == entity_id)
            # In the same transaction as the delete: whether any event is left (one written
            # after ``upto`` meanwhile, or one this deletion did not reach).
            left = (
                await conn.execute(
                    select(e.c.seq_nr)
                    .where(e.c.entity_type == entity_type, e.c.entity_id == entity_id)
                    .limit(1)
                )
            ).first()
            previous = (await conn.execute(select(d.c.deleted_to).where(*entity))).scalar()
            deleted_to = max(int(previous or 0), upto)
            values: dict[str, int] = {"deleted_to": deleted_to}
            if left is None:
                # No event left: the entity was forgotten, and starts again from its initial
                # state above every number it ever used.
                values["restarted_at"] = deleted_to
            if previous is None:
                await conn.execute(
                    insert(d).values(entity_type=entity_type, entity_id=entity_id, **values)
                )
            elif previous < upto or left is None:
                await conn.execute(d.update().where(*entity).values(**values))
        return int(deleted or 0)


def _tag_page_statement(wanted: frozenset[str] | None) -> Any:
    """The query of :meth:`Journal.read_tag` (parameters ``tag``, ``after``, ``limit`` and
    ``visible``), built once per set of wanted event types: a SQLite backend sends it to the
    driver as it was compiled the first time (see :meth:`JournalBackend.read_page`).

    The page of offsets first, from the (tag, offset) key, then the events: the plan stays an
    index range scan whatever the table statistics say (a join ordered by offset fell to a
    full sort of the table after a bulk load, 10x slower)."""
    e, tg = schema.events, schema.event_tags
    page = (
        select(tg.c.global_offset)
        .where(
            tg.c.tag == bindparam("tag", None),
            tg.c.global_offset > bindparam("after", None),
            tg.c.global_offset <= bindparam("visible", None),
        )
        .order_by(tg.c.global_offset)
        .limit(bindparam("limit", None, type_=Integer))
        .subquery("page")
    )
    columns: list[Any] = list(_ENVELOPE_COLUMNS)
    if wanted is not None:
        # Only the wanted events' payloads are fetched (the others stay in the database).
        payload = e.c.payload
        columns[6] = case((e.c.event_type.in_(sorted(wanted)), payload), else_=null()).label(
            "payload"
        )
    return (
        select(*columns)
        .select_from(page.join(e, e.c.global_offset == page.c.global_offset))
        .order_by(page.c.global_offset)
    )


@dataclass(frozen=True)
class TagPage:
    """One page of a tag read by :meth:`Journal.read_tag`."""

    #: The events wanted, decoded, in offset order.
    envelopes: list[EventEnvelope[Any]]
    #: The position the page reaches: the offset of its last event, wanted or not (or of the
    #: last one before an undecodable event); the reader's ``after_offset`` if it is empty.
    last_offset: int
    #: How many events of the tag the page covers, up to ``last_offset`` (wanted or not).
    scanned: int
    #: True when the page is full: more events may follow at once.
    full: bool
    #: The first event of the page that could not be decoded (it carries its ``offset``):
    #: the page ends before it.
    error: EventDecodeError | None = None
    #: True when a writer still in flight held the read back (PostgreSQL): events above its
    #: offsets may be committed already, and are read once it commits (its NOTIFY wakes the
    #: tailers) or rolls back (tailers then look again shortly).
    held: bool = False


@dataclass(frozen=True)
class Replayed:
    """What :meth:`Journal.replay_many` read for one entity."""

    #: The entity's events from the sequence number asked for, in order (up to ``error``).
    events: list[EventEnvelope[Any]]
    #: As :meth:`Journal.deleted_to`: the highest sequence number of its events ever deleted.
    deleted_to: int
    #: The first of its events that could not be decoded (``events`` end before it).
    error: EventDecodeError | None = None
    #: As :meth:`Journal.restarted_at`: where a deletion last left it no event (0: never).
    restarted_at: int = 0


#: Entity ids per query of :meth:`Journal.replay_many` (each costs one or two bound parameters).
_IDS_PER_QUERY = 500


async def _positions(
    conn: AsyncConnection, entity_type: str, ids: Sequence[str]
) -> dict[str, tuple[int, int, int]]:
    """Per entity of ``ids`` that has events or deletions: (its highest event's sequence
    number, the highest it ever deleted, where it restarted), each 0 when there is none (one
    round trip)."""
    e, d = schema.events, schema.deletions
    stmt = union_all(
        select(
            e.c.entity_id,
            func.max(e.c.seq_nr).label("n"),
            literal_column("0").label("deleted"),
            literal_column("0").label("restarted"),
        )
        .where(e.c.entity_type == entity_type, e.c.entity_id.in_(ids))
        .group_by(e.c.entity_id),
        select(
            d.c.entity_id,
            literal_column("0").label("n"),
            d.c.deleted_to.label("deleted"),
            d.c.restarted_at.label("restarted"),
        ).where(d.c.entity_type == entity_type, d.c.entity_id.in_(ids)),
    )
    out: dict[str, tuple[int, int, int]] = {}
    for entity_id, n, gone, restarted in (await conn.execute(stmt)).all():
        high, deleted, since = out.get(entity_id, (0, 0, 0))
        out[entity_id] = (
            max(high, int(n or 0)),
            max(deleted, int(gone or 0)),
            max(since, int(restarted or 0)),
        )
    return out


#: ``(entity id, first seq nr, last seq nr or None for all the rest)``
_Range = tuple[str, int, int | None]


def _plan(
    starts: Mapping[str, int], highest: Mapping[str, int], page_size: int
) -> Iterator[list[_Range]]:
    """The ranges of events to read, in queries of at most ``page_size`` events (as counted by
    the highest sequence numbers: per entity the events above a deletion run without gaps).
    An entity whose events fit whole in a query is read to its end (events a concurrent writer
    commits meanwhile come along); a longer one is cut into ranges over several queries."""
    query: list[_Range] = []
    room = page_size
    for entity_id, start in starts.items():
        last = highest.get(entity_id, 0)
        while start <= last:
            count = last - start + 1
            if count <= room:
                query.append((entity_id, start, None))
                room -= count
                break
            query.append((entity_id, start, start + room - 1))
            start += room
            yield query
            query, room = [], page_size
        if len(query) >= _IDS_PER_QUERY:
            yield query
            query, room = [], page_size
    if query:
        yield query


def _ranges_query(entity_type: str, ranges: Sequence[_Range]) -> Any:
    """The events of ``ranges`` (one entity type), by entity then sequence number. The open
    ranges that start at the same number share one ``IN``."""
    t = schema.events
    open_from: dict[int, list[str]] = {}
    conditions = []
    for entity_id, first, last in ranges:
        if last is None:
            open_from.setdefault(first, []).append(entity_id)
        else:
            conditions.append(
                and_(t.c.entity_id == entity_id, t.c.seq_nr >= first, t.c.seq_nr <= last)
            )
    for first, ids in open_from.items():
        if len(ids) == 1:
            conditions.append(and_(t.c.entity_id == ids[0], t.c.seq_nr >= first))
        else:
            conditions.append(and_(t.c.entity_id.in_(ids), t.c.seq_nr >= first))
    return (
        select(t.c.entity_id, *_ENVELOPE_COLUMNS[2:])
        .where(t.c.entity_type == entity_type, or_(*conditions))
        .order_by(t.c.entity_id, t.c.seq_nr)
    )


def _refusal(w: AtomicWrite, refused: BaseException) -> WriteRefused:
    cause = refused.__cause__ if isinstance(refused, JournalError) else refused
    # The first line: PostgreSQL's DETAIL line repeats the whole refused row.
    reason = str(cause if cause is not None else refused).strip().split("\n", 1)[0]
    if len(reason) > 300:
        reason = reason[:300] + "..."
    error = WriteRefused(
        f"write for {_where(w)} refused by the database: {reason}; the other writes of its "
        "batch went ahead without it",
        entity_type=w.entity_type,
        entity_id=w.entity_id,
    )
    error.__cause__ = cause
    return error


async def _highest_many(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Highest sequence number per entity, taking deletions into account (one round trip)."""
    if not keys:
        return {}
    by_type: dict[str, list[str]] = {}
    for entity_type, entity_id in keys:
        by_type.setdefault(entity_type, []).append(entity_id)
    e, d = schema.events, schema.deletions
    parts = []
    for entity_type, ids in by_type.items():
        parts.append(
            select(e.c.entity_type, e.c.entity_id, func.max(e.c.seq_nr).label("n"))
            .where(e.c.entity_type == entity_type, e.c.entity_id.in_(ids))
            .group_by(e.c.entity_type, e.c.entity_id)
        )
        parts.append(
            select(d.c.entity_type, d.c.entity_id, d.c.deleted_to.label("n")).where(
                d.c.entity_type == entity_type, d.c.entity_id.in_(ids)
            )
        )
    result: dict[tuple[str, str], int] = {}
    for entity_type, entity_id, n in (await conn.execute(union_all(*parts))).all():
        key = (entity_type, entity_id)
        result[key] = max(result.get(key, 0), int(n))
    return result
