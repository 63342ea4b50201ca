"""The ``users`` projection: one row per user, built from the User entity's events.

Set-based: each transaction's events are grouped into runs of the same event type, and each run
is one executemany (an upserting INSERT for registrations, an UPDATE for the changes), in offset
order. Replaying events (after a set-offset) is harmless: every write sets values, none adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    MetaData,
    String,
    Table,
    bindparam,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import (
    EmailChanged,
    NameChanged,
    UserDeactivated,
    UserEntity,
    UserRegistered,
)
from lagompy import EventEnvelope
from lagompy.readside import SqlReadSideProcessor

# --8<-- [start:projection]
metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("updated_offset", BigInteger, nullable=False),
)


def _set(column: str) -> Any:
    """UPDATE users SET <column> = :v, updated_offset = :o WHERE user_id = :uid"""
    return (
        update(users)
        .where(users.c.user_id == bindparam("uid"))
        .values({column: bindparam("v"), "updated_offset": bindparam("o")})
    )


_SET = {NameChanged: _set("name"), EmailChanged: _set("email"), UserDeactivated: _set("active")}


def _register(dialect: str) -> Any:
    """INSERT a user; a replay (after set-offset) overwrites the row instead of failing."""
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(users)
    return stmt.on_conflict_do_update(
        index_elements=[users.c.user_id],
        set_={c: stmt.excluded[c] for c in ("name", "email", "active", "updated_offset")},
    )


def _update_row(envelope: EventEnvelope[Any]) -> dict[str, Any]:
    event = envelope.event
    value: str | bool
    match event:
        case NameChanged(name=value) | EmailChanged(email=value):
            pass
        case UserDeactivated():
            value = False
        case _:
            raise TypeError(f"not an update event: {event!r}")
    return {"uid": envelope.entity_id, "v": value, "o": envelope.offset}


#: PostgreSQL: the same statements as driver SQL, executemany'd by asyncpg inside lagompy's
#: transaction (exec_driver_sql skips SQLAlchemy's per-row parameter processing: measured
#: 1.4x faster rebuilds).
_PG_REGISTER = (
    "INSERT INTO users (user_id, name, email, active, updated_offset) "
    "VALUES ($1, $2, $3, true, $4) ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name, "
    "email = EXCLUDED.email, active = true, updated_offset = EXCLUDED.updated_offset"
)
_PG_SET = {
    NameChanged: "UPDATE users SET name = $2, updated_offset = $3 WHERE user_id = $1",
    EmailChanged: "UPDATE users SET email = $2, updated_offset = $3 WHERE user_id = $1",
    UserDeactivated: "UPDATE users SET active = $2, updated_offset = $3 WHERE user_id = $1",
}


async def _handle_batch_postgres(
    conn: AsyncConnection, envelopes: Sequence[EventEnvelope[Any]]
) -> None:
    for kind, run in groupby(envelopes, key=lambda e: type(e.event)):
        batch = list(run)
        if kind is UserRegistered:
            rows = [(e.entity_id, e.event.name, e.event.email, e.offset) for e in batch]
            await conn.exec_driver_sql(_PG_REGISTER, rows)
        elif kind in _PG_SET:
            updates = [tuple(_update_row(e).values()) for e in batch]
            await conn.exec_driver_sql(_PG_SET[kind], updates)


class UsersProjection(SqlReadSideProcessor):
    name = "users"
    tag = UserEntity.tag  # sharded in 4: four workers
    entities = (UserEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.run_sync(metadata.create_all)  # CREATE TABLE IF NOT EXISTS

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[Any]]
    ) -> None:
        if conn.dialect.name == "postgresql":
            await _handle_batch_postgres(conn, envelopes)
            return
        for kind, run in groupby(envelopes, key=lambda e: type(e.event)):
            batch = list(run)
            if kind is UserRegistered:
                await conn.execute(
                    _register(conn.dialect.name),
                    [
                        {
                            "user_id": e.entity_id,
                            "name": e.event.name,
                            "email": e.event.email,
                            "active": True,
                            "updated_offset": e.offset,
                        }
                        for e in batch
                    ],
                )
            elif kind in _SET:
                await conn.execute(_SET[kind], [_update_row(e) for e in batch])

    async def reset(self, conn: AsyncConnection) -> None:
        await conn.execute(users.delete())


# --8<-- [end:projection]
