"""A read-side processor of the example's users for the tests, in a module Ray workers can
import by name (apart from ``readside_processors``, which member processes import without the
examples on their path)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import UserEntity
from lagompy.journal import EventEnvelope
from lagompy.readside import SqlReadSideProcessor


class PlacedUserEvents(SqlReadSideProcessor):
    """One row per event of the example's users (no unique key: an event handled twice shows
    as two rows), for the runtime writing to a journal on several databases."""

    name = "placed-user-events"
    tag = UserEntity.tag
    entities = (UserEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS placed_user_events ("
                "user_id VARCHAR(100) NOT NULL, seq_nr BIGINT NOT NULL, "
                "event_offset BIGINT NOT NULL)"
            )
        )

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        await conn.execute(
            text("INSERT INTO placed_user_events VALUES (:u, :s, :o)"),
            {"u": envelope.entity_id, "s": envelope.seq_nr, "o": envelope.offset},
        )
