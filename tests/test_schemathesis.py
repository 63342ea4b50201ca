"""Bad input never gives a 500: schemathesis generates requests (valid and invalid) for every
operation of the user service's OpenAPI schema and checks ``not_a_server_error`` against the
real app on loopback, with its journal on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from examples.user_service.api import create_app
from lagompy.settings import JournalSettings
from lagompy.testkit.server import serve_in_thread
from tests.conftest import POSTGRES_URL, require_postgres

#: The schema is the app's own; building the app starts nothing.
schema = schemathesis.openapi.from_dict(create_app(ray=False).openapi())

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
) -> Iterator[str]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("schemathesis") / "journal.db"
        journal = JournalSettings(url=f"sqlite:///{path}")
        with serve_in_thread(create_app(journal_settings=journal, ray=False)) as url:
            yield url
        return
    require_postgres()
    name = f"lagompy_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_schema_sql(f'CREATE SCHEMA "{name}"'))
    try:
        journal = JournalSettings(url=POSTGRES_URL, postgres_schema=name, auto_migrate=True)
        with serve_in_thread(create_app(journal_settings=journal, ray=False)) as url:
            yield url
    finally:
        asyncio.run(_schema_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def test_every_operation_is_covered() -> None:
    operations = {op.ok().label for op in schema.get_all_operations()}
    assert operations == {
        "POST /users",
        "GET /users",
        "GET /users/{user_id}",
        "PATCH /users/{user_id}",
        "POST /users/{user_id}/deactivate",
    }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error])
