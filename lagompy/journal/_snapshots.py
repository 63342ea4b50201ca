"""The snapshot store: saved entity states, so recovery replays only the later events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from lagompy.errors import SerializationError
from lagompy.journal._journal import _IDS_PER_QUERY, backend_for
from lagompy.journal._model import from_us, now_us
from lagompy.serialization import Serializer
from lagompy.sql import _schema as schema
from lagompy.sql._database import Database


@dataclass(frozen=True)
class Snapshot:
    """A state of one entity as of sequence number ``seq_nr``."""

    entity_type: str
    entity_id: str
    seq_nr: int
    timestamp: datetime
    state: Any


@dataclass(frozen=True)
class SnapshotToSave:
    entity_type: str
    entity_id: str
    seq_nr: int
    state: Any


class SnapshotStore:
    """Save, load and delete snapshots. A snapshot saved again at the same sequence number
    replaces the earlier one."""

    def __init__(self, database: Database, serializer: Serializer) -> None:
        self.database = database
        self.serializer = serializer
        #: How this database's flavour saves (``_sqlite.py``, ``_postgres.py``), chosen here once.
        self.backend = backend_for(database)

    async def save(self, entity_type: str, entity_id: str, seq_nr: int, state: Any) -> None:
        await self.save_many([SnapshotToSave(entity_type, entity_id, seq_nr, state)])

    async def save_many(self, snapshots: Sequence[SnapshotToSave]) -> None:
        """Save several snapshots in one transaction (overwriting any at the same seq nr)."""
        if not snapshots:
            return
        # One snapshot per (entity, seq nr): the last one given wins.
        snapshots = list({(s.entity_type, s.entity_id, s.seq_nr): s for s in snapshots}.values())
        written_at = now_us()
        rows = []
        for s in snapshots:
            type_name, version, payload = self.serializer.encode(s.state)
            rows.append(
                {
                    "entity_type": s.entity_type,
                    "entity_id": s.entity_id,
                    "seq_nr": s.seq_nr,
                    "written_at_us": written_at,
                    "state_type": type_name,
                    "state_version": version,
                    "payload": payload,
                }
            )
        await self.backend.save_snapshots(written_at, rows)

    async def load(
        self,
        entity_type: str,
        entity_id: str,
        *,
        max_seq_nr: int | None = None,
        max_timestamp: datetime | None = None,
    ) -> Snapshot | None:
        """The latest snapshot at or below ``max_seq_nr`` and ``max_timestamp``, or ``None``.

        Raises a ``SerializationError`` if the stored state cannot be decoded (recovery then
        falls back to a full replay).
        """
        t = schema.snapshots
        stmt = (
            select(t.c.seq_nr, t.c.written_at_us, t.c.state_type, t.c.state_version, t.c.payload)
            .where(t.c.entity_type == entity_type, t.c.entity_id == entity_id)
            .order_by(t.c.seq_nr.desc())
            .limit(1)
        )
        if max_seq_nr is not None:
            stmt = stmt.where(t.c.seq_nr <= max_seq_nr)
        if max_timestamp is not None:
            stmt = stmt.where(t.c.written_at_us <= int(max_timestamp.timestamp() * 1_000_000))
        async with self.database.read() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            return None
        seq_nr, written_at_us, state_type, state_version, payload = row
        state = self.serializer.decode(state_type, state_version, payload)
        return Snapshot(entity_type, entity_id, seq_nr, from_us(written_at_us), state)

    async def load_many(
        self, entity_type: str, entity_ids: Sequence[str]
    ) -> dict[str, Snapshot | SerializationError]:
        """The latest snapshot of each of many entities of one type, in one query per 500 ids:
        entity id -> its snapshot, or the ``SerializationError`` its stored state raised when
        decoded (that entity alone); entities without a snapshot are absent."""
        t = schema.snapshots
        latest = t.alias("latest")
        newest = (
            select(func.max(latest.c.seq_nr))
            .where(latest.c.entity_type == t.c.entity_type, latest.c.entity_id == t.c.entity_id)
            .scalar_subquery()
        )
        ids = list(dict.fromkeys(entity_ids))
        out: dict[str, Snapshot | SerializationError] = {}
        async with self.database.read() as conn:
            for n in range(0, len(ids), _IDS_PER_QUERY):
                stmt = select(
                    t.c.entity_id,
                    t.c.seq_nr,
                    t.c.written_at_us,
                    t.c.state_type,
                    t.c.state_version,
                    t.c.payload,
                ).where(
                    t.c.entity_type == entity_type,
                    t.c.entity_id.in_(ids[n : n + _IDS_PER_QUERY]),
                    t.c.seq_nr == newest,
                )
                for entity_id, seq_nr, written_at_us, state_type, version, payload in (
                    await conn.execute(stmt)
                ).all():
                    try:
                        state = self.serializer.decode(state_type, version, payload)
                    except SerializationError as e:
                        out[entity_id] = e
                    else:
                        out[entity_id] = Snapshot(
                            entity_type, entity_id, seq_nr, from_us(written_at_us), state
                        )
        return out

    async def delete(
        self,
        entity_type: str,
        entity_id: str,
        *,
        max_seq_nr: int | None = None,
        max_timestamp: datetime | None = None,
    ) -> int:
        """Delete the entity's snapshots at or below the bounds (all when none are given)."""
        t = schema.snapshots
        stmt = delete(t).where(t.c.entity_type == entity_type, t.c.entity_id == entity_id)
        if max_seq_nr is not None:
            stmt = stmt.where(t.c.seq_nr <= max_seq_nr)
        if max_timestamp is not None:
            stmt = stmt.where(t.c.written_at_us <= int(max_timestamp.timestamp() * 1_000_000))
        async with self.database.write() as conn:
            result = await conn.execute(stmt)
        return int(result.rowcount or 0)
