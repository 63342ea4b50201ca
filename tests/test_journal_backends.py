"""The journal front picks its database backend once, when it is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.user_service.entity import UserEntity
from lagompy import ConfigurationError, Journal, JournalSettings
from lagompy.journal import SnapshotStore, serializer_for
from lagompy.sql import Database


async def test_a_database_without_a_journal_backend_is_refused_when_the_journal_is_built(
    tmp_path: Path,
) -> None:
    """A dialect no backend implements is named at construction, not at the first write (where
    it used to take another database's write path)."""
    database = Database.create(JournalSettings(url=f"sqlite:///{tmp_path}/x.db"))
    try:
        database.dialect = "mysql"  # type: ignore[assignment]
        serializer = serializer_for([UserEntity])
        with pytest.raises(ConfigurationError, match=r"dialect 'mysql'.*postgresql or sqlite"):
            Journal(database, serializer)
        with pytest.raises(ConfigurationError, match=r"dialect 'mysql'"):
            SnapshotStore(database, serializer)
    finally:
        await database.dispose()
