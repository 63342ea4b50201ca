"""The ``users`` projection written set-based, for fast rebuilds (docs/howto/fast-projections.md).

The same table, the same rows and the same processor name as ``projection.py``: it can replace
it without a rebuild. ``handle_batch`` gets the events of one read-side transaction; it groups
them into runs of one event type, in offset order, and writes each run with one executemany (an
upserting INSERT for registrations, an UPDATE for a change). On PostgreSQL the statements are
driver SQL, handed to asyncpg's executemany as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.entity import (
    EmailChanged,
    NameChanged,
    UserDeactivated,
    UserEvent,
    UserRegistered,
)
from examples.user_service.projection import UsersProjection, insert_or_replace, users
from lagompy import EventEnvelope


# --8<-- [start:set-based]
def set_column(column: str) -> Any:
    """UPDATE users SET <column> = :value, updated_offset = :offset WHERE user_id = :user"""
    return (
        update(users)
        .where(users.c.user_id == bindparam("user"))
        .values({column: bindparam("value"), "updated_offset": bindparam("offset")})
    )


SET = {
    NameChanged: set_column("name"),
    EmailChanged: set_column("email"),
    UserDeactivated: set_column("active"),
}


def changed(envelope: EventEnvelope[Any]) -> dict[str, Any]:
    """The parameters of ``SET[type(event)]`` for an update event."""
    value: str | bool
    match envelope.event:
        case NameChanged(name=value) | EmailChanged(email=value):
            pass
        case UserDeactivated():
            value = False
        case event:
            raise TypeError(f"not an update event: {event!r}")
    return {"user": envelope.entity_id, "value": value, "offset": envelope.offset}


class FastUsersProjection(UsersProjection):
    """``UsersProjection`` with ``handle_batch`` instead of ``handle``."""

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[UserEvent]]
    ) -> None:
        if conn.dialect.name == "postgresql":
            await handle_batch_postgres(conn, envelopes)
            return
        # Runs of one event type, in offset order: a change never overtakes a registration.
        for kind, run in groupby(envelopes, key=lambda e: type(e.event)):
            if kind is UserRegistered:
                rows = [
                    {
                        "user_id": e.entity_id,
                        "name": event.name,
                        "email": event.email,
                        "active": True,
                        "updated_offset": e.offset,
                    }
                    for e in run
                    if isinstance(event := e.event, UserRegistered)  # all are; mypy needs to see it
                ]
                await conn.execute(insert_or_replace(conn.dialect.name), rows)
            elif kind in SET:
                await conn.execute(SET[kind], [changed(e) for e in run])


# --8<-- [end:set-based]

# --8<-- [start:driver-sql]
#: The same statements as driver SQL, in asyncpg's own placeholders ($1, $2...).
PG_REGISTER = (
    "INSERT INTO users (user_id, name, email, active, updated_offset) "
    "VALUES ($1, $2, $3, true, $4) ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name, "
    "email = EXCLUDED.email, active = true, updated_offset = EXCLUDED.updated_offset"
)
PG_SET = {
    NameChanged: "UPDATE users SET name = $2, updated_offset = $3 WHERE user_id = $1",
    EmailChanged: "UPDATE users SET email = $2, updated_offset = $3 WHERE user_id = $1",
    UserDeactivated: "UPDATE users SET active = $2, updated_offset = $3 WHERE user_id = $1",
}


async def handle_batch_postgres(
    conn: AsyncConnection, envelopes: Sequence[EventEnvelope[UserEvent]]
) -> None:
    """``exec_driver_sql`` with a list of tuples is asyncpg's executemany, inside lagompy's
    transaction, without SQLAlchemy's processing of each row's parameters."""
    for kind, run in groupby(envelopes, key=lambda e: type(e.event)):
        if kind is UserRegistered:
            rows = [
                (e.entity_id, event.name, event.email, e.offset)
                for e in run
                if isinstance(event := e.event, UserRegistered)
            ]
            await conn.exec_driver_sql(PG_REGISTER, rows)
        elif kind in PG_SET:
            updates = [tuple(changed(e).values()) for e in run]
            await conn.exec_driver_sql(PG_SET[kind], updates)


# --8<-- [end:driver-sql]
