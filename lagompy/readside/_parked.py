"""Parked events: what a consumer with ``on_failure="park"`` gave up on, kept for an operator.

One row of ``lagompy_parked`` (see ``lagompy/sql/_schema.py``) per event of a read side or
message of a topic subscriber that still failed after ``max_attempts``. The worker writes it in
the same fenced transaction that moves its offset past the event, so the consumer goes on and
the event is never lost nor parked by a worker whose lease another took::

    BEGIN
      INSERT INTO lagompy_parked (...)  -- or, parked before (the offset was set back): update it
      UPDATE lagompy_readside_offsets SET last_offset = :offset ... WHERE ... AND epoch = :mine
      -- no row: the lease was taken -> LeaseLost, ROLLBACK: neither the row nor the offset
    COMMIT

An operator's *retry* only marks rows (``retry_requested_us``): the worker that holds the
consumer's lease learns of it from its lease renewals and commits (their RETURNING says whether
a retry waits: no query of this table of its own), picks them up within ``renew_interval``
and, for each, runs the handler again,
deletes the row and extends its lease (fenced) in one transaction: the effect happens exactly
once, or the row stays with the new error. A retried event runs out of order: after the later
events of its entity, which the consumer handled meanwhile. *Discard* deletes rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.errors import ConfigurationError
from lagompy.journal._journal import from_us, now_us
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database

__all__ = [
    "MAX_LIST",
    "ConsumerKind",
    "ParkedEvent",
    "ParkedFilter",
    "ParkedStore",
]

_P = schema.parked

ConsumerKind = Literal["read-side", "subscriber"]

#: The most rows one listing returns.
MAX_LIST = 1000


@dataclass(frozen=True)
class ParkedEvent:
    """One parked event (or message) as stored."""

    id: int
    #: ``read-side`` or ``subscriber``.
    consumer_kind: str
    #: The read-side processor's name, or the group's ``topic:<topic>:<group>``.
    consumer: str
    tag: str
    offset: int
    entity_type: str | None
    entity_id: str | None
    seq_nr: int | None
    event_type: str | None
    #: The error's class (``RuntimeError``, ``database error UniqueViolationError``...).
    error_class: str
    #: The last error as failures show it (no SQL text nor parameters).
    error: str
    #: Tries before it was parked.
    attempts: int
    parked_at: datetime
    #: An operator asked for a retry that the worker has not run yet.
    retry_requested: bool
    #: Operators' retries that failed again.
    retries: int
    #: A subscriber's message, as its JSON text (None for a read side: its event is re-read
    #: from the journal).
    message: str | None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parked_at"] = self.parked_at.isoformat()
        return out


@dataclass(frozen=True)
class ParkedFilter:
    """Which parked rows: of a consumer (a read-side processor or ``topic:<topic>:<group>``),
    a tag, an error class, an entity (``type`` or ``type/id``), or given ``ids``; None
    matches any."""

    consumer: str | None = None
    tag: str | None = None
    error_class: str | None = None
    entity: str | None = None
    ids: tuple[int, ...] | None = None
    #: ``read-side`` or ``subscriber`` only.
    kind: str | None = None

    def __post_init__(self) -> None:
        for name in ("consumer", "tag", "error_class", "entity", "kind"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 255):
                raise ConfigurationError(
                    f"the parked filter's {name} must be a string of at most 255 characters, "
                    f"got {value!r:.80}"
                )
        if self.ids is not None:
            if len(self.ids) > MAX_LIST:
                raise ConfigurationError(f"name at most {MAX_LIST} parked ids at once")
            for i in self.ids:
                if not isinstance(i, int) or isinstance(i, bool) or i < 1:
                    raise ConfigurationError(
                        f"a parked event's id is an integer >= 1, got {i!r:.40}"
                    )

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.consumer is not None:
            clauses.append(_P.c.consumer == self.consumer)
        if self.kind is not None:
            clauses.append(_P.c.consumer_kind == self.kind)
        if self.tag is not None:
            clauses.append(_P.c.tag == self.tag)
        if self.error_class is not None:
            clauses.append(_P.c.error_class == self.error_class)
        if self.entity is not None:
            kind, _, entity_id = self.entity.partition("/")
            clauses.append(_P.c.entity_type == kind)
            if entity_id:
                clauses.append(_P.c.entity_id == entity_id)
        if self.ids is not None:
            clauses.append(_P.c.id.in_(sorted(set(self.ids))))
        return clauses

    def describe(self) -> str:
        parts = [
            f"consumer={self.consumer or '*'}",
            f"error={self.error_class or '*'}",
            f"entity={self.entity or '*'}",
        ]
        if self.tag is not None:
            parts.insert(1, f"tag={self.tag}")
        if self.ids is not None:
            parts.append("ids=" + ",".join(str(i) for i in self.ids))
        return ", ".join(parts)


def _event(r: Any) -> ParkedEvent:
    return ParkedEvent(
        id=int(r["id"]),
        consumer_kind=r["consumer_kind"],
        consumer=r["consumer"],
        tag=r["tag"],
        offset=int(r["event_offset"]),
        entity_type=r["entity_type"],
        entity_id=r["entity_id"],
        seq_nr=None if r["seq_nr"] is None else int(r["seq_nr"]),
        event_type=r["event_type"],
        error_class=r["error_class"],
        error=r["error"],
        attempts=int(r["attempts"]),
        parked_at=from_us(int(r["parked_at_us"])),
        retry_requested=r["retry_requested_us"] is not None,
        retries=int(r["retries"]),
        message=r["message"],
    )


class ParkedStore:
    """Reads and writes ``lagompy_parked`` in one projection database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # ------------------------------------------------------------------ the worker's

    async def park(
        self,
        conn: AsyncConnection,
        *,
        kind: ConsumerKind,
        consumer: str,
        tag: str,
        offset: int,
        entity_type: str | None,
        entity_id: str | None,
        seq_nr: int | None,
        event_type: str | None,
        error_class: str,
        error: str,
        attempts: int,
        message: str | None,
    ) -> None:
        """Inside the transaction that moves the offset past ``offset``: park it (an event
        parked before, whose offset was set back since, gets the new error)."""
        values: dict[str, Any] = {
            "consumer_kind": kind,
            "consumer": consumer,
            "tag": tag,
            "event_offset": offset,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "seq_nr": seq_nr,
            "event_type": event_type,
            "error_class": error_class[:255],
            "error": error[:4000],
            "attempts": attempts,
            "parked_at_us": now_us(),
            "message": message,
            "retry_requested_us": None,
            "retries": 0,
        }
        insert = postgresql.insert if self.database.dialect == "postgresql" else sqlite.insert
        stmt = insert(_P).values(**values)
        changed = {
            k: stmt.excluded[k]
            for k in ("error_class", "error", "attempts", "parked_at_us", "message")
        }
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["consumer", "tag", "event_offset"],
                set_={**changed, "retry_requested_us": None},
            )
        )

    async def due(self, consumer: str, tag: str, limit: int = 100) -> list[ParkedEvent]:
        """The rows of (consumer, tag) an operator asked to retry, oldest request first."""
        stmt = (
            select(_P)
            .where(
                _P.c.consumer == consumer,
                _P.c.tag == tag,
                _P.c.retry_requested_us.is_not(None),
            )
            .order_by(_P.c.retry_requested_us, _P.c.id)
            .limit(limit)
        )
        async with self.database.read() as conn:
            return [_event(r) for r in (await conn.execute(stmt)).mappings().all()]

    async def take(self, conn: AsyncConnection, row: ParkedEvent) -> bool:
        """Inside the retry's transaction: delete the row if it is still waiting for its
        retry (an operator may have discarded it meanwhile); True if it was."""
        done = await conn.execute(
            delete(_P).where(_P.c.id == row.id, _P.c.retry_requested_us.is_not(None))
        )
        return bool(done.rowcount)

    async def retry_failed(self, row: ParkedEvent, *, error_class: str, error: str) -> None:
        """The retry of ``row`` failed again: keep it with the new error, no retry pending."""
        async with self.database.write() as conn:
            await conn.execute(
                update(_P)
                .where(_P.c.id == row.id)
                .values(
                    error_class=error_class[:255],
                    error=error[:4000],
                    retry_requested_us=None,
                    retries=_P.c.retries + 1,
                )
            )

    # ------------------------------------------------------------------ operations

    def _select(self, which: ParkedFilter) -> Select[Any]:
        return select(_P).where(*which.where())

    async def find(
        self, which: ParkedFilter | None = None, *, limit: int = 100, after_id: int = 0
    ) -> list[ParkedEvent]:
        """The rows ``which`` matches, by id (parking order), ``limit`` of them after
        ``after_id`` (the last id of the previous page)."""
        which = which or ParkedFilter()
        if not 1 <= limit <= MAX_LIST:
            raise ConfigurationError(f"limit must be between 1 and {MAX_LIST}, got {limit}")
        stmt = self._select(which).where(_P.c.id > after_id).order_by(_P.c.id).limit(limit)
        async with self.database.read() as conn:
            return [_event(r) for r in (await conn.execute(stmt)).mappings().all()]

    async def count(self, which: ParkedFilter | None = None) -> int:
        which = which or ParkedFilter()
        stmt = select(func.count()).select_from(_P).where(*which.where())
        async with self.database.read() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def counts(self, consumer: str | None = None) -> dict[tuple[str, str], int]:
        """How many rows each (consumer, tag) has parked."""
        stmt = select(_P.c.consumer, _P.c.tag, func.count()).group_by(_P.c.consumer, _P.c.tag)
        if consumer is not None:
            stmt = stmt.where(_P.c.consumer == consumer)
        async with self.database.read() as conn:
            return {(c, t): int(n) for c, t, n in (await conn.execute(stmt)).all()}

    async def facets(self) -> tuple[list[str], list[str]]:
        """The consumers and the error classes that have parked rows (for filters)."""
        async with self.database.read() as conn:
            consumers = (await conn.execute(select(_P.c.consumer).distinct())).scalars().all()
            classes = (await conn.execute(select(_P.c.error_class).distinct())).scalars().all()
        return sorted(consumers), sorted(classes)

    async def request_retry(self, which: ParkedFilter) -> int:
        """Mark the matching rows for a retry by their workers; how many."""
        stmt = update(_P).where(*which.where()).values(retry_requested_us=now_us())
        async with self.database.write() as conn:
            return int((await conn.execute(stmt)).rowcount)

    async def discard(self, which: ParkedFilter) -> int:
        """Delete the matching rows; how many."""
        async with self.database.write() as conn:
            return int((await conn.execute(delete(_P).where(*which.where()))).rowcount)
