"""The event journal: append batches for many entities at once, read them back.

One call to :meth:`Journal.append` is one database transaction (group commit). Each entity's
write carries the highest sequence number its writer has seen; an entity whose number is stale
(another writer got there first) gets its own :class:`~lagompy.errors.ConcurrencyConflict` and
writes nothing, while the other entities of the batch commit. The unique constraint on
``(entity_type, entity_id, seq_nr)`` backs this up should two writers race.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgpack
from sqlalchemy import func, insert, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy import schema
from lagompy.database import Database, translate_errors
from lagompy.errors import (
    ConcurrencyConflict,
    DecodeError,
    EventDecodeError,
    JournalError,
    LagompyError,
    SerializationError,
    UnknownType,
)
from lagompy.serialization import Serializer

E = TypeVar("E")

#: How many times a batch is re-checked and retried when the unique constraint caught a race.
_APPEND_ATTEMPTS = 5
_REPLAY_PAGE = 1000


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


def now_us() -> int:
    return time.time_ns() // 1000


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


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


@dataclass(frozen=True)
class AtomicWrite:
    """Events for one entity, written all or none.

    ``expected_seq_nr`` is the highest sequence number the writer has seen (0 for a new entity);
    the events get ``expected_seq_nr + 1``, ``+ 2``, ... ``tags`` holds one tuple of tags per
    event (or is empty for untagged events).
    """

    entity_type: str
    entity_id: str
    expected_seq_nr: int
    events: Sequence[Any]
    tags: Sequence[Sequence[str]] = ()
    metadata: Mapping[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity_type, self.entity_id)


@dataclass(frozen=True)
class WriteResult:
    """What happened to one :class:`AtomicWrite` of a batch."""

    write: AtomicWrite
    envelopes: tuple[EventEnvelope[Any], ...] = ()
    error: LagompyError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> tuple[EventEnvelope[Any], ...]:
        if self.error is not None:
            raise self.error
        return self.envelopes


@dataclass
class _Encoded:
    write: AtomicWrite
    rows: list[dict[str, Any]]
    tags: list[tuple[str, ...]]


class Journal:
    """Append and read events. Build one with :func:`lagompy.storage.open_storage` or directly
    from a :class:`~lagompy.database.Database` and a :class:`~lagompy.serialization.Serializer`."""

    def __init__(self, database: Database, serializer: Serializer) -> None:
        self.database = database
        self.serializer = serializer

    # ------------------------------------------------------------------ writing

    async def append(self, writes: Sequence[AtomicWrite]) -> list[WriteResult]:
        """Append the writes of many entities in one transaction; one result per write.

        A write whose events cannot be encoded or whose expected sequence number is stale fails
        alone (its result carries the error); the others commit. Two writes for the same entity
        in one batch are refused (``ValueError``): merge them first. A database failure raises
        a ``JournalError`` and nothing of the batch is committed.
        """
        seen: set[tuple[str, str]] = set()
        for w in writes:
            if w.key in seen:
                raise ValueError(f"two writes for {w.entity_type}/{w.entity_id} in one batch")
            seen.add(w.key)
            if w.tags and len(w.tags) != len(w.events):
                raise ValueError(
                    f"write for {w.entity_type}/{w.entity_id}: {len(w.events)} events but "
                    f"{len(w.tags)} tag tuples"
                )
        results: dict[int, WriteResult] = {}
        encoded: list[tuple[int, _Encoded]] = []
        for i, w in enumerate(writes):
            if not w.events:
                results[i] = WriteResult(w)
                continue
            try:
                encoded.append((i, self._encode(w)))
            except SerializationError as e:
                results[i] = WriteResult(w, error=e)
        if encoded:
            results.update(await self._append_encoded(encoded))
        return [results[i] for i in range(len(writes))]

    async def append_one(self, write: AtomicWrite) -> tuple[EventEnvelope[Any], ...]:
        """Append one entity's events; raise its error (e.g. ``ConcurrencyConflict``)."""
        (result,) = await self.append([write])
        return result.unwrap()

    def _encode(self, w: AtomicWrite) -> _Encoded:
        meta = msgpack.packb(dict(w.metadata), use_bin_type=True) if w.metadata else None
        rows = []
        tags: list[tuple[str, ...]] = []
        for n, evt in enumerate(w.events):
            type_name, version, payload = self.serializer.encode(evt)
            event_tags = tuple(w.tags[n]) if w.tags else ()
            tags.append(event_tags)
            rows.append(
                {
                    "entity_type": w.entity_type,
                    "entity_id": w.entity_id,
                    "seq_nr": w.expected_seq_nr + 1 + n,
                    "event_type": type_name,
                    "event_version": version,
                    "payload": payload,
                    "tags": msgpack.packb(list(event_tags)) if event_tags else None,
                    "metadata": meta,
                }
            )
        return _Encoded(w, rows, tags)

    async def _append_encoded(
        self, encoded: list[tuple[int, _Encoded]]
    ) -> dict[int, WriteResult]:
        last_error: BaseException | None = None
        for _ in range(_APPEND_ATTEMPTS):
            try:
                return await self._append_once(encoded)
            except JournalError as e:
                if not isinstance(e.__cause__, IntegrityError):
                    raise
                # A concurrent writer committed between our check and our insert: check again.
                last_error = e.__cause__
        raise JournalError(
            f"append failed after {_APPEND_ATTEMPTS} attempts: concurrent writers kept "
            "conflicting"
        ) from last_error

    async def _append_once(self, encoded: list[tuple[int, _Encoded]]) -> dict[int, WriteResult]:
        results: dict[int, WriteResult] = {}
        async with self.database.write() as conn:
            highest = await _highest_many(conn, [enc.write.key for _, enc in encoded])
            accepted: list[tuple[int, _Encoded]] = []
            for i, enc in encoded:
                w = enc.write
                actual = highest.get(w.key, 0)
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
                else:
                    accepted.append((i, enc))
            if not accepted:
                return results
            written_at = now_us()
            rows = []
            for _, enc in accepted:
                for row in enc.rows:
                    row["written_at_us"] = written_at
                    rows.append(row)
            stmt = insert(schema.events).returning(
                schema.events.c.global_offset, sort_by_parameter_order=True
            )
            offsets = list((await conn.execute(stmt, rows)).scalars())
            tag_rows = []
            pos = 0
            timestamp = from_us(written_at)
            for i, enc in accepted:
                envelopes = []
                w = enc.write
                for n, evt in enumerate(w.events):
                    offset = offsets[pos]
                    pos += 1
                    for t in enc.tags[n]:
                        tag_rows.append({"tag": t, "global_offset": offset})
                    envelopes.append(
                        EventEnvelope(
                            entity_type=w.entity_type,
                            entity_id=w.entity_id,
                            seq_nr=w.expected_seq_nr + 1 + n,
                            offset=offset,
                            timestamp=timestamp,
                            event=evt,
                            tags=enc.tags[n],
                            metadata=dict(w.metadata or {}),
                        )
                    )
                results[i] = WriteResult(w, envelopes=tuple(envelopes))
            if tag_rows:
                await conn.execute(insert(schema.event_tags), tag_rows)
        return results

    # ------------------------------------------------------------------ reading

    async def highest_seq_nr(self, entity_type: str, entity_id: str) -> int:
        """The highest sequence number ever written for the entity (deletions never lower it)."""
        async with self.database.read() as conn:
            highest = await _highest_many(conn, [(entity_type, entity_id)])
        return highest.get((entity_type, entity_id), 0)

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
        stmt = (
            select(
                t.c.seq_nr,
                t.c.global_offset,
                t.c.event_type,
                t.c.event_version,
                t.c.payload,
                t.c.tags,
                t.c.written_at_us,
                t.c.metadata,
            )
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
        return [
            self._envelope(entity_type, entity_id, seq, off, et, ev, payload, tags, ts, meta)
            for (seq, off, et, ev, payload, tags, ts, meta) in rows
        ]

    async def replay(
        self,
        entity_type: str,
        entity_id: str,
        *,
        from_seq_nr: int = 1,
        page_size: int = _REPLAY_PAGE,
    ) -> list[EventEnvelope[Any]]:
        """All of the entity's events from ``from_seq_nr``, read in pages."""
        out: list[EventEnvelope[Any]] = []
        start = from_seq_nr
        while True:
            page = await self.events(entity_type, entity_id, from_seq_nr=start, limit=page_size)
            out.extend(page)
            if len(page) < page_size:
                return out
            start = page[-1].seq_nr + 1

    async def events_by_tag(
        self, tag: str, *, after_offset: int = 0, limit: int = 1000
    ) -> list[EventEnvelope[Any]]:
        """Events carrying exactly ``tag``, with offsets above ``after_offset``, in offset order."""
        e, tg = schema.events, schema.event_tags
        stmt = (
            select(*_ENVELOPE_COLUMNS)
            .select_from(tg.join(e, e.c.global_offset == tg.c.global_offset))
            .where(tg.c.tag == tag, tg.c.global_offset > after_offset)
            .order_by(tg.c.global_offset)
            .limit(limit)
        )
        return await self._read_envelopes(stmt)

    async def all_events(
        self, *, after_offset: int = 0, limit: int = 1000
    ) -> list[EventEnvelope[Any]]:
        """Events of every entity with an offset above ``after_offset``, in offset order."""
        e = schema.events
        stmt = (
            select(*_ENVELOPE_COLUMNS)
            .where(e.c.global_offset > after_offset)
            .order_by(e.c.global_offset)
            .limit(limit)
        )
        return await self._read_envelopes(stmt)

    async def _read_envelopes(self, stmt: Any) -> list[EventEnvelope[Any]]:
        async with self.database.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [self._envelope(*row) for row in rows]

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
            raise EventDecodeError(
                entity_type=entity_type,
                entity_id=entity_id,
                seq_nr=seq_nr,
                type_name=event_type,
                reason=str(e),
            ) from e
        return EventEnvelope(
            entity_type=entity_type,
            entity_id=entity_id,
            seq_nr=seq_nr,
            offset=offset,
            timestamp=from_us(written_at_us),
            event=event,
            tags=tuple(msgpack.unpackb(tags)) if tags else (),
            metadata=msgpack.unpackb(meta, raw=False) if meta else {},
        )

    # ------------------------------------------------------------------ deleting

    async def delete_events(self, entity_type: str, entity_id: str, to_seq_nr: int) -> int:
        """Delete the entity's events up to ``to_seq_nr``; returns how many were deleted.

        The highest sequence number is remembered, so new events never reuse deleted numbers.
        """
        e, tg, d = schema.events, schema.event_tags, schema.deletions
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
            previous = (
                await conn.execute(
                    select(d.c.deleted_to).where(
                        d.c.entity_type == entity_type, d.c.entity_id == entity_id
                    )
                )
            ).scalar()
            if previous is None:
                await conn.execute(
                    insert(d).values(entity_type=entity_type, entity_id=entity_id, deleted_to=upto)
                )
            elif previous < upto:
                await conn.execute(
                    d.update()
                    .where(d.c.entity_type == entity_type, d.c.entity_id == entity_id)
                    .values(deleted_to=upto)
                )
        return int(deleted or 0)

    async def ensure_tables(self) -> None:
        """Create lagompy's tables if they are missing."""
        with translate_errors("creating tables"):
            async with self.database.engine.begin() as conn:
                await conn.run_sync(schema.metadata.create_all)


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
