"""The notification service: sends a welcome notification to every user the user service
registers, and records the notifications other services send it.

Run it with ``lagompy run examples.notification_service.api:app --port 8001``. It keeps the
notifications in a database of its own (a real one would send emails and remember what it
sent): enough to see, in the example and its tests, what it delivered.

* The welcome notifications come from the user service's ``user-events`` topic: the group
  ``notifications`` pulls it over HTTP from the ``users`` service (its URL from
  ``LAGOMPY_SERVICE_USERS``) and writes each notification **and** its position in the topic in
  one transaction of this service's database. A notification service killed at any moment
  resumes after the last message it committed: every user gets exactly one welcome.
* ``POST /notifications`` records a notification another service sends; it is idempotent by
  the notification's ``id``: a sender that retries after a timeout does not notify twice.

Environment: ``LAGOMPY_EXAMPLE_NOTIFICATIONS_DB`` (default ``sqlite:///notifications.db``):
the service's database; ``LAGOMPY_SERVICE_USERS``: the user service's URL (without it, no
welcome notifications: the service only records what it is sent).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, select
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.user_service.topics import UserRegistration, user_events
from lagompy.service import BreakerRegistry, CircuitBreaker, Service, ServiceLocator
from lagompy.settings import JournalSettings
from lagompy.sql import Database
from lagompy.topic import HttpTransport, Message, Subscriber, SubscribersComponent

# --8<-- [start:store]
tables = MetaData()
notifications = Table(
    "example_notifications",
    tables,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(200), nullable=False, unique=True),
    Column("recipient", String(320), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("body", Text, nullable=False),
)


async def create_tables(conn: AsyncConnection) -> None:
    await conn.run_sync(tables.create_all)


async def record(conn: AsyncConnection, values: dict[str, str]) -> dict[str, Any] | None:
    """Insert a notification unless its id is there; returns the one already there, if any."""
    query = select(notifications).where(notifications.c.id == values["id"])
    found = (await conn.execute(query)).mappings().first()
    if found is not None:
        return dict(found)
    await conn.execute(notifications.insert().values(**values))
    return None


class NotificationStore:
    """The service's database, opened with the service (a :class:`~lagompy.service.Component`)."""

    def __init__(self, settings: JournalSettings) -> None:
        self.settings = settings
        self._database: Database | None = None

    @property
    def database(self) -> Database:
        if self._database is None:
            raise RuntimeError("the notification store is not open")
        return self._database

    async def start(self) -> None:
        self._database = Database.create(self.settings)
        async with self._database.write() as conn:
            await create_tables(conn)

    async def stop(self) -> None:
        database, self._database = self._database, None
        if database is not None:
            await database.dispose()


# --8<-- [end:store]


# --8<-- [start:subscriber]
class WelcomeNotifications(Subscriber[UserRegistration]):
    """Welcomes every registered user: one notification per registration, written with the
    message's position in one transaction (a redelivered message finds it there)."""

    group = "notifications"
    topic = user_events

    async def prepare(self, conn: AsyncConnection) -> None:
        await create_tables(conn)

    async def handle(self, conn: AsyncConnection, message: Message[UserRegistration]) -> None:
        user = message.payload
        await record(
            conn,
            {
                "id": f"welcome:{user.user_id}",
                "recipient": user.email,
                "subject": f"Welcome, {user.name}",
                "body": "",
            },
        )


# --8<-- [end:subscriber]


# --8<-- [start:app]
NotificationId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,200}$")]


class Notification(BaseModel):
    id: NotificationId = Field(description="The sender's id for it: a retry reuses it.")
    recipient: str = Field(min_length=1, max_length=320)
    subject: str = Field(max_length=200)
    body: str = Field("", max_length=10_000)


class Notifications(BaseModel):
    items: list[Notification]


def create_app(
    *,
    database_url: str | None = None,
    users: str | None = None,
    locator: ServiceLocator | None = None,
    breakers: BreakerRegistry | None = None,
) -> FastAPI:
    """The notification service's app. ``database_url``: its database; ``users``: the user
    service to subscribe to (a name for the locator, or a URL; default: ``"users"`` when
    ``LAGOMPY_SERVICE_USERS`` is set, else no subscription)."""
    if database_url is None:
        database_url = os.environ.get(
            "LAGOMPY_EXAMPLE_NOTIFICATIONS_DB", "sqlite:///notifications.db"
        )
    if users is None and os.environ.get("LAGOMPY_SERVICE_USERS"):
        users = "users"
    database = JournalSettings(url=database_url)
    store = NotificationStore(database)
    components: list[Any] = [store]
    if users is not None:
        # Its own breaker, quick to retry: a user service that comes back is seen within 1 s.
        breaker = CircuitBreaker("users-topics", max_failures=5, reset_timeout=1.0)
        transport = HttpTransport(users, locator=locator, breakers=breakers, breaker=breaker)
        subscribers = SubscribersComponent(
            [WelcomeNotifications],
            transport=transport,
            journal_settings=database,
            retry_max_delay=1.0,
        )
        components.append(subscribers)
    service = Service(name="notifications", components=components)
    app = FastAPI(title="notifications", lifespan=service.lifespan)
    service.install(app)

    @app.post("/notifications", status_code=201)
    async def notify(notification: Notification, response: Response) -> Notification:
        """Record a notification; the same id again returns the first one (200)."""
        async with store.database.write() as conn:
            first = await record(conn, notification.model_dump())
        if first is None:
            return notification
        response.status_code = 200
        return Notification(**{k: first[k] for k in Notification.model_fields})

    @app.get("/notifications")
    async def list_notifications(
        recipient: Annotated[str | None, Query(max_length=320)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Notifications:
        """The notifications received, oldest first (of one recipient, if given)."""
        query = select(notifications).order_by(notifications.c.seq).limit(limit)
        if recipient is not None:
            query = query.where(notifications.c.recipient == recipient)
        async with store.database.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return Notifications(
            items=[Notification(**{k: r[k] for k in Notification.model_fields}) for r in rows]
        )

    return app


# --8<-- [end:app]


app = create_app()
