"""The journal's database becomes unreachable under the sharded runtime, then comes back.

A dedicated database is cut off with ``ALLOW_CONNECTIONS false`` plus terminating its backends
(never by stopping the shared server). While it is out, asks fail with a clear lagompy error;
within 30 s of it coming back they succeed again, and every acknowledged event is in the
journal exactly once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_URL, require_postgres
from ray_entities import Add, CounterEntity

from lagompy import JournalUnavailable, start
from lagompy.runtime import shutdown_app
from lagompy.settings import JournalSettings
from lagompy.storage import open_storage

pytestmark = pytest.mark.postgres

ADMIN_URL = POSTGRES_URL


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def outage_db() -> AsyncIterator[str]:
    """A database of its own on the shared server; its URL. Dropped afterwards."""
    require_postgres()
    name = f"lagompy_outage_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        await _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _cut(url: str, allow: bool) -> None:
    name = url.rsplit("/", 1)[1]
    await _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
    if not allow:
        await _admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )


async def test_asks_fail_clearly_while_the_journal_is_out_and_recover_after(
    ray_session: Any, outage_db: str
) -> None:
    settings = JournalSettings(url=outage_db, auto_migrate=True, pool_size=2, max_overflow=1)
    app = f"outage-{uuid.uuid4().hex[:8]}"
    entities = await start(
        app=app, entities=[CounterEntity], journal_settings=settings, hosts=1, shards=8
    )
    acknowledged: list[str] = []
    try:
        refs = [entities.ref_for(CounterEntity, f"c{i}") for i in range(5)]

        async def round_of_asks(tag: str) -> list[BaseException | int]:
            tokens = [f"{tag}-{i}" for i in range(len(refs))]
            results = await asyncio.gather(
                *(
                    ref.ask(Add(1, token), timeout=20)
                    for ref, token in zip(refs, tokens, strict=True)
                ),
                return_exceptions=True,
            )
            acknowledged.extend(
                t for t, r in zip(tokens, results, strict=True) if isinstance(r, int)
            )
            return results

        assert all(isinstance(r, int) for r in await round_of_asks("before"))

        await _cut(outage_db, allow=False)
        failures = await round_of_asks("during")
        assert failures, "no asks were made"
        for failure in failures:
            assert isinstance(failure, JournalUnavailable), failure
            assert "database" in str(failure)
        # Entities not in memory need the database to recover: also a clear error.
        with pytest.raises(JournalUnavailable):
            await entities.ref_for(CounterEntity, "never-seen").ask(Add(1, "x"), timeout=20)

        await _cut(outage_db, allow=True)
        deadline = time.monotonic() + 30
        attempt = 0
        while True:
            attempt += 1
            results = await round_of_asks(f"after{attempt}")
            if all(isinstance(r, int) for r in results):
                break
            assert time.monotonic() < deadline, f"still failing 30 s after: {results}"
            await asyncio.sleep(0.5)
    finally:
        await entities.close()
        await shutdown_app(app)

    storage = await open_storage(settings=settings, entities=[CounterEntity])
    try:
        stored: list[str] = []
        after = 0
        while page := await storage.journal.all_events(after_offset=after, limit=1000):
            stored += [e.event.token for e in page]
            after = page[-1].offset
    finally:
        await storage.close()
    counts = Tally(stored)
    assert all(counts[t] == 1 for t in acknowledged), "an acknowledged event is missing or twice"
    assert max(counts.values()) == 1, "an event was persisted twice"
