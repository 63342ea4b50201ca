"""What the :class:`~lagompy.journal.Journal` front asks of a database flavour.

The front (``_journal.py``) checks and encodes a batch, retries it when the unique keys caught a
race, writes it again in parts when the database refused the data of one of its writes, and
reads with SQLAlchemy Core, the same on every database. What differs per database is behind
:class:`JournalBackend`, one implementation per module: ``_sqlite.py`` and ``_postgres.py``. The
front picks one when it is built (:func:`lagompy.journal._journal.backend_for`), from the
database's dialect, and never looks at the dialect again.

Also here: the steps both write paths share (:func:`check_expected`, :func:`record_offsets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lagompy.errors import ConcurrencyConflict, DuplicateCommandId
from lagompy.journal._model import AtomicWrite, WriteResult, write_result

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

#: Column order of the event rows the append paths write (COPY and executemany).
EVENT_COLUMNS = (
    "global_offset",
    "entity_type",
    "entity_id",
    "seq_nr",
    "event_type",
    "event_version",
    "payload",
    "tags",
    "metadata",
    "slice",
    "written_at_us",
)

#: Column order of the command reply rows (COPY and executemany).
REPLY_COLUMNS = ("entity_type", "entity_id", "command_id", "seq_nr", "payload")


@dataclass(slots=True)
class EncodedWrite:
    """An :class:`AtomicWrite` encoded for the database: its event rows (in the order of
    :data:`EVENT_COLUMNS`, between ``global_offset`` and ``written_at_us``), each event's tags
    and its command reply rows."""

    write: AtomicWrite
    rows: list[tuple[Any, ...]]
    tags: list[tuple[str, ...]]
    #: (entity_type, entity_id, command_id, seq_nr, payload), in the replies table's order
    replies: list[tuple[str, str, str, int, bytes]] = field(default_factory=list)


#: The writes of a batch that reach the database, each with its position in the batch.
Batch = list[tuple[int, EncodedWrite]]


class JournalBackend(Protocol):
    """One database flavour of the journal: its write path, the reads that need its own SQL,
    and how to read its driver's errors."""

    #: Whether writers take the journal's write lock so that offsets become visible in order
    #: (see :attr:`lagompy.journal.Journal.ordering_fence`).
    ordering_fence: bool

    async def append(self, batch: Batch, full_check: bool) -> dict[int, WriteResult]:
        """Write the batch in one transaction: check every write's expected sequence number
        (and, with ``full_check``, its command ids against the stored replies), allocate the
        offsets of the writes that pass, insert their events, tags and replies and (where the
        database can) wake the live tailers. One result per write of the batch, by its
        position. A race on the unique keys raises (the front retries with ``full_check``); so
        does a refusal of the data."""
        ...

    def is_unique_violation(self, error: BaseException | None) -> bool:
        """Whether the driver's ``error`` is a unique (or primary) key violation: a race with
        another writer or a known command id, not the write's data."""
        ...

    def refused_data(self, cause: BaseException) -> bool:
        """Whether the driver's ``cause`` says the database refused the data of one of the
        batch's writes (a value too long, a constraint, a trigger): writing the writes apart
        finds it. Not an outage, a lost connection or a race on the unique keys."""
        ...

    async def stored_replies(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], bytes]:
        """The stored replies of the given distinct ``(entity_type, entity_id, command_id)``
        that have one, in one query."""
        ...

    async def save_snapshots(self, written_at: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Save snapshot rows (one per entity and sequence number, the columns of the
        snapshots table) in one transaction, replacing any at the same sequence number."""
        ...

    async def visible(self, conn: AsyncConnection) -> tuple[int, int] | None:
        """Before a read by offset, on the read's connection: ``(visible, last)``, the offset
        up to which the read may go without skipping an event that a writer still in flight
        will commit, and the highest offset allocated so far (``visible < last`` while a
        writer is in flight). The read must run as a later statement (a later snapshot).
        None when writers commit in offset order anyway (SQLite's take turns)."""
        ...

    async def read_page(
        self, statement: Any, parameters: Mapping[str, Any]
    ) -> tuple[Sequence[Sequence[Any]], bool] | None:
        """A read by offset (``statement``, a SELECT built once and used again, with
        ``parameters``, ``visible`` at no bound) done by the backend on its driver, faster
        than SQLAlchemy would: the rows, as plain sequences of the stored values, and whether
        a writer still in flight held the read back (:meth:`visible`, which the backend
        applies itself, as a statement before the read's). None (here, for every backend
        that does not say otherwise): the front reads it with SQLAlchemy, after
        :meth:`visible`."""
        return None


#: Statements :class:`DriverStatements` remembers compiled before it starts again.
_COMPILED_MEMO = 64


class DriverStatements:
    """SELECTs built once with SQLAlchemy Core and sent by a backend to its driver as they were
    compiled the first time, for reads whose SQL is the same on every database
    (:meth:`JournalBackend.read_page`): SQLAlchemy's execution (its compiled cache lookup,
    the execution context, the result's processing) cost more per page than the driver's
    query on both databases."""

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        #: compiled statements, by identity (the statement held with it); None: not plain
        self._compiled: dict[int, tuple[Any, Any]] = {}

    def compiled(self, statement: Any) -> Any | None:
        """``statement`` compiled for the dialect (once), or None when it cannot be sent as
        compiled (literal parameters rendered at execution)."""
        compiled = self._compiled.get(id(statement))
        if compiled is None or compiled[0] is not statement:
            if len(self._compiled) >= _COMPILED_MEMO:
                self._compiled.clear()
            made = statement.compile(dialect=self.dialect)
            plain = made.positional and not made.literal_execute_params
            compiled = self._compiled[id(statement)] = (statement, made if plain else None)
        return compiled[1]

    @staticmethod
    def positional(compiled: Any, parameters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL of ``compiled`` (from :meth:`compiled`) in the dialect's positional style
        and its arguments in order, through the bind processors."""
        state = compiled.construct_expanded_state(parameters, escape_names=False)
        values, processors = state.parameters, state.processors
        args = [
            processors[name](values[name]) if name in processors else values[name]
            for name in state.positiontup or ()
        ]
        return state.statement, args


def refused_encoding(cause: BaseException) -> bool:
    """A value the driver could not encode for any database (text that is not UTF-8, an
    integer out of range): the write's data, whatever the backend."""
    return isinstance(cause, (UnicodeEncodeError, OverflowError))


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """``rows`` as ``width`` column lists (the arrays unnest takes), even when empty."""
    return [[r[c] for r in rows] for c in range(width)]


def check_expected(
    encoded: Batch,
    highest: Mapping[tuple[str, str], int],
    known_replies: set[tuple[str, str, str]] | frozenset[tuple[str, str, str]] = frozenset(),
) -> tuple[dict[int, WriteResult], Batch]:
    """Split writes into failures (results: a stale expected seq nr, or a command id whose reply
    is already stored) and the ones that can be written."""
    results: dict[int, WriteResult] = {}
    accepted: Batch = []
    for i, enc in encoded:
        w = enc.write
        actual = highest.get((w.entity_type, w.entity_id), 0)
        if actual != w.expected_seq_nr:
            results[i] = WriteResult(
                w,
                error=ConcurrencyConflict(
                    entity_type=w.entity_type,
                    entity_id=w.entity_id,
                    expected_seq_nr=w.expected_seq_nr,
                    actual_seq_nr=actual,
                ),
            )
            continue
        duplicate = (
            next((r[2] for r in enc.replies if r[:3] in known_replies), None)
            if enc.replies and known_replies
            else None
        )
        if duplicate is not None:
            results[i] = WriteResult(
                w,
                error=DuplicateCommandId(
                    f"command {duplicate!r} was already applied to {w.entity_type}/"
                    f"{w.entity_id} (its reply is stored), so this write was not applied; "
                    "ask with check_duplicate to get the stored reply",
                    command_id=duplicate,
                ),
            )
        else:
            accepted.append((i, enc))
    return results, accepted


def record_offsets(
    accepted: Batch,
    offsets: Sequence[int],
    written_at: int,
    results: dict[int, WriteResult],
    *,
    with_tags: bool = True,
) -> list[tuple[str, int]]:
    """Give each accepted write its slice of ``offsets``; return the (tag, offset) rows (none
    when not ``with_tags``: a write path that stored the tags already)."""
    tag_rows: list[tuple[str, int]] = []
    pos = 0
    for i, enc in accepted:
        n = len(enc.rows)
        mine = (offsets[pos],) if n == 1 else tuple(offsets[pos : pos + n])
        pos += n
        if with_tags:
            for event_tags, offset in zip(enc.tags, mine, strict=True):
                for t in event_tags:
                    tag_rows.append((t, offset))
        results[i] = write_result(enc.write, mine, written_at)
    return tag_rows
