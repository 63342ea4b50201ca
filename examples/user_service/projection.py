"""The ``users`` projection: one row per user, built from the User entity's events.

Written the simplest way: ``handle`` gets one event and runs one SQLAlchemy Core statement for
it (the statements are built once; each event brings its values). lagompy sends a batch's
statements together, one executemany per run of the same statement (docs/readside.md). Replaying
events (after a set-offset) is harmless: every statement sets values, none adds,
and a replayed registration overwrites its row. The same projection written set-based, for
faster rebuilds, is ``fast_projection.py`` (docs/howto/fast-projections.md).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, MetaData, String, Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import (
    EmailChanged,
    NameChanged,
    UserDeactivated,
    UserEntity,
    UserEvent,
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


@cache
def insert_or_replace(dialect: str) -> Any:
    """INSERT INTO users ... ON CONFLICT (user_id) DO UPDATE SET each column to the new row's:
    SQLite and PostgreSQL both have it, each in its own dialect module (built once for each)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(users)
    new_row = {column.name: column for column in stmt.excluded}
    return stmt.on_conflict_do_update(index_elements=[users.c.user_id], set_=new_row)


# One UPDATE per kind of change, built once; each event brings the values of its parameters.
user = update(users).where(users.c.user_id == bindparam("id"))
set_name = user.values(name=bindparam("name"), updated_offset=bindparam("offset"))
set_email = user.values(email=bindparam("email"), updated_offset=bindparam("offset"))
deactivate = user.values(active=False, updated_offset=bindparam("offset"))


class UsersProjection(SqlReadSideProcessor):
    name = "users"
    tag = UserEntity.tag  # sharded in 4: four workers
    entities = (UserEntity,)

    async def global_prepare(self, conn: AsyncConnection) -> None:
        await conn.run_sync(metadata.create_all)  # CREATE TABLE IF NOT EXISTS

    async def handle(self, conn: AsyncConnection, envelope: EventEnvelope[UserEvent]) -> None:
        offset = envelope.offset
        this = {"id": envelope.entity_id, "offset": offset}
        match envelope.event:
            case UserRegistered(name=name, email=email):
                row = {
                    "user_id": envelope.entity_id,
                    "name": name,
                    "email": email,
                    "active": True,
                    "updated_offset": offset,
                }
                # A replay (after a set-offset) overwrites the row instead of failing.
                await conn.execute(insert_or_replace(conn.dialect.name), row)
            case NameChanged(name=name):
                await conn.execute(set_name, {**this, "name": name})
            case EmailChanged(email=email):
                await conn.execute(set_email, {**this, "email": email})
            case UserDeactivated():
                await conn.execute(deactivate, this)

    async def reset(self, conn: AsyncConnection) -> None:
        await conn.execute(users.delete())


# --8<-- [end:projection]
