"""The notification service: records the notifications other services send it.

Run it with ``lagompy run examples.notification_service.api:app --port 8001``. It keeps the
notifications in memory (a real one would send emails and remember what it sent): enough to
see, in the example and its tests, what the user service delivered. ``POST /notifications`` is
idempotent by the notification's ``id``: a sender that retries after a timeout does not
notify twice.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, Field

from lagompy.service import Service

# --8<-- [start:app]
NotificationId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,200}$")]


class Notification(BaseModel):
    id: NotificationId = Field(description="The sender's id for it: a retry reuses it.")
    recipient: str = Field(min_length=1, max_length=320)
    subject: str = Field(max_length=200)
    body: str = Field("", max_length=10_000)


class Notifications(BaseModel):
    items: list[Notification]


def create_app() -> FastAPI:
    """The notification service's app, with an empty store of its own."""
    service = Service(name="notifications")
    app = FastAPI(title="notifications", lifespan=service.lifespan)
    service.install(app)
    received: dict[str, Notification] = {}  # by id, in arrival order

    @app.post("/notifications", status_code=201)
    async def notify(notification: Notification, response: Response) -> Notification:
        """Record a notification; the same id again returns the first one (200)."""
        first = received.setdefault(notification.id, notification)
        if first is not notification:
            response.status_code = 200
        return first

    @app.get("/notifications")
    async def list_notifications(
        recipient: Annotated[str | None, Query(max_length=320)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Notifications:
        """The notifications received, oldest first (of one recipient, if given)."""
        chosen = [n for n in received.values() if recipient in (None, n.recipient)]
        return Notifications(items=chosen[:limit])

    return app


# --8<-- [end:app]


app = create_app()
