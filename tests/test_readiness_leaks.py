"""``/health/ready`` says which check failed and why, in words that name no host, address or
path: the full text of a failure goes to the service's log, once per change."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI

from lagompy.errors import JournalUnavailable, RuntimeFailure
from lagompy.service import BreakerRegistry, Service
from lagompy.testkit.server import serve_in_thread
from tests.leaks import path_and_query, request_text, scan

INTERNAL = "connect to db.internal (10.0.0.5:5432) as app:s3cret failed, see /srv/app/db.py"


class Failing:
    """A component whose readiness check raises what it is given."""

    name = "store"

    def __init__(self) -> None:
        self.error: Exception | None = None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True


def _driver_error() -> JournalUnavailable:
    try:
        raise ConnectionRefusedError(INTERNAL)
    except ConnectionRefusedError as e:
        error = JournalUnavailable(f"read: the database cannot be reached: {e}")
        error.__cause__ = e
        return error


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (OSError(INTERNAL), "OSError (see the service's log)"),
        (_driver_error(), "JournalUnavailable: the journal's database cannot be reached"),
        (
            JournalUnavailable("shard hosts of app 'a' have not opened the journal yet: 0"),
            "JournalUnavailable: shard hosts of app 'a' have not opened the journal yet: 0",
        ),
        (
            RuntimeFailure("shard host 1 does not answer"),
            "RuntimeFailure: shard host 1 does not answer",
        ),
    ],
    ids=["driver-error", "journal-outage", "hosts-without-journal", "host-gone"],
)
def test_a_failed_check_names_its_kind_not_internals(
    error: Exception, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    component = Failing()
    service = Service(name="ready", components=[component], breakers=BreakerRegistry())
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/health/ready").status_code == 200
        component.error = error
        with caplog.at_level(logging.WARNING, logger="lagompy.service"):
            answers = [httpx.get(f"{url}/health/ready") for _ in range(3)]
        for answer in answers:
            assert answer.status_code == 503
            assert answer.json()["checks"]["store"] == shown
            leaks = scan(
                answer.content,
                answer.headers.items(),
                sent=request_text(path_and_query(str(answer.url)), None, []),
                forbidden=["db.internal", "10.0.0.5", "s3cret", "/srv/app"],
            )
            assert not leaks, [str(leak) for leak in leaks]
        # The log has the full text, once for the three probes.
        logged = [r.getMessage() for r in caplog.records if "readiness check" in r.getMessage()]
        assert len(logged) == 1 and str(error) in logged[0]
        component.error = None
        assert httpx.get(f"{url}/health/ready").status_code == 200
