"""Subscriber classes for tests/test_topic_ray.py, importable by Ray's workers by module name."""

from __future__ import annotations

import os
from typing import ClassVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lagompy.testkit.topics import Deposit, contract_topic
from lagompy.topic import Message, Subscriber


class RayLedger(Subscriber[Deposit]):
    """Records each message with the process that handled it."""

    group = "ray-ledger"
    topic = contract_topic
    table: ClassVar[str] = "ray_ledger"

    async def prepare(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {self.table} (msg_offset BIGINT, part INTEGER, "
                "account VARCHAR(100), amount INTEGER, pid INTEGER)"
            )
        )

    async def handle(self, conn: AsyncConnection, message: Message[Deposit]) -> None:
        await conn.execute(
            text(f"INSERT INTO {self.table} VALUES (:o, :p, :a, :n, :pid)"),
            {
                "o": message.offset,
                "p": message.partition,
                "a": message.payload.account,
                "n": message.payload.amount,
                "pid": os.getpid(),
            },
        )


class RayHttpLedger(RayLedger):
    group = "ray-http-ledger"
    table = "ray_http_ledger"
