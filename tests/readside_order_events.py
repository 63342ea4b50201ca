"""A read-side processor of the orders of ``tests/process_entities.py`` for the tests, in a
module Ray workers can import by name. Their tag has two shards: on a journal placed on two
databases that makes four partitions, each a worker actor of its own on Ray (a tag of more
shards proves nothing more and costs a worker process per partition)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.journal import EventEnvelope
from lagompy.readside import SqlReadSideProcessor
from tests.process_entities import OrderEntity


class PlacedOrderEvents(SqlReadSideProcessor):
    """One row per event of the orders (no unique key: an event handled twice shows as two
    rows), for the runtime writing to a journal on several databases."""

    name = "placed-order-events"
    tag = OrderEntity.tag
    entities = (OrderEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS placed_order_events ("
                "order_id VARCHAR(100) NOT NULL, seq_nr BIGINT NOT NULL, "
                "event_offset BIGINT NOT NULL)"
            )
        )

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[Any]) -> None:
        await conn.execute(
            text("INSERT INTO placed_order_events VALUES (:o, :s, :e)"),
            {"o": envelope.entity_id, "s": envelope.seq_nr, "e": envelope.offset},
        )
