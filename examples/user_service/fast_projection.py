"""The ``users`` projection written set-based, for fast rebuilds (docs/howto/fast-projections.md).
The same table, the same rows and the same processor name as ``projection.py``: it can replace
it without a rebuild. ``handle_batch`` gets the events of one read-side transaction and writes
them with two executemany calls whatever their order: the batch's registrations (an upserting
INSERT), then every change in offset order (one UPDATE that sets what the event changed). On
PostgreSQL the statements are driver SQL, handed to asyncpg's executemany as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Boolean, String, bindparam, func, update
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
def keep_or(column: str, kind: Any) -> Any:
    """``COALESCE(:column, column)``: the event's value, or the row's own when it has none."""
    return func.coalesce(bindparam(column, type_=kind), users.c[column])


#: Every kind of change as one statement: a run of changes of any kinds is one executemany.
CHANGE = (
    update(users)
    .where(users.c.user_id == bindparam("user"))
    .values(
        name=keep_or("name", String),
        email=keep_or("email", String),
        active=keep_or("active", Boolean),
        updated_offset=bindparam("offset"),
    )
)


def change(envelope: EventEnvelope[Any]) -> dict[str, Any]:
    """The parameters of ``CHANGE`` for a change event (None: the column stays as it is)."""
    row: dict[str, Any] = {"user": envelope.entity_id, "offset": envelope.offset}
    row |= {"name": None, "email": None, "active": None}
    match envelope.event:
        case NameChanged(name=name):
            row["name"] = name
        case EmailChanged(email=email):
            row["email"] = email
        case UserDeactivated():
            row["active"] = False
        case event:
            raise TypeError(f"not a change event: {event!r}")
    return row


class FastUsersProjection(UsersProjection):
    """``UsersProjection`` with ``handle_batch`` instead of ``handle``."""

    async def handle_batch(
        self, conn: AsyncConnection, envelopes: Sequence[EventEnvelope[UserEvent]]
    ) -> None:
        if conn.dialect.name == "postgresql":
            await handle_batch_postgres(conn, envelopes)
            return
        # The registrations first: a registration is its user's first event, so nothing of
        # the batch about that user comes before it, and other users' rows are other rows.
        # Then every change in offset order, one statement for all: a user's changes keep
        # their order (the last one sets updated_offset), however the kinds alternate.
        registered = [
            {
                "user_id": e.entity_id,
                "name": event.name,
                "email": event.email,
                "active": True,
                "updated_offset": e.offset,
            }
            for e in envelopes
            if isinstance(event := e.event, UserRegistered)
        ]
        changes = [change(e) for e in envelopes if not isinstance(e.event, UserRegistered)]
        if registered:
            await conn.execute(insert_or_replace(conn.dialect.name), registered)
        if changes:
            await conn.execute(CHANGE, changes)


# --8<-- [end:set-based]


# --8<-- [start:driver-sql]
#: The same statements as driver SQL, in asyncpg's own placeholders ($1, $2...).
PG_REGISTER = (
    "INSERT INTO users (user_id, name, email, active, updated_offset) "
    "VALUES ($1, $2, $3, true, $4) ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name, "
    "email = EXCLUDED.email, active = true, updated_offset = EXCLUDED.updated_offset"
)
PG_CHANGE = (
    "UPDATE users SET name = COALESCE($2, name), email = COALESCE($3, email), "
    "active = COALESCE($4, active), updated_offset = $5 WHERE user_id = $1"
)


async def handle_batch_postgres(
    conn: AsyncConnection, envelopes: Sequence[EventEnvelope[UserEvent]]
) -> None:
    """``exec_driver_sql`` with a list of tuples is asyncpg's executemany, inside lagompy's
    transaction, without SQLAlchemy's processing of each row's parameters."""
    registered = [
        (e.entity_id, event.name, event.email, e.offset)
        for e in envelopes
        if isinstance(event := e.event, UserRegistered)
    ]
    changes = [
        (row["user"], row["name"], row["email"], row["active"], row["offset"])
        for row in (change(e) for e in envelopes if not isinstance(e.event, UserRegistered))
    ]
    if registered:
        await conn.exec_driver_sql(PG_REGISTER, registered)
    if changes:
        await conn.exec_driver_sql(PG_CHANGE, changes)


# --8<-- [end:driver-sql]
