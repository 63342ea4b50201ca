"""Bad input never gives a 500, and no error leaks internals: schemathesis generates requests
(valid and invalid) for every operation of the user service's, the notification service's and
the transfer service's OpenAPI schemas (the last with the workflows' routes: start, list,
inspect, cancel, resume, retry, signal, bulk, pause a type) and checks ``not_a_server_error``
and ``no_leaks`` (every 4xx and 5xx body and header scanned for URLs, hosts, ports, paths,
database URLs and credentials: tests/leaks.py) against the real apps on loopback, with the user
service's journal on SQLite and on PostgreSQL, the transfer service's on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from examples.notification_service.api import create_app as create_notifications
from examples.transfer_service.api import create_app as create_transfers
from examples.user_service.api import create_app
from lagompy.service import ServiceLocator
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from tests.conftest import POSTGRES_URL, require_postgres
from tests.leaks import path_and_query, request_text, scan

#: The schemas are the apps' own; building an app starts nothing.
schema = schemathesis.openapi.from_dict(create_app(ray=False).openapi())
notifications_schema = schemathesis.openapi.from_dict(create_notifications().openapi())
transfers_schema = schemathesis.openapi.from_dict(create_transfers(ray=False).openapi())

#: Strings no response of a service (by its schema's title) may hold: the journal's URL and
#: file, the schema's name (of the backend the service runs on now).
FORBIDDEN: dict[str, list[str]] = {}
#: (service, status) of every error response the scan looked at.
SCANNED: set[tuple[str, int]] = set()


def no_leaks(ctx: Any, response: Any, case: schemathesis.Case[Any]) -> None:
    """A schemathesis check: an error response holds nothing the caller did not send."""
    if response.status_code < 400:
        return
    request = response.request
    sent = request_text(
        path_and_query(str(request.url)),
        request.body,
        [str(v) for k, v in request.headers.items() if k.lower() != "host"],
    )
    headers = [(name, value) for name, values in response.headers.items() for value in values]
    service = case.operation.schema.raw_schema["info"]["title"]
    leaks = scan(response.content, headers, sent=sent, forbidden=FORBIDDEN.get(service, []))
    SCANNED.add((service, response.status_code))
    if leaks:
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code} with internals: "
            + "; ".join(str(leak) for leak in leaks)
        )


EXAMPLES = 30


async def _schema_sql(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The base URLs of the user service (``users``) and of the notification service it calls
    (``notifications``)."""
    with contextlib.ExitStack() as stack:
        db = tmp_path_factory.mktemp("notifications") / "notifications.db"
        notifications_app = create_notifications(database_url=f"sqlite:///{db}")
        notifications = stack.enter_context(serve_in_thread(notifications_app))
        locator = ServiceLocator({"notifications": notifications})
        if request.param == "sqlite":
            path: Path = tmp_path_factory.mktemp("schemathesis") / "journal.db"
            journal = JournalSettings(url=f"sqlite:///{path}")
            FORBIDDEN["users"] = [journal.url, str(path)]
        else:
            require_postgres()
            name = f"lagompy_test_{uuid.uuid4().hex[:12]}"
            asyncio.run(_schema_sql(f'CREATE SCHEMA "{name}"'))
            stack.callback(asyncio.run, _schema_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
            journal = JournalSettings(url=POSTGRES_URL, postgres_schema=name, auto_migrate=True)
            FORBIDDEN["users"] = [POSTGRES_URL, name, "postgres"]
        app = create_app(journal_settings=journal, ray=False, locator=locator)
        users = stack.enter_context(serve_in_thread(app))
        yield {"users": users, "notifications": notifications}


def _labels(of: Any) -> set[str]:
    """The labels of a schema's operations: each is an Ok, or an Err (an operation the schema
    could not build) that has no .ok()."""
    return {op.ok().label for op in of.get_all_operations()}


def test_every_operation_is_covered() -> None:
    assert _labels(schema) == {
        "POST /users",
        "GET /users",
        "GET /users/{user_id}",
        "PATCH /users/{user_id}",
        "POST /users/{user_id}/deactivate",
        "GET /users/{user_id}/notifications",
        "GET /topics/asyncapi.json",  # the topics' AsyncAPI document, linked from the docs
    }
    assert _labels(notifications_schema) == {"POST /notifications", "GET /notifications"}
    assert _labels(transfers_schema) == {
        "GET /accounts/{account_id}",
        "POST /accounts/{account_id}/close",
        "POST /accounts/{account_id}/deposits",
        "PUT /transfers/{transfer_id}",
        "GET /transfers/{transfer_id}",
        "POST /transfers/{transfer_id}/cancel",
        # The workflows' routes, which Service.install mounts with the workflows component.
        "GET /workflows",
        "POST /workflows",
        "GET /workflows/types",
        "GET /workflows/{run_id}",
        "POST /workflows/{run_id}/cancel",
        "POST /workflows/{run_id}/resume",
        "POST /workflows/{run_id}/retry",
        "POST /workflows/{run_id}/signal/{name}",
        "POST /workflows/_bulk/{action}",
        "POST /workflows/types/{workflow}/pause",
        "POST /workflows/types/{workflow}/unpause",
    }


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@schema.parametrize()
@FUZZ
def test_no_server_errors(case: schemathesis.Case[Any], base_url: dict[str, str]) -> None:
    case.call_and_validate(base_url=base_url["users"], checks=[not_a_server_error, no_leaks])


@notifications_schema.parametrize()
@FUZZ
def test_notification_service_no_server_errors(
    case: schemathesis.Case[Any], base_url: dict[str, str]
) -> None:
    case.call_and_validate(
        base_url=base_url["notifications"], checks=[not_a_server_error, no_leaks]
    )


@pytest.fixture(scope="module")
def transfers_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The transfer service, its entities and workflows in its process, on a SQLite file."""
    path: Path = tmp_path_factory.mktemp("transfers") / "journal.db"
    journal = JournalSettings(url=f"sqlite:///{path}")
    FORBIDDEN["transfers"] = [journal.url, str(path)]
    with serve_in_thread(create_transfers(journal_settings=journal, ray=False)) as url:
        yield url


@transfers_schema.parametrize()
@FUZZ
def test_transfer_service_no_server_errors(
    case: schemathesis.Case[Any], transfers_url: str
) -> None:
    case.call_and_validate(base_url=transfers_url, checks=[not_a_server_error, no_leaks])


def test_the_scan_saw_errors_of_every_service() -> None:
    """Not vacuous: the runs above produced error responses, and ``no_leaks`` scanned them."""
    if not SCANNED:
        pytest.skip("run with the fuzzing tests above")
    assert {status for service, status in SCANNED if service == "users"} >= {404, 422}
    assert {status for service, status in SCANNED if service == "notifications"} >= {422}
    transfers = {status for service, status in SCANNED if service == "transfers"}
    assert 422 in transfers and transfers & {404, 405, 409}, transfers
