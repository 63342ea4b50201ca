"""The journal and snapshot-store contract suites (lagompy.testkit), on SQLite and PostgreSQL.

``journal_settings`` is parametrized over both backends: a fresh SQLite file, or a fresh
PostgreSQL schema (required under ``CI=true``, skipped locally only when unreachable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from lagompy import JournalSettings, Serializer, Storage, open_storage
from lagompy.testkit import (
    JournalContract,
    SnapshotStoreContract,
    StorageOpener,
    contract_serializer,
)
from lagompy.testkit.contracts import StorageContract


class _OnBothBackends:
    """The fixtures both suites need, from the conftest's ``journal_settings``."""

    @pytest_asyncio.fixture
    async def storage(self, journal_settings: JournalSettings) -> AsyncIterator[Storage]:
        async with await open_storage(
            settings=journal_settings, serializer=contract_serializer()
        ) as storage:
            yield storage

    @pytest.fixture
    def reopen(self, journal_settings: JournalSettings) -> StorageOpener:
        async def reopen(serializer: Serializer) -> Storage:
            return await open_storage(settings=journal_settings, serializer=serializer)

        return reopen


class TestJournal(_OnBothBackends, JournalContract):
    """The journal contract on SQLite and PostgreSQL."""


class TestSnapshotStore(_OnBothBackends, SnapshotStoreContract):
    """The snapshot-store contract on SQLite and PostgreSQL."""


class TestContractFixtures(StorageContract):
    """The base fixtures, for a subclass that provides neither ``storage`` nor ``reopen``."""

    async def test_without_reopen_the_cases_that_need_it_skip(
        self, request: pytest.FixtureRequest
    ) -> None:
        with pytest.raises(pytest.skip.Exception, match="does not provide the `reopen` fixture"):
            request.getfixturevalue("reopen")
